#include "train/step_graph.h"

#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/precision.h"

namespace mpu::detail {

void check_cuda_graph(const UpdaterOptions& options, const torch::Device& device, int processes,
                      const char* who) {
  if (!options.cuda_graph) return;
  MPU_CHECK(MPU_HAS_CUDA, who,
            ": UpdaterOptions::cuda_graph needs torch-mpu built with CUDA; this build has none");
  MPU_CHECK(device.is_cuda(), who, ": UpdaterOptions::cuda_graph needs a CUDA device; this ",
            "updater trains on ", device.str());
  MPU_CHECK(processes == 1, who, ": UpdaterOptions::cuda_graph trains one process for now; ",
            "this updater has ", processes,
            " (capturing the communicator's collectives is not built yet)");
  MPU_CHECK(options.cuda_graph_warmup >= 1, who,
            ": UpdaterOptions::cuda_graph_warmup must be at least 1 (cuDNN's autotuning and the "
            "first step's optimizer state happen in eager steps), got ",
            options.cuda_graph_warmup);
  MPU_CHECK(!uses_loss_scaling(options.precision), who, ": UpdaterOptions::cuda_graph cannot ",
            "capture precision ", to_string(options.precision),
            ": its loss scaler reads the overflow verdict on the host every step. Use "
            "bf16_mixed, bf16_autocast or fp32");
  MPU_CHECK(!options.skip_nonfinite, who, ": UpdaterOptions::cuda_graph cannot capture ",
            "skip_nonfinite: the verdict is read on the host every step");
  MPU_CHECK(options.accumulation_steps == 1, who,
            ": UpdaterOptions::cuda_graph captures one micro-batch a step; accumulation_steps is ",
            options.accumulation_steps);
  MPU_CHECK(options.flat_step, who, ": UpdaterOptions::cuda_graph needs UpdaterOptions::",
            "flat_step (the fused step reads its learning rate and step count from the device)");
}

#if !MPU_HAS_CUDA
std::unique_ptr<StepGraph> make_step_graph(const UpdaterOptions& /*options*/,
                                           const torch::Device& device) {
  MPU_THROW(InvalidArgument, "UpdaterOptions::cuda_graph needs torch-mpu built with CUDA (device ",
            device.str(), ")");
}
#endif

}  // namespace mpu::detail
