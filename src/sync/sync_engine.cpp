#include "sync/sync_engine.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <array>
#include <map>
#include <optional>
#include <sstream>

#include "misc/log.h"
#include "mpu/error.h"
#include "mpu/flat_optimizer.h"
#include "mpu/reporter.h"

namespace mpu::detail {
namespace {

// Sends `text` from rank 0 to every rank, as one fp32 per byte (exact).
std::string broadcast_text(Communicator& comm, const std::string& text) {
  const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(comm.device());
  auto length = torch::full({1}, comm.rank() == 0 ? static_cast<float>(text.size()) : 0.0f, opts);
  comm.broadcast(length, 0);
  const auto n = static_cast<std::int64_t>(length.item<float>());
  torch::Tensor bytes;
  if (comm.rank() == 0) {
    std::vector<float> v(text.begin(), text.end());
    bytes = torch::tensor(v, torch::kFloat).to(comm.device());
  } else {
    bytes = torch::zeros({n}, opts);
  }
  comm.broadcast(bytes, 0);
  auto host = bytes.to(torch::kCPU).contiguous();
  std::string out(static_cast<std::size_t>(n), '\0');
  const float* p = host.data_ptr<float>();
  for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<char>(static_cast<int>(p[i]));
  return out;
}

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// The parameters with elements, in reverse registration order: backward produces gradients
// roughly from the last layer to the first, so buckets over this order fill one after another.
std::vector<std::pair<std::string, torch::Tensor>> reversed_parameters(torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters()) {
    if (p.value().numel() > 0) out.emplace_back(p.key(), p.value());
  }
  return {out.rbegin(), out.rend()};
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

FlatBufferOptions flat_options(const std::optional<torch::Dtype>& dtype) {
  FlatBufferOptions o;
  o.dtype = dtype.value_or(torch::kFloat);
  o.zero_copy = dtype ? ZeroCopy::kAuto : ZeroCopy::kOff;
  return o;
}

// An int64 split in three pieces of at most 22 bits, each exact in fp32.
std::array<float, 3> split_checksum(std::int64_t v) {
  const auto u = static_cast<std::uint64_t>(v);
  return {static_cast<float>(u & 0x3FFFFF), static_cast<float>((u >> 22) & 0x3FFFFF),
          static_cast<float>(u >> 44)};
}

}  // namespace

// The autograd hooks point at the engine through this; the engine clears it when it goes, so a
// hook left on a gradient accumulator that outlives the engine does nothing.
struct SyncEngine::HookTarget {
  SyncEngine* engine = nullptr;
};

namespace {

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

void move_optimizer_state(torch::optim::Optimizer& optimizer, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  for (auto& entry : optimizer.state()) {
    auto& state = *entry.second;
    if (auto* s = dynamic_cast<torch::optim::AdagradParamState*>(&state)) {
      if (s->sum().defined()) s->sum(s->sum().to(device));
    } else if (auto* s = dynamic_cast<torch::optim::AdamParamState*>(&state)) {
      if (s->exp_avg().defined()) s->exp_avg(s->exp_avg().to(device));
      if (s->exp_avg_sq().defined()) s->exp_avg_sq(s->exp_avg_sq().to(device));
      if (s->max_exp_avg_sq().defined()) s->max_exp_avg_sq(s->max_exp_avg_sq().to(device));
    } else if (auto* s = dynamic_cast<torch::optim::AdamWParamState*>(&state)) {
      if (s->exp_avg().defined()) s->exp_avg(s->exp_avg().to(device));
      if (s->exp_avg_sq().defined()) s->exp_avg_sq(s->exp_avg_sq().to(device));
      if (s->max_exp_avg_sq().defined()) s->max_exp_avg_sq(s->max_exp_avg_sq().to(device));
    } else if (auto* s = dynamic_cast<torch::optim::SGDParamState*>(&state)) {
      if (s->momentum_buffer().defined()) s->momentum_buffer(s->momentum_buffer().to(device));
    } else if (auto* s = dynamic_cast<torch::optim::RMSpropParamState*>(&state)) {
      if (s->square_avg().defined()) s->square_avg(s->square_avg().to(device));
      if (s->momentum_buffer().defined()) s->momentum_buffer(s->momentum_buffer().to(device));
      if (s->grad_avg().defined()) s->grad_avg(s->grad_avg().to(device));
    }
  }
}

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
      strategy_(options.strategy),
      skip_nonfinite_(options.skip_nonfinite),
      drift_interval_(options.drift_check_interval),
      steps_here_(options.strategy != Strategy::kMasterStep || comm.rank() == 0),
      solo_(comm.size() == 1),
      flat_(reversed_parameters(model), flat_options(common_dtype(reversed_parameters(model)))),
      hook_target_(std::make_shared<HookTarget>()) {
  check_options(options, "SyncEngine");
  MPU_CHECK(flat_.numel() > 0,
            "the model has no parameters with elements; there is nothing to train");
  const bool zero_copy = flat_.zero_copy();
  MPU_CHECK(strategy_ != Strategy::kSharded || zero_copy,
            "Strategy::kSharded needs every parameter in one dtype (float32, bfloat16 or "
            "float16), so that the shards are slices of one flat buffer: ",
            flat_.zero_copy_reason());

  // How the gradients are combined. fp16 has a narrow range: the gradients are divided by n
  // before the cast and the sum multiplied back, so that a sum over n ranks cannot overflow
  // where one rank's gradient does not.
  const int n = comm_.size();
  const int k = options.accumulation_steps;
  const bool mean = options.scaling.reduction == Reduction::kMean;
  if (options.wire_dtype == torch::kHalf) {
    op_ = ReduceOp::kSum;
    prescale_ = (mean ? 1.0 / k : 1.0) / n;
    postscale_ = mean ? 1.0 : n;
  } else {
    op_ = mean ? ReduceOp::kAvg : ReduceOp::kSum;
    prescale_ = mean ? 1.0 / k : 1.0;
  }

  const auto opts = torch::TensorOptions().device(flat_.device());
  if (solo_ ? !zero_copy : (!zero_copy || options.wire_dtype != flat_.dtype())) {
    // One rank sends nothing: its gather buffer (not zero-copy) stays fp32, without the wire's
    // rounding.
    wire_ = torch::empty({flat_.numel()}, opts.dtype(solo_ ? torch::kFloat : options.wire_dtype));
  }
  if (!solo_ && !zero_copy && strategy_ == Strategy::kMasterStep) {
    param_wire_ = torch::empty({flat_.numel()}, opts.dtype(torch::kFloat));
  }
  if (strategy_ == Strategy::kSharded) {
    shard_offset_ = comm_.shard_offset(flat_.numel());
    shard_numel_ = comm_.shard_numel(flat_.numel());
  }

  // The flat step, where the optimizer allows it; the sharded strategy cannot do without it.
  std::string why;
  const bool supported = flat_step_supported(optimizer_, &why);
  if (strategy_ == Strategy::kSharded) {
    MPU_CHECK(supported,
              "Strategy::kSharded steps each rank's shard of the flat parameters, which needs an "
              "optimizer the flat step supports (SGD, Adam, AdamW, Adagrad, RMSprop): ",
              why);
  }
  if (steps_here_ && zero_copy && supported &&
      (options.flat_step || strategy_ == Strategy::kSharded)) {
    const std::int64_t end = strategy_ == Strategy::kSharded ? shard_offset_ + shard_numel_ : -1;
    flat_opt_ = std::make_unique<FlatOptimizer>(optimizer_, flat_.flat_data(), flat_.flat_grad(),
                                                shard_offset_, end);
  } else if (steps_here_ && options.flat_step && !supported) {
    MPU_LOG_INFO("flat optimizer step off: ", why);
  }

  if (!solo_ && zero_copy && options.bucket_bytes > 0 && strategy_ != Strategy::kSharded) {
    const auto wire_bytes = static_cast<std::int64_t>(
        torch::elementSize(wire_.defined() ? wire_.scalar_type() : flat_.dtype()));
    const auto limit = static_cast<std::int64_t>(options.bucket_bytes);
    for (const auto& e : flat_.entries()) {
      if (buckets_.empty() || buckets_.back().numel * wire_bytes >= limit) {
        buckets_.push_back(Bucket{e.offset, 0, 0, 0});
      }
      buckets_.back().numel += e.numel;
    }
    install_hooks(reversed_parameters(model_));
  }
}

SyncEngine::~SyncEngine() {
  hook_target_->engine = nullptr;
  // An update that threw may have left buckets unjoined: wire_ must not go back to the caching
  // allocator while a collective still writes it. A failed communicator has nothing in flight.
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

void SyncEngine::install_hooks(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  std::map<std::string, torch::Tensor> by_name(named.begin(), named.end());
  hook_target_->engine = this;
  const auto& entries = flat_.entries();
  bucket_of_entry_.assign(entries.size(), -1);
  std::size_t b = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    while (entries[i].offset >= buckets_[b].offset + buckets_[b].numel) ++b;
    const torch::Tensor& p = by_name.at(entries[i].name);
    if (!p.requires_grad()) continue;
    bucket_of_entry_[i] = static_cast<int>(b);
    ++buckets_[b].expected;
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
  next_bucket_ = 0;
  for (auto& b : buckets_) b.ready = 0;
}

void SyncEngine::on_gradient_ready(std::size_t entry) {
  if (!armed_) return;
  const int b = bucket_of_entry_[entry];
  if (b < 0) return;
  ++buckets_[b].ready;
  // Buckets go out strictly in order, so every rank issues the same collectives in the same
  // order whatever order its hooks fire in.
  while (next_bucket_ < buckets_.size() &&
         buckets_[next_bucket_].ready >= buckets_[next_bucket_].expected) {
    launch(next_bucket_++);
  }
}

bool SyncEngine::receives_gradients() const {
  return strategy_ != Strategy::kMasterStep || comm_.rank() == 0;
}

void SyncEngine::launch(std::size_t bucket) {
  torch::NoGradGuard no_grad;
  const auto& b = buckets_[bucket];
  auto g = flat_.flat_grad().narrow(0, b.offset, b.numel);
  if (prescale_ != 1.0) g.mul_(prescale_);
  torch::Tensor x = g;
  if (wire_.defined()) {
    x = wire_.narrow(0, b.offset, b.numel);
    x.copy_(g);
  }
  // Backward goes on meanwhile: its stream does not wait for the bucket until finish() joins.
  if (strategy_ == Strategy::kReplicated) {
    comm_.allreduce_async(x, op_);
  } else {
    comm_.reduce_async(x, 0, op_);
  }
  unjoined_ = true;
}

void SyncEngine::reduce_whole() {
  torch::NoGradGuard no_grad;
  // Not zero-copy: gather the gradients into the wire buffer, reduce it, scatter it back. One
  // rank only scales: the same gather and scatter give it the same semantics (tied parameters
  // counted once, a zero gradient for a parameter that got none).
  flat_.gather_into(FlatTarget::kGrad, wire_, prescale_);
  if (solo_) {
    // Nothing to reduce.
  } else if (strategy_ == Strategy::kReplicated) {
    comm_.allreduce(wire_, op_);
  } else {
    comm_.reduce(wire_, 0, op_);
  }
  if (!receives_gradients()) return;
  if (postscale_ != 1.0) wire_.mul_(postscale_);
  flat_.scatter(wire_, FlatTarget::kGrad);
}

void SyncEngine::reduce_scatter_whole() {
  torch::NoGradGuard no_grad;
  auto g = flat_.flat_grad();
  if (prescale_ != 1.0) g.mul_(prescale_);
  auto mine = g.narrow(0, shard_offset_, shard_numel_);
  if (wire_.defined()) {
    wire_.copy_(g);
    auto out = wire_.narrow(0, shard_offset_, shard_numel_);
    comm_.reduce_scatter(out, wire_, op_);
    mine.copy_(out);
  } else {
    comm_.reduce_scatter(mine, g, op_);
  }
  if (postscale_ != 1.0) mine.mul_(postscale_);
}

bool SyncEngine::gradients_finite() {
  torch::NoGradGuard no_grad;
  torch::Tensor bad = torch::zeros({1}, torch::TensorOptions().device(comm_.device()));
  if (strategy_ == Strategy::kSharded) {
    auto g = flat_.flat_grad().narrow(0, shard_offset_, shard_numel_);
    bad = torch::isfinite(g).logical_not().any().to(torch::kFloat).reshape({1});
  } else if (receives_gradients()) {
    const auto& g = flat_.zero_copy() ? flat_.flat_grad() : wire_;
    bad = torch::isfinite(g).logical_not().any().to(torch::kFloat).reshape({1});
  }
  // Sharded ranks each see a shard: agree on the verdict. Under MasterStep only rank 0 has the
  // reduced gradients: it tells the others, so that every rank counts the skip. Replicated
  // ranks all hold the same reduced values and decide alike.
  if (solo_) {
    // One verdict, nobody to tell.
  } else if (strategy_ == Strategy::kSharded) {
    comm_.allreduce(bad, ReduceOp::kSum);
  } else if (strategy_ == Strategy::kMasterStep) {
    comm_.broadcast(bad, 0);
  }
  return bad.item<float>() == 0.0f;
}

bool SyncEngine::finish(std::int64_t iteration) {
  torch::NoGradGuard no_grad;
  if (solo_ && flat_.zero_copy()) {
    // Nothing to reduce: only the mean over accumulation steps, where asked, is left to apply.
    if (prescale_ * postscale_ != 1.0) flat_.flat_grad().mul_(prescale_ * postscale_);
  } else if (strategy_ == Strategy::kSharded) {
    reduce_scatter_whole();
  } else if (!flat_.zero_copy()) {
    reduce_whole();
  } else {
    if (buckets_.empty()) {
      // One bucket after backward.
      buckets_.push_back(Bucket{0, flat_.numel(), 0, 0});
      launch(0);
      buckets_.clear();
    } else {
      // Buckets whose gradients did not all arrive (unused or frozen parameters, or a
      // backward that did not run armed) go now, in order.
      while (next_bucket_ < buckets_.size()) launch(next_bucket_++);
    }
    join_buckets();
    if (receives_gradients()) {
      auto g = flat_.flat_grad();
      if (wire_.defined()) g.copy_(wire_);
      if (postscale_ != 1.0) g.mul_(postscale_);
    }
  }
  armed_ = false;

  bool ok = true;
  if (skip_nonfinite_) {
    ok = gradients_finite();
    if (!ok) {
      ++skipped_;
      if (comm_.rank() == 0)
        MPU_LOG_WARN("iteration ", iteration,
                     ": a gradient is NaN or Inf; the optimizer step is skipped (", skipped_,
                     " skipped so far)");
    }
  }
  if (skip_nonfinite_ && comm_.rank() == 0) {
    ReportScope scope("main");
    report("skipped_steps", static_cast<double>(skipped_));
  }
  if (steps_here_ && ok) {
    if (flat_opt_) {
      flat_opt_->step();
    } else {
      optimizer_.step();
    }
  }
  if (solo_) {
    // Nothing to share.
  } else if (strategy_ == Strategy::kMasterStep) {
    broadcast_parameters();
  } else if (strategy_ == Strategy::kSharded && ok) {
    auto d = flat_.flat_data();
    auto mine = d.narrow(0, shard_offset_, shard_numel_);
    comm_.allgather(d, mine);
  }
  if (!solo_ && drift_interval_ > 0 && iteration % drift_interval_ == 0) check_drift(iteration);
  return ok;
}

void SyncEngine::check_drift(std::int64_t iteration) {
  torch::NoGradGuard no_grad;
  // A bit-exact checksum: the parameters' bits as integers, summed in int64.
  torch::Tensor data = flat_.zero_copy() ? flat_.flat_data() : flat_.gather(FlatTarget::kData);
  const auto bits =
      data.scalar_type() == torch::kFloat ? data.view(torch::kInt) : data.view(torch::kShort);
  const std::int64_t sum = bits.sum().item<std::int64_t>();
  const auto pieces = split_checksum(sum);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(comm_.device());
  auto mine = torch::tensor(std::vector<float>(pieces.begin(), pieces.end()), torch::kFloat)
                  .to(comm_.device());
  auto all = torch::zeros({3 * comm_.size()}, opts);
  comm_.allgather(all, mine);
  auto host = all.to(torch::kCPU).contiguous();
  const float* v = host.data_ptr<float>();
  for (int r = 1; r < comm_.size(); ++r) {
    if (v[3 * r] != v[0] || v[3 * r + 1] != v[1] || v[3 * r + 2] != v[2]) {
      MPU_THROW(CommError, "parameter drift at iteration ", iteration, ": rank ", r,
                "'s parameters differ from rank 0's (bit checksums ",
                static_cast<std::int64_t>(v[3 * r]) +
                    (static_cast<std::int64_t>(v[3 * r + 1]) << 22) +
                    (static_cast<std::int64_t>(v[3 * r + 2]) << 44),
                " vs ",
                static_cast<std::int64_t>(v[0]) + (static_cast<std::int64_t>(v[1]) << 22) +
                    (static_cast<std::int64_t>(v[2]) << 44),
                "); the ranks no longer train the same model. Something wrote the parameters "
                "on one rank only (user code between steps, a non-deterministic "
                "collective, or a hardware fault)");
    }
  }
}

void SyncEngine::broadcast_parameters() {
  torch::NoGradGuard no_grad;
  if (flat_.zero_copy()) {
    torch::Tensor d = flat_.flat_data();
    comm_.broadcast(d, 0);
    return;
  }
  if (!param_wire_.defined()) {
    param_wire_ = torch::empty({flat_.numel()},
                               torch::TensorOptions().device(flat_.device()).dtype(torch::kFloat));
  }
  if (comm_.rank() == 0) flat_.gather_into(FlatTarget::kData, param_wire_);
  comm_.broadcast(param_wire_, 0);
  if (comm_.rank() != 0) flat_.scatter(param_wire_, FlatTarget::kData);
}

void SyncEngine::broadcast_buffers() {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> buffers;
  for (const auto& b : model_.buffers()) {
    if (b.defined() && b.numel() > 0) buffers.push_back(b);
  }
  if (buffers.empty()) return;
  std::vector<torch::Tensor> flat;
  flat.reserve(buffers.size());
  for (const auto& b : buffers) flat.push_back(b.reshape({-1}).to(comm_.device(), torch::kFloat));
  auto packed = torch::cat(flat);
  comm_.broadcast(packed, 0);
  if (comm_.rank() == 0) return;
  std::int64_t offset = 0;
  for (auto& b : buffers) {
    b.copy_(packed.narrow(0, offset, b.numel()).view(b.sizes()));
    offset += b.numel();
  }
}

void SyncEngine::check_same_layout() {
  std::ostringstream sig;
  for (const auto& p : model_.named_parameters()) {
    sig << p.key() << " " << p.value().scalar_type() << " " << p.value().sizes() << "\n";
  }
  const std::string mine = sig.str();
  const std::string root = broadcast_text(comm_, mine);
  std::string difference;
  if (root != mine) {
    const auto a = lines_of(root);
    const auto b = lines_of(mine);
    std::size_t i = 0;
    while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
    difference = cat(
        "parameter #", i, ": rank 0 has ", i < a.size() ? "'" + a[i] + "'" : std::string("nothing"),
        ", rank ", comm_.rank(), " has ", i < b.size() ? "'" + b[i] + "'" : std::string("nothing"),
        " (", a.size(), " vs ", b.size(), " parameters)");
  }
  auto flags = torch::zeros({comm_.size()}, torch::TensorOptions().device(comm_.device()));
  if (!difference.empty()) flags[comm_.rank()] = 1.0f;
  comm_.allreduce(flags, ReduceOp::kSum);
  auto host = flags.to(torch::kCPU);
  for (int r = 0; r < comm_.size(); ++r) {
    if (host[r].item<float>() == 0.0f) continue;
    if (r == comm_.rank()) {
      MPU_THROW(InvalidArgument, "the model on rank ", r, " differs from rank 0's: ", difference,
                ". Every rank must build the same architecture with the same dtypes");
    }
    MPU_THROW(InvalidArgument, "the model on rank ", r, " differs from rank 0's (rank ", r,
              "'s error names the first difference). Every rank must build the same "
              "architecture with the same dtypes");
  }
}

bool SyncEngine::collective_save() const {
  return strategy_ == Strategy::kSharded;
}

void SyncEngine::gather_state_for_save() {
  if (!collective_save()) return;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> full;
  for (const auto& shard : flat_opt_->state_shards()) {
    auto whole = torch::empty({flat_.numel()}, shard.options());
    comm_.allgather(whole, shard.contiguous());
    full.push_back(std::move(whole));
  }
  flat_opt_->export_state(full);
}

void SyncEngine::release_saved_state() {
  if (collective_save()) flat_opt_->import_state();
}

std::int64_t SyncEngine::optimizer_state_bytes() const {
  if (flat_opt_) return flat_opt_->state_bytes();
  std::int64_t bytes = 0;
  for (const auto& entry : optimizer_.state()) {
    const auto& state = *entry.second;
    auto add = [&](const torch::Tensor& t) {
      if (t.defined()) bytes += t.numel() * static_cast<std::int64_t>(t.element_size());
    };
    if (const auto* s = dynamic_cast<const torch::optim::AdamParamState*>(&state)) {
      add(s->exp_avg());
      add(s->exp_avg_sq());
      add(s->max_exp_avg_sq());
    } else if (const auto* s = dynamic_cast<const torch::optim::AdamWParamState*>(&state)) {
      add(s->exp_avg());
      add(s->exp_avg_sq());
      add(s->max_exp_avg_sq());
    } else if (const auto* s = dynamic_cast<const torch::optim::SGDParamState*>(&state)) {
      add(s->momentum_buffer());
    } else if (const auto* s = dynamic_cast<const torch::optim::AdagradParamState*>(&state)) {
      add(s->sum());
    } else if (const auto* s = dynamic_cast<const torch::optim::RMSpropParamState*>(&state)) {
      add(s->square_avg());
      add(s->momentum_buffer());
      add(s->grad_avg());
    }
  }
  return bytes;
}

}  // namespace mpu::detail
