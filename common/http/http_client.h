// The one asynchronous HTTP client every service uses to call out (LLM providers, TTS providers,
// scrapers). Built on the libcurl multi interface driven by libevent: one event-loop thread runs
// any number of transfers, with connection reuse per host, HTTP/2 multiplexing (ALPN over TLS, or
// prior knowledge to a cleartext upstream when asked), timeouts, retries with full-jitter
// exponential back-off that honour Retry-After and provider reset headers, streaming bodies and a
// response size cap. Nothing here blocks the caller: Send/Stream return at once and report on the
// client's loop thread.
//
// Callbacks run on the loop thread. They must be quick and must never block (hand CPU work to an
// executor); they may call Send/Stream/Cancel again.
#ifndef MONTAGE_COMMON_HTTP_HTTP_CLIENT_H_
#define MONTAGE_COMMON_HTTP_HTTP_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/telemetry/trace_context.h"

namespace montage::http {

// Header names are kept as received; lookups are case-insensitive.
using Headers = std::vector<std::pair<std::string, std::string>>;

// The value of the first header named `name` (case-insensitive), if any.
std::optional<absl::string_view> FindHeader(const Headers& headers, absl::string_view name);

enum class HttpVersion {
  kDefault,              // HTTP/1.1 to http://, HTTP/2 over TLS when the server offers it (ALPN)
  kHttp1,                // HTTP/1.1 only
  kHttp2PriorKnowledge,  // HTTP/2 without upgrade on cleartext (h2c); ALPN over TLS
};

struct HttpResponse {
  int status = 0;  // HTTP status code
  Headers headers;
  // The whole body for Send; for Stream only the body of a non-2xx answer (the error document).
  std::string body;
  // Attempts made, retries included (1 when the first one answered).
  uint32_t attempts = 1;
  // HTTP version the last attempt spoke: 1 (HTTP/1.x) or 2 (HTTP/2); 0 when unknown.
  int http_version = 0;
};

// The attempts a failed call made (the first and its retries) when it made more than one, as the
// Status it ended with carries them; 0 when the status carries none (one attempt, or a status
// from elsewhere). SetFailedAttempts puts them on a status (a payload; callers that build their
// own status from the client's may pass them on).
uint32_t FailedAttempts(const absl::Status& status);
void SetFailedAttempts(absl::Status& status, uint32_t attempts);

// Which answers may be retried. The default (IsRetriableByDefault) retries 5xx (500, 502, 503,
// 504 and 529 among them) and 429 unless the body says insufficient_quota; never 4xx otherwise.
using RetryClassifier = std::function<bool(const HttpResponse&)>;
bool IsRetriableByDefault(const HttpResponse& response);

struct RetryPolicy {
  // Total attempts, the first included; 1 means no retries.
  uint32_t max_attempts = 1;
  // Full-jitter exponential back-off: before retry n (1-based) wait a uniformly random time in
  // [0, min(max_backoff, initial_backoff * 2^(n-1))].
  absl::Duration initial_backoff = absl::Milliseconds(250);
  absl::Duration max_backoff = absl::Seconds(30);
  // A server-given delay (Retry-After, retry-after-ms, x-ratelimit-reset-*,
  // anthropic-ratelimit-*-reset) replaces the jittered one when present. When it is longer than
  // this, or would pass the request's deadline, the answer is returned instead of retried.
  absl::Duration max_server_delay = absl::Seconds(60);
  // Transport failures (connection refused or reset, timeouts of an attempt) are retried too.
  bool retry_transport_errors = true;
  // Empty means IsRetriableByDefault.
  RetryClassifier retriable;
  // A delay the server gave somewhere other than the standard headers (Gemini writes it only
  // into the error body). Consulted before the headers; nullopt means none given.
  std::function<std::optional<absl::Duration>(const HttpResponse&)> server_delay;
};

struct HttpRequest {
  std::string method = "GET";
  std::string url;
  Headers headers;
  std::string body;

  HttpVersion version = HttpVersion::kDefault;
  // Until the TCP (and TLS) connection is up.
  absl::Duration connect_timeout = absl::Seconds(10);
  // Until the response's status line and headers arrived, per attempt; zero means none.
  absl::Duration first_byte_timeout = absl::ZeroDuration();
  // Whole attempt; zero means none.
  absl::Duration attempt_timeout = absl::ZeroDuration();
  // Whole call, retries and back-off included. Passing it aborts the transfer.
  absl::Time deadline = absl::InfiniteFuture();
  // Larger answers abort the transfer with RESOURCE_EXHAUSTED (Send: the body; Stream: the bytes
  // delivered so far).
  size_t max_response_bytes = size_t{64} << 20;

  RetryPolicy retry;
  // Parent of the client span recorded per attempt (also injected as traceparent); none means
  // the attempt spans start their own trace only when the tracer samples them.
  std::optional<telemetry::SpanContext> parent_span;
  // Label for metrics and spans instead of the URL's host (e.g. "openai").
  std::string peer_label;
};

// Handle to a call in progress. Cancel is idempotent and thread-safe; the call's completion
// callback then runs with CANCELLED (unless it already ran). The upstream transfer is aborted.
class CallHandle {
 public:
  virtual ~CallHandle() = default;
  virtual void Cancel() = 0;
  // Streaming only: resume delivery after on_data returned kPause. Thread-safe.
  virtual void Resume() = 0;
};

// The handle of a call that may start after its owner handed out a way to cancel it: a Cancel
// that comes first is remembered and applied when the handle is attached. Thread-safe.
class PendingCall {
 public:
  void Cancel() {
    std::shared_ptr<CallHandle> handle;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      handle = handle_;
    }
    if (handle != nullptr) handle->Cancel();
  }
  void Attach(std::shared_ptr<CallHandle> handle) {
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      handle_ = handle;
      cancelled = cancelled_;
    }
    if (cancelled) handle->Cancel();
  }

 private:
  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<CallHandle> handle_ ABSL_GUARDED_BY(mu_);
};

// Streaming consumer. on_headers runs once for a 2xx answer, then on_data for each chunk as it
// arrives, then on_done exactly once. For a non-2xx answer (after retries) on_headers and on_data
// do not run; on_done gets the response with its (capped) body. Transport failures, timeouts,
// cancellation and the size cap end in on_done with a non-OK status.
enum class DataAction { kContinue, kPause };
struct StreamCallbacks {
  absl::AnyInvocable<void(int status, const Headers& headers)> on_headers;
  absl::AnyInvocable<DataAction(absl::string_view chunk)> on_data;
  absl::AnyInvocable<void(absl::StatusOr<HttpResponse> result) &&> on_done;
};

using DoneCallback = absl::AnyInvocable<void(absl::StatusOr<HttpResponse>) &&>;

struct HttpClientOptions {
  // Connections kept or opened per host (HTTP/1.1); further requests wait for one. Zero: no limit.
  uint32_t max_connections_per_host = 256;
  // All connections; zero: no limit.
  uint32_t max_total_connections = 0;
  // Idle connections are closed after this long.
  absl::Duration idle_connection_timeout = absl::Seconds(60);
  // Concurrent streams per HTTP/2 connection before another connection is opened.
  uint32_t max_concurrent_streams = 100;
  // Thread name (for top/gdb) and metric label.
  std::string name = "http";
  // Allow plain http:// and private or loopback addresses. Tests and on-premise providers need it;
  // the default refuses nothing (providers are operator-configured), fetchers of user-given URLs
  // must set it to false and check addresses themselves. When false, plain http:// and
  // connections to loopback, private, link-local or otherwise non-public addresses (checked
  // after DNS resolution, at connect) end in PERMISSION_DENIED.
  bool allow_private_addresses = true;
  // Host names pinned to addresses, as curl's --resolve: "HOST:PORT:ADDRESS[,ADDRESS]..." (IPv6
  // addresses in brackets). Those names are not looked up; their addresses are tried in order.
  // A malformed entry makes Create fail with INVALID_ARGUMENT naming it.
  std::vector<std::string> resolve;
};

// Errors (as absl::Status codes): connection refused/reset or DNS failure → UNAVAILABLE; a
// timeout or the deadline → DEADLINE_EXCEEDED; the size cap → RESOURCE_EXHAUSTED; Cancel →
// CANCELLED; a malformed request (bad URL) → INVALID_ARGUMENT. HTTP statuses, 4xx and 5xx
// included, are answers, not errors: they arrive as HttpResponse.
//
// Metrics (Prometheus, registry MetricsRegistry()), labelled by client name and peer:
//   montage_http_client_requests_total{client,peer,code}  (code: HTTP status or error name)
//   montage_http_client_request_duration_seconds{client,peer}  (whole call, retries included)
//   montage_http_client_retries_total{client,peer}
//   montage_http_client_in_flight{client,peer}
class HttpClient {
 public:
  static absl::StatusOr<std::unique_ptr<HttpClient>> Create(HttpClientOptions options = {});
  // Cancels everything in flight (each on_done runs with CANCELLED) and joins the loop thread.
  virtual ~HttpClient() = default;

  // Buffers the whole answer. `done` runs once on the loop thread.
  virtual std::shared_ptr<CallHandle> Send(HttpRequest request, DoneCallback done) = 0;
  // Delivers the body as it arrives. Retries happen only before on_headers ran.
  virtual std::shared_ptr<CallHandle> Stream(HttpRequest request, StreamCallbacks callbacks) = 0;

  // Transfers running or waiting for a connection / back-off timer.
  virtual size_t in_flight() const = 0;
};

// The delay before retry `retry` (1-based) under `policy`: the server's delay when the answer
// carries one (Retry-After in seconds or as an HTTP date, retry-after-ms, x-ratelimit-reset-
// requests/tokens like "1s" or "6m0s", anthropic-ratelimit-*-reset as RFC 3339), otherwise full
// jitter from `uniform01` in [0, 1). nullopt when the server's delay exceeds max_server_delay.
// The rate-limit reset headers count for 429 answers only (providers send them with every
// answer), and when a matching "-remaining" header reads 0 only that limit's reset counts.
std::optional<absl::Duration> RetryDelay(const RetryPolicy& policy, uint32_t retry,
                                         const HttpResponse* response, absl::Time now,
                                         double uniform01);

}  // namespace montage::http

#endif  // MONTAGE_COMMON_HTTP_HTTP_CLIENT_H_
