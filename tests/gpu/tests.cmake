# --device selection and the backend factory: built everywhere (label unit), CUDA or not.
include(GoogleTest)
add_executable(test_compute_backend ${CMAKE_CURRENT_LIST_DIR}/test_compute_backend.cpp)
target_link_libraries(test_compute_backend PRIVATE moemesh_backend GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_compute_backend PROPERTIES LABELS unit DISCOVERY_TIMEOUT 60)

# The transports and the services need the actors layer (CAF, ZeroMQ, protobuf): not in the
# GPU-only build (MOEMESH_GPU_ONLY, tests/gpu/gpu_only.cmake).
if(NOT MOEMESH_GPU_ONLY)
# Dispatch payload transports (ZeroMQ everywhere; the NCCL pair test where NCCL was found).
add_executable(test_transport ${CMAKE_CURRENT_LIST_DIR}/test_transport.cpp)
target_link_libraries(test_transport PRIVATE moemesh_actors GTest::gtest GTest::gtest_main)
if(TARGET moemesh_nccl_transport)
  target_link_libraries(test_transport PRIVATE moemesh_nccl_transport)
  target_compile_definitions(test_transport PRIVATE MOEMESH_TEST_NCCL)
  # The other process of TransportNccl.TwoProcessesExchangePayloads.
  add_executable(nccl_echo_peer ${CMAKE_CURRENT_LIST_DIR}/nccl_echo_peer.cpp)
  target_link_libraries(nccl_echo_peer PRIVATE moemesh_nccl_transport)
  add_dependencies(test_transport nccl_echo_peer)
  target_compile_definitions(test_transport PRIVATE MOEMESH_NCCL_ECHO_PEER="$<TARGET_FILE:nccl_echo_peer>")
endif()
gtest_discover_tests(test_transport PROPERTIES LABELS "unit;gpu" DISCOVERY_TIMEOUT 60)

# The services refuse a missing CUDA device with one clear line and a non-zero exit (the device
# is checked before the model is opened, so the model path does not matter).
set(MOEMESH_DEVICE_CHECK "out=$(\"$@\" --model /nonexistent --device cuda:99 --admin-port 0 2>&1); rc=$?; echo \"$out\"; [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q 'no CUDA device: ' <<<\"$out\"")
add_test(NAME attention_device_cuda_fails_cleanly
         COMMAND bash -c "${MOEMESH_DEVICE_CHECK}" _ $<TARGET_FILE:moemesh-attention>)
add_test(NAME expert_device_cuda_fails_cleanly
         COMMAND bash -c "${MOEMESH_DEVICE_CHECK}" _ $<TARGET_FILE:moemesh-expert> --experts all)
set_tests_properties(attention_device_cuda_fails_cleanly expert_device_cuda_fails_cleanly
                     PROPERTIES LABELS unit TIMEOUT 60)
endif()

# GPU tests (ctest label "gpu"): the CUDA kernels against the CPU reference. Built whenever nvcc
# is found; tests that need a device skip themselves ("no CUDA device: ...") and pass without one.
if(MOEMESH_HAVE_CUDA)

  add_executable(test_gpu_kernels ${CMAKE_CURRENT_LIST_DIR}/test_gpu_kernels.cpp)
  # moemesh_core for the dtype conversions used to build F16/BF16 inputs.
  target_link_libraries(test_gpu_kernels PRIVATE moemesh_cuda moemesh_kernels moemesh_core
                        GTest::gtest GTest::gtest_main)
  # Discovery runs the binary at build time (--gtest_list_tests): it needs no device.
  gtest_discover_tests(test_gpu_kernels NO_PRETTY_VALUES PROPERTIES LABELS gpu DISCOVERY_TIMEOUT 60)

  # The whole tiny model on the CUDA backend against the CPU engine.
  add_executable(test_gpu_model ${CMAKE_CURRENT_LIST_DIR}/test_gpu_model.cpp)
  target_link_libraries(test_gpu_model PRIVATE moemesh_backend moemesh_cuda GTest::gtest GTest::gtest_main)
  gtest_discover_tests(test_gpu_model PROPERTIES LABELS gpu DISCOVERY_TIMEOUT 60)

  # An expert host's batch on the CUDA backend against the CPU backend (the expert host is in
  # the actors layer: not in the GPU-only build).
  if(NOT MOEMESH_GPU_ONLY)
    add_executable(test_gpu_experts ${CMAKE_CURRENT_LIST_DIR}/test_gpu_experts.cpp)
    target_link_libraries(test_gpu_experts PRIVATE moemesh_backend moemesh_actors moemesh_cuda GTest::gtest GTest::gtest_main)
    gtest_discover_tests(test_gpu_experts PROPERTIES LABELS gpu DISCOVERY_TIMEOUT 60)
  endif()

  # The built library carries sm_90 SASS and compute_90 PTX for every kernel (no device needed).
  if(SYSTEM_PYTHON)
    add_test(NAME gpu_fatbin_targets
             COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/list_fatbin.py
                     --require sm_90 --require compute_90 $<TARGET_FILE:moemesh_cuda>)
    set_tests_properties(gpu_fatbin_targets PROPERTIES LABELS gpu)
  endif()

  # Kernel time against the measured memory-bandwidth roofline; run by run-on-device.sh, not ctest.
  add_executable(bench_gpu_kernels ${CMAKE_CURRENT_LIST_DIR}/bench_gpu_kernels.cpp)
  target_link_libraries(bench_gpu_kernels PRIVATE moemesh_cuda moemesh_core)

  # Prefill and decode tokens/s of a generated model through Engine, CPU vs CUDA backend; run by
  # run-on-device.sh, not ctest (without a device it prints "no CUDA device: ..." and exits 2).
  add_executable(bench_gpu_model ${CMAKE_CURRENT_LIST_DIR}/bench_gpu_model.cpp)
  target_link_libraries(bench_gpu_model PRIVATE moemesh_backend moemesh_cuda)

  # The lent GPU machine's check (docs/gpu.md, "On a lent GPU machine"), tested without a GPU.
  if(NOT MOEMESH_GPU_ONLY)
    # tests/gpu/bundle.sh packs this build's GPU programs; unpacked in a fresh folder and run by
    # run-on-device.sh with the Debian libraries they load hidden: every program loads from the
    # bundle, glibc or CUDA, the run says "no GPU" and exits 2, the bundle is at most 40 MiB.
    add_test(NAME gpu_bundle_loads_without_debian_libs
             COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_bundle.sh ${CMAKE_BINARY_DIR}
                     ${CMAKE_BINARY_DIR}/gpu-bundle-test)
    # The fallback build there (MOEMESH_GPU_ONLY), with the Debian -dev packages hidden from CMake
    # and checked unused by the compiler and the linker: a second configure and build of the CUDA
    # parts (about 2-5 minutes on 2 cores with a cold ccache, 30 s warm).
    add_test(NAME gpu_only_build_without_debian_dev
             COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_gpu_only_build.sh ${CMAKE_SOURCE_DIR}
                     ${CMAKE_BINARY_DIR}/gpu-only-build-test)
    set_tests_properties(gpu_bundle_loads_without_debian_libs PROPERTIES LABELS gpu TIMEOUT 300)
    set_tests_properties(gpu_only_build_without_debian_dev PROPERTIES LABELS gpu TIMEOUT 900)
  endif()
endif()
