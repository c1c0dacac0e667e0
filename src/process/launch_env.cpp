// The launchers' environments (torchrun, SLURM, Open MPI): pure parsing into a LaunchInfo.
#include <algorithm>
#include <cctype>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "mpu/error.h"
#include "mpu/launch.h"

extern char** environ;

namespace mpu {
namespace {

using Env = std::map<std::string, std::string>;

const std::string* find(const Env& env, const char* name) {
  const auto it = env.find(name);
  return it == env.end() ? nullptr : &it->second;
}

// Strict decimal integer in [lo, hi]; the message names the variable and its value.
int parse_int(const char* name, const std::string& value, int lo, int hi) {
  std::size_t pos = 0;
  long long parsed = 0;
  bool ok = !value.empty() && (std::isdigit(static_cast<unsigned char>(value[0])) != 0 ||
                               value[0] == '-' || value[0] == '+');
  if (ok) {
    try {
      parsed = std::stoll(value, &pos);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  MPU_CHECK(ok && pos == value.size(), "launch environment: ", name, "=\"", value,
            "\" is not an integer");
  MPU_CHECK(parsed >= lo && parsed <= hi, "launch environment: ", name, "=", value,
            " is out of range [", lo, ", ", hi, "]");
  return static_cast<int>(parsed);
}

int require_int(const Env& env, const char* launcher, const char* name, int lo, int hi) {
  const std::string* value = find(env, name);
  MPU_CHECK(value != nullptr, "launch environment: ", launcher, " is detected but ", name,
            " is not set");
  return parse_int(name, *value, lo, hi);
}

int optional_int(const Env& env, const char* name, int lo, int hi, int fallback) {
  const std::string* value = find(env, name);
  return value == nullptr ? fallback : parse_int(name, *value, lo, hi);
}

constexpr int kMaxRanks = 1 << 24;

// SLURM_TASKS_PER_NODE ("2(x3),1"): the task count of node `node`, or 0 when it cannot tell.
int slurm_tasks_on_node(const std::string& spec, int node) {
  std::vector<int> counts;
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    const std::size_t paren = item.find("(x");
    const int tasks = parse_int(kEnvSlurmTasksPerNode, item.substr(0, paren), 0, kMaxRanks);
    int repeat = 1;
    if (paren != std::string::npos) {
      MPU_CHECK(item.back() == ')', "launch environment: ", kEnvSlurmTasksPerNode, "=\"", spec,
                "\" is malformed");
      repeat = parse_int(kEnvSlurmTasksPerNode, item.substr(paren + 2, item.size() - paren - 3), 1,
                         kMaxRanks);
    }
    counts.insert(counts.end(), static_cast<std::size_t>(repeat), tasks);
  }
  if (node >= 0 && node < static_cast<int>(counts.size())) return counts[node];
  if (node < 0 && !counts.empty() &&
      std::all_of(counts.begin(), counts.end(), [&](int c) { return c == counts.front(); })) {
    return counts.front();
  }
  return 0;
}

}  // namespace

namespace detail {

std::string first_slurm_host(const std::string& nodelist) {
  // The first entry ends at the first comma outside brackets.
  std::string entry;
  int depth = 0;
  for (char c : nodelist) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    entry += c;
  }
  // Each bracket group "[03-05,09]" becomes its first number, "03".
  std::string host;
  for (std::size_t i = 0; i < entry.size(); ++i) {
    if (entry[i] != '[') {
      host += entry[i];
      continue;
    }
    const std::size_t close = entry.find(']', i);
    MPU_CHECK(close != std::string::npos, "launch environment: SLURM node list \"", nodelist,
              "\" has an unclosed '['");
    const std::string group = entry.substr(i + 1, close - i - 1);
    host += group.substr(0, group.find_first_of(",-"));
    i = close;
  }
  const auto first = host.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return host.substr(first, host.find_last_not_of(" \t") - first + 1);
}

}  // namespace detail

const char* to_string(Launcher launcher) {
  switch (launcher) {
    case Launcher::kNone:
      return "none";
    case Launcher::kTorchrun:
      return "torchrun";
    case Launcher::kSlurm:
      return "slurm";
    case Launcher::kOpenMpi:
      return "openmpi";
  }
  return "unknown";
}

LaunchInfo parse_launch_env(const Env& env) {
  LaunchInfo info;
  std::string master_addr_hint;
  if (find(env, kEnvRank) != nullptr || find(env, kEnvWorldSize) != nullptr) {
    info.launcher = Launcher::kTorchrun;
    info.world_size = require_int(env, "torchrun", kEnvWorldSize, 1, kMaxRanks);
    info.rank = require_int(env, "torchrun", kEnvRank, 0, info.world_size - 1);
    // Absent when the variables were set by hand for one node: then every rank is local.
    info.local_rank = optional_int(env, kEnvLocalRank, 0, kMaxRanks, info.rank);
    info.local_world_size = optional_int(env, kEnvLocalWorldSize, 1, kMaxRanks, info.world_size);
    const std::string* agent = find(env, kEnvTorchelasticUseAgentStore);
    info.use_agent_store = agent != nullptr && *agent == "True";
    info.restart_count = optional_int(env, kEnvTorchelasticRestartCount, 0, kMaxRanks, 0);
  } else if (find(env, kEnvOmpiRank) != nullptr) {
    info.launcher = Launcher::kOpenMpi;
    info.world_size = require_int(env, "Open MPI", kEnvOmpiSize, 1, kMaxRanks);
    info.rank = require_int(env, "Open MPI", kEnvOmpiRank, 0, info.world_size - 1);
    info.local_rank = require_int(env, "Open MPI", kEnvOmpiLocalRank, 0, kMaxRanks);
    info.local_world_size = optional_int(env, kEnvOmpiLocalSize, 1, kMaxRanks, 0);
  } else if (find(env, kEnvSlurmProcId) != nullptr) {
    info.launcher = Launcher::kSlurm;
    info.world_size = require_int(env, "SLURM", kEnvSlurmNTasks, 1, kMaxRanks);
    info.rank = require_int(env, "SLURM", kEnvSlurmProcId, 0, info.world_size - 1);
    info.local_rank = require_int(env, "SLURM", kEnvSlurmLocalId, 0, kMaxRanks);
    if (const std::string* per_node = find(env, kEnvSlurmNTasksPerNode)) {
      info.local_world_size = parse_int(kEnvSlurmNTasksPerNode, *per_node, 1, kMaxRanks);
    } else if (const std::string* tasks = find(env, kEnvSlurmTasksPerNode)) {
      const int node = optional_int(env, kEnvSlurmNodeId, 0, kMaxRanks, -1);
      info.local_world_size = slurm_tasks_on_node(*tasks, node);
    } else {
      info.local_world_size = 0;
    }
    const std::string* nodes = find(env, kEnvSlurmStepNodeList);
    if (nodes == nullptr) nodes = find(env, kEnvSlurmNodeList);
    if (nodes != nullptr) master_addr_hint = detail::first_slurm_host(*nodes);
  }
  MPU_CHECK(info.local_world_size == 0 || info.local_rank < info.local_world_size,
            "launch environment (", to_string(info.launcher), "): local rank ", info.local_rank,
            " is not below the local world size ", info.local_world_size);

  if (const std::string* addr = find(env, kEnvMasterAddr); addr != nullptr && !addr->empty()) {
    info.master_addr = *addr;
  } else if (!master_addr_hint.empty()) {
    info.master_addr = master_addr_hint;
  } else {
    MPU_CHECK(
        info.world_size == 1 || info.local_world_size == info.world_size, "launch environment (",
        to_string(info.launcher), "): ", kEnvMasterAddr, " is not set, and the ", info.world_size,
        " ranks may span several nodes (",
        info.local_world_size == 0 ? std::string("unknown") : std::to_string(info.local_world_size),
        " on this one); export ", kEnvMasterAddr,
        "=<host of rank 0> (with mpirun: -x MASTER_ADDR)");
    info.master_addr = "127.0.0.1";
  }
  if (const std::string* port = find(env, kEnvMasterPort)) {
    info.master_port = parse_int(kEnvMasterPort, *port, 1, 65535);
  }
  return info;
}

LaunchInfo launch_info_from_env() {
  Env env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const char* eq = std::strchr(*entry, '=');
    if (eq == nullptr) continue;
    env.emplace(std::string(*entry, static_cast<std::size_t>(eq - *entry)), std::string(eq + 1));
  }
  return parse_launch_env(env);
}

}  // namespace mpu
