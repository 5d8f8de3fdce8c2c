# Observability: the metric contract (docs/metrics.md) against a real cluster, the Prometheus
# rules (promtool check + rule unit tests) and every dashboard/rule query against a real
# Prometheus server scraping a running cluster.
find_program(MOEMESH_PROMTOOL promtool PATHS /usr/bin)
find_program(MOEMESH_PROMETHEUS prometheus PATHS /usr/bin)

add_test(NAME observability_metrics_contract
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_metrics_contract.py
                 --cli $<TARGET_FILE:moemesh> --contract ${CMAKE_SOURCE_DIR}/docs/metrics.md
                 --promtool ${MOEMESH_PROMTOOL})
set_tests_properties(observability_metrics_contract PROPERTIES LABELS integration TIMEOUT 180)
