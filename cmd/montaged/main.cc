// montaged: runs one montage service, or all of them in one process (the embedded default).
//
//   montaged all                          every service on one gRPC port, one admin port
//   montaged cache --listen=0.0.0.0:50051 one service (as containers and Kubernetes run it)
//
// The list below is the whole registration: what montaged can run is exactly what it names.
#include <unistd.h>

#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/server/daemon.h"
#include "gateway/gateway_service.h"
#include "services/analytics/analytics_service.h"
#include "services/cache/cache_service.h"
#include "services/generation/generation_service.h"
#include "services/render/render_service.h"
#include "services/speech/espeak_pool.h"
#include "services/speech/espeak_worker.h"
#include "services/speech/speech_service.h"

ABSL_FLAG(std::string, config, "", "YAML config file (defaults apply when empty)");
ABSL_FLAG(std::string, listen, "", "gRPC listen address, overriding server.listen");
ABSL_FLAG(std::string, admin_listen, "", "admin HTTP address, overriding server.admin_listen");
ABSL_FLAG(std::string, port_file, "",
          "write {\"grpc\": host:port, \"admin\": host:port, \"pid\": N} here once serving");

namespace {

constexpr montage::ServiceRegistration kServices[] = {
    {"cache", "TTL cache with byte budgets, namespaces and single-flight leases",
     &montage::cache::NewCacheModule},
    {"generation", "LLM scripts, titles, hooks, posts (issue #4)",
     &montage::generation::NewGenerationModule},
    {"speech", "text to speech: espeak-ng in process, OpenAI-compatible TTS",
     &montage::speech::NewSpeechModule},
    {"analytics", "channel, keyword and trend analysis (roadmap)",
     &montage::analytics::NewAnalyticsModule},
    {"render", "timelines to video (roadmap)", &montage::render::NewRenderModule},
    {"gateway", "REST/JSON, gRPC-Web and fan-out (issue #3)", &montage::gateway::NewGatewayModule},
};

// The espeak pool's workers: montage-espeak-worker beside this executable (installed and built
// together), which starts in milliseconds; else this program again (`montaged espeak-worker`),
// which works anywhere but spends a tenth of a second loading montaged's libraries first.
std::vector<std::string> FindEspeakWorker() {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    std::string path(self, static_cast<size_t>(n));
    path.resize(path.rfind('/') + 1);
    path += "montage-espeak-worker";
    if (access(path.c_str(), X_OK) == 0) return {path};
  }
  return {"/proc/self/exe", "espeak-worker"};
}

std::string Usage() {
  std::string usage =
      "usage: montaged <service|all> [--config=FILE] [--listen=HOST:PORT] "
      "[--admin_listen=HOST:PORT] [--port_file=FILE] [--set key.path=value]...\n\nservices:\n";
  absl::StrAppend(&usage, "  all          every service below in one process\n");
  for (const auto& s : kServices) {
    absl::StrAppend(&usage, "  ", s.name, std::string(13 - s.name.size(), ' '), s.description,
                    "\n");
  }
  return usage;
}

}  // namespace

int main(int argc, char** argv) {
  // A worker process of the speech service's espeak pool (started by montaged itself):
  // `montaged espeak-worker [DATA_PATH]`, frames on stdin/stdout.
  if (argc >= 2 && std::strcmp(argv[1], "espeak-worker") == 0) {
    return montage::speech::RunEspeakWorker(argc >= 3 ? argv[2] : "");
  }
  montage::speech::SetEspeakWorkerCommand(FindEspeakWorker());
  absl::SetProgramUsageMessage(Usage());
  // --set may repeat and its values may contain commas, so it is taken out before absl's parser.
  std::vector<std::string> overrides;
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--set=", 6) == 0) {
      overrides.emplace_back(argv[i] + 6);
    } else if (std::strcmp(argv[i], "--set") == 0 && i + 1 < argc) {
      overrides.emplace_back(argv[++i]);
    } else {
      rest.push_back(argv[i]);
    }
  }
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(rest.size()), rest.data());
  if (positional.size() != 2) {
    std::cerr << Usage();
    return 2;
  }
  const std::string which = positional[1];
  montage::DaemonOptions options;
  if (which == "all") {
    for (const auto& s : kServices) options.services.emplace_back(s.name);
  } else {
    bool known = false;
    for (const auto& s : kServices) known = known || s.name == which;
    if (!known) {
      std::cerr << "montaged: unknown service '" << which << "'\n\n" << Usage();
      return 2;
    }
    options.services.push_back(which);
  }
  options.config.path = absl::GetFlag(FLAGS_config);
  options.config.environment = montage::config::ProcessEnvironment();
  options.config.overrides = std::move(overrides);
  options.listen = absl::GetFlag(FLAGS_listen);
  options.admin_listen = absl::GetFlag(FLAGS_admin_listen);
  options.port_file = absl::GetFlag(FLAGS_port_file);
  return montage::RunDaemon(options, kServices);
}
