#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

#include "mpu/error.h"
#include "mpu/extensions.h"

namespace mpu {
namespace {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--:--";
  const auto total = static_cast<long long>(std::llround(seconds));
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", total / 3600, total / 60 % 60, total % 60);
  return buf;
}

}  // namespace

ProgressBar::ProgressBar(std::int64_t update_interval, int bar_length)
    : update_interval_(update_interval),
      bar_length_(bar_length),
      out_(&std::cout),
      terminal_(::isatty(STDOUT_FILENO) == 1) {
  MPU_CHECK(update_interval > 0, "ProgressBar: update_interval must be positive, got ",
            update_interval);
  MPU_CHECK(bar_length > 0, "ProgressBar: bar_length must be positive, got ", bar_length);
}

ProgressBar& ProgressBar::output(std::ostream& out, bool terminal) {
  out_ = &out;
  terminal_ = terminal;
  return *this;
}

void ProgressBar::initialize(Trainer& trainer) {
  trainer_ = &trainer;
  drawn_ = false;
  last_iteration_ = trainer.updater().iteration();
  last_progress_ = trainer.stop_trigger().progress(trainer.updater());
  last_time_ = std::chrono::steady_clock::now();
}

void ProgressBar::operator()(Trainer& trainer) {
  if (trainer.updater().iteration() % update_interval_ == 0) draw(trainer);
}

void ProgressBar::finalize() {
  // Show where training ended, unless that was just drawn; leave the bar on screen.
  if (trainer_ != nullptr && (!drawn_ || trainer_->updater().iteration() != last_iteration_)) {
    draw(*trainer_);
  }
  trainer_ = nullptr;
  if (terminal_ && drawn_) {
    *out_ << '\n';
    out_->flush();
  }
}

void ProgressBar::draw(Trainer& trainer) {
  const Updater& updater = trainer.updater();
  const IntervalTrigger& stop = trainer.stop_trigger();
  const auto now = std::chrono::steady_clock::now();
  const double dt = std::chrono::duration<double>(now - last_time_).count();
  const std::int64_t iteration = updater.iteration();
  const double progress = stop.progress(updater);
  const double iters_per_sec = dt > 0 ? static_cast<double>(iteration - last_iteration_) / dt : 0.0;
  const double progress_rate = dt > 0 ? (progress - last_progress_) / dt : 0.0;
  const double eta = progress_rate > 0 ? (1.0 - progress) / progress_rate : -1.0;
  last_time_ = now;
  last_iteration_ = iteration;
  last_progress_ = progress;

  const bool by_iteration = stop.unit() == TriggerUnit::kIteration;
  char status[256];
  std::snprintf(status, sizeof(status),
                "%6.2f%%  iteration %lld%s%s  epoch %.2f%s%s  %.2f iters/sec  ETA %s",
                100.0 * progress, static_cast<long long>(iteration), by_iteration ? "/" : "",
                by_iteration ? std::to_string(stop.period()).c_str() : "", updater.epoch_detail(),
                by_iteration ? "" : "/", by_iteration ? "" : std::to_string(stop.period()).c_str(),
                iters_per_sec, format_duration(eta).c_str());
  if (terminal_) {
    const int filled = static_cast<int>(std::floor(progress * bar_length_));
    std::string bar = "[" + std::string(static_cast<std::size_t>(filled), '#') +
                      std::string(static_cast<std::size_t>(bar_length_ - filled), '.') + "] ";
    // Drawn from the line's start, rest of the line cleared, cursor back to the start, so that
    // the next draw (or a PrintReport row) overwrites it.
    *out_ << '\r' << bar << status << "\033[K\r";
  } else {
    *out_ << status << '\n';
  }
  out_->flush();
  drawn_ = true;
}

}  // namespace mpu
