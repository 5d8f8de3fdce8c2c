# The cluster as real processes on loopback: Python scripts (stdlib + numpy) driving moemesh-router,
# -attention, -expert and -kvstore through harness.py, each against the in-process reference
# (`moemesh generate`). Every test makes its own tiny models in a temp dir. RUN_SERIAL: each starts
# up to 8 processes and some measure timings.
set(MOEMESH_IT_DIR ${CMAKE_CURRENT_LIST_DIR})
set(MOEMESH_IT_BINS
  --cli $<TARGET_FILE:moemesh>
  --router $<TARGET_FILE:moemesh-router>
  --attention $<TARGET_FILE:moemesh-attention>
  --expert $<TARGET_FILE:moemesh-expert>
  --kvstore $<TARGET_FILE:moemesh-kvstore>)

function(moemesh_cluster_test name script timeout)
  add_test(NAME ${name} COMMAND ${SYSTEM_PYTHON} ${MOEMESH_IT_DIR}/${script} ${MOEMESH_IT_BINS} ${ARGN})
  set_tests_properties(${name} PROPERTIES LABELS integration TIMEOUT ${timeout} RUN_SERIAL TRUE
                       ENVIRONMENT "OPENBLAS_NUM_THREADS=1;PYTHONDONTWRITEBYTECODE=1")
endfunction()

moemesh_cluster_test(cluster_matches_reference_mixtral test_cluster_matches_reference.py 120 --arch mixtral)
moemesh_cluster_test(cluster_matches_reference_deepseek test_cluster_matches_reference.py 120 --arch deepseek)
moemesh_cluster_test(cluster_matches_reference_int4_experts test_cluster_matches_reference.py 120 --arch mixtral
                     --int4-experts)
moemesh_cluster_test(expert_hosts_map_only_their_share test_expert_hosts_map_only_their_share.py 60)
moemesh_cluster_test(garbage_to_every_port test_garbage_to_every_port.py 90)
moemesh_cluster_test(bad_requests test_bad_requests.py 60)
moemesh_cluster_test(expert_host_failover test_expert_host_failover.py 120)
moemesh_cluster_test(expert_hosts_rejoin test_expert_hosts_rejoin.py 60)
moemesh_cluster_test(sigterm_exits_cleanly test_sigterm_exits_cleanly.py 90)
moemesh_cluster_test(tenants test_tenants.py 60)
moemesh_cluster_test(lora test_lora.py 120)
moemesh_cluster_test(serving test_serving.py 240)
moemesh_cluster_test(preemption test_preemption.py 120)
moemesh_cluster_test(fairness_and_isolation test_fairness.py 180)
moemesh_cluster_test(openai_client test_openai_client.py 180 --cache-dir ${MOEMESH_CACHE_DIR})
moemesh_cluster_test(responses test_responses.py 300 --cache-dir ${MOEMESH_CACHE_DIR})
moemesh_cluster_test(structured_outputs_mixtral test_structured_outputs.py 600 --cache-dir ${MOEMESH_CACHE_DIR}
                     --arch mixtral --requests 200)
moemesh_cluster_test(structured_outputs_deepseek test_structured_outputs.py 600 --cache-dir ${MOEMESH_CACHE_DIR}
                     --arch deepseek --requests 40)
moemesh_cluster_test(chaos test_chaos.py 240)
moemesh_cluster_test(up_restarts test_up_restarts.py 180)
moemesh_cluster_test(up_stops_on_signal test_up_stops_on_signal.py 120)
moemesh_cluster_test(rebalance test_rebalance.py 240)
moemesh_cluster_test(busy_fraction test_busy_fraction.py 120)
