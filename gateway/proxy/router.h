// Route selection from an Envoy route_config: the virtual host by :authority (exact, then
// "*.suffix", then "prefix.*", then "*"), then the first route whose match (prefix, path or
// safe_regex, headers, grpc) accepts the request. Immutable after Create; thread-safe.
#ifndef MONTAGE_GATEWAY_PROXY_ROUTER_H_
#define MONTAGE_GATEWAY_PROXY_ROUTER_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "gateway/config/bootstrap.h"
#include "gateway/proxy/unary_exchange.h"
#include "gateway/proxy/upstream.h"
#include "gateway/server/http_stream.h"

namespace re2 {
class RE2;
}

namespace montage::gateway {

struct RouteEntry {
  const config::Route* route = nullptr;
  Cluster* cluster = nullptr;
  std::shared_ptr<const RetrySettings> retry;  // from the route's retry_policy
};

class Router {
 public:
  // The route configuration must outlive the router. INVALID_ARGUMENT for a bad regex or a
  // cluster that does not exist.
  static absl::StatusOr<std::unique_ptr<Router>> Create(const config::RouteConfiguration& config,
                                                        const ClusterManager& clusters);
  ~Router();

  // `path` is the request path without its query string; `grpc` whether the request carries a
  // gRPC content type. nullptr when nothing matches.
  const RouteEntry* Match(const RequestHead& head, absl::string_view path, bool grpc) const;

 private:
  struct CompiledRoute {
    RouteEntry entry;
    std::unique_ptr<re2::RE2> path_regex;
    std::vector<std::unique_ptr<re2::RE2>> header_regexes;  // one per header matcher (or null)
  };
  struct CompiledHost {
    const config::VirtualHost* config = nullptr;
    std::vector<CompiledRoute> routes;
  };
  Router() = default;
  const CompiledHost* FindHost(absl::string_view authority) const;
  static bool HeadersMatch(const CompiledRoute& route, const HeaderList& headers);

  std::vector<CompiledHost> hosts_;
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_ROUTER_H_
