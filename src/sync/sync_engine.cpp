#include "sync/sync_engine.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>
#include <optional>

#include "misc/log.h"
#include "misc/torch_compat.h"
#include "mpu/error.h"
#include "mpu/flat_optimizer.h"
#include "mpu/reporter.h"

namespace mpu::detail {
namespace {

// Elements per 16 bytes of the narrowest flat dtype (fp16 and bf16).
constexpr std::int64_t kAlignedElements = 8;

// The parameters with elements in the engine's layout order: reverse registration order
// (backward produces gradients roughly from the last layer to the first, so buckets over this
// order fill one after another), except that parameters whose element count is not a multiple
// of kAlignedElements go last. In zero-copy mode every parameter is a view at its offset into
// the flat buffer, and a small one in front (a 10-class model's fc.bias is first in reverse
// order) would leave every view after it off 16-byte alignment, which vectorised kernels may
// not expect. (ResNet-18 on Fashion-MNIST in fp32 and channels_last, every weight 8 bytes off,
// stopped with "misaligned address" at its first step on an H100; this order is the suspected
// cure.) Moving them to the end delays no bucket: they sit in the last bucket, which waits for
// the first layers' gradients anyway.
std::vector<std::pair<std::string, torch::Tensor>> layout_parameters(torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters()) {
    if (p.value().numel() > 0) out.emplace_back(p.key(), p.value());
  }
  std::reverse(out.begin(), out.end());
  std::stable_partition(out.begin(), out.end(), [](const auto& named) {
    return named.second.numel() % kAlignedElements == 0;
  });
  return out;
}

// The one dtype every parameter has, or nullopt when they differ or it cannot be a flat buffer.
std::optional<torch::Dtype> common_dtype(
    const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  std::optional<torch::Dtype> dtype;
  for (const auto& [name, p] : named) {
    const auto d = p.scalar_type();
    if (d != torch::kFloat && d != torch::kHalf && d != torch::kBFloat16) return std::nullopt;
    if (dtype && *dtype != d) return std::nullopt;
    dtype = d;
  }
  return dtype;
}

// The parameters as the precision policy trains them: checked (autocast policies keep fp32
// parameters) and, under the mixed policies, the model cast to the compute dtype in place
// (Module::to keeps each parameter's identity, so the optimizer still holds them).
std::vector<std::pair<std::string, torch::Tensor>> policy_parameters(
    torch::nn::Module& model, const UpdaterOptions& options) {
  const Precision policy = options.precision;
  if (policy == Precision::kFp32) return layout_parameters(model);
  const torch::Dtype low = compute_dtype(policy);
  const bool mixed = has_master_weights(policy);
  const auto named = layout_parameters(model);
  MPU_CHECK(!named.empty(), "the model has no parameters with elements; there is nothing to train");
  const c10::DeviceType device = named.front().second.device().type();
  MPU_CHECK(autocast_supports(device, low), "UpdaterOptions::precision ", to_string(policy),
            ": LibTorch ", TORCH_VERSION, " cannot autocast to ", c10::toString(low), " on ",
            c10::DeviceTypeName(device, true),
            low == torch::kHalf && device == c10::DeviceType::CPU
                ? " (fp16 on the CPU needs LibTorch 2.x); train on a GPU or use bf16_autocast or "
                  "bf16_mixed"
                : "; use fp32");
  for (const auto& [name, p] : named) {
    const auto d = p.scalar_type();
    MPU_CHECK(d == torch::kFloat || (mixed && d == low), "UpdaterOptions::precision ",
              to_string(policy), ": parameter '", name, "' is ", c10::toString(d), "; ",
              mixed ? "the mixed policies take an fp32 model (they cast it and keep fp32 master "
                      "weights)"
                    : "autocast policies train fp32 parameters (use bf16_mixed or fp16_mixed to "
                      "store them in low precision)",
              ": build the model in fp32, or call model->to(torch::kFloat) first");
  }
  if (mixed) {
    for (auto& p : model.parameters()) {
      if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
    }
    model.to(low);
  }
  return layout_parameters(model);
}

FlatBufferOptions flat_options(const std::optional<torch::Dtype>& dtype) {
  FlatBufferOptions o;
  o.dtype = dtype.value_or(torch::kFloat);
  o.zero_copy = dtype ? ZeroCopy::kAuto : ZeroCopy::kOff;
  return o;
}

// The flat buffer over the parameters as the policy trains them (cast first, then packed).
FlatBuffer policy_flat(torch::nn::Module& model, const UpdaterOptions& options) {
  auto named = policy_parameters(model, options);
  const auto dtype = common_dtype(named);
  return FlatBuffer(std::move(named), flat_options(dtype));
}

class GradientReadyHook : public torch::autograd::FunctionPostHook {
 public:
  explicit GradientReadyHook(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    fn_();
    return outputs;
  }

 private:
  std::function<void()> fn_;
};

}  // namespace

// The autograd hooks point at the engine through this; the engine clears it when it goes, so a
// hook left on a gradient accumulator that outlives the engine does nothing.
struct SyncEngine::HookTarget {
  SyncEngine* engine = nullptr;
};

void check_options(const UpdaterOptions& options, const char* who) {
  MPU_CHECK(options.accumulation_steps >= 1, who,
            ": UpdaterOptions::accumulation_steps must be at least 1, got ",
            options.accumulation_steps);
  MPU_CHECK(options.drift_check_interval >= 0, who,
            ": UpdaterOptions::drift_check_interval must be 0 (off) or positive, got ",
            options.drift_check_interval);
  const auto w = options.wire_dtype;
  MPU_CHECK(w == torch::kFloat || w == torch::kHalf || w == torch::kBFloat16, who,
            ": UpdaterOptions::wire_dtype must be float32, float16 or bfloat16, got ", w);
}

int gradients_per_step(int world_size, const UpdaterOptions& options) {
  return world_size * options.accumulation_steps;
}

SyncEngine::SyncEngine(torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                       Communicator& comm, const UpdaterOptions& options)
    : model_(model),
      optimizer_(optimizer),
      comm_(comm),
      skip_nonfinite_(options.skip_nonfinite),
      precision_(options.precision),
      scaling_(uses_loss_scaling(options.precision)),
      scaler_(options.loss_scale),
      drift_interval_(options.drift_check_interval),
      strategy_(options.strategy),
      flat_(policy_flat(model, options)),
      ctx_(comm, flat_),
      hook_target_(std::make_shared<HookTarget>()) {
  check_options(options, "SyncEngine");
  MPU_CHECK(flat_.numel() > 0,
            "the model has no parameters with elements; there is nothing to train");
  const bool zero_copy = flat_.zero_copy();

  // How the gradients are combined. fp16 has a narrow range: the gradients are divided by n
  // before the cast and the sum multiplied back, so that a sum over n ranks cannot overflow
  // where one rank's gradient does not.
  const int n = comm_.size();
  const int k = options.accumulation_steps;
  const bool mean = options.scaling.reduction == Reduction::kMean;
  if (options.wire_dtype == torch::kHalf) {
    ctx_.op = ReduceOp::kSum;
    ctx_.prescale = (mean ? 1.0 / k : 1.0) / n;
    ctx_.postscale = mean ? 1.0 : n;
  } else {
    ctx_.op = mean ? ReduceOp::kAvg : ReduceOp::kSum;
    ctx_.prescale = mean ? 1.0 / k : 1.0;
  }
  const bool solo = ctx_.solo;
  if (solo ? !zero_copy : (!zero_copy || options.wire_dtype != flat_.dtype())) {
    // One rank sends nothing: its gather buffer (not zero-copy) stays fp32, without the wire's
    // rounding.
    ctx_.wire =
        torch::empty({flat_.numel()}, torch::TensorOptions()
                                          .device(flat_.device())
                                          .dtype(solo ? torch::kFloat : options.wire_dtype));
  }
  sync_ = make_grad_sync(options.strategy, ctx_, optimizer_);

  // The flat step, where the optimizer allows it; a strategy that splits the optimizer state
  // cannot do without it (its constructor checked that it is supported).
  std::string why;
  const bool supported = flat_step_supported(optimizer_, &why);
  if (has_master_weights(precision_)) {
    // fp32 master weights live beside the flat buffer, in its layout; the flat step steps them
    // and writes the low-precision parameters in the same pass.
    const std::string policy = to_string(precision_);
    MPU_CHECK(zero_copy, "UpdaterOptions::precision ", policy,
              ": the parameters could not be packed as views of one flat buffer, which fp32 "
              "master weights need (a parameter is not contiguous, or shares storage)");
    MPU_CHECK(supported, "UpdaterOptions::precision ", policy,
              " steps fp32 master weights in the flat step, which cannot step this optimizer: ",
              why, ". Use SGD, Adam, AdamW, Adagrad or RMSprop, or bf16_autocast/fp16_autocast");
    MPU_CHECK(options.flat_step, "UpdaterOptions::precision ", policy,
              " needs UpdaterOptions::flat_step (it steps the fp32 master weights); it is false");
    if (sync_->steps_here()) {
      master_ = flat_.flat_data().to(torch::kFloat).contiguous();
      FlatOptimizerOptions fo;
      fo.model_param = flat_.flat_data();
      flat_opt_ = std::make_unique<FlatOptimizer>(optimizer_, master_, flat_.flat_grad(),
                                                  sync_->step_begin(), sync_->step_end(), fo);
    }
  } else if (sync_->steps_here() && zero_copy && supported &&
             (options.flat_step || sync_->needs_flat_step())) {
    flat_opt_ = std::make_unique<FlatOptimizer>(optimizer_, flat_.flat_data(), flat_.flat_grad(),
                                                sync_->step_begin(), sync_->step_end());
  } else if (sync_->steps_here() && options.flat_step && !supported) {
    MPU_LOG_INFO("flat optimizer step off: ", why);
  }

  if (!solo && zero_copy && options.bucket_bytes > 0 && sync_->bucketed()) {
    install_hooks(layout_parameters(model_), static_cast<std::int64_t>(options.bucket_bytes));
  }
}

SyncEngine::~SyncEngine() {
  hook_target_->engine = nullptr;
  // An update that threw may have left buckets unjoined: the wire must not go back to the
  // caching allocator while a collective still writes it. A failed communicator has nothing in
  // flight.
  try {
    join_buckets();
  } catch (const std::exception&) {
  }
}

void SyncEngine::join_buckets() {
  if (!unjoined_) return;
  comm_.join();
  unjoined_ = false;
}

void SyncEngine::install_hooks(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                               std::int64_t cap_bytes) {
  std::map<std::string, torch::Tensor> by_name(named.begin(), named.end());
  const auto& entries = flat_.entries();
  std::vector<BucketEntry> bucket_entries;
  bucket_entries.reserve(entries.size());
  for (const auto& e : entries) {
    bucket_entries.push_back(
        BucketEntry{e.name, e.offset, e.numel, by_name.at(e.name).requires_grad()});
  }
  const auto wire_bytes = static_cast<std::int64_t>(
      torch::elementSize(ctx_.wire.defined() ? ctx_.wire.scalar_type() : flat_.dtype()));
  buckets_ = std::make_unique<BucketScheduler>(std::move(bucket_entries), wire_bytes, cap_bytes);

  hook_target_->engine = this;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const torch::Tensor& p = by_name.at(entries[i].name);
    if (!p.requires_grad()) continue;
    auto accumulator = torch::autograd::impl::grad_accumulator(p);
    MPU_CHECK(accumulator != nullptr, "parameter ", entries[i].name,
              " has no gradient accumulator; is it a leaf tensor?");
    accumulator->add_post_hook(std::make_unique<GradientReadyHook>([t = hook_target_, i] {
      if (t->engine != nullptr) t->engine->on_gradient_ready(i);
    }));
    accumulators_.push_back(std::move(accumulator));
  }
}

void SyncEngine::zero_grad() {
  // An update that threw between a bucket's launch and finish() left that collective unjoined:
  // the zeroing must not race it.
  join_buckets();
  flat_.zero_grad();
}

void SyncEngine::arm(bool last_micro_batch) {
  armed_ = last_micro_batch;
  if (buckets_) buckets_->reset();
}

void SyncEngine::on_gradient_ready(std::size_t entry) {
  if (!armed_) return;
  for (const std::size_t b : buckets_->mark_ready(entry)) launch(b);
}

void SyncEngine::launch(std::size_t bucket) {
  torch::NoGradGuard no_grad;
  const auto& b = buckets_->buckets()[bucket];
  auto g = flat_.flat_grad().narrow(0, b.offset, b.numel);
  if (ctx_.prescale != 1.0) g.mul_(ctx_.prescale);
  torch::Tensor x = g;
  if (ctx_.wire.defined()) {
    x = ctx_.wire.narrow(0, b.offset, b.numel);
    x.copy_(g);
  }
  // Backward goes on meanwhile: its stream does not wait for the bucket until finish() joins.
  sync_->reduce_bucket_async(x);
  unjoined_ = true;
}

void SyncEngine::reduce_gradients() {
  torch::NoGradGuard no_grad;
  if (ctx_.solo && flat_.zero_copy()) {
    // Nothing to reduce: only the mean over accumulation steps, where asked, is left to apply.
    const double scale = ctx_.prescale * ctx_.postscale;
    if (scale != 1.0) flat_.flat_grad().mul_(scale);
    return;
  }
  if (!flat_.zero_copy() || !sync_->bucketed()) {
    sync_->reduce_whole();
    return;
  }
  if (buckets_) {
    // Buckets whose gradients did not all arrive (unused or frozen parameters, or a backward
    // that did not run armed) go now, in order.
    for (const std::size_t b : buckets_->take_remaining()) launch(b);
  } else {
    // One bucket after backward.
    auto g = flat_.flat_grad();
    if (ctx_.prescale != 1.0) g.mul_(ctx_.prescale);
    torch::Tensor x = g;
    if (ctx_.wire.defined()) {
      x = ctx_.wire;
      x.copy_(g);
    }
    sync_->reduce_bucket_async(x);
    unjoined_ = true;
  }
  join_buckets();
  if (sync_->receives_gradients()) {
    auto g = flat_.flat_grad();
    if (ctx_.wire.defined()) g.copy_(ctx_.wire);
    if (ctx_.postscale != 1.0) g.mul_(ctx_.postscale);
  }
}

bool SyncEngine::gradients_finite() {
  torch::NoGradGuard no_grad;
  torch::Tensor bad = sync_->local_nonfinite();
  if (!ctx_.solo) sync_->agree_nonfinite(bad);
  return bad.item<float>() == 0.0f;
}

bool SyncEngine::finish(std::int64_t iteration) {
  torch::NoGradGuard no_grad;
  reduce_gradients();
  armed_ = false;

  bool ok = true;
  const bool check = skip_nonfinite_ || scaling_;
  if (check) {
    ok = gradients_finite();
    if (!ok) {
      ++skipped_;
      if (comm_.rank() == 0 && scaling_) {
        MPU_LOG_INFO("iteration ", iteration, ": gradients overflowed at loss scale ",
                     scaler_.scale(), "; the step is skipped and the scale halved (", skipped_,
                     " skipped so far)");
      } else if (comm_.rank() == 0) {
        MPU_LOG_WARN("iteration ", iteration,
                     ": a gradient is NaN or Inf; the optimizer step is skipped (", skipped_,
                     " skipped so far)");
      }
    }
  }
  // The gradients carry the scale of this step's backward; they are unscaled as the step reads
  // them. Every rank then moves its scaler by the verdict they share.
  const double grad_scale = scaling_ ? 1.0 / scaler_.scale() : 1.0;
  if (scaling_) scaler_.update(!ok);
  if (check && comm_.rank() == 0) {
    ReportScope scope("main");
    report("skipped_steps", static_cast<double>(skipped_));
    if (scaling_) report("loss_scale", scaler_.scale());
  }
  if (sync_->steps_here() && ok) {
    if (flat_opt_) {
      flat_opt_->step(grad_scale);
    } else {
      if (grad_scale != 1.0) unscale_gradients(grad_scale);
      optimizer_.step();
    }
  }
  if (!ctx_.solo) sync_->share_parameters(ok);
  if (!ctx_.solo && drift_interval_ > 0 && iteration % drift_interval_ == 0) {
    check_drift(iteration);
  }
  return ok;
}

void SyncEngine::unscale_gradients(double factor) {
  if (flat_.zero_copy()) {
    flat_.flat_grad().mul_(factor);
    return;
  }
  for (auto& p : model_.parameters()) {
    if (p.grad().defined()) p.mutable_grad().mul_(factor);
  }
}

void SyncEngine::broadcast_parameters() {
  torch::NoGradGuard no_grad;
  const bool mixed = has_master_weights(precision_);
  if (mixed && strategy_ != Strategy::kMasterStep) {
    // Every rank steps its own master copy: they all take rank 0's, and round it.
    if (!ctx_.solo) comm_.broadcast(master_, 0);
    flat_.flat_data().copy_(master_);
  } else {
    // MasterStep: rank 0 alone holds the master weights; the others take its rounded copy.
    if (master_.defined()) flat_.flat_data().copy_(master_);
    broadcast_flat_parameters(ctx_);
  }
  if (scaling_ && !ctx_.solo) {
    torch::Tensor s = torch::tensor({scaler_.scale(), static_cast<double>(scaler_.growth_tracker()),
                                     static_cast<double>(scaler_.skipped_steps())},
                                    torch::TensorOptions().dtype(torch::kDouble))
                          .to(comm_.device());
    comm_.broadcast(s, 0);
    s = s.cpu();
    const double* v = s.data_ptr<double>();
    scaler_.restore(v[0], static_cast<std::int64_t>(v[1]), static_cast<std::int64_t>(v[2]));
    skipped_ = scaler_.skipped_steps();
  }
}

void SyncEngine::save_precision(torch::serialize::OutputArchive& archive) const {
  if (precision_ == Precision::kFp32) return;
  torch::serialize::OutputArchive state;
  state.write("policy", torch::tensor(static_cast<std::int64_t>(precision_), torch::kInt64));
  if (master_.defined()) state.write("master_weights", master_.cpu());
  if (scaling_) scaler_.save(state);
  archive.write("precision", state);
}

PrecisionState SyncEngine::read_precision(torch::serialize::InputArchive& archive,
                                          const UpdaterOptions& options) {
  PrecisionState out;
  if (options.precision == Precision::kFp32) return out;
  const std::string policy = to_string(options.precision);
  torch::serialize::InputArchive state;
  MPU_CHECK(archive.try_read("precision", state), "load: the snapshot has no precision state; it ",
            "was written under the fp32 policy, and this updater trains under ", policy);
  torch::Tensor written;
  MPU_CHECK(state.try_read("policy", written),
            "load: the snapshot's precision state has no policy");
  const auto was = static_cast<Precision>(written.item<std::int64_t>());
  MPU_CHECK(has_master_weights(was) == has_master_weights(options.precision) &&
                uses_loss_scaling(was) == uses_loss_scaling(options.precision),
            "load: the snapshot was written under precision ", to_string(was),
            ", this updater trains under ", policy);
  if (has_master_weights(options.precision)) {
    MPU_CHECK(state.try_read("master_weights", out.master), "load: the snapshot (", policy,
              ") has no fp32 master weights");
  }
  if (uses_loss_scaling(options.precision)) {
    LossScaler scaler(options.loss_scale);
    scaler.load(state);
    out.has_scaler = true;
    out.scale = scaler.scale();
    out.growth_tracker = scaler.growth_tracker();
    out.skipped = scaler.skipped_steps();
  }
  return out;
}

void SyncEngine::apply_precision(const PrecisionState& state) {
  torch::NoGradGuard no_grad;
  if (state.master.defined() && master_.defined()) {
    MPU_CHECK(state.master.numel() == master_.numel(), "load: the snapshot's master weights have ",
              state.master.numel(), " elements, the model ", master_.numel());
    master_.copy_(state.master.reshape({-1}));
  }
  if (state.has_scaler && scaling_) {
    scaler_.restore(state.scale, state.growth_tracker, state.skipped);
    skipped_ = state.skipped;
  }
}

bool SyncEngine::collective_save() const {
  return sync_->collective_save();
}

void SyncEngine::gather_state_for_save() {
  if (!collective_save()) return;
  sync_->gather_state_for_save(flat_opt_.get());
  if (master_.defined() && !ctx_.solo) {
    // Sharded: each rank stepped its shard of the master weights; rank 0 saves all of them.
    torch::NoGradGuard no_grad;
    const std::int64_t begin = sync_->step_begin();
    torch::Tensor mine = master_.narrow(0, begin, sync_->step_end() - begin);
    comm_.allgather(master_, mine);
  }
}

void SyncEngine::release_saved_state() {
  if (collective_save()) sync_->release_saved_state(flat_opt_.get());
}

std::int64_t SyncEngine::optimizer_state_bytes() const {
  if (flat_opt_) return flat_opt_->state_bytes();
  return detail::optimizer_state_bytes(optimizer_);
}

}  // namespace mpu::detail
