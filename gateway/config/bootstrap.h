// The gateway's reading of Envoy's v3 bootstrap YAML: a documented subset (docs/gateway-config.md),
// parsed strictly. A field outside the subset is an error naming the field's path and its line,
// never silently ignored, so the same file drives montage's gateway and real Envoy unchanged.
//
// Values are plain structs with Envoy's defaults filled in; the gateway builds its listeners,
// routes and clusters from them. Thread-compatible (immutable once parsed).
#ifndef MONTAGE_GATEWAY_CONFIG_BOOTSTRAP_H_
#define MONTAGE_GATEWAY_CONFIG_BOOTSTRAP_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace montage::gateway::config {

// Where a value came from, for errors reported after parsing ("envoy.yaml:12:7").
struct SourceLocation {
  int line = 0;    // 1-based; 0 when unknown
  int column = 0;  // 1-based
};

struct SocketAddress {
  std::string address;  // an IP literal or (STRICT_DNS clusters) a host name
  // 1..65535 for cluster endpoints; a listener or admin address may say 0 (any free port, as in
  // Envoy), which tests use.
  uint32_t port_value = 0;
};

// route.v3.HeaderMatcher: exactly one of the match kinds.
struct HeaderMatcher {
  enum class Kind { kPresent, kExact, kPrefix, kSuffix, kContains, kSafeRegex };
  std::string name;  // lower-cased
  Kind kind = Kind::kPresent;
  std::string value;  // unused for kPresent; an RE2 pattern for kSafeRegex
  bool present_match = true;
  bool invert_match = false;
};

// route.v3.RetryPolicy.
struct RetryPolicy {
  std::vector<std::string> retry_on;  // "5xx", "unavailable", ... (comma list split, trimmed)
  uint32_t num_retries = 1;           // Envoy's default when retry_policy is present
  std::optional<absl::Duration> per_try_timeout;
  std::vector<uint32_t> retriable_status_codes;
  absl::Duration base_interval = absl::Milliseconds(25);  // retry_back_off
  absl::Duration max_interval = absl::Milliseconds(250);  // default 10 x base_interval
};

struct RouteMatch {
  enum class Kind { kPrefix, kPath, kSafeRegex };
  Kind kind = Kind::kPrefix;
  std::string value;  // prefix, exact path, or RE2 pattern (safe_regex.regex)
  std::vector<HeaderMatcher> headers;
  bool grpc = false;  // `grpc: {}`: only requests with a gRPC content type
};

struct RouteAction {
  std::string cluster;
  absl::Duration timeout = absl::Seconds(15);  // 0s disables, as in Envoy
  std::optional<RetryPolicy> retry_policy;
  // max_stream_duration.grpc_timeout_header_max: when set, grpc-timeout is honoured up to this
  // (0 = no cap).
  std::optional<absl::Duration> grpc_timeout_header_max;
};

struct Route {
  std::string name;
  RouteMatch match;
  RouteAction route;
  SourceLocation location;
};

struct VirtualHost {
  std::string name;
  std::vector<std::string> domains;  // "*" matches any host
  std::vector<Route> routes;
};

struct RouteConfiguration {
  std::string name;
  std::vector<VirtualHost> virtual_hosts;
};

// extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder.
struct GrpcJsonTranscoder {
  std::string proto_descriptor;  // path of a FileDescriptorSet
  std::vector<std::string> services;
  struct PrintOptions {
    bool add_whitespace = false;
    bool always_print_primitive_fields = false;
    bool always_print_enums_as_ints = false;
    bool preserve_proto_field_names = false;
    bool stream_newline_delimited = false;
    bool stream_sse_style_delimited = false;
  } print_options;
  bool auto_mapping = false;
  bool match_incoming_request_route = false;
  std::vector<std::string> ignored_query_parameters;
  bool ignore_unknown_query_parameters = false;
  bool convert_grpc_status = false;
  struct RequestValidationOptions {
    bool reject_unknown_method = false;
    bool reject_unknown_query_parameters = false;
    bool reject_binding_body_field_collisions = false;
  } request_validation_options;
  bool case_insensitive_enum_parsing = false;
  std::optional<uint32_t> max_request_body_size;   // bytes; 413 above
  std::optional<uint32_t> max_response_body_size;  // bytes
};

struct HttpFilter {
  enum class Type { kGrpcJsonTranscoder, kGrpcWeb, kRouter };
  std::string name;  // e.g. "envoy.filters.http.grpc_web"
  Type type = Type::kRouter;
  GrpcJsonTranscoder transcoder;  // for kGrpcJsonTranscoder
};

// config.core.v3.Http2ProtocolOptions (the fields montage uses).
struct Http2Options {
  std::optional<uint32_t> max_concurrent_streams;
  std::optional<uint32_t> initial_stream_window_size;
  std::optional<uint32_t> initial_connection_window_size;
  // connection_keepalive
  std::optional<absl::Duration> keepalive_interval;
  std::optional<absl::Duration> keepalive_timeout;
};

// extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.
struct HttpConnectionManager {
  enum class CodecType { kAuto, kHttp1, kHttp2 };
  std::string stat_prefix;
  CodecType codec_type = CodecType::kAuto;
  RouteConfiguration route_config;
  std::vector<HttpFilter> http_filters;
  absl::Duration stream_idle_timeout = absl::Minutes(5);  // 0s disables
  absl::Duration request_timeout = absl::ZeroDuration();  // 0s: none
  std::optional<absl::Duration> idle_timeout;  // common_http_protocol_options.idle_timeout
  uint32_t max_request_headers_kb = 60;
  bool use_remote_address = false;
  uint32_t xff_num_trusted_hops = 0;
  bool generate_request_id = true;
  bool preserve_external_request_id = false;
  Http2Options http2_protocol_options;
};

// extensions.transport_sockets.tls.v3.DownstreamTlsContext (files only).
struct DownstreamTls {
  std::string certificate_chain_file;
  std::string private_key_file;
  std::vector<std::string> alpn_protocols;  // e.g. h2, http/1.1
};

struct Listener {
  std::string name;
  SocketAddress address;
  // The one filter chain: an http_connection_manager, optionally behind TLS.
  HttpConnectionManager http;
  std::optional<DownstreamTls> tls;
  SourceLocation location;
};

struct HealthCheck {
  absl::Duration timeout;   // required
  absl::Duration interval;  // required
  // Unset means Envoy's rule: no_traffic_interval 60s, unhealthy_interval = interval,
  // unhealthy_edge_interval = unhealthy_interval, healthy_edge_interval = interval.
  std::optional<absl::Duration> no_traffic_interval;
  std::optional<absl::Duration> unhealthy_interval;
  std::optional<absl::Duration> healthy_edge_interval;
  std::optional<absl::Duration> unhealthy_edge_interval;
  uint32_t unhealthy_threshold = 0;  // required
  uint32_t healthy_threshold = 0;    // required
  // grpc_health_check (the only checker in the subset)
  std::string grpc_service_name;  // empty: the whole server
  std::string grpc_authority;     // defaults to the cluster's name, as in Envoy
};

struct CircuitBreakerThresholds {
  enum class Priority { kDefault, kHigh };
  Priority priority = Priority::kDefault;
  uint32_t max_connections = 1024;
  uint32_t max_pending_requests = 1024;
  uint32_t max_requests = 1024;
  uint32_t max_retries = 3;
  struct RetryBudget {
    double budget_percent = 20.0;
    uint32_t min_retry_concurrency = 3;
  };
  std::optional<RetryBudget> retry_budget;
};

struct OutlierDetection {
  uint32_t consecutive_5xx = 5;
  uint32_t consecutive_gateway_failure = 5;
  absl::Duration interval = absl::Seconds(10);
  absl::Duration base_ejection_time = absl::Seconds(30);
  absl::Duration max_ejection_time = absl::Seconds(300);
  uint32_t max_ejection_percent = 10;
  uint32_t enforcing_consecutive_5xx = 100;
  uint32_t enforcing_consecutive_gateway_failure = 0;
};

struct Cluster {
  enum class Type { kStatic, kStrictDns };
  enum class LbPolicy { kRoundRobin, kLeastRequest };
  // dns_lookup_family (STRICT_DNS): which address families a host name resolves to.
  enum class DnsLookupFamily { kAuto, kV4Only, kV6Only, kV4Preferred, kAll };
  std::string name;
  Type type = Type::kStatic;
  LbPolicy lb_policy = LbPolicy::kRoundRobin;
  absl::Duration connect_timeout = absl::Seconds(5);
  absl::Duration dns_refresh_rate = absl::Seconds(5);
  DnsLookupFamily dns_lookup_family = DnsLookupFamily::kAuto;
  // HTTP/2 to the upstream (typed_extension_protocol_options
  // envoy.extensions.upstreams.http.v3.HttpProtocolOptions explicit_http_config
  // http2_protocol_options, or the deprecated cluster-level http2_protocol_options).
  bool http2 = false;
  Http2Options http2_options;
  std::vector<SocketAddress> endpoints;  // load_assignment.endpoints[].lb_endpoints[]
  std::vector<HealthCheck> health_checks;
  // circuit_breakers.thresholds[]; the DEFAULT priority entry (Envoy's defaults when absent).
  CircuitBreakerThresholds circuit_breakers;
  std::optional<OutlierDetection> outlier_detection;
  SourceLocation location;
};

struct Admin {
  SocketAddress address;
};

struct Bootstrap {
  std::string node_id;       // node.id
  std::string node_cluster;  // node.cluster
  std::vector<Listener> listeners;
  std::vector<Cluster> clusters;
  std::optional<Admin> admin;
};

// Parses `yaml` (named `source_name` in errors). INVALID_ARGUMENT for a field outside the subset,
// a wrong type or value, a missing required field, a route naming an unknown cluster, or two
// clusters or listeners with one name; the message starts "<source_name>:<line>:<column>: " and
// names the field by its path (static_resources.clusters[0].lb_policy).
absl::StatusOr<Bootstrap> ParseBootstrap(absl::string_view yaml, absl::string_view source_name);

// Reads and parses a file (NOT_FOUND / PERMISSION_DENIED when it cannot be read).
absl::StatusOr<Bootstrap> LoadBootstrapFile(const std::string& path);

}  // namespace montage::gateway::config

#endif  // MONTAGE_GATEWAY_CONFIG_BOOTSTRAP_H_
