#include <filesystem>
#include <system_error>
#include <utility>

#include "misc/log.h"
#include "mpu/error.h"
#include "mpu/extensions.h"
#include "train/snapshot_files.h"

namespace mpu {

Snapshot::Snapshot(std::string filename_pattern, int keep_last)
    : pattern_(std::move(filename_pattern)), keep_last_(keep_last) {
  detail::check_snapshot_pattern("Snapshot", pattern_);
  MPU_CHECK(keep_last >= 0, "Snapshot: keep_last must be 0 (keep all) or more, got ", keep_last);
}

void Snapshot::operator()(Trainer& trainer) {
  const Updater& updater = trainer.updater();
  if (!updater.is_main()) {
    if (updater.collective_save()) {
      torch::serialize::OutputArchive discarded;
      trainer.save(discarded);
    }
    return;
  }
  const auto path = std::filesystem::path(trainer.out_dir()) /
                    format_snapshot_name(pattern_, updater.iteration(), updater.epoch());
  trainer.save_snapshot(path.string());
  last_path_ = path.string();
  if (keep_last_ == 0) return;
  auto files = detail::list_snapshots(trainer.out_dir(), pattern_);
  std::size_t excess = files.size() > static_cast<std::size_t>(keep_last_)
                           ? files.size() - static_cast<std::size_t>(keep_last_)
                           : 0;
  for (std::size_t i = 0; i < files.size() && excess > 0; ++i) {
    if (std::filesystem::path(files[i].path) == path) continue;
    std::error_code ec;
    std::filesystem::remove(files[i].path, ec);
    if (ec)
      MPU_LOG_WARN("Snapshot: could not remove old snapshot '", files[i].path, "': ", ec.message());
    --excess;
  }
}

void Snapshot::interrupted(Trainer& trainer) {
  if (!on_interrupt_) return;
  const Updater& updater = trainer.updater();
  const auto path = std::filesystem::path(trainer.out_dir()) /
                    format_snapshot_name(pattern_, updater.iteration(), updater.epoch());
  if (path.string() == last_path_) return;  // this iteration's snapshot is already written
  (*this)(trainer);
  MPU_LOG_INFO("Snapshot: wrote '", last_path_, "' on interrupt, at iteration ",
               updater.iteration());
}

}  // namespace mpu
