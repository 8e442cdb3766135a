#include "tests/fake_llm/fake_llm_server.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/server/evhttp_method.h"
#include "nlohmann/json.hpp"
#include "tests/fake_llm/h2c_listener.h"
#include "tests/fake_llm/transport.h"

namespace montage::testing {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr size_t kMaxHeaderBytes = 64 << 10;
// Idle keep-alive connections and stalled writes are dropped after this; a pending answer never
// is (libevent does not read or write while we wait).
constexpr int kConnectionTimeoutSeconds = 3600;
// The kernel caps this at net.core.somaxconn; evhttp's own bind would use 128, too few for a
// benchmark that opens thousands of connections at once.
constexpr int kListenBacklog = 65535;
constexpr absl::string_view kRedacted = "<redacted>";
// The body of a speech answer scripted with invalid_json.
constexpr size_t kOddPcmBytes = 4801;

void EnableLibeventThreads() {
  static const bool enabled = [] { return evthread_use_pthreads() == 0; }();
  (void)enabled;
}

// libevent writes with writev, which raises SIGPIPE when a client has gone; that must not end the
// test process. Only the default disposition is replaced.
void IgnoreSigpipe() {
  struct sigaction current;
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
    signal(SIGPIPE, SIG_IGN);
  }
}

bool IsCredentialHeader(absl::string_view lower_name) {
  return lower_name == "authorization" || lower_name == "proxy-authorization" ||
         lower_name == "x-api-key" || lower_name == "x-goog-api-key" || lower_name == "cookie";
}

std::string QueryParam(const std::string& query, const char* name) {
  if (query.empty()) return "";
  evkeyvalq params;
  if (evhttp_parse_query_str(query.c_str(), &params) != 0) return "";
  const char* value = evhttp_find_header(&params, name);
  std::string result = value != nullptr ? value : "";
  evhttp_clear_headers(&params);
  return result;
}

void AddHeaders(evhttp_request* request, const std::string& content_type,
                const HeaderList& headers) {
  evkeyvalq* out = evhttp_request_get_output_headers(request);
  evhttp_add_header(out, "Content-Type", content_type.c_str());
  for (const auto& [name, value] : headers) {
    evhttp_add_header(out, name.c_str(), value.c_str());
  }
}

// Answers one HTTP/1.1 request of evhttp.
class EvhttpResponder final : public Responder {
 public:
  EvhttpResponder(evhttp_request* request, event_base* base)
      : request_(request), connection_(evhttp_request_get_connection(request)), base_(base) {}
  ~EvhttpResponder() override { StopWatching(); }

  void WatchDeparture(std::function<void()> on_gone) override {
    StopWatching();
    if (on_gone == nullptr) return;
    on_gone_ = std::move(on_gone);
    evhttp_connection_set_closecb(connection_, &EvhttpResponder::OnClosed, this);
    // libevent stops reading a connection once it has read a request, so it would learn of the
    // client's close only when writing. Watch the socket ourselves.
    bufferevent* bev = evhttp_connection_get_bufferevent(connection_);
    const evutil_socket_t fd = bev != nullptr ? bufferevent_getfd(bev) : -1;
    if (fd >= 0) {
      watch_ = event_new(base_, fd, EV_READ, &EvhttpResponder::OnReadable, this);
      if (watch_ != nullptr) event_add(watch_, nullptr);
    }
  }
  void SendWhole(int status, const std::string& content_type, const HeaderList& headers,
                 const std::string& body) override {
    AddHeaders(request_, content_type, headers);
    evbuffer* buffer = evbuffer_new();
    evbuffer_add(buffer, body.data(), body.size());
    evhttp_send_reply(request_, status, ReasonPhrase(status), buffer);
    evbuffer_free(buffer);
  }
  void StartStream(int status, const std::string& content_type,
                   const HeaderList& headers) override {
    AddHeaders(request_, content_type, headers);
    evhttp_send_reply_start(request_, status, ReasonPhrase(status));
  }
  void SendChunk(const std::string& bytes) override {
    evbuffer* chunk = evbuffer_new();
    evbuffer_add(chunk, bytes.data(), bytes.size());
    evhttp_send_reply_chunk(request_, chunk);
    evbuffer_free(chunk);
  }
  void EndStream() override { evhttp_send_reply_end(request_); }
  bool ReadyToCut() override {
    bufferevent* bev = evhttp_connection_get_bufferevent(connection_);
    return bev == nullptr || evbuffer_get_length(bufferevent_get_output(bev)) == 0;
  }
  void Cut(bool /*no_error: HTTP/1.1 has one way to break off*/) override {
    StopWatching();
    evhttp_connection_free(connection_);  // frees the request too
  }

 private:
  void StopWatching() {
    if (watch_ != nullptr) event_free(watch_);
    watch_ = nullptr;
    if (on_gone_ != nullptr) evhttp_connection_set_closecb(connection_, nullptr, nullptr);
    on_gone_ = nullptr;
  }

  static void OnReadable(evutil_socket_t fd, short, void* self) {
    auto* responder = static_cast<EvhttpResponder*>(self);
    char byte;
    const ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) return;  // a pipelined request: stop watching (libevent reads it after the answer)
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      event_add(responder->watch_, nullptr);
      return;
    }
    evhttp_connection* connection = responder->connection_;
    const std::function<void()> on_gone = responder->on_gone_;
    responder->StopWatching();
    on_gone();                           // destroys the responder
    evhttp_connection_free(connection);  // frees the request too
  }

  // libevent noticed the close itself (a failed write while streaming).
  static void OnClosed(evhttp_connection*, void* self) {
    auto* responder = static_cast<EvhttpResponder*>(self);
    evhttp_request* request = responder->request_;
    // On a network error libevent detaches the unanswered request from the connection and leaves
    // it to us; otherwise it frees it with the connection.
    const bool detached = evhttp_request_get_connection(request) == nullptr;
    const std::function<void()> on_gone = responder->on_gone_;
    responder->StopWatching();
    on_gone();  // destroys the responder
    if (detached) evhttp_request_free(request);
  }

  evhttp_request* const request_;
  evhttp_connection* const connection_;
  event_base* const base_;
  event* watch_ = nullptr;
  std::function<void()> on_gone_;
};

void SendJson(Responder& responder, int status, const ordered_json& value) {
  responder.SendWhole(status, "application/json", {},
                      value.dump(-1, ' ', false, json::error_handler_t::replace));
}

absl::Status BehaviourFromJson(const json& item, Behaviour& out) {
  if (!item.is_object()) return absl::InvalidArgumentError("a behaviour must be a JSON object");
  for (const auto& [key, value] : item.items()) {
    if (key == "status") {
      if (!value.is_number_integer() || value.get<int64_t>() < 100 || value.get<int64_t>() > 599) {
        return absl::InvalidArgumentError("status: must be an HTTP status (100-599)");
      }
      out.status = value.get<int>();
    } else if (key == "kind") {
      if (!value.is_string()) return absl::InvalidArgumentError("kind: must be a string");
      out.kind = value.get<std::string>();
    } else if (key == "headers") {
      if (!value.is_object()) return absl::InvalidArgumentError("headers: must be an object");
      for (const auto& [name, header_value] : value.items()) {
        if (!header_value.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat("headers.", name, ": must be a string"));
        }
        out.headers.emplace_back(name, header_value.get<std::string>());
      }
    } else if (key == "body") {
      if (!value.is_string()) return absl::InvalidArgumentError("body: must be a string");
      out.body = value.get<std::string>();
    } else if (key == "delay_ms") {
      if (!value.is_number() || value.get<double>() < 0) {
        return absl::InvalidArgumentError("delay_ms: must be a number >= 0");
      }
      out.delay = absl::Milliseconds(value.get<double>());
    } else if (key == "invalid_json" || key == "hang" || key == "stream_fail_no_error") {
      if (!value.is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat(key, ": must be a boolean"));
      }
      (key == "hang"           ? out.hang
       : key == "invalid_json" ? out.invalid_json
                               : out.stream_fail_no_error) = value.get<bool>();
    } else if (key == "stream_fail_after") {
      if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
          value.get<int64_t>() > std::numeric_limits<int>::max()) {
        return absl::InvalidArgumentError("stream_fail_after: must be an integer >= 0");
      }
      out.stream_fail_after = value.get<int>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown behaviour key '", key, "'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// One provider request from arrival to its last byte (or its client's departure). The answer is
// decided on arrival; timers then hand it out.
struct FakeLlmServer::Exchange {
  FakeLlmServer* server = nullptr;
  uint64_t id = 0;
  std::unique_ptr<Responder> responder;
  event* timer = nullptr;

  int status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  bool hang = false;
  // A whole answer...
  std::string body;
  // ...or a stream.
  bool streaming = false;
  std::vector<std::string> events;
  size_t next_event = 0;
  // After this many events the connection is closed without ending the stream.
  size_t cut_after = std::numeric_limits<size_t>::max();
  bool cut_no_error = false;  // Behaviour::stream_fail_no_error
  bool started = false;
  absl::Duration chunk_interval;
};

absl::StatusOr<std::vector<Behaviour>> ParseBehaviours(absl::string_view text) {
  const json parsed = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return absl::InvalidArgumentError("behaviours: not valid JSON");
  std::vector<Behaviour> behaviours;
  const json list = parsed.is_array() ? parsed : json::array({parsed});
  for (const json& item : list) {
    Behaviour behaviour;
    absl::Status status = BehaviourFromJson(item, behaviour);
    if (!status.ok()) return status;
    behaviours.push_back(std::move(behaviour));
  }
  return behaviours;
}

std::string RecordedRequest::header(absl::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (key == name) return value;
  }
  return "";
}

std::string StatsToJson(const FakeLlmStats& stats) {
  ordered_json recent = ordered_json::array();
  for (const RecordedRequest& r : stats.recent) {
    ordered_json headers = ordered_json::object();
    for (const auto& [name, value] : r.headers) headers[name] = value;
    recent.push_back({{"provider", r.provider},
                      {"method", r.method},
                      {"path", r.path},
                      {"stream", r.stream},
                      {"body", r.body},
                      {"headers", std::move(headers)}});
  }
  const ordered_json out = {{"total_requests", stats.total_requests},
                            {"openai_requests", stats.openai_requests},
                            {"gemini_requests", stats.gemini_requests},
                            {"anthropic_requests", stats.anthropic_requests},
                            {"tts_requests", stats.tts_requests},
                            {"in_flight", stats.in_flight},
                            {"peak_in_flight", stats.peak_in_flight},
                            {"completed", stats.completed},
                            {"disconnects", stats.disconnects},
                            {"h2c_connections", stats.h2c_connections},
                            {"queued_behaviours", stats.queued_behaviours},
                            {"recent", std::move(recent)}};
  return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

FakeLlmServer::FakeLlmServer(FakeLlmOptions options) : options_(std::move(options)) {
  settings_.default_delay = options_.default_delay;
  settings_.chunk_interval = options_.chunk_interval;
  settings_.expected_key = options_.expected_key;
}

absl::StatusOr<std::unique_ptr<FakeLlmServer>> FakeLlmServer::Start(FakeLlmOptions options) {
  EnableLibeventThreads();
  IgnoreSigpipe();
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("port ", options.port, " is out of range"));
  }
  if (options.h2c_port < -1 || options.h2c_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("h2c port ", options.h2c_port, " is out of range"));
  }
  std::unique_ptr<FakeLlmServer> server(new FakeLlmServer(options));
  server->base_ = event_base_new();
  if (server->base_ == nullptr) return absl::InternalError("event_base_new failed");
  server->http_ = evhttp_new(server->base_);
  if (server->http_ == nullptr) return absl::InternalError("evhttp_new failed");
  evhttp_set_allowed_methods(server->http_, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD);
  evhttp_set_max_body_size(server->http_, kMaxRequestBodyBytes);
  evhttp_set_max_headers_size(server->http_, kMaxHeaderBytes);
  evhttp_set_timeout(server->http_, kConnectionTimeoutSeconds);
  evhttp_set_gencb(server->http_, &FakeLlmServer::OnRequest, server.get());
  absl::Status listening = server->Listen(options.port);
  if (!listening.ok()) return listening;
  if (options.h2c_port >= 0) {
    FakeLlmServer* self = server.get();
    absl::StatusOr<std::unique_ptr<H2cListener>> h2c = H2cListener::Start(
        server->base_, options.h2c_port,
        [self](IncomingRequest request, std::unique_ptr<Responder> responder) {
          self->Dispatch(std::move(request), std::move(responder));
        },
        [self] {
          absl::MutexLock lock(&self->mu_);
          ++self->stats_.h2c_connections;
        });
    if (!h2c.ok()) return h2c.status();
    server->h2c_ = *std::move(h2c);
    server->h2c_port_ = server->h2c_->port();
  }
  // Stop() activates this event; an activation made before the loop runs is not lost.
  server->stop_event_ = event_new(
      server->base_, -1, 0,
      [](evutil_socket_t, short, void* base) {
        event_base_loopbreak(static_cast<event_base*>(base));
      },
      server->base_);
  if (server->stop_event_ == nullptr) return absl::InternalError("event_new failed");
  FakeLlmServer* raw = server.get();
  server->thread_ = std::thread([raw] { raw->Run(); });
  return server;
}

absl::Status FakeLlmServer::Listen(int port) {
  absl::StatusOr<LoopbackSocket> socket = ListenLoopback(port, kListenBacklog);
  if (!socket.ok()) return socket.status();
  // From here the listener owns (and closes) the socket.
  if (evhttp_accept_socket_with_handle(http_, socket->fd) == nullptr) {
    close(socket->fd);
    return absl::InternalError("evhttp_accept_socket_with_handle failed");
  }
  port_ = socket->port;
  return absl::OkStatus();
}

FakeLlmServer::~FakeLlmServer() {
  Stop();
  h2c_.reset();  // before the event base it uses
  if (http_ != nullptr) evhttp_free(http_);
  if (stop_event_ != nullptr) event_free(stop_event_);
  if (base_ != nullptr) event_base_free(base_);
}

void FakeLlmServer::Run() {
  event_base_dispatch(base_);
  // Tear down on this thread: pending requests are dropped (not disconnects), then freeing the
  // transports closes every connection.
  stopping_ = true;
  while (!exchanges_.empty()) Retire(exchanges_.begin()->second.get(), Outcome::kDropped);
  h2c_.reset();
  evhttp_free(http_);
  http_ = nullptr;
}

void FakeLlmServer::Stop() {
  if (!thread_.joinable()) return;
  event_active(stop_event_, EV_READ, 0);
  thread_.join();
}

std::string FakeLlmServer::base_url() const { return absl::StrCat("http://127.0.0.1:", port_); }

std::string FakeLlmServer::h2c_base_url() const {
  return h2c_port_ < 0 ? "" : absl::StrCat("http://127.0.0.1:", h2c_port_);
}

void FakeLlmServer::Enqueue(Behaviour behaviour) {
  absl::MutexLock lock(&mu_);
  script_.push_back(std::move(behaviour));
}

absl::Status FakeLlmServer::EnqueueJson(absl::string_view text) {
  absl::StatusOr<std::vector<Behaviour>> behaviours = ParseBehaviours(text);
  if (!behaviours.ok()) return behaviours.status();
  absl::MutexLock lock(&mu_);
  for (Behaviour& b : *behaviours) script_.push_back(std::move(b));
  return absl::OkStatus();
}

void FakeLlmServer::set_default_delay(absl::Duration delay) {
  absl::MutexLock lock(&mu_);
  settings_.default_delay = delay;
}

void FakeLlmServer::set_chunk_interval(absl::Duration interval) {
  absl::MutexLock lock(&mu_);
  settings_.chunk_interval = interval;
}

void FakeLlmServer::set_expected_key(std::string key) {
  absl::MutexLock lock(&mu_);
  settings_.expected_key = std::move(key);
}

void FakeLlmServer::set_json_answer(std::string text) {
  absl::MutexLock lock(&mu_);
  settings_.json_answer = std::move(text);
}

FakeLlmStats FakeLlmServer::stats() const {
  absl::MutexLock lock(&mu_);
  FakeLlmStats copy = stats_;
  copy.queued_behaviours = script_.size();
  copy.recent.assign(recent_.begin(), recent_.end());
  return copy;
}

void FakeLlmServer::Reset() {
  absl::MutexLock lock(&mu_);
  script_.clear();
  recent_.clear();
  settings_.json_answer.clear();
  const uint64_t in_flight = stats_.in_flight;
  stats_ = FakeLlmStats();
  stats_.in_flight = in_flight;
  stats_.peak_in_flight = in_flight;
}

namespace {
struct Threshold {
  const uint64_t* value;
  uint64_t wanted;
};
bool Reached(Threshold* t) { return *t->value >= t->wanted; }
}  // namespace

bool FakeLlmServer::WaitForInFlight(uint64_t n, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  Threshold t{&stats_.in_flight, n};
  return mu_.AwaitWithTimeout(absl::Condition(&Reached, &t), timeout);
}

bool FakeLlmServer::WaitForDisconnects(uint64_t n, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  Threshold t{&stats_.disconnects, n};
  return mu_.AwaitWithTimeout(absl::Condition(&Reached, &t), timeout);
}

bool FakeLlmServer::WaitForRequests(uint64_t n, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  Threshold t{&stats_.total_requests, n};
  return mu_.AwaitWithTimeout(absl::Condition(&Reached, &t), timeout);
}

void FakeLlmServer::OnRequest(evhttp_request* request, void* self) {
  auto* server = static_cast<FakeLlmServer*>(self);
  IncomingRequest incoming;
  const evhttp_uri* uri = evhttp_request_get_evhttp_uri(request);
  const char* raw_path = uri != nullptr ? evhttp_uri_get_path(uri) : nullptr;
  const char* raw_query = uri != nullptr ? evhttp_uri_get_query(uri) : nullptr;
  incoming.method = EvhttpMethodName(evhttp_request_get_command(request));
  incoming.path = raw_path != nullptr && *raw_path != '\0' ? raw_path : "/";
  incoming.query = raw_query != nullptr ? raw_query : "";
  evbuffer* input = evhttp_request_get_input_buffer(request);
  incoming.body.resize(evbuffer_get_length(input));
  evbuffer_copyout(input, incoming.body.data(), incoming.body.size());
  const evkeyvalq* headers = evhttp_request_get_input_headers(request);
  for (const evkeyval* kv = headers->tqh_first; kv != nullptr; kv = kv->next.tqe_next) {
    incoming.headers.emplace_back(kv->key, kv->value);
  }
  server->Dispatch(std::move(incoming), std::make_unique<EvhttpResponder>(request, server->base_));
}

void FakeLlmServer::Dispatch(IncomingRequest request, std::unique_ptr<Responder> responder) {
  const std::string& path = request.path;
  if (options_.control_pages && absl::StartsWith(path, "/_fake/")) {
    ServeControl(request, *responder);
    return;
  }

  RecordedRequest record;
  record.method = request.method;
  record.path = path;
  record.body = request.body;
  for (const auto& [key, raw_value] : request.headers) {
    std::string name = absl::AsciiStrToLower(key);
    std::string value = IsCredentialHeader(name) ? std::string(kRedacted) : raw_value;
    record.headers.emplace_back(std::move(name), std::move(value));
  }

  constexpr absl::string_view kGeminiPrefix = "/v1beta/models/";
  if (path == "/v1/chat/completions") {
    ServeProvider(request, std::move(responder), Provider::kOpenAi, "", false, false,
                  std::move(record));
  } else if (path == "/v1/audio/speech") {
    ServeProvider(request, std::move(responder), Provider::kOpenAiSpeech, "", false, false,
                  std::move(record));
  } else if (path == "/v1/messages") {
    ServeProvider(request, std::move(responder), Provider::kAnthropic, "", false, false,
                  std::move(record));
  } else if (absl::StartsWith(path, kGeminiPrefix) && path.find(':') != std::string::npos) {
    const size_t colon = path.rfind(':');
    const std::string model = path.substr(kGeminiPrefix.size(), colon - kGeminiPrefix.size());
    const std::string method = path.substr(colon + 1);
    if (!model.empty() && (method == "generateContent" || method == "streamGenerateContent")) {
      const bool stream = method == "streamGenerateContent";
      ServeProvider(request, std::move(responder), Provider::kGemini, model, stream,
                    stream && QueryParam(request.query, "alt") == "sse", std::move(record));
      return;
    }
    record.provider = "other";
    Record(std::move(record));
    responder->SendWhole(404, "application/json", {},
                         ErrorBody(Provider::kGemini, 404, "", "unknown model method", ""));
  } else {
    record.provider = "other";
    Record(std::move(record));
    SendJson(*responder, 404, {{"error", absl::StrCat("no fake endpoint at ", path)}});
  }
}

void FakeLlmServer::Record(RecordedRequest record) {
  absl::MutexLock lock(&mu_);
  ++stats_.total_requests;
  if (record.provider == "openai") ++stats_.openai_requests;
  if (record.provider == "gemini") ++stats_.gemini_requests;
  if (record.provider == "anthropic") ++stats_.anthropic_requests;
  if (record.provider == "openai_tts") ++stats_.tts_requests;
  recent_.push_back(std::move(record));
  while (recent_.size() > kRecordedRequests) recent_.pop_front();
}

void FakeLlmServer::ServeControl(const IncomingRequest& request, Responder& responder) {
  const std::string& path = request.path;
  const std::string& method = request.method;
  const std::string& body = request.body;
  if (path == "/_fake/stats" && method == "GET") {
    FakeLlmStats copy = stats();
    if (QueryParam(request.query, "recent") == "0") copy.recent.clear();
    responder.SendWhole(200, "application/json", {}, StatsToJson(copy));
  } else if (path == "/_fake/script" && method == "POST") {
    absl::StatusOr<std::vector<Behaviour>> behaviours = ParseBehaviours(body);
    if (!behaviours.ok()) {
      SendJson(responder, 400, {{"error", std::string(behaviours.status().message())}});
      return;
    }
    size_t queued;
    {
      absl::MutexLock lock(&mu_);
      for (Behaviour& b : *behaviours) script_.push_back(std::move(b));
      queued = script_.size();
    }
    SendJson(responder, 200, {{"queued", queued}});
  } else if (path == "/_fake/reset" && method == "POST") {
    Reset();
    SendJson(responder, 200, {{"reset", true}});
  } else if (path == "/_fake/config" && method == "POST") {
    const json config = json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (!config.is_object()) {
      SendJson(responder, 400, {{"error", "config: expected a JSON object"}});
      return;
    }
    Settings updated;
    {
      absl::MutexLock lock(&mu_);
      updated = settings_;
    }
    for (const auto& [key, value] : config.items()) {
      const bool is_duration = key == "default_delay_ms" || key == "chunk_interval_ms";
      const bool is_text = key == "expected_key" || key == "json_answer";
      if (is_duration && value.is_number() && value.get<double>() >= 0) {
        (key == "default_delay_ms" ? updated.default_delay : updated.chunk_interval) =
            absl::Milliseconds(value.get<double>());
      } else if (is_text && value.is_string()) {
        (key == "expected_key" ? updated.expected_key : updated.json_answer) =
            value.get<std::string>();
      } else {
        SendJson(responder, 400,
                 {{"error", absl::StrCat("config: unknown key or bad value for '", key, "'")}});
        return;
      }
    }
    {
      absl::MutexLock lock(&mu_);
      settings_ = updated;
    }
    SendJson(responder, 200, {{"configured", true}});
  } else {
    SendJson(responder, 404,
             {{"error",
               "control pages: GET /_fake/stats, POST /_fake/script, POST /_fake/reset, "
               "POST /_fake/config"}});
  }
}

void FakeLlmServer::ServeProvider(const IncomingRequest& request,
                                  std::unique_ptr<Responder> responder, Provider provider,
                                  const std::string& model, bool gemini_stream, bool sse,
                                  RecordedRequest record) {
  record.provider = std::string(ProviderName(provider));
  record.stream = gemini_stream;

  Settings settings;
  {
    absl::MutexLock lock(&mu_);
    settings = settings_;
    ++stats_.in_flight;
    stats_.peak_in_flight = std::max(stats_.peak_in_flight, stats_.in_flight);
  }

  auto exchange = std::make_unique<Exchange>();
  exchange->server = this;
  exchange->responder = std::move(responder);
  exchange->chunk_interval = settings.chunk_interval;
  auto reject = [&](int status, absl::string_view message) {
    exchange->status = status;
    exchange->body = ErrorBody(provider, status, "", message, "");
    Record(std::move(record));
    Begin(std::move(exchange), absl::ZeroDuration());
  };

  if (request.method != "POST") {
    reject(405, "use POST");
    return;
  }
  if (!settings.expected_key.empty()) {
    std::string key;
    switch (provider) {
      case Provider::kOpenAi:
      case Provider::kOpenAiSpeech: {
        // The bearer token; with another scheme (a proxy's Basic credentials), the whole value.
        const std::string authorization = request.Header("authorization");
        key = absl::StartsWith(authorization, "Bearer ") ? authorization.substr(7) : authorization;
        break;
      }
      case Provider::kGemini: {
        key = request.Header("x-goog-api-key");
        if (key.empty()) key = QueryParam(request.query, "key");
        break;
      }
      case Provider::kAnthropic:
        key = request.Header("x-api-key");
        break;
    }
    if (key != settings.expected_key) {
      if (provider == Provider::kGemini) {
        reject(400, "API key not valid. Please pass a valid API key.");
      } else {
        reject(401, "");
      }
      return;
    }
  }
  if (provider == Provider::kAnthropic) {
    if (request.Header("anthropic-version").empty()) {
      reject(400, "anthropic-version: header is required");
      return;
    }
    if (request.Header("x-api-key").empty()) {
      reject(400, "x-api-key: header is required");
      return;
    }
  }
  absl::StatusOr<ProviderRequest> parsed = ProviderRequest{};
  absl::optional<SpeechRequest> speech;
  if (provider == Provider::kOpenAiSpeech) {
    absl::StatusOr<SpeechRequest> speech_request = ParseSpeechRequest(record.body);
    if (!speech_request.ok()) {
      reject(400, speech_request.status().message());
      return;
    }
    speech = *std::move(speech_request);
    parsed->provider = provider;
  } else {
    parsed = ParseProviderRequest(provider, model, record.body);
    if (!parsed.ok()) {
      reject(400, parsed.status().message());
      return;
    }
  }
  if (provider == Provider::kGemini) {
    parsed->stream = gemini_stream;
  } else {
    record.stream = parsed->stream;
    sse = parsed->stream;
  }
  Record(std::move(record));

  Behaviour behaviour;
  {
    absl::MutexLock lock(&mu_);
    if (!script_.empty()) {
      behaviour = std::move(script_.front());
      script_.pop_front();
    }
  }
  std::string retry_after;
  for (auto& [name, value] : behaviour.headers) {
    if (provider == Provider::kGemini && absl::AsciiStrToLower(name) == "retry-after") {
      retry_after = value;
    } else {
      exchange->headers.emplace_back(name, value);
    }
  }
  const absl::Duration delay = behaviour.delay.value_or(settings.default_delay);
  exchange->hang = behaviour.hang;

  if (behaviour.status != 0) {
    exchange->status = behaviour.status;
    exchange->body = behaviour.body.has_value()
                         ? *behaviour.body
                         : ErrorBody(provider, behaviour.status, behaviour.kind, "", retry_after);
  } else if (speech.has_value()) {
    if (behaviour.invalid_json) {
      // Half a sample too many: no PCM reader can take it.
      exchange->content_type = "audio/pcm";
      exchange->body = std::string(kOddPcmBytes, '\x01');
    } else {
      exchange->body = SpeechBody(*speech, &exchange->content_type);
    }
  } else if (behaviour.invalid_json) {
    if (sse) {
      exchange->streaming = true;
      exchange->events.push_back(InvalidJsonEvent(provider));
    } else {
      exchange->body = "not json {";
    }
  } else {
    const Completion completion = MakeCompletion(*parsed, settings.json_answer);
    AnswerIds ids;
    ids.id = provider == Provider::kAnthropic ? absl::StrCat("msg_fake", ++next_id_)
                                              : absl::StrCat("chatcmpl-fake-", ++next_id_);
    ids.created = absl::ToUnixSeconds(absl::Now());
    if (sse) {
      exchange->streaming = true;
      std::vector<StreamEvent> events = StreamEvents(*parsed, completion, ids);
      if (behaviour.stream_fail_after >= 0) {
        exchange->cut_no_error = behaviour.stream_fail_no_error;
        // Cut before the (n+1)th text event; with fewer pieces, after the last one.
        size_t seen = 0;
        size_t after_last_text = 0;
        for (size_t i = 0; i < events.size(); ++i) {
          if (!events[i].carries_text) continue;
          if (seen == static_cast<size_t>(behaviour.stream_fail_after)) {
            exchange->cut_after = i;
            break;
          }
          ++seen;
          after_last_text = i + 1;
        }
        if (exchange->cut_after > events.size()) {
          exchange->cut_after = after_last_text > 0 ? after_last_text : events.size() - 1;
        }
      }
      for (StreamEvent& e : events) exchange->events.push_back(std::move(e.bytes));
    } else if (parsed->stream) {
      exchange->body = GeminiChunkArray(*parsed, completion);
    } else {
      exchange->body = CompletionBody(*parsed, completion, ids);
    }
  }
  if (exchange->streaming) {
    exchange->content_type = "text/event-stream";
    exchange->headers.emplace_back("Cache-Control", "no-cache");
  }
  Begin(std::move(exchange), delay);
}

void FakeLlmServer::Begin(std::unique_ptr<Exchange> owned, absl::Duration delay) {
  Exchange* exchange = owned.get();
  exchange->id = ++next_exchange_;
  exchanges_.emplace(exchange->id, std::move(owned));
  exchange->responder->WatchDeparture([this, id = exchange->id] { ClientWentAway(id); });
  exchange->timer = evtimer_new(base_, &FakeLlmServer::OnTimer, exchange);
  if (!exchange->hang) ArmTimer(exchange, delay);
}

void FakeLlmServer::ArmTimer(Exchange* exchange, absl::Duration after) {
  const timeval tv = absl::ToTimeval(std::max(after, absl::ZeroDuration()));
  evtimer_add(exchange->timer, &tv);
}

void FakeLlmServer::OnTimer(int, short, void* arg) {
  auto* exchange = static_cast<Exchange*>(arg);
  exchange->server->Advance(exchange);
}

void FakeLlmServer::Advance(Exchange* exchange) {
  if (!exchange->streaming) {
    const int status = exchange->status;
    const std::string content_type = std::move(exchange->content_type);
    const std::string body = std::move(exchange->body);
    const HeaderList headers = std::move(exchange->headers);
    // Retire first: sending may free the transport's request.
    Retire(exchange, Outcome::kCompleted)->SendWhole(status, content_type, headers, body);
    return;
  }
  Responder& responder = *exchange->responder;
  if (!exchange->started) {
    responder.StartStream(exchange->status, exchange->content_type, exchange->headers);
    exchange->started = true;
  }
  if (exchange->next_event == exchange->cut_after) {
    // Cut only once what was sent has left, so the client sees exactly the pieces promised.
    if (!responder.ReadyToCut()) {
      ArmTimer(exchange, absl::Milliseconds(1));
      return;
    }
    const bool no_error = exchange->cut_no_error;
    Retire(exchange, Outcome::kCompleted)->Cut(no_error);
    return;
  }
  responder.SendChunk(exchange->events[exchange->next_event++]);
  if (exchange->next_event < exchange->events.size() ||
      exchange->next_event == exchange->cut_after) {
    ArmTimer(exchange, exchange->chunk_interval);
    return;
  }
  Retire(exchange, Outcome::kCompleted)->EndStream();
}

void FakeLlmServer::ClientWentAway(uint64_t id) {
  auto it = exchanges_.find(id);
  if (it == exchanges_.end()) return;
  Retire(it->second.get(), stopping_ ? Outcome::kDropped : Outcome::kDisconnected);
}

std::unique_ptr<Responder> FakeLlmServer::Retire(Exchange* exchange, Outcome outcome) {
  if (exchange->timer != nullptr) event_free(exchange->timer);
  std::unique_ptr<Responder> responder = std::move(exchange->responder);
  responder->WatchDeparture(nullptr);
  {
    absl::MutexLock lock(&mu_);
    if (stats_.in_flight > 0) --stats_.in_flight;
    if (outcome == Outcome::kCompleted) ++stats_.completed;
    if (outcome == Outcome::kDisconnected) ++stats_.disconnects;
  }
  exchanges_.erase(exchange->id);
  return responder;
}

}  // namespace montage::testing
