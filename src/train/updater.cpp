#include "mpu/updater.h"

#include "misc/torch_compat.h"
#include "mpu/communicator.h"
#include "mpu/error.h"
#include "sync/sync_engine.h"
#include "train/step_graph.h"
#include "train/updater_common.h"

namespace mpu {

Batch to_device(const Batch& batch, const torch::Device& device) {
  return Batch(batch.data.to(device, /*non_blocking=*/true),
               batch.target.to(device, /*non_blocking=*/true));
}

const char* to_string(Strategy strategy) {
  switch (strategy) {
    case Strategy::kMasterStep:
      return "master";
    case Strategy::kReplicated:
      return "replicated";
    case Strategy::kSharded:
      return "sharded";
  }
  return "unknown";
}

Strategy parse_strategy(const std::string& name) {
  for (Strategy s : {Strategy::kMasterStep, Strategy::kReplicated, Strategy::kSharded}) {
    if (name == to_string(s)) return s;
  }
  MPU_THROW(InvalidArgument, "unknown strategy '", name,
            "'; valid strategies: master, replicated, sharded");
}

namespace detail {

torch::Tensor forward_backward(Iterator& iterator, const UpdaterOptions& options,
                               const LossFunction& loss_fn, const torch::Device& device,
                               const std::function<void()>& zero_grad, double loss_scale) {
  const Batch batch = iterator.next();
  const Batch on_device =
      options.converter ? options.converter(batch, device) : to_device(batch, device);
  return forward_backward_on(on_device, options, loss_fn, device, zero_grad, loss_scale);
}

torch::Tensor forward_backward_on(const Batch& on_device, const UpdaterOptions& options,
                                  const LossFunction& loss_fn, const torch::Device& device,
                                  const std::function<void()>& zero_grad, double loss_scale) {
  torch::Tensor loss;
  {
    ReportScope scope("main");
    // The forward under autocast; backward outside it, as torch.autocast recommends.
    AutocastScope autocast(device.type(), compute_dtype(options.precision),
                           uses_autocast(options.precision));
    loss = loss_fn(on_device);
  }
  MPU_CHECK(loss.defined() && loss.numel() == 1,
            "update: the loss function must return a tensor with one element, got ",
            loss.defined() ? cat(loss.sizes()) : std::string("an undefined tensor"));
  zero_grad();
  if (loss_scale != 1.0) {
    (loss.to(torch::kFloat) * loss_scale).backward();
  } else {
    loss.backward();
  }
  return loss;
}

void data_parallel_step(Iterator& iterator, const UpdaterOptions& options,
                        const LossFunction& loss_fn, const torch::Device& device,
                        SyncEngine& engine, std::int64_t iteration) {
  const int k = options.accumulation_steps;
  for (int m = 0; m < k; ++m) {
    engine.arm(m == k - 1);
    forward_backward(
        iterator, options, loss_fn, device,
        [&] {
          if (m == 0) engine.zero_grad();
        },
        engine.loss_scale());
  }
  engine.finish(iteration);
}

void save_state(torch::serialize::OutputArchive& archive, const torch::nn::Module& model,
                const torch::optim::Optimizer& optimizer, const Iterator& iterator,
                std::int64_t iteration) {
  torch::serialize::OutputArchive m, o, it;
  model.save(m);
  optimizer.save(o);
  iterator.save(it);
  archive.write("model", m);
  archive.write("optimizer", o);
  archive.write("iterator", it);
  archive.write("iteration", torch::tensor(iteration, torch::kInt64));
}

std::int64_t load_state(torch::serialize::InputArchive& archive, torch::nn::Module& model,
                        torch::optim::Optimizer& optimizer, Iterator& iterator,
                        const torch::Device& device) {
  torch::serialize::InputArchive m, o, it;
  MPU_CHECK(archive.try_read("model", m) && archive.try_read("optimizer", o) &&
                archive.try_read("iterator", it),
            "updater load: the archive has no model, optimizer or iterator section; it was not "
            "written by an updater's save()");
  try {
    model.load(m);
  } catch (const c10::Error& e) {
    MPU_THROW(InvalidArgument, "updater load: the saved model does not match this model: ",
              e.what_without_backtrace());
  }
  model.to(device);
  optimizer.load(o);
  move_optimizer_state(optimizer, device);
  iterator.load(it);
  torch::Tensor iteration;
  MPU_CHECK(archive.try_read("iteration", iteration), "updater load: no iteration count");
  return iteration.item<std::int64_t>();
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// StandardUpdater

StandardUpdater::StandardUpdater(std::shared_ptr<torch::nn::Module> model,
                                 torch::optim::Optimizer& optimizer,
                                 std::shared_ptr<Iterator> iterator, LossFunction loss_fn,
                                 torch::Device device, UpdaterOptions options)
    : model_(std::move(model)),
      optimizer_(optimizer),
      iterator_(std::move(iterator)),
      loss_fn_(std::move(loss_fn)),
      device_(device),
      options_(std::move(options)) {
  MPU_CHECK(model_ != nullptr, "StandardUpdater: model is null");
  MPU_CHECK(iterator_ != nullptr, "StandardUpdater: iterator is null");
  MPU_CHECK(static_cast<bool>(loss_fn_), "StandardUpdater: loss_fn is empty");
  detail::check_has_parameters(*model_, "StandardUpdater");
  detail::check_options(options_, "StandardUpdater");
  detail::check_cuda_graph(options_, device_, 1, "StandardUpdater");
  model_->to(device_);
  detail::move_optimizer_state(optimizer_, device_);
  apply_scaling(optimizer_, detail::gradients_per_step(1, options_), options_.scaling);
  make_engine();
}

StandardUpdater::~StandardUpdater() = default;

// The precision policies, and the captured step, take the data-parallel step path on a
// one-rank communicator: the same master weights, loss scaling and flat step as n processes,
// with nothing sent.
void StandardUpdater::make_engine() {
  if (options_.precision == Precision::kFp32 && !options_.cuda_graph) return;
  if (!local_) local_ = make_local_communicator(device_);
  graph_.reset();
  step_.reset();
  step_ = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *local_, options_);
  if (options_.cuda_graph) graph_ = detail::make_step_graph(options_, device_);
}

void StandardUpdater::update() {
  if (graph_) {
    graph_->step(*iterator_, options_, loss_fn_, *step_, iteration_ + 1);
    ++iteration_;
    if (iterator_->is_new_epoch() && options_.on_new_epoch) options_.on_new_epoch(*this);
    return;
  }
  if (step_) {
    detail::data_parallel_step(*iterator_, options_, loss_fn_, device_, *step_, iteration_ + 1);
    ++iteration_;
    if (iterator_->is_new_epoch() && options_.on_new_epoch) options_.on_new_epoch(*this);
    return;
  }
  const int k = options_.accumulation_steps;
  for (int m = 0; m < k; ++m) {
    detail::forward_backward(*iterator_, options_, loss_fn_, device_, [&] {
      if (m == 0) detail::zero_grads(*model_);
    });
  }
  if (k > 1 && options_.scaling.reduction == Reduction::kMean) {
    torch::NoGradGuard no_grad;
    for (auto& p : model_->parameters()) {
      if (p.grad().defined()) p.mutable_grad().div_(k);
    }
  }
  optimizer_.step();
  ++iteration_;
  if (iterator_->is_new_epoch() && options_.on_new_epoch) options_.on_new_epoch(*this);
}

std::int64_t StandardUpdater::epoch() const {
  return iterator_->epoch();
}
double StandardUpdater::epoch_detail() const {
  return iterator_->epoch_detail();
}
bool StandardUpdater::is_new_epoch() const {
  return iterator_->is_new_epoch();
}

void StandardUpdater::save(torch::serialize::OutputArchive& archive) {
  detail::save_state(archive, *model_, optimizer_, *iterator_, iteration_);
  if (step_) step_->save_precision(archive);
}

void StandardUpdater::load(torch::serialize::InputArchive& archive) {
  const auto precision = detail::SyncEngine::read_precision(archive, options_);
  iteration_ = detail::load_state(archive, *model_, optimizer_, *iterator_, device_);
  if (!step_) return;
  make_engine();
  step_->apply_precision(precision);
  step_->broadcast_parameters();
}

std::int64_t StandardUpdater::skipped_steps() const {
  return step_ ? step_->skipped_steps() : 0;
}

double StandardUpdater::loss_scale() const {
  return step_ ? step_->loss_scale() : 1.0;
}

std::int64_t StandardUpdater::graph_replays() const {
  return graph_ ? graph_->replays() : 0;
}

// ------------------------------------------------------------------------------------------------
// DistributedUpdater

DistributedUpdater::DistributedUpdater(std::shared_ptr<torch::nn::Module> model,
                                       torch::optim::Optimizer& optimizer,
                                       std::shared_ptr<Iterator> iterator, LossFunction loss_fn,
                                       std::shared_ptr<Communicator> comm, UpdaterOptions options)
    : model_(std::move(model)),
      optimizer_(optimizer),
      iterator_(std::move(iterator)),
      loss_fn_(std::move(loss_fn)),
      comm_(std::move(comm)),
      options_(std::move(options)) {
  MPU_CHECK(model_ != nullptr, "DistributedUpdater: model is null");
  MPU_CHECK(iterator_ != nullptr, "DistributedUpdater: iterator is null");
  MPU_CHECK(comm_ != nullptr,
            "DistributedUpdater: communicator is null; build one with "
            "mpu::init() or take the one mpu::spawn() gives each rank");
  MPU_CHECK(static_cast<bool>(loss_fn_), "DistributedUpdater: loss_fn is empty");
  detail::check_has_parameters(*model_, "DistributedUpdater");
  detail::check_options(options_, "DistributedUpdater");
  detail::check_cuda_graph(options_, comm_->device(), comm_->size(), "DistributedUpdater");
  model_->to(comm_->device());
  detail::move_optimizer_state(optimizer_, comm_->device());
  scaling_changes_ = apply_scaling(optimizer_, detail::gradients_per_step(comm_->size(), options_),
                                   options_.scaling);
  step_ = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm_, options_);
  step_->check_same_layout();
  step_->broadcast_parameters();
  step_->broadcast_buffers();
  if (options_.cuda_graph) graph_ = detail::make_step_graph(options_, comm_->device());
}

DistributedUpdater::~DistributedUpdater() = default;

void DistributedUpdater::update() {
  if (graph_) {
    graph_->step(*iterator_, options_, loss_fn_, *step_, iteration_ + 1);
  } else {
    detail::data_parallel_step(*iterator_, options_, loss_fn_, comm_->device(), *step_,
                               iteration_ + 1);
  }
  ++iteration_;
  if (iterator_->is_new_epoch() && options_.on_new_epoch && is_main()) options_.on_new_epoch(*this);
}

std::int64_t DistributedUpdater::epoch() const {
  return iterator_->epoch();
}
double DistributedUpdater::epoch_detail() const {
  return iterator_->epoch_detail();
}
bool DistributedUpdater::is_new_epoch() const {
  return iterator_->is_new_epoch();
}
bool DistributedUpdater::is_main() const {
  return comm_->rank() == 0;
}
int DistributedUpdater::rank() const {
  return comm_->rank();
}
int DistributedUpdater::world_size() const {
  return comm_->size();
}
torch::Device DistributedUpdater::device() const {
  return comm_->device();
}

std::int64_t DistributedUpdater::optimizer_state_bytes() const {
  return step_->optimizer_state_bytes();
}
std::int64_t DistributedUpdater::skipped_steps() const {
  return step_->skipped_steps();
}
bool DistributedUpdater::collective_save() const {
  return step_->collective_save();
}

void DistributedUpdater::save(torch::serialize::OutputArchive& archive) {
  step_->gather_state_for_save();
  detail::save_state(archive, *model_, optimizer_, *iterator_, iteration_);
  step_->save_precision(archive);
  step_->release_saved_state();
}

void DistributedUpdater::load(torch::serialize::InputArchive& archive) {
  const auto precision = detail::SyncEngine::read_precision(archive, options_);
  iteration_ = detail::load_state(archive, *model_, optimizer_, *iterator_, comm_->device());
  // Loading replaced the parameters' storage and the optimizer's state; rebuild the flat
  // views and the flat optimizer state, then agree with rank 0; a captured step pointed at
  // the old ones and is captured again.
  graph_.reset();
  step_.reset();
  step_ = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm_, options_);
  step_->apply_precision(precision);
  step_->broadcast_parameters();
  step_->broadcast_buffers();
  if (options_.cuda_graph) graph_ = detail::make_step_graph(options_, comm_->device());
}

}  // namespace mpu
