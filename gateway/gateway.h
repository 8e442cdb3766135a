// The gateway: worker loops, the upstream clusters and, for each listener of the Envoy bootstrap,
// a Listener whose dispatcher routes every request. Built from a parsed bootstrap plus montage's
// own options; knows the services only through config (and, for REST, descriptors).
//
// Start and destroy from a control thread. Requests run on the worker loops.
#ifndef MONTAGE_GATEWAY_GATEWAY_H_
#define MONTAGE_GATEWAY_GATEWAY_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gateway/config/bootstrap.h"
#include "gateway/proxy/grpc_proxy.h"
#include "gateway/proxy/rest_handler.h"
#include "gateway/proxy/upstream.h"

namespace montage::gateway {

struct GatewayOptions {
  // Worker event loops for downstream connections (each also gets its own upstream connection
  // to every host).
  size_t worker_threads = 2;
  // Unary calls to hosts with an IP address go over the worker loops' own HTTP/2 connections
  // (gateway/proxy/h2_upstream.h); false sends every call through gRPC's client (for comparison
  // and tests).
  bool direct_h2_upstreams = true;
  GrpcProxyOptions proxy;
  // REST/JSON: reject JSON body fields unknown to the message (montage's option; Envoy drops
  // them), and the body limit when the transcoder filter sets none.
  bool reject_unknown_fields = false;
  size_t max_request_body_bytes = 64 << 20;
  // Callers (IP literals or IPv4 CIDRs) whose x-request-id and x-envoy-* headers are honoured;
  // everyone else's x-envoy-* headers are stripped.
  std::vector<std::string> trusted_callers;
  // When not empty, every request must carry one of these (Authorization: Bearer, x-api-key).
  std::vector<std::string> api_keys;
  // Descriptors also read from backends' server reflection (added to each transcoder filter's
  // descriptor set) at start and then every `refresh_interval`, so a schema change needs no
  // gateway rebuild or restart.
  struct ReflectionSource {
    std::string cluster;                // its first host is asked
    std::vector<std::string> services;  // empty: every service it has
  };
  std::vector<ReflectionSource> reflection;
  absl::Duration reflection_refresh = absl::Seconds(60);
  absl::Duration reflection_timeout = absl::Seconds(5);
};

class Gateway {
 public:
  static absl::StatusOr<std::unique_ptr<Gateway>> Start(config::Bootstrap bootstrap,
                                                        GatewayOptions options);
  // Closes the listeners and every connection, then stops the loops.
  ~Gateway();

  // The bound address ("host:port") of each listener, in bootstrap order.
  std::vector<std::string> listener_addresses() const;
  const config::Bootstrap& bootstrap() const;
  const ClusterManager& clusters() const;
  // The REST/JSON transcoding setup of listener `i` as it is now (null without a transcoder).
  // Shared: it stays valid for its holder after a refresh replaces it.
  std::shared_ptr<const RestSettings> rest_settings(size_t i) const;

 private:
  class Impl;
  explicit Gateway(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Parses a grpc-timeout value ("100m", "5S", up to 8 digits and one of H M S m u n).
std::optional<absl::Duration> ParseGrpcTimeout(absl::string_view value);

// The embedded default: one listener on `listen` whose routes send every path to one HTTP/2
// cluster "local" at `upstream` (host:port), with the route timeout disabled (LLM calls and
// streams last minutes; callers' deadlines still apply); gRPC-Web, and REST/JSON for every
// service of `descriptor_set` when it is not empty.
// INVALID_ARGUMENT when an address is not host:port.
absl::StatusOr<config::Bootstrap> DefaultBootstrap(const std::string& listen,
                                                   const std::string& upstream,
                                                   const std::string& descriptor_set);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_GATEWAY_H_
