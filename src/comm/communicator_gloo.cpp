// The Gloo communicator: c10d's ProcessGroupGloo over a store, for CPU tensors.
//
// LibTorch 1.13's ProcessGroupGloo has no bfloat16, no reduce_scatter and no AVG, and uses the
// buffer of non-root ranks as scratch space in reduce. So: bfloat16 is reduced in a float32 copy
// and moved as float16 bits; reduce_scatter is an allreduce of a copy of `in`; AVG is a sum
// followed by one division; non-root ranks reduce a copy.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO  // the PyTorch wheel's headers need it; Debian's torch target sets it
#endif

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "comm/communicator_detail.h"
#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"

namespace mpu {
namespace {

using Clock = std::chrono::steady_clock;

// How long a collective waits on its Gloo work before it looks at the abort flag again. c10d's
// ProcessGroupGloo (1.13 and 2.x alike) has no way to cancel a collective in flight, so abort()
// cannot wake the waiter; the waiter wakes itself every kGlooAbortCheckInterval (defaults.h).
// Only calls that block for longer pay it: the wait returns the moment the work completes.

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(const StorePtr& store, int rank, int size, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), timeout_(timeout) {
    MPU_CHECK(store, "make_gloo_communicator: the store is null");
    MPU_CHECK(size > 0 && rank >= 0 && rank < size, "make_gloo_communicator: rank ", rank, " of ",
              size, " ranks is out of range");
    MPU_CHECK(timeout.count() > 0, "make_gloo_communicator: timeout must be positive, got ",
              timeout.count(), " ms");
    detail::ignore_sigpipe();
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    // Collectives run one at a time (each call waits), so one worker thread is enough.
    options->threads = 1;
    const auto start = Clock::now();
    try {
      const char* ifname = std::getenv(kEnvGlooSocketIfname);
      if (ifname != nullptr && *ifname != '\0') {
        std::stringstream names(ifname);
        std::string name;
        while (std::getline(names, name, ',')) {
          if (!name.empty()) {
            options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
          }
        }
      }
      if (options->devices.empty()) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      auto prefixed =
          c10::make_intrusive<c10d::PrefixStore>(detail::next_comm_prefix() + "gloo", store);
      pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
    } catch (const std::exception& e) {
      const auto elapsed = Clock::now() - start;
      const std::string text = detail::exception_text(e);
      if (elapsed >= timeout * 9 / 10) {
        MPU_THROW(Timeout, "make_gloo_communicator: rank ", rank, " of ", size,
                  " did not meet the other ranks within ", detail::seconds_text(timeout), ": ",
                  text);
      }
      MPU_THROW(CommError, "make_gloo_communicator: rank ", rank, " of ", size,
                " could not connect to the other ranks: ", text);
    }
  }

  ~GlooCommunicator() override {
    // A collective that abort() walked away from is still blocked in the process group's worker
    // thread, and ~ProcessGroupGloo joins that thread: it would wait for the peers or Gloo's
    // timeout, which is what abort() promises not to do. The process group is left to the
    // process instead; its thread ends with the process.
    try {
      if (abandoned_ && !abandoned_->isCompleted()) {
        MPU_LOG_WARN("Gloo communicator (rank ", rank_, " of ", size_,
                     "): a collective aborted in flight is still blocked; leaving its process "
                     "group behind rather than waiting for it");
        (void)pg_.release();
        (void)abandoned_.release();
      }
    } catch (...) {
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  torch::Device device() const override { return torch::kCPU; }
  std::string backend() const override { return "gloo"; }
  std::uint64_t sequence_number() const override { return seq_; }

  void reduce(torch::Tensor& t, int root, ReduceOp op) override {
    detail::check_tensor("reduce", "t", t, device());
    detail::check_reduce_op("reduce", op, t);
    detail::check_root("reduce", root, size_);
    run("reduce", t.numel(), [&] {
      // Non-root ranks reduce a copy: Gloo writes partial results into their buffer.
      torch::Tensor wire = rank_ == root ? reduction_wire(t) : reduction_scratch(t);
      std::vector<at::Tensor> tensors{wire};
      c10d::ReduceOptions options;
      options.rootRank = root;
      options.reduceOp = c10d::ReduceOp::SUM;
      options.timeout = timeout_;
      return std::make_pair(pg_->reduce(tensors, options), [&, wire]() mutable {
        if (rank_ != root) return;
        if (op == ReduceOp::kAvg) wire.div_(size_);
        if (!wire.is_same(t)) t.copy_(wire);
      });
    });
  }

  void broadcast(torch::Tensor& t, int root) override {
    detail::check_tensor("broadcast", "t", t, device());
    detail::check_root("broadcast", root, size_);
    run("broadcast", t.numel(), [&] {
      std::vector<at::Tensor> tensors{movement_wire(t)};
      c10d::BroadcastOptions options;
      options.rootRank = root;
      options.timeout = timeout_;
      return std::make_pair(pg_->broadcast(tensors, options), [] {});
    });
  }

  void allreduce(torch::Tensor& t, ReduceOp op) override {
    detail::check_tensor("allreduce", "t", t, device());
    detail::check_reduce_op("allreduce", op, t);
    run("allreduce", t.numel(), [&] {
      torch::Tensor wire = reduction_wire(t);
      return std::make_pair(start_allreduce(wire), [&, wire]() mutable {
        if (op == ReduceOp::kAvg) wire.div_(size_);
        if (!wire.is_same(t)) t.copy_(wire);
      });
    });
  }

  void reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) override {
    detail::check_reduce_scatter(*this, out, in, op);
    run("reduce_scatter", in.numel(), [&] {
      // No reduce_scatter in LibTorch 1.13's Gloo: reduce everything into a copy, keep a shard.
      torch::Tensor full = reduction_scratch(in).view({-1});
      return std::make_pair(start_allreduce(full), [&, full] {
        torch::Tensor shard = full.narrow(0, shard_offset(in.numel()), out.numel());
        if (op == ReduceOp::kAvg) shard.div_(size_);
        out.view({-1}).copy_(shard);
      });
    });
  }

  void allgather(torch::Tensor& out, const torch::Tensor& in) override {
    detail::check_allgather(*this, out, in);
    run("allgather", out.numel(), [&] {
      const std::int64_t total = out.numel();
      const std::int64_t chunk = (total + size_ - 1) / size_;
      torch::Tensor flat_out = movement_wire(out).view({-1});
      const bool divisible = chunk * size_ == total;
      // Gloo gathers equal chunks: pad when the ranks' shards differ in size.
      torch::Tensor gathered =
          divisible ? flat_out : torch::empty({chunk * size_}, flat_out.options());
      std::vector<std::vector<at::Tensor>> outputs(1);
      for (int r = 0; r < size_; ++r) outputs[0].push_back(gathered.narrow(0, r * chunk, chunk));
      torch::Tensor input = movement_wire(in).view({-1});
      if (input.numel() < chunk || detail::overlaps(in, out)) {
        torch::Tensor padded = torch::zeros({chunk}, input.options());
        padded.narrow(0, 0, input.numel()).copy_(input);
        input = padded;
      }
      std::vector<at::Tensor> inputs{input};
      c10d::AllgatherOptions options;
      options.timeout = timeout_;
      return std::make_pair(pg_->allgather(outputs, inputs, options),
                            [flat_out, gathered, total, divisible]() mutable {
                              if (!divisible) flat_out.copy_(gathered.narrow(0, 0, total));
                            });
    });
  }

  void barrier() override {
    // Always at least one element, so that the barrier is never skipped as empty.
    run("barrier", 1, [&] {
      c10d::BarrierOptions options;
      options.timeout = timeout_;
      return std::make_pair(pg_->barrier(options), [] {});
    });
  }

  void synchronize() override { throw_if_failed("synchronize"); }

  void abort() noexcept override {
    try {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!failed_.load()) {
        error_ = "abort() was called";
        timed_out_ = false;
        failed_.store(true);
      }
    } catch (...) {
      failed_.store(true);
    }
  }

 private:
  // The tensor Gloo reduces for `t`: `t` itself, or a float32 copy when `t` is bfloat16.
  static torch::Tensor reduction_wire(const torch::Tensor& t) {
    return t.scalar_type() == torch::kBFloat16 ? t.to(torch::kFloat) : t;
  }

  // A copy of `t` that Gloo may reduce into, float32 when `t` is bfloat16.
  static torch::Tensor reduction_scratch(const torch::Tensor& t) {
    return t.scalar_type() == torch::kBFloat16 ? t.to(torch::kFloat) : t.clone();
  }

  // The tensor Gloo moves for `t`: bfloat16 travels as float16 bits (same size, no arithmetic).
  static torch::Tensor movement_wire(const torch::Tensor& t) {
    return t.scalar_type() == torch::kBFloat16 ? t.view(torch::kHalf) : t;
  }

  c10::intrusive_ptr<c10d::Work> start_allreduce(const torch::Tensor& t) {
    std::vector<at::Tensor> tensors{t};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = timeout_;
    return pg_->allreduce(tensors, options);
  }

  // Counts the call, skips empty ones, then runs `start` (which returns the Gloo work and what to
  // do once it has finished), waits, and turns failures into CommError/Timeout.
  template <typename Start>
  void run(const char* op, std::int64_t numel, Start&& start) {
    throw_if_failed(op);
    const std::uint64_t seq = ++seq_;
    if (numel == 0) return;
    const auto begin = Clock::now();
    try {
      auto [work, finish] = start();
      if (!wait_unless_aborted(work)) {
        abandoned_ = work;
        fail(op, seq, false, "abort() was called while it was in flight");
      }
      finish();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      const auto elapsed = Clock::now() - begin;
      const std::string text = detail::exception_text(e);
      const bool timed_out =
          elapsed >= timeout_ * 9 / 10 || text.find("imed out") != std::string::npos;
      fail(op, seq, timed_out, text);
    }
  }

  // Waits for `work` to complete, waking every kGlooAbortCheckInterval to look at the abort flag.
  // Returns false when abort() was called first; rethrows the work's own failure (Gloo's timeout
  // included).
  bool wait_unless_aborted(const c10::intrusive_ptr<c10d::Work>& work) {
    while (!work->isCompleted()) {
      if (failed_.load()) return false;
      try {
        // Work::wait with a timeout throws "Operation timed out!" when the work is not done yet.
        work->wait(kGlooAbortCheckInterval);
      } catch (const std::exception&) {
        if (!work->isCompleted()) continue;
        break;  // finished with its own error just now: the wait below rethrows that one
      }
    }
    work->wait();
    return true;
  }

  std::string label(const char* op, std::uint64_t seq) const {
    return detail::cat(op, " #", seq, " (gloo, rank ", rank_, " of ", size_, ")");
  }

  [[noreturn]] void fail(const char* op, std::uint64_t seq, bool timed_out,
                         const std::string& text) {
    std::string message;
    {
      std::lock_guard<std::mutex> lock(error_mutex_);
      message = timed_out ? detail::cat(label(op, seq), " timed out after ",
                                        detail::seconds_text(timeout_), ": ", text)
                          : detail::cat(label(op, seq), " failed: ", text);
      if (!failed_.load()) {
        error_ = message;
        timed_out_ = timed_out;
        failed_.store(true);
      }
    }
    MPU_LOG_ERROR(message, "; the communicator is aborted");
    if (timed_out) MPU_THROW(Timeout, message, "; the communicator is aborted");
    MPU_THROW(CommError, message, "; the communicator is aborted");
  }

  void throw_if_failed(const char* op) const {
    if (!failed_.load()) return;
    std::lock_guard<std::mutex> lock(error_mutex_);
    const std::string message = detail::cat(op, " (gloo, rank ", rank_, " of ", size_,
                                            "): the communicator was aborted: ", error_);
    if (timed_out_) MPU_THROW(Timeout, message);
    MPU_THROW(CommError, message);
  }

  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
  // The work of a collective that abort() interrupted, which may still be running.
  c10::intrusive_ptr<c10d::Work> abandoned_;
  std::uint64_t seq_ = 0;
  std::atomic<bool> failed_{false};
  mutable std::mutex error_mutex_;
  std::string error_;
  bool timed_out_ = false;
};

}  // namespace

std::shared_ptr<Communicator> make_gloo_communicator(const StorePtr& store, int rank, int size,
                                                     std::chrono::milliseconds timeout) {
  return std::make_shared<GlooCommunicator>(store, rank, size, timeout);
}

}  // namespace mpu
