// Shared by the gateway's tests: an Envoy bootstrap in front of echo backends, and bounded
// polling (tests/testing/eventually.h). Header-only so any test target that links
// montage::echo_backend can use it.
#ifndef MONTAGE_TESTS_GATEWAY_TEST_SUPPORT_H_
#define MONTAGE_TESTS_GATEWAY_TEST_SUPPORT_H_

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/testing/eventually.h"

namespace montage::testing {

// One listener on 127.0.0.1:0 whose single route sends `route_prefix` to the HTTP/2 cluster
// "echo" (the backends on `ports`); `filters` go before the router.
struct TestBootstrap {
  std::vector<int> ports;
  std::string route_prefix = "/";
  std::string route_action = "{ cluster: echo, timeout: 30s }";
  bool grpc_web = false;
  // A grpc_json_transcoder for these services of `descriptors` (none when empty); its extra
  // fields are YAML lines indented by 14 spaces.
  std::string descriptors;
  std::vector<std::string> services;
  std::string transcoder_extra;
  std::string cluster_extra;  // YAML lines indented by 4 spaces
};

inline std::string TestBootstrapYaml(const TestBootstrap& b) {
  std::string filters;
  if (b.grpc_web) {
    absl::StrAppend(&filters, R"(
          - name: envoy.filters.http.grpc_web
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb)");
  }
  if (!b.descriptors.empty()) {
    absl::StrAppend(&filters, R"(
          - name: envoy.filters.http.grpc_json_transcoder
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
              proto_descriptor: ")",
                    b.descriptors, R"("
              services: [)",
                    absl::StrJoin(b.services, ", "), "]\n", b.transcoder_extra);
  }
  std::string endpoints;
  for (int port : b.ports) {
    absl::StrAppend(&endpoints, R"(
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: )",
                    port, " }");
  }
  return absl::StrCat(R"(static_resources:
  listeners:
  - name: edge
    address:
      socket_address: { address: 127.0.0.1, port_value: 0 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          route_config:
            name: routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: ")",
                      b.route_prefix, R"(" }
                route: )",
                      b.route_action, R"(
          http_filters:)",
                      filters, R"(
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
)",
                      b.cluster_extra, R"(    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:)",
                      endpoints, "\n");
}

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_GATEWAY_TEST_SUPPORT_H_
