// GPU counting before any fork: through NVML and CUDA_VISIBLE_DEVICES, never through CUDA,
// which does not survive a fork (docs/DESIGN.md, "Process model").
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <set>
#include <sstream>
#include <string>

#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/launch.h"

namespace mpu {
namespace {

// NVML's device count, or 0 when the library or the driver is missing. NVML does not touch the
// CUDA driver, so this is safe before fork(). Unused in builds without CUDA.
[[maybe_unused]] int nvml_device_count() {
  void* lib = ::dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return 0;
  using InitFn = int (*)();
  using CountFn = int (*)(unsigned int*);
  using ShutdownFn = int (*)();
  auto init = reinterpret_cast<InitFn>(::dlsym(lib, "nvmlInit_v2"));
  auto count = reinterpret_cast<CountFn>(::dlsym(lib, "nvmlDeviceGetCount_v2"));
  auto shutdown = reinterpret_cast<ShutdownFn>(::dlsym(lib, "nvmlShutdown"));
  int devices = 0;
  if (init != nullptr && count != nullptr && shutdown != nullptr && init() == 0) {
    unsigned int n = 0;
    if (count(&n) == 0) devices = static_cast<int>(n);
    shutdown();
  }
  ::dlclose(lib);
  return devices;
}

}  // namespace

namespace detail {

int count_visible_gpus(const char* visible, int nvml_count) {
  if (visible == nullptr) return nvml_count;
  // As CUDA reads the list: it ends at the first entry that is empty, not a device, or repeated.
  std::set<std::string> seen;
  int count = 0;
  std::stringstream items(visible);
  std::string item;
  while (std::getline(items, item, ',')) {
    const auto first = item.find_first_not_of(" \t");
    const auto last = item.find_last_not_of(" \t");
    if (first == std::string::npos) break;
    item = item.substr(first, last - first + 1);
    std::string key = item;
    if (item.rfind("GPU-", 0) == 0 || item.rfind("MIG-", 0) == 0) {
      // A UUID: CUDA checks it against the devices; NVML is not asked here, so trust it.
    } else {
      if (!std::all_of(item.begin(), item.end(),
                       [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; })) {
        break;
      }
      if (item.size() > 6) break;
      const int index = std::stoi(item);
      if (index >= nvml_count) break;
      key = std::to_string(index);
    }
    if (!seen.insert(key).second) break;
    ++count;
  }
  return count;
}

}  // namespace detail

int local_gpu_count() {
#if MPU_HAS_CUDA
  return detail::count_visible_gpus(std::getenv(kEnvCudaVisibleDevices), nvml_device_count());
#else
  return 0;
#endif
}

std::vector<torch::Device> local_gpus() {
  const int count = local_gpu_count();
  if (count == 0) return {torch::Device(torch::kCPU), torch::Device(torch::kCPU)};
  std::vector<torch::Device> devices;
  for (int i = 0; i < count; ++i) {
    devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
  }
  return devices;
}

bool cuda_initialized() {
  // RTLD_NOLOAD: only look at a driver library that is already loaded; never load it.
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) return false;
  using GetCurrentFn = int (*)(void**);
  auto get_current = reinterpret_cast<GetCurrentFn>(::dlsym(lib, "cuCtxGetCurrent"));
  constexpr int kCudaErrorNotInitialized = 3;
  void* context = nullptr;
  const int result = get_current != nullptr ? get_current(&context) : kCudaErrorNotInitialized;
  ::dlclose(lib);
  return result != kCudaErrorNotInitialized;
}

}  // namespace mpu
