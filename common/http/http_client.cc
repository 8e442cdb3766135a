// HttpClient on the libcurl multi "socket action" interface, driven by libevent.
//
// Threads: everything about transfers (the multi handles, easy handles, timers, the call table,
// metric lookups) lives on the client's loop thread and is touched by no other. Other threads
// reach it only through the Inbox, a mutex-protected command queue that wakes the loop with
// event_active, so Send/Stream/Cancel/Resume never wait on the loop.
//
// Shards: libcurl (7.88) looks for a reusable connection by walking every connection to the
// host, so with thousands of HTTP/1.1 transfers to one host each new one costs O(connections)
// and a burst goes quadratic. Unlimited clients therefore spread transfers over several multi
// handles (shards, each with its own connection cache, timer and sockets) on the same loop;
// see PickShard.
//
// A call goes: Submit (validate, arm the deadline) -> attempt (easy handle in a shard) ->
// answer or transport error -> maybe a back-off timer and another attempt -> Finish, which runs
// the completion callback exactly once. Cancel, the deadline and the destructor all end in Finish
// too; whichever comes first wins because Finish removes the call from the table.
#include "common/http/http_client.h"

#include <curl/curl.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <pthread.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/http/internal/addresses.h"
#include "common/http/internal/curl_errors.h"
#include "common/http/internal/h2c_pool.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/tracer.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace montage::http {

std::optional<absl::string_view> FindHeader(const Headers& headers, absl::string_view name) {
  for (const auto& [key, value] : headers) {
    if (absl::EqualsIgnoreCase(key, name)) return absl::string_view(value);
  }
  return std::nullopt;
}

namespace {

// Non-2xx bodies of streamed calls are kept for on_done up to this much (error documents are
// small; a stream that answers 500 with megabytes is cut, not failed).
constexpr size_t kMaxStreamErrorBody = size_t{64} << 10;
// Distinct peer labels per client; more (a fetcher of user URLs) share the label "other" so that
// the metrics cannot grow without bound.
constexpr size_t kMaxPeers = 256;
// A client without connection limits opens another shard when every shard runs this many
// transfers, up to kMaxShards: small clients keep one multi handle, a burst of 10,000 keeps
// each shard's connection walk near 10,000 / kMaxShards.
constexpr size_t kTransfersPerShard = 128;
constexpr size_t kMaxShards = 64;
// libcurl's default receive buffer (16 KiB per easy handle). Smaller buffers saved memory in a
// burst, but libcurl 7.88 in multi-socket mode then stalls an HTTP/2 answer whose last DATA frame
// is larger than the buffer until the deadline (found with speech answers; reproduced against
// nghttpd), so it stays at the HTTP/2 frame size.
constexpr long kReceiveBufferSize = 16 << 10;

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    // Cross-thread event_active needs libevent's locking; it must be on before any base exists.
    evthread_use_pthreads();
  });
}

// ---------------------------------------------------------------------------------------------
// Metrics

const prometheus::Histogram::BucketBoundaries& DurationBuckets() {
  static const auto* const buckets = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
  return *buckets;
}

struct Families {
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Histogram>& duration;
  prometheus::Family<prometheus::Counter>& retries;
  prometheus::Family<prometheus::Gauge>& in_flight;
};

const Families& GetFamilies() {
  static const Families* const families = [] {
    prometheus::Registry& registry = telemetry::MetricsRegistry();
    return new Families{
        prometheus::BuildCounter()
            .Name("montage_http_client_requests_total")
            .Help("Outbound HTTP calls completed, by HTTP status or error code.")
            .Register(registry),
        prometheus::BuildHistogram()
            .Name("montage_http_client_request_duration_seconds")
            .Help("Time from an outbound HTTP call's start to its completion, retries included.")
            .Register(registry),
        prometheus::BuildCounter()
            .Name("montage_http_client_retries_total")
            .Help("Outbound HTTP attempts that were retries.")
            .Register(registry),
        prometheus::BuildGauge()
            .Name("montage_http_client_in_flight")
            .Help("Outbound HTTP calls started and not yet completed.")
            .Register(registry),
    };
  }();
  return *families;
}

// The metric children of one (client, peer), made on the peer's first call so that a call
// builds no labels. Owned by the loop thread; the pointers by the prometheus families.
struct PeerMetrics {
  PeerMetrics(const std::string& client_name, const std::string& peer_name)
      : client(client_name), peer(peer_name) {
    const Families& families = GetFamilies();
    duration = &families.duration.Add({{"client", client}, {"peer", peer}}, DurationBuckets());
    retries = &families.retries.Add({{"client", client}, {"peer", peer}});
    in_flight = &families.in_flight.Add({{"client", client}, {"peer", peer}});
  }

  // `http_status` > 0, or the error's code.
  prometheus::Counter& Requests(int http_status, absl::StatusCode error) {
    const int key = http_status > 0 ? http_status : -static_cast<int>(error);
    prometheus::Counter*& counter = requests[key];
    if (counter == nullptr) {
      const std::string code =
          http_status > 0 ? absl::StrCat(http_status) : absl::StatusCodeToString(error);
      counter = &GetFamilies().requests.Add({{"client", client}, {"peer", peer}, {"code", code}});
    }
    return *counter;
  }

  const std::string client;
  const std::string peer;
  prometheus::Histogram* duration = nullptr;
  prometheus::Counter* retries = nullptr;
  prometheus::Gauge* in_flight = nullptr;
  absl::flat_hash_map<int, prometheus::Counter*> requests;
};

// ---------------------------------------------------------------------------------------------
// Small RAII pieces

// A one-shot libevent timer owned by a call: disarmed and freed with it.
class Timer {
 public:
  Timer() = default;
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() {
    if (event_ != nullptr) event_free(event_);
  }

  void Arm(event_base* base, absl::Duration delay, event_callback_fn callback, void* arg) {
    if (event_ == nullptr) event_ = evtimer_new(base, callback, arg);
    if (event_ == nullptr) return;  // out of memory: the deadline or the peer ends the call
    timeval tv = absl::ToTimeval(std::max(delay, absl::ZeroDuration()));
    evtimer_add(event_, &tv);
  }
  void Disarm() {
    if (event_ != nullptr) evtimer_del(event_);
  }

 private:
  event* event_ = nullptr;
};

struct UrlDeleter {
  void operator()(CURLU* url) const { curl_url_cleanup(url); }
};

struct ParsedUrl {
  std::string host;
  // scheme://host:port, the key HTTP/2 connections are shared by.
  std::string origin;
  // Without credentials, query and fragment: what logs, errors and spans may show.
  std::string safe_url;
  bool https = false;
  // For requests this client frames itself (h2c): the port (the scheme's default when the URL
  // has none), host[:port] as the URL wrote it, and the path with its query.
  std::string port;
  std::string authority;
  std::string path;
  // "Basic ..." from the URL's user and password (percent-decoded), as libcurl sends them; empty
  // when the URL has no user.
  std::string basic_authorization;
};

// Messages do not echo the URL: its query may carry a key.
absl::StatusOr<ParsedUrl> ParseUrl(const std::string& url) {
  std::unique_ptr<CURLU, UrlDeleter> handle(curl_url());
  if (handle == nullptr) return absl::ResourceExhaustedError("curl_url failed");
  CURLUcode rc = curl_url_set(handle.get(), CURLUPART_URL, url.c_str(), 0);
  if (rc != CURLUE_OK) {
    return absl::InvalidArgumentError(absl::StrCat("malformed URL: ", curl_url_strerror(rc)));
  }
  auto get = [&](CURLUPart part, std::string& out) {
    char* text = nullptr;
    if (curl_url_get(handle.get(), part, &text, 0) != CURLUE_OK) return false;
    out = text;
    curl_free(text);
    return true;
  };
  std::string scheme;
  ParsedUrl parsed;
  if (!get(CURLUPART_SCHEME, scheme) || !get(CURLUPART_HOST, parsed.host)) {
    return absl::InvalidArgumentError("malformed URL: no scheme or host");
  }
  if (scheme != "http" && scheme != "https") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported URL scheme '", scheme, "'"));
  }
  parsed.https = scheme == "https";
  if (!get(CURLUPART_PATH, parsed.path) || parsed.path.empty()) parsed.path = "/";
  if (std::string query; get(CURLUPART_QUERY, query)) absl::StrAppend(&parsed.path, "?", query);
  if (std::string port; get(CURLUPART_PORT, port)) {
    parsed.authority = absl::StrCat(parsed.host, ":", port);
  } else {
    parsed.authority = parsed.host;
  }
  if (std::string user; get(CURLUPART_USER, user)) {
    std::string password;
    (void)get(CURLUPART_PASSWORD, password);
    auto decoded = [](const std::string& text) {
      int length = 0;
      char* raw = curl_easy_unescape(nullptr, text.c_str(), static_cast<int>(text.size()), &length);
      std::string out = raw == nullptr ? text : std::string(raw, static_cast<size_t>(length));
      curl_free(raw);
      return out;
    };
    parsed.basic_authorization = absl::StrCat(
        "Basic ", absl::Base64Escape(absl::StrCat(decoded(user), ":", decoded(password))));
  }
  for (CURLUPart part : {CURLUPART_USER, CURLUPART_PASSWORD, CURLUPART_OPTIONS, CURLUPART_QUERY,
                         CURLUPART_FRAGMENT}) {
    curl_url_set(handle.get(), part, nullptr, 0);
  }
  if (!get(CURLUPART_URL, parsed.safe_url))
    parsed.safe_url = absl::StrCat(scheme, "://", parsed.host);
  char* port = nullptr;
  if (curl_url_get(handle.get(), CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK) {
    parsed.origin = absl::StrCat(scheme, "://", parsed.host, ":", port);
    parsed.port = port;
    curl_free(port);
  } else {
    parsed.origin = absl::StrCat(scheme, "://", parsed.host);
  }
  return parsed;
}

// RFC 9110 token characters: what a method or a header name may contain. Anything else (CR and
// LF above all) could smuggle extra headers into the request.
bool IsToken(absl::string_view text) {
  if (text.empty()) return false;
  for (char c : text) {
    if (absl::ascii_isalnum(static_cast<unsigned char>(c))) continue;
    if (absl::string_view("!#$%&'*+-.^_`|~").find(c) == absl::string_view::npos) return false;
  }
  return true;
}

absl::Status ValidateRequest(const HttpRequest& request) {
  if (!IsToken(request.method)) return absl::InvalidArgumentError("invalid HTTP method");
  for (const auto& [name, value] : request.headers) {
    if (!IsToken(name)) return absl::InvalidArgumentError("invalid HTTP header name");
    if (value.find_first_of("\r\n", 0) != std::string::npos ||
        value.find('\0') != std::string::npos) {
      // Neither the name's value nor the header is printed: it may be a key.
      return absl::InvalidArgumentError(absl::StrCat("invalid value for HTTP header ", name));
    }
  }
  return absl::OkStatus();
}

// libcurl before 8.0.0 fails every request that reuses an idle HTTP/2 prior-knowledge
// connection with "Error in the HTTP2 framing layer" (curl issue 10634); Debian 12 ships 7.88.1.
bool LibcurlBreaksIdleH2cReuse() {
  static const bool broken = curl_version_info(CURLVERSION_NOW)->version_num < 0x080000;
  return broken;
}

std::string Millis(absl::Duration d) { return absl::StrCat(absl::ToInt64Milliseconds(d), " ms"); }

long ToCurlMillis(absl::Duration d) {
  const int64_t ms = absl::ToInt64Milliseconds(d);
  return static_cast<long>(std::clamp<int64_t>(ms, 1, int64_t{1} << 30));
}

// The loop thread's inbox, so that code running there can tell (handles use it).
struct Inbox;
thread_local const Inbox* tls_loop_inbox = nullptr;

class HttpClientImpl;

struct Call;

// One multi handle: its own connection cache, libcurl timer and sockets. Loop thread only.
struct Shard {
  HttpClientImpl* client = nullptr;
  CURLM* multi = nullptr;
  event* timer = nullptr;
  absl::flat_hash_map<curl_socket_t, event*> sockets;
  size_t transfers = 0;  // easy handles in `multi`
};

struct Command {
  enum class Kind { kSubmit, kCancel, kResume };
  Kind kind;
  uint64_t id = 0;
  std::unique_ptr<Call> call;  // kSubmit
};

// The client's command queue: the only state shared with other threads. Handles hold it weakly,
// so a handle outliving the client finds nothing (or a closed inbox) instead of a dangling client.
struct Inbox {
  // False, leaving `command` untouched, when the client is shutting down.
  bool Post(Command& command) {
    std::lock_guard<std::mutex> lock(mu);
    if (closed) return false;
    // A non-empty queue has a wake-up pending already: the loop empties it whole.
    const bool wake_needed = commands.empty();
    commands.push_back(std::move(command));
    if (wake_needed) event_active(wake, EV_READ, 0);
    return true;
  }

  std::mutex mu;
  std::vector<Command> commands;  // guarded by mu
  bool closed = false;            // guarded by mu; `wake` may be gone once set
  event* wake = nullptr;
  HttpClientImpl* client = nullptr;  // to be used on the loop thread only
};

// Per call state. Owned by HttpClientImpl::calls_ and touched only on the loop thread. An attempt
// runs either as a libcurl transfer (`easy`) or as a stream of the client's h2c pool (`h2c`), which
// reports to the call as its sink.
struct Call final : internal::H2cStreamSink {
  void OnH2cHeaders(int status, Headers headers) override;
  DataAction OnH2cData(absl::string_view chunk) override;
  void OnH2cClosed(internal::H2cClose close) override;

  uint64_t id = 0;
  HttpClientImpl* client = nullptr;
  HttpRequest request;
  bool streaming = false;
  DoneCallback done;
  absl::AnyInvocable<void(int status, const Headers& headers)> on_headers;
  absl::AnyInvocable<DataAction(absl::string_view chunk)> on_data;

  // Fixed when submitted.
  std::string safe_url;
  bool https = false;
  size_t origin_hash = 0;
  // HTTP/2 with prior knowledge to an http:// URL: framed by the h2c pool, not libcurl.
  bool via_h2c = false;
  internal::H2cTarget h2c_target;
  std::string h2c_path;
  std::string h2c_authorization;  // from the URL's credentials, unless the request has its own
  std::string span_name;
  bool inject_trace_context = true;
  PeerMetrics* metrics = nullptr;
  absl::Time start;
  uint32_t attempt = 0;
  Timer deadline_timer;
  Timer backoff_timer;
  // Set by Cancel on the loop thread (from a callback) so that the running transfer stops at
  // once instead of delivering more data before the cancel command is processed.
  bool cancel_requested = false;

  // State of the current attempt.
  CURL* easy = nullptr;
  internal::H2cPool::Handle h2c;
  bool h2c_replayed = false;  // an unprocessed request was sent again once
  bool h2c_waiting = false;   // in h2c_waiting_ for room under max_total_connections
  Timer attempt_timer;        // h2c only (libcurl times its own transfers)
  Shard* shard = nullptr;     // holds `easy`
  curl_slist* header_list = nullptr;
  telemetry::Span span;
  HttpResponse response;
  Timer first_byte_timer;
  bool headers_complete = false;
  bool headers_delivered = false;  // on_headers ran: no more retries
  bool error_body_truncated = false;
  bool refused_address = false;
  size_t delivered_bytes = 0;
  // Bytes libcurl hands back after a pause that on_data has seen already (see OnWrite).
  size_t skip_bytes = 0;
  absl::Status abort_status;  // why a callback stopped the transfer
  char error_buffer[CURL_ERROR_SIZE] = {};
};

class CallHandleImpl final : public CallHandle {
 public:
  CallHandleImpl(std::weak_ptr<Inbox> inbox, uint64_t id) : inbox_(std::move(inbox)), id_(id) {}

  void Cancel() override;
  void Resume() override {
    std::shared_ptr<Inbox> inbox = inbox_.lock();
    if (inbox == nullptr) return;
    Command command{Command::Kind::kResume, id_, nullptr};
    inbox->Post(command);
  }

 private:
  const std::weak_ptr<Inbox> inbox_;
  const uint64_t id_;
  std::atomic<bool> cancelled_{false};
};

class HttpClientImpl final : public HttpClient {
 public:
  explicit HttpClientImpl(HttpClientOptions options)
      : options_(std::move(options)), inbox_(std::make_shared<Inbox>()) {}
  ~HttpClientImpl() override;

  absl::Status Init();

  std::shared_ptr<CallHandle> Send(HttpRequest request, DoneCallback done) override {
    auto call = std::make_unique<Call>();
    call->request = std::move(request);
    call->done = std::move(done);
    return Start(std::move(call));
  }

  std::shared_ptr<CallHandle> Stream(HttpRequest request, StreamCallbacks callbacks) override {
    auto call = std::make_unique<Call>();
    call->request = std::move(request);
    call->streaming = true;
    call->on_headers = std::move(callbacks.on_headers);
    call->on_data = std::move(callbacks.on_data);
    call->done = std::move(callbacks.on_done);
    return Start(std::move(call));
  }

  size_t in_flight() const override { return in_flight_.load(std::memory_order_acquire); }

  // Loop thread only.
  void MarkCancelRequested(uint64_t id) {
    auto it = calls_.find(id);
    if (it != calls_.end()) it->second->cancel_requested = true;
  }

  // What both transports do as an attempt's answer arrives (loop thread). HeadersArrived takes
  // the final status once call.response.headers hold the headers; false: stop the attempt (the
  // caller cancelled from on_headers).
  bool HeadersArrived(Call& call, int status);
  enum class BodyAction { kContinue, kPause, kStop };
  // kStop: end the attempt (the size cap, an error body cut short, or a cancel).
  BodyAction BodyArrived(Call& call, absl::string_view chunk);
  // An attempt ended, on either transport: OK `transport` means its answer is complete (or an
  // error body was cut at its cap); a cancel or a callback's abort_status take precedence. A
  // `final` error is reported as it is, never retried.
  void ConcludeAttempt(Call& call, absl::Status transport, bool transient, bool final = false);
  void ReleaseAttempt(Call& call);
  void EndSpan(Call& call, int http_status, const absl::Status& error);
  // Sends the request again at once, without counting it as a retry (see H2cClose::unprocessed).
  void Replay(Call& call, const absl::Status& why);

 private:
  std::shared_ptr<CallHandle> Start(std::unique_ptr<Call> call);
  void Run();

  // libevent and libcurl callbacks.
  static void OnWake(evutil_socket_t, short, void* self);
  static void OnCurlTimerEvent(evutil_socket_t, short, void* self);
  static void OnSocketEvent(evutil_socket_t fd, short events, void* self);
  static int OnCurlSocket(CURL* easy, curl_socket_t fd, int what, void* shard, void* socket_data);
  static int OnCurlTimer(CURLM* multi, long timeout_ms, void* shard);
  static size_t OnHeader(char* data, size_t size, size_t count, void* call);
  static size_t OnWrite(char* data, size_t size, size_t count, void* call);
  static curl_socket_t OnOpenSocket(void* call, curlsocktype purpose, curl_sockaddr* address);
  static void OnDeadline(evutil_socket_t, short, void* call);
  static void OnFirstByteTimeout(evutil_socket_t, short, void* call);
  static void OnAttemptTimeout(evutil_socket_t, short, void* call);
  static void OnBackoffDone(evutil_socket_t, short, void* call);

  Shard* AddShard();
  Shard& PickShard(const Call& call);
  void Drain();
  void Submit(std::unique_ptr<Call> owned);
  void CancelCall(uint64_t id);
  void ResumeCall(uint64_t id);
  void StartAttempt(Call& call);
  absl::Status StartTransfer(Call& call);
  absl::Status StartH2cStream(Call& call);
  absl::Status SubmitH2cStream(Call& call);
  // Starts the h2c requests that waited for room, in order, while there is room.
  void StartWaitingH2cStreams();
  absl::Status ConfigureEasy(Call& call);
  void ProcessCompletedTransfers(Shard& shard);
  void OnAttemptDone(Call& call, CURLcode result);
  void HandleAnswer(Call& call);
  void HandleTransportError(Call& call, absl::Status error, bool transient);
  bool ScheduleRetry(Call& call, const HttpResponse* response);
  void Finish(Call& call, absl::StatusOr<HttpResponse> result);
  PeerMetrics& MetricsFor(absl::string_view peer);
  absl::Status CallError(const Call& call, absl::StatusCode code, absl::string_view what) const;

  const HttpClientOptions options_;
  const std::shared_ptr<Inbox> inbox_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<size_t> in_flight_{0};

  event_base* base_ = nullptr;
  event* wake_ = nullptr;
  std::thread thread_;

  // Loop thread only (the first shard is made by Init). Never shrinks: an idle shard costs a
  // multi handle and a timer, and keeps its warm connections.
  std::vector<std::unique_ptr<Shard>> shards_;
  std::unique_ptr<internal::H2cPool> h2c_;
  curl_slist* resolve_list_ = nullptr;  // options_.resolve, for every libcurl transfer
  // Calls (by id) whose h2c attempt waits for room under max_total_connections, oldest first.
  // A call that ended or left its attempt meanwhile is skipped (Call::h2c_waiting is false).
  std::deque<uint64_t> h2c_waiting_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Call>> calls_;
  absl::flat_hash_map<std::string, std::unique_ptr<PeerMetrics>> peers_;
  absl::BitGen random_;
};

void CallHandleImpl::Cancel() {
  if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
  std::shared_ptr<Inbox> inbox = inbox_.lock();
  if (inbox == nullptr) return;
  if (tls_loop_inbox == inbox.get()) inbox->client->MarkCancelRequested(id_);
  Command command{Command::Kind::kCancel, id_, nullptr};
  inbox->Post(command);
}

// ---------------------------------------------------------------------------------------------
// Life cycle

absl::Status HttpClientImpl::Init() {
  internal::H2cPoolOptions h2c_options;
  h2c_options.max_connections_per_host = options_.max_connections_per_host;
  h2c_options.max_concurrent_streams = options_.max_concurrent_streams;
  h2c_options.idle_timeout = options_.idle_connection_timeout;
  h2c_options.max_total_connections = options_.max_total_connections;
  h2c_options.on_room = [this] { StartWaitingH2cStreams(); };
  RETURN_IF_ERROR(internal::H2cPool::ParseResolve(options_.resolve, h2c_options.resolve));
  for (const std::string& entry : options_.resolve) {
    curl_slist* next = curl_slist_append(resolve_list_, entry.c_str());
    if (next == nullptr) return absl::ResourceExhaustedError("curl_slist_append failed");
    resolve_list_ = next;
  }
  base_ = event_base_new();
  if (base_ == nullptr) return absl::InternalError("event_base_new failed");
  wake_ = event_new(base_, -1, 0, &HttpClientImpl::OnWake, this);
  if (wake_ == nullptr || AddShard() == nullptr) {
    return absl::ResourceExhaustedError("cannot create the HTTP client's event loop");
  }
  h2c_ = std::make_unique<internal::H2cPool>(base_, std::move(h2c_options));
  inbox_->wake = wake_;
  inbox_->client = this;
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

Shard* HttpClientImpl::AddShard() {
  auto shard = std::make_unique<Shard>();
  shard->client = this;
  shard->timer = evtimer_new(base_, &HttpClientImpl::OnCurlTimerEvent, shard.get());
  shard->multi = curl_multi_init();
  if (shard->timer == nullptr || shard->multi == nullptr) {
    if (shard->multi != nullptr) curl_multi_cleanup(shard->multi);
    if (shard->timer != nullptr) event_free(shard->timer);
    return nullptr;
  }
  CURLM* multi = shard->multi;
  curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, &HttpClientImpl::OnCurlSocket);
  curl_multi_setopt(multi, CURLMOPT_SOCKETDATA, shard.get());
  curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, &HttpClientImpl::OnCurlTimer);
  curl_multi_setopt(multi, CURLMOPT_TIMERDATA, shard.get());
  curl_multi_setopt(multi, CURLMOPT_PIPELINING, long{CURLPIPE_MULTIPLEX});
  // Limits are per multi handle: a limited client has only one shard (see PickShard).
  curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS,
                    static_cast<long>(options_.max_connections_per_host));
  curl_multi_setopt(multi, CURLMOPT_MAX_TOTAL_CONNECTIONS,
                    static_cast<long>(options_.max_total_connections));
  if (options_.max_concurrent_streams > 0) {
    curl_multi_setopt(
        multi, CURLMOPT_MAX_CONCURRENT_STREAMS,
        static_cast<long>(std::min<uint32_t>(options_.max_concurrent_streams, uint32_t{1} << 30)));
  }
  // The idle-connection cache otherwise shrinks to 4x the transfers running, dropping warm
  // connections after every burst.
  const uint32_t cache = options_.max_total_connections > 0 ? options_.max_total_connections
                                                            : options_.max_connections_per_host;
  if (cache > 0) curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, static_cast<long>(cache));
  shards_.push_back(std::move(shard));
  return shards_.back().get();
}

// Connection limits are per multi handle, so a client with a per-host or total limit keeps one
// shard and its limits stay exact (at most that many connections are open, so its walks are
// bounded anyway). Transfers that may speak HTTP/2 go by origin, so that the streams to one
// host share connections; the rest (HTTP/1.1, one transfer per connection) go to the shard
// running the fewest, where idle connections are found as well as anywhere.
Shard& HttpClientImpl::PickShard(const Call& call) {
  if (options_.max_connections_per_host > 0 || options_.max_total_connections > 0) {
    return *shards_.front();
  }
  const HttpVersion version = call.request.version;
  // h2c on libcurl < 8 shares nothing (a fresh connection per call), so it spreads like HTTP/1.1.
  const bool h2c_shares =
      version == HttpVersion::kHttp2PriorKnowledge && !LibcurlBreaksIdleH2cReuse();
  if (h2c_shares || (version == HttpVersion::kDefault && call.https)) {
    return *shards_[call.origin_hash % shards_.size()];
  }
  Shard* least = shards_.front().get();
  for (const auto& shard : shards_) {
    if (shard->transfers < least->transfers) least = shard.get();
  }
  if (least->transfers >= kTransfersPerShard && shards_.size() < kMaxShards) {
    if (Shard* added = AddShard(); added != nullptr) return *added;
  }
  return *least;
}

void HttpClientImpl::Run() {
  tls_loop_inbox = inbox_.get();
  pthread_setname_np(pthread_self(), options_.name.substr(0, 15).c_str());
  // The loop has nothing pending while idle (the wake-up event is only ever activated), so it
  // must not stop when empty; OnWake breaks it at shutdown.
  event_base_loop(base_, EVLOOP_NO_EXIT_ON_EMPTY);
  tls_loop_inbox = nullptr;
}

HttpClientImpl::~HttpClientImpl() {
  if (thread_.joinable()) {
    if (tls_loop_inbox == inbox_.get()) {
      // Joining ourselves would hang forever; this is a bug in the caller.
      LogError("HttpClient destroyed from its own callback", {{"client", options_.name}});
      std::abort();
    }
    {
      std::lock_guard<std::mutex> lock(inbox_->mu);
      inbox_->closed = true;
      event_active(wake_, EV_READ, 0);
    }
    thread_.join();
  }
  for (auto& shard : shards_) {
    // Idle connections are closed here; libcurl may report their sockets through OnCurlSocket.
    curl_multi_cleanup(shard->multi);
    for (auto& [fd, ev] : shard->sockets) event_free(ev);
    event_free(shard->timer);
  }
  shards_.clear();
  h2c_.reset();
  curl_slist_free_all(resolve_list_);
  if (wake_ != nullptr) event_free(wake_);
  if (base_ != nullptr) event_base_free(base_);
}

std::shared_ptr<CallHandle> HttpClientImpl::Start(std::unique_ptr<Call> call) {
  const uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
  call->id = id;
  call->client = this;
  auto handle = std::make_shared<CallHandleImpl>(inbox_, id);
  in_flight_.fetch_add(1, std::memory_order_acq_rel);
  Command command{Command::Kind::kSubmit, id, std::move(call)};
  if (!inbox_->Post(command)) {
    // Only while the client is being destroyed (a completion callback calling Send again).
    in_flight_.fetch_sub(1, std::memory_order_acq_rel);
    DoneCallback done = std::move(command.call->done);
    command.call.reset();
    if (done) std::move(done)(absl::CancelledError("HTTP client is shutting down"));
  }
  return handle;
}

void HttpClientImpl::OnWake(evutil_socket_t, short, void* self) {
  static_cast<HttpClientImpl*>(self)->Drain();
}

void HttpClientImpl::Drain() {
  std::vector<Command> commands;
  bool closing;
  {
    std::lock_guard<std::mutex> lock(inbox_->mu);
    commands.swap(inbox_->commands);
    closing = inbox_->closed;
  }
  for (Command& command : commands) {
    switch (command.kind) {
      case Command::Kind::kSubmit:
        Submit(std::move(command.call));
        break;
      case Command::Kind::kCancel:
        CancelCall(command.id);
        break;
      case Command::Kind::kResume:
        ResumeCall(command.id);
        break;
    }
  }
  if (!closing) return;
  // Nothing more can be posted: cancel what is left. Completion callbacks may start calls,
  // which then finish at once (see Start), so this loop ends.
  while (!calls_.empty()) {
    Call& call = *calls_.begin()->second;
    ReleaseAttempt(call);
    EndSpan(call, 0, absl::CancelledError("client destroyed"));
    Finish(call, CallError(call, absl::StatusCode::kCancelled, "HTTP client destroyed during"));
  }
  event_base_loopbreak(base_);
}

// ---------------------------------------------------------------------------------------------
// libcurl <-> libevent

int HttpClientImpl::OnCurlSocket(CURL*, curl_socket_t fd, int what, void* shard_arg, void*) {
  auto* shard = static_cast<Shard*>(shard_arg);
  if (what == CURL_POLL_REMOVE) {
    auto it = shard->sockets.find(fd);
    if (it != shard->sockets.end()) {
      event_free(it->second);
      shard->sockets.erase(it);
    }
    return 0;
  }
  const short events = EV_PERSIST | ((what & CURL_POLL_IN) != 0 ? EV_READ : 0) |
                       ((what & CURL_POLL_OUT) != 0 ? EV_WRITE : 0);
  event_base* base = shard->client->base_;
  event*& ev = shard->sockets[fd];
  if (ev == nullptr) {
    ev = event_new(base, fd, events, &HttpClientImpl::OnSocketEvent, shard);
    if (ev == nullptr) {
      shard->sockets.erase(fd);
      return -1;  // libcurl fails the transfers on this socket
    }
  } else {
    event_del(ev);
    event_assign(ev, base, fd, events, &HttpClientImpl::OnSocketEvent, shard);
  }
  event_add(ev, nullptr);
  return 0;
}

int HttpClientImpl::OnCurlTimer(CURLM*, long timeout_ms, void* shard_arg) {
  auto* shard = static_cast<Shard*>(shard_arg);
  if (timeout_ms < 0) {
    evtimer_del(shard->timer);
    return 0;
  }
  // Even a zero timeout goes through the loop: libcurl must not be re-entered from here.
  timeval tv{static_cast<time_t>(timeout_ms / 1000),
             static_cast<suseconds_t>((timeout_ms % 1000) * 1000)};
  evtimer_add(shard->timer, &tv);
  return 0;
}

void HttpClientImpl::OnSocketEvent(evutil_socket_t fd, short events, void* shard_arg) {
  auto* shard = static_cast<Shard*>(shard_arg);
  const int action = ((events & EV_READ) != 0 ? CURL_CSELECT_IN : 0) |
                     ((events & EV_WRITE) != 0 ? CURL_CSELECT_OUT : 0);
  int running = 0;
  curl_multi_socket_action(shard->multi, fd, action, &running);
  shard->client->ProcessCompletedTransfers(*shard);
}

void HttpClientImpl::OnCurlTimerEvent(evutil_socket_t, short, void* shard_arg) {
  auto* shard = static_cast<Shard*>(shard_arg);
  int running = 0;
  curl_multi_socket_action(shard->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  shard->client->ProcessCompletedTransfers(*shard);
}

void HttpClientImpl::ProcessCompletedTransfers(Shard& shard) {
  int queued = 0;
  while (CURLMsg* message = curl_multi_info_read(shard.multi, &queued)) {
    if (message->msg != CURLMSG_DONE) continue;
    // The message dies with the easy handle: copy what we need first.
    CURL* easy = message->easy_handle;
    const CURLcode result = message->data.result;
    Call* call = nullptr;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, reinterpret_cast<char**>(&call));
    if (call != nullptr) OnAttemptDone(*call, result);
  }
}

// ---------------------------------------------------------------------------------------------
// Calls

PeerMetrics& HttpClientImpl::MetricsFor(absl::string_view peer) {
  auto it = peers_.find(peer);
  if (it != peers_.end()) return *it->second;
  if (peers_.size() >= kMaxPeers) peer = "other";
  auto& slot = peers_[peer];
  if (slot == nullptr) slot = std::make_unique<PeerMetrics>(options_.name, std::string(peer));
  return *slot;
}

absl::Status HttpClientImpl::CallError(const Call& call, absl::StatusCode code,
                                       absl::string_view what) const {
  std::string message = absl::StrCat(what, " ", call.request.method, " ", call.safe_url);
  if (call.attempt > 1) absl::StrAppend(&message, " (after ", call.attempt, " attempts)");
  absl::Status status(code, message);
  if (call.attempt > 1) SetFailedAttempts(status, call.attempt);
  return status;
}

void HttpClientImpl::Submit(std::unique_ptr<Call> owned) {
  Call& call = *owned;
  calls_.emplace(call.id, std::move(owned));
  call.start = absl::Now();

  absl::StatusOr<ParsedUrl> url = ParseUrl(call.request.url);
  std::string host = url.ok() ? url->host : "invalid";
  call.metrics = &MetricsFor(call.request.peer_label.empty() ? host : call.request.peer_label);
  call.metrics->in_flight->Increment();
  if (!url.ok()) return Finish(call, url.status());
  call.safe_url = std::move(url->safe_url);
  call.https = url->https;
  call.origin_hash = std::hash<std::string>{}(url->origin);
  if (call.request.version == HttpVersion::kHttp2PriorKnowledge && !url->https) {
    call.via_h2c = true;
    call.h2c_target = internal::H2cTarget{url->host, url->port, url->authority};
    call.h2c_path = std::move(url->path);
    if (!FindHeader(call.request.headers, "authorization").has_value()) {
      call.h2c_authorization = std::move(url->basic_authorization);
    }
  }
  if (absl::Status valid = ValidateRequest(call.request); !valid.ok()) {
    return Finish(
        call, absl::InvalidArgumentError(absl::StrCat(valid.message(), " for ", call.safe_url)));
  }
  if (!options_.allow_private_addresses && !url->https) {
    return Finish(call, absl::PermissionDeniedError(
                            absl::StrCat("plain http is not allowed: ", call.safe_url)));
  }
  call.span_name = absl::StrCat("HTTP ", call.request.method);
  call.inject_trace_context =
      !FindHeader(call.request.headers, telemetry::kTraceparentHeader).has_value();

  const absl::Time deadline = call.request.deadline;
  if (deadline <= call.start) {
    return Finish(call, CallError(call, absl::StatusCode::kDeadlineExceeded,
                                  "deadline passed before the start of"));
  }
  if (deadline != absl::InfiniteFuture()) {
    call.deadline_timer.Arm(base_, deadline - call.start, &HttpClientImpl::OnDeadline, &call);
  }
  StartAttempt(call);
}

absl::Status HttpClientImpl::ConfigureEasy(Call& call) {
  CURL* easy = call.easy;
  const HttpRequest& request = call.request;

  bool has_expect = false;
  for (const auto& [name, value] : request.headers) {
    // "Name;" is libcurl's way to send a header with an empty value.
    const std::string line =
        value.empty() ? absl::StrCat(name, ";") : absl::StrCat(name, ": ", value);
    curl_slist* next = curl_slist_append(call.header_list, line.c_str());
    if (next == nullptr) return absl::ResourceExhaustedError("curl_slist_append failed");
    call.header_list = next;
    has_expect = has_expect || absl::EqualsIgnoreCase(name, "expect");
  }
  if (!has_expect) {
    // libcurl waits up to a second for "100 Continue" before sending a large body; providers
    // answer at once anyway.
    curl_slist* next = curl_slist_append(call.header_list, "Expect:");
    if (next != nullptr) call.header_list = next;
  }
  if (call.inject_trace_context && call.span.context().IsValid()) {
    telemetry::Inject(call.span.context(), [&](absl::string_view name, absl::string_view value) {
      const std::string line = absl::StrCat(name, ": ", value);
      curl_slist* next = curl_slist_append(call.header_list, line.c_str());
      if (next != nullptr) call.header_list = next;
    });
  }

  curl_easy_setopt(easy, CURLOPT_URL, request.url.c_str());
  if (resolve_list_ != nullptr) curl_easy_setopt(easy, CURLOPT_RESOLVE, resolve_list_);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, &call);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(easy, CURLOPT_BUFFERSIZE, kReceiveBufferSize);
  curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, call.error_buffer);
  curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, &HttpClientImpl::OnHeader);
  curl_easy_setopt(easy, CURLOPT_HEADERDATA, &call);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, &HttpClientImpl::OnWrite);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, &call);
  curl_easy_setopt(easy, CURLOPT_HTTPHEADER, call.header_list);
  curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(easy, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
  curl_easy_setopt(easy, CURLOPT_ACCEPT_ENCODING, "");
  curl_easy_setopt(easy, CURLOPT_USERAGENT, "montage-http/1");
  curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(easy, CURLOPT_MAXAGE_CONN,
                   static_cast<long>(std::max<int64_t>(
                       1, absl::ToInt64Seconds(options_.idle_connection_timeout))));
  if (options_.allow_private_addresses) {
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
  } else {
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(easy, CURLOPT_OPENSOCKETFUNCTION, &HttpClientImpl::OnOpenSocket);
    curl_easy_setopt(easy, CURLOPT_OPENSOCKETDATA, &call);
  }

  if (request.method == "HEAD") {
    curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);
  } else if (request.method == "GET" && request.body.empty()) {
    curl_easy_setopt(easy, CURLOPT_HTTPGET, 1L);
  } else {
    if (request.method != "POST") {
      curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    }
    if (request.method == "POST" || !request.body.empty()) {
      // Not copied: the body lives in the call for all its attempts.
      curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE,
                       static_cast<curl_off_t>(request.body.size()));
      curl_easy_setopt(easy, CURLOPT_POSTFIELDS, request.body.data());
    }
  }

  // PIPEWAIT: wait for a connection being set up rather than open a second one, so that
  // concurrent requests share one HTTP/2 connection. Not for cleartext HTTP/1.1, where libcurl
  // would hold every request to a host until the first one's answer arrived.
  switch (request.version) {
    case HttpVersion::kDefault:
      curl_easy_setopt(easy, CURLOPT_HTTP_VERSION, long{CURL_HTTP_VERSION_2TLS});
      if (call.https) curl_easy_setopt(easy, CURLOPT_PIPEWAIT, 1L);
      break;
    case HttpVersion::kHttp1:
      curl_easy_setopt(easy, CURLOPT_HTTP_VERSION, long{CURL_HTTP_VERSION_1_1});
      break;
    case HttpVersion::kHttp2PriorKnowledge:
      curl_easy_setopt(easy, CURLOPT_HTTP_VERSION, long{CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE});
      if (LibcurlBreaksIdleH2cReuse()) {
        // libcurl < 8 fails a second stream on an h2c connection ("Error in the HTTP2 framing
        // layer"), idle or busy (curl #10634; seen here with curl -Z against nghttpd too). So each
        // request gets a connection of its own, closed when it ends: HTTP/2 framing, no
        // multiplexing.
        curl_easy_setopt(easy, CURLOPT_FRESH_CONNECT, 1L);
        curl_easy_setopt(easy, CURLOPT_FORBID_REUSE, 1L);
      } else {
        curl_easy_setopt(easy, CURLOPT_PIPEWAIT, 1L);
      }
      break;
  }
  if (request.connect_timeout > absl::ZeroDuration()) {
    curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, ToCurlMillis(request.connect_timeout));
  }
  if (request.attempt_timeout > absl::ZeroDuration()) {
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, ToCurlMillis(request.attempt_timeout));
  }
  return absl::OkStatus();
}

void HttpClientImpl::StartAttempt(Call& call) {
  ++call.attempt;
  call.response = HttpResponse();
  call.headers_complete = false;
  call.headers_delivered = false;
  call.error_body_truncated = false;
  call.refused_address = false;
  call.delivered_bytes = 0;
  call.skip_bytes = 0;
  call.abort_status = absl::OkStatus();
  call.error_buffer[0] = '\0';

  call.span = telemetry::GlobalTracer().StartSpan(call.span_name, telemetry::SpanKind::kClient,
                                                  call.request.parent_span);
  if (call.span.IsRecording()) {
    call.span.SetAttribute("http.method", call.request.method);
    call.span.SetAttribute("http.url", call.safe_url);
    call.span.SetAttribute("attempt", call.attempt);
  }

  absl::Status status = call.via_h2c ? StartH2cStream(call) : StartTransfer(call);
  if (!status.ok()) {
    EndSpan(call, 0, status);
    return Finish(call, status);
  }
  if (call.request.first_byte_timeout > absl::ZeroDuration()) {
    call.first_byte_timer.Arm(base_, call.request.first_byte_timeout,
                              &HttpClientImpl::OnFirstByteTimeout, &call);
  }
  if (call.via_h2c && call.request.attempt_timeout > absl::ZeroDuration()) {
    call.attempt_timer.Arm(base_, call.request.attempt_timeout, &HttpClientImpl::OnAttemptTimeout,
                           &call);
  }
}

absl::Status HttpClientImpl::StartTransfer(Call& call) {
  call.easy = curl_easy_init();
  absl::Status status = call.easy == nullptr ? absl::ResourceExhaustedError("curl_easy_init failed")
                                             : ConfigureEasy(call);
  if (status.ok()) {
    Shard& shard = PickShard(call);
    if (curl_multi_add_handle(shard.multi, call.easy) == CURLM_OK) {
      call.shard = &shard;
      ++shard.transfers;
      return absl::OkStatus();
    }
    status = absl::InternalError("curl_multi_add_handle failed");
  }
  if (call.easy != nullptr) {
    curl_easy_cleanup(call.easy);
    call.easy = nullptr;
  }
  curl_slist_free_all(call.header_list);
  call.header_list = nullptr;
  return status;
}

absl::Status HttpClientImpl::StartH2cStream(Call& call) {
  if (!h2c_->MakeRoomFor(call.h2c_target)) {
    // Every connection is busy at max_total_connections: the attempt waits (its timers run).
    call.h2c_waiting = true;
    h2c_waiting_.push_back(call.id);
    return absl::OkStatus();
  }
  return SubmitH2cStream(call);
}

void HttpClientImpl::StartWaitingH2cStreams() {
  while (!h2c_waiting_.empty()) {
    auto it = calls_.find(h2c_waiting_.front());
    if (it == calls_.end() || !it->second->h2c_waiting) {
      h2c_waiting_.pop_front();
      continue;
    }
    Call& call = *it->second;
    if (!h2c_->MakeRoomFor(call.h2c_target)) return;
    h2c_waiting_.pop_front();
    call.h2c_waiting = false;
    if (absl::Status status = SubmitH2cStream(call); !status.ok()) {
      ConcludeAttempt(call, status, /*transient=*/false, /*final=*/true);
    }
  }
}

absl::Status HttpClientImpl::SubmitH2cStream(Call& call) {
  internal::H2cRequest request;
  request.method = call.request.method;
  request.path = call.h2c_path;
  request.headers = &call.request.headers;
  request.body = call.request.body;
  request.connect_timeout = call.request.connect_timeout;
  if (!call.h2c_authorization.empty()) {
    request.extra_headers.emplace_back("authorization", call.h2c_authorization);
  }
  if (call.inject_trace_context && call.span.context().IsValid()) {
    telemetry::Inject(call.span.context(), [&](absl::string_view name, absl::string_view value) {
      request.extra_headers.emplace_back(std::string(name), std::string(value));
    });
  }
  absl::StatusOr<internal::H2cPool::Handle> handle =
      h2c_->Start(call.h2c_target, std::move(request), &call);
  if (!handle.ok()) return handle.status();
  call.h2c = *std::move(handle);
  return absl::OkStatus();
}

void HttpClientImpl::ReleaseAttempt(Call& call) {
  call.first_byte_timer.Disarm();
  call.attempt_timer.Disarm();
  call.h2c_waiting = false;  // its id in h2c_waiting_ is skipped
  // Mid-answer this resets the stream: the server sees the client go away.
  h2c_->Reset(call.h2c);
  if (call.easy != nullptr) {
    // Mid-transfer this closes the connection (HTTP/1.1) or resets the stream (HTTP/2): the
    // server sees the client go away.
    if (call.shard != nullptr) {
      curl_multi_remove_handle(call.shard->multi, call.easy);
      --call.shard->transfers;
      call.shard = nullptr;
    }
    curl_easy_cleanup(call.easy);
    call.easy = nullptr;
  }
  curl_slist_free_all(call.header_list);
  call.header_list = nullptr;
}

void HttpClientImpl::EndSpan(Call& call, int http_status, const absl::Status& error) {
  if (call.span.IsRecording()) {
    if (http_status > 0) call.span.SetAttribute("http.status_code", http_status);
    if (!error.ok()) {
      call.span.SetStatus(telemetry::SpanStatusCode::kError, error.message());
    } else if (http_status >= 400) {
      call.span.SetStatus(telemetry::SpanStatusCode::kError);
    }
  }
  call.span.End();
}

void HttpClientImpl::OnAttemptDone(Call& call, CURLcode result) {
  long code = 0;
  curl_easy_getinfo(call.easy, CURLINFO_RESPONSE_CODE, &code);
  long version = 0;
  curl_easy_getinfo(call.easy, CURLINFO_HTTP_VERSION, &version);
  call.response.http_version = internal::HttpVersionNumber(version);
  call.response.status = static_cast<int>(code);
  if (result == CURLE_OK || (call.error_body_truncated && result == CURLE_WRITE_ERROR)) {
    return ConcludeAttempt(call, absl::OkStatus(), false);
  }
  if (call.refused_address && result == CURLE_COULDNT_CONNECT) {
    return ConcludeAttempt(
        call,
        absl::PermissionDeniedError(absl::StrCat(call.safe_url, " resolves to a private address")),
        false, /*final=*/true);
  }
  const internal::CurlErrorClass error_class = internal::ClassifyCurlError(result);
  std::string what = curl_easy_strerror(result);
  if (call.error_buffer[0] != '\0') absl::StrAppend(&what, " (", call.error_buffer, ")");
  ConcludeAttempt(call, absl::Status(error_class.code, what), error_class.transient);
}

void HttpClientImpl::Replay(Call& call, const absl::Status& why) {
  call.h2c_replayed = true;
  ReleaseAttempt(call);
  EndSpan(call, 0, why);
  --call.attempt;
  call.backoff_timer.Arm(base_, absl::ZeroDuration(), &HttpClientImpl::OnBackoffDone, &call);
}

void HttpClientImpl::ConcludeAttempt(Call& call, absl::Status transport, bool transient,
                                     bool final) {
  ReleaseAttempt(call);
  if (call.cancel_requested) {
    EndSpan(call, 0, absl::CancelledError("cancelled"));
    return Finish(call, CallError(call, absl::StatusCode::kCancelled, "cancelled"));
  }
  if (!call.abort_status.ok()) {
    EndSpan(call, call.response.status, call.abort_status);
    return Finish(call, call.abort_status);
  }
  if (transport.ok()) {
    EndSpan(call, call.response.status, absl::OkStatus());
    return HandleAnswer(call);
  }
  EndSpan(call, 0, transport);
  if (final) return Finish(call, std::move(transport));
  HandleTransportError(call, std::move(transport), transient);
}

void HttpClientImpl::HandleAnswer(Call& call) {
  const RetryPolicy& policy = call.request.retry;
  const bool retriable =
      !call.headers_delivered &&
      (policy.retriable ? policy.retriable(call.response) : IsRetriableByDefault(call.response));
  if (retriable && ScheduleRetry(call, &call.response)) return;
  call.response.attempts = call.attempt;
  HttpResponse response = std::move(call.response);
  Finish(call, std::move(response));
}

void HttpClientImpl::HandleTransportError(Call& call, absl::Status error, bool transient) {
  if (transient && call.request.retry.retry_transport_errors && !call.headers_delivered &&
      ScheduleRetry(call, nullptr)) {
    return;
  }
  Finish(call, CallError(call, error.code(), absl::StrCat(error.message(), ":")));
}

bool HttpClientImpl::ScheduleRetry(Call& call, const HttpResponse* response) {
  const RetryPolicy& policy = call.request.retry;
  if (call.attempt >= std::max<uint32_t>(policy.max_attempts, 1)) return false;
  const absl::Time now = absl::Now();
  std::optional<absl::Duration> delay =
      RetryDelay(policy, call.attempt, response, now, absl::Uniform(random_, 0.0, 1.0));
  if (!delay.has_value() || now + *delay >= call.request.deadline) return false;
  call.metrics->retries->Increment();
  call.backoff_timer.Arm(base_, *delay, &HttpClientImpl::OnBackoffDone, &call);
  return true;
}

void HttpClientImpl::Finish(Call& call, absl::StatusOr<HttpResponse> result) {
  auto it = calls_.find(call.id);
  std::unique_ptr<Call> owned = std::move(it->second);
  calls_.erase(it);
  ReleaseAttempt(call);

  PeerMetrics& metrics = *call.metrics;
  metrics.in_flight->Decrement();
  metrics.duration->Observe(absl::ToDoubleSeconds(absl::Now() - call.start));
  metrics.Requests(result.ok() ? result->status : 0, result.status().code()).Increment();

  DoneCallback done = std::move(call.done);
  owned.reset();  // frees the timers and the caller's other callbacks before on_done runs
  in_flight_.fetch_sub(1, std::memory_order_acq_rel);
  if (done) std::move(done)(std::move(result));
}

void HttpClientImpl::CancelCall(uint64_t id) {
  auto it = calls_.find(id);
  if (it == calls_.end()) return;  // finished already
  Call& call = *it->second;
  ReleaseAttempt(call);
  if (call.span.IsRecording()) EndSpan(call, 0, absl::CancelledError("cancelled"));
  Finish(call, CallError(call, absl::StatusCode::kCancelled, "cancelled"));
}

void HttpClientImpl::ResumeCall(uint64_t id) {
  auto it = calls_.find(id);
  if (it == calls_.end()) return;
  Call& call = *it->second;
  if (call.via_h2c) return h2c_->Resume(call.h2c);
  if (call.easy == nullptr) return;
  // Delivery of what libcurl held back may happen inside this call (OnWrite runs).
  const CURLcode result = curl_easy_pause(call.easy, CURLPAUSE_CONT);
  if (result != CURLE_OK) OnAttemptDone(call, result);
}

void HttpClientImpl::OnDeadline(evutil_socket_t, short, void* arg) {
  Call& call = *static_cast<Call*>(arg);
  HttpClientImpl& self = *call.client;
  self.ReleaseAttempt(call);
  if (call.span.IsRecording()) {
    self.EndSpan(call, 0, absl::DeadlineExceededError("deadline passed"));
  }
  self.Finish(call,
              self.CallError(call, absl::StatusCode::kDeadlineExceeded, "deadline passed during"));
}

void HttpClientImpl::OnFirstByteTimeout(evutil_socket_t, short, void* arg) {
  Call& call = *static_cast<Call*>(arg);
  call.client->ConcludeAttempt(
      call,
      absl::DeadlineExceededError(
          absl::StrCat("no response headers within ", Millis(call.request.first_byte_timeout))),
      /*transient=*/true);
}

void HttpClientImpl::OnAttemptTimeout(evutil_socket_t, short, void* arg) {
  Call& call = *static_cast<Call*>(arg);
  call.client->ConcludeAttempt(
      call,
      absl::DeadlineExceededError(
          absl::StrCat("no complete answer within ", Millis(call.request.attempt_timeout))),
      /*transient=*/true);
}

void HttpClientImpl::OnBackoffDone(evutil_socket_t, short, void* arg) {
  Call& call = *static_cast<Call*>(arg);
  call.client->StartAttempt(call);
}

// ---------------------------------------------------------------------------------------------
// Transfer callbacks (inside curl_multi_socket_action; they must not touch the multi handle)

size_t HttpClientImpl::OnHeader(char* data, size_t size, size_t count, void* arg) {
  Call& call = *static_cast<Call*>(arg);
  const size_t length = size * count;
  if (call.cancel_requested) return 0;
  if (call.headers_complete) return length;  // trailers
  absl::string_view line(data, length);
  absl::ConsumeSuffix(&line, "\n");
  absl::ConsumeSuffix(&line, "\r");
  if (absl::StartsWith(line, "HTTP/")) {
    // A new status line: whatever came before was an interim (1xx) answer.
    call.response.headers.clear();
    return length;
  }
  if (!line.empty()) {
    if (line.front() == ' ' || line.front() == '\t') {
      // Obsolete line folding continues the previous value.
      if (!call.response.headers.empty()) {
        absl::StrAppend(&call.response.headers.back().second, " ",
                        absl::StripAsciiWhitespace(line));
      }
      return length;
    }
    const size_t colon = line.find(':');
    if (colon != absl::string_view::npos) {
      call.response.headers.emplace_back(
          std::string(line.substr(0, colon)),
          std::string(absl::StripAsciiWhitespace(line.substr(colon + 1))));
    }
    return length;
  }
  // The blank line ending a header block.
  long code = 0;
  curl_easy_getinfo(call.easy, CURLINFO_RESPONSE_CODE, &code);
  if (code >= 100 && code < 200) return length;  // interim; the final answer follows
  return call.client->HeadersArrived(call, static_cast<int>(code)) ? length : 0;
}

bool HttpClientImpl::HeadersArrived(Call& call, int status) {
  call.headers_complete = true;
  call.response.status = status;
  call.first_byte_timer.Disarm();
  if (call.streaming && status >= 200 && status < 300) {
    call.headers_delivered = true;
    if (call.on_headers) call.on_headers(call.response.status, call.response.headers);
    if (call.cancel_requested) return false;
  }
  return true;
}

HttpClientImpl::BodyAction HttpClientImpl::BodyArrived(Call& call, absl::string_view chunk) {
  if (call.cancel_requested) return BodyAction::kStop;
  std::string& body = call.response.body;
  if (!call.streaming) {
    if (body.size() + chunk.size() > call.request.max_response_bytes) {
      call.abort_status = absl::ResourceExhaustedError(
          absl::StrCat("response body of ", call.request.method, " ", call.safe_url, " exceeds ",
                       call.request.max_response_bytes, " bytes"));
      return BodyAction::kStop;
    }
    body.append(chunk.data(), chunk.size());
    return BodyAction::kContinue;
  }
  if (!call.headers_delivered) {
    // A non-2xx answer to a stream: keep (the start of) the error document for on_done.
    const size_t cap = std::min(kMaxStreamErrorBody, call.request.max_response_bytes);
    const size_t room = cap - std::min(cap, body.size());
    body.append(chunk.data(), std::min(room, chunk.size()));
    if (chunk.size() > room) {
      call.error_body_truncated = true;
      return BodyAction::kStop;
    }
    return BodyAction::kContinue;
  }
  if (call.delivered_bytes + chunk.size() > call.request.max_response_bytes) {
    call.abort_status = absl::ResourceExhaustedError(
        absl::StrCat("response stream of ", call.request.method, " ", call.safe_url, " exceeds ",
                     call.request.max_response_bytes, " bytes"));
    return BodyAction::kStop;
  }
  call.delivered_bytes += chunk.size();
  const DataAction action = call.on_data ? call.on_data(chunk) : DataAction::kContinue;
  if (call.cancel_requested) return BodyAction::kStop;
  return action == DataAction::kPause ? BodyAction::kPause : BodyAction::kContinue;
}

size_t HttpClientImpl::OnWrite(char* data, size_t size, size_t count, void* arg) {
  Call& call = *static_cast<Call*>(arg);
  const size_t length = size * count;
  absl::string_view chunk(data, length);
  if (call.skip_bytes > 0 && !call.cancel_requested) {
    const size_t skip = std::min(call.skip_bytes, chunk.size());
    chunk.remove_prefix(skip);
    call.skip_bytes -= skip;
    if (chunk.empty()) return length;
  }
  switch (call.client->BodyArrived(call, chunk)) {
    case BodyAction::kContinue:
      return length;
    case BodyAction::kStop:
      return 0;
    case BodyAction::kPause:
      // libcurl keeps the whole buffer it passed and hands it over again on resume; on_data has
      // consumed it already, so those bytes are skipped then.
      call.skip_bytes = length;
      return CURL_WRITEFUNC_PAUSE;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// h2c streams (the pool calls these on the loop thread, outside libcurl)

void Call::OnH2cHeaders(int status, Headers headers) {
  response.headers = std::move(headers);
  response.http_version = 2;
  if (!client->HeadersArrived(*this, status))
    client->ConcludeAttempt(*this, absl::OkStatus(), false);
}

DataAction Call::OnH2cData(absl::string_view chunk) {
  switch (client->BodyArrived(*this, chunk)) {
    case HttpClientImpl::BodyAction::kContinue:
      return DataAction::kContinue;
    case HttpClientImpl::BodyAction::kPause:
      return DataAction::kPause;
    case HttpClientImpl::BodyAction::kStop:
      client->ConcludeAttempt(*this, absl::OkStatus(), false);
      return DataAction::kContinue;
  }
  return DataAction::kContinue;
}

void Call::OnH2cClosed(internal::H2cClose close) {
  h2c = {};  // the stream is gone already
  if (!close.status.ok() && close.unprocessed && !h2c_replayed && !headers_complete &&
      !cancel_requested) {
    return client->Replay(*this, close.status);
  }
  client->ConcludeAttempt(*this, std::move(close.status), close.transient);
}

curl_socket_t HttpClientImpl::OnOpenSocket(void* arg, curlsocktype purpose,
                                           curl_sockaddr* address) {
  Call& call = *static_cast<Call*>(arg);
  if (purpose == CURLSOCKTYPE_IPCXN &&
      !internal::IsPublicAddress(&address->addr, address->addrlen)) {
    call.refused_address = true;
    return CURL_SOCKET_BAD;
  }
  return socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
}

constexpr absl::string_view kAttemptsPayload = "type.montage.dev/montage.http.Attempts";

}  // namespace

uint32_t FailedAttempts(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kAttemptsPayload);
  uint32_t attempts = 0;
  if (!payload.has_value() || !absl::SimpleAtoi(std::string(*payload), &attempts)) return 0;
  return attempts;
}

void SetFailedAttempts(absl::Status& status, uint32_t attempts) {
  if (!status.ok() && attempts > 1)
    status.SetPayload(kAttemptsPayload, absl::Cord(absl::StrCat(attempts)));
}

absl::StatusOr<std::unique_ptr<HttpClient>> HttpClient::Create(HttpClientOptions options) {
  GlobalInit();
  auto client = std::make_unique<HttpClientImpl>(std::move(options));
  absl::Status status = client->Init();
  if (!status.ok()) return status;
  return std::unique_ptr<HttpClient>(std::move(client));
}

}  // namespace montage::http
