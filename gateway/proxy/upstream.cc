#include "gateway/proxy/upstream.h"

#include "absl/strings/str_cat.h"
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
        v6 ? absl::StrCat("[", endpoint.address, "]:", endpoint.port_value)
           : absl::StrCat(endpoint.address, ":", endpoint.port_value);
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
  int64_t n = 0;
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

UpstreamHost* Cluster::PickHost() {
  if (hosts_.empty()) return nullptr;
  if (hosts_.size() == 1) return hosts_[0].get();
  const uint64_t n = next_.fetch_add(1, std::memory_order_relaxed);
  if (config_.lb_policy == config::Cluster::LbPolicy::kLeastRequest) {
    // Power of two choices, as Envoy's LEAST_REQUEST does by default.
    UpstreamHost* a = hosts_[n % hosts_.size()].get();
    UpstreamHost* b = hosts_[(n * 7 + 3) % hosts_.size()].get();
    return a->stats().rq_active.load() <= b->stats().rq_active.load() ? a : b;
  }
  return hosts_[n % hosts_.size()].get();
}

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
