#include "gateway/gateway_service.h"

#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/telemetry/grpc_interceptors.h"
#include "gateway/admin_pages.h"
#include "gateway/batch/batch_service.h"
#include "gateway/config/bootstrap.h"
#include "gateway/gateway.h"
#include "gateway/proxy/rest_handler.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "montage/gateway/v1/batch.grpc.pb.h"

namespace montage::gateway {
namespace {

BatchOptions BatchOptionsFrom(const montage::config::v1::GatewayConfig& config) {
  BatchOptions options;
  options.default_max_concurrency = config.batch_max_concurrency();
  options.max_concurrency = std::max(config.batch_max_concurrency(), uint32_t{1000});
  options.max_items = config.batch_max_items();
  return options;
}

// Owns the gateway. The listeners open once the process's gRPC server serves (the embedded
// default routes to it), and close before the server drains.
class GatewayModule final : public ServiceModule {
 public:
  GatewayModule(const montage::config::v1::GatewayConfig& config,
                std::optional<config::Bootstrap> bootstrap, AdminServer& admin)
      : config_(config), bootstrap_(std::move(bootstrap)), batch_(BatchOptionsFrom(config)) {
    // (batch_rest_ is set once the listeners are known, in OnServing.)
    RegisterAdminPages(
        admin, [this] { return Current(); }, [] { return std::string("LIVE"); });
  }

  std::vector<grpc::Service*> GrpcServices() override { return {&batch_}; }
  std::vector<std::string> HealthNames() const override {
    return {std::string(v1::BatchService::service_full_name())};
  }

  absl::Status OnServing(absl::string_view grpc_address,
                         std::vector<std::pair<std::string, std::string>>& endpoints) override {
    absl::StatusOr<config::Bootstrap> bootstrap_or =
        bootstrap_.has_value()
            ? *bootstrap_
            : DefaultBootstrap(config_.listen(), std::string(grpc_address), DescriptorSet());
    if (!bootstrap_or.ok()) return bootstrap_or.status();
    config::Bootstrap bootstrap = *std::move(bootstrap_or);
    GatewayOptions options;
    options.worker_threads = config_.worker_threads();
    options.direct_h2_upstreams = !config_.unary_via_grpc_client();
    options.proxy.max_message_bytes = config_.max_request_message_bytes();
    options.reject_unknown_fields = config_.reject_unknown_fields();
    options.trusted_callers.assign(config_.trusted_callers().begin(),
                                   config_.trusted_callers().end());
    if (config_.has_api_keys()) {
      absl::StatusOr<std::string> keys = montage::config::ResolveSecret(config_.api_keys());
      if (!keys.ok()) {
        return absl::Status(keys.status().code(),
                            absl::StrCat("gateway.api_keys: ", keys.status().message()));
      }
      for (absl::string_view key : absl::StrSplit(*keys, absl::ByAnyChar(",\n"))) {
        key = absl::StripAsciiWhitespace(key);
        if (!key.empty()) options.api_keys.emplace_back(key);
      }
      if (options.api_keys.empty()) {
        return absl::InvalidArgumentError("gateway.api_keys: the secret holds no key");
      }
    }
    for (const auto& source : config_.reflection()) {
      options.reflection.push_back(
          {source.cluster(), {source.services().begin(), source.services().end()}});
    }
    options.reflection_refresh = absl::Seconds(config_.reflection_refresh_interval().seconds()) +
                                 absl::Nanoseconds(config_.reflection_refresh_interval().nanos());
    absl::StatusOr<std::unique_ptr<Gateway>> gateway =
        Gateway::Start(std::move(bootstrap), options);
    if (!gateway.ok()) {
      return absl::Status(gateway.status().code(),
                          absl::StrCat("gateway: ", gateway.status().message()));
    }
    std::shared_ptr<Gateway> running = *std::move(gateway);
    {
      absl::MutexLock lock(&mu_);
      gateway_ = running;
    }
    const std::vector<std::string> addresses = running->listener_addresses();
    // The batch service's items come back through the first cleartext listener with a
    // transcoder; the module keeps that listener's settings (shared) as long as the service.
    for (size_t i = 0; i < addresses.size() && batch_rest_ == nullptr; ++i) {
      if (running->bootstrap().listeners[i].tls.has_value()) continue;
      batch_rest_ = running->rest_settings(i);
      if (batch_rest_ == nullptr) continue;
      // A listener bound to every address is reached on loopback.
      std::string target = addresses[i];
      if (absl::StartsWith(target, "0.0.0.0:")) target = "127.0.0.1:" + target.substr(8);
      if (absl::StartsWith(target, "[::]:")) target = "[::1]:" + target.substr(5);
      grpc::ChannelArguments args;
      args.SetMaxReceiveMessageSize(static_cast<int>(config_.max_request_message_bytes()));
      batch_.SetTarget(
          telemetry::CreateTracedChannel(target, grpc::InsecureChannelCredentials(), args),
          BatchTranscoding{batch_rest_->table.get(), batch_rest_->transcoder.get(),
                           batch_rest_->request, batch_rest_->print});
    }
    for (size_t i = 0; i < addresses.size(); ++i) {
      endpoints.emplace_back(i == 0 ? "gateway" : absl::StrCat("gateway_", i), addresses[i]);
      LogInfo("gateway listening",
              {{"listener", running->bootstrap().listeners[i].name}, {"address", addresses[i]}});
    }
    // Envoy's admin.address: the gateway's pages on a port of their own too.
    if (running->bootstrap().admin.has_value()) {
      const config::SocketAddress& a = running->bootstrap().admin->address;
      absl::StatusOr<std::unique_ptr<AdminServer>> admin =
          AdminServer::Start(JoinHostPort(a.address, static_cast<int>(a.port_value)));
      if (!admin.ok()) {
        return absl::Status(admin.status().code(),
                            absl::StrCat("gateway admin: ", admin.status().message()));
      }
      envoy_admin_ = *std::move(admin);
      RegisterAdminPages(
          *envoy_admin_, [this] { return Current(); }, [] { return std::string("LIVE"); });
      envoy_admin_->Handle("/ready", [this](const AdminRequest&) {
        return Current() != nullptr ? AdminResponse{200, "text/plain", "LIVE\n"}
                                    : AdminResponse{503, "text/plain", "DRAINING\n"};
      });
      endpoints.emplace_back("gateway_admin", envoy_admin_->address());
    }
    return absl::OkStatus();
  }

  // New calls stop at once; the listeners close before the gRPC server drains.
  void OnDraining() override { Release(); }
  void Stop() override {
    Release();
    if (envoy_admin_ != nullptr) envoy_admin_->Stop();
  }

 private:
  std::shared_ptr<const Gateway> Current() {
    absl::MutexLock lock(&mu_);
    return gateway_;
  }
  void Release() {
    std::shared_ptr<Gateway> gateway;
    {
      absl::MutexLock lock(&mu_);
      gateway.swap(gateway_);
    }
    gateway.reset();  // joins the gateway's threads (an admin page may hold it a moment longer)
  }

  // REST/JSON for the embedded default: the configured descriptor set, else the one this build
  // wrote (or installed), when it exists.
  std::string DescriptorSet() const {
    if (!config_.descriptor_set().empty()) return config_.descriptor_set();
    for (const char* candidate : {MONTAGE_BUILD_DESCRIPTOR_SET, MONTAGE_INSTALLED_DESCRIPTOR_SET}) {
      if (access(candidate, R_OK) == 0) return candidate;
    }
    LogWarning("gateway: no descriptor set found; REST/JSON is off (set gateway.descriptor_set)");
    return "";
  }

  const montage::config::v1::GatewayConfig config_;
  const std::optional<config::Bootstrap> bootstrap_;
  std::shared_ptr<const RestSettings> batch_rest_;  // outlives every batch (destroyed after batch_)
  BatchServiceImpl batch_;
  absl::Mutex mu_;
  std::shared_ptr<Gateway> gateway_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<AdminServer> envoy_admin_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGatewayModule(ServiceContext& context) {
  const montage::config::v1::GatewayConfig& config = context.config.gateway();
  std::optional<config::Bootstrap> bootstrap;
  if (!config.envoy_bootstrap().empty()) {
    // Read at start so that a bad file stops the daemon before anything listens.
    absl::StatusOr<config::Bootstrap> loaded = config::LoadBootstrapFile(config.envoy_bootstrap());
    if (!loaded.ok()) return loaded.status();
    bootstrap = *std::move(loaded);
  }
  return std::make_unique<GatewayModule>(config, std::move(bootstrap), context.admin);
}

}  // namespace montage::gateway
