#include "misc/json_state.h"

#include "mpu/error.h"

namespace mpu::detail {

nlohmann::json summary_to_json(const DictSummary& summary) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [key, s] : summary.summaries()) {
    if (!s.empty()) j[key] = nlohmann::json::array({json_number(s.sum()), s.weight()});
  }
  return j;
}

DictSummary summary_from_json(const nlohmann::json& j) {
  MPU_CHECK(j.is_object(), "summary state: expected a JSON object, got ", j.type_name());
  DictSummary summary;
  for (const auto& [key, value] : j.items()) {
    MPU_CHECK(value.is_array() && value.size() == 2, "summary state: the entry of '", key,
              "' is not [sum, weight]: ", value.dump());
    summary.summaries()[key] = Summary::restore(number_from_json(value[0]), value[1].get<double>());
  }
  return summary;
}

void write_string(torch::serialize::OutputArchive& archive, const std::string& key,
                  const std::string& value) {
  archive.write(key, c10::IValue(value));
}

std::string read_string(torch::serialize::InputArchive& archive, const std::string& key) {
  c10::IValue value;
  archive.read(key, value);
  MPU_CHECK(value.isString(), "snapshot entry '", key, "' is a ", value.tagKind(),
            ", expected a string");
  return value.toStringRef();
}

nlohmann::json parse_state(const std::string& what, const std::string& text) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    MPU_THROW(InvalidArgument, what, ": the saved state is not valid JSON: ", e.what());
  }
}

}  // namespace mpu::detail
