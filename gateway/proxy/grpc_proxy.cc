#include "gateway/proxy/grpc_proxy.h"

#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gateway/proxy/unary_exchange.h"
#include "grpcpp/support/slice.h"

namespace montage::gateway {
namespace {

constexpr size_t kFrameHeader = 5;

const char* ContentTypeOf(GrpcWireMode mode) {
  switch (mode) {
    case GrpcWireMode::kWebBinary:
      return "application/grpc-web+proto";
    case GrpcWireMode::kWebText:
      return "application/grpc-web-text+proto";
    default:
      return "application/grpc";
  }
}

void AppendFrameHeader(std::string& out, uint8_t flags, size_t length) {
  out.push_back(static_cast<char>(flags));
  out.push_back(static_cast<char>((length >> 24) & 0xff));
  out.push_back(static_cast<char>((length >> 16) & 0xff));
  out.push_back(static_cast<char>((length >> 8) & 0xff));
  out.push_back(static_cast<char>(length & 0xff));
}

HeaderList StatusTrailers(grpc::StatusCode code, absl::string_view message,
                          absl::string_view details) {
  HeaderList trailers;
  trailers.emplace_back("grpc-status", std::to_string(static_cast<int>(code)));
  if (!message.empty()) trailers.emplace_back("grpc-message", PercentEncodeGrpcMessage(message));
  if (!details.empty()) {
    std::string encoded = absl::Base64Escape(details);
    trailers.emplace_back("grpc-status-details-bin", std::move(encoded));
  }
  return trailers;
}

// The gRPC-Web trailer frame: flag 0x80, length, then "key:value\r\n" lines.
std::string WebTrailerFrame(const HeaderList& trailers) {
  std::string block;
  for (const auto& [key, value] : trailers) absl::StrAppend(&block, key, ":", value, "\r\n");
  std::string frame;
  AppendFrameHeader(frame, 0x80, block.size());
  frame += block;
  return frame;
}

// Sends a complete answer that carries only a status (and maybe headers before it).
void SendStatusOnly(ServerStream& stream, GrpcWireMode mode, HeaderList trailers,
                    HeaderList extra_headers) {
  HeaderList headers;
  headers.emplace_back("content-type", ContentTypeOf(mode));
  for (auto& h : extra_headers) headers.push_back(std::move(h));
  if (mode == GrpcWireMode::kNative) {
    for (auto& t : trailers) headers.push_back(std::move(t));
    stream.SendHeaders(200, std::move(headers), /*end_stream=*/true);
    return;
  }
  stream.SendHeaders(200, std::move(headers), /*end_stream=*/false);
  std::string frame = WebTrailerFrame(trailers);
  if (mode == GrpcWireMode::kWebText) frame = absl::Base64Escape(frame);
  stream.SendData(frame, /*end_stream=*/true);
}

class GrpcProxyHandler final : public StreamHandler, public UpstreamCallObserver {
 public:
  GrpcProxyHandler(ServerStream& stream, GrpcWireMode mode, bool unary, GrpcProxyOptions options,
                   HeaderList extra_response_headers,
                   std::function<void(const GrpcProxyResult&)> on_done)
      : stream_(&stream),
        mode_(mode),
        unary_(unary),
        options_(options),
        extra_headers_(std::move(extra_response_headers)),
        on_done_(std::move(on_done)) {}

  ~GrpcProxyHandler() override {
    if (call_ != nullptr) call_->CancelAndDetach();
    if (unary_call_ != nullptr) unary_call_->Cancel();
  }

  void Begin(UpstreamCallParams params) {
    if (unary_) {
      unary_params_ = std::move(params);  // the call starts once the request is complete
      return;
    }
    call_ = UpstreamCall::Start(stream_->loop(), std::move(params), this);
  }

  // StreamHandler
  void OnRequestData(absl::string_view data, bool end_stream) override {
    if (stream_ == nullptr) return;
    if (finished_ || (call_ == nullptr && !unary_)) {
      stream_->ConsumeRequestData(data.size());
      return;
    }
    const size_t wire_bytes = data.size();
    bool ok = true;
    if (mode_ == GrpcWireMode::kWebText) {
      ok = DecodeText(data);
    } else {
      in_.append(data.data(), data.size());
    }
    ok = ok && ParseFrames();
    if (!ok) {
      // Answered locally; give the window back so the rest of the upload is taken and dropped.
      if (stream_ != nullptr) stream_->ConsumeRequestData(wire_bytes + unconsumed_);
      unconsumed_ = 0;
      return;
    }
    if (unary_ || call_->queued_write_bytes() <= options_.write_buffer_limit) {
      stream_->ConsumeRequestData(wire_bytes);
    } else {
      unconsumed_ += wire_bytes;
    }
    if (end_stream) {
      if (!in_.empty() || !text_carry_.empty()) {
        FailLocally(grpc::StatusCode::INTERNAL,
                    "the request ended inside a gRPC frame (incomplete length-prefixed message)");
        return;
      }
      if (unary_) {
        StartUnary();
      } else {
        call_->WritesDone();
      }
    }
  }

  void OnSendBufferDrained() override {
    if (waiting_for_drain_ && call_ != nullptr && !finished_) {
      waiting_for_drain_ = false;
      call_->RequestNextMessage();
    }
  }

  void OnStreamClosed(bool completed) override {
    stream_ = nullptr;
    if (!finished_) {
      // The client went away first: the upstream call is cancelled now, not left running.
      finished_ = true;
      if (call_ != nullptr) call_->CancelAndDetach();
      if (unary_call_ != nullptr) unary_call_->Cancel();
      Report(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    }
  }

  // UpstreamCallObserver
  void OnUpstreamHeaders(const HeaderList& metadata) override {
    upstream_answered_ = true;
    if (stream_ == nullptr || headers_sent_) return;
    headers_sent_ = true;
    HeaderList headers;
    headers.reserve(metadata.size() + extra_headers_.size() + 2);
    headers.emplace_back("content-type", ContentTypeOf(mode_));
    headers.emplace_back("x-envoy-upstream-service-time", ServiceTimeMs());
    for (const auto& h : metadata) headers.push_back(h);
    // The gateway's own values (x-request-id) unless the upstream answered with its own.
    for (const auto& h : extra_headers_) {
      if (FindHeader(metadata, h.first) == nullptr) headers.push_back(h);
    }
    stream_->SendHeaders(200, std::move(headers), /*end_stream=*/false);
  }

  void OnUpstreamMessage(const grpc::ByteBuffer& message) override {
    if (stream_ == nullptr) return;
    SendMessage(message);
    if (stream_->PendingSendBytes() <= options_.send_buffer_limit) {
      call_->RequestNextMessage();
    } else {
      waiting_for_drain_ = true;  // a slow reader: resume when its queue has drained
    }
  }

  void SendMessage(const grpc::ByteBuffer& message) {
    std::vector<grpc::Slice> slices;
    (void)message.Dump(&slices);
    std::string frame;
    frame.reserve(kFrameHeader + message.Length());
    AppendFrameHeader(frame, 0, message.Length());
    for (const grpc::Slice& s : slices) {
      frame.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
    SendFrame(std::move(frame));
  }
  void SendMessage(absl::string_view message) {
    std::string frame;
    frame.reserve(kFrameHeader + message.size());
    AppendFrameHeader(frame, 0, message.size());
    frame.append(message.data(), message.size());
    SendFrame(std::move(frame));
  }
  void SendFrame(std::string frame) {
    if (mode_ == GrpcWireMode::kWebText) frame = absl::Base64Escape(frame);
    stream_->SendData(frame, /*end_stream=*/false);
  }

  void OnUpstreamWriteQueueDrained() override {
    if (stream_ != nullptr && unconsumed_ > 0) {
      stream_->ConsumeRequestData(unconsumed_);
      unconsumed_ = 0;
    }
  }

  void OnUpstreamFinished(const grpc::Status& status, const HeaderList& trailing) override {
    if (finished_) return;
    finished_ = true;
    Report(status);
    if (stream_ == nullptr) return;
    HeaderList trailers =
        StatusTrailers(status.error_code(), status.error_message(), status.error_details());
    for (const auto& t : trailing) trailers.push_back(t);
    if (!headers_sent_) {
      headers_sent_ = true;
      HeaderList extra = extra_headers_;
      extra.emplace_back("x-envoy-upstream-service-time", ServiceTimeMs());
      SendStatusOnly(*stream_, mode_, std::move(trailers), std::move(extra));
      return;
    }
    if (mode_ == GrpcWireMode::kNative) {
      stream_->SendTrailers(std::move(trailers));
    } else {
      std::string frame = WebTrailerFrame(trailers);
      if (mode_ == GrpcWireMode::kWebText) frame = absl::Base64Escape(frame);
      stream_->SendData(frame, /*end_stream=*/true);
    }
  }

 private:
  absl::Time CallStarted() const {
    if (call_ != nullptr) return call_->started();
    if (unary_call_ != nullptr) return unary_call_->started();
    return absl::Now();
  }
  std::string ServiceTimeMs() const {
    return std::to_string(absl::ToInt64Milliseconds(absl::Now() - CallStarted()));
  }

  // Base64 arrives in any chunking, possibly as padded pieces one after another.
  bool DecodeText(absl::string_view data) {
    text_carry_.append(data.data(), data.size());
    size_t usable = text_carry_.size() - text_carry_.size() % 4;
    size_t start = 0;
    while (start < usable) {
      // Decode up to and including the next quartet that ends in padding.
      size_t end = start;
      while (end < usable) {
        end += 4;
        if (text_carry_[end - 1] == '=') break;
      }
      std::string decoded;
      if (!absl::Base64Unescape(absl::string_view(text_carry_).substr(start, end - start),
                                &decoded)) {
        FailLocally(grpc::StatusCode::INVALID_ARGUMENT,
                    "the grpc-web-text request body is not valid base64");
        return false;
      }
      in_ += decoded;
      start = end;
    }
    text_carry_.erase(0, usable);
    return true;
  }

  // Hands every complete frame in `in_` to the upstream.
  bool ParseFrames() {
    size_t offset = 0;
    while (in_.size() - offset >= kFrameHeader) {
      const auto* p = reinterpret_cast<const unsigned char*>(in_.data() + offset);
      const uint8_t flags = p[0];
      const size_t length =
          (size_t{p[1]} << 24) | (size_t{p[2]} << 16) | (size_t{p[3]} << 8) | p[4];
      if (flags & 0x01) {
        FailLocally(grpc::StatusCode::UNIMPLEMENTED,
                    "compressed request messages are not supported by the gateway; send them "
                    "uncompressed (no grpc-encoding)");
        return false;
      }
      if (length > options_.max_message_bytes) {
        FailLocally(grpc::StatusCode::RESOURCE_EXHAUSTED,
                    absl::StrCat("request message of ", length, " bytes is over the gateway's ",
                                 options_.max_message_bytes, "-byte limit"));
        return false;
      }
      if (in_.size() - offset - kFrameHeader < length) break;
      const char* message = in_.data() + offset + kFrameHeader;
      offset += kFrameHeader + length;
      if (unary_) {
        if (unary_request_.has_value()) {
          FailLocally(grpc::StatusCode::INTERNAL,
                      "a unary method takes exactly one request message; this call sent more");
          return false;
        }
        unary_request_.emplace(message, length);
        continue;
      }
      grpc::Slice slice(message, length);
      call_->Write(grpc::ByteBuffer(&slice, 1));
    }
    in_.erase(0, offset);
    return true;
  }

  void StartUnary() {
    if (!unary_request_.has_value()) {
      FailLocally(grpc::StatusCode::INTERNAL,
                  "a unary method takes exactly one request message; this call sent none");
      return;
    }
    Cluster* cluster = unary_params_.cluster;
    UpstreamHost* host = unary_params_.host;
    const size_t worker = unary_params_.worker;
    RetrySettings retry = unary_params_.retry != nullptr ? *unary_params_.retry : RetrySettings();
    unary_call_ = UnaryExchange::Start(
        stream_->loop(), *cluster, host, worker, std::move(unary_params_),
        std::move(*unary_request_), std::move(retry), [this](UnaryExchange::Outcome& outcome) {
          last_host_ = outcome.host;
          if (outcome.attempts > 1) {
            extra_headers_.emplace_back("x-envoy-attempt-count", std::to_string(outcome.attempts));
          }
          UnaryUpstreamCall::Result& result = outcome.result;
          OnUpstreamHeaders(result.initial_metadata);
          if (result.status.ok() && stream_ != nullptr) SendMessage(result.response);
          OnUpstreamFinished(result.status, result.trailing_metadata);
        });
    unary_request_.reset();
  }

  void FailLocally(grpc::StatusCode code, const std::string& message) {
    finished_ = true;
    if (call_ != nullptr) call_->CancelAndDetach();
    if (unary_call_ != nullptr) unary_call_->Cancel();
    grpc::Status status(code, message);
    Report(status);
    if (stream_ == nullptr) return;
    HeaderList trailers = StatusTrailers(code, message, {});
    if (!headers_sent_) {
      headers_sent_ = true;
      SendStatusOnly(*stream_, mode_, std::move(trailers), extra_headers_);
    } else if (mode_ == GrpcWireMode::kNative) {
      stream_->SendTrailers(std::move(trailers));
    } else {
      std::string frame = WebTrailerFrame(trailers);
      if (mode_ == GrpcWireMode::kWebText) frame = absl::Base64Escape(frame);
      stream_->SendData(frame, true);
    }
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
  const GrpcWireMode mode_;
  const bool unary_;
  UpstreamCallParams unary_params_;
  std::optional<std::string> unary_request_;  // the message, unframed
  std::shared_ptr<UnaryExchange> unary_call_;
  UpstreamHost* last_host_ = nullptr;
  const GrpcProxyOptions options_;
  HeaderList extra_headers_;
  std::function<void(const GrpcProxyResult&)> on_done_;
  std::shared_ptr<UpstreamCall> call_;
  std::string in_;
  std::string text_carry_;
  size_t unconsumed_ = 0;
  bool headers_sent_ = false;
  bool waiting_for_drain_ = false;
  bool finished_ = false;
  bool reported_ = false;
  bool upstream_answered_ = false;
};

}  // namespace

std::unique_ptr<StreamHandler> NewGrpcProxyHandler(
    ServerStream& stream, GrpcWireMode mode, bool unary, UpstreamCallParams params,
    GrpcProxyOptions options, HeaderList extra_response_headers,
    std::function<void(const GrpcProxyResult&)> on_done) {
  auto handler = std::make_unique<GrpcProxyHandler>(
      stream, mode, unary, options, std::move(extra_response_headers), std::move(on_done));
  handler->Begin(std::move(params));
  return handler;
}

void SendLocalGrpcStatus(ServerStream& stream, GrpcWireMode mode, grpc::StatusCode code,
                         absl::string_view message) {
  SendStatusOnly(stream, mode, StatusTrailers(code, message, {}), {});
}

std::optional<GrpcWireMode> GrpcWireModeOf(absl::string_view content_type) {
  const absl::string_view ct = absl::StripAsciiWhitespace(content_type);
  auto is = [&](absl::string_view base) {
    if (!absl::StartsWithIgnoreCase(ct, base)) return false;
    const absl::string_view rest = ct.substr(base.size());
    return rest.empty() || rest[0] == '+' || rest[0] == ';';
  };
  if (is("application/grpc-web-text")) return GrpcWireMode::kWebText;
  if (is("application/grpc-web")) return GrpcWireMode::kWebBinary;
  if (is("application/grpc")) return GrpcWireMode::kNative;
  return std::nullopt;
}

}  // namespace montage::gateway
