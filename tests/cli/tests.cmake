add_test(NAME cli_mkmodel_generate
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/mkmodel_generate.sh $<TARGET_FILE:moemesh> ${SYSTEM_PYTHON})
set_tests_properties(cli_mkmodel_generate PROPERTIES LABELS unit TIMEOUT 120 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
