#include "mpu/trainer.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <numeric>
#include <utility>

#include "misc/atomic_file.h"
#include "misc/log.h"
#include "misc/sync_debug.h"
#include "mpu/error.h"
#include "process/signal_catch.h"

namespace mpu {
namespace {

constexpr const char* kFormatKey = "mpu_snapshot_format";

// Runs a user function as an extension.
class FunctionExtension : public Extension {
 public:
  FunctionExtension(std::string name, std::function<void(Trainer&)> fn, Trigger trigger,
                    int priority, bool all_ranks)
      : name_(std::move(name)),
        fn_(std::move(fn)),
        trigger_(std::move(trigger)),
        priority_(priority),
        all_ranks_(all_ranks) {}
  std::string name() const override { return name_; }
  Trigger default_trigger() const override { return trigger_; }
  int priority() const override { return priority_; }
  bool all_ranks() const override { return all_ranks_; }
  void operator()(Trainer& trainer) override { fn_(trainer); }

 private:
  std::string name_;
  std::function<void(Trainer&)> fn_;
  Trigger trigger_;
  int priority_;
  bool all_ranks_;
};

std::string shape_text(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "] " + std::string(c10::toString(t.scalar_type()));
}

// The shape and dtype of every parameter and buffer: what a snapshot of the same model keeps.
std::map<std::string, std::string> model_layout(torch::nn::Module& model) {
  std::map<std::string, std::string> layout;
  for (const auto& p : model.named_parameters(true))
    layout["parameter '" + p.key() + "'"] = shape_text(p.value());
  for (const auto& b : model.named_buffers(true)) {
    if (b.value().defined()) layout["buffer '" + b.key() + "'"] = shape_text(b.value());
  }
  return layout;
}

// c10::Error's message without LibTorch's C++ backtrace, on one line.
std::string torch_message(const c10::Error& e) {
  std::string msg = e.what_without_backtrace();
  const auto nl = msg.find('\n');
  if (nl != std::string::npos) msg.resize(nl);
  return msg;
}

}  // namespace

IntervalTrigger::IntervalTrigger(std::int64_t period, TriggerUnit unit)
    : period_(period), unit_(unit) {
  MPU_CHECK(period > 0, "IntervalTrigger: the period must be positive, got ", period, " ",
            unit == TriggerUnit::kIteration ? "iterations" : "epochs");
}

bool IntervalTrigger::fires(const Updater& updater) const {
  if (unit_ == TriggerUnit::kIteration) {
    const std::int64_t it = updater.iteration();
    return it > 0 && it % period_ == 0;
  }
  return updater.is_new_epoch() && updater.epoch() % period_ == 0;
}

bool IntervalTrigger::reached(const Updater& updater) const {
  return (unit_ == TriggerUnit::kIteration ? updater.iteration() : updater.epoch()) >= period_;
}

double IntervalTrigger::progress(const Updater& updater) const {
  const double done = unit_ == TriggerUnit::kIteration ? static_cast<double>(updater.iteration())
                                                       : updater.epoch_detail();
  return std::clamp(done / static_cast<double>(period_), 0.0, 1.0);
}

IntervalTrigger every_iterations(std::int64_t n) {
  return {n, TriggerUnit::kIteration};
}
IntervalTrigger every_epochs(std::int64_t n) {
  return {n, TriggerUnit::kEpoch};
}
IntervalTrigger stop_after_iterations(std::int64_t n) {
  return {n, TriggerUnit::kIteration};
}
IntervalTrigger stop_after_epochs(std::int64_t n) {
  return {n, TriggerUnit::kEpoch};
}

Trigger::Trigger(IntervalTrigger interval) : interval_(interval) {}

bool Trigger::operator()(const Trainer& trainer) const {
  return interval_ ? interval_->fires(trainer.updater()) : predicate_(trainer);
}

std::shared_ptr<Extension> make_extension(std::string name, std::function<void(Trainer&)> fn,
                                          Trigger trigger, int priority, bool all_ranks) {
  MPU_CHECK(static_cast<bool>(fn), "make_extension('", name, "'): the function is empty");
  return std::make_shared<FunctionExtension>(std::move(name), std::move(fn), std::move(trigger),
                                             priority, all_ranks);
}

Trainer::Trainer(Updater& updater, IntervalTrigger stop, std::string out_dir)
    : updater_(updater), stop_(stop), out_dir_(std::move(out_dir)) {
  MPU_CHECK(!out_dir_.empty(), "Trainer: the output directory is empty; pass e.g. \"result\"");
}

Trainer::~Trainer() noexcept = default;

Trainer& Trainer::extend(std::shared_ptr<Extension> extension, std::optional<Trigger> trigger,
                         std::optional<int> priority) {
  MPU_CHECK(extension != nullptr, "Trainer::extend: the extension is null");
  MPU_CHECK(!ran_, "Trainer::extend('", extension->name(),
            "'): the trainer has already run; extend it before run()");
  const std::string base = extension->name();
  MPU_CHECK(!base.empty() && base.find('.') == std::string::npos,
            "Trainer::extend: the extension name '", base,
            "' must be non-empty and contain no '.' (it keys the extension's snapshot state)");
  std::string name = base;
  for (int ordinal = 1; get_extension(name) != nullptr; ++ordinal) {
    name = base + "_" + std::to_string(ordinal);
  }
  Trigger t = trigger ? std::move(*trigger) : extension->default_trigger();
  const int p = priority ? *priority : extension->priority();
  extensions_.push_back(Entry{std::move(name), std::move(extension), std::move(t), p});
  return *this;
}

std::shared_ptr<Extension> Trainer::get_extension(const std::string& name) const {
  for (const auto& e : extensions_) {
    if (e.name == name) return e.extension;
  }
  return nullptr;
}

std::vector<std::string> Trainer::extension_names() const {
  std::vector<std::string> names;
  for (const auto& e : extensions_) names.push_back(e.name);
  return names;
}

double Trainer::elapsed_time() const {
  if (!start_) return elapsed_before_;
  return elapsed_before_ +
         std::chrono::duration<double>(std::chrono::steady_clock::now() - *start_).count();
}

void Trainer::interrupt(const std::vector<Entry*>& active, int signal) {
  MPU_LOG_WARN("Trainer: received signal ", signal, " (", strsignal(signal),
               "); stopping after iteration ", updater_.iteration());
  for (Entry* e : active) e->extension->interrupted(*this);
  throw Interrupted(
      detail::where(__FILE__, __LINE__) +
          detail::cat("Trainer::run: interrupted by signal ", signal, " (", strsignal(signal),
                      ") after iteration ", updater_.iteration(), "; the workers are stopped"),
      signal);
}

bool Trainer::runs_here(const Extension& extension) const {
  return updater_.is_main() || extension.all_ranks();
}

void Trainer::run() {
  MPU_CHECK(!ran_,
            "Trainer::run: this trainer has already run; build a new Trainer and resume "
            "it from a snapshot to train further");
  ran_ = true;
  if (updater_.is_main()) {
    std::error_code ec;
    std::filesystem::create_directories(out_dir_, ec);
    if (ec)
      MPU_THROW(Error, "Trainer::run: cannot create the output directory '", out_dir_,
                "': ", ec.message());
  }
  // Highest priority first; extensions of equal priority in the order they were added.
  std::vector<std::size_t> order(extensions_.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return extensions_[a].priority > extensions_[b].priority;
  });
  std::vector<Entry*> active;
  for (std::size_t i : order) {
    if (runs_here(*extensions_[i].extension)) active.push_back(&extensions_[i]);
  }

  start_ = std::chrono::steady_clock::now();
  detail::SignalCatch signals;
  const detail::SyncDebugScope sync_debug;
  try {
    for (Entry* e : active) e->extension->initialize(*this);
    while (!stop_.reached(updater_)) {
      if (const int sig = signals.caught()) interrupt(active, sig);
      observation_.clear();
      ObservationScope scope(observation_);
      updater_.update();
      for (Entry* e : active) {
        if (e->trigger(*this)) (*e->extension)(*this);
      }
    }
  } catch (...) {
    for (Entry* e : active) {
      try {
        e->extension->finalize();
      } catch (const std::exception& ex) {
        MPU_LOG_ERROR("Trainer: finalize of extension '", e->name,
                      "' failed while handling an "
                      "earlier error: ",
                      ex.what());
      }
    }
    try {
      updater_.finalize();
    } catch (const std::exception& ex) {
      MPU_LOG_ERROR("Trainer: finalize of the updater failed while handling an earlier error: ",
                    ex.what());
    }
    elapsed_before_ = elapsed_time();
    start_.reset();
    throw;
  }
  elapsed_before_ = elapsed_time();
  start_.reset();
  for (Entry* e : active) e->extension->finalize();
  updater_.finalize();
}

void Trainer::save(torch::serialize::OutputArchive& archive) {
  archive.write(kFormatKey, torch::tensor(kSnapshotFormatVersion, torch::kInt64));
  torch::serialize::OutputArchive trainer;
  trainer.write("iteration", torch::tensor(updater_.iteration(), torch::kInt64));
  trainer.write("elapsed_time", torch::tensor(elapsed_time(), torch::kFloat64));
  archive.write("trainer", trainer);
  torch::serialize::OutputArchive updater;
  updater_.save(updater);
  archive.write("updater", updater);
  torch::serialize::OutputArchive extensions;
  for (const auto& e : extensions_) {
    torch::serialize::OutputArchive state;
    e.extension->save(state);
    extensions.write(e.name, state);
  }
  archive.write("extensions", extensions);
}

void Trainer::load(torch::serialize::InputArchive& archive) {
  torch::Tensor format;
  MPU_CHECK(archive.try_read(kFormatKey, format),
            "Trainer::load: the archive is not a torch-mpu snapshot (it has no '", kFormatKey,
            "' entry)");
  const std::int64_t version = format.numel() == 1 ? format.item<std::int64_t>() : -1;
  MPU_CHECK(version == kSnapshotFormatVersion, "Trainer::load: the snapshot has format version ",
            version, "; this torch-mpu reads version ", kSnapshotFormatVersion);
  torch::serialize::InputArchive trainer;
  archive.read("trainer", trainer);
  torch::Tensor iteration;
  torch::Tensor elapsed;
  trainer.read("iteration", iteration);
  trainer.read("elapsed_time", elapsed);

  // torch's archive replaces a tensor of another shape without complaint, so compare the model
  // before and after to catch a snapshot of a different model.
  const auto before = model_layout(updater_.model());
  torch::serialize::InputArchive updater;
  archive.read("updater", updater);
  updater_.load(updater);
  const auto after = model_layout(updater_.model());
  for (const auto& [name, layout] : before) {
    auto it = after.find(name);
    MPU_CHECK(it != after.end() && it->second == layout, "Trainer::load: the model's ", name,
              " is ", layout, ", but the snapshot holds ", it == after.end() ? "none" : it->second,
              "; the snapshot is of a different model");
  }
  MPU_CHECK(updater_.iteration() == iteration.item<std::int64_t>(),
            "Trainer::load: the snapshot was taken at iteration ", iteration.item<std::int64_t>(),
            " but the updater's load() restored iteration ", updater_.iteration());
  elapsed_before_ = elapsed.item<double>();

  torch::serialize::InputArchive extensions;
  archive.read("extensions", extensions);
  for (auto& e : extensions_) {
    torch::serialize::InputArchive state;
    if (extensions.try_read(e.name, state)) {
      e.extension->load(state);
    } else {
      MPU_LOG_WARN("Trainer::load: the snapshot has no state for extension '", e.name,
                   "'; it starts afresh");
    }
  }
}

void Trainer::save_snapshot(const std::string& path) {
  torch::serialize::OutputArchive archive;
  save(archive);
  detail::write_file_atomically(
      path, "Trainer::save_snapshot", [&](const detail::ByteWriter& write) {
        // torch's zip writer must never see an exception or a short write: LibTorch 1.13 finishes
        // the archive from a destructor, where a second failure would terminate. Keep the first
        // error, swallow the rest, and throw once torch is done.
        std::exception_ptr error;
        archive.save_to([&](const void* data, std::size_t size) -> std::size_t {
          if (!error) {
            try {
              write(data, size);
            } catch (...) {
              error = std::current_exception();
            }
          }
          return size;
        });
        if (error) std::rethrow_exception(error);
      });
}

void Trainer::resume(const std::string& path) {
  MPU_CHECK(!ran_, "Trainer::resume('", path,
            "'): the trainer has already run; resume a new Trainer");
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  MPU_CHECK(!ec, "Trainer::resume: cannot read snapshot '", path, "': ", ec.message());
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    MPU_THROW(InvalidArgument, "Trainer::resume: snapshot '", path, "' (", size,
              " bytes) is truncated or corrupt; LibTorch could not open it: ", torch_message(e));
  }
  try {
    load(archive);
  } catch (const InvalidArgument& e) {
    MPU_THROW(InvalidArgument, "Trainer::resume: snapshot '", path,
              "' does not fit this trainer: ", e.what());
  } catch (const c10::Error& e) {
    MPU_THROW(InvalidArgument, "Trainer::resume: snapshot '", path,
              "' does not fit this trainer (a different model, optimizer or extension set?): ",
              torch_message(e));
  } catch (const Error&) {
    throw;  // a communication or system failure while loading, not a property of the file
  } catch (const std::exception& e) {
    MPU_THROW(InvalidArgument, "Trainer::resume: snapshot '", path,
              "' holds state this trainer cannot read: ", e.what());
  }
}

void resume(Trainer& trainer, const std::string& path) {
  trainer.resume(path);
}

}  // namespace mpu
