add_test(NAME cli_mkmodel_generate
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/mkmodel_generate.sh $<TARGET_FILE:moemesh> ${SYSTEM_PYTHON})
set_tests_properties(cli_mkmodel_generate PROPERTIES LABELS unit TIMEOUT 120 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
add_test(NAME cli_bench_fake_server
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/bench_fake_server.py $<TARGET_FILE:moemesh>)
set_tests_properties(cli_bench_fake_server PROPERTIES LABELS unit TIMEOUT 120)
add_test(NAME bench_engine_cli
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/bench_engine.sh $<TARGET_FILE:moemesh> ${SYSTEM_PYTHON})
set_tests_properties(bench_engine_cli PROPERTIES LABELS integration TIMEOUT 120)
# `moemesh quantize --method rtn`: mkmodel's tiny models (and a hf_reference one) quantized, read
# back with gptq_reference.py's independent unpacking, generated from, and the error lines.
add_test(NAME cli_quantize_rtn
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/quantize_rtn.py $<TARGET_FILE:moemesh>)
set_tests_properties(cli_quantize_rtn PROPERTIES LABELS unit TIMEOUT 120 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
