# moemesh-kvstore as a process: the real binary on loopback, driven over ZeroMQ by a
# GoogleTest client (put/get/evict, garbage, metrics, SIGTERM; the disk tier across a restart).
add_executable(test_kvstore_process ${CMAKE_CURRENT_LIST_DIR}/test_kvstore_process.cpp)
target_link_libraries(test_kvstore_process PRIVATE moemesh_core moemesh_actors GTest::gtest GTest::gtest_main)
target_compile_definitions(test_kvstore_process PRIVATE MOEMESH_KVSTORE="$<TARGET_FILE:moemesh-kvstore>")
add_dependencies(test_kvstore_process moemesh-kvstore)
# RUN_SERIAL: real processes on ports picked free a moment earlier; parallel tests could race for them.
gtest_discover_tests(test_kvstore_process PROPERTIES LABELS integration RUN_SERIAL TRUE DISCOVERY_TIMEOUT 60)
