# llama.cpp as a numerical oracle: an f32 Mixtral exported with `moemesh export-gguf` must give
# the same greedy tokens in llama.cpp (node-llama-cpp's prebuilt CPU build, from scripts/bootstrap)
# as in `moemesh generate`. Skipped (exit 77) only when node or node-llama-cpp is not installed.
add_test(NAME llama_cpp_greedy
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_llama_cpp_greedy.py
                 --cli $<TARGET_FILE:moemesh> --llama-cpp-dir ${MOEMESH_CACHE_DIR}/llama-cpp)
set_tests_properties(llama_cpp_greedy PROPERTIES LABELS integration TIMEOUT 300 SKIP_RETURN_CODE 77
                     ENVIRONMENT "OPENBLAS_NUM_THREADS=1;PYTHONDONTWRITEBYTECODE=1")
