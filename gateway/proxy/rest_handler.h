// REST/JSON requests through the gateway, as Envoy's grpc_json_transcoder does: the request (path
// variables, query parameters, JSON or raw body) becomes one gRPC request message, the upstream
// call runs through UpstreamCall, and the answer becomes JSON (or raw google.api.HttpBody bytes).
// Server streams are a JSON array by default, newline-delimited JSON or server-sent events when
// the print options or the client's Accept header ask; an error after the first message arrives
// as a last element/line/event {"error": <google.rpc.Status>}, never as a silent truncation.
#ifndef MONTAGE_GATEWAY_PROXY_REST_HANDLER_H_
#define MONTAGE_GATEWAY_PROXY_REST_HANDLER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gateway/config/bootstrap.h"
#include "gateway/proxy/grpc_proxy.h"
#include "gateway/proxy/upstream_call.h"
#include "gateway/server/http_stream.h"
#include "gateway/transcode/transcoder.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"

namespace montage::gateway {

// One listener's transcoding setup: the descriptors and what the filter config says. Immutable
// after Load; thread-safe.
struct RestSettings {
  std::unique_ptr<google::protobuf::DescriptorPool> pool;
  std::unique_ptr<transcode::TranscodingTable> table;
  std::unique_ptr<transcode::Transcoder> transcoder;
  transcode::PrintOptions print;
  transcode::RequestOptions request;
  bool stream_newline_delimited = false;
  bool stream_sse = false;
  bool reject_unknown_method = false;
  bool match_incoming_request_route = false;
  size_t max_request_body_bytes = 0;   // 0: the gateway's default
  size_t max_response_body_bytes = 0;  // 0: no limit

  // Reads the descriptor set named by the filter config. `reject_unknown_fields` is montage's
  // option (JSON fields unknown to the message → 400).
  // `extra` adds descriptor sets read from backends' reflection: their files join the file's
  // (a file name already loaded keeps its first version).
  static absl::StatusOr<std::unique_ptr<RestSettings>> Load(
      const config::GrpcJsonTranscoder& filter, bool reject_unknown_fields,
      size_t default_max_request_body_bytes,
      const std::vector<google::protobuf::FileDescriptorSet>& extra = {});
};

// A plain-text answer made by the gateway itself (Envoy's own errors are text/plain).
void SendLocalText(ServerStream& stream, int status, absl::string_view text,
                   HeaderList extra_headers = {});

std::unique_ptr<StreamHandler> NewRestHandler(ServerStream& stream,
                                              std::shared_ptr<const RestSettings> settings,
                                              const transcode::RouteMatch& match,
                                              UpstreamCallParams params, GrpcProxyOptions options,
                                              HeaderList extra_response_headers,
                                              std::function<void(const GrpcProxyResult&)> on_done);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_REST_HANDLER_H_
