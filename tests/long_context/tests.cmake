# Long contexts (issue #15): a 131072-token context through a real cluster, with and without a
# sliding window, f32 and INT8 KV (tests/long_context/test_128k.py). Minutes on two cores (the
# unwindowed cases attend over every position), so it carries the `slow` label that the README's
# everyday test command skips: `ctest --test-dir build -L slow -R long_context` runs it.
add_test(NAME long_context_128k
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_128k.py
                 --cli $<TARGET_FILE:moemesh> --router $<TARGET_FILE:moemesh-router>
                 --attention $<TARGET_FILE:moemesh-attention> --expert $<TARGET_FILE:moemesh-expert>
                 --kvstore $<TARGET_FILE:moemesh-kvstore>)
set_tests_properties(long_context_128k PROPERTIES LABELS slow TIMEOUT 3600 RUN_SERIAL TRUE
                     ENVIRONMENT "OPENBLAS_NUM_THREADS=1;PYTHONDONTWRITEBYTECODE=1")
