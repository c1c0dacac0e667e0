#include <filesystem>
#include <utility>

#include "misc/atomic_file.h"
#include "misc/json_state.h"
#include "mpu/error.h"
#include "mpu/extensions.h"

namespace mpu {
namespace {

// Chainer's order: the observed means, then epoch, iteration and elapsed_time.
nlohmann::ordered_json entry_to_json(const LogReport::Entry& e) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [key, value] : e.values) j[key] = detail::json_number(value);
  j["epoch"] = e.epoch;
  j["iteration"] = e.iteration;
  j["elapsed_time"] = detail::json_number(e.elapsed_time);
  return j;
}

LogReport::Entry entry_from_json(const nlohmann::json& j) {
  MPU_CHECK(j.is_object(), "LogReport: a saved log row is not a JSON object: ", j.dump());
  LogReport::Entry e;
  for (const auto& [key, value] : j.items()) {
    if (key == "epoch") {
      e.epoch = value.get<std::int64_t>();
    } else if (key == "iteration") {
      e.iteration = value.get<std::int64_t>();
    } else if (key == "elapsed_time") {
      e.elapsed_time = detail::number_from_json(value);
    } else {
      e.values[key] = detail::number_from_json(value);
    }
  }
  return e;
}

}  // namespace

LogReport::LogReport(std::vector<std::string> keys, Trigger trigger, std::string filename)
    : keys_(std::move(keys)), trigger_(std::move(trigger)), filename_(std::move(filename)) {
  MPU_CHECK(filename_.find('/') == std::string::npos, "LogReport: the file name '", filename_,
            "' contains '/'; it names a file in the trainer's output directory");
}

LogReport::LogReport(Trigger trigger, std::string filename)
    : LogReport(std::vector<std::string>{}, std::move(trigger), std::move(filename)) {}

void LogReport::operator()(Trainer& trainer) {
  const Observation& observation = trainer.observation();
  if (keys_.empty()) {
    summary_.add(observation);
  } else {
    for (const auto& key : keys_) {
      auto it = observation.find(key);
      if (it != observation.end()) summary_.add(key, it->second);
    }
  }
  if (!trigger_(trainer)) return;

  Entry entry;
  entry.values = summary_.mean();
  entry.epoch = trainer.updater().epoch();
  entry.iteration = trainer.updater().iteration();
  entry.elapsed_time = trainer.elapsed_time();
  log_.push_back(std::move(entry));
  summary_.clear();
  if (!filename_.empty()) {
    const auto path = std::filesystem::path(trainer.out_dir()) / filename_;
    detail::write_file_atomically(path.string(), "LogReport", to_json());
  }
}

std::string LogReport::to_json() const {
  nlohmann::ordered_json j = nlohmann::ordered_json::array();
  for (const auto& e : log_) j.push_back(entry_to_json(e));
  return j.dump(4) + "\n";
}

void LogReport::save(torch::serialize::OutputArchive& archive) const {
  nlohmann::json state;
  state["log"] = nlohmann::json::parse(to_json());
  state["summary"] = detail::summary_to_json(summary_);
  detail::write_string(archive, "state", state.dump());
}

void LogReport::load(torch::serialize::InputArchive& archive) {
  const nlohmann::json state =
      detail::parse_state("LogReport", detail::read_string(archive, "state"));
  MPU_CHECK(state.contains("log") && state["log"].is_array() && state.contains("summary"),
            "LogReport: the saved state lacks 'log' or 'summary'");
  std::vector<Entry> log;
  for (const auto& row : state["log"]) log.push_back(entry_from_json(row));
  summary_ = detail::summary_from_json(state["summary"]);
  log_ = std::move(log);
}

}  // namespace mpu
