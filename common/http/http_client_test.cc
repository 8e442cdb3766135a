#include "common/http/http_client.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/http/stream_parsers.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/metrics_test_util.h"
#include "common/telemetry/tracer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/unused_port.h"

extern char** environ;

namespace montage::http {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr absl::Duration kWait = absl::Seconds(10);

// ---------------------------------------------------------------------------------------------
// A scripted HTTP/1.1 server on libevent's evhttp, bound to 127.0.0.1:0, on its own thread.
// Paths:
//   /ok             200 "hello" with X-Test: yes
//   /echo           200 echoing the body; X-Echo-Method, X-Echo-Foo (request's X-Foo) and
//                   X-Echo-Traceparent headers report what arrived
//   /delay          answers after 5 s; notices a client that goes away first
//   /sse            a chunked event stream cut at awkward places, one chunk per millisecond
//   /big-stream     200 chunks of 1000 bytes ("<index % 10>" repeated)
//   /flaky          500, 500, then 200
//   /retry-after    429 with Retry-After: 0, then 200
//   /quota          429 insufficient_quota
//   /bad            400
//   /retry-later    503 with Retry-After: 20
//   /unavailable    503 "overloaded"
//   /huge           200 with 1 MiB
class TestServer {
 public:
  static constexpr int kBigStreamChunks = 200;
  static constexpr size_t kBigStreamChunkSize = 1000;

  TestServer() {
    static const bool threads = [] { return evthread_use_pthreads() == 0; }();
    (void)threads;
    base_ = event_base_new();
    http_ = evhttp_new(base_);
    evhttp_set_allowed_methods(http_, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_PUT);
    evhttp_set_gencb(http_, &TestServer::OnRequest, this);
    evhttp_bound_socket* bound = evhttp_bind_socket_with_handle(http_, "127.0.0.1", 0);
    sockaddr_in address{};
    socklen_t length = sizeof(address);
    getsockname(evhttp_bound_socket_get_fd(bound), reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
    stop_ = event_new(base_, -1, 0, &TestServer::OnStop, this);
    thread_ = std::thread([this] { event_base_loop(base_, EVLOOP_NO_EXIT_ON_EMPTY); });
  }

  ~TestServer() {
    event_active(stop_, EV_READ, 0);
    thread_.join();
    evhttp_free(http_);
    for (auto& deferred : deferred_) {
      if (deferred->timer != nullptr) event_free(deferred->timer);
    }
    event_free(stop_);
    event_base_free(base_);
  }

  int port() const { return port_; }
  std::string Url(absl::string_view path) const {
    return absl::StrCat("http://127.0.0.1:", port_, path);
  }

  int Hits(const std::string& path) {
    absl::MutexLock lock(&mu_);
    return hits_[path];
  }
  bool WaitForHits(const std::string& path, int n) {
    absl::MutexLock lock(&mu_);
    auto reached = [&] { return hits_[path] >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kWait);
  }
  // Clients that went away before their answer was sent.
  bool WaitForClosedBeforeAnswer(int n) {
    absl::MutexLock lock(&mu_);
    auto reached = [&] { return closed_before_answer_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kWait);
  }

 private:
  // A request answered later by a timer: after a delay, or chunk by chunk.
  struct Deferred {
    TestServer* server = nullptr;
    evhttp_request* request = nullptr;
    event* timer = nullptr;
    bool chunked = false;
    std::vector<std::string> chunks;
    size_t next_chunk = 0;
    absl::Duration interval;
    bool closed = false;
    bool done = false;
    std::string body = "late";  // a deferred answer's body (not chunked)
  };

  static void OnStop(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<TestServer*>(arg);
    // Answer what is still pending so that libevent frees the requests.
    for (auto& deferred : self->deferred_) {
      if (deferred->done) continue;
      evtimer_del(deferred->timer);
      Complete(*deferred, /*finish_now=*/true);
    }
    event_base_loopbreak(self->base_);
  }

  static void OnClose(evhttp_connection*, void* arg) {
    auto* deferred = static_cast<Deferred*>(arg);
    if (deferred->done || deferred->closed) return;
    deferred->closed = true;
    absl::MutexLock lock(&deferred->server->mu_);
    ++deferred->server->closed_before_answer_;
  }

  static void OnTimer(evutil_socket_t, short, void* arg) {
    Complete(*static_cast<Deferred*>(arg), /*finish_now=*/false);
  }

  // Sends the next piece of a deferred answer (all of it when `finish_now`).
  static void Complete(Deferred& deferred, bool finish_now) {
    evhttp_connection* connection = evhttp_request_get_connection(deferred.request);
    if (deferred.closed || connection == nullptr) {
      // libevent detached the request when the client left; these calls free it.
      deferred.done = true;
      if (deferred.chunked) {
        evhttp_send_reply_end(deferred.request);
      } else {
        evhttp_send_reply(deferred.request, 200, "OK", nullptr);
      }
      return;
    }
    if (!deferred.chunked) {
      deferred.done = true;
      evhttp_connection_set_closecb(connection, nullptr, nullptr);
      SendReply(deferred.request, 200, deferred.body);
      return;
    }
    while (deferred.next_chunk < deferred.chunks.size()) {
      const std::string& chunk = deferred.chunks[deferred.next_chunk++];
      evbuffer* buffer = evbuffer_new();
      evbuffer_add(buffer, chunk.data(), chunk.size());
      evhttp_send_reply_chunk(deferred.request, buffer);
      evbuffer_free(buffer);
      if (!finish_now) break;
    }
    if (deferred.next_chunk < deferred.chunks.size()) {
      timeval tv = absl::ToTimeval(deferred.interval);
      evtimer_add(deferred.timer, &tv);
      return;
    }
    deferred.done = true;
    evhttp_connection_set_closecb(connection, nullptr, nullptr);
    evhttp_send_reply_end(deferred.request);
  }

  Deferred& Defer(evhttp_request* request, absl::Duration delay) {
    auto deferred = std::make_unique<Deferred>();
    deferred->server = this;
    deferred->request = request;
    deferred->timer = evtimer_new(base_, &TestServer::OnTimer, deferred.get());
    deferred->interval = delay;
    evhttp_connection* connection = evhttp_request_get_connection(request);
    evhttp_connection_set_closecb(connection, &TestServer::OnClose, deferred.get());
    // evhttp stops reading while a request is being answered, so it would notice a client that
    // leaves only when it writes. Reading on lets it see the EOF at once (our client sends
    // nothing more on the connection meanwhile).
    bufferevent_enable(evhttp_connection_get_bufferevent(connection), EV_READ);
    timeval tv = absl::ToTimeval(delay);
    evtimer_add(deferred->timer, &tv);
    deferred_.push_back(std::move(deferred));
    return *deferred_.back();
  }

  void StreamChunks(evhttp_request* request, std::vector<std::string> chunks) {
    evhttp_add_header(evhttp_request_get_output_headers(request), "Content-Type",
                      "text/event-stream");
    evhttp_send_reply_start(request, 200, "OK");
    Deferred& deferred = Defer(request, absl::Milliseconds(1));
    deferred.chunked = true;
    deferred.chunks = std::move(chunks);
  }

  static void SendReply(evhttp_request* request, int code, absl::string_view body,
                        const std::vector<std::pair<std::string, std::string>>& headers = {}) {
    evkeyvalq* out = evhttp_request_get_output_headers(request);
    for (const auto& [name, value] : headers) evhttp_add_header(out, name.c_str(), value.c_str());
    evbuffer* buffer = evbuffer_new();
    evbuffer_add(buffer, body.data(), body.size());
    evhttp_send_reply(request, code, nullptr, buffer);
    evbuffer_free(buffer);
  }

  static void OnRequest(evhttp_request* request, void* arg) {
    static_cast<TestServer*>(arg)->Dispatch(request);
  }

  void Dispatch(evhttp_request* request) {
    const evhttp_uri* uri = evhttp_request_get_evhttp_uri(request);
    const char* raw_path = uri != nullptr ? evhttp_uri_get_path(uri) : nullptr;
    const std::string path = raw_path != nullptr ? raw_path : "";
    int hit;
    {
      absl::MutexLock lock(&mu_);
      hit = ++hits_[path];
    }
    if (path == "/ok") {
      SendReply(request, 200, "hello", {{"X-Test", "yes"}});
    } else if (path == "/echo") {
      evkeyvalq* in = evhttp_request_get_input_headers(request);
      evbuffer* body = evhttp_request_get_input_buffer(request);
      std::string text(evbuffer_get_length(body), '\0');
      evbuffer_copyout(body, text.data(), text.size());
      const char* foo = evhttp_find_header(in, "X-Foo");
      const char* traceparent = evhttp_find_header(in, "traceparent");
      const evhttp_cmd_type command = evhttp_request_get_command(request);
      SendReply(request, 200, text,
                {{"X-Echo-Method", command == EVHTTP_REQ_POST  ? "POST"
                                   : command == EVHTTP_REQ_PUT ? "PUT"
                                                               : "GET"},
                 {"X-Echo-Foo", foo != nullptr ? foo : ""},
                 {"X-Echo-Traceparent", traceparent != nullptr ? traceparent : ""}});
    } else if (path == "/delay") {
      Defer(request, absl::Seconds(5));
    } else if (path == "/peer-slow") {
      // The client's port, a moment later: which connection carried the request.
      char* address = nullptr;
      ev_uint16_t port = 0;
      evhttp_connection_get_peer(evhttp_request_get_connection(request), &address, &port);
      Defer(request, absl::Milliseconds(100)).body = absl::StrCat(port);
    } else if (path == "/sse") {
      StreamChunks(request, {"data: hel", "lo\n\nevent: delta\ndata: wor", "ld\r\n\r\n: keep",
                             "-alive\n\n", "data: a\ndata: b\n\n"});
    } else if (path == "/big-stream") {
      std::vector<std::string> chunks;
      for (int i = 0; i < kBigStreamChunks; ++i) {
        chunks.emplace_back(kBigStreamChunkSize, static_cast<char>('0' + i % 10));
      }
      StreamChunks(request, std::move(chunks));
    } else if (path == "/flaky") {
      if (hit <= 2) {
        SendReply(request, 500, "try again");
      } else {
        SendReply(request, 200, "finally");
      }
    } else if (path == "/retry-after") {
      if (hit == 1) {
        SendReply(request, 429, "slow down", {{"Retry-After", "0"}});
      } else {
        SendReply(request, 200, "ok now");
      }
    } else if (path == "/quota") {
      SendReply(
          request, 429,
          R"({"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}})");
    } else if (path == "/bad") {
      SendReply(request, 400, "bad request");
    } else if (path == "/retry-later") {
      SendReply(request, 503, "later", {{"Retry-After", "20"}});
    } else if (path == "/unavailable") {
      SendReply(request, 503, "overloaded");
    } else if (path == "/huge") {
      SendReply(request, 200, std::string(size_t{1} << 20, 'x'));
    } else {
      SendReply(request, 404, "not found");
    }
  }

  event_base* base_ = nullptr;
  evhttp* http_ = nullptr;
  event* stop_ = nullptr;
  int port_ = 0;
  std::thread thread_;
  std::vector<std::unique_ptr<Deferred>> deferred_;  // server thread only

  absl::Mutex mu_;
  std::map<std::string, int> hits_ ABSL_GUARDED_BY(mu_);
  int closed_before_answer_ ABSL_GUARDED_BY(mu_) = 0;
};

// Collects one call's result.
struct Result {
  absl::Notification done;
  absl::StatusOr<HttpResponse> response = absl::UnknownError("not done");

  DoneCallback Callback() {
    return [this](absl::StatusOr<HttpResponse> result) {
      response = std::move(result);
      done.Notify();
    };
  }
};

std::optional<double> Metric(absl::string_view name,
                             const std::map<std::string, std::string>& labels) {
  return telemetry::testing::SampleValue(telemetry::RenderPrometheusText(), name, labels);
}

class HttpClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    name_ = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    client_ = MakeClient();
  }

  std::unique_ptr<HttpClient> MakeClient(HttpClientOptions options = {}) {
    options.name = name_;
    absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(std::move(options));
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  HttpRequest Get(absl::string_view path) {
    HttpRequest request;
    request.url = server_.Url(path);
    return request;
  }

  // Callbacks write into the test's locals. When a test gives up waiting, the client goes first
  // (running every callback, CANCELLED) so that none writes into a local that is gone.
  bool OrStop(bool ok) {
    if (!ok) client_.reset();
    return ok;
  }
  bool Wait(absl::Notification& done, absl::Duration timeout = kWait) {
    return OrStop(done.WaitForNotificationWithTimeout(timeout));
  }

  absl::StatusOr<HttpResponse> Send(HttpRequest request) {
    Result result;
    client_->Send(std::move(request), result.Callback());
    if (!Wait(result.done)) return absl::DeadlineExceededError("test gave up waiting");
    return std::move(result.response);
  }

  std::optional<double> ClientMetric(absl::string_view name,
                                     std::map<std::string, std::string> labels = {}) {
    labels["client"] = name_;
    return Metric(name, labels);
  }

  std::string name_;
  TestServer server_;
  std::unique_ptr<HttpClient> client_;
};

TEST_F(HttpClientTest, SendGets200) {
  absl::StatusOr<HttpResponse> response = Send(Get("/ok"));
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->body, "hello");
  EXPECT_EQ(FindHeader(response->headers, "x-test"), "yes");
  EXPECT_EQ(response->attempts, 1u);
  EXPECT_EQ(response->http_version, 1);
  EXPECT_EQ(client_->in_flight(), 0u);
}

// libcurl takes HttpClientOptions::resolve as CURLOPT_RESOLVE: the pinned name is not looked up
// (".test" names do not resolve) and its addresses are tried in order (nothing listens on
// 127.0.0.2, where the test server is not bound).
TEST_F(HttpClientTest, PinnedNamesConnectToTheirAddresses) {
  HttpClientOptions options;
  options.resolve = {absl::StrCat("provider.test:", server_.port(), ":127.0.0.2,127.0.0.1")};
  client_ = MakeClient(options);
  ASSERT_NE(client_, nullptr);
  HttpRequest request;
  request.url = absl::StrCat("http://provider.test:", server_.port(), "/ok");
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->body, "hello");
}

TEST_F(HttpClientTest, PostBodyAndHeadersArrive) {
  HttpRequest request = Get("/echo");
  request.method = "POST";
  request.body = std::string(100000, 'b') + "end";  // large enough for Expect: 100-continue
  request.headers = {{"X-Foo", "bar"}, {"Content-Type", "application/octet-stream"}};
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->body, request.body);
  EXPECT_EQ(FindHeader(response->headers, "X-Echo-Method"), "POST");
  EXPECT_EQ(FindHeader(response->headers, "X-Echo-Foo"), "bar");

  request.method = "PUT";
  request.body = "put body";
  response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->body, "put body");
  EXPECT_EQ(FindHeader(response->headers, "X-Echo-Method"), "PUT");
}

TEST_F(HttpClientTest, InterimAnswerHeadersAreDropped) {
  HttpRequest request = Get("/echo");
  request.method = "POST";
  request.body = "with continue";
  // The server answers "100 Continue" first; only the final answer's headers count.
  request.headers = {{"Expect", "100-continue"}};
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->body, "with continue");
  EXPECT_EQ(FindHeader(response->headers, "X-Echo-Method"), "POST");
  for (const auto& [name, value] : response->headers) {
    EXPECT_THAT(name, Not(StartsWith("HTTP/")));
  }
}

TEST_F(HttpClientTest, RetriesServerErrors) {
  HttpRequest request = Get("/flaky");
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->body, "finally");
  EXPECT_EQ(response->attempts, 3u);
  EXPECT_EQ(server_.Hits("/flaky"), 3);
  EXPECT_EQ(ClientMetric("montage_http_client_retries_total", {{"peer", "127.0.0.1"}}), 2);
}

TEST_F(HttpClientTest, ReturnsLastAnswerWhenAttemptsRunOut) {
  HttpRequest request = Get("/unavailable");
  request.retry.max_attempts = 2;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 503);
  EXPECT_EQ(response->body, "overloaded");
  EXPECT_EQ(response->attempts, 2u);
}

TEST_F(HttpClientTest, HonoursRetryAfter) {
  HttpRequest request = Get("/retry-after");
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Hours(1);  // only Retry-After: 0 lets this finish
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->attempts, 2u);
}

TEST_F(HttpClientTest, InsufficientQuotaIsNotRetried) {
  HttpRequest request = Get("/quota");
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 429);
  EXPECT_THAT(response->body, HasSubstr("insufficient_quota"));
  EXPECT_EQ(response->attempts, 1u);
  EXPECT_EQ(server_.Hits("/quota"), 1);
}

TEST_F(HttpClientTest, BadRequestIsNotRetried) {
  HttpRequest request = Get("/bad");
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 400);
  EXPECT_EQ(response->attempts, 1u);
  EXPECT_EQ(server_.Hits("/bad"), 1);
}

TEST_F(HttpClientTest, CustomClassifier) {
  HttpRequest request = Get("/bad");
  request.retry.max_attempts = 2;
  request.retry.initial_backoff = absl::Milliseconds(1);
  request.retry.retriable = [](const HttpResponse& response) { return response.status == 400; };
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->attempts, 2u);
}

TEST_F(HttpClientTest, ConnectionRefusedIsUnavailable) {
  HttpRequest request;
  request.url =
      absl::StrCat("http://127.0.0.1:", testing::UnusedLoopbackPort(), "/x?api_key=secret");
  request.headers = {{"Authorization", "Bearer sk-secret"}};
  absl::StatusOr<HttpResponse> response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kUnavailable) << response.status();
  EXPECT_THAT(response.status().message(), HasSubstr("/x"));
  EXPECT_THAT(response.status().message(), Not(HasSubstr("secret")));
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(HttpClientTest, TransportErrorsAreRetriedWhenAllowed) {
  HttpRequest request;
  request.url = absl::StrCat("http://127.0.0.1:", testing::UnusedLoopbackPort(), "/");
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::StatusOr<HttpResponse> response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(response.status().message(), HasSubstr("after 3 attempts"));
  EXPECT_EQ(ClientMetric("montage_http_client_retries_total", {{"peer", "127.0.0.1"}}), 2);

  request.retry.retry_transport_errors = false;
  response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(response.status().message(), Not(HasSubstr("attempts")));
  EXPECT_EQ(ClientMetric("montage_http_client_retries_total", {{"peer", "127.0.0.1"}}), 2);
  EXPECT_EQ(ClientMetric("montage_http_client_requests_total",
                         {{"peer", "127.0.0.1"}, {"code", "UNAVAILABLE"}}),
            2);
}

TEST_F(HttpClientTest, FirstByteTimeout) {
  HttpRequest request = Get("/delay");
  request.first_byte_timeout = absl::Milliseconds(50);
  absl::StatusOr<HttpResponse> response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded) << response.status();
  EXPECT_THAT(response.status().message(), HasSubstr("no response headers"));

  // An attempt timeout is a transport error: retried.
  request.retry.max_attempts = 2;
  request.retry.initial_backoff = absl::Milliseconds(1);
  response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(response.status().message(), HasSubstr("after 2 attempts"));
  EXPECT_EQ(server_.Hits("/delay"), 3);
}

TEST_F(HttpClientTest, AttemptTimeout) {
  HttpRequest request = Get("/delay");
  request.attempt_timeout = absl::Milliseconds(50);
  absl::StatusOr<HttpResponse> response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded) << response.status();
}

TEST_F(HttpClientTest, Deadline) {
  HttpRequest request = Get("/delay");
  request.deadline = absl::Now() + absl::Milliseconds(50);
  request.retry.max_attempts = 5;
  absl::StatusOr<HttpResponse> response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded) << response.status();
  EXPECT_THAT(response.status().message(), HasSubstr("deadline"));

  request.deadline = absl::Now() - absl::Seconds(1);
  response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(HttpClientTest, ServerDelayPastDeadlineOrMaximumIsNotWaitedFor) {
  HttpRequest request = Get("/retry-later");  // 503 with Retry-After: 20
  request.retry.max_attempts = 3;
  request.deadline = absl::Now() + absl::Seconds(5);
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 503);
  EXPECT_EQ(response->attempts, 1u);

  request.deadline = absl::InfiniteFuture();
  request.retry.max_server_delay = absl::Seconds(10);
  response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->attempts, 1u);
  EXPECT_EQ(server_.Hits("/retry-later"), 2);
}

TEST_F(HttpClientTest, ResponseSizeCap) {
  HttpRequest request = Get("/huge");
  request.max_response_bytes = 1000;
  absl::StatusOr<HttpResponse> response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kResourceExhausted) << response.status();

  request.max_response_bytes = size_t{1} << 20;
  response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->body.size(), size_t{1} << 20);
}

TEST_F(HttpClientTest, CancelAbortsUpstream) {
  Result result;
  std::shared_ptr<CallHandle> handle = client_->Send(Get("/delay"), result.Callback());
  ASSERT_TRUE(OrStop(server_.WaitForHits("/delay", 1)));
  handle->Cancel();
  handle->Cancel();  // idempotent
  ASSERT_TRUE(Wait(result.done));
  EXPECT_EQ(result.response.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(server_.WaitForClosedBeforeAnswer(1));
  EXPECT_EQ(client_->in_flight(), 0u);
  handle->Cancel();  // after completion: nothing happens
}

TEST_F(HttpClientTest, CancelBeforeStartAndDuringBackoff) {
  Result first;
  client_->Send(Get("/ok"), first.Callback())->Cancel();
  ASSERT_TRUE(Wait(first.done));
  // Either the cancel won or the answer did; both are fine, but exactly one callback ran.
  EXPECT_TRUE(first.response.ok() ||
              first.response.status().code() == absl::StatusCode::kCancelled);

  HttpRequest request = Get("/retry-later");  // waits 20 s before the retry
  request.retry.max_attempts = 2;
  Result second;
  std::shared_ptr<CallHandle> handle = client_->Send(request, second.Callback());
  ASSERT_TRUE(OrStop(server_.WaitForHits("/retry-later", 1)));
  handle->Cancel();
  ASSERT_TRUE(Wait(second.done));
  EXPECT_EQ(second.response.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(HttpClientTest, ManyConcurrentRequests) {
  constexpr int kCalls = 200;
  std::atomic<int> ok{0};
  std::atomic<int> finished{0};
  absl::Notification all_done;
  for (int i = 0; i < kCalls; ++i) {
    client_->Send(Get("/ok"), [&](absl::StatusOr<HttpResponse> response) {
      if (response.ok() && response->status == 200 && response->body == "hello") ++ok;
      if (++finished == kCalls) all_done.Notify();
    });
  }
  ASSERT_TRUE(Wait(all_done, absl::Seconds(30)));
  EXPECT_EQ(ok.load(), kCalls);
  EXPECT_EQ(client_->in_flight(), 0u);
  EXPECT_EQ(
      ClientMetric("montage_http_client_requests_total", {{"peer", "127.0.0.1"}, {"code", "200"}}),
      kCalls);
  EXPECT_EQ(ClientMetric("montage_http_client_in_flight", {{"peer", "127.0.0.1"}}), 0);
}

TEST_F(HttpClientTest, UnlimitedClientSpreadsOverShards) {
  // Without connection limits, hundreds of transfers at once run on several multi handles.
  HttpClientOptions options;
  options.max_connections_per_host = 0;
  client_ = MakeClient(options);
  // Few enough that the test server stays within a 1024 descriptor limit.
  constexpr int kCalls = 300;
  constexpr int kCancelled = 40;
  std::atomic<int> ok{0};
  std::atomic<int> cancelled{0};
  std::atomic<int> finished{0};
  absl::Notification all_done;
  std::vector<std::shared_ptr<CallHandle>> slow;
  auto count = [&](absl::StatusOr<HttpResponse> response) {
    if (response.ok() && response->status == 200 && response->body == "hello") ++ok;
    if (response.status().code() == absl::StatusCode::kCancelled) ++cancelled;
    if (++finished == kCalls + kCancelled) all_done.Notify();
  };
  for (int i = 0; i < kCancelled; ++i) slow.push_back(client_->Send(Get("/delay"), count));
  for (int i = 0; i < kCalls; ++i) client_->Send(Get("/ok"), count);
  ASSERT_TRUE(OrStop(server_.WaitForHits("/delay", kCancelled)));
  for (auto& handle : slow) handle->Cancel();
  ASSERT_TRUE(Wait(all_done, absl::Seconds(30)));
  EXPECT_EQ(ok.load(), kCalls);
  EXPECT_EQ(cancelled.load(), kCancelled);
  EXPECT_EQ(client_->in_flight(), 0u);
  EXPECT_TRUE(server_.WaitForClosedBeforeAnswer(kCancelled));
  // Idle connections are reused afterwards.
  absl::StatusOr<HttpResponse> response = Send(Get("/ok"));
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
}

TEST_F(HttpClientTest, PeerLabelNamesMetrics) {
  HttpRequest request = Get("/ok");
  request.peer_label = "openai";
  ASSERT_TRUE(Send(request).ok());
  EXPECT_EQ(
      ClientMetric("montage_http_client_requests_total", {{"peer", "openai"}, {"code", "200"}}), 1);
  EXPECT_EQ(
      ClientMetric("montage_http_client_request_duration_seconds_count", {{"peer", "openai"}}), 1);
}

struct StreamResult {
  absl::Notification done;
  absl::StatusOr<HttpResponse> response = absl::UnknownError("not done");
  std::atomic<int> headers_calls{0};
  int headers_status = 0;
  std::string data;
  std::atomic<int> data_calls{0};
};

StreamCallbacks Collect(StreamResult& result) {
  StreamCallbacks callbacks;
  callbacks.on_headers = [&result](int status, const Headers&) {
    ++result.headers_calls;
    result.headers_status = status;
  };
  callbacks.on_data = [&result](absl::string_view chunk) {
    ++result.data_calls;
    result.data.append(chunk.data(), chunk.size());
    return DataAction::kContinue;
  };
  callbacks.on_done = [&result](absl::StatusOr<HttpResponse> response) {
    result.response = std::move(response);
    result.done.Notify();
  };
  return callbacks;
}

TEST_F(HttpClientTest, StreamsServerSentEvents) {
  struct Seen {
    std::string event;
    std::string data;
    bool operator==(const Seen& other) const { return event == other.event && data == other.data; }
  };
  std::vector<Seen> events;
  absl::Status parse_status;
  auto parser = std::make_shared<SseParser>([&](const SseEvent& event) {
    events.push_back({event.event, event.data});
    return absl::OkStatus();
  });
  StreamResult result;
  StreamCallbacks callbacks = Collect(result);
  callbacks.on_data = [&, parser](absl::string_view chunk) {
    parse_status.Update(parser->Feed(chunk));
    return DataAction::kContinue;
  };
  auto done = std::move(callbacks.on_done);
  callbacks.on_done = [&, parser,
                       done = std::move(done)](absl::StatusOr<HttpResponse> response) mutable {
    parse_status.Update(parser->Finish());
    std::move(done)(std::move(response));
  };
  client_->Stream(Get("/sse"), std::move(callbacks));
  ASSERT_TRUE(Wait(result.done));
  ASSERT_TRUE(result.response.ok()) << result.response.status();
  EXPECT_EQ(result.response->status, 200);
  EXPECT_EQ(result.headers_calls.load(), 1);
  EXPECT_EQ(result.headers_status, 200);
  EXPECT_TRUE(parse_status.ok()) << parse_status;
  EXPECT_THAT(events, ElementsAre(Seen{"message", "hello"}, Seen{"delta", "world"},
                                  Seen{"message", "a\nb"}));
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(HttpClientTest, StreamErrorAnswerIsBuffered) {
  StreamResult result;
  HttpRequest request = Get("/unavailable");
  client_->Stream(request, Collect(result));
  ASSERT_TRUE(Wait(result.done));
  ASSERT_TRUE(result.response.ok()) << result.response.status();
  EXPECT_EQ(result.response->status, 503);
  EXPECT_EQ(result.response->body, "overloaded");
  EXPECT_EQ(result.headers_calls.load(), 0);
  EXPECT_EQ(result.data_calls.load(), 0);
}

TEST_F(HttpClientTest, StreamRetriesBeforeHeaders) {
  StreamResult result;
  HttpRequest request = Get("/flaky");
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Milliseconds(1);
  client_->Stream(request, Collect(result));
  ASSERT_TRUE(Wait(result.done));
  ASSERT_TRUE(result.response.ok()) << result.response.status();
  EXPECT_EQ(result.response->status, 200);
  EXPECT_EQ(result.response->attempts, 3u);
  EXPECT_EQ(result.headers_calls.load(), 1);
  EXPECT_EQ(result.data, "finally");
}

TEST_F(HttpClientTest, StreamSizeCap) {
  StreamResult result;
  HttpRequest request = Get("/big-stream");
  request.max_response_bytes = 5000;
  client_->Stream(request, Collect(result));
  ASSERT_TRUE(Wait(result.done));
  EXPECT_EQ(result.response.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_LE(result.data.size(), 5000u);
}

std::string BigStreamBody() {
  std::string body;
  for (int i = 0; i < TestServer::kBigStreamChunks; ++i) {
    body.append(TestServer::kBigStreamChunkSize, static_cast<char>('0' + i % 10));
  }
  return body;
}

TEST_F(HttpClientTest, PauseAndResume) {
  StreamResult result;
  StreamCallbacks callbacks = Collect(result);
  std::atomic<bool> paused{false};
  std::atomic<int> pauses{0};
  std::atomic<int> data_while_paused{0};
  absl::Mutex mu;
  int pause_requests = 0;  // guarded by mu
  callbacks.on_data = [&](absl::string_view chunk) {
    if (paused.load()) ++data_while_paused;
    result.data.append(chunk.data(), chunk.size());
    // Pause after every fifth chunk.
    if (++result.data_calls % 5 != 0) return DataAction::kContinue;
    paused = true;
    ++pauses;
    absl::MutexLock lock(&mu);
    ++pause_requests;
    return DataAction::kPause;
  };
  callbacks.on_done = [&](absl::StatusOr<HttpResponse> response) {
    absl::MutexLock lock(&mu);  // wakes the waiting loop below
    result.response = std::move(response);
    result.done.Notify();
  };
  std::shared_ptr<CallHandle> handle = client_->Stream(Get("/big-stream"), std::move(callbacks));
  // Resume whenever on_data paused, until the stream ends.
  int resumed = 0;
  bool stuck = false;
  while (true) {
    {
      absl::MutexLock lock(&mu);
      auto pending = [&] { return pause_requests > resumed || result.done.HasBeenNotified(); };
      if (!mu.AwaitWithTimeout(absl::Condition(&pending), kWait)) {
        stuck = true;
        break;
      }
      if (pause_requests == resumed) break;  // done
      resumed = pause_requests;
    }
    paused = false;
    handle->Resume();
  }
  ASSERT_TRUE(OrStop(!stuck));
  ASSERT_TRUE(Wait(result.done));
  ASSERT_TRUE(result.response.ok()) << result.response.status();
  EXPECT_GT(pauses.load(), 0);
  EXPECT_EQ(data_while_paused.load(), 0);
  EXPECT_EQ(result.data, BigStreamBody());  // every byte once, in order
}

TEST_F(HttpClientTest, CancelFromOnDataStopsDelivery) {
  StreamResult result;
  StreamCallbacks callbacks = Collect(result);
  absl::Notification handle_ready;
  std::shared_ptr<CallHandle> handle;
  callbacks.on_data = [&](absl::string_view) {
    handle_ready.WaitForNotification();
    ++result.data_calls;
    handle->Cancel();
    return DataAction::kContinue;
  };
  handle = client_->Stream(Get("/big-stream"), std::move(callbacks));
  handle_ready.Notify();
  ASSERT_TRUE(Wait(result.done));
  EXPECT_EQ(result.response.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(result.data_calls.load(), 1);
}

TEST_F(HttpClientTest, DestructionCancelsCallsInFlight) {
  constexpr int kCalls = 10;
  std::atomic<int> cancelled{0};
  std::atomic<int> finished{0};
  std::vector<std::shared_ptr<CallHandle>> handles;
  for (int i = 0; i < kCalls; ++i) {
    handles.push_back(client_->Send(Get("/delay"), [&](absl::StatusOr<HttpResponse> response) {
      if (response.status().code() == absl::StatusCode::kCancelled) ++cancelled;
      ++finished;
    }));
  }
  HttpRequest backing_off = Get("/retry-later");
  backing_off.retry.max_attempts = 2;
  handles.push_back(client_->Send(backing_off, [&](absl::StatusOr<HttpResponse> response) {
    if (response.status().code() == absl::StatusCode::kCancelled) ++cancelled;
    ++finished;
  }));
  ASSERT_TRUE(OrStop(server_.WaitForHits("/delay", kCalls)));
  ASSERT_TRUE(OrStop(server_.WaitForHits("/retry-later", 1)));
  client_.reset();
  EXPECT_EQ(finished.load(), kCalls + 1);
  EXPECT_EQ(cancelled.load(), kCalls + 1);
  // Handles outlive the client harmlessly.
  for (auto& handle : handles) {
    handle->Cancel();
    handle->Resume();
  }
}

TEST_F(HttpClientTest, CallbacksMayStartCalls) {
  Result second;
  Result first;
  HttpRequest next = Get("/ok");
  client_->Send(Get("/ok"), [&](absl::StatusOr<HttpResponse> response) {
    first.response = std::move(response);
    client_->Send(next, second.Callback());
    first.done.Notify();
  });
  ASSERT_TRUE(Wait(first.done));
  ASSERT_TRUE(Wait(second.done));
  EXPECT_TRUE(second.response.ok()) << second.response.status();
}

TEST_F(HttpClientTest, InvalidRequests) {
  HttpRequest request;
  request.url = "not a url";
  EXPECT_EQ(Send(request).status().code(), absl::StatusCode::kInvalidArgument);
  request.url = "ftp://127.0.0.1/file";
  EXPECT_EQ(Send(request).status().code(), absl::StatusCode::kInvalidArgument);
  request = Get("/ok");
  request.headers = {{"X-Evil", "a\r\nHost: elsewhere"}};
  EXPECT_EQ(Send(request).status().code(), absl::StatusCode::kInvalidArgument);
  request = Get("/ok");
  request.method = "GET /other";
  EXPECT_EQ(Send(request).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(HttpClientTest, PrivateAddressesCanBeRefused) {
  HttpClientOptions options;
  options.allow_private_addresses = false;
  client_ = MakeClient(options);
  absl::StatusOr<HttpResponse> response = Send(Get("/ok"));
  EXPECT_EQ(response.status().code(), absl::StatusCode::kPermissionDenied) << response.status();
  HttpRequest request;
  request.url = absl::StrCat("https://127.0.0.1:", testing::UnusedLoopbackPort(), "/");
  response = Send(request);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kPermissionDenied) << response.status();
  EXPECT_EQ(server_.Hits("/ok"), 0);
}

// Connections are kept alive and reused, at most max_connections_per_host at once to a host (the
// other transfers wait for one), and not reused once idle for idle_connection_timeout.
TEST_F(HttpClientTest, ConnectionsPerHostAreLimitedReusedAndExpire) {
  HttpClientOptions options;
  options.max_connections_per_host = 1;
  options.idle_connection_timeout = absl::Seconds(1);
  client_ = MakeClient(options);
  ASSERT_NE(client_, nullptr);
  std::vector<Result> results(3);
  for (Result& r : results) client_->Send(Get("/peer-slow"), r.Callback());
  std::set<std::string> ports;
  for (Result& r : results) {
    ASSERT_TRUE(Wait(r.done));
    ASSERT_TRUE(r.response.ok()) << r.response.status();
    ports.insert(r.response->body);
  }
  EXPECT_EQ(ports.size(), 1u) << "three calls at once took more than one connection";
  absl::StatusOr<HttpResponse> reused = Send(Get("/peer-slow"));
  ASSERT_TRUE(reused.ok()) << reused.status();
  EXPECT_EQ(reused->body, *ports.begin());
  // libcurl counts the idle age in whole seconds: past two, the connection is not taken again.
  absl::SleepFor(absl::Milliseconds(2200));
  absl::StatusOr<HttpResponse> fresh = Send(Get("/peer-slow"));
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_NE(fresh->body, *ports.begin());
}

TEST_F(HttpClientTest, TracesAttemptsAndPropagatesContext) {
  telemetry::Span parent = telemetry::GlobalTracer().StartSpan("test parent");
  ASSERT_TRUE(parent.context().IsValid());
  HttpRequest request = Get("/echo");
  request.url += "?secret=1";
  request.parent_span = parent.context();
  absl::StatusOr<HttpResponse> response = Send(request);
  ASSERT_TRUE(response.ok()) << response.status();
  const std::string trace_id = parent.context().TraceIdHex();
  EXPECT_THAT(std::string(FindHeader(response->headers, "X-Echo-Traceparent").value_or("")),
              StartsWith(absl::StrCat("00-", trace_id, "-")));
  if (!parent.context().sampled) return;
  bool found = false;
  for (const telemetry::SpanData& span : telemetry::GlobalTracer().RecentSpans(64)) {
    if (span.trace_id != parent.context().trace_id || span.kind != telemetry::SpanKind::kClient) {
      continue;
    }
    found = true;
    EXPECT_EQ(span.name, "HTTP GET");
    for (const auto& [key, value] : span.attributes) {
      if (key == "http.url") {
        EXPECT_EQ(std::get<std::string>(value), server_.Url("/echo"));
      } else if (key == "http.status_code") {
        EXPECT_EQ(std::get<int64_t>(value), 200);
      } else if (key == "attempt") {
        EXPECT_EQ(std::get<int64_t>(value), 1);
      }
    }
  }
  EXPECT_TRUE(found);
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 without TLS against nghttpd (Debian's nghttp2-server), when it is installed.

class Http2Test : public ::testing::Test {
 protected:
  static constexpr char kNghttpd[] = "/usr/sbin/nghttpd";

  void SetUp() override {
    if (access(kNghttpd, X_OK) != 0) GTEST_SKIP() << kNghttpd << " is not installed";
    char dir_template[] = "/tmp/http2_test_XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    std::ofstream(dir_ + "/hello.txt") << "hello over h2";
    port_ = testing::UnusedLoopbackPort();
    const std::string port = absl::StrCat(port_);
    std::vector<std::string> args = {kNghttpd, "--no-tls", "-d", dir_, port};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    const int rc = posix_spawn(&pid_, kNghttpd, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ASSERT_EQ(rc, 0) << "cannot start nghttpd";
  }

  void TearDown() override {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status = 0;
      waitpid(pid_, &status, 0);
    }
    if (!dir_.empty()) {
      unlink((dir_ + "/hello.txt").c_str());
      rmdir(dir_.c_str());
    }
  }

  std::string dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

TEST_F(Http2Test, PriorKnowledgeSpeaksHttp2) {
  // Before the client, so that a client destroyed early by a failed assertion finds them alive.
  constexpr int kConcurrent = 5;
  constexpr int kSequential = 3;
  Result concurrent[kConcurrent];
  Result sequential[kSequential];

  HttpClientOptions options;
  options.name = "h2c";
  absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  HttpRequest request;
  request.url = absl::StrCat("http://127.0.0.1:", port_, "/hello.txt");
  request.version = HttpVersion::kHttp2PriorKnowledge;
  // nghttpd may not listen yet: connection refused is retried until it does. The deadline
  // bounds every call, so the waits below cannot outlast it.
  request.retry.max_attempts = 200;
  request.retry.initial_backoff = absl::Milliseconds(10);
  request.retry.max_backoff = absl::Milliseconds(50);
  request.deadline = absl::Now() + kWait;

  auto check = [](Result& result) {
    ASSERT_TRUE(result.done.WaitForNotificationWithTimeout(2 * kWait));
    ASSERT_TRUE(result.response.ok()) << result.response.status();
    EXPECT_EQ(result.response->status, 200);
    EXPECT_EQ(result.response->body, "hello over h2");
    EXPECT_EQ(result.response->http_version, 2);
  };
  // Concurrent requests (multiplexed), then one after the other (a connection left idle must
  // not break the next request; see LibcurlBreaksIdleH2cReuse).
  for (Result& result : concurrent) (*client)->Send(request, result.Callback());
  for (Result& result : concurrent) check(result);
  request.retry.max_attempts = 1;
  for (Result& result : sequential) {
    (*client)->Send(request, result.Callback());
    check(result);
  }
}

}  // namespace
}  // namespace montage::http
