#include "common/server/daemon.h"

#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/proto_time.h"
#include "common/status.h"
#include "common/telemetry/config.h"
#include "common/telemetry/grpc_interceptors.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/tracer.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "nlohmann/json.hpp"

namespace montage {
namespace {

LogLevel ToLogLevel(config::v1::LoggingConfig::Level level) {
  switch (level) {
    case config::v1::LoggingConfig::DEBUG:
      return LogLevel::kDebug;
    case config::v1::LoggingConfig::WARNING:
      return LogLevel::kWarning;
    case config::v1::LoggingConfig::ERROR:
      return LogLevel::kError;
    default:
      return LogLevel::kInfo;
  }
}

absl::Status WritePortFile(const std::string& path, const std::string& grpc_address,
                           const std::string& admin_address,
                           const std::vector<std::pair<std::string, std::string>>& endpoints) {
  nlohmann::json j;
  j["grpc"] = grpc_address;
  j["admin"] = admin_address;
  for (const auto& [name, address] : endpoints) j[name] = address;
  j["pid"] = static_cast<int64_t>(getpid());
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << j.dump() << "\n";
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write port file ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot rename port file into ", path));
  }
  return absl::OkStatus();
}

// "host:port" with the port the server actually bound.
std::string BoundAddress(const std::string& listen, int port) {
  auto hp = SplitHostPort(listen);
  std::string host = hp.ok() ? hp->first : "127.0.0.1";
  if (host.find(':') != std::string::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

}  // namespace

int RunDaemon(const DaemonOptions& options, absl::Span<const ServiceRegistration> registry) {
  // Every thread started from here on inherits the blocked signals; only sigwait below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A peer that closes while we write (a client giving up on a big answer) must cost an EPIPE
  // on that socket, not the process.
  signal(SIGPIPE, SIG_IGN);
  // Debian's Abseil is built without NDEBUG, so every absl::Mutex lock would also do
  // deadlock-detection bookkeeping (~14k instructions per cache Get, measured with callgrind).
  // Unit tests keep the checks; the server does not pay for them.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // Each waiting upstream call may hold a socket (an LLM call lasts minutes): use the hard limit
  // on open files rather than the often small soft one.
  rlimit files{};
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &files);
  }

  absl::StatusOr<config::Config> loaded = config::LoadConfig(options.config);
  if (!loaded.ok()) {
    LogError("invalid configuration", {{"error", std::string(loaded.status().message())}});
    return 2;
  }
  config::Config config = *std::move(loaded);
  if (!options.listen.empty()) config.mutable_server()->set_listen(options.listen);
  if (!options.admin_listen.empty())
    config.mutable_server()->set_admin_listen(options.admin_listen);
  if (absl::Status valid = config::Validate(config); !valid.ok()) {
    LogError("invalid configuration", {{"error", std::string(valid.message())}});
    return 2;
  }

  const std::string process_name =
      absl::StrCat("montaged[", absl::StrJoin(options.services, ","), "]");
  ConfigureLogging(ToLogLevel(config.logging().level()),
                   config.logging().format() == config::v1::LoggingConfig::JSON, process_name);
  absl::StatusOr<telemetry::TracerOptions> tracer_options = telemetry::TracerOptionsFromConfig(
      config.tracing(), absl::StrCat("montage-", absl::StrJoin(options.services, "-")));
  absl::Status tracer_status = tracer_options.ok()
                                   ? telemetry::ConfigureGlobalTracer(*std::move(tracer_options))
                                   : tracer_options.status();
  if (!tracer_status.ok()) {
    LogError("invalid tracing configuration", {{"error", std::string(tracer_status.message())}});
    return 2;
  }

  absl::StatusOr<std::unique_ptr<AdminServer>> admin =
      AdminServer::Start(config.server().admin_listen());
  if (!admin.ok()) {
    LogError("cannot start the admin server", {{"error", std::string(admin.status().message())}});
    return 1;
  }

  std::atomic<int> state{0};  // 0 starting, 1 live, 2 draining
  (*admin)->Handle("/healthz", [](const AdminRequest&) {
    return AdminResponse{200, "text/plain", "OK\n"};
  });
  (*admin)->Handle("/ready", [&state](const AdminRequest&) {
    switch (state.load()) {
      case 1:
        return AdminResponse{200, "text/plain", "LIVE\n"};
      case 2:
        return AdminResponse{503, "text/plain", "DRAINING\n"};
      default:
        return AdminResponse{503, "text/plain", "PRE_INITIALIZING\n"};
    }
  });
  (*admin)->Handle("/debug/traces", [](const AdminRequest& req) {
    size_t limit = 200;
    if (auto it = req.query.find("limit"); it != req.query.end()) {
      limit = std::min<size_t>(std::max(1, std::atoi(it->second.c_str())), 10000);
    }
    return AdminResponse{200, "application/json",
                         telemetry::GlobalTracer().RecentTracesJson(limit)};
  });
  (*admin)->Handle("/config_dump", [&config](const AdminRequest&) {
    return AdminResponse{200, "application/json", config::ConfigToJson(config)};
  });

  ThreadPool executor(config.server().executor_threads(), 10'000, "montage-cpu");
  ServiceContext context{config, RealClock(), executor, **admin};

  std::vector<std::unique_ptr<ServiceModule>> modules;
  for (const std::string& name : options.services) {
    const ServiceRegistration* reg = nullptr;
    for (const auto& r : registry) {
      if (r.name == name) reg = &r;
    }
    if (reg == nullptr) {
      LogError("unknown service", {{"service", name}});
      return 2;
    }
    absl::StatusOr<std::unique_ptr<ServiceModule>> module = reg->factory(context);
    if (!module.ok()) {
      LogError("service failed to start",
               {{"service", name}, {"error", std::string(module.status().message())}});
      return 1;
    }
    modules.push_back(*std::move(module));
  }

  (*admin)->Handle("/metrics", [&modules](const AdminRequest&) {
    for (auto& module : modules) module->RefreshMetrics();
    return AdminResponse{200, "text/plain; version=0.0.4; charset=utf-8",
                         telemetry::RenderPrometheusText()};
  });

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  builder.AddListeningPort(config.server().listen(), grpc::InsecureServerCredentials(), &grpc_port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.server().max_receive_message_bytes()));
  builder.SetMaxSendMessageSize(static_cast<int>(config.server().max_send_message_bytes()));
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(telemetry::MakeServerTelemetryInterceptorFactory(
      telemetry::GlobalTracer(), telemetry::MetricsRegistry()));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  std::vector<std::string> health_names;
  for (auto& module : modules) {
    for (grpc::Service* service : module->GrpcServices()) builder.RegisterService(service);
    for (const std::string& n : module->HealthNames()) health_names.push_back(n);
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    LogError("cannot listen for gRPC", {{"listen", config.server().listen()}});
    (*admin)->Stop();
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  for (const std::string& n : health_names) health->SetServingStatus(n, true);
  health->SetServingStatus(true);

  const std::string grpc_address = BoundAddress(config.server().listen(), grpc_port);
  std::vector<std::pair<std::string, std::string>> endpoints;
  for (auto& module : modules) {
    if (absl::Status s = module->OnServing(grpc_address, endpoints); !s.ok()) {
      LogError("service failed to start", {{"error", std::string(s.message())}});
      server->Shutdown(absl::ToChronoTime(absl::Now()));
      server->Wait();
      for (auto& m : modules) m->Stop();
      (*admin)->Stop();
      return 1;
    }
  }
  if (!options.port_file.empty()) {
    if (absl::Status s =
            WritePortFile(options.port_file, grpc_address, (*admin)->address(), endpoints);
        !s.ok()) {
      LogError("cannot write the port file", {{"error", std::string(s.message())}});
      (*admin)->Stop();
      return 1;
    }
  }
  state.store(1);
  LogInfo("montaged serving", {{"services", absl::StrJoin(options.services, ",")},
                               {"grpc", grpc_address},
                               {"admin", (*admin)->address()}});

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  const absl::Duration drain = FromProtoDuration(config.server().drain_timeout());
  LogInfo("draining", {{"signal", signal_number == SIGTERM ? "SIGTERM" : "SIGINT"},
                       {"deadline_ms", absl::ToInt64Milliseconds(drain)}});
  state.store(2);
  health->SetServingStatus(false);
  for (auto& module : modules) module->OnDraining();
  const absl::Time drain_start = absl::Now();
  // Waits for in-flight calls until the deadline, then cancels the rest.
  server->Shutdown(absl::ToChronoTime(drain_start + drain));
  server->Wait();
  LogInfo("gRPC server drained", {{"ms", absl::ToInt64Milliseconds(absl::Now() - drain_start)}});
  for (auto& module : modules) module->Stop();
  (*admin)->Stop();  // before the modules go: its handlers reach into them
  modules.clear();
  executor.Shutdown();
  telemetry::ShutdownGlobalTracer();
  LogInfo("stopped", {{"drain_ms", absl::ToInt64Milliseconds(absl::Now() - drain_start)}});
  return 0;
}

}  // namespace montage
