// Active gRPC health checks (grpc.health.v1.Health/Check) of every host of the clusters that
// configure them, on a loop of their own: a host failing `unhealthy_threshold` checks in a row
// stops taking traffic (failed_active_hc) until `healthy_threshold` pass again (one at start-up,
// as in Envoy). Checks use the host's own channel, so they see what traffic would see.
#ifndef MONTAGE_GATEWAY_PROXY_HEALTH_CHECKER_H_
#define MONTAGE_GATEWAY_PROXY_HEALTH_CHECKER_H_

#include <atomic>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "gateway/proxy/upstream.h"
#include "gateway/server/event_loop.h"

namespace montage::gateway {

// Start and destroy from a control thread.
class HealthChecker {
 public:
  // Starts checking every host of every cluster with health_checks (the first of them).
  static absl::StatusOr<std::unique_ptr<HealthChecker>> Start(const ClusterManager& clusters);
  // Cancels checks in flight and waits (bounded) for them, then stops the loop.
  ~HealthChecker();

 private:
  class HostCheck;
  HealthChecker() = default;

  std::unique_ptr<EventLoop> loop_;
  std::vector<std::shared_ptr<HostCheck>> checks_;
  std::atomic<int64_t> in_flight_{0};
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_HEALTH_CHECKER_H_
