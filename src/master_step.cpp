#include "master_step.h"

#include <sstream>

#include "mpu/error.h"

namespace mpu::detail {
namespace {

FlatBufferOptions flat_options(torch::nn::Module& model, torch::Dtype wire) {
  FlatBufferOptions o;
  o.dtype = torch::kFloat;
  bool all_fp32 = true;
  for (const auto& p : model.parameters()) all_fp32 = all_fp32 && p.scalar_type() == torch::kFloat;
  o.zero_copy = all_fp32 && wire == torch::kFloat ? ZeroCopy::kAuto : ZeroCopy::kOff;
  return o;
}

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

MasterStep::MasterStep(torch::nn::Module& model, Communicator& comm, Reduction reduction,
                       torch::Dtype wire_dtype)
    : model_(model),
      comm_(comm),
      reduction_(reduction),
      wire_dtype_(wire_dtype),
      flat_(model, flat_options(model, wire_dtype)) {
  MPU_CHECK(flat_.numel() > 0,
            "MasterStep: the model has no parameters with elements; there is "
            "nothing to train");
  MPU_CHECK(
      wire_dtype == torch::kFloat || wire_dtype == torch::kHalf || wire_dtype == torch::kBFloat16,
      "MasterStep: wire_dtype must be float32, float16 or bfloat16, got ", wire_dtype);
  const auto opts = torch::TensorOptions().device(flat_.device());
  if (!(flat_.zero_copy() && wire_dtype_ == flat_.dtype())) {
    grad_wire_ = torch::empty({flat_.numel()}, opts.dtype(wire_dtype_));
  }
  if (!flat_.zero_copy()) param_wire_ = torch::empty({flat_.numel()}, opts.dtype(torch::kFloat));
}

void MasterStep::reduce_gradients() {
  const ReduceOp op = reduction_ == Reduction::kMean ? ReduceOp::kAvg : ReduceOp::kSum;
  if (!grad_wire_.defined()) {
    torch::Tensor g = flat_.flat_grad();
    comm_.reduce(g, 0, op);
    return;
  }
  flat_.gather_into(FlatTarget::kGrad, grad_wire_);
  comm_.reduce(grad_wire_, 0, op);
  if (comm_.rank() == 0) flat_.scatter(grad_wire_, FlatTarget::kGrad);
}

void MasterStep::broadcast_parameters() {
  if (!param_wire_.defined()) {
    torch::Tensor d = flat_.flat_data();
    comm_.broadcast(d, 0);
    return;
  }
  if (comm_.rank() == 0) flat_.gather_into(FlatTarget::kData, param_wire_);
  comm_.broadcast(param_wire_, 0);
  if (comm_.rank() != 0) flat_.scatter(param_wire_, FlatTarget::kData);
}

void MasterStep::broadcast_buffers() {
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

void MasterStep::check_same_layout() {
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

}  // namespace mpu::detail
