// montaged's life cycle, shared by `montaged <service>` and `montaged all`: load and validate the
// config, start the admin server, build the requested service modules, serve gRPC with health,
// reflection and telemetry, write the port file, then on SIGTERM/SIGINT drain within the
// configured deadline and stop cleanly.
#ifndef MONTAGE_COMMON_SERVER_DAEMON_H_
#define MONTAGE_COMMON_SERVER_DAEMON_H_

#include <string>
#include <vector>

#include "absl/types/span.h"
#include "common/config.h"
#include "common/server/service_module.h"

namespace montage {

struct DaemonOptions {
  // Services to run, by registration name (already expanded from "all").
  std::vector<std::string> services;
  config::LoadOptions config;
  // Flag overrides applied after the config (empty means keep).
  std::string listen;
  std::string admin_listen;
  // When set, {"grpc": "host:port", "admin": "host:port", "pid": N} is written here (atomically)
  // once everything serves; tests and scripts read the chosen ports from it.
  std::string port_file;
};

// Runs until SIGTERM or SIGINT; returns the process exit code (0 after a clean drain). Must be
// called from main before any other thread starts (it blocks the signals for every thread).
int RunDaemon(const DaemonOptions& options, absl::Span<const ServiceRegistration> registry);

}  // namespace montage

#endif  // MONTAGE_COMMON_SERVER_DAEMON_H_
