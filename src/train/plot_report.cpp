#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "misc/atomic_file.h"
#include "misc/json_state.h"
#include "misc/log.h"
#include "mpu/error.h"
#include "mpu/extensions.h"

extern char** environ;

namespace mpu {
namespace {

constexpr const char* kGnuplot = "gnuplot";

// A gnuplot single-quoted string: backslashes are literal, a quote is doubled.
std::string gp_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += '\'';
    out += c;
  }
  return out + "'";
}

std::string data_value(double v) {
  if (!std::isfinite(v)) return "?";
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

std::string first_line_of_file(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Starts `gnuplot script` with stdout discarded and stderr to `err_path`. Returns its pid, or -1
// with `failure` set.
pid_t spawn_gnuplot(const std::string& script, const std::string& err_path, std::string& failure) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::string arg0 = kGnuplot;
  std::string arg1 = script;
  char* argv[] = {arg0.data(), arg1.data(), nullptr};
  pid_t pid = -1;
  // posix_spawn, not fork: safe in a process with threads and a CUDA context.
  const int rc = posix_spawnp(&pid, kGnuplot, &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    failure = detail::cat("could not start gnuplot: ", std::strerror(rc));
    return -1;
  }
  return pid;
}

// Waits for a gnuplot started by spawn_gnuplot; "" on success, else why it failed.
std::string wait_gnuplot(pid_t pid, const std::string& err_path) {
  int status = 0;
  pid_t waited;
  do {
    waited = ::waitpid(pid, &status, 0);
  } while (waited < 0 && errno == EINTR);
  if (waited < 0) return detail::cat("waiting for gnuplot failed: ", std::strerror(errno));
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  std::string why = WIFEXITED(status)
                        ? detail::cat("gnuplot exited with status ", WEXITSTATUS(status))
                        : detail::cat("gnuplot was killed by signal ", WTERMSIG(status));
  const std::string line = first_line_of_file(err_path);
  return line.empty() ? why : why + ": " + line;
}

}  // namespace

PlotReport::PlotReport(std::vector<std::string> y_keys, std::string x_key, Trigger trigger,
                       std::string filename)
    : y_keys_(std::move(y_keys)),
      x_key_(std::move(x_key)),
      trigger_(std::move(trigger)),
      filename_(std::move(filename)) {
  MPU_CHECK(!y_keys_.empty(), "PlotReport: no keys to plot; name keys such as \"main/loss\"");
  MPU_CHECK(x_key_ == "epoch" || x_key_ == "iteration", "PlotReport: x_key must be \"epoch\" or ",
            "\"iteration\", got \"", x_key_, "\"");
  MPU_CHECK(!filename_.empty() && filename_.find('/') == std::string::npos && filename_[0] != '.',
            "PlotReport: the file name '", filename_,
            "' must name a file in the trainer's output directory (no '/', not starting with '.')");
}

bool PlotReport::gnuplot_available() {
  const char* path_env = std::getenv("PATH");
  std::stringstream dirs(path_env != nullptr ? path_env : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + kGnuplot;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0) {
      return true;
    }
  }
  return false;
}

void PlotReport::initialize(Trainer& trainer) {
  gnuplot_ = gnuplot_available();
  if (!gnuplot_) {
    const auto out = std::filesystem::path(trainer.out_dir());
    MPU_LOG_WARN("PlotReport: gnuplot is not on PATH, so ", (out / filename_).string(),
                 " will not be drawn; its data and script go to ",
                 (out / std::filesystem::path(filename_).replace_extension(".dat")).string(),
                 " and .gp (install gnuplot, e.g. Debian's gnuplot-nox, to get the plot)");
  }
}

void PlotReport::operator()(Trainer& trainer) {
  const Observation& observation = trainer.observation();
  for (const auto& key : y_keys_) {
    auto it = observation.find(key);
    if (it != observation.end()) summary_.add(key, it->second);
  }
  if (!trigger_(trainer)) return;
  const Updater& updater = trainer.updater();
  Point point;
  point.x = x_key_ == "epoch" ? updater.epoch_detail() : static_cast<double>(updater.iteration());
  point.y = summary_.mean();
  points_.push_back(std::move(point));
  summary_.clear();
  write_files(trainer.out_dir());
}

void PlotReport::write_files(const std::string& out_dir) {
  const std::filesystem::path out(out_dir);
  const auto data = out / std::filesystem::path(filename_).replace_extension(".dat");
  const auto script = out / std::filesystem::path(filename_).replace_extension(".gp");
  const auto tmp_png = out / tmp_name();
  // The previous drawing reads the files about to be replaced: collect it first.
  finish_drawing();

  std::string table = "# " + x_key_;
  for (const auto& key : y_keys_) table += "  " + key;
  table += '\n';
  for (const auto& p : points_) {
    table += data_value(p.x);
    for (const auto& key : y_keys_) {
      auto it = p.y.find(key);
      table += ' ' + (it == p.y.end() ? std::string("?") : data_value(it->second));
    }
    table += '\n';
  }
  detail::write_file_atomically(data.string(), "PlotReport", table);

  std::string gp;
  gp +=
      "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
      "  set terminal pngcairo size 800,600 noenhanced\n"
      "} else {\n"
      "  set terminal png size 800,600 noenhanced\n"
      "}\n";
  gp += "set output " + gp_quote(tmp_png.string()) + "\n";
  gp += "set datafile missing '?'\n";
  gp += "set xlabel " + gp_quote(x_key_) + "\n";
  gp += "set grid\nset key outside top center horizontal\n";
  gp += "plot ";
  for (std::size_t i = 0; i < y_keys_.size(); ++i) {
    gp += (i == 0 ? gp_quote(data.string()) : std::string(", ''")) +
          " using 1:" + std::to_string(i + 2) + " with linespoints title " + gp_quote(y_keys_[i]);
  }
  gp += "\n";
  detail::write_file_atomically(script.string(), "PlotReport", gp);

  if (!gnuplot_) return;
  // gnuplot draws while training goes on.
  std::string failure;
  const pid_t pid = spawn_gnuplot(script.string(), (out / err_name()).string(), failure);
  if (pid < 0) {
    MPU_LOG_WARN("PlotReport: drawing ", (out / filename_).string(), " failed: ", failure);
    return;
  }
  drawing_pid_ = pid;
  drawing_dir_ = out_dir;
}

std::string PlotReport::tmp_name() const {
  return "." + filename_ + ".tmp";
}
std::string PlotReport::err_name() const {
  return "." + filename_ + ".gnuplot-stderr";
}

void PlotReport::finish_drawing() {
  if (drawing_pid_ < 0) return;
  const std::filesystem::path out(drawing_dir_);
  const auto png = out / filename_;
  const auto tmp_png = out / tmp_name();
  const auto err = out / err_name();
  const std::string failure = wait_gnuplot(drawing_pid_, err.string());
  drawing_pid_ = -1;
  std::error_code ec;
  drawn_ = false;
  if (failure.empty()) {
    std::filesystem::rename(tmp_png, png, ec);
    if (ec) {
      MPU_LOG_WARN("PlotReport: could not move the plot into place as ", png.string(), ": ",
                   ec.message());
    } else {
      drawn_ = true;
    }
  } else {
    MPU_LOG_WARN("PlotReport: drawing ", png.string(), " failed: ", failure);
    std::filesystem::remove(tmp_png, ec);
  }
  std::filesystem::remove(err, ec);
}

void PlotReport::finalize() {
  finish_drawing();
}

void PlotReport::save(torch::serialize::OutputArchive& archive) const {
  nlohmann::json points = nlohmann::json::array();
  for (const auto& p : points_) {
    nlohmann::json y = nlohmann::json::object();
    for (const auto& [key, value] : p.y) y[key] = detail::json_number(value);
    points.push_back({{"x", detail::json_number(p.x)}, {"y", y}});
  }
  nlohmann::json state;
  state["points"] = points;
  state["summary"] = detail::summary_to_json(summary_);
  detail::write_string(archive, "state", state.dump());
}

void PlotReport::load(torch::serialize::InputArchive& archive) {
  const nlohmann::json state =
      detail::parse_state("PlotReport", detail::read_string(archive, "state"));
  MPU_CHECK(state.contains("points") && state["points"].is_array() && state.contains("summary"),
            "PlotReport: the saved state lacks 'points' or 'summary'");
  std::vector<Point> points;
  for (const auto& p : state["points"]) {
    Point point;
    point.x = detail::number_from_json(p.at("x"));
    for (const auto& [key, value] : p.at("y").items())
      point.y[key] = detail::number_from_json(value);
    points.push_back(std::move(point));
  }
  summary_ = detail::summary_from_json(state["summary"]);
  points_ = std::move(points);
}

}  // namespace mpu
