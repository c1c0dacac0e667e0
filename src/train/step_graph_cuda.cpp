// The whole-step CUDA graph (see step_graph.h and UpdaterOptions::cuda_graph).
#define MPU_TORCH_COMPAT_CUDA_GRAPH
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <string>

#include "misc/log.h"
#include "misc/torch_compat.h"
#include "mpu/error.h"
#include "mpu/flat_optimizer.h"
#include "mpu/reporter.h"
#include "sync/sync_engine.h"
#include "train/step_graph.h"
#include "train/updater_common.h"

namespace mpu::detail {
namespace {

bool same_layout(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         a.strides() == b.strides() && a.device() == b.device();
}

std::string first_line(const char* what) {
  std::string s(what);
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// Ends a capture that an exception interrupted, so that the stream can be used again.
void end_broken_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    (void)cudaStreamEndCapture(stream, &graph);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
  }
  (void)cudaGetLastError();  // the capture's error is reported by the exception
}

class CudaStepGraph final : public StepGraph {
 public:
  CudaStepGraph(const UpdaterOptions& options, const torch::Device& device)
      : warmup_(options.cuda_graph_warmup),
        device_(device),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index())) {}

  void step(Iterator& iterator, const UpdaterOptions& options, const LossFunction& loss_fn,
            SyncEngine& engine, std::int64_t iteration) override {
    const c10::cuda::CUDAGuard device_guard(device_);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device_.index());
    // The step follows what the caller queued before it and precedes what it queues after.
    before_.record(caller);
    before_.block(stream_);
    {
      const c10::cuda::CUDAStreamGuard stream_guard(stream_);
      const Batch batch = iterator.next();
      const Batch in =
          options.converter ? options.converter(batch, device_) : to_device(batch, device_);
      if (eager_steps_ < warmup_) {
        eager(in, options, loss_fn, engine, iteration);
        ++eager_steps_;
      } else if (!graph_) {
        capture(in, options, loss_fn, engine, iteration);
      } else if (!same_layout(in.data, data_) || !same_layout(in.target, target_)) {
        if (!warned_) {
          MPU_LOG_INFO("cuda_graph: a batch of shape ", cat(in.data.sizes()),
                       " differs from the captured ", cat(data_.sizes()),
                       "; such batches (a converter or dataset that changes shapes) run eagerly");
          warned_ = true;
        }
        eager(in, options, loss_fn, engine, iteration);
      } else {
        replay(in, engine);
      }
    }
    after_.record(stream_);
    after_.block(caller);
  }

  std::int64_t replays() const override { return replays_; }

 private:
  void eager(const Batch& in, const UpdaterOptions& options, const LossFunction& loss_fn,
             SyncEngine& engine, std::int64_t iteration) const {
    engine.arm(true);
    forward_backward_on(in, options, loss_fn, device_, [&] { engine.zero_grad(); });
    engine.finish(iteration);
  }

  FlatOptimizer& fused_step_of(SyncEngine& engine) {
    FlatOptimizer* opt = engine.flat_optimizer();
    MPU_CHECK(opt != nullptr && opt->fused(),
              "UpdaterOptions::cuda_graph needs the fused flat optimizer step (SGD, Adam, AdamW, "
              "Adagrad or RMSprop over fp32 or master weights on CUDA); this updater steps its "
              "optimizer with torch operations, whose learning rate a graph would freeze");
    return *opt;
  }

  void capture(const Batch& in, const UpdaterOptions& options, const LossFunction& loss_fn,
               SyncEngine& engine, std::int64_t iteration) {
    FlatOptimizer& opt = fused_step_of(engine);
    data_ = in.data.clone();
    target_ = in.target.clone();
    const Batch fixed(data_, target_);
    opt.stage_step();
    opt.set_step_reads_staged(true);
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    Observation captured;
    // Cast weights are not cached across the capture's boundary (as torch.cuda.graph advises).
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    bool began = false;
    try {
      const ObservationScope scope(captured);
      capture_begin_thread_local(*graph);
      began = true;
      eager(fixed, options, loss_fn, engine, iteration);
      graph->capture_end();
    } catch (const std::exception& e) {
      at::autocast::set_autocast_cache_enabled(cache);
      opt.set_step_reads_staged(false);
      end_broken_capture(stream_.stream());
      if (began) {
        abandon_capture_pool(*graph, device_.index());
        (void)graph.release();  // its pool is released; its destructor must not release it again
      }
      MPU_THROW(InvalidArgument,
                "UpdaterOptions::cuda_graph: the training step could not be captured into a "
                "CUDA graph: ",
                first_line(e.what()),
                ". A captured step must launch the same kernels every time: no host "
                "synchronisation in loss_fn (.item(), printing or copying a tensor to the host), "
                "no branch on a tensor's value, no shape that changes. Fix loss_fn or turn "
                "cuda_graph off");
    }
    at::autocast::set_autocast_cache_enabled(cache);
    opt.set_step_reads_staged(false);
    graph_ = std::move(graph);
    reported_ = std::move(captured);
    MPU_LOG_INFO("cuda_graph: the training step is captured after ", eager_steps_,
                 " eager steps; later steps replay it");
    // Nothing ran during the capture: this iteration's step is the first replay. The host
    // side of the optimizer step (its step counts) already ran while capturing.
    graph_->replay();
    ++replays_;
    publish();
  }

  void replay(const Batch& in, SyncEngine& engine) {
    FlatOptimizer& opt = fused_step_of(engine);
    data_.copy_(in.data, /*non_blocking=*/true);
    target_.copy_(in.target, /*non_blocking=*/true);
    opt.stage_step();
    graph_->replay();
    opt.advance();
    ++replays_;
    publish();
  }

  // What loss_fn reported during the capture, from this replay's values.
  void publish() const {
    Observation* observation = current_observation();
    if (observation == nullptr) return;
    for (const auto& [key, value] : reported_) (*observation)[key] = value.clone();
  }

  const int warmup_;
  const torch::Device device_;
  const c10::cuda::CUDAStream stream_;
  at::cuda::CUDAEvent before_;
  at::cuda::CUDAEvent after_;
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  torch::Tensor data_;  // the captured step's input tensors
  torch::Tensor target_;
  Observation reported_;  // the tensors loss_fn reported while capturing (graph outputs)
  int eager_steps_ = 0;
  std::int64_t replays_ = 0;
  bool warned_ = false;
};

}  // namespace

std::unique_ptr<StepGraph> make_step_graph(const UpdaterOptions& options,
                                           const torch::Device& device) {
  return std::make_unique<CudaStepGraph>(options, device);
}

}  // namespace mpu::detail
