// Debian's CPU-only libtorch-dev ships the c10/cuda headers without this generated file. The
// glue compile check (MPU_GLUE_CHECK, see cmake/MpuDependencies.cmake) supplies it; real CUDA
// builds of LibTorch have their own.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
