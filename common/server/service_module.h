// How a service plugs into montaged. Each service folder offers one factory returning a
// ServiceModule; montaged's main lists the factories by name (explicit registration, no static
// initialisers). A module owns its engine, its gRPC service objects and its background tasks.
#ifndef MONTAGE_COMMON_SERVER_SERVICE_MODULE_H_
#define MONTAGE_COMMON_SERVER_SERVICE_MODULE_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/executor.h"
#include "common/server/admin_server.h"
#include "grpcpp/impl/codegen/service_type.h"

namespace montage {

// What the daemon hands every module. Outlives the module.
struct ServiceContext {
  const config::Config& config;
  Clock& clock;
  // Bounded pool for CPU work and blocking file I/O (never the gRPC threads).
  Executor& executor;
  // To add admin pages.
  AdminServer& admin;
};

class ServiceModule {
 public:
  virtual ~ServiceModule() = default;
  // The gRPC services to register (owned by the module).
  virtual std::vector<grpc::Service*> GrpcServices() = 0;
  // Full names reported through grpc.health.v1 (e.g. "montage.cache.v1.CacheService").
  virtual std::vector<std::string> HealthNames() const = 0;
  // Called on the admin thread just before /metrics is rendered, so gauges read from the engine
  // are exact at scrape time. Must be quick and thread-safe.
  virtual void RefreshMetrics() {}
  // The gRPC server is serving at `grpc_address` (host:port). A module that opens listeners of
  // its own (the gateway) starts them here and adds "name" → "host:port" to `endpoints`, which
  // the port file reports. An error stops the daemon.
  virtual absl::Status OnServing(absl::string_view grpc_address,
                                 std::vector<std::pair<std::string, std::string>>& endpoints) {
    return absl::OkStatus();
  }
  // SIGTERM arrived: the server stops taking calls next. Wake anything waiting on a long timer.
  virtual void OnDraining() {}
  // After the gRPC server has stopped: stop background tasks, persist state.
  virtual void Stop() {}
};

using ServiceFactory = absl::StatusOr<std::unique_ptr<ServiceModule>> (*)(ServiceContext&);

struct ServiceRegistration {
  absl::string_view name;
  absl::string_view description;
  ServiceFactory factory;
};

}  // namespace montage

#endif  // MONTAGE_COMMON_SERVER_SERVICE_MODULE_H_
