# The prefix cache and micro-batches in a real cluster on loopback (router, two expert hosts, an
# attention worker, a KV store), driven over the OpenAI API by a GoogleTest client.
add_executable(test_prefix_process ${CMAKE_CURRENT_LIST_DIR}/test_prefix_process.cpp)
target_link_libraries(test_prefix_process PRIVATE moemesh_core moemesh_actors GTest::gtest GTest::gtest_main)
target_compile_definitions(test_prefix_process PRIVATE
  MOEMESH_ROUTER="$<TARGET_FILE:moemesh-router>"
  MOEMESH_EXPERT="$<TARGET_FILE:moemesh-expert>"
  MOEMESH_ATTENTION="$<TARGET_FILE:moemesh-attention>"
  MOEMESH_KVSTORE="$<TARGET_FILE:moemesh-kvstore>")
add_dependencies(test_prefix_process moemesh-router moemesh-expert moemesh-attention moemesh-kvstore)
gtest_discover_tests(test_prefix_process PROPERTIES LABELS integration RUN_SERIAL TRUE TIMEOUT 60 DISCOVERY_TIMEOUT 60)
