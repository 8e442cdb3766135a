// Unary gRPC calls straight over HTTP/2 connections that the worker loops own: nghttp2's client
// session on a libevent bufferevent, on the same loop as the downstream stream, so a proxied
// unary call never leaves its thread (no gRPC client library, no completion queue, no hop back).
//
// Each worker keeps one connection per upstream host (a second while the first drains after a
// GOAWAY or runs out of stream ids); requests over the peer's SETTINGS_MAX_CONCURRENT_STREAMS
// wait inside nghttp2 until a stream closes. Only hosts with an IP address take this path (STATIC
// clusters); STRICT_DNS hosts and streaming calls keep gRPC's client, which resolves names.
//
// Failures map as gRPC's client maps them (doc/http-grpc-status-mapping.md and the RST_STREAM
// table of doc/PROTOCOL-HTTP2.md): a connection that fails or closes, or a stream refused, is
// UNAVAILABLE (safe to retry), a missing grpc-status takes its code from the HTTP status.
#ifndef MONTAGE_GATEWAY_PROXY_H2_UPSTREAM_H_
#define MONTAGE_GATEWAY_PROXY_H2_UPSTREAM_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "gateway/server/http_stream.h"
#include "grpcpp/support/status.h"

namespace montage::gateway {

class EventLoop;
class UpstreamHost;
class Cluster;
class H2UpstreamConnection;

// What a unary call produced (both transports).
struct UnaryResult {
  grpc::Status status;
  HeaderList initial_metadata;   // "-bin" values base64 as on the wire; grpc-* and
  HeaderList trailing_metadata;  // content-type excluded
  std::string response;          // the response message, unframed (OK only)
};

struct H2UnaryRequest {
  std::string method;  // "/pkg.Service/Method"
  absl::Time deadline = absl::InfiniteFuture();
  HeaderList metadata;  // "-bin" values binary (they are base64-encoded here)
  std::string message;  // the request message, unframed
};

// A call in flight; Cancel() resets the stream and drops the report. Loop thread only.
class H2UnaryCall {
 public:
  ~H2UnaryCall() { Cancel(); }
  void Cancel();

 private:
  friend class H2UpstreamPool;
  std::weak_ptr<H2UpstreamConnection> connection_;
  int32_t stream_id_ = -1;
  // Set by Cancel; every report of the call checks it first (loop thread only).
  std::shared_ptr<bool> cancelled_;
};

// One per worker loop: that loop's connections to every host. Created and destroyed on the loop
// thread; destroying it closes the connections and drops their calls' reports.
class H2UpstreamPool {
 public:
  explicit H2UpstreamPool(EventLoop& loop) : loop_(loop) {}
  ~H2UpstreamPool();
  H2UpstreamPool(const H2UpstreamPool&) = delete;
  H2UpstreamPool& operator=(const H2UpstreamPool&) = delete;

  // Starts `request` on a connection to `host` of `cluster` (the host must have a direct
  // address). `done` runs
  // once on the loop, never inside this call, unless the returned call is cancelled or destroyed
  // first.
  std::unique_ptr<H2UnaryCall> Start(Cluster& cluster, UpstreamHost& host, H2UnaryRequest request,
                                     std::function<void(UnaryResult&)> done);

  // Connections open now (all hosts), for tests.
  size_t connection_count() const;

 private:
  friend class H2UpstreamConnection;
  void Remove(H2UpstreamConnection* connection);
  // Reports UNAVAILABLE with `message` on the next loop turn unless `call` is cancelled first.
  std::unique_ptr<H2UnaryCall> FailSoon(std::unique_ptr<H2UnaryCall> call,
                                        std::function<void(UnaryResult&)> done,
                                        std::string message);

  EventLoop& loop_;
  absl::flat_hash_map<UpstreamHost*, std::vector<std::shared_ptr<H2UpstreamConnection>>>
      connections_;
};

// The gRPC status for a response that carried no grpc-status, by its HTTP status.
grpc::StatusCode GrpcCodeForHttpStatus(int http_status);
// The gRPC status for a stream the peer reset with an HTTP/2 error code.
grpc::StatusCode GrpcCodeForH2Error(uint32_t error_code);
// The grpc-timeout header value for `remaining` (at most 8 digits, the coarsest unit that keeps
// it exact enough; never zero).
std::string GrpcTimeoutHeader(absl::Duration remaining);
// Decodes a grpc-message value (percent-encoded UTF-8); invalid escapes are kept as they are.
std::string PercentDecodeGrpcMessage(absl::string_view value);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_H2_UPSTREAM_H_
