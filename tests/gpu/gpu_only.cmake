# MOEMESH_GPU_ONLY (included by the top-level CMakeLists.txt, which returns right after): the CUDA
# kernels, the core pieces the GPU tests need, and the GPU tests and benchmarks, built with CUDA,
# CMake, a C++ compiler and what MOEMESH_THIRD_PARTY_DIR carries (GoogleTest's source and
# nlohmann-json's headers, as tests/gpu/bundle.sh packs them). For a lent GPU machine, which has
# none of the Debian -dev packages (docs/gpu.md, "On a lent GPU machine").
set(MOEMESH_THIRD_PARTY_DIR "" CACHE PATH "googletest/ (its googletest source folder) and nlohmann-json/include/")
if(NOT EXISTS "${MOEMESH_THIRD_PARTY_DIR}/googletest/CMakeLists.txt"
   OR NOT EXISTS "${MOEMESH_THIRD_PARTY_DIR}/nlohmann-json/include/nlohmann/json.hpp")
  message(FATAL_ERROR "MOEMESH_GPU_ONLY needs -DMOEMESH_THIRD_PARTY_DIR=<folder with googletest/ and "
                      "nlohmann-json/include/> (tests/gpu/bundle.sh packs one); got '${MOEMESH_THIRD_PARTY_DIR}'")
endif()

# CUDA is the point of this mode: no nvcc is an error, not a quiet CPU-only build.
if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
endif()
include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(FATAL_ERROR "MOEMESH_GPU_ONLY: no CUDA compiler (nvcc) found")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(MOEMESH_HAVE_CUDA ON)
message(STATUS "moemesh: CUDA kernels ON (GPU-only build: ${CMAKE_CUDA_COMPILER_VERSION})")

find_package(Threads REQUIRED)

# nlohmann-json is header-only: an interface target named like its CMake package's.
add_library(moemesh_nlohmann_json INTERFACE)
target_include_directories(moemesh_nlohmann_json SYSTEM INTERFACE "${MOEMESH_THIRD_PARTY_DIR}/nlohmann-json/include")
add_library(nlohmann_json::nlohmann_json ALIAS moemesh_nlohmann_json)

# GoogleTest from source (Debian ships only the source, /usr/src/googletest). Its 1.12 CMakeLists
# asks for CMake 3.5, which CMake 4 refuses without a policy floor; SYSTEM keeps its headers' warnings
# out of ours.
set(CMAKE_POLICY_VERSION_MINIMUM 3.5)
set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
add_subdirectory("${MOEMESH_THIRD_PARTY_DIR}/googletest" "${CMAKE_BINARY_DIR}/googletest" EXCLUDE_FROM_ALL SYSTEM)
unset(CMAKE_POLICY_VERSION_MINIMUM)
foreach(t gtest gtest_main)
  if(NOT TARGET GTest::${t})  # older GoogleTest releases name no GTest:: aliases
    add_library(GTest::${t} ALIAS ${t})
  endif()
endforeach()

find_program(SYSTEM_PYTHON NAMES python3)

enable_testing()
add_subdirectory(kernels)
add_subdirectory(core)
include(tests/gpu/tests.cmake)
