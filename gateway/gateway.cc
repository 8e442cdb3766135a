#include "gateway/gateway.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <signal.h>

#include <atomic>
#include <future>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/server/admin_server.h"
#include "common/telemetry/trace_context.h"
#include "common/telemetry/tracer.h"
#include "gateway/proxy/h2_upstream.h"
#include "gateway/proxy/health_checker.h"
#include "gateway/proxy/rest_handler.h"
#include "gateway/proxy/router.h"
#include "gateway/proxy/upstream.h"
#include "gateway/reflection/reflection_client.h"
#include "gateway/server/event_loop.h"
#include "gateway/server/listener.h"

namespace montage::gateway {
namespace {

// Request headers that never become upstream gRPC metadata: hop-by-hop fields, what gRPC sets
// itself, and gRPC-Web's own.
bool IsDroppedRequestHeader(absl::string_view name) {
  return name == "connection" || name == "keep-alive" || name == "te" ||
         name == "transfer-encoding" || name == "upgrade" || name == "proxy-connection" ||
         name == "content-type" || name == "content-length" || name == "user-agent" ||
         name == "host" || name == "accept-encoding" || name == "grpc-timeout" ||
         name == "grpc-encoding" || name == "grpc-accept-encoding" || name == "x-grpc-web" ||
         name == "x-user-agent" || absl::StartsWith(name, "x-envoy-");
}

// What gRPC accepts as metadata (anything else makes it fail the call): keys of [0-9a-z-_.],
// and printable ASCII values unless the key ends in "-bin".
bool IsLegalMetadataKey(absl::string_view key) {
  if (key.empty()) return false;
  for (char c : key) {
    if (!(absl::ascii_isdigit(c) || (c >= 'a' && c <= 'z') || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}
bool IsLegalMetadataValue(absl::string_view value) {
  for (char c : value) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

// An IPv4 or IPv6 literal, or an IPv4 CIDR ("10.0.0.0/8"), against the peer.
bool MatchesCaller(absl::string_view rule, absl::string_view ip) {
  const size_t slash = rule.find('/');
  if (slash == absl::string_view::npos) return rule == ip;
  int bits = 0;
  in_addr net{}, peer{};
  if (!absl::SimpleAtoi(rule.substr(slash + 1), &bits) || bits < 0 || bits > 32) return false;
  const std::string net_text(rule.substr(0, slash));
  const std::string peer_text(ip);
  if (inet_pton(AF_INET, net_text.c_str(), &net) != 1 ||
      inet_pton(AF_INET, peer_text.c_str(), &peer) != 1) {
    return false;
  }
  const uint32_t mask = bits == 0 ? 0 : htonl(~uint32_t{0} << (32 - bits));
  return (net.s_addr & mask) == (peer.s_addr & mask);
}

std::string NewRequestId() {
  static thread_local absl::BitGen gen;
  const uint64_t hi = absl::Uniform<uint64_t>(gen);
  const uint64_t lo = absl::Uniform<uint64_t>(gen);
  // A version-4 UUID.
  return absl::StrFormat("%08x-%04x-4%03x-%04x-%012x", hi >> 32, (hi >> 16) & 0xffff, hi & 0x0fff,
                         ((lo >> 48) & 0x3fff) | 0x8000, lo & 0xffffffffffffULL);
}

absl::string_view PathWithoutQuery(absl::string_view path) {
  const size_t q = path.find('?');
  return q == absl::string_view::npos ? path : path.substr(0, q);
}

}  // namespace

std::optional<absl::Duration> ParseGrpcTimeout(absl::string_view value) {
  if (value.size() < 2 || value.size() > 9) return std::nullopt;
  int64_t amount = 0;
  if (!absl::SimpleAtoi(value.substr(0, value.size() - 1), &amount) || amount < 0) {
    return std::nullopt;
  }
  for (char c : value.substr(0, value.size() - 1)) {
    if (!absl::ascii_isdigit(c)) return std::nullopt;
  }
  switch (value.back()) {
    case 'H':
      return absl::Hours(amount);
    case 'M':
      return absl::Minutes(amount);
    case 'S':
      return absl::Seconds(amount);
    case 'm':
      return absl::Milliseconds(amount);
    case 'u':
      return absl::Microseconds(amount);
    case 'n':
      return absl::Nanoseconds(amount);
    default:
      return std::nullopt;
  }
}

absl::StatusOr<config::Bootstrap> DefaultBootstrap(const std::string& listen,
                                                   const std::string& upstream,
                                                   const std::string& descriptor_set) {
  absl::StatusOr<std::pair<std::string, int>> up = SplitHostPort(upstream);
  absl::StatusOr<std::pair<std::string, int>> down = SplitHostPort(listen);
  if (!up.ok()) return up.status();
  if (!down.ok()) return down.status();
  config::Bootstrap b;
  config::Cluster local;
  local.name = "local";
  local.type = config::Cluster::Type::kStatic;
  local.http2 = true;
  // The process's own port, reached on loopback when it listens on every address.
  std::string host = up->first;
  if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
  if (host == "::") host = "::1";
  local.endpoints.push_back({host, static_cast<uint32_t>(up->second)});
  b.clusters.push_back(local);

  config::Listener listener;
  listener.name = "montage";
  listener.address.address = down->first;
  listener.address.port_value = static_cast<uint32_t>(down->second);
  listener.http.stat_prefix = "montage";
  config::VirtualHost vh;
  vh.name = "montage";
  vh.domains = {"*"};
  config::Route route;
  route.name = "everything";
  route.match.kind = config::RouteMatch::Kind::kPrefix;
  route.match.value = "/";
  route.route.cluster = "local";
  route.route.timeout = absl::ZeroDuration();
  vh.routes.push_back(route);
  listener.http.route_config.name = "montage";
  listener.http.route_config.virtual_hosts.push_back(vh);
  config::HttpFilter grpc_web;
  grpc_web.name = "envoy.filters.http.grpc_web";
  grpc_web.type = config::HttpFilter::Type::kGrpcWeb;
  config::HttpFilter router;
  router.name = "envoy.filters.http.router";
  router.type = config::HttpFilter::Type::kRouter;
  listener.http.http_filters = {grpc_web};
  if (!descriptor_set.empty()) {
    config::HttpFilter transcoder;
    transcoder.name = "envoy.filters.http.grpc_json_transcoder";
    transcoder.type = config::HttpFilter::Type::kGrpcJsonTranscoder;
    transcoder.transcoder.proto_descriptor = descriptor_set;
    transcoder.transcoder.convert_grpc_status = true;
    transcoder.transcoder.request_validation_options.reject_unknown_method = true;
    transcoder.transcoder.request_validation_options.reject_unknown_query_parameters = true;
    listener.http.http_filters.push_back(transcoder);
  }
  listener.http.http_filters.push_back(router);
  b.listeners.push_back(listener);
  return b;
}

// Routes the requests of one listener.
class ListenerDispatcher final : public StreamDispatcher {
 public:
  ListenerDispatcher(const config::Listener& config, std::unique_ptr<Router> router,
                     std::shared_ptr<const RestSettings> rest,
                     const absl::flat_hash_map<EventLoop*, size_t>& worker_index,
                     const std::vector<std::unique_ptr<H2UpstreamPool>>& h2_pools,
                     const GatewayOptions& options, std::atomic<int64_t>& live_calls)
      : live_calls_(live_calls),
        config_(config),
        router_(std::move(router)),
        rest_(std::move(rest)),
        worker_index_(worker_index),
        h2_pools_(h2_pools),
        options_(options),
        api_keys_(options.api_keys.begin(), options.api_keys.end()) {
    for (const config::HttpFilter& f : config.http.http_filters) {
      if (f.type == config::HttpFilter::Type::kGrpcWeb) grpc_web_ = true;
    }
  }

  std::unique_ptr<StreamHandler> Dispatch(ServerStream& stream) override {
    const RequestHead& head = stream.head();
    const std::string* content_type = FindHeader(head.headers, "content-type");
    std::optional<GrpcWireMode> mode =
        content_type != nullptr ? GrpcWireModeOf(*content_type) : std::nullopt;
    if (!api_keys_.empty() && !HasValidKey(head)) {
      constexpr absl::string_view kWhy =
          "missing or unknown API key: send Authorization: Bearer <key> or x-api-key: <key>";
      if (mode.has_value()) {
        SendLocalGrpcStatus(stream, *mode, grpc::StatusCode::UNAUTHENTICATED, kWhy);
      } else {
        SendLocalText(stream, 401, absl::StrCat(kWhy, "\n"),
                      {{"www-authenticate", "Bearer realm=\"montage\""}});
      }
      return nullptr;
    }
    if (!mode.has_value()) return DispatchRest(stream);
    return DispatchGrpc(stream, *mode);
  }

 private:
  bool HasValidKey(const RequestHead& head) const {
    if (const std::string* key = FindHeader(head.headers, "x-api-key")) {
      return api_keys_.contains(*key);
    }
    if (const std::string* auth = FindHeader(head.headers, "authorization")) {
      absl::string_view value(*auth);
      if (absl::ConsumePrefix(&value, "Bearer ") || absl::ConsumePrefix(&value, "bearer ")) {
        return api_keys_.contains(absl::StripAsciiWhitespace(value));
      }
    }
    return false;
  }

  // What every upstream call needs, or an answer already sent (nullopt).
  struct Prepared {
    UpstreamCallParams params;
    HostStats* stats = nullptr;
    ClusterStats* cluster_stats = nullptr;
    Cluster* cluster = nullptr;
    UpstreamHost* host = nullptr;
    std::shared_ptr<telemetry::Span> span;  // the downstream request's
    std::string request_id;
  };

  std::optional<Prepared> Prepare(ServerStream& stream, const RouteEntry& route,
                                  absl::string_view grpc_path,
                                  std::optional<absl::Duration> caller_timeout,
                                  const std::function<void(grpc::StatusCode, std::string)>& fail) {
    const RequestHead& head = stream.head();
    bool trusted = false;
    for (const std::string& rule : options_.trusted_callers) {
      trusted = trusted || MatchesCaller(rule, head.peer_ip);
    }
    UpstreamHost* host = route.cluster->PickHost();
    if (host == nullptr) {
      fail(grpc::StatusCode::UNAVAILABLE,
           absl::StrCat("no healthy upstream in cluster ", route.cluster->name()));
      return std::nullopt;
    }
    if (!route.cluster->TryStartRequest()) {
      fail(grpc::StatusCode::UNAVAILABLE,
           absl::StrCat("cluster ", route.cluster->name(), " is at its max_requests limit (",
                        route.cluster->config().circuit_breakers.max_requests,
                        " active requests); try again later"));
      return std::nullopt;
    }
    // The deadline: the earlier of the route's timeout and the caller's. A trusted caller may
    // replace the route's timeout and retry policy with Envoy's x-envoy-* headers.
    absl::Time deadline = absl::InfiniteFuture();
    const absl::Time now = absl::Now();
    absl::Duration route_timeout = route.route->route.timeout;
    std::shared_ptr<const RetrySettings> retry = route.retry;
    if (trusted) {
      int64_t ms = 0;
      if (const std::string* t = FindHeader(head.headers, "x-envoy-upstream-rq-timeout-ms");
          t != nullptr && absl::SimpleAtoi(*t, &ms) && ms >= 0) {
        route_timeout = absl::Milliseconds(ms);
      }
      const std::string* max_retries = FindHeader(head.headers, "x-envoy-max-retries");
      const std::string* retry_on = FindHeader(head.headers, "x-envoy-retry-on");
      const std::string* grpc_on = FindHeader(head.headers, "x-envoy-retry-grpc-on");
      const std::string* per_try =
          FindHeader(head.headers, "x-envoy-upstream-rq-per-try-timeout-ms");
      if (max_retries != nullptr || retry_on != nullptr || grpc_on != nullptr ||
          per_try != nullptr) {
        auto custom = std::make_shared<RetrySettings>(*retry);
        uint32_t n = 0;
        if (max_retries != nullptr && absl::SimpleAtoi(*max_retries, &n)) {
          custom->num_retries = n;
        } else if ((retry_on != nullptr || grpc_on != nullptr) && custom->num_retries == 0) {
          custom->num_retries = 1;  // Envoy's default when the header asks for retries
        }
        if (retry_on != nullptr) custom->AddConditions(*retry_on);
        if (grpc_on != nullptr) custom->AddConditions(*grpc_on);
        if (per_try != nullptr && absl::SimpleAtoi(*per_try, &ms) && ms > 0) {
          custom->per_try_timeout = absl::Milliseconds(ms);
        }
        retry = std::move(custom);
      }
    }
    if (route_timeout > absl::ZeroDuration()) deadline = now + route_timeout;
    if (caller_timeout.has_value()) {
      absl::Duration caller = *caller_timeout;
      if (route.route->route.grpc_timeout_header_max.has_value() &&
          *route.route->route.grpc_timeout_header_max > absl::ZeroDuration()) {
        caller = std::min(caller, *route.route->route.grpc_timeout_header_max);
      }
      deadline = std::min(deadline, now + caller);
    }
    Prepared p;
    UpstreamCallParams& params = p.params;
    auto worker = worker_index_.find(&stream.loop());
    params.stub = &host->stub(worker == worker_index_.end() ? 0 : worker->second);
    params.method = std::string(grpc_path);
    params.deadline = deadline;
    params.live_calls = &live_calls_;
    params.cluster = route.cluster;
    params.host = host;
    params.worker = worker == worker_index_.end() ? 0 : worker->second;
    if (options_.direct_h2_upstreams && worker != worker_index_.end() &&
        worker->second < h2_pools_.size()) {
      params.h2_pool = h2_pools_[worker->second].get();
    }
    params.retry = std::move(retry);
    std::string forwarded_for;
    for (const auto& [name, value] : head.headers) {
      if (IsDroppedRequestHeader(name) || !IsLegalMetadataKey(name)) continue;
      if (!absl::EndsWith(name, "-bin") && !IsLegalMetadataValue(value)) continue;
      if (name == "x-request-id") {
        if (trusted) p.request_id = value;  // generated at the edge otherwise
        continue;
      }
      if (name == "x-forwarded-for") {
        forwarded_for = value;
        continue;
      }
      if (absl::EndsWith(name, "-bin")) {
        std::string binary;
        if (!absl::Base64Unescape(value, &binary)) continue;  // not valid base64: dropped
        params.metadata.emplace_back(name, std::move(binary));
        continue;
      }
      params.metadata.emplace_back(name, value);
    }
    if (p.request_id.empty()) p.request_id = NewRequestId();
    params.metadata.emplace_back("x-request-id", p.request_id);
    params.metadata.emplace_back(
        "x-forwarded-for",
        forwarded_for.empty() ? head.peer_ip : absl::StrCat(forwarded_for, ", ", head.peer_ip));
    if (deadline != absl::InfiniteFuture()) {
      params.metadata.emplace_back(
          "x-envoy-expected-rq-timeout-ms",
          std::to_string(std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline - now))));
    }
    p.stats = &host->stats();
    p.stats->rq_total.fetch_add(1, std::memory_order_relaxed);
    p.stats->rq_active.fetch_add(1, std::memory_order_relaxed);
    p.cluster_stats = &route.cluster->stats();
    p.cluster = route.cluster;
    p.host = host;
    // A span for the downstream request, child of the caller's trace when it sent one.
    std::optional<telemetry::SpanContext> caller =
        telemetry::Extract([&](absl::string_view name) -> std::optional<absl::string_view> {
          const std::string* v = FindHeader(head.headers, name);
          if (v == nullptr) return std::nullopt;
          return absl::string_view(*v);
        });
    p.span = std::make_shared<telemetry::Span>(telemetry::GlobalTracer().StartSpan(
        absl::StrCat("gateway ", head.method, " ", PathWithoutQuery(head.path)),
        telemetry::SpanKind::kServer, caller));
    p.span->SetAttribute("http.method", head.method);
    p.span->SetAttribute("http.target", head.path);
    p.span->SetAttribute("net.peer.ip", head.peer_ip);
    p.span->SetAttribute("upstream.cluster", route.cluster->name());
    p.span->SetAttribute("x_request_id", p.request_id);
    if (p.span->context().IsValid()) params.trace_parent = p.span->context();
    params.trace_name = absl::StrCat("upstream ", route.cluster->name(), " ", grpc_path);
    p.cluster_stats->upstream_rq_total.fetch_add(1, std::memory_order_relaxed);
    p.cluster_stats->upstream_rq_active.fetch_add(1, std::memory_order_relaxed);
    return p;
  }

  // Counts an ended call. The HTTP code is what Envoy would count for a gRPC upstream: 200 when
  // the upstream answered (gRPC errors travel in trailers), 503/504 when it could not be reached
  // or did not answer in time; a call the client abandoned first counts no code.
  static std::function<void(const GrpcProxyResult&)> CountResult(const Prepared& p) {
    return [stats = p.stats, cluster = p.cluster_stats, owner = p.cluster, host = p.host,
            span = p.span](const GrpcProxyResult& result) {
      if (span != nullptr && span->IsRecording()) {
        span->SetAttribute("rpc.grpc.status_code",
                           static_cast<int64_t>(result.status.error_code()));
        if (!result.status.ok()) {
          span->SetStatus(telemetry::SpanStatusCode::kError, result.status.error_message());
        }
        span->End();
      }
      cluster->upstream_rq_active.fetch_sub(1, std::memory_order_relaxed);
      owner->FinishRequest();
      const grpc::StatusCode code = result.status.error_code();
      if (result.upstream_started) {
        int http = 0;
        if (result.upstream_answered) {
          http = 200;
        } else if (code == grpc::StatusCode::DEADLINE_EXCEEDED) {
          http = 504;
          cluster->upstream_rq_timeout.fetch_add(1, std::memory_order_relaxed);
        } else if (code == grpc::StatusCode::UNAVAILABLE) {
          http = 503;
          cluster->upstream_cx_connect_fail.fetch_add(1, std::memory_order_relaxed);
        }
        if (http != 0) cluster->RecordResponse(http, result.upstream_time);
        // Outlier detection sees gRPC statuses through Envoy's HTTP table; a call the client
        // abandoned says nothing about the host.
        if (code != grpc::StatusCode::CANCELLED) {
          owner->RecordHostResult(result.host != nullptr ? *result.host : *host,
                                  HttpStatusForGrpc(static_cast<int>(code)));
        }
      }
      stats->rq_active.fetch_sub(1, std::memory_order_relaxed);
      if (result.status.ok()) {
        stats->rq_success.fetch_add(1, std::memory_order_relaxed);
      } else {
        stats->rq_error.fetch_add(1, std::memory_order_relaxed);
        if (result.status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
          stats->rq_timeout.fetch_add(1, std::memory_order_relaxed);
        }
      }
    };
  }

  std::unique_ptr<StreamHandler> DispatchGrpc(ServerStream& stream, GrpcWireMode wire) {
    const RequestHead& head = stream.head();
    const absl::string_view path = PathWithoutQuery(head.path);
    if (wire != GrpcWireMode::kNative && !grpc_web_) {
      SendLocalGrpcStatus(stream, wire, grpc::StatusCode::UNIMPLEMENTED,
                          "gRPC-Web is not enabled on this listener (add the grpc_web filter)");
      return nullptr;
    }
    if (wire == GrpcWireMode::kNative && !head.http2) {
      SendLocalGrpcStatus(stream, wire, grpc::StatusCode::UNIMPLEMENTED,
                          "native gRPC needs HTTP/2; use gRPC-Web over HTTP/1.1");
      return nullptr;
    }
    if (head.method != "POST") {
      SendLocalGrpcStatus(stream, wire, grpc::StatusCode::UNIMPLEMENTED,
                          absl::StrCat("gRPC requests are POSTs, not ", head.method));
      return nullptr;
    }
    const RouteEntry* route = router_->Match(head, path, /*grpc=*/true);
    if (route == nullptr) {
      SendLocalGrpcStatus(stream, wire, grpc::StatusCode::UNIMPLEMENTED,
                          absl::StrCat("no route for ", path));
      return nullptr;
    }
    std::optional<absl::Duration> caller_timeout;
    if (const std::string* t = FindHeader(head.headers, "grpc-timeout")) {
      caller_timeout = ParseGrpcTimeout(*t);
      if (!caller_timeout.has_value()) {
        SendLocalGrpcStatus(stream, wire, grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("grpc-timeout '", *t,
                                         "' is not 1-8 digits followed by H, M, S, m, u or n"));
        return nullptr;
      }
    }
    std::optional<Prepared> p =
        Prepare(stream, *route, path, caller_timeout, [&](grpc::StatusCode code, std::string msg) {
          SendLocalGrpcStatus(stream, wire, code, msg);
        });
    if (!p.has_value()) return nullptr;
    bool unary = false;
    if (std::shared_ptr<const RestSettings> rest = Rest(); rest != nullptr) {
      const google::protobuf::MethodDescriptor* method = rest->table->FindMethod(path);
      unary = method != nullptr && !method->client_streaming() && !method->server_streaming();
    }
    return NewGrpcProxyHandler(stream, wire, unary, std::move(p->params), options_.proxy,
                               {{"x-request-id", p->request_id}}, CountResult(*p));
  }

  std::unique_ptr<StreamHandler> DispatchRest(ServerStream& stream) {
    const RequestHead& head = stream.head();
    const absl::string_view path = PathWithoutQuery(head.path);
    std::shared_ptr<const RestSettings> rest = Rest();
    if (rest == nullptr) {
      SendLocalText(stream, 404,
                    absl::StrCat("no route for ", head.method, " ", path,
                                 " (this listener has no grpc_json_transcoder filter)\n"));
      return nullptr;
    }
    std::optional<transcode::RouteMatch> match = rest->table->Match(head.method, path);
    if (!match.has_value()) {
      // Envoy answers a known path with the wrong method 404 too, not 405.
      SendLocalText(stream, 404, absl::StrCat("no REST method for ", head.method, " ", path, "\n"));
      return nullptr;
    }
    if (const std::string* length = FindHeader(head.headers, "content-length")) {
      uint64_t n = 0;
      if (absl::SimpleAtoi(*length, &n) && n > rest->max_request_body_bytes) {
        SendLocalText(stream, 413,
                      absl::StrCat("request body of ", n, " bytes is over the gateway's limit of ",
                                   rest->max_request_body_bytes, " bytes\n"));
        return nullptr;
      }
    }
    const std::string& grpc_path = match->binding->grpc_path;
    // Envoy routes a transcoded request by its gRPC path unless told to keep the original.
    const RouteEntry* route = rest->match_incoming_request_route
                                  ? router_->Match(head, path, /*grpc=*/false)
                                  : router_->Match(head, grpc_path, /*grpc=*/true);
    if (route == nullptr) {
      SendLocalText(stream, 404, absl::StrCat("no route for ", grpc_path, "\n"));
      return nullptr;
    }
    std::optional<Prepared> p = Prepare(
        stream, *route, grpc_path, std::nullopt, [&](grpc::StatusCode code, std::string msg) {
          SendLocalText(stream, HttpStatusForGrpc(static_cast<int>(code)), msg + "\n");
        });
    if (!p.has_value()) return nullptr;
    p->params.metadata.emplace_back("x-envoy-original-path", head.path);
    p->params.metadata.emplace_back("x-envoy-original-method", head.method);
    return NewRestHandler(stream, rest, *match, std::move(p->params), options_.proxy,
                          {{"x-request-id", p->request_id}}, CountResult(*p));
  }

  std::atomic<int64_t>& live_calls_;
  const config::Listener& config_;
  std::unique_ptr<Router> router_;

 public:
  // Swapped when descriptors are refreshed from reflection; requests keep the one they began
  // with.
  std::shared_ptr<const RestSettings> Rest() const {
    absl::MutexLock lock(&rest_mu_);
    return rest_;
  }
  void SetRest(std::shared_ptr<const RestSettings> rest) {
    absl::MutexLock lock(&rest_mu_);
    rest_ = std::move(rest);
  }
  const config::Listener& config() const { return config_; }

 private:
  mutable absl::Mutex rest_mu_;
  std::shared_ptr<const RestSettings> rest_ ABSL_GUARDED_BY(rest_mu_);
  const absl::flat_hash_map<EventLoop*, size_t>& worker_index_;
  const std::vector<std::unique_ptr<H2UpstreamPool>>& h2_pools_;
  const GatewayOptions& options_;
  const absl::flat_hash_set<std::string> api_keys_;
  bool grpc_web_ = false;
};

// Fetches the reflection sources' descriptor sets; `done` runs once, on a gRPC thread, with the
// sets that could be fetched (failures are logged and skipped: a backend that is down now is
// asked again at the next refresh).
void FetchReflectionSets(
    const ClusterManager& clusters, const std::vector<GatewayOptions::ReflectionSource>& sources,
    absl::Duration timeout,
    std::function<void(std::vector<google::protobuf::FileDescriptorSet>)> done) {
  struct State {
    absl::Mutex mu;
    std::vector<google::protobuf::FileDescriptorSet> sets;
    size_t pending = 0;
    std::function<void(std::vector<google::protobuf::FileDescriptorSet>)> done;
  };
  auto state = std::make_shared<State>();
  state->done = std::move(done);
  std::vector<std::pair<std::shared_ptr<grpc::Channel>, std::vector<std::string>>> targets;
  for (const auto& source : sources) {
    Cluster* cluster = clusters.Find(source.cluster);
    if (cluster == nullptr || cluster->hosts().empty()) continue;
    targets.emplace_back(cluster->hosts().front()->channel(0), source.services);
  }
  state->pending = targets.size();
  if (targets.empty()) {
    state->done({});
    return;
  }
  for (auto& [channel, services] : targets) {
    reflection::Fetch(channel, services, timeout,
                      [state](absl::StatusOr<google::protobuf::FileDescriptorSet> set) {
                        bool last = false;
                        {
                          absl::MutexLock lock(&state->mu);
                          if (set.ok()) {
                            state->sets.push_back(*std::move(set));
                          } else {
                            LogWarning("gateway: reflection fetch failed",
                                       {{"error", std::string(set.status().message())}});
                          }
                          last = --state->pending == 0;
                        }
                        if (last) state->done(std::move(state->sets));
                      });
  }
}

class Gateway::Impl {
 public:
  config::Bootstrap bootstrap;
  GatewayOptions options;
  std::vector<std::unique_ptr<EventLoop>> loops;
  absl::flat_hash_map<EventLoop*, size_t> worker_index;
  std::unique_ptr<ClusterManager> clusters;
  std::unique_ptr<HealthChecker> health;
  // Each worker loop's direct HTTP/2 connections to upstream hosts (index = worker).
  std::vector<std::unique_ptr<H2UpstreamPool>> h2_pools;
  std::vector<std::unique_ptr<ListenerDispatcher>> dispatchers;
  std::vector<std::unique_ptr<Listener>> listeners;
  std::atomic<int64_t> live_calls{0};
  // Reflection refresh: a loop with a timer; the fingerprint of the sets last applied.
  std::unique_ptr<EventLoop> refresh_loop;
  event* refresh_timer = nullptr;
  std::string applied_fingerprint;
  std::atomic<int64_t> refreshes_in_flight{0};

  // Builds every transcoder filter's settings with `extra` and swaps them in. On a loop.
  void ApplyReflection(std::vector<google::protobuf::FileDescriptorSet> extra) {
    std::string fingerprint;
    for (const auto& set : extra) fingerprint += set.SerializeAsString();
    if (fingerprint == applied_fingerprint) return;
    for (auto& d : dispatchers) {
      for (const config::HttpFilter& f : d->config().http.http_filters) {
        if (f.type != config::HttpFilter::Type::kGrpcJsonTranscoder) continue;
        absl::StatusOr<std::unique_ptr<RestSettings>> loaded = RestSettings::Load(
            f.transcoder, options.reject_unknown_fields, options.max_request_body_bytes, extra);
        if (!loaded.ok()) {
          LogWarning(
              "gateway: refreshed descriptors rejected; keeping the previous ones",
              {{"listener", d->config().name}, {"error", std::string(loaded.status().message())}});
          return;
        }
        d->SetRest(std::shared_ptr<const RestSettings>(*std::move(loaded)));
      }
    }
    applied_fingerprint = std::move(fingerprint);
    LogInfo("gateway: descriptors from reflection applied",
            {{"sets", static_cast<int64_t>(extra.size())}});
  }

  void ScheduleRefresh() {
    const timeval tv = absl::ToTimeval(options.reflection_refresh);
    evtimer_add(refresh_timer, &tv);
  }

  void Refresh() {
    refreshes_in_flight.fetch_add(1);
    FetchReflectionSets(*clusters, options.reflection, options.reflection_timeout,
                        [this](std::vector<google::protobuf::FileDescriptorSet> sets) {
                          refresh_loop->Post([this, sets = std::move(sets)]() mutable {
                            ApplyReflection(std::move(sets));
                            ScheduleRefresh();
                          });
                          refreshes_in_flight.fetch_sub(1);
                        });
  }

  ~Impl() {
    if (refresh_loop != nullptr) {
      std::promise<void> stopped;
      refresh_loop->Post([this, &stopped] {
        if (refresh_timer != nullptr) event_free(refresh_timer);
        refresh_timer = nullptr;
        stopped.set_value();
      });
      stopped.get_future().wait();
      const absl::Time limit = absl::Now() + absl::Seconds(10);
      while (refreshes_in_flight.load() > 0 && absl::Now() < limit) {
        absl::SleepFor(absl::Milliseconds(5));
      }
      refresh_loop.reset();
    }
    listeners.clear();  // closes connections on their loops; handlers cancel upstream calls
    // Cancelled calls still report to their loops (OnDone posts there): keep the loops running
    // until every call is gone, bounded in case an upstream never answers a cancel.
    const absl::Time limit = absl::Now() + absl::Seconds(10);
    while (live_calls.load() > 0 && absl::Now() < limit) absl::SleepFor(absl::Milliseconds(5));
    dispatchers.clear();
    // A pool's connections belong to its loop: closed there.
    for (size_t i = 0; i < h2_pools.size() && i < loops.size(); ++i) {
      std::promise<void> closed;
      loops[i]->Post([this, i, &closed] {
        h2_pools[i].reset();
        closed.set_value();
      });
      closed.get_future().wait();
    }
    loops.clear();  // joins the loops; posted upstream completions are dropped
    health.reset();
    clusters.reset();
  }
};

Gateway::Gateway(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Gateway::~Gateway() = default;

absl::StatusOr<std::unique_ptr<Gateway>> Gateway::Start(config::Bootstrap bootstrap,
                                                        GatewayOptions options) {
  // libevent writes with write(2): a client that closes first must not end the process.
  signal(SIGPIPE, SIG_IGN);
  auto impl = std::make_unique<Impl>();
  impl->bootstrap = std::move(bootstrap);
  impl->options = options;
  const size_t workers = std::max<size_t>(1, options.worker_threads);
  for (size_t i = 0; i < workers; ++i) {
    absl::StatusOr<std::unique_ptr<EventLoop>> loop =
        EventLoop::Start(absl::StrCat("gw-worker-", i));
    if (!loop.ok()) return loop.status();
    impl->worker_index[loop->get()] = i;
    impl->h2_pools.push_back(std::make_unique<H2UpstreamPool>(**loop));
    impl->loops.push_back(*std::move(loop));
  }
  absl::StatusOr<std::unique_ptr<ClusterManager>> clusters =
      ClusterManager::Create(impl->bootstrap.clusters, workers);
  if (!clusters.ok()) return clusters.status();
  impl->clusters = *std::move(clusters);
  absl::StatusOr<std::unique_ptr<HealthChecker>> health = HealthChecker::Start(*impl->clusters);
  if (!health.ok()) return health.status();
  impl->health = *std::move(health);
  // Descriptors from reflection, before the listeners open (bounded: a backend that is not up
  // yet is asked again at the next refresh).
  std::vector<google::protobuf::FileDescriptorSet> reflected;
  if (!impl->options.reflection.empty()) {
    for (const auto& source : impl->options.reflection) {
      if (impl->clusters->Find(source.cluster) == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(
            "gateway.reflection: cluster '", source.cluster, "' is not in the bootstrap"));
      }
    }
    std::promise<std::vector<google::protobuf::FileDescriptorSet>> fetched;
    FetchReflectionSets(*impl->clusters, impl->options.reflection, impl->options.reflection_timeout,
                        [&fetched](std::vector<google::protobuf::FileDescriptorSet> sets) {
                          fetched.set_value(std::move(sets));
                        });
    reflected = fetched.get_future().get();
    int64_t files = 0;
    for (const auto& set : reflected) {
      impl->applied_fingerprint += set.SerializeAsString();
      files += set.file_size();
    }
    LogInfo("gateway: descriptors from reflection",
            {{"sources", static_cast<int64_t>(impl->options.reflection.size())},
             {"answered", static_cast<int64_t>(reflected.size())},
             {"files", files}});
  }
  std::vector<EventLoop*> worker_ptrs;
  for (auto& loop : impl->loops) worker_ptrs.push_back(loop.get());
  for (const config::Listener& l : impl->bootstrap.listeners) {
    absl::StatusOr<std::unique_ptr<Router>> router =
        Router::Create(l.http.route_config, *impl->clusters);
    if (!router.ok()) return router.status();
    std::unique_ptr<RestSettings> rest;
    for (const config::HttpFilter& f : l.http.http_filters) {
      if (f.type != config::HttpFilter::Type::kGrpcJsonTranscoder) continue;
      absl::StatusOr<std::unique_ptr<RestSettings>> loaded = RestSettings::Load(
          f.transcoder, options.reject_unknown_fields, options.max_request_body_bytes, reflected);
      if (!loaded.ok()) {
        return absl::Status(loaded.status().code(),
                            absl::StrCat("listener '", l.name, "': ", loaded.status().message()));
      }
      rest = *std::move(loaded);
    }
    impl->dispatchers.push_back(std::make_unique<ListenerDispatcher>(
        l, *std::move(router), std::move(rest), impl->worker_index, impl->h2_pools, impl->options,
        impl->live_calls));
    CodecOptions codec;
    if (l.http.http2_protocol_options.max_concurrent_streams.has_value()) {
      codec.max_concurrent_streams = *l.http.http2_protocol_options.max_concurrent_streams;
    }
    if (l.http.http2_protocol_options.initial_stream_window_size.has_value()) {
      codec.initial_stream_window = *l.http.http2_protocol_options.initial_stream_window_size;
    }
    codec.max_request_headers_bytes = size_t{l.http.max_request_headers_kb} << 10;
    // Envoy: 1 hour when unset, 0s disables.
    codec.idle_timeout = l.http.idle_timeout.value_or(absl::Hours(1));
    const std::string address =
        JoinHostPort(l.address.address, static_cast<int>(l.address.port_value));
    absl::StatusOr<std::unique_ptr<Listener>> listener =
        Listener::Start(address, worker_ptrs, *impl->dispatchers.back(), codec, l.tls);
    if (!listener.ok()) return listener.status();
    impl->listeners.push_back(*std::move(listener));
  }
  if (!impl->options.reflection.empty()) {
    absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Start("gw-reflection");
    if (!loop.ok()) return loop.status();
    impl->refresh_loop = *std::move(loop);
    Impl* raw = impl.get();
    std::promise<void> armed;
    impl->refresh_loop->Post([raw, &armed] {
      raw->refresh_timer = evtimer_new(
          raw->refresh_loop->base(),
          [](evutil_socket_t, short, void* self) { static_cast<Impl*>(self)->Refresh(); }, raw);
      raw->ScheduleRefresh();
      armed.set_value();
    });
    armed.get_future().wait();
  }
  return std::unique_ptr<Gateway>(new Gateway(std::move(impl)));
}

std::vector<std::string> Gateway::listener_addresses() const {
  std::vector<std::string> out;
  for (const auto& l : impl_->listeners) out.push_back(l->address());
  return out;
}

const config::Bootstrap& Gateway::bootstrap() const { return impl_->bootstrap; }
const ClusterManager& Gateway::clusters() const { return *impl_->clusters; }
std::shared_ptr<const RestSettings> Gateway::rest_settings(size_t i) const {
  return i < impl_->dispatchers.size() ? impl_->dispatchers[i]->Rest() : nullptr;
}

}  // namespace montage::gateway
