// Upstream clusters: the hosts of each cluster from the Envoy bootstrap, a gRPC channel per host
// (gRPC keeps the HTTP/2 connections, multiplexes and reconnects with back-off), load balancing
// and per-host request counters.
//
// Today: STATIC hosts by IP, STRICT_DNS hosts by name (gRPC's DNS resolver re-resolves them),
// ROUND_ROBIN and LEAST_REQUEST. Health checks, outlier ejection and circuit breakers are not
// built yet (issue #3 notes say what is left).
#ifndef MONTAGE_GATEWAY_PROXY_UPSTREAM_H_
#define MONTAGE_GATEWAY_PROXY_UPSTREAM_H_

#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gateway/config/bootstrap.h"
#include "grpcpp/channel.h"
#include "grpcpp/generic/generic_stub.h"

namespace montage::gateway {

// Per-host counters (Envoy's /clusters names). Thread-safe.
struct HostStats {
  std::atomic<uint64_t> rq_total{0};
  std::atomic<uint64_t> rq_success{0};
  std::atomic<uint64_t> rq_error{0};
  std::atomic<uint64_t> rq_timeout{0};
  std::atomic<int64_t> rq_active{0};
};

// Per-cluster counters under Envoy's names (cluster.<name>.upstream_rq_total, ...). Thread-safe.
struct ClusterStats {
  // upstream_rq_time buckets, in milliseconds (as Envoy's default histogram buckets).
  static constexpr double kTimeBucketsMs[] = {0.5,   1,      5,      10,      25,     50,    100,
                                              250,   500,    1000,   2500,    5000,   10000, 30000,
                                              60000, 300000, 600000, 1800000, 3600000};
  static constexpr size_t kBuckets = sizeof(kTimeBucketsMs) / sizeof(kTimeBucketsMs[0]);

  std::atomic<uint64_t> upstream_rq_total{0};
  std::atomic<int64_t> upstream_rq_active{0};
  std::atomic<uint64_t> upstream_rq_completed{0};
  std::atomic<uint64_t> upstream_rq_timeout{0};
  std::atomic<uint64_t> upstream_rq_per_try_timeout{0};
  std::atomic<uint64_t> upstream_rq_retry{0};
  std::atomic<uint64_t> upstream_rq_retry_success{0};
  std::atomic<uint64_t> upstream_rq_retry_overflow{0};
  std::atomic<uint64_t> upstream_rq_pending_overflow{0};
  std::atomic<uint64_t> upstream_cx_connect_fail{0};
  std::atomic<uint64_t> outlier_detection_ejections_enforced_total{0};
  std::atomic<uint64_t> health_check_attempt{0};
  std::atomic<uint64_t> health_check_success{0};
  std::atomic<uint64_t> health_check_failure{0};
  // By HTTP status 100..599 (index code - 100).
  std::atomic<uint64_t> by_code[500] = {};
  std::atomic<uint64_t> time_buckets[kBuckets + 1] = {};  // the last is +Inf
  std::atomic<uint64_t> time_count{0};
  std::atomic<uint64_t> time_sum_us{0};

  void RecordResponse(int http_code, absl::Duration time);
};

// One endpoint. Thread-safe.
class UpstreamHost {
 public:
  UpstreamHost(std::string address, std::vector<std::unique_ptr<grpc::GenericStub>> stubs,
               std::vector<std::shared_ptr<grpc::Channel>> channels)
      : address_(std::move(address)), stubs_(std::move(stubs)), channels_(std::move(channels)) {}
  const std::string& address() const { return address_; }
  // An IP address to connect to (STATIC hosts): unary calls then go over the worker loops' own
  // HTTP/2 connections (h2_upstream.h). Null for hosts known by name (gRPC resolves those).
  struct DirectAddress {
    sockaddr_storage storage;
    socklen_t length;
  };
  const DirectAddress* direct_address() const {
    return direct_address_.has_value() ? &*direct_address_ : nullptr;
  }
  // A stub for the caller's worker loop (each loop has its own connection to the host).
  grpc::GenericStub& stub(size_t worker) { return *stubs_[worker % stubs_.size()]; }
  std::shared_ptr<grpc::Channel> channel(size_t worker) const {
    return channels_[worker % channels_.size()];
  }
  HostStats& stats() { return stats_; }
  // Connections to this host that are up (gRPC channels in READY and direct HTTP/2 ones).
  int64_t ActiveConnections() const;

  // Health as Envoy's /clusters shows it: failed_active_hc (the active gRPC health check says
  // no) and failed_outlier_check (ejected by outlier detection until a time).
  bool failed_active_hc() const { return failed_active_hc_.load(std::memory_order_relaxed); }
  void set_failed_active_hc(bool failed) { failed_active_hc_.store(failed); }
  bool Ejected(absl::Time now) const {
    return absl::FromUnixNanos(ejected_until_ns_.load(std::memory_order_relaxed)) > now;
  }
  bool Available(absl::Time now) const { return !failed_active_hc() && !Ejected(now); }

 private:
  friend class Cluster;
  friend class H2UpstreamConnection;
  std::string address_;
  std::optional<DirectAddress> direct_address_;
  std::atomic<int64_t> direct_connections_{0};
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  HostStats stats_;
  std::atomic<bool> failed_active_hc_{false};
  std::atomic<int64_t> ejected_until_ns_{0};
  std::atomic<uint32_t> consecutive_5xx_{0};
  std::atomic<uint32_t> ejections_{0};
};

// Thread-safe.
class Cluster {
 public:
  // `connections_per_host`: channels (HTTP/2 connections) to each host, one per worker loop.
  static absl::StatusOr<std::unique_ptr<Cluster>> Create(const config::Cluster& config,
                                                         size_t connections_per_host);
  const std::string& name() const { return config_.name; }
  const config::Cluster& config() const { return config_; }
  ClusterStats& stats() { return stats_; }
  // Upstream connections that are up now (channels in READY), across hosts.
  int64_t ActiveConnections() const;
  // The next available host (healthy and not ejected) by the cluster's policy, avoiding
  // `avoid` when another is available (retries go elsewhere); nullptr when none is available.
  UpstreamHost* PickHost(const UpstreamHost* avoid = nullptr);
  // Outlier detection's input: the result of one call to `host` as an HTTP status (gRPC statuses
  // mapped by Envoy's table; 503 for a host that could not be reached). May eject the host.
  void RecordHostResult(UpstreamHost& host, int http_status);
  // Circuit breaker on active requests (max_requests). False: the caller answers 503 overflow.
  bool TryStartRequest();
  void FinishRequest();
  // Circuit breaker on requests waiting for a stream (max_pending_requests): a request the
  // upstream's SETTINGS_MAX_CONCURRENT_STREAMS holds back. False: the caller answers 503
  // overflow (counted in upstream_rq_pending_overflow).
  bool TryAddPending();
  void RemovePending();
  // Retries admitted now: the retry budget when configured (budget_percent of active requests,
  // at least min_retry_concurrency), else max_retries concurrent retries.
  bool TryStartRetry();
  void FinishRetry();
  int64_t healthy_hosts() const;
  const std::vector<std::unique_ptr<UpstreamHost>>& hosts() const { return hosts_; }

 private:
  explicit Cluster(config::Cluster config) : config_(std::move(config)) {}
  config::Cluster config_;
  std::vector<std::unique_ptr<UpstreamHost>> hosts_;
  std::atomic<uint64_t> next_{0};
  ClusterStats stats_;
  std::atomic<int64_t> active_requests_{0};
  std::atomic<int64_t> pending_requests_{0};
  std::atomic<int64_t> active_retries_{0};
};

class ClusterManager {
 public:
  static absl::StatusOr<std::unique_ptr<ClusterManager>> Create(
      const std::vector<config::Cluster>& clusters, size_t connections_per_host);
  Cluster* Find(absl::string_view name) const;
  // In bootstrap order.
  const std::vector<Cluster*>& clusters() const { return ordered_; }

 private:
  absl::flat_hash_map<std::string, std::unique_ptr<Cluster>> clusters_;
  std::vector<Cluster*> ordered_;
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_UPSTREAM_H_
