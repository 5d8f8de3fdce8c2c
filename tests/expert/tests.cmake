# moemesh-expert as a real process: garbage on its socket, bad flags, a killed replica.
add_executable(test_expert_process ${CMAKE_CURRENT_LIST_DIR}/test_expert_process.cpp)
target_link_libraries(test_expert_process PRIVATE moemesh_core moemesh_actors GTest::gtest GTest::gtest_main)
target_compile_definitions(test_expert_process PRIVATE MOEMESH_EXPERT_BIN="$<TARGET_FILE:moemesh-expert>")
add_dependencies(test_expert_process moemesh-expert)
add_test(NAME expert_host_process COMMAND test_expert_process)
set_tests_properties(expert_host_process PROPERTIES LABELS integration RUN_SERIAL TRUE TIMEOUT 180)
