// Catches SIGINT and SIGTERM for the duration of Trainer::run(), so that the trainer can stop
// after the current iteration, let its extensions write a final snapshot, stop the workers and
// throw mpu::Interrupted (docs/reliability.md).
#pragma once

namespace mpu::detail {

/// While alive, SIGINT and SIGTERM set a flag instead of killing the process, unless the
/// program has installed its own handler or ignores the signal (then they are left alone). The
/// handler is one-shot: a second signal has the default effect, so a second Ctrl-C kills at
/// once. The destructor restores what was there. Not reentrant: one SignalCatch at a time.
class SignalCatch {
 public:
  SignalCatch();
  ~SignalCatch();
  SignalCatch(const SignalCatch&) = delete;
  SignalCatch& operator=(const SignalCatch&) = delete;

  /// The signal caught, or 0.
  int caught() const;
};

}  // namespace mpu::detail
