// What keeps the ranks' models the same, whatever the strategy: the drift check, the buffer
// broadcast and the layout check.
#include <map>
#include <sstream>

#include "comm/communicator_detail.h"
#include "mpu/error.h"
#include "sync/sync_engine.h"

namespace mpu::detail {
namespace {

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// The dtype a buffer travels in: its own, where the communicator takes it, else one that holds
// every value of it exactly.
torch::Dtype buffer_wire_dtype(const std::string& name, torch::Dtype d) {
  if (is_collective_dtype(d)) return d;
  switch (d) {
    case torch::kBool:
      return torch::kByte;
    case torch::kChar:
    case torch::kShort:
      return torch::kInt;
    default:
      break;
  }
  MPU_THROW(InvalidArgument, "SyncEngine::broadcast_buffers: buffer ", name, " has dtype ", d,
            ", which cannot be broadcast exactly (supported: floating, integer and bool)");
}

}  // namespace

void SyncEngine::check_drift(std::int64_t iteration) {
  torch::NoGradGuard no_grad;
  // A bit-exact checksum: the parameters' bits as integers, summed in int64 (wrapping is
  // harmless: equal bits give equal sums).
  torch::Tensor data = flat_.zero_copy() ? flat_.flat_data() : flat_.gather(FlatTarget::kData);
  const auto bits =
      data.scalar_type() == torch::kFloat ? data.view(torch::kInt) : data.view(torch::kShort);
  const std::int64_t sum = bits.sum().item<std::int64_t>();
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(comm_.device());
  auto mine = torch::full({1}, sum, opts);
  auto all = torch::zeros({comm_.size()}, opts);
  comm_.allgather(all, mine);
  const auto host = all.to(torch::kCPU).contiguous();
  const std::int64_t* v = host.data_ptr<std::int64_t>();
  for (int r = 1; r < comm_.size(); ++r) {
    if (v[r] != v[0]) {
      MPU_THROW(CommError, "parameter drift at iteration ", iteration, ": rank ", r,
                "'s parameters differ from rank 0's (bit checksums ", v[r], " vs ", v[0],
                "); the ranks no longer train the same model. Something wrote the parameters "
                "on one rank only (user code between steps, a non-deterministic "
                "collective, or a hardware fault)");
    }
  }
}

void SyncEngine::broadcast_buffers() {
  torch::NoGradGuard no_grad;
  // Grouped by dtype, each group packed in its own dtype: a counter above 2^24 or a double that
  // fp32 cannot hold arrives exactly. Every rank has the same buffers (the same model), so the
  // groups and their order agree.
  std::vector<torch::Dtype> order;
  std::map<torch::Dtype, std::vector<torch::Tensor>> groups;
  for (const auto& b : model_.named_buffers()) {
    const torch::Tensor& t = b.value();
    if (!t.defined() || t.numel() == 0) continue;
    const auto d = buffer_wire_dtype(b.key(), t.scalar_type());
    if (groups.find(d) == groups.end()) order.push_back(d);
    groups[d].push_back(t);
  }
  for (const auto d : order) {
    auto& buffers = groups[d];
    std::vector<torch::Tensor> flat;
    flat.reserve(buffers.size());
    for (const auto& b : buffers) flat.push_back(b.reshape({-1}).to(comm_.device(), d));
    auto packed = torch::cat(flat);
    comm_.broadcast(packed, 0);
    if (comm_.rank() == 0) continue;
    std::int64_t offset = 0;
    for (auto& b : buffers) {
      b.copy_(packed.narrow(0, offset, b.numel()).view(b.sizes()));
      offset += b.numel();
    }
  }
}

void SyncEngine::check_same_layout() {
  std::ostringstream sig;
  for (const auto& p : model_.named_parameters()) {
    sig << p.key() << " " << p.value().scalar_type() << " " << p.value().sizes() << "\n";
  }
  const std::string mine = sig.str();
  const std::string root = comm_.broadcast_bytes(mine, 0);
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
