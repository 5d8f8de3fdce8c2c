# llama.cpp as a numerical oracle: an f32 checkpoint exported with `moemesh export-gguf` must give
# the same greedy tokens in llama.cpp (node-llama-cpp's prebuilt CPU build, from scripts/bootstrap)
# as in `moemesh generate`: Mixtral as llama.cpp's llama, DeepSeek-MoE as its deepseek.
# Skipped (exit 77) only when node or node-llama-cpp is not installed.
foreach(arch mixtral deepseek)
  set(name llama_cpp_greedy)
  if(NOT arch STREQUAL "mixtral")
    set(name llama_cpp_greedy_${arch})
  endif()
  add_test(NAME ${name}
           COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/test_llama_cpp_greedy.py --arch ${arch}
                   --cli $<TARGET_FILE:moemesh> --llama-cpp-dir ${MOEMESH_CACHE_DIR}/llama-cpp)
  set_tests_properties(${name} PROPERTIES LABELS integration TIMEOUT 300 SKIP_RETURN_CODE 77
                       ENVIRONMENT "OPENBLAS_NUM_THREADS=1;PYTHONDONTWRITEBYTECODE=1")
endforeach()

# The comparison benchmark itself, end to end on a small model (minutes: label slow).
add_test(NAME llama_cpp_compare_smoke
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/compare_smoke.py ${CMAKE_BINARY_DIR}
                 ${MOEMESH_CACHE_DIR}/llama-cpp)
set_tests_properties(llama_cpp_compare_smoke PROPERTIES LABELS slow TIMEOUT 900 SKIP_RETURN_CODE 77
                     ENVIRONMENT "PYTHONDONTWRITEBYTECODE=1")
