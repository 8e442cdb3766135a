#include "gateway/proxy/rest_handler.h"

#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gateway/proxy/unary_exchange.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpcpp/support/slice.h"

namespace montage::gateway {
namespace {

using transcode::StreamFraming;

absl::string_view QueryOf(absl::string_view path) {
  const size_t q = path.find('?');
  return q == absl::string_view::npos ? absl::string_view() : path.substr(q + 1);
}

class RestHandler final : public StreamHandler, public UpstreamCallObserver {
 public:
  RestHandler(ServerStream& stream, std::shared_ptr<const RestSettings> settings,
              const transcode::RouteMatch& match, UpstreamCallParams params,
              GrpcProxyOptions options, HeaderList extra_headers,
              std::function<void(const GrpcProxyResult&)> on_done)
      : stream_(&stream),
        owned_settings_(std::move(settings)),
        settings_(*owned_settings_),
        binding_(*match.binding),
        variables_(match.variables),
        params_(std::move(params)),
        options_(options),
        extra_headers_(std::move(extra_headers)),
        on_done_(std::move(on_done)) {
    const google::protobuf::MethodDescriptor& method = *binding_.method;
    streaming_ = method.server_streaming();
    http_body_ = transcode::Transcoder::ReturnsHttpBody(method, &binding_);
    const std::string* accept = FindHeader(stream.head().headers, "accept");
    if (accept != nullptr && absl::StrContains(*accept, "text/event-stream")) {
      framing_ = StreamFraming::kSse;
    } else if (accept != nullptr && absl::StrContains(*accept, "application/x-ndjson")) {
      framing_ = StreamFraming::kNdjson;
    } else if (settings_.stream_sse) {
      framing_ = StreamFraming::kSse;
    } else if (settings_.stream_newline_delimited) {
      framing_ = StreamFraming::kNdjson;
    }
    stream_print_ = settings_.print;
    if (framing_ != StreamFraming::kJsonArray) stream_print_.add_whitespace = false;
  }

  ~RestHandler() override {
    if (call_ != nullptr) call_->CancelAndDetach();
    if (unary_call_ != nullptr) unary_call_->Cancel();
  }

  // StreamHandler
  void OnRequestData(absl::string_view data, bool end_stream) override {
    if (stream_ == nullptr) return;
    stream_->ConsumeRequestData(data.size());
    if (finished_) return;
    if (body_.size() + data.size() > settings_.max_request_body_bytes) {
      Fail(413, absl::StrCat("request body over the gateway's limit of ",
                             settings_.max_request_body_bytes, " bytes"));
      return;
    }
    body_.append(data.data(), data.size());
    if (end_stream) StartUpstream();
  }

  void OnSendBufferDrained() override {
    if (waiting_for_drain_ && call_ != nullptr && !finished_) {
      waiting_for_drain_ = false;
      call_->RequestNextMessage();
    }
  }

  void OnStreamClosed(bool) override {
    stream_ = nullptr;
    if (!finished_) {
      finished_ = true;
      if (call_ != nullptr) call_->CancelAndDetach();
      if (unary_call_ != nullptr) unary_call_->Cancel();
      Report(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    }
  }

  // UpstreamCallObserver
  void OnUpstreamHeaders(const HeaderList& metadata) override {
    upstream_answered_ = true;
    upstream_headers_ = metadata;
  }

  void OnUpstreamMessage(const grpc::ByteBuffer& message) override {
    if (stream_ == nullptr || finished_) return;
    std::vector<grpc::Slice> slices;
    (void)message.Dump(&slices);
    std::string bytes;
    bytes.reserve(message.Length());
    for (const grpc::Slice& s : slices)
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    if (!streaming_) {
      unary_response_ = std::move(bytes);
      have_unary_response_ = true;
      call_->RequestNextMessage();  // reads the end of the call
      return;
    }
    absl::StatusOr<transcode::HttpResponseParts> parts =
        settings_.transcoder->ResponseToHttp(*binding_.method, &binding_, bytes, stream_print_);
    if (!parts.ok()) {
      FailAfterUpstream(
          grpc::Status(grpc::StatusCode::INTERNAL, std::string(parts.status().message())));
      return;
    }
    if (!headers_sent_) {
      SendResponseHeaders(200, http_body_ ? parts->content_type : StreamContentType());
      if (!http_body_ && framing_ == StreamFraming::kJsonArray) stream_->SendData("[", false);
    }
    if (http_body_) {
      stream_->SendData(parts->body, false);
    } else {
      std::string out = transcode::StreamMessagePrefix(framing_, messages_sent_);
      if (framing_ == StreamFraming::kJsonArray && messages_sent_ == 0) out.clear();
      out += parts->body;
      out += transcode::StreamMessageSuffix(framing_);
      stream_->SendData(out, false);
    }
    ++messages_sent_;
    if (stream_->PendingSendBytes() <= options_.send_buffer_limit) {
      call_->RequestNextMessage();
    } else {
      waiting_for_drain_ = true;
    }
  }

  void OnUpstreamFinished(const grpc::Status& status, const HeaderList& trailers) override {
    if (finished_) return;
    finished_ = true;
    Report(status);
    if (stream_ == nullptr) return;
    if (!streaming_) {
      if (!status.ok()) {
        SendErrorStatus(status);
        return;
      }
      if (!have_unary_response_) {
        SendErrorStatus(grpc::Status(grpc::StatusCode::INTERNAL,
                                     "the upstream answered OK without a response message"));
        return;
      }
      absl::StatusOr<transcode::HttpResponseParts> parts = settings_.transcoder->ResponseToHttp(
          *binding_.method, &binding_, unary_response_, settings_.print);
      if (!parts.ok()) {
        SendLocalText(*stream_, 502,
                      absl::StrCat("the upstream's response cannot be transcoded: ",
                                   parts.status().message()),
                      extra_headers_);
        return;
      }
      if (settings_.max_response_body_bytes > 0 &&
          parts->body.size() > settings_.max_response_body_bytes) {
        SendLocalText(*stream_, 502,
                      absl::StrCat("response body over the gateway's limit of ",
                                   settings_.max_response_body_bytes, " bytes"),
                      extra_headers_);
        return;
      }
      HeaderList headers = BaseHeaders(parts->content_type);
      headers.emplace_back("content-length", std::to_string(parts->body.size()));
      stream_->SendHeaders(200, std::move(headers), parts->body.empty());
      if (!parts->body.empty()) stream_->SendData(parts->body, true);
      return;
    }
    // A stream: before any message an error is an ordinary error answer; after, it is the body's
    // last element.
    if (!headers_sent_) {
      if (!status.ok()) {
        SendErrorStatus(status);
        return;
      }
      SendResponseHeaders(200, http_body_ ? "application/octet-stream" : StreamContentType());
      if (!http_body_ && framing_ == StreamFraming::kJsonArray) stream_->SendData("[", false);
    }
    if (http_body_) {
      // Raw bytes have no place for an error: the connection is reset instead of ending cleanly.
      if (!status.ok()) {
        stream_->Reset();
      } else {
        stream_->SendData({}, true);
      }
      return;
    }
    std::string close =
        transcode::StreamClose(framing_, messages_sent_, status.ok() ? "" : StatusJson(status));
    stream_->SendData(close, true);
  }

 private:
  void StartUpstream() {
    transcode::HttpRequestParts parts;
    parts.body = body_;
    const std::string* ct = FindHeader(stream_->head().headers, "content-type");
    if (ct != nullptr) parts.content_type = *ct;
    parts.variables = variables_;
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> query =
        transcode::ParseQueryString(QueryOf(stream_->head().path));
    if (!query.ok()) {
      Fail(400, std::string(query.status().message()));
      return;
    }
    parts.query = *std::move(query);
    absl::StatusOr<std::string> message =
        settings_.transcoder->RequestToProto(binding_, parts, settings_.request);
    if (!message.ok()) {
      Fail(400, std::string(message.status().message()));
      return;
    }
    body_.clear();
    body_.shrink_to_fit();
    if (!streaming_ && !binding_.method->client_streaming()) {
      // One request, one answer: a unary gRPC call, reported back in one piece.
      Cluster* cluster = params_.cluster;
      UpstreamHost* host = params_.host;
      const size_t worker = params_.worker;
      RetrySettings retry = params_.retry != nullptr ? *params_.retry : RetrySettings();
      unary_call_ = UnaryExchange::Start(
          stream_->loop(), *cluster, host, worker, std::move(params_), *std::move(message),
          std::move(retry), [this](UnaryExchange::Outcome& outcome) {
            last_host_ = outcome.host;
            if (outcome.attempts > 1) {
              extra_headers_.emplace_back("x-envoy-attempt-count",
                                          std::to_string(outcome.attempts));
            }
            UnaryUpstreamCall::Result& result = outcome.result;
            OnUpstreamHeaders(result.initial_metadata);
            if (result.status.ok()) {
              unary_response_ = std::move(result.response);
              have_unary_response_ = true;
            }
            OnUpstreamFinished(result.status, result.trailing_metadata);
          });
      return;
    }
    call_ = UpstreamCall::Start(stream_->loop(), std::move(params_), this);
    grpc::Slice slice(message->data(), message->size());
    call_->Write(grpc::ByteBuffer(&slice, 1));
    call_->WritesDone();
  }

  absl::Time CallStarted() const {
    if (call_ != nullptr) return call_->started();
    if (unary_call_ != nullptr) return unary_call_->started();
    return absl::Now();
  }

  std::string StreamContentType() const {
    switch (framing_) {
      case StreamFraming::kSse:
        return "text/event-stream";
      case StreamFraming::kNdjson:
        return "application/x-ndjson";
      default:
        return "application/json";
    }
  }

  HeaderList BaseHeaders(const std::string& content_type) {
    HeaderList headers;
    headers.emplace_back("content-type", content_type);
    if (call_ != nullptr || unary_call_ != nullptr) {
      headers.emplace_back("x-envoy-upstream-service-time",
                           std::to_string(absl::ToInt64Milliseconds(absl::Now() - CallStarted())));
    }
    for (const auto& h : upstream_headers_) {
      if (h.first != "content-type" && h.first != "content-length") headers.push_back(h);
    }
    for (const auto& h : extra_headers_) {
      if (FindHeader(upstream_headers_, h.first) == nullptr) headers.push_back(h);
    }
    return headers;
  }

  void SendResponseHeaders(int status, const std::string& content_type) {
    headers_sent_ = true;
    HeaderList headers = BaseHeaders(content_type);
    if (framing_ == StreamFraming::kSse) headers.emplace_back("cache-control", "no-cache");
    stream_->SendHeaders(status, std::move(headers), false);
  }

  std::string StatusJson(const grpc::Status& status) const {
    return settings_.transcoder->StatusToJson(static_cast<int>(status.error_code()),
                                              status.error_message(), status.error_details());
  }

  void SendErrorStatus(const grpc::Status& status) {
    headers_sent_ = true;
    const std::string body = StatusJson(status);
    HeaderList headers = BaseHeaders("application/json");
    headers.emplace_back("grpc-status", std::to_string(static_cast<int>(status.error_code())));
    headers.emplace_back("content-length", std::to_string(body.size()));
    stream_->SendHeaders(HttpStatusForGrpc(static_cast<int>(status.error_code())),
                         std::move(headers), false);
    stream_->SendData(body, true);
  }

  // A request the gateway refuses before any upstream call.
  void Fail(int http_status, const std::string& message) {
    finished_ = true;
    Report(grpc::Status(http_status == 413 ? grpc::StatusCode::RESOURCE_EXHAUSTED
                                           : grpc::StatusCode::INVALID_ARGUMENT,
                        message));
    if (stream_ != nullptr && !headers_sent_) {
      headers_sent_ = true;
      SendLocalText(*stream_, http_status, message + "\n", extra_headers_);
    }
  }

  void FailAfterUpstream(const grpc::Status& status) {
    if (call_ != nullptr) call_->CancelAndDetach();
    OnUpstreamFinished(status, {});
  }

  void Report(const grpc::Status& status) {
    if (reported_ || on_done_ == nullptr) return;
    reported_ = true;
    GrpcProxyResult result;
    result.status = status;
    result.upstream_answered = upstream_answered_;
    result.host = last_host_;
    result.upstream_started = call_ != nullptr || unary_call_ != nullptr;
    if (result.upstream_started) result.upstream_time = absl::Now() - CallStarted();
    on_done_(result);
  }

  ServerStream* stream_;
  // Descriptors may be refreshed while a request runs: it keeps the set it started with.
  std::shared_ptr<const RestSettings> owned_settings_;
  const RestSettings& settings_;
  const transcode::HttpBinding& binding_;
  const std::vector<transcode::VariableBinding> variables_;
  UpstreamCallParams params_;
  const GrpcProxyOptions options_;
  HeaderList extra_headers_;
  std::function<void(const GrpcProxyResult&)> on_done_;
  std::shared_ptr<UpstreamCall> call_;
  std::shared_ptr<UnaryExchange> unary_call_;
  UpstreamHost* last_host_ = nullptr;
  std::string body_;
  HeaderList upstream_headers_;
  bool streaming_ = false;
  bool http_body_ = false;
  StreamFraming framing_ = StreamFraming::kJsonArray;
  transcode::PrintOptions stream_print_;
  std::string unary_response_;
  bool have_unary_response_ = false;
  size_t messages_sent_ = 0;
  bool headers_sent_ = false;
  bool waiting_for_drain_ = false;
  bool finished_ = false;
  bool reported_ = false;
  bool upstream_answered_ = false;
};

}  // namespace

void SendLocalText(ServerStream& stream, int status, absl::string_view text,
                   HeaderList extra_headers) {
  HeaderList headers;
  headers.emplace_back("content-type", "text/plain");
  headers.emplace_back("content-length", std::to_string(text.size()));
  for (auto& h : extra_headers) headers.push_back(std::move(h));
  stream.SendHeaders(status, std::move(headers), text.empty());
  if (!text.empty()) stream.SendData(text, true);
}

absl::StatusOr<std::unique_ptr<RestSettings>> RestSettings::Load(
    const config::GrpcJsonTranscoder& filter, bool reject_unknown_fields,
    size_t default_max_request_body_bytes,
    const std::vector<google::protobuf::FileDescriptorSet>& extra) {
  std::ifstream in(filter.proto_descriptor, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("grpc_json_transcoder.proto_descriptor: cannot read '",
                                            filter.proto_descriptor, "'"));
  }
  std::stringstream data;
  data << in.rdbuf();
  google::protobuf::FileDescriptorSet set;
  if (!set.ParseFromString(data.str())) {
    return absl::InvalidArgumentError(absl::StrCat("grpc_json_transcoder.proto_descriptor: '",
                                                   filter.proto_descriptor,
                                                   "' is not a FileDescriptorSet"));
  }
  {
    absl::flat_hash_set<std::string> have;
    for (const auto& file : set.file()) have.insert(file.name());
    for (const google::protobuf::FileDescriptorSet& more : extra) {
      for (const auto& file : more.file()) {
        if (have.insert(file.name()).second) *set.add_file() = file;
      }
    }
  }
  auto settings = std::make_unique<RestSettings>();
  settings->pool = std::make_unique<google::protobuf::DescriptorPool>();
  std::vector<std::string> files;
  for (const google::protobuf::FileDescriptorProto& file : set.file()) {
    if (settings->pool->BuildFile(file) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "grpc_json_transcoder.proto_descriptor: '", filter.proto_descriptor, "': cannot load ",
          file.name(), " (was the set built with --include_imports?)"));
    }
    files.push_back(file.name());
  }
  absl::StatusOr<std::unique_ptr<transcode::TranscodingTable>> table =
      transcode::TranscodingTable::Build(*settings->pool, filter.services, filter.auto_mapping,
                                         files);
  if (!table.ok()) {
    return absl::Status(table.status().code(),
                        absl::StrCat("grpc_json_transcoder: ", table.status().message()));
  }
  settings->table = *std::move(table);
  settings->transcoder = std::make_unique<transcode::Transcoder>(*settings->pool);
  settings->print.add_whitespace = filter.print_options.add_whitespace;
  settings->print.always_print_primitive_fields =
      filter.print_options.always_print_primitive_fields;
  settings->print.always_print_enums_as_ints = filter.print_options.always_print_enums_as_ints;
  settings->print.preserve_proto_field_names = filter.print_options.preserve_proto_field_names;
  settings->stream_newline_delimited = filter.print_options.stream_newline_delimited;
  settings->stream_sse = filter.print_options.stream_sse_style_delimited;
  settings->request.reject_unknown_fields = reject_unknown_fields;
  settings->request.reject_unknown_query_parameters =
      filter.request_validation_options.reject_unknown_query_parameters;
  settings->request.ignore_unknown_query_parameters = filter.ignore_unknown_query_parameters;
  settings->request.ignored_query_parameters = filter.ignored_query_parameters;
  settings->request.case_insensitive_enum_parsing = filter.case_insensitive_enum_parsing;
  settings->request.reject_binding_body_field_collisions =
      filter.request_validation_options.reject_binding_body_field_collisions;
  settings->reject_unknown_method = filter.request_validation_options.reject_unknown_method;
  settings->match_incoming_request_route = filter.match_incoming_request_route;
  settings->max_request_body_bytes = filter.max_request_body_size.has_value()
                                         ? *filter.max_request_body_size
                                         : default_max_request_body_bytes;
  settings->max_response_body_bytes =
      filter.max_response_body_size.has_value() ? *filter.max_response_body_size : 0;
  return settings;
}

std::unique_ptr<StreamHandler> NewRestHandler(ServerStream& stream,
                                              std::shared_ptr<const RestSettings> settings,
                                              const transcode::RouteMatch& match,
                                              UpstreamCallParams params, GrpcProxyOptions options,
                                              HeaderList extra_response_headers,
                                              std::function<void(const GrpcProxyResult&)> on_done) {
  return std::make_unique<RestHandler>(stream, std::move(settings), match, std::move(params),
                                       options, std::move(extra_response_headers),
                                       std::move(on_done));
}

}  // namespace montage::gateway
