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
# `moemesh quantize --method gptq`: calibrated from text, .jsonl and input_ids; the output read back
# by gptq_reference.py and, for hf_reference models, moemesh's logits against its float64 forward
# pass; starved experts rounded to nearest with a warning; the error lines.
add_test(NAME cli_quantize_gptq
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/quantize_gptq.py $<TARGET_FILE:moemesh>)
set_tests_properties(cli_quantize_gptq PROPERTIES LABELS integration TIMEOUT 120 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
# `moemesh quantize-eval` on the small preset: GPTQ 4-bit's mean KL below RTN 4-bit's (same group).
add_test(NAME cli_quantize_eval
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/quantize_eval.py $<TARGET_FILE:moemesh>)
set_tests_properties(cli_quantize_eval PROPERTIES LABELS integration TIMEOUT 180 SKIP_RETURN_CODE 77
                     ENVIRONMENT OPENBLAS_NUM_THREADS=1)
