#include "gateway/proxy/upstream.h"

#include <event2/util.h>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/server/admin_server.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace montage::gateway {

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Create(const config::Cluster& config,
                                                         size_t connections_per_host) {
  std::unique_ptr<Cluster> cluster(new Cluster(config));
  if (connections_per_host == 0) connections_per_host = 1;
  for (const config::SocketAddress& endpoint : config.endpoints) {
    const bool v6 = endpoint.address.find(':') != std::string::npos;
    const std::string host_port =
        JoinHostPort(endpoint.address, static_cast<int>(endpoint.port_value));
    const std::string target = config.type == config::Cluster::Type::kStrictDns
                                   ? absl::StrCat("dns:///", host_port)
                                   : absl::StrCat(v6 ? "ipv6:" : "ipv4:", host_port);
    std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (size_t i = 0; i < connections_per_host; ++i) {
      grpc::ChannelArguments args;
      // Each channel keeps its own connection instead of sharing the global subchannel pool.
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      // The proxy passes messages through; the backends enforce their own limits.
      args.SetMaxReceiveMessageSize(-1);
      args.SetMaxSendMessageSize(-1);
      // gRPC gives a connection attempt at least the minimum reconnect back-off to finish: that
      // is Envoy's connect_timeout. Retries of a failed connect start after 100 ms.
      args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
                  static_cast<int>(
                      std::max<int64_t>(100, absl::ToInt64Milliseconds(config.connect_timeout))));
      args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
      args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
      args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);  // retries are the route's, not gRPC's
      if (config.http2_options.keepalive_interval.has_value()) {
        args.SetInt(
            GRPC_ARG_KEEPALIVE_TIME_MS,
            static_cast<int>(absl::ToInt64Milliseconds(*config.http2_options.keepalive_interval)));
      }
      if (config.http2_options.keepalive_timeout.has_value()) {
        args.SetInt(
            GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
            static_cast<int>(absl::ToInt64Milliseconds(*config.http2_options.keepalive_timeout)));
      }
      std::shared_ptr<grpc::Channel> channel =
          grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
      stubs.push_back(std::make_unique<grpc::GenericStub>(channel));
      channels.push_back(std::move(channel));
    }
    cluster->hosts_.push_back(
        std::make_unique<UpstreamHost>(host_port, std::move(stubs), std::move(channels)));
    if (config.type == config::Cluster::Type::kStatic) {
      UpstreamHost::DirectAddress direct{};
      int length = sizeof(direct.storage);
      if (evutil_parse_sockaddr_port(host_port.c_str(),
                                     reinterpret_cast<sockaddr*>(&direct.storage), &length) == 0) {
        direct.length = static_cast<socklen_t>(length);
        cluster->hosts_.back()->direct_address_ = direct;
      }
    }
    // With active health checks a host takes traffic only once a check has passed (as in Envoy).
    if (!config.health_checks.empty()) cluster->hosts_.back()->set_failed_active_hc(true);
  }
  return cluster;
}

void ClusterStats::RecordResponse(int http_code, absl::Duration time) {
  upstream_rq_completed.fetch_add(1, std::memory_order_relaxed);
  if (http_code >= 100 && http_code < 600) {
    by_code[http_code - 100].fetch_add(1, std::memory_order_relaxed);
  }
  const double ms = absl::ToDoubleMilliseconds(time);
  size_t bucket = 0;
  while (bucket < kBuckets && ms > kTimeBucketsMs[bucket]) ++bucket;
  time_buckets[bucket].fetch_add(1, std::memory_order_relaxed);
  time_count.fetch_add(1, std::memory_order_relaxed);
  time_sum_us.fetch_add(
      static_cast<uint64_t>(std::max<int64_t>(0, absl::ToInt64Microseconds(time))),
      std::memory_order_relaxed);
}

int64_t UpstreamHost::ActiveConnections() const {
  int64_t n = direct_connections_.load(std::memory_order_relaxed);
  for (const auto& channel : channels_) {
    if (channel->GetState(/*try_to_connect=*/false) == GRPC_CHANNEL_READY) ++n;
  }
  return n;
}

int64_t Cluster::ActiveConnections() const {
  int64_t n = 0;
  for (const auto& host : hosts_) n += host->ActiveConnections();
  return n;
}

UpstreamHost* Cluster::PickHost(const UpstreamHost* avoid) {
  if (hosts_.empty()) return nullptr;
  const absl::Time now = absl::Now();
  const size_t n = hosts_.size();
  const uint64_t start = next_.fetch_add(1, std::memory_order_relaxed);
  UpstreamHost* fallback = nullptr;
  UpstreamHost* best = nullptr;
  // Round robin over the available hosts; LEAST_REQUEST takes the less busy of two of them
  // (Envoy's power of two choices).
  for (size_t i = 0; i < n; ++i) {
    UpstreamHost* h = hosts_[(start + i) % n].get();
    if (!h->Available(now)) continue;
    if (h == avoid) {
      fallback = h;
      continue;
    }
    if (best == nullptr) {
      best = h;
      if (config_.lb_policy != config::Cluster::LbPolicy::kLeastRequest) break;
      continue;
    }
    if (h->stats().rq_active.load() < best->stats().rq_active.load()) best = h;
    break;
  }
  return best != nullptr ? best : fallback;
}

int64_t Cluster::healthy_hosts() const {
  const absl::Time now = absl::Now();
  int64_t n = 0;
  for (const auto& h : hosts_) n += h->Available(now) ? 1 : 0;
  return n;
}

void Cluster::RecordHostResult(UpstreamHost& host, int http_status) {
  if (!config_.outlier_detection.has_value()) return;
  const config::OutlierDetection& od = *config_.outlier_detection;
  if (http_status < 500) {
    host.consecutive_5xx_.store(0, std::memory_order_relaxed);
    return;
  }
  const uint32_t run = host.consecutive_5xx_.fetch_add(1) + 1;
  if (run < od.consecutive_5xx || od.consecutive_5xx == 0) return;
  host.consecutive_5xx_.store(0);
  // Enforcing is a percentage: 100 always ejects, 0 never.
  if (od.enforcing_consecutive_5xx == 0) return;
  if (od.enforcing_consecutive_5xx < 100 &&
      absl::Uniform<uint32_t>(absl::BitGen(), 0, 100) >= od.enforcing_consecutive_5xx) {
    return;
  }
  const absl::Time now = absl::Now();
  int64_t ejected = 0;
  for (const auto& h : hosts_) ejected += h->Ejected(now) ? 1 : 0;
  // max_ejection_percent, but at least one host may always be ejected (as in Envoy).
  if (ejected > 0 && (ejected + 1) * 100 > static_cast<int64_t>(od.max_ejection_percent) *
                                               static_cast<int64_t>(hosts_.size())) {
    return;
  }
  const uint32_t times = host.ejections_.fetch_add(1) + 1;
  absl::Duration length = std::min(od.base_ejection_time * times,
                                   std::max(od.max_ejection_time, od.base_ejection_time));
  host.ejected_until_ns_.store(absl::ToUnixNanos(now + length));
  stats_.outlier_detection_ejections_enforced_total.fetch_add(1, std::memory_order_relaxed);
}

namespace {

// Takes one of `limit` slots counted in `in_use`; false (and one more overflow) when none is left.
bool TakeSlot(std::atomic<int64_t>& in_use, int64_t limit, std::atomic<uint64_t>& overflow) {
  if (in_use.fetch_add(1) + 1 > limit) {
    in_use.fetch_sub(1);
    overflow.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  return true;
}

}  // namespace

bool Cluster::TryStartRequest() {
  return TakeSlot(active_requests_, config_.circuit_breakers.max_requests,
                  stats_.upstream_rq_pending_overflow);
}

void Cluster::FinishRequest() { active_requests_.fetch_sub(1); }

bool Cluster::TryAddPending() {
  return TakeSlot(pending_requests_, config_.circuit_breakers.max_pending_requests,
                  stats_.upstream_rq_pending_overflow);
}

void Cluster::RemovePending() { pending_requests_.fetch_sub(1); }

bool Cluster::TryStartRetry() {
  const auto& cb = config_.circuit_breakers;
  int64_t limit = cb.max_retries;
  if (cb.retry_budget.has_value()) {
    limit = std::max<int64_t>(cb.retry_budget->min_retry_concurrency,
                              static_cast<int64_t>(cb.retry_budget->budget_percent / 100.0 *
                                                   static_cast<double>(active_requests_.load())));
  }
  if (active_retries_.fetch_add(1) + 1 > limit) {
    active_retries_.fetch_sub(1);
    stats_.upstream_rq_retry_overflow.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void Cluster::FinishRetry() { active_retries_.fetch_sub(1); }

absl::StatusOr<std::unique_ptr<ClusterManager>> ClusterManager::Create(
    const std::vector<config::Cluster>& clusters, size_t connections_per_host) {
  auto manager = std::make_unique<ClusterManager>();
  for (const config::Cluster& c : clusters) {
    absl::StatusOr<std::unique_ptr<Cluster>> cluster = Cluster::Create(c, connections_per_host);
    if (!cluster.ok()) return cluster.status();
    manager->ordered_.push_back(cluster->get());
    manager->clusters_[c.name] = *std::move(cluster);
  }
  return manager;
}

Cluster* ClusterManager::Find(absl::string_view name) const {
  auto it = clusters_.find(name);
  return it == clusters_.end() ? nullptr : it->second.get();
}

}  // namespace montage::gateway
