#include "gateway/proxy/upstream_call.h"

#include <algorithm>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "gateway/proxy/upstream.h"

namespace montage::gateway {
namespace {

HeaderList ToHeaderList(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
  HeaderList out;
  out.reserve(metadata.size());
  for (const auto& [key, value] : metadata) {
    absl::string_view k(key.data(), key.size());
    if (IsReservedMetadata(k)) continue;
    absl::string_view v(value.data(), value.size());
    // Binary values travel base64-encoded on the wire (gRPC hands them over decoded).
    out.emplace_back(std::string(k),
                     absl::EndsWith(k, "-bin") ? absl::Base64Escape(v) : std::string(v));
  }
  return out;
}

}  // namespace

std::shared_ptr<UpstreamCall> UpstreamCall::Start(EventLoop& loop, UpstreamCallParams params,
                                                  UpstreamCallObserver* observer) {
  std::shared_ptr<UpstreamCall> call(new UpstreamCall(loop, observer));
  call->self_ = call;
  call->live_calls_ = params.live_calls;
  if (call->live_calls_ != nullptr) call->live_calls_->fetch_add(1);
  if (params.deadline != absl::InfiniteFuture()) {
    call->context_.set_deadline(absl::ToChronoTime(params.deadline));
  }
  call->span_ = StartAttemptSpan(params, params.metadata);
  for (auto& [key, value] : params.metadata) call->context_.AddMetadata(key, value);
  params.stub->PrepareBidiStreamingCall(&call->context_, params.method, grpc::StubOptions(),
                                        call.get());
  call->AddHold();
  call->StartRead(&call->read_buf_);
  call->read_in_flight_ = true;
  call->StartCall();
  return call;
}

UpstreamCall::~UpstreamCall() {
  if (live_calls_ != nullptr) live_calls_->fetch_sub(1);
}

void UpstreamCall::Write(grpc::ByteBuffer message) {
  if (cancelled_ || writes_done_requested_ || writes_finished_) return;
  queued_bytes_ += message.Length();
  write_queue_.push_back(std::move(message));
  StartNextWrite();
}

void UpstreamCall::WritesDone() {
  if (writes_done_requested_) return;
  writes_done_requested_ = true;
  StartNextWrite();
}

void UpstreamCall::StartNextWrite() {
  if (write_in_flight_ || writes_finished_ || cancelled_) return;
  if (!write_queue_.empty()) {
    write_buf_ = std::move(write_queue_.front());
    write_queue_.pop_front();
    queued_bytes_ -= write_buf_.Length();
    write_in_flight_ = true;
    StartWrite(&write_buf_);
    return;
  }
  if (writes_done_requested_) {
    writes_finished_ = true;
    StartWritesDone();
    MaybeRemoveHold();
  }
}

void UpstreamCall::RequestNextMessage() {
  if (read_in_flight_ || reads_finished_ || cancelled_ || hold_released_) return;
  read_in_flight_ = true;
  StartRead(&read_buf_);
}

void UpstreamCall::CancelAndDetach() {
  observer_ = nullptr;
  if (done_ || cancelled_) return;
  cancelled_ = true;
  context_.TryCancel();
  MaybeRemoveHold();
}

void UpstreamCall::MaybeRemoveHold() {
  if (hold_released_) return;
  const bool writes_over = writes_finished_ || cancelled_;
  const bool reads_over = (reads_finished_ && !read_in_flight_) || cancelled_;
  if (writes_over && reads_over) {
    hold_released_ = true;
    RemoveHold();
  }
}

void UpstreamCall::OnReadInitialMetadataDone(bool ok) {
  // ok=false is a trailers-only answer: OnDone reports it. Either way a message that overtook
  // this reaction (reactions may run concurrently) is delivered only after the headers.
  loop_.Post([self = shared_from_this(), ok] {
    self->metadata_done_ = true;
    if (ok) self->ReportHeaders();
    if (self->early_message_.has_value()) {
      grpc::ByteBuffer message = std::move(*self->early_message_);
      self->early_message_.reset();
      self->DeliverMessage(std::move(message));
    }
  });
}

void UpstreamCall::ReportHeaders() {
  if (headers_reported_) return;
  headers_reported_ = true;
  if (observer_ != nullptr) {
    observer_->OnUpstreamHeaders(ToHeaderList(context_.GetServerInitialMetadata()));
  }
}

void UpstreamCall::DeliverMessage(grpc::ByteBuffer message) {
  if (observer_ != nullptr) observer_->OnUpstreamMessage(message);
}

void UpstreamCall::OnReadDone(bool ok) {
  grpc::ByteBuffer message;
  if (ok) message.Swap(&read_buf_);
  loop_.Post([self = shared_from_this(), ok, message = std::move(message)]() mutable {
    self->read_in_flight_ = false;
    if (!ok) {
      // The upstream has ended the call: nothing more will be written either, so the hold can
      // go (a write still in flight keeps OnDone waiting on its own).
      self->reads_finished_ = true;
      self->writes_finished_ = true;
      self->write_queue_.clear();
      self->queued_bytes_ = 0;
      self->MaybeRemoveHold();
      return;
    }
    if (!self->metadata_done_) {
      self->early_message_ = std::move(message);
      return;
    }
    self->DeliverMessage(std::move(message));
  });
}

void UpstreamCall::OnWriteDone(bool ok) {
  loop_.Post([self = shared_from_this(), ok] {
    self->write_in_flight_ = false;
    self->write_buf_.Clear();
    if (!ok) {
      // The call is over (the upstream answered or failed); what is queued will not be sent.
      self->writes_finished_ = true;
      self->write_queue_.clear();
      self->queued_bytes_ = 0;
      self->MaybeRemoveHold();
      return;
    }
    self->StartNextWrite();
    if (self->write_queue_.empty() && self->observer_ != nullptr) {
      self->observer_->OnUpstreamWriteQueueDrained();
    }
  });
}

void UpstreamCall::OnWritesDoneDone(bool) {}

void UpstreamCall::OnDone(const grpc::Status& status) {
  loop_.Post([self = shared_from_this(), status] {
    self->done_ = true;
    EndAttemptSpan(self->span_, status);
    if (self->observer_ != nullptr) {
      UpstreamCallObserver* observer = self->observer_;
      self->observer_ = nullptr;
      observer->OnUpstreamFinished(status,
                                   ToHeaderList(self->context_.GetServerTrailingMetadata()));
    }
    self->self_.reset();
  });
}

std::shared_ptr<UnaryUpstreamCall> UnaryUpstreamCall::Start(EventLoop& loop,
                                                            UpstreamCallParams params,
                                                            std::string request,
                                                            std::function<void(Result&)> done) {
  std::shared_ptr<UnaryUpstreamCall> call(new UnaryUpstreamCall(loop));
  call->live_calls_ = params.live_calls;
  if (call->live_calls_ != nullptr) call->live_calls_->fetch_add(1);
  call->done_ = std::move(done);
  call->span_ = StartAttemptSpan(params, params.metadata);
  if (params.h2_pool != nullptr && params.cluster != nullptr && params.host != nullptr &&
      params.host->direct_address() != nullptr) {
    H2UnaryRequest h2;
    h2.method = std::move(params.method);
    h2.deadline = params.deadline;
    h2.metadata = std::move(params.metadata);
    h2.message = std::move(request);
    call->h2_ =
        params.h2_pool->Start(*params.cluster, *params.host, std::move(h2),
                              [weak = std::weak_ptr<UnaryUpstreamCall>(call)](Result& result) {
                                if (std::shared_ptr<UnaryUpstreamCall> self = weak.lock())
                                  self->Finish(result);
                              });
    return call;
  }
  call->context_ = std::make_unique<grpc::ClientContext>();
  grpc::ClientContext& context = *call->context_;
  if (params.deadline != absl::InfiniteFuture()) {
    context.set_deadline(absl::ToChronoTime(params.deadline));
  }
  grpc::Slice slice(request.data(), request.size());
  call->request_ = grpc::ByteBuffer(&slice, 1);
  for (auto& [key, value] : params.metadata) context.AddMetadata(key, value);
  params.stub->UnaryCall(
      &context, params.method, grpc::StubOptions(), &call->request_, &call->response_,
      [self = call](grpc::Status status) {
        // gRPC's thread: the call is complete, so its metadata can be read here.
        auto result = std::make_shared<Result>();
        result->status = std::move(status);
        result->initial_metadata = ToHeaderList(self->context_->GetServerInitialMetadata());
        result->trailing_metadata = ToHeaderList(self->context_->GetServerTrailingMetadata());
        if (result->status.ok()) {
          std::vector<grpc::Slice> slices;
          (void)self->response_.Dump(&slices);
          for (const grpc::Slice& s : slices) {
            result->response.append(reinterpret_cast<const char*>(s.begin()), s.size());
          }
          self->response_.Clear();
        }
        self->loop_.Post([self, result] { self->Finish(*result); });
      });
  return call;
}

void UnaryUpstreamCall::Finish(Result& result) {
  EndAttemptSpan(span_, result.status);
  if (cancelled_ || done_ == nullptr) return;
  std::function<void(Result&)> done = std::move(done_);
  done_ = nullptr;
  done(result);
}

UnaryUpstreamCall::~UnaryUpstreamCall() {
  if (live_calls_ != nullptr) live_calls_->fetch_sub(1);
}

void UnaryUpstreamCall::Cancel() {
  if (cancelled_) return;
  cancelled_ = true;
  done_ = nullptr;
  if (h2_ != nullptr) {
    h2_->Cancel();
    // No report comes on this path after a cancel: the attempt's span ends here.
    EndAttemptSpan(span_, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }
  if (context_ != nullptr) context_->TryCancel();
}

telemetry::Span StartAttemptSpan(const UpstreamCallParams& params, HeaderList& metadata) {
  if (!params.trace_parent.has_value()) return telemetry::Span();
  telemetry::Span span = telemetry::GlobalTracer().StartSpan(
      params.trace_name, telemetry::SpanKind::kClient, params.trace_parent);
  span.SetAttribute("rpc.method", params.method);
  if (!span.context().IsValid()) return span;
  // The caller's trace headers named the gateway's span as parent; upstream gets this one.
  metadata.erase(std::remove_if(metadata.begin(), metadata.end(),
                                [](const auto& h) {
                                  return h.first == telemetry::kTraceparentHeader ||
                                         h.first == telemetry::kTracestateHeader ||
                                         h.first == telemetry::kB3Header ||
                                         absl::StartsWith(h.first, "x-b3-");
                                }),
                 metadata.end());
  telemetry::Inject(span.context(), [&](absl::string_view name, absl::string_view value) {
    metadata.emplace_back(std::string(name), std::string(value));
  });
  return span;
}

void EndAttemptSpan(telemetry::Span& span, const grpc::Status& status) {
  if (!span.IsRecording()) return;
  span.SetAttribute("rpc.grpc.status_code", static_cast<int64_t>(status.error_code()));
  if (!status.ok()) span.SetStatus(telemetry::SpanStatusCode::kError, status.error_message());
  span.End();
}

bool IsReservedMetadata(absl::string_view key) {
  return absl::StartsWith(key, "grpc-") || key == "content-type" || key == "te" ||
         key == "user-agent" || key == "content-length";
}

int HttpStatusForGrpc(int code) {
  switch (code) {
    case 0:
      return 200;
    case 1:
      return 499;
    case 2:
      return 500;
    case 3:
      return 400;
    case 4:
      return 504;
    case 5:
      return 404;
    case 6:
      return 409;
    case 7:
      return 403;
    case 8:
      return 429;
    case 9:
      return 400;
    case 10:
      return 409;
    case 11:
      return 400;
    case 12:
      return 501;
    case 13:
      return 500;
    case 14:
      return 503;
    case 15:
      return 500;
    case 16:
      return 401;
    default:
      return 500;
  }
}

std::string PercentEncodeGrpcMessage(absl::string_view message) {
  std::string out;
  out.reserve(message.size());
  for (unsigned char c : message) {
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "%%%02X", c);
    }
  }
  return out;
}

}  // namespace montage::gateway
