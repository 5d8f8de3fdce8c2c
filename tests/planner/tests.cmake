# The capacity planner end to end: `moemesh plan search` writes Helm values that render (chart).
add_test(NAME planner_search_helm_template
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/chart_plan_search.sh $<TARGET_FILE:moemesh>
                 ${MOEMESH_CACHE_DIR}/bin/helm ${CMAKE_SOURCE_DIR}/helm/moemesh)
set_tests_properties(planner_search_helm_template PROPERTIES LABELS chart TIMEOUT 120)
# `moemesh plan profile --refit`: a recorded calibration fitted again offline (round trip, refusal).
add_test(NAME planner_profile_refit COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/plan_refit.py $<TARGET_FILE:moemesh>)
set_tests_properties(planner_profile_refit PROPERTIES LABELS unit TIMEOUT 60)
# bench/itl_breakdown.py: gaps classed as constructed, and every simulated gap in one class.
add_test(NAME planner_itl_breakdown
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/itl_breakdown_check.py $<TARGET_FILE:moemesh>)
set_tests_properties(planner_itl_breakdown PROPERTIES LABELS unit TIMEOUT 60)
# bench/metrics_delta.py: what a page's histograms saw during a command (mean, count), refusals.
add_test(NAME planner_metrics_delta COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/metrics_delta_check.py)
set_tests_properties(planner_metrics_delta PROPERTIES LABELS unit TIMEOUT 60)
# `moemesh plan gaps`: two clients' records matched and classed, one client's, a malformed line.
add_test(NAME planner_plan_gaps
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/plan_gaps_check.py $<TARGET_FILE:moemesh>)
set_tests_properties(planner_plan_gaps PROPERTIES LABELS unit TIMEOUT 60)
# bench/planner_validate.py's wake-up probe and the matching of runs to rounds by it.
add_test(NAME planner_wake_match
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/wake_match_check.py $<TARGET_FILE:bench_wake_round_trip>)
set_tests_properties(planner_wake_match PROPERTIES LABELS unit TIMEOUT 60)
