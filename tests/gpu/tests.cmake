# GPU tests (ctest label "gpu"): the CUDA kernels against the CPU reference. Built whenever nvcc
# is found; tests that need a device skip themselves ("no CUDA device: ...") and pass without one.
if(MOEMESH_HAVE_CUDA)
  include(GoogleTest)

  add_executable(test_gpu_kernels ${CMAKE_CURRENT_LIST_DIR}/test_gpu_kernels.cpp)
  # moemesh_core for the dtype conversions used to build F16/BF16 inputs.
  target_link_libraries(test_gpu_kernels PRIVATE moemesh_cuda moemesh_kernels moemesh_core
                        GTest::gtest GTest::gtest_main)
  # Discovery runs the binary at build time (--gtest_list_tests): it needs no device.
  gtest_discover_tests(test_gpu_kernels NO_PRETTY_VALUES PROPERTIES LABELS gpu DISCOVERY_TIMEOUT 60)

  # The built library carries sm_90 SASS and compute_90 PTX for every kernel (no device needed).
  add_test(NAME gpu_fatbin_targets
           COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/list_fatbin.py
                   --require sm_90 --require compute_90 $<TARGET_FILE:moemesh_cuda>)
  set_tests_properties(gpu_fatbin_targets PROPERTIES LABELS gpu)

  # Kernel time against the measured memory-bandwidth roofline; run by tests/gpu/run.sh, not ctest.
  add_executable(bench_gpu_kernels ${CMAKE_CURRENT_LIST_DIR}/bench_gpu_kernels.cpp)
  target_link_libraries(bench_gpu_kernels PRIVATE moemesh_cuda moemesh_core)
endif()
