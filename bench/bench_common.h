// Pieces every single-process benchmark uses: the device choice, exactness checks, JSON text.
#pragma once

#include <torch/torch.h>

#include <string>

#include "mpu/config.h"
#include "mpu/error.h"
#include "tests/tensor_bits.h"

namespace mpu::bench {

using mpu::test::same_bits;

/// The device `--device auto|cpu|cuda` names: cuda:0 for "cuda" (an error without one), for
/// "auto" when LibTorch sees a GPU and this build has CUDA, else the CPU.
inline torch::Device pick_device(const std::string& option, const char* program) {
  MPU_CHECK(option == "auto" || option == "cpu" || option == "cuda", program,
            ": --device must be auto, cpu or cuda, got '", option, "'");
  bool cuda = MPU_HAS_CUDA && option != "cpu" && torch::cuda::is_available();
  if (option == "cuda") {
    MPU_CHECK(cuda, program, ": --device cuda, but no CUDA device is available");
  }
  return cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
}

/// `s` with quotes and backslashes escaped, for a JSON string.
inline std::string json_escape(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out;
}

}  // namespace mpu::bench
