# Finds LibTorch and the optional pieces, decides MPU_CUDA_ENABLED, MPU_NCCL_ENABLED,
# MPU_GLOO_ENABLED and MPU_KERNEL_CHECK, and writes MPU_SUMMARY: one line saying what is on
# and why.
find_package(Threads REQUIRED)
find_package(ZLIB REQUIRED)
find_package(Torch REQUIRED)
# Header-only, used privately (LogReport's JSON); Debian: nlohmann-json3-dev.
find_package(nlohmann_json 3.9 REQUIRED)

set(_summary "LibTorch ${Torch_VERSION}")

# --- CUDA ------------------------------------------------------------------------------------
set(_torch_has_cuda OFF)
if(TORCH_CUDA_LIBRARIES OR TARGET torch_cuda OR TARGET c10_cuda)
  set(_torch_has_cuda ON)
endif()
set(MPU_CUDA_ENABLED OFF)
set(MPU_KERNEL_CHECK OFF)
set(MPU_GLUE_CHECK OFF)
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES 90)  # H100/H200; override with -DCMAKE_CUDA_ARCHITECTURES
endif()
if(MPU_WITH_CUDA STREQUAL "OFF")
  set(_cuda_why "off by request")
elseif(_torch_has_cuda)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(MPU_CUDA_ENABLED ON)
  set(_cuda_why "LibTorch has CUDA ${CUDAToolkit_VERSION}")
elseif(MPU_WITH_CUDA STREQUAL "ON")
  message(FATAL_ERROR "MPU_WITH_CUDA=ON, but the LibTorch found at ${TORCH_INSTALL_PREFIX} has no "
    "CUDA. Point Torch_DIR or CMAKE_PREFIX_PATH at a CUDA build of LibTorch, or use AUTO.")
else()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(MPU_KERNEL_CHECK ON)
    set(_cuda_why "LibTorch is CPU-only; kernels compiled as a check with ${CMAKE_CUDA_COMPILER}")
    # Where LibTorch still ships its c10/cuda headers (Debian does) and NCCL is installed, the
    # CUDA and NCCL glue is compiled too, unlinked, so that CPU-only CI catches its errors.
    find_package(CUDAToolkit QUIET)
    find_path(MPU_CHECK_C10_CUDA_DIR c10/cuda/CUDAStream.h HINTS ${TORCH_INCLUDE_DIRS})
    find_path(MPU_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_HOME
              PATH_SUFFIXES include)
    if(CUDAToolkit_FOUND AND MPU_CHECK_C10_CUDA_DIR AND MPU_NCCL_INCLUDE_DIR)
      set(MPU_GLUE_CHECK ON)
      string(APPEND _cuda_why ", CUDA/NCCL glue compiled as a check")
    endif()
  else()
    set(_cuda_why "LibTorch is CPU-only and no nvcc found")
  endif()
endif()
string(APPEND _summary "; CUDA ${MPU_CUDA_ENABLED} (${_cuda_why})")

# --- NCCL ------------------------------------------------------------------------------------
set(MPU_NCCL_ENABLED OFF)
if(MPU_WITH_NCCL STREQUAL "OFF")
  set(_nccl_why "off by request")
elseif(NOT MPU_CUDA_ENABLED)
  if(MPU_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "MPU_WITH_NCCL=ON needs the CUDA path, which is off (${_cuda_why}).")
  endif()
  set(_nccl_why "follows CUDA")
else()
  find_path(MPU_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_HOME
            PATH_SUFFIXES include)
  find_library(MPU_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} ENV NCCL_HOME
               PATH_SUFFIXES lib lib64)
  if(MPU_NCCL_INCLUDE_DIR AND MPU_NCCL_LIBRARY)
    set(MPU_NCCL_ENABLED ON)
    set(_nccl_why "${MPU_NCCL_LIBRARY}")
  elseif(MPU_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "MPU_WITH_NCCL=ON, but nccl.h or libnccl was not found; set NCCL_HOME.")
  else()
    set(_nccl_why "nccl.h or libnccl not found")
  endif()
endif()
string(APPEND _summary "; NCCL ${MPU_NCCL_ENABLED} (${_nccl_why})")

# --- Gloo (through c10d's ProcessGroupGloo) --------------------------------------------------
set(MPU_GLOO_ENABLED OFF)
if(MPU_WITH_GLOO STREQUAL "OFF")
  set(_gloo_why "off by request")
else()
  find_path(MPU_GLOO_INCLUDE_DIR gloo/config.h)
  if(MPU_GLOO_INCLUDE_DIR)
    set(MPU_GLOO_ENABLED ON)
    set(_gloo_why "headers in ${MPU_GLOO_INCLUDE_DIR}")
  elseif(MPU_WITH_GLOO STREQUAL "ON")
    message(FATAL_ERROR "MPU_WITH_GLOO=ON, but the Gloo headers (gloo/config.h) were not found; "
      "install libgloo-dev or add its prefix to CMAKE_PREFIX_PATH.")
  else()
    set(_gloo_why "gloo/config.h not found; install libgloo-dev")
  endif()
endif()
string(APPEND _summary "; Gloo ${MPU_GLOO_ENABLED} (${_gloo_why})")

set(MPU_SUMMARY "${_summary}")
foreach(_f CUDA NCCL GLOO)
  if(MPU_${_f}_ENABLED)
    set(MPU_${_f}_ENABLED_01 1)
  else()
    set(MPU_${_f}_ENABLED_01 0)
  endif()
endforeach()

# In a user's tree (add_subdirectory), imported targets found here would be visible only in this
# directory, yet mpu::mpu hands them on to the user's targets: make them global.
if(NOT MPU_TOP_LEVEL)
  get_directory_property(_mpu_imported IMPORTED_TARGETS)
  foreach(_t IN LISTS _mpu_imported)
    get_target_property(_global ${_t} IMPORTED_GLOBAL)
    if(NOT _global)
      set_target_properties(${_t} PROPERTIES IMPORTED_GLOBAL TRUE)
    endif()
  endforeach()
endif()
