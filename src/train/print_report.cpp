#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <utility>
#include <vector>

#include "mpu/error.h"
#include "mpu/extensions.h"

namespace mpu {
namespace {

constexpr std::size_t kMinColumnWidth = 10;

std::size_t column_width(const std::string& entry) {
  return std::max(kMinColumnWidth, entry.size());
}

std::optional<double> column_value(const LogReport::Entry& row, const std::string& entry) {
  if (entry == "epoch") return static_cast<double>(row.epoch);
  if (entry == "iteration") return static_cast<double>(row.iteration);
  if (entry == "elapsed_time") return row.elapsed_time;
  auto it = row.values.find(entry);
  if (it == row.values.end()) return std::nullopt;
  return it->second;
}

}  // namespace

PrintReport::PrintReport(std::vector<std::string> entries, std::string log_report,
                         std::ostream* out)
    : entries_(std::move(entries)),
      log_report_(std::move(log_report)),
      out_(out != nullptr ? out : &std::cout),
      terminal_(out_ == &std::cout && ::isatty(STDOUT_FILENO) == 1) {
  MPU_CHECK(!entries_.empty(),
            "PrintReport: no columns given; name keys such as \"epoch\" or \"main/loss\"");
}

void PrintReport::initialize(Trainer& trainer) {
  MPU_CHECK(trainer.get_extension<LogReport>(log_report_) != nullptr,
            "PrintReport: the trainer has no ", "LogReport named '", log_report_,
            "'; extend it with mpu::LogReport() as well");
}

void PrintReport::print_header() {
  // The same layout as the rows: each name in its column, two spaces between columns.
  std::string line = terminal_ ? "\033[K" : "";
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    std::string cell = entries_[i];
    cell.resize(column_width(entries_[i]), ' ');
    line += cell;
    if (i + 1 < entries_.size()) line += "  ";
  }
  *out_ << line << '\n';
  header_printed_ = true;
}

void PrintReport::operator()(Trainer& trainer) {
  if (!header_printed_) print_header();
  auto log_report = trainer.get_extension<LogReport>(log_report_);
  MPU_CHECK(log_report != nullptr, "PrintReport: the LogReport named '", log_report_, "' is gone");
  const auto& log = log_report->log();
  for (; printed_rows_ < log.size(); ++printed_rows_) {
    const auto& row = log[printed_rows_];
    // On a terminal, clear whatever a ProgressBar left on the line.
    std::string line = terminal_ ? "\033[K" : "";
    for (const auto& entry : entries_) {
      const int width = static_cast<int>(column_width(entry));
      const auto value = column_value(row, entry);
      if (value) {
        std::vector<char> buf(static_cast<std::size_t>(width) + 32);
        std::snprintf(buf.data(), buf.size(), "%-*g", width, *value);
        line += buf.data();
      } else {
        line.append(static_cast<std::size_t>(width), ' ');
      }
      line += "  ";
    }
    *out_ << line << '\n';
  }
  out_->flush();
}

void PrintReport::save(torch::serialize::OutputArchive& archive) const {
  archive.write("printed_rows",
                torch::tensor(static_cast<std::int64_t>(printed_rows_), torch::kInt64));
}

void PrintReport::load(torch::serialize::InputArchive& archive) {
  torch::Tensor rows;
  archive.read("printed_rows", rows);
  printed_rows_ = static_cast<std::size_t>(rows.item<std::int64_t>());
}

}  // namespace mpu
