# `moemesh mkmodel` end to end, then damaged copies of its output: every damage must make a
# command that opens the checkpoint exit non-zero with one line naming the problem.
add_test(NAME checkpoint_cli
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/checkpoint_cli.sh $<TARGET_FILE:moemesh> ${SYSTEM_PYTHON}
                 ${MOEMESH_CACHE_DIR})
set_tests_properties(checkpoint_cli PROPERTIES LABELS unit TIMEOUT 120)
