#include "gateway/config/bootstrap.h"

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::gateway::config {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The smallest bootstrap the subset accepts: one listener, one route, one STATIC cluster.
constexpr absl::string_view kMinimal = R"yaml(static_resources:
  listeners:
    - name: ingress
      address:
        socket_address: {address: 127.0.0.1, port_value: 0}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {prefix: /}
                          route: {cluster: backend}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: backend
      load_assignment:
        cluster_name: backend
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: 50051}
)yaml";

// 1-based line of the first line of `yaml` containing `needle`; fails the test when absent.
int LineOf(absl::string_view yaml, absl::string_view needle) {
  int line = 1;
  for (absl::string_view text : absl::StrSplit(yaml, '\n')) {
    if (absl::StrContains(text, needle)) return line;
    ++line;
  }
  ADD_FAILURE() << "'" << needle << "' is not in the YAML";
  return -1;
}

// `yaml` with the one occurrence of `from` replaced by `to`.
std::string Replace(absl::string_view yaml, absl::string_view from, absl::string_view to) {
  std::string out(yaml);
  const std::string needle(from);
  const std::size_t at = out.find(needle);
  EXPECT_NE(at, std::string::npos) << "'" << from << "' is not in the YAML";
  if (at == std::string::npos) return out;
  EXPECT_EQ(out.find(needle, at + 1), std::string::npos) << "'" << from << "' is not unique";
  out.replace(at, needle.size(), std::string(to));
  return out;
}

// kMinimal with `fields` (lines indented six spaces) added to its cluster.
std::string WithClusterFields(absl::string_view fields) {
  return Replace(kMinimal, "    - name: backend\n", absl::StrCat("    - name: backend\n", fields));
}

// Parses `yaml` (named test.yaml), expects INVALID_ARGUMENT at `line` mentioning every piece of
// `parts`, and returns the message for further checks.
std::string ExpectInvalid(absl::string_view yaml, int line,
                          std::initializer_list<absl::string_view> parts) {
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap(yaml, "test.yaml");
  EXPECT_FALSE(parsed.ok());
  if (parsed.ok()) return "";
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << parsed.status();
  const std::string message(parsed.status().message());
  EXPECT_THAT(message, ::testing::StartsWith(absl::StrCat("test.yaml:", line, ":")));
  for (absl::string_view part : parts) EXPECT_THAT(message, HasSubstr(std::string(part)));
  return message;
}

TEST(BootstrapTest, MinimalConfigParses) {
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap(kMinimal, "minimal.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->listeners.size(), 1u);
  EXPECT_EQ(parsed->listeners[0].name, "ingress");
  EXPECT_EQ(parsed->listeners[0].address.address, "127.0.0.1");
  EXPECT_EQ(parsed->listeners[0].address.port_value, 0u);  // any free port, as tests use
  EXPECT_EQ(parsed->listeners[0].location.line, LineOf(kMinimal, "name: ingress"));
  EXPECT_EQ(parsed->listeners[0].location.column, 7);
  ASSERT_EQ(parsed->clusters.size(), 1u);
  EXPECT_EQ(parsed->clusters[0].location.line, LineOf(kMinimal, "name: backend"));
  ASSERT_EQ(parsed->clusters[0].endpoints.size(), 1u);
  EXPECT_EQ(parsed->clusters[0].endpoints[0].address, "127.0.0.1");
  EXPECT_EQ(parsed->clusters[0].endpoints[0].port_value, 50051u);
  const Route& route = parsed->listeners[0].http.route_config.virtual_hosts[0].routes[0];
  EXPECT_EQ(route.location.line, LineOf(kMinimal, "match: {prefix: /}"));
  EXPECT_FALSE(parsed->admin.has_value());
}

TEST(BootstrapTest, EnvoyDefaultsApplyWhenFieldsAreAbsent) {
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap(kMinimal, "minimal.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const HttpConnectionManager& hcm = parsed->listeners[0].http;
  EXPECT_EQ(hcm.codec_type, HttpConnectionManager::CodecType::kAuto);
  EXPECT_EQ(hcm.stream_idle_timeout, absl::Minutes(5));
  EXPECT_EQ(hcm.request_timeout, absl::ZeroDuration());
  EXPECT_FALSE(hcm.idle_timeout.has_value());
  EXPECT_EQ(hcm.max_request_headers_kb, 60u);
  EXPECT_FALSE(hcm.use_remote_address);
  EXPECT_EQ(hcm.xff_num_trusted_hops, 0u);
  EXPECT_TRUE(hcm.generate_request_id);
  EXPECT_FALSE(hcm.preserve_external_request_id);
  EXPECT_FALSE(hcm.http2_protocol_options.max_concurrent_streams.has_value());
  EXPECT_FALSE(parsed->listeners[0].tls.has_value());
  ASSERT_EQ(hcm.http_filters.size(), 1u);
  EXPECT_EQ(hcm.http_filters[0].type, HttpFilter::Type::kRouter);

  const Route& route = hcm.route_config.virtual_hosts[0].routes[0];
  EXPECT_EQ(route.match.kind, RouteMatch::Kind::kPrefix);
  EXPECT_EQ(route.match.value, "/");
  EXPECT_FALSE(route.match.grpc);
  EXPECT_EQ(route.route.timeout, absl::Seconds(15));
  EXPECT_FALSE(route.route.retry_policy.has_value());
  EXPECT_FALSE(route.route.grpc_timeout_header_max.has_value());

  const Cluster& cluster = parsed->clusters[0];
  EXPECT_EQ(cluster.type, Cluster::Type::kStatic);
  EXPECT_EQ(cluster.lb_policy, Cluster::LbPolicy::kRoundRobin);
  EXPECT_EQ(cluster.connect_timeout, absl::Seconds(5));
  EXPECT_EQ(cluster.dns_refresh_rate, absl::Seconds(5));
  EXPECT_EQ(cluster.dns_lookup_family, Cluster::DnsLookupFamily::kAuto);
  EXPECT_FALSE(cluster.http2);
  EXPECT_TRUE(cluster.health_checks.empty());
  EXPECT_EQ(cluster.circuit_breakers.max_connections, 1024u);
  EXPECT_EQ(cluster.circuit_breakers.max_pending_requests, 1024u);
  EXPECT_EQ(cluster.circuit_breakers.max_requests, 1024u);
  EXPECT_EQ(cluster.circuit_breakers.max_retries, 3u);
  EXPECT_FALSE(cluster.circuit_breakers.retry_budget.has_value());
  EXPECT_FALSE(cluster.outlier_detection.has_value());
}

TEST(BootstrapTest, EmptyMessagesTakeEnvoyDefaults) {
  std::string yaml =
      Replace(kMinimal, "route: {cluster: backend}", "route: {cluster: backend, retry_policy: {}}");
  yaml = Replace(yaml, "    - name: backend\n",
                 R"(    - name: backend
      outlier_detection: {}
      circuit_breakers:
        thresholds:
          - {retry_budget: {}}
      http2_protocol_options: {}
      health_checks:
        - {timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 1,
           grpc_health_check: {}}
)");
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap(yaml, "defaults.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const RouteAction& action =
      parsed->listeners[0].http.route_config.virtual_hosts[0].routes[0].route;
  ASSERT_TRUE(action.retry_policy.has_value());
  EXPECT_TRUE(action.retry_policy->retry_on.empty());
  EXPECT_EQ(action.retry_policy->num_retries, 1u);
  EXPECT_FALSE(action.retry_policy->per_try_timeout.has_value());
  EXPECT_EQ(action.retry_policy->base_interval, absl::Milliseconds(25));
  EXPECT_EQ(action.retry_policy->max_interval, absl::Milliseconds(250));

  const Cluster& cluster = parsed->clusters[0];
  EXPECT_TRUE(cluster.http2);  // the deprecated cluster-level form
  ASSERT_TRUE(cluster.outlier_detection.has_value());
  EXPECT_EQ(cluster.outlier_detection->consecutive_5xx, 5u);
  EXPECT_EQ(cluster.outlier_detection->consecutive_gateway_failure, 5u);
  EXPECT_EQ(cluster.outlier_detection->interval, absl::Seconds(10));
  EXPECT_EQ(cluster.outlier_detection->base_ejection_time, absl::Seconds(30));
  EXPECT_EQ(cluster.outlier_detection->max_ejection_time, absl::Seconds(300));
  EXPECT_EQ(cluster.outlier_detection->max_ejection_percent, 10u);
  EXPECT_EQ(cluster.outlier_detection->enforcing_consecutive_5xx, 100u);
  EXPECT_EQ(cluster.outlier_detection->enforcing_consecutive_gateway_failure, 0u);
  EXPECT_EQ(cluster.circuit_breakers.priority, CircuitBreakerThresholds::Priority::kDefault);
  EXPECT_EQ(cluster.circuit_breakers.max_requests, 1024u);
  ASSERT_TRUE(cluster.circuit_breakers.retry_budget.has_value());
  EXPECT_EQ(cluster.circuit_breakers.retry_budget->budget_percent, 20.0);
  EXPECT_EQ(cluster.circuit_breakers.retry_budget->min_retry_concurrency, 3u);
  ASSERT_EQ(cluster.health_checks.size(), 1u);
  const HealthCheck& check = cluster.health_checks[0];
  EXPECT_EQ(check.grpc_service_name, "");
  EXPECT_EQ(check.grpc_authority, "backend");  // Envoy: the cluster's name
  EXPECT_FALSE(check.no_traffic_interval.has_value());
}

TEST(BootstrapTest, BackOffMaxDefaultsToTenTimesBase) {
  const std::string yaml =
      Replace(kMinimal, "route: {cluster: backend}",
              "route: {cluster: backend, retry_policy: {retry_back_off: {base_interval: 0.1s}}}");
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap(yaml, "t.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const RetryPolicy& retry =
      *parsed->listeners[0].http.route_config.virtual_hosts[0].routes[0].route.retry_policy;
  EXPECT_EQ(retry.base_interval, absl::Milliseconds(100));
  EXPECT_EQ(retry.max_interval, absl::Seconds(1));
}

// Every field of the subset, each set away from its default.
constexpr absl::string_view kFull = R"yaml(node:
  id: gw-1
  cluster: edge
admin:
  address:
    socket_address: {address: "::1", port_value: 9901}
static_resources:
  listeners:
    - name: public
      address:
        socket_address: {address: 0.0.0.0, port_value: 8443, protocol: TCP}
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              common_tls_context:
                tls_certificates:
                  - certificate_chain: {filename: /etc/tls/cert.pem}
                    private_key: {filename: /etc/tls/key.pem}
                alpn_protocols: [h2, http/1.1]
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: public
                codec_type: HTTP2
                stream_idle_timeout: 0s
                request_timeout: 1.5s
                common_http_protocol_options: {idle_timeout: 120s}
                max_request_headers_kb: "96"
                use_remote_address: true
                xff_num_trusted_hops: 2
                generate_request_id: false
                preserve_external_request_id: true
                http2_protocol_options:
                  max_concurrent_streams: 500
                  initial_stream_window_size: 65536
                  initial_connection_window_size: 1048576
                  connection_keepalive: {interval: 20s, timeout: 0.5s}
                route_config:
                  name: main
                  virtual_hosts:
                    - name: api
                      domains: [api.example.com, "api.example.com:8443"]
                      routes:
                        - name: exact
                          match:
                            path: /montage.cache.v1.CacheService/Get
                            grpc: {}
                            headers:
                              - {name: X-Tenant, exact_match: blue}
                              - {name: x-a, string_match: {exact: e}}
                              - {name: x-b, string_match: {prefix: p}}
                              - {name: x-c, string_match: {suffix: s}}
                              - {name: x-d, string_match: {contains: c}}
                              - {name: x-e, string_match: {safe_regex: {regex: "v[0-9]+"}}}
                              - {name: x-f, present_match: false}
                              - {name: x-g, prefix_match: pre, invert_match: true}
                              - {name: x-h, suffix_match: suf}
                              - {name: x-i}
                          route:
                            cluster: cache
                            timeout: 0.25s
                            retry_policy:
                              retry_on: "5xx, unavailable,retriable-status-codes"
                              num_retries: "4"
                              per_try_timeout: 0.1s
                              retriable_status_codes: [503, "429"]
                              retry_back_off: {base_interval: 0.05s, max_interval: 2s}
                            max_stream_duration: {grpc_timeout_header_max: 30s}
                        - match: {safe_regex: {google_re2: {}, regex: "^/montage\\.[a-z]+\\.v1\\."}}
                          route: {cluster: generation, timeout: 600s}
                    - name: rest
                      domains: ["*"]
                      routes:
                        - match: {prefix: /v1/}
                          route: {cluster: generation}
                http_filters:
                  - name: envoy.filters.http.grpc_web
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb
                  - name: envoy.filters.http.grpc_json_transcoder
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
                      proto_descriptor: /opt/montage/share/montage/montage.pb
                      services: [montage.cache.v1.CacheService, montage.generation.v1.GenerationService]
                      print_options:
                        add_whitespace: true
                        always_print_primitive_fields: true
                        always_print_enums_as_ints: true
                        preserve_proto_field_names: true
                        stream_sse_style_delimited: true
                      auto_mapping: true
                      match_incoming_request_route: true
                      ignored_query_parameters: [api_key, trace]
                      ignore_unknown_query_parameters: true
                      convert_grpc_status: true
                      request_validation_options:
                        reject_unknown_method: true
                        reject_unknown_query_parameters: true
                        reject_binding_body_field_collisions: true
                      case_insensitive_enum_parsing: true
                      max_request_body_size: 1048576
                      max_response_body_size: "4194304"
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: generation
      type: STRICT_DNS
      lb_policy: LEAST_REQUEST
      connect_timeout: 0.75s
      dns_refresh_rate: 30s
      dns_lookup_family: V4_PREFERRED
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options:
              max_concurrent_streams: 100
              connection_keepalive: {timeout: 5s}
      load_assignment:
        cluster_name: generation
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: generation-1, port_value: 50051}
              - endpoint:
                  address:
                    socket_address: {address: 10.0.0.7, port_value: "50052"}
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: generation_2.internal, port_value: 65535}
      health_checks:
        - timeout: 1s
          interval: 5s
          no_traffic_interval: 60s
          unhealthy_interval: 2s
          healthy_edge_interval: 3s
          unhealthy_edge_interval: 4s
          unhealthy_threshold: 3
          healthy_threshold: "2"
          grpc_health_check:
            service_name: montage.generation.v1.GenerationService
            authority: generation.internal
      circuit_breakers:
        thresholds:
          - priority: HIGH
            max_requests: 7
          - priority: DEFAULT
            max_connections: 2048
            max_pending_requests: 20000
            max_requests: 20000
            max_retries: 50
            retry_budget:
              budget_percent: {value: 25.5}
              min_retry_concurrency: 10
          - priority: DEFAULT
            max_requests: 1
      outlier_detection:
        consecutive_5xx: 7
        consecutive_gateway_failure: 3
        interval: 2s
        base_ejection_time: 15s
        max_ejection_time: 60s
        max_ejection_percent: 50
        enforcing_consecutive_5xx: 0
        enforcing_consecutive_gateway_failure: 100
    - name: cache
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http_protocol_options: {}
      load_assignment:
        cluster_name: cache
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: "fd00::5", port_value: 6379}
)yaml";

TEST(BootstrapTest, FullConfigParsesEveryField) {
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap(kFull, "full.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const Bootstrap& b = *parsed;
  EXPECT_EQ(b.node_id, "gw-1");
  EXPECT_EQ(b.node_cluster, "edge");
  ASSERT_TRUE(b.admin.has_value());
  EXPECT_EQ(b.admin->address.address, "::1");
  EXPECT_EQ(b.admin->address.port_value, 9901u);

  ASSERT_EQ(b.listeners.size(), 1u);
  const Listener& listener = b.listeners[0];
  EXPECT_EQ(listener.name, "public");
  EXPECT_EQ(listener.address.address, "0.0.0.0");
  EXPECT_EQ(listener.address.port_value, 8443u);
  ASSERT_TRUE(listener.tls.has_value());
  EXPECT_EQ(listener.tls->certificate_chain_file, "/etc/tls/cert.pem");
  EXPECT_EQ(listener.tls->private_key_file, "/etc/tls/key.pem");
  EXPECT_THAT(listener.tls->alpn_protocols, ElementsAre("h2", "http/1.1"));

  const HttpConnectionManager& hcm = listener.http;
  EXPECT_EQ(hcm.stat_prefix, "public");
  EXPECT_EQ(hcm.codec_type, HttpConnectionManager::CodecType::kHttp2);
  EXPECT_EQ(hcm.stream_idle_timeout, absl::ZeroDuration());
  EXPECT_EQ(hcm.request_timeout, absl::Milliseconds(1500));
  EXPECT_EQ(hcm.idle_timeout, absl::Seconds(120));
  EXPECT_EQ(hcm.max_request_headers_kb, 96u);
  EXPECT_TRUE(hcm.use_remote_address);
  EXPECT_EQ(hcm.xff_num_trusted_hops, 2u);
  EXPECT_FALSE(hcm.generate_request_id);
  EXPECT_TRUE(hcm.preserve_external_request_id);
  EXPECT_EQ(hcm.http2_protocol_options.max_concurrent_streams, 500u);
  EXPECT_EQ(hcm.http2_protocol_options.initial_stream_window_size, 65536u);
  EXPECT_EQ(hcm.http2_protocol_options.initial_connection_window_size, 1048576u);
  EXPECT_EQ(hcm.http2_protocol_options.keepalive_interval, absl::Seconds(20));
  EXPECT_EQ(hcm.http2_protocol_options.keepalive_timeout, absl::Milliseconds(500));

  EXPECT_EQ(hcm.route_config.name, "main");
  ASSERT_EQ(hcm.route_config.virtual_hosts.size(), 2u);
  const VirtualHost& api = hcm.route_config.virtual_hosts[0];
  EXPECT_EQ(api.name, "api");
  EXPECT_THAT(api.domains, ElementsAre("api.example.com", "api.example.com:8443"));
  ASSERT_EQ(api.routes.size(), 2u);
  const Route& exact = api.routes[0];
  EXPECT_EQ(exact.name, "exact");
  EXPECT_EQ(exact.location.line, LineOf(kFull, "- name: exact"));
  EXPECT_EQ(exact.match.kind, RouteMatch::Kind::kPath);
  EXPECT_EQ(exact.match.value, "/montage.cache.v1.CacheService/Get");
  EXPECT_TRUE(exact.match.grpc);
  using K = HeaderMatcher::Kind;
  const std::vector<HeaderMatcher>& h = exact.match.headers;
  ASSERT_EQ(h.size(), 10u);
  EXPECT_EQ(h[0].name, "x-tenant");  // lower-cased
  EXPECT_EQ(h[0].kind, K::kExact);
  EXPECT_EQ(h[0].value, "blue");
  EXPECT_EQ(h[1].kind, K::kExact);
  EXPECT_EQ(h[1].value, "e");
  EXPECT_EQ(h[2].kind, K::kPrefix);
  EXPECT_EQ(h[2].value, "p");
  EXPECT_EQ(h[3].kind, K::kSuffix);
  EXPECT_EQ(h[3].value, "s");
  EXPECT_EQ(h[4].kind, K::kContains);
  EXPECT_EQ(h[4].value, "c");
  EXPECT_EQ(h[5].kind, K::kSafeRegex);
  EXPECT_EQ(h[5].value, "v[0-9]+");
  EXPECT_EQ(h[6].kind, K::kPresent);
  EXPECT_FALSE(h[6].present_match);
  EXPECT_EQ(h[7].kind, K::kPrefix);
  EXPECT_EQ(h[7].value, "pre");
  EXPECT_TRUE(h[7].invert_match);
  EXPECT_FALSE(h[6].invert_match);
  EXPECT_EQ(h[8].kind, K::kSuffix);
  EXPECT_EQ(h[9].kind, K::kPresent);  // no match kind: presence
  EXPECT_TRUE(h[9].present_match);

  const RouteAction& action = exact.route;
  EXPECT_EQ(action.cluster, "cache");
  EXPECT_EQ(action.timeout, absl::Milliseconds(250));
  EXPECT_EQ(action.grpc_timeout_header_max, absl::Seconds(30));
  ASSERT_TRUE(action.retry_policy.has_value());
  EXPECT_THAT(action.retry_policy->retry_on,
              ElementsAre("5xx", "unavailable", "retriable-status-codes"));
  EXPECT_EQ(action.retry_policy->num_retries, 4u);
  EXPECT_EQ(action.retry_policy->per_try_timeout, absl::Milliseconds(100));
  EXPECT_THAT(action.retry_policy->retriable_status_codes, ElementsAre(503u, 429u));
  EXPECT_EQ(action.retry_policy->base_interval, absl::Milliseconds(50));
  EXPECT_EQ(action.retry_policy->max_interval, absl::Seconds(2));

  const Route& regex = api.routes[1];
  EXPECT_EQ(regex.match.kind, RouteMatch::Kind::kSafeRegex);
  EXPECT_EQ(regex.match.value, "^/montage\\.[a-z]+\\.v1\\.");
  EXPECT_EQ(regex.route.cluster, "generation");
  EXPECT_EQ(regex.route.timeout, absl::Seconds(600));

  ASSERT_EQ(hcm.http_filters.size(), 3u);
  EXPECT_EQ(hcm.http_filters[0].type, HttpFilter::Type::kGrpcWeb);
  EXPECT_EQ(hcm.http_filters[0].name, "envoy.filters.http.grpc_web");
  EXPECT_EQ(hcm.http_filters[1].type, HttpFilter::Type::kGrpcJsonTranscoder);
  EXPECT_EQ(hcm.http_filters[2].type, HttpFilter::Type::kRouter);
  const GrpcJsonTranscoder& t = hcm.http_filters[1].transcoder;
  EXPECT_EQ(t.proto_descriptor, "/opt/montage/share/montage/montage.pb");
  EXPECT_THAT(t.services, ElementsAre("montage.cache.v1.CacheService",
                                      "montage.generation.v1.GenerationService"));
  EXPECT_TRUE(t.print_options.add_whitespace);
  EXPECT_TRUE(t.print_options.always_print_primitive_fields);
  EXPECT_TRUE(t.print_options.always_print_enums_as_ints);
  EXPECT_TRUE(t.print_options.preserve_proto_field_names);
  EXPECT_FALSE(t.print_options.stream_newline_delimited);
  EXPECT_TRUE(t.print_options.stream_sse_style_delimited);
  EXPECT_TRUE(t.auto_mapping);
  EXPECT_TRUE(t.match_incoming_request_route);
  EXPECT_THAT(t.ignored_query_parameters, ElementsAre("api_key", "trace"));
  EXPECT_TRUE(t.ignore_unknown_query_parameters);
  EXPECT_TRUE(t.convert_grpc_status);
  EXPECT_TRUE(t.request_validation_options.reject_unknown_method);
  EXPECT_TRUE(t.request_validation_options.reject_unknown_query_parameters);
  EXPECT_TRUE(t.request_validation_options.reject_binding_body_field_collisions);
  EXPECT_TRUE(t.case_insensitive_enum_parsing);
  EXPECT_EQ(t.max_request_body_size, 1048576u);
  EXPECT_EQ(t.max_response_body_size, 4194304u);

  ASSERT_EQ(b.clusters.size(), 2u);
  const Cluster& gen = b.clusters[0];
  EXPECT_EQ(gen.name, "generation");
  EXPECT_EQ(gen.type, Cluster::Type::kStrictDns);
  EXPECT_EQ(gen.lb_policy, Cluster::LbPolicy::kLeastRequest);
  EXPECT_EQ(gen.connect_timeout, absl::Milliseconds(750));
  EXPECT_EQ(gen.dns_refresh_rate, absl::Seconds(30));
  EXPECT_EQ(gen.dns_lookup_family, Cluster::DnsLookupFamily::kV4Preferred);
  EXPECT_TRUE(gen.http2);
  EXPECT_EQ(gen.http2_options.max_concurrent_streams, 100u);
  EXPECT_FALSE(gen.http2_options.keepalive_interval.has_value());
  EXPECT_EQ(gen.http2_options.keepalive_timeout, absl::Seconds(5));
  ASSERT_EQ(gen.endpoints.size(), 3u);
  EXPECT_EQ(gen.endpoints[0].address, "generation-1");
  EXPECT_EQ(gen.endpoints[0].port_value, 50051u);
  EXPECT_EQ(gen.endpoints[1].address, "10.0.0.7");
  EXPECT_EQ(gen.endpoints[1].port_value, 50052u);
  EXPECT_EQ(gen.endpoints[2].address, "generation_2.internal");
  EXPECT_EQ(gen.endpoints[2].port_value, 65535u);
  ASSERT_EQ(gen.health_checks.size(), 1u);
  const HealthCheck& hc = gen.health_checks[0];
  EXPECT_EQ(hc.timeout, absl::Seconds(1));
  EXPECT_EQ(hc.interval, absl::Seconds(5));
  EXPECT_EQ(hc.no_traffic_interval, absl::Seconds(60));
  EXPECT_EQ(hc.unhealthy_interval, absl::Seconds(2));
  EXPECT_EQ(hc.healthy_edge_interval, absl::Seconds(3));
  EXPECT_EQ(hc.unhealthy_edge_interval, absl::Seconds(4));
  EXPECT_EQ(hc.unhealthy_threshold, 3u);
  EXPECT_EQ(hc.healthy_threshold, 2u);
  EXPECT_EQ(hc.grpc_service_name, "montage.generation.v1.GenerationService");
  EXPECT_EQ(hc.grpc_authority, "generation.internal");
  // The first DEFAULT entry wins; HIGH is read but does not apply.
  const CircuitBreakerThresholds& cb = gen.circuit_breakers;
  EXPECT_EQ(cb.priority, CircuitBreakerThresholds::Priority::kDefault);
  EXPECT_EQ(cb.max_connections, 2048u);
  EXPECT_EQ(cb.max_pending_requests, 20000u);
  EXPECT_EQ(cb.max_requests, 20000u);
  EXPECT_EQ(cb.max_retries, 50u);
  ASSERT_TRUE(cb.retry_budget.has_value());
  EXPECT_EQ(cb.retry_budget->budget_percent, 25.5);
  EXPECT_EQ(cb.retry_budget->min_retry_concurrency, 10u);
  ASSERT_TRUE(gen.outlier_detection.has_value());
  const OutlierDetection& od = *gen.outlier_detection;
  EXPECT_EQ(od.consecutive_5xx, 7u);
  EXPECT_EQ(od.consecutive_gateway_failure, 3u);
  EXPECT_EQ(od.interval, absl::Seconds(2));
  EXPECT_EQ(od.base_ejection_time, absl::Seconds(15));
  EXPECT_EQ(od.max_ejection_time, absl::Seconds(60));
  EXPECT_EQ(od.max_ejection_percent, 50u);
  EXPECT_EQ(od.enforcing_consecutive_5xx, 0u);
  EXPECT_EQ(od.enforcing_consecutive_gateway_failure, 100u);
  EXPECT_EQ(gen.location.line, LineOf(kFull, "- name: generation"));

  const Cluster& cache = b.clusters[1];
  EXPECT_EQ(cache.type, Cluster::Type::kStatic);
  EXPECT_FALSE(cache.http2);  // explicit HTTP/1.1
  ASSERT_EQ(cache.endpoints.size(), 1u);
  EXPECT_EQ(cache.endpoints[0].address, "fd00::5");
}

TEST(BootstrapTest, DeployEnvoyYamlParsesWithTheSuitesClustersAndTimeouts) {
  absl::StatusOr<Bootstrap> parsed = LoadBootstrapFile(MONTAGE_DEPLOY_ENVOY_YAML);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_TRUE(parsed->admin.has_value());
  EXPECT_EQ(parsed->admin->address.address, "0.0.0.0");
  EXPECT_EQ(parsed->admin->address.port_value, 9901u);
  ASSERT_EQ(parsed->listeners.size(), 1u);
  const Listener& listener = parsed->listeners[0];
  EXPECT_EQ(listener.address.address, "0.0.0.0");
  EXPECT_EQ(listener.address.port_value, 8080u);

  const HttpConnectionManager& hcm = listener.http;
  ASSERT_EQ(hcm.http_filters.size(), 3u);
  EXPECT_EQ(hcm.http_filters[0].type, HttpFilter::Type::kGrpcWeb);
  EXPECT_EQ(hcm.http_filters[1].type, HttpFilter::Type::kGrpcJsonTranscoder);
  EXPECT_EQ(hcm.http_filters[2].type, HttpFilter::Type::kRouter);
  const GrpcJsonTranscoder& t = hcm.http_filters[1].transcoder;
  EXPECT_EQ(t.proto_descriptor, "/opt/montage/share/montage/montage.pb");
  EXPECT_THAT(t.services,
              ::testing::UnorderedElementsAre(
                  "montage.cache.v1.CacheService", "montage.generation.v1.GenerationService",
                  "montage.speech.v1.SpeechService", "montage.analytics.v1.AnalyticsService",
                  "montage.render.v1.RenderService", "montage.gateway.v1.BatchService"));
  EXPECT_TRUE(t.convert_grpc_status);
  EXPECT_FALSE(t.match_incoming_request_route);  // routes match the transcoded gRPC path
  // The idle timeout must outlast the longest unary wait so the route timeout fires first.
  EXPECT_GT(hcm.stream_idle_timeout, absl::Seconds(600));

  // Route timeouts by the gRPC path they match.
  std::map<std::string, const Route*> by_match;
  for (const Route& r : hcm.route_config.virtual_hosts.at(0).routes) by_match[r.match.value] = &r;
  const auto timeout_of = [&](const std::string& match) {
    auto it = by_match.find(match);
    EXPECT_NE(it, by_match.end()) << match;
    return it == by_match.end() ? absl::InfiniteDuration() : it->second->route.timeout;
  };
  EXPECT_EQ(timeout_of("/montage.generation.v1.GenerationService/"), absl::Seconds(600));
  EXPECT_EQ(timeout_of("/montage.speech.v1.SpeechService/"), absl::Seconds(600));
  EXPECT_EQ(timeout_of("/montage.render.v1.RenderService/WatchJob"), absl::ZeroDuration());
  EXPECT_EQ(timeout_of("/montage.render.v1.RenderService/DownloadOutput"), absl::ZeroDuration());
  EXPECT_LE(timeout_of("/montage.cache.v1.CacheService/"), absl::Seconds(60));
  EXPECT_GT(timeout_of("/montage.cache.v1.CacheService/"), absl::ZeroDuration());
  // Exact paths come before the prefix that also covers them.
  const auto& routes = hcm.route_config.virtual_hosts.at(0).routes;
  const auto index_of = [&](const std::string& match) {
    for (std::size_t i = 0; i < routes.size(); ++i) {
      if (routes[i].match.value == match) return i;
    }
    return routes.size();
  };
  EXPECT_LT(index_of("/montage.render.v1.RenderService/WatchJob"),
            index_of("/montage.render.v1.RenderService/"));
  EXPECT_LT(index_of("/montage.generation.v1.GenerationService/GenerateCampaign"),
            index_of("/montage.generation.v1.GenerationService/"));

  std::vector<std::string> names;
  for (const Cluster& c : parsed->clusters) {
    names.push_back(c.name);
    SCOPED_TRACE(c.name);
    EXPECT_EQ(c.type, Cluster::Type::kStrictDns);
    EXPECT_TRUE(c.http2);
    ASSERT_EQ(c.endpoints.size(), 1u);
    EXPECT_EQ(c.endpoints[0].address, c.name);  // the compose service name
    EXPECT_EQ(c.endpoints[0].port_value, 50051u);
    ASSERT_EQ(c.health_checks.size(), 1u);
    EXPECT_THAT(c.health_checks[0].grpc_service_name, ::testing::StartsWith("montage." + c.name));
    // 10,000 concurrent requests must not trip the breakers.
    EXPECT_GE(c.circuit_breakers.max_requests, 10000u);
    EXPECT_GE(c.circuit_breakers.max_pending_requests, 10000u);
    EXPECT_TRUE(c.outlier_detection.has_value());
  }
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("cache", "generation", "speech", "analytics",
                                                     "render"));
}

// ---- errors -----------------------------------------------------------------------------------

TEST(BootstrapErrorTest, UnknownTopLevelField) {
  const std::string yaml = absl::StrCat("stats_sinks: []\n", kMinimal);
  ExpectInvalid(yaml, 1,
                {"test.yaml:1:1: bootstrap: unknown field 'stats_sinks'",
                 "(montage's gateway accepts: node, admin, static_resources)"});
}

TEST(BootstrapErrorTest, UnknownFieldInClusterNamesPathLineAndColumn) {
  const std::string yaml = Replace(kMinimal, "    - name: backend\n",
                                   "    - name: backend\n      lb_polcy: ROUND_ROBIN\n");
  const int line = LineOf(yaml, "lb_polcy");
  const std::string message =
      ExpectInvalid(yaml, line,
                    {"static_resources.clusters[0]: unknown field 'lb_polcy'", "lb_policy",
                     "connect_timeout", "outlier_detection"});
  EXPECT_THAT(message, HasSubstr(absl::StrCat("test.yaml:", line, ":7:")));
}

TEST(BootstrapErrorTest, UnknownFieldDeepInARoute) {
  const std::string yaml = Replace(kMinimal, "route: {cluster: backend}",
                                   "route: {cluster: backend, prefix_rewrite: /x}");
  ExpectInvalid(yaml, LineOf(yaml, "prefix_rewrite"),
                {"static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
                 "route_config.virtual_hosts[0].routes[0].route: unknown field 'prefix_rewrite'",
                 "accepts: cluster, timeout, retry_policy, max_stream_duration"});
}

TEST(BootstrapErrorTest, UnknownFieldInAnEndpointAddress) {
  const std::string yaml =
      Replace(kMinimal, "socket_address: {address: 127.0.0.1, port_value: 50051}",
              "socket_address: {address: 127.0.0.1, port_value: 50051, ipv4_compat: true}");
  ExpectInvalid(yaml, LineOf(yaml, "ipv4_compat"),
                {"static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]."
                 "endpoint.address.socket_address: unknown field 'ipv4_compat'"});
}

TEST(BootstrapErrorTest, UnknownFieldInTheTranscoder) {
  const std::string yaml = Replace(kMinimal, "                http_filters:\n",
                                   R"(                http_filters:
                  - name: envoy.filters.http.grpc_json_transcoder
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
                      proto_descriptor: /x.pb
                      url_unescape_spec: ALL_CHARACTERS
)");
  ExpectInvalid(
      yaml, LineOf(yaml, "url_unescape_spec"),
      {"http_filters[0].typed_config: unknown field 'url_unescape_spec'", "convert_grpc_status"});
}

TEST(BootstrapErrorTest, RefusedFieldsSayWhatToDoInstead) {
  const std::string yaml = Replace(kMinimal, "                http_filters:\n",
                                   R"(                http_filters:
                  - name: envoy.filters.http.grpc_json_transcoder
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
                      proto_descriptor_bin: Cg==
)");
  ExpectInvalid(yaml, LineOf(yaml, "proto_descriptor_bin"),
                {"'proto_descriptor_bin' is not supported", "file", "proto_descriptor"});

  const std::string admin = absl::StrCat(
      "admin:\n  access_log_path: /dev/null\n  address:\n    socket_address: {address: "
      "127.0.0.1, port_value: 9901}\n",
      kMinimal);
  ExpectInvalid(admin, 2, {"admin: field 'access_log_path' is not supported"});
}

TEST(BootstrapErrorTest, WrongTypeUrls) {
  ExpectInvalid(Replace(kMinimal, "http_connection_manager.v3.HttpConnectionManager",
                        "tcp_proxy.v3.TcpProxy"),
                LineOf(kMinimal, "v3.HttpConnectionManager"),
                {"filters[0].typed_config.@type",
                 "needs \"@type\": type.googleapis.com/"
                 "envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
                 "got 'type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3."
                 "TcpProxy'"});
  ExpectInvalid(Replace(kMinimal, "filters.http.router.v3.Router", "filters.http.buffer.v3.Buffer"),
                LineOf(kMinimal, "router.v3.Router"),
                {"http_filters[0].typed_config.@type", "HTTP filter 'envoy.filters.http.router'",
                 "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"});
  // A filter with a name of its own is known by its type, and an unknown type is refused.
  ExpectInvalid(Replace(Replace(kMinimal, "- name: envoy.filters.http.router", "- name: buffer"),
                        "filters.http.router.v3.Router", "filters.http.buffer.v3.Buffer"),
                LineOf(kMinimal, "router.v3.Router"),
                {"HTTP filter type", "buffer.v3.Buffer' is not supported",
                 "grpc_json_transcoder.v3.GrpcJsonTranscoder"});
}

TEST(BootstrapErrorTest, WrongProtocolOptionsTypeAndKey) {
  const std::string options = R"(      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.config.core.v3.Http2ProtocolOptions
          explicit_http_config: {http2_protocol_options: {}}
)";
  const std::string yaml = WithClusterFields(options);
  ExpectInvalid(yaml, LineOf(yaml, "Http2ProtocolOptions"),
                {"typed_extension_protocol_options['envoy.extensions.upstreams.http.v3."
                 "HttpProtocolOptions'].@type",
                 "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"});
  const std::string key = Replace(options, "        envoy.extensions.upstreams.http.v3.",
                                  "        envoy.extensions.upstreams.tcp.v3.");
  const std::string yaml2 = WithClusterFields(key);
  ExpectInvalid(yaml2, LineOf(yaml2, "upstreams.tcp.v3"),
                {"unknown protocol options 'envoy.extensions.upstreams.tcp.v3."});
}

TEST(BootstrapErrorTest, TlsNeedsTheDownstreamTlsContext) {
  const std::string yaml = Replace(kMinimal, "        - filters:\n", R"(        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
              common_tls_context: {}
          filters:
)");
  ExpectInvalid(
      yaml, LineOf(yaml, "UpstreamTlsContext"),
      {"filter_chains[0].transport_socket.typed_config.@type", "tls.v3.DownstreamTlsContext"});
}

TEST(BootstrapErrorTest, DurationsAreProto3JsonSeconds) {
  for (absl::string_view bad : {"300ms", "15", "1.5", "1m", "s", "1.0000000001s", "abc"}) {
    SCOPED_TRACE(bad);
    const std::string yaml = Replace(kMinimal, "route: {cluster: backend}",
                                     absl::StrCat("route: {cluster: backend, timeout: ", bad, "}"));
    ExpectInvalid(yaml, LineOf(yaml, "timeout:"),
                  {"virtual_hosts[0].routes[0].route.timeout", "'s' suffix", "\"0.25s\""});
  }
  const std::string negative =
      Replace(kMinimal, "route: {cluster: backend}", "route: {cluster: backend, timeout: -1s}");
  ExpectInvalid(negative, LineOf(negative, "timeout:"), {"must not be negative"});
  const std::string zero_connect = Replace(kMinimal, "    - name: backend\n",
                                           "    - name: backend\n      connect_timeout: 0s\n");
  ExpectInvalid(zero_connect, LineOf(zero_connect, "connect_timeout"),
                {"clusters[0].connect_timeout", "greater than 0s"});
  // The forms that are right parse to the right values.
  for (const auto& [text, expected] : std::vector<std::pair<std::string, absl::Duration>>{
           {"0s", absl::ZeroDuration()},
           {"\"15s\"", absl::Seconds(15)},
           {"0.25s", absl::Milliseconds(250)},
           {"1.000000001s", absl::Nanoseconds(1000000001)}}) {
    SCOPED_TRACE(text);
    absl::StatusOr<Bootstrap> parsed =
        ParseBootstrap(Replace(kMinimal, "route: {cluster: backend}",
                               absl::StrCat("route: {cluster: backend, timeout: ", text, "}")),
                       "t.yaml");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->listeners[0].http.route_config.virtual_hosts[0].routes[0].route.timeout,
              expected);
  }
}

TEST(BootstrapErrorTest, WrongScalarTypes) {
  const std::string port = Replace(kMinimal, "port_value: 50051", "port_value: abc");
  ExpectInvalid(port, LineOf(port, "port_value: abc"),
                {"static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]."
                 "endpoint.address.socket_address.port_value",
                 "expected an unsigned integer, got 'abc'"});
  const std::string range = Replace(kMinimal, "port_value: 50051", "port_value: 70000");
  ExpectInvalid(range, LineOf(range, "70000"), {"between 1 and 65535, got 70000"});
  const std::string zero = Replace(kMinimal, "port_value: 50051", "port_value: 0");
  ExpectInvalid(zero, LineOf(kMinimal, "port_value: 50051"), {"between 1 and 65535"});
  const std::string negative =
      Replace(kMinimal, "stat_prefix: ingress",
              "stat_prefix: ingress\n                xff_num_trusted_hops: -1");
  ExpectInvalid(negative, LineOf(negative, "xff_num"), {"expected an unsigned integer"});
  // proto3 JSON booleans are bare true/false.
  const std::string quoted_bool =
      Replace(kMinimal, "stat_prefix: ingress",
              "stat_prefix: ingress\n                use_remote_address: \"true\"");
  ExpectInvalid(quoted_bool, LineOf(quoted_bool, "use_remote_address"),
                {"typed_config.use_remote_address", "expected true or false"});
  const std::string yes = Replace(kMinimal, "stat_prefix: ingress",
                                  "stat_prefix: ingress\n                use_remote_address: yes");
  ExpectInvalid(yes, LineOf(yes, "use_remote_address"), {"expected true or false, got 'yes'"});
  const std::string list = Replace(kMinimal, "domains: [\"*\"]", "domains: \"*\"");
  ExpectInvalid(list, LineOf(list, "domains"), {"virtual_hosts[0].domains", "expected a list"});
  const std::string map = Replace(kMinimal, "match: {prefix: /}", "match: /");
  ExpectInvalid(map, LineOf(map, "match: /"), {"routes[0].match", "expected a map, got '/'"});
}

TEST(BootstrapErrorTest, BadEnumsListWhatIsSupported) {
  const std::string ring = Replace(kMinimal, "    - name: backend\n",
                                   "    - name: backend\n      lb_policy: RING_HASH\n");
  ExpectInvalid(
      ring, LineOf(ring, "RING_HASH"),
      {"static_resources.clusters[0].lb_policy", "RING_HASH is not supported by montage's gateway",
       "(supported: ROUND_ROBIN, LEAST_REQUEST)"});
  const std::string typo =
      Replace(kMinimal, "    - name: backend\n", "    - name: backend\n      type: STRICTDNS\n");
  ExpectInvalid(typo, LineOf(typo, "STRICTDNS"),
                {"clusters[0].type", "unknown value 'STRICTDNS'", "STATIC, STRICT_DNS"});
  const std::string codec = Replace(kMinimal, "stat_prefix: ingress",
                                    "stat_prefix: ingress\n                codec_type: HTTP3");
  ExpectInvalid(codec, LineOf(codec, "HTTP3"), {"codec_type", "HTTP3 is not supported"});
}

TEST(BootstrapErrorTest, MissingRequiredFields) {
  const std::string no_name =
      Replace(kMinimal, "    - name: backend\n      load_assignment:", "    - load_assignment:");
  ExpectInvalid(no_name, LineOf(no_name, "- load_assignment:"),
                {"static_resources.clusters[0].name: required field is missing"});

  const std::string no_address =
      Replace(kMinimal, "socket_address: {address: 127.0.0.1, port_value: 50051}",
              "socket_address: {port_value: 50051}");
  ExpectInvalid(no_address, LineOf(no_address, "{port_value: 50051}"),
                {"endpoint.address.socket_address.address: required field is missing"});

  const std::string no_cluster =
      Replace(kMinimal, "route: {cluster: backend}", "route: {timeout: 1s}");
  ExpectInvalid(no_cluster, LineOf(no_cluster, "route: {timeout"),
                {"routes[0].route.cluster: required field is missing"});

  const std::vector<std::pair<absl::string_view, absl::string_view>> fields = {
      {"timeout", "1s"},
      {"interval", "5s"},
      {"unhealthy_threshold", "3"},
      {"healthy_threshold", "1"}};
  for (const auto& [omitted, unused] : fields) {
    SCOPED_TRACE(omitted);
    std::vector<std::string> given;
    for (const auto& [field, value] : fields) {
      if (field != omitted) given.push_back(absl::StrCat(field, ": ", value));
    }
    given.push_back("grpc_health_check: {}");
    const std::string yaml = WithClusterFields(
        absl::StrCat("      http2_protocol_options: {}\n      health_checks:\n        - {",
                     absl::StrJoin(given, ", "), "}\n"));
    ExpectInvalid(yaml, LineOf(yaml, "        - {"),
                  {absl::StrCat("static_resources.clusters[0].health_checks[0].", omitted,
                                ": required field is missing")});
  }
}

TEST(BootstrapErrorTest, DuplicateNames) {
  const std::string second_cluster = R"(    - name: backend
      load_assignment: {cluster_name: backend}
)";
  const std::string clusters = absl::StrCat(kMinimal, second_cluster);
  const int second = LineOf(clusters, "load_assignment: {cluster_name") - 1;
  ExpectInvalid(clusters, second,
                {"static_resources.clusters[1].name", "duplicate cluster name 'backend'",
                 absl::StrCat("first at line ", LineOf(kMinimal, "- name: backend"))});

  // The listener block again, on another port.
  const std::size_t begin = kMinimal.find("    - name: ingress");
  const std::size_t end = kMinimal.find("  clusters:");
  std::string listener(kMinimal.substr(begin, end - begin));
  listener = Replace(listener, "port_value: 0", "port_value: 8081");
  const std::string listeners = Replace(kMinimal, "  clusters:\n", listener + "  clusters:\n");
  const int line = LineOf(listeners, "port_value: 8081") - 2;
  ExpectInvalid(listeners, line,
                {"static_resources.listeners[1].name", "duplicate listener name 'ingress'"});
}

TEST(BootstrapErrorTest, RouteToAnUnknownCluster) {
  const std::string yaml =
      Replace(kMinimal, "route: {cluster: backend}", "route: {cluster: backnd}");
  const std::string message =
      ExpectInvalid(yaml, LineOf(yaml, "backnd"),
                    {"virtual_hosts[0].routes[0].route.cluster", "unknown cluster 'backnd'",
                     "(defined clusters: backend)"});
}

TEST(BootstrapErrorTest, RouterMustBeLast) {
  const std::string after = Replace(
      kMinimal,
      R"(                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
)",
      R"(                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                  - name: envoy.filters.http.grpc_web
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb
)");
  ExpectInvalid(after, LineOf(after, "- name: envoy.filters.http.grpc_web"),
                {"typed_config.http_filters[1]", "envoy.filters.http.router must be the last",
                 "'envoy.filters.http.grpc_web' follows it"});

  const std::string none = Replace(
      Replace(kMinimal, "- name: envoy.filters.http.router", "- name: envoy.filters.http.grpc_web"),
      "filters.http.router.v3.Router", "filters.http.grpc_web.v3.GrpcWeb");
  ExpectInvalid(none, LineOf(none, "- name: envoy.filters.http.grpc_web"),
                {"typed_config.http_filters[0]: the last HTTP filter must be "
                 "envoy.filters.http.router",
                 "not 'envoy.filters.http.grpc_web'"});

  const std::string empty = Replace(
      Replace(kMinimal, "                http_filters:\n", "                http_filters: []\n"),
      R"(                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
)",
      "");
  ExpectInvalid(empty, LineOf(empty, "http_filters: []"),
                {"typed_config.http_filters: needs at least the envoy.filters.http.router"});
}

TEST(BootstrapErrorTest, OneFilterChainOnly) {
  const std::size_t begin = kMinimal.find("        - filters:");
  const std::size_t end = kMinimal.find("  clusters:");
  const std::string chain(kMinimal.substr(begin, end - begin));
  const std::string yaml = Replace(kMinimal, "  clusters:\n", chain + "  clusters:\n");
  const int second = LineOf(yaml, "  clusters:") -
                     (LineOf(kMinimal, "  clusters:") - LineOf(kMinimal, "        - filters:"));
  ExpectInvalid(yaml, second,
                {"static_resources.listeners[0].filter_chains[1]",
                 "exactly one filter chain per listener (found 2)"});
}

TEST(BootstrapErrorTest, StaticClustersNeedIpLiterals) {
  const std::string yaml = Replace(kMinimal, "{address: 127.0.0.1, port_value: 50051}",
                                   "{address: backend.local, port_value: 50051}");
  ExpectInvalid(yaml, LineOf(yaml, "backend.local"),
                {"socket_address.address", "STATIC cluster needs IP literals", "type: STRICT_DNS"});
  // The same name is fine for STRICT_DNS.
  EXPECT_TRUE(ParseBootstrap(Replace(yaml, "    - name: backend\n",
                                     "    - name: backend\n      type: STRICT_DNS\n"),
                             "t.yaml")
                  .ok());
  // A listener cannot bind a host name.
  const std::string listener = Replace(kMinimal, "{address: 127.0.0.1, port_value: 0}",
                                       "{address: localhost, port_value: 0}");
  ExpectInvalid(listener, LineOf(listener, "localhost"), {"must be an IP literal"});
}

TEST(BootstrapErrorTest, GrpcHealthChecksNeedHttp2) {
  const std::string yaml = WithClusterFields(R"(      health_checks:
        - {timeout: 1s, interval: 5s, unhealthy_threshold: 3, healthy_threshold: 1,
           grpc_health_check: {service_name: x}}
)");
  ExpectInvalid(yaml, LineOf(yaml, "grpc_health_check"),
                {"health_checks[0].grpc_health_check", "need HTTP/2"});
}

TEST(BootstrapErrorTest, RouteMatchNeedsExactlyOneKind) {
  const std::string both = Replace(kMinimal, "match: {prefix: /}", "match: {prefix: /, path: /a}");
  ExpectInvalid(both, LineOf(both, "path: /a"),
                {"routes[0].match.path", "only one of prefix, path, safe_regex"});
  const std::string none = Replace(kMinimal, "match: {prefix: /}", "match: {grpc: {}}");
  ExpectInvalid(none, LineOf(none, "grpc: {}"), {"needs exactly one of prefix, path, safe_regex"});
  const std::string grpc_field =
      Replace(kMinimal, "match: {prefix: /}", "match: {prefix: /, grpc: {x: 1}}");
  ExpectInvalid(grpc_field, LineOf(grpc_field, "grpc:"),
                {"routes[0].match.grpc: unknown field 'x' (no fields; write {})"});
}

TEST(BootstrapErrorTest, UnsupportedRetryCondition) {
  const std::string yaml = Replace(kMinimal, "route: {cluster: backend}",
                                   "route: {cluster: backend, retry_policy: {retry_on: "
                                   "\"5xx,envoy-ratelimited\"}}");
  ExpectInvalid(
      yaml, LineOf(yaml, "retry_on"),
      {"retry_policy.retry_on", "'envoy-ratelimited' is not supported", "retriable-status-codes"});
}

TEST(BootstrapErrorTest, NullsAndRepeatedKeysAreRefused) {
  const std::string null_value =
      Replace(kMinimal, "    - name: backend\n", "    - name: backend\n      outlier_detection:\n");
  ExpectInvalid(null_value, LineOf(null_value, "outlier_detection"),
                {"clusters[0].outlier_detection: has no value", "write {}"});
  const std::string twice =
      Replace(kMinimal, "    - name: backend\n", "    - name: backend\n      name: other\n");
  ExpectInvalid(twice, LineOf(twice, "name: other"), {"clusters[0].name: field given twice"});
}

TEST(BootstrapErrorTest, MalformedYamlAndEmptyDocuments) {
  absl::StatusOr<Bootstrap> parsed = ParseBootstrap("a: [1, 2\nb: 3\n", "bad.yaml");
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(parsed.status().message()), ::testing::StartsWith("bad.yaml:"));
  EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("invalid YAML"));

  parsed = ParseBootstrap("", "empty.yaml");
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(parsed.status().message()),
              HasSubstr("empty.yaml:1:1: bootstrap: the document is empty"));

  parsed = ParseBootstrap("[1, 2]", "list.yaml");
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("expected a map, got a list"));

  parsed = ParseBootstrap(absl::StrCat(kMinimal, "---\n", kMinimal), "two.yaml");
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("expected one YAML document"));
}

TEST(BootstrapErrorTest, LoadBootstrapFileReportsUnreadableFiles) {
  absl::StatusOr<Bootstrap> parsed = LoadBootstrapFile("/nonexistent/montage/envoy.yaml");
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("/nonexistent/montage/envoy.yaml"));
}

}  // namespace
}  // namespace montage::gateway::config
