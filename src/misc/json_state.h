// Extension state that is not a tensor (logs, partial summaries), kept in a snapshot as JSON
// text. nlohmann_json is a private dependency: it appears in no public header.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "mpu/reporter.h"

namespace mpu::detail {

/// JSON has no NaN or infinity; they are written as null and read back as NaN.
inline nlohmann::json json_number(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}
inline double number_from_json(const nlohmann::json& j) {
  return j.is_null() ? std::numeric_limits<double>::quiet_NaN() : j.get<double>();
}

/// {"key": [weighted sum, weight], ...}. Reads the sums from the device.
nlohmann::json summary_to_json(const DictSummary& summary);
DictSummary summary_from_json(const nlohmann::json& j);

/// A string entry of an archive.
void write_string(torch::serialize::OutputArchive& archive, const std::string& key,
                  const std::string& value);
std::string read_string(torch::serialize::InputArchive& archive, const std::string& key);

/// Parses `text`, throwing mpu::InvalidArgument that names `what` when it is not JSON.
nlohmann::json parse_state(const std::string& what, const std::string& text);

}  // namespace mpu::detail
