# The Helm chart, offline, with the real Helm that scripts/bootstrap puts in .cache/bin: lint,
# template variants and checks on the rendered objects, schema rejections (render); the objects
# against the Kubernetes/prometheus-operator/KEDA schemas (schemas); the Dockerfiles (dockerfiles).
find_program(MOEMESH_PROMTOOL promtool)
set(_chart_check ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/check_chart.py
    --helm ${MOEMESH_CACHE_DIR}/bin/helm --tools ${MOEMESH_CACHE_DIR}/chart-tools)
if(MOEMESH_PROMTOOL)
  list(APPEND _chart_check --promtool ${MOEMESH_PROMTOOL})
endif()
foreach(group render schemas dockerfiles)
  add_test(NAME chart_${group} COMMAND ${_chart_check} ${group})
  set_tests_properties(chart_${group} PROPERTIES LABELS chart TIMEOUT 120)
endforeach()
