// The gRPC proxy handler: a downstream stream carrying gRPC (native, or gRPC-Web binary or text)
// bridged message by message to an UpstreamCall. All four streaming shapes are the same to it.
// Trailers, deadlines and cancellation pass through both ways; a client that goes away cancels
// the upstream call at once; memory per stream is bounded in both directions (the downstream
// send queue and the upstream write queue each stop their producer above a limit).
#ifndef MONTAGE_GATEWAY_PROXY_GRPC_PROXY_H_
#define MONTAGE_GATEWAY_PROXY_GRPC_PROXY_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "gateway/proxy/upstream_call.h"
#include "gateway/server/http_stream.h"

namespace montage::gateway {

enum class GrpcWireMode {
  kNative,     // application/grpc over HTTP/2, trailers as HTTP/2 trailers
  kWebBinary,  // application/grpc-web(+proto): trailers as a 0x80 frame in the body
  kWebText,    // application/grpc-web-text(+proto): the same, base64 both ways
};

struct GrpcProxyOptions {
  size_t max_message_bytes = 64 << 20;
  // Response bytes queued for the client before the proxy stops reading from the upstream.
  size_t send_buffer_limit = 1 << 20;
  // Request bytes queued for the upstream before the proxy stops taking them from the client.
  size_t write_buffer_limit = 1 << 20;
};

// Reported once per call when it ends (for stats and traces), on the loop thread.
struct GrpcProxyResult {
  grpc::Status status;
  bool upstream_started = false;
  // The upstream answered (sent response headers or a status of its own).
  bool upstream_answered = false;
  // The host of the last attempt, when the call made attempts of its own (retries).
  UpstreamHost* host = nullptr;
  absl::Duration upstream_time;
};

// `unary`: the method is known (from descriptors) to take and return one message, so the call
// runs as one gRPC unary call once the request is complete (cheaper than a stream).
std::unique_ptr<StreamHandler> NewGrpcProxyHandler(
    ServerStream& stream, GrpcWireMode mode, bool unary, UpstreamCallParams params,
    GrpcProxyOptions options, HeaderList extra_response_headers,
    std::function<void(const GrpcProxyResult&)> on_done);

// A gRPC answer made by the gateway itself (no upstream): trailers-only for native gRPC, the
// trailer frame for gRPC-Web.
void SendLocalGrpcStatus(ServerStream& stream, GrpcWireMode mode, grpc::StatusCode code,
                         absl::string_view message);

// The wire mode of a request's content-type, or nullopt when it is not gRPC.
std::optional<GrpcWireMode> GrpcWireModeOf(absl::string_view content_type);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_GRPC_PROXY_H_
