# Observability: the metric contract (docs/metrics.md) against a real cluster, the Prometheus
# rules (promtool check + rule unit tests) and every dashboard/rule query against a real
# Prometheus server scraping a running cluster.
find_program(MOEMESH_PROMTOOL promtool PATHS /usr/bin)
find_program(MOEMESH_PROMETHEUS prometheus PATHS /usr/bin)

add_test(NAME observability_metrics_contract
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_metrics_contract.py
                 --cli $<TARGET_FILE:moemesh> --contract ${CMAKE_SOURCE_DIR}/docs/metrics.md
                 --promtool ${MOEMESH_PROMTOOL})
set_tests_properties(observability_metrics_contract PROPERTIES LABELS integration RUN_SERIAL TRUE TIMEOUT 180)

add_test(NAME observability_rules_check
         COMMAND ${MOEMESH_PROMTOOL} check rules
                 ${CMAKE_SOURCE_DIR}/dashboards/rules/moemesh-recording.yaml
                 ${CMAKE_SOURCE_DIR}/dashboards/rules/moemesh-alerts.yaml)
add_test(NAME observability_rules_unit
         COMMAND ${MOEMESH_PROMTOOL} test rules alerts.test.yaml
         WORKING_DIRECTORY ${CMAKE_CURRENT_LIST_DIR})
add_test(NAME observability_dashboards_source
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/make_dashboards.py --check ${CMAKE_SOURCE_DIR}/dashboards)
set_tests_properties(observability_rules_check observability_rules_unit observability_dashboards_source
                     PROPERTIES LABELS unit TIMEOUT 60)

# One request's trace id through router, attention, expert hosts and KV store (span log lines).
add_test(NAME observability_trace_spans
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_trace_spans.py --cli $<TARGET_FILE:moemesh>)
set_tests_properties(observability_trace_spans PROPERTIES LABELS integration RUN_SERIAL TRUE TIMEOUT 120)

# The real-Prometheus test (Debian's prometheus package; scripts/bootstrap installs it).
add_test(NAME observability_prometheus
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_prometheus.py
                 --cli $<TARGET_FILE:moemesh> --source-dir ${CMAKE_SOURCE_DIR} --prometheus ${MOEMESH_PROMETHEUS})
set_tests_properties(observability_prometheus PROPERTIES LABELS integration RUN_SERIAL TRUE TIMEOUT 120)

# The attention side's dispatch metrics against in-process expert hosts.
add_executable(test_dispatch_metrics ${CMAKE_CURRENT_LIST_DIR}/test_dispatch_metrics.cpp)
target_link_libraries(test_dispatch_metrics PRIVATE moemesh_core moemesh_actors GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_dispatch_metrics PROPERTIES LABELS unit DISCOVERY_TIMEOUT 60)

add_executable(test_trace_span ${CMAKE_CURRENT_LIST_DIR}/test_trace_span.cpp)
target_link_libraries(test_trace_span PRIVATE moemesh_core moemesh_actors GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_trace_span PROPERTIES LABELS unit DISCOVERY_TIMEOUT 60)

# The attention step's phases (expert_wait, sampling, attention) and its sequences' trace spans.
add_executable(test_step_tracing ${CMAKE_CURRENT_LIST_DIR}/test_step_tracing.cpp)
target_link_libraries(test_step_tracing PRIVATE moemesh_core moemesh_actors GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_step_tracing PROPERTIES LABELS unit DISCOVERY_TIMEOUT 60)
