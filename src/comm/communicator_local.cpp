// The one-process communicator: every collective over a single rank leaves the data as it is
// (sum, average, min and max of one value are that value), so nothing is sent and nothing
// waits. It lets single-process training take the same step path as n processes.
#include "comm/communicator_detail.h"
#include "mpu/communicator.h"

namespace mpu {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(torch::Device device) : device_(device) {}

  int rank() const override { return 0; }
  int size() const override { return 1; }
  torch::Device device() const override { return device_; }
  std::string backend() const override { return "local"; }
  std::uint64_t sequence_number() const override { return seq_; }

  void reduce(torch::Tensor& t, int root, ReduceOp op) override {
    detail::check_root("reduce", root, 1);
    check("reduce", t);
    detail::check_reduce_op("reduce", op, t);
    ++seq_;
  }
  void broadcast(torch::Tensor& t, int root) override {
    detail::check_root("broadcast", root, 1);
    check("broadcast", t);
    ++seq_;
  }
  void allreduce(torch::Tensor& t, ReduceOp op) override {
    check("allreduce", t);
    detail::check_reduce_op("allreduce", op, t);
    ++seq_;
  }
  void reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) override {
    detail::check_reduce_scatter(*this, out, in, op);
    copy(out, in);
  }
  void allgather(torch::Tensor& out, const torch::Tensor& in) override {
    detail::check_allgather(*this, out, in);
    copy(out, in);
  }
  void barrier() override { ++seq_; }
  void synchronize() override {}
  void abort() noexcept override {}

 private:
  void check(const char* op, const torch::Tensor& t) const {
    detail::check_tensor(op, "t", t, device_);
  }
  void copy(torch::Tensor& out, const torch::Tensor& in) {
    ++seq_;
    if (out.numel() > 0 && out.data_ptr() != in.data_ptr()) {
      out.view({-1}).copy_(in.reshape({-1}));
    }
  }

  torch::Device device_;
  std::uint64_t seq_ = 0;
};

}  // namespace

std::shared_ptr<Communicator> make_local_communicator(const torch::Device& device) {
  return std::make_shared<LocalCommunicator>(device);
}

}  // namespace mpu
