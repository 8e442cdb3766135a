// One gRPC call to an upstream host, message by message, driven from a worker loop: the generic
// callback API underneath (no thread waits), every upstream event posted back to the loop, and
// flow control in both directions left to the caller (it asks for each next message, and sees
// how many request bytes are still queued).
#ifndef MONTAGE_GATEWAY_PROXY_UPSTREAM_CALL_H_
#define MONTAGE_GATEWAY_PROXY_UPSTREAM_CALL_H_

#include <atomic>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "absl/time/time.h"
#include "common/telemetry/trace_context.h"
#include "common/telemetry/tracer.h"
#include "gateway/proxy/h2_upstream.h"
#include "gateway/server/event_loop.h"
#include "gateway/server/http_stream.h"
#include "grpcpp/client_context.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/client_callback.h"

namespace montage::gateway {

class Cluster;
class UpstreamHost;
struct RetrySettings;

// What the call reports, always on its loop thread.
class UpstreamCallObserver {
 public:
  virtual ~UpstreamCallObserver() = default;
  // The upstream's response headers (not called for a trailers-only answer).
  virtual void OnUpstreamHeaders(const HeaderList& metadata) = 0;
  // One response message; ask for the next with RequestNextMessage().
  virtual void OnUpstreamMessage(const grpc::ByteBuffer& message) = 0;
  // The queued request messages have all been handed to gRPC.
  virtual void OnUpstreamWriteQueueDrained() {}
  // The call ended. `trailers` are the upstream's trailing metadata (grpc-* excluded).
  virtual void OnUpstreamFinished(const grpc::Status& status, const HeaderList& trailers) = 0;
};

struct UpstreamCallParams {
  grpc::GenericStub* stub = nullptr;
  std::string method;  // "/pkg.Service/Method"
  absl::Time deadline = absl::InfiniteFuture();
  HeaderList metadata;  // sent as is; "-bin" values must already be binary
  // Counts calls not yet destroyed (the gateway waits for zero before stopping its loops).
  std::atomic<int64_t>* live_calls = nullptr;
  // For unary calls with the route's retries (UnaryExchange): the cluster, the first host, the
  // worker loop's index and the retry policy. Null cluster: no retries.
  Cluster* cluster = nullptr;
  UpstreamHost* host = nullptr;
  size_t worker = 0;
  std::shared_ptr<const RetrySettings> retry;
  // The worker loop's direct HTTP/2 connections: unary calls to a host with an IP address go
  // there instead of through gRPC's client (null: always gRPC's client).
  H2UpstreamPool* h2_pool = nullptr;
  // The downstream request's span: each attempt records a client span under it and sends that
  // span's context upstream (traceparent and B3), replacing what the caller sent.
  std::optional<telemetry::SpanContext> trace_parent;
  std::string trace_name;  // "upstream <cluster> <method>"
};

// Starts an attempt's client span under params.trace_parent (inert without one) and writes its
// context into `metadata` in place of the caller's trace headers.
telemetry::Span StartAttemptSpan(const UpstreamCallParams& params, HeaderList& metadata);
// Ends it with the call's status.
void EndAttemptSpan(telemetry::Span& span, const grpc::Status& status);

// Shared by its loop-side owner and, until the call is done, by gRPC. Loop thread only, except
// where noted.
class UpstreamCall : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
                     public std::enable_shared_from_this<UpstreamCall> {
 public:
  static std::shared_ptr<UpstreamCall> Start(EventLoop& loop, UpstreamCallParams params,
                                             UpstreamCallObserver* observer);
  ~UpstreamCall() override;

  void Write(grpc::ByteBuffer message);
  void WritesDone();
  void RequestNextMessage();
  // Cancels the call (the upstream sees RST_STREAM) and stops reporting to the observer.
  void CancelAndDetach();
  size_t queued_write_bytes() const { return queued_bytes_; }
  absl::Time started() const { return started_; }

  // gRPC reactions (gRPC threads): each posts to the loop.
  void OnReadInitialMetadataDone(bool ok) override;
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnWritesDoneDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  UpstreamCall(EventLoop& loop, UpstreamCallObserver* observer)
      : loop_(loop), observer_(observer), started_(absl::Now()) {}
  void DeliverMessage(grpc::ByteBuffer message);
  void StartNextWrite();
  void MaybeRemoveHold();
  void ReportHeaders();

  EventLoop& loop_;
  UpstreamCallObserver* observer_;
  grpc::ClientContext context_;
  const absl::Time started_;
  std::shared_ptr<UpstreamCall> self_;  // keeps the call alive until OnDone reached the loop

  std::deque<grpc::ByteBuffer> write_queue_;
  size_t queued_bytes_ = 0;
  grpc::ByteBuffer write_buf_;
  bool write_in_flight_ = false;
  bool writes_done_requested_ = false;
  bool writes_finished_ = false;  // WritesDone started, or writing failed
  grpc::ByteBuffer read_buf_;
  bool read_in_flight_ = false;
  bool reads_finished_ = false;
  bool cancelled_ = false;
  bool hold_released_ = false;
  bool headers_reported_ = false;
  bool metadata_done_ = false;                     // OnReadInitialMetadataDone reached the loop
  std::optional<grpc::ByteBuffer> early_message_;  // a message that overtook the headers
  std::atomic<int64_t>* live_calls_ = nullptr;
  telemetry::Span span_;
  bool done_ = false;
};

// A unary call in one piece (the method is known to be unary from its descriptor): the request
// is complete before the call starts and the whole answer comes back in one report. To a host with
// an IP address it runs on the worker loop's own HTTP/2 connection (h2_upstream.h) and never
// leaves the loop; otherwise through gRPC's client, with one hop back to the loop. Loop thread
// only.
class UnaryUpstreamCall : public std::enable_shared_from_this<UnaryUpstreamCall> {
 public:
  using Result = UnaryResult;
  // `request` is the message, unframed. `done` runs on the loop unless Cancel() came first.
  static std::shared_ptr<UnaryUpstreamCall> Start(EventLoop& loop, UpstreamCallParams params,
                                                  std::string request,
                                                  std::function<void(Result&)> done);
  ~UnaryUpstreamCall();
  void Cancel();
  absl::Time started() const { return started_; }

 private:
  explicit UnaryUpstreamCall(EventLoop& loop) : loop_(loop), started_(absl::Now()) {}
  void Finish(Result& result);
  EventLoop& loop_;
  std::unique_ptr<H2UnaryCall> h2_;               // the direct path
  std::unique_ptr<grpc::ClientContext> context_;  // gRPC's client
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::function<void(Result&)> done_;
  const absl::Time started_;
  bool cancelled_ = false;
  std::atomic<int64_t>* live_calls_ = nullptr;
  telemetry::Span span_;
};

// Response metadata gRPC manages itself or that must not cross the proxy as is (grpc-*,
// content-type, te, user-agent, content-length): never passed on as metadata.
bool IsReservedMetadata(absl::string_view key);

// The HTTP status Envoy answers for a gRPC status code (REST answers, stats, outlier detection).
int HttpStatusForGrpc(int code);

// Percent-encodes a grpc-message value as the gRPC HTTP/2 spec asks.
std::string PercentEncodeGrpcMessage(absl::string_view message);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_UPSTREAM_CALL_H_
