// HttpClient's h2c transport (internal/h2c_pool) against the fake LLM provider's h2c listener,
// which counts connections, requests in flight and clients that went away.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/http/http_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/fake_llm/fake_llm_server.h"
#include "tests/testing/eventually.h"
#include "tests/testing/unused_port.h"

namespace montage::http {
namespace {

using ::montage::testing::Eventually;
using ::testing::HasSubstr;

constexpr absl::Duration kWait = absl::Seconds(20);

struct Result {
  absl::Notification done;
  absl::StatusOr<HttpResponse> response = absl::UnknownError("not done");

  DoneCallback Callback() {
    return [this](absl::StatusOr<HttpResponse> r) {
      response = std::move(r);
      done.Notify();
    };
  }
};

// An SSE answer of the fake without what differs between two answers: the id (chatcmpl-fake-<n>)
// and the "created" time.
std::string WithoutIdAndTime(const std::string& sse) {
  std::string out;
  size_t i = 0;
  while (i < sse.size()) {
    const size_t id = sse.find("chatcmpl-fake-", i);
    const size_t created = sse.find("\"created\":", i);
    const size_t next = std::min(id, created);
    if (next == std::string::npos) break;
    const bool is_id = next == id;
    size_t end = next + (is_id ? std::strlen("chatcmpl-fake-") : std::strlen("\"created\":"));
    out.append(sse, i, end - i);
    while (end < sse.size() && absl::ascii_isdigit(static_cast<unsigned char>(sse[end]))) ++end;
    i = end;
  }
  out.append(sse, std::min(i, sse.size()), std::string::npos);
  return out;
}

class H2cTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::FakeLlmOptions options;
    options.h2c_port = 0;
    options.control_pages = false;
    absl::StatusOr<std::unique_ptr<testing::FakeLlmServer>> fake =
        testing::FakeLlmServer::Start(options);
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
  }

  std::unique_ptr<HttpClient> MakeClient(uint32_t max_concurrent_streams = 100) {
    HttpClientOptions options;
    options.name = "h2c_test";
    options.max_concurrent_streams = max_concurrent_streams;
    absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  HttpRequest Chat(bool stream = false, absl::string_view host = "127.0.0.1") const {
    HttpRequest request;
    request.method = "POST";
    request.url = absl::StrCat("http://", host, ":", fake_->h2c_port(), "/v1/chat/completions");
    request.version = HttpVersion::kHttp2PriorKnowledge;
    request.headers = {{"Content-Type", "application/json"}, {"Authorization", "Bearer k"}};
    request.body = absl::StrCat(
        R"({"model":"m","messages":[{"role":"user","content":"Tell me about espresso"}],)",
        R"("stream":)", stream ? "true" : "false", "}");
    request.deadline = absl::Now() + kWait;
    return request;
  }

  // Sends `request` and waits for its answer. A test that gives up destroys the client first, so
  // that its callback (CANCELLED) runs while the result still exists.
  static absl::StatusOr<HttpResponse> SendAndWait(std::unique_ptr<HttpClient>& client,
                                                  HttpRequest request) {
    if (client == nullptr)
      return absl::FailedPreconditionError("no client (an earlier wait gave up)");
    Result result;
    client->Send(std::move(request), result.Callback());
    if (!result.done.WaitForNotificationWithTimeout(kWait)) {
      client.reset();
      return absl::DeadlineExceededError("the test gave up waiting");
    }
    return std::move(result.response);
  }

  std::unique_ptr<testing::FakeLlmServer> fake_;
};

TEST_F(H2cTest, ConcurrentCallsShareConnectionsUpToTheStreamLimit) {
  testing::Behaviour slow;
  slow.delay = absl::Milliseconds(300);
  constexpr int kCalls = 50;
  for (int i = 0; i < kCalls; ++i) fake_->Enqueue(slow);
  std::vector<Result> results(kCalls);
  std::unique_ptr<HttpClient> client = MakeClient(/*max_concurrent_streams=*/10);
  ASSERT_NE(client, nullptr);
  for (Result& result : results) client->Send(Chat(), result.Callback());
  for (Result& result : results) {
    ASSERT_TRUE(result.done.WaitForNotificationWithTimeout(kWait));
    ASSERT_TRUE(result.response.ok()) << result.response.status();
    EXPECT_EQ(result.response->status, 200);
    EXPECT_EQ(result.response->http_version, 2);
    EXPECT_THAT(result.response->body, HasSubstr("chat.completion"));
  }
  // 50 calls at 10 streams each: five connections, every call sent before any answered.
  testing::FakeLlmStats stats = fake_->stats();
  EXPECT_EQ(stats.h2c_connections, 5u);
  EXPECT_EQ(stats.openai_requests, static_cast<uint64_t>(kCalls));

  // Idle connections are reused (libcurl 7.88 broke exactly this on h2c).
  std::vector<Result> again(12);
  for (Result& result : again) client->Send(Chat(), result.Callback());
  for (Result& result : again) {
    ASSERT_TRUE(result.done.WaitForNotificationWithTimeout(kWait));
    ASSERT_TRUE(result.response.ok()) << result.response.status();
    EXPECT_EQ(result.response->status, 200);
  }
  EXPECT_EQ(fake_->stats().h2c_connections, 5u);
}

TEST_F(H2cTest, CancelResetsOnlyItsStream) {
  testing::Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  Result hanging;
  std::shared_ptr<CallHandle> handle = client->Send(Chat(), hanging.Callback());
  ASSERT_TRUE(Eventually([&] { return fake_->stats().in_flight == 1; }));
  absl::StatusOr<HttpResponse> normal = SendAndWait(client, Chat());
  ASSERT_TRUE(normal.ok()) << normal.status();

  handle->Cancel();
  ASSERT_TRUE(hanging.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(hanging.response.status().code(), absl::StatusCode::kCancelled);
  // The server sees the stream reset; the connection stays (one for both calls).
  ASSERT_TRUE(Eventually([&] { return fake_->stats().disconnects == 1; }));
  EXPECT_EQ(fake_->stats().h2c_connections, 1u);
  absl::StatusOr<HttpResponse> after = SendAndWait(client, Chat());
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(fake_->stats().h2c_connections, 1u);
}

TEST_F(H2cTest, DeadlineResetsTheStream) {
  testing::Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  HttpRequest request = Chat();
  request.deadline = absl::Now() + absl::Milliseconds(200);
  absl::StatusOr<HttpResponse> result = SendAndWait(client, request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(Eventually([&] { return fake_->stats().disconnects == 1; }));
}

TEST_F(H2cTest, PausedStreamResumesWithEverything) {
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  // The whole stream, read without pausing, is what a paused reader must get too.
  auto read = [&](bool pause) -> std::string {
    struct State {
      std::string body;
      std::atomic<int> chunks{0};
      absl::Notification paused;
      absl::Notification done;
      absl::Status status;
    } state;
    StreamCallbacks callbacks;
    callbacks.on_headers = [](int, const Headers&) {};
    callbacks.on_data = [&state, pause](absl::string_view chunk) {
      state.body.append(chunk.data(), chunk.size());
      if (pause && state.chunks.fetch_add(1) == 0) {
        state.paused.Notify();
        return DataAction::kPause;
      }
      return DataAction::kContinue;
    };
    callbacks.on_done = [&state](absl::StatusOr<HttpResponse> r) {
      state.status = r.status();
      state.done.Notify();
    };
    std::shared_ptr<CallHandle> handle =
        client->Stream(Chat(/*stream=*/true), std::move(callbacks));
    if (pause) {
      EXPECT_TRUE(state.paused.WaitForNotificationWithTimeout(kWait));
      // While paused nothing more arrives, even once the server has sent everything.
      EXPECT_TRUE(Eventually([&] { return fake_->stats().in_flight == 0; }));
      EXPECT_EQ(state.chunks.load(), 1);
      EXPECT_FALSE(state.done.HasBeenNotified());
      handle->Resume();
    }
    EXPECT_TRUE(state.done.WaitForNotificationWithTimeout(kWait));
    EXPECT_TRUE(state.status.ok()) << state.status;
    return state.body;
  };
  const std::string whole = read(false);
  EXPECT_THAT(whole, HasSubstr("data: [DONE]"));
  EXPECT_EQ(WithoutIdAndTime(read(true)), WithoutIdAndTime(whole));
}

TEST_F(H2cTest, RequestWhoseWorkingConnectionDiesBeforeAnAnswerIsSentAgainOnce) {
  testing::Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  HttpRequest request = Chat();
  request.retry.max_attempts = 1;  // no retries: only the replay can try again
  Result result;
  client->Send(request, result.Callback());
  ASSERT_TRUE(Eventually([&] { return fake_->stats().in_flight == 1; }));
  fake_.reset();  // the connection closes with the request unanswered; the port closes too
  ASSERT_TRUE(result.done.WaitForNotificationWithTimeout(kWait));
  // Sent again once: that second try found the port closed. Without the replay the error would
  // be the first one, the connection that closed.
  EXPECT_EQ(result.response.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(result.response.status().message(), HasSubstr("cannot connect"));
}

TEST_F(H2cTest, ResetAfterHeadersIsNotRetried) {
  testing::Behaviour cut;
  cut.stream_fail_after = 2;
  fake_->Enqueue(cut);
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  HttpRequest request = Chat(/*stream=*/true);
  request.retry.max_attempts = 3;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::Notification done;
  absl::Status status;
  StreamCallbacks callbacks;
  callbacks.on_headers = [](int, const Headers&) {};
  callbacks.on_data = [](absl::string_view) { return DataAction::kContinue; };
  callbacks.on_done = [&](absl::StatusOr<HttpResponse> r) {
    status = r.status();
    done.Notify();
  };
  client->Stream(request, std::move(callbacks));
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(status.message(), HasSubstr("reset the HTTP/2 stream"));
  EXPECT_EQ(fake_->stats().openai_requests, 1u);
}

// RST_STREAM with NO_ERROR before END_STREAM is still an answer cut short, not a whole one.
TEST_F(H2cTest, ResetWithNoErrorBeforeTheEndIsNotAWholeAnswer) {
  testing::Behaviour cut;
  cut.stream_fail_after = 2;
  cut.stream_fail_no_error = true;
  fake_->Enqueue(cut);
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  absl::StatusOr<HttpResponse> result = SendAndWait(client, Chat(/*stream=*/true));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(result.status().message(), HasSubstr("before the end of its answer"));
}

TEST_F(H2cTest, RefusedConnectionIsUnavailableAndRetried) {
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  HttpRequest request = Chat();
  request.url = absl::StrCat("http://127.0.0.1:", testing::UnusedLoopbackPort(), "/v1/x");
  request.retry.max_attempts = 2;
  request.retry.initial_backoff = absl::Milliseconds(1);
  absl::StatusOr<HttpResponse> result = SendAndWait(client, request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(result.status().message(), HasSubstr("after 2 attempts"));
}

TEST_F(H2cTest, SizeCapEndsTheCall) {
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  HttpRequest request = Chat();
  request.max_response_bytes = 16;
  absl::StatusOr<HttpResponse> result = SendAndWait(client, request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(H2cTest, HostNamesResolveWithoutBlocking) {
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  absl::StatusOr<HttpResponse> result = SendAndWait(client, Chat(/*stream=*/false, "localhost"));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->status, 200);
  EXPECT_EQ(result->http_version, 2);
  EXPECT_EQ(fake_->stats().h2c_connections, 1u);
}

// As libcurl does: the URL's user and password (percent-decoded) become Basic credentials, unless
// the request carries an Authorization header of its own. The fake answers 401 unless it gets the
// credentials it expects.
TEST_F(H2cTest, UrlCredentialsAreSentUnlessTheRequestHasItsOwn) {
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  auto send = [&](const HttpRequest& request) {
    absl::StatusOr<HttpResponse> response = SendAndWait(client, request);
    EXPECT_TRUE(response.ok()) << response.status();
    return response.ok() ? response->status : 0;
  };
  HttpRequest request = Chat();
  request.url =
      absl::StrCat("http://user:p%40ss@127.0.0.1:", fake_->h2c_port(), "/v1/chat/completions");
  request.headers = {{"Content-Type", "application/json"}};
  // 1. The URL's credentials: "user:p@ss" in base64.
  fake_->set_expected_key("Basic dXNlcjpwQHNz");
  EXPECT_EQ(send(request), 200);
  // 2. The request's own header wins over the URL's.
  request.headers.emplace_back("Authorization", "Bearer k");
  fake_->set_expected_key("k");
  EXPECT_EQ(send(request), 200);
  // 3. The fake does refuse: the same request with another key is a 401.
  fake_->set_expected_key("other");
  EXPECT_EQ(send(request), 401);
}

// A name pinned to addresses (HttpClientOptions::resolve, as curl's --resolve) is not looked up,
// and its addresses are tried in order: nothing listens on 127.0.0.2 (the fake is bound to
// 127.0.0.1), so the connection is made on the second address.
TEST_F(H2cTest, PinnedAddressesAreTriedInTurn) {
  HttpClientOptions options;
  options.name = "h2c_test";
  options.resolve = {absl::StrCat("Provider.Test:", fake_->h2c_port(), ":127.0.0.2,127.0.0.1")};
  absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<HttpResponse> result =
      SendAndWait(*client, Chat(/*stream=*/false, "provider.test"));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->status, 200);
  EXPECT_EQ(fake_->stats().h2c_connections, 1u);
}

TEST(HttpClientResolveTest, MalformedEntriesAreRefusedByName) {
  for (const char* entry :
       {"no-port", "host:99999:127.0.0.1", "host:80:", "host:80:not-an-ip", "host:80:127.0.0.1,",
        "[::1:80:127.0.0.1", ":80:127.0.0.1", "host:80:::1"}) {
    HttpClientOptions options;
    options.resolve = {"fine.test:80:127.0.0.1,[::1]", entry};
    absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(options);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << entry;
    EXPECT_THAT(client.status().message(), HasSubstr("resolve[1]")) << entry;
  }
}

// With max_total_connections 1, a call to another origin waits until the one connection is idle
// (then that connection is closed for it), as libcurl queues transfers at its total limit; a
// call that reaches its deadline while it waits ends there and leaves no trace in the queue.
TEST_F(H2cTest, TotalConnectionLimitMakesOtherOriginsWait) {
  testing::FakeLlmOptions other_options;
  other_options.h2c_port = 0;
  other_options.control_pages = false;
  absl::StatusOr<std::unique_ptr<testing::FakeLlmServer>> other =
      testing::FakeLlmServer::Start(other_options);
  ASSERT_TRUE(other.ok()) << other.status();
  fake_->set_default_delay(absl::Milliseconds(300));
  HttpClientOptions options;
  options.name = "h2c_test";
  options.max_total_connections = 1;
  absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto to_other = [&](absl::Time deadline) {
    HttpRequest request = Chat();
    request.url = absl::StrCat("http://127.0.0.1:", (*other)->h2c_port(), "/v1/chat/completions");
    request.deadline = deadline;
    return request;
  };

  // 1. The slow call holds the only connection; the other origin's call waits for it.
  std::atomic<int> finished{0};
  int slow_rank = 0;
  int waiting_rank = 0;
  Result slow;
  Result waiting;
  (*client)->Send(Chat(), [&](absl::StatusOr<HttpResponse> r) {
    slow_rank = ++finished;
    slow.Callback()(std::move(r));
  });
  ASSERT_TRUE(Eventually([&] { return fake_->stats().total_requests == 1; }));
  (*client)->Send(to_other(absl::Now() + kWait), [&](absl::StatusOr<HttpResponse> r) {
    waiting_rank = ++finished;
    waiting.Callback()(std::move(r));
  });
  ASSERT_TRUE(slow.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(waiting.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(slow.response.ok()) << slow.response.status();
  ASSERT_TRUE(waiting.response.ok()) << waiting.response.status();
  EXPECT_EQ(slow_rank, 1);  // the other origin had no connection until the slow call ended
  EXPECT_EQ(waiting_rank, 2);
  EXPECT_EQ((*other)->stats().h2c_connections, 1u);

  // 2. Now the other origin holds the connection: a call here that times out while it waits
  //    ends with DEADLINE_EXCEEDED, and the next one goes through.
  (*other)->set_default_delay(absl::Milliseconds(300));
  Result busy;
  (*client)->Send(to_other(absl::Now() + kWait), busy.Callback());
  ASSERT_TRUE(Eventually([&] { return (*other)->stats().total_requests == 2; }));
  Result gave_up;
  HttpRequest short_lived = Chat();
  short_lived.deadline = absl::Now() + absl::Milliseconds(50);
  (*client)->Send(short_lived, gave_up.Callback());
  ASSERT_TRUE(gave_up.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(gave_up.response.status().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(busy.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_TRUE(busy.response.ok()) << busy.response.status();
  absl::StatusOr<HttpResponse> after = SendAndWait(*client, Chat());
  EXPECT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(fake_->stats().total_requests, 2u);  // the call that gave up never reached it
}

// A loopback listener whose accept queue is full: the kernel drops further SYNs, so connections
// to it stay "connecting" until the client gives up, or until Release makes room (the client's
// next SYN, a second or so later, then gets through).
class UnansweredListener {
 public:
  UnansweredListener() {
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (listener_ < 0 || bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(listener_, 0) != 0 ||
        getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      return;
    }
    port_ = ntohs(addr.sin_port);
    filler_ = socket(AF_INET, SOCK_STREAM, 0);  // takes the queue's one place
    if (filler_ < 0 || connect(filler_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      port_ = 0;
    }
  }
  ~UnansweredListener() {
    for (int fd : {accepted_, filler_, listener_}) {
      if (fd >= 0) close(fd);
    }
  }
  int port() const { return port_; }  // 0: could not be set up

  // Takes the filler off the queue and accepts the next connection; -1 if none comes in time.
  int Release() {
    if (!Readable(listener_, absl::Seconds(5))) return -1;
    const int filler_peer = accept(listener_, nullptr, nullptr);
    if (filler_peer >= 0) close(filler_peer);
    if (!Readable(listener_, kWait)) return -1;
    accepted_ = accept(listener_, nullptr, nullptr);
    return accepted_;
  }

  static bool Readable(int fd, absl::Duration timeout) {
    pollfd p{fd, POLLIN, 0};
    return poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) == 1;
  }

 private:
  int listener_ = -1;
  int filler_ = -1;
  int accepted_ = -1;
  int port_ = 0;
};

HttpRequest ToListener(HttpRequest request, int port, absl::Duration connect_timeout) {
  request.url = absl::StrCat("http://127.0.0.1:", port, "/v1/chat/completions");
  request.connect_timeout = connect_timeout;
  request.deadline = absl::Now() + absl::Seconds(600);  // the connect timeout is what ends it
  request.retry.max_attempts = 1;
  return request;
}

// Two calls wait for the same connection that does not come up: each gives up after its own
// connect_timeout, not the first call's (which set the connection's timer before).
TEST_F(H2cTest, EachCallWaitsForTheConnectionOnlyItsOwnConnectTimeout) {
  UnansweredListener listener;
  ASSERT_NE(listener.port(), 0);
  UnansweredListener second;
  ASSERT_NE(second.port(), 0);
  Result patient, hasty, hasty_first, patient_second;  // outlive the client (its callbacks)
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  client->Send(ToListener(Chat(), listener.port(), absl::Seconds(600)), patient.Callback());
  client->Send(ToListener(Chat(), listener.port(), absl::Milliseconds(100)), hasty.Callback());
  ASSERT_TRUE(hasty.done.WaitForNotificationWithTimeout(kWait))
      << "the second call waited for the first call's connect timeout";
  EXPECT_EQ(hasty.response.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(hasty.response.status().message(), HasSubstr("within 100 ms"));
  EXPECT_FALSE(patient.done.HasBeenNotified());  // still waiting for the connection

  // The other way round, on a connection of its own: its first call gives up, the later one
  // still waits (the connection did not give up with the first call).
  client->Send(ToListener(Chat(), second.port(), absl::Milliseconds(100)), hasty_first.Callback());
  client->Send(ToListener(Chat(), second.port(), absl::Seconds(600)), patient_second.Callback());
  ASSERT_TRUE(hasty_first.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(hasty_first.response.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_FALSE(patient_second.done.HasBeenNotified());
  EXPECT_FALSE(patient.done.HasBeenNotified());
  client.reset();  // the patient calls end CANCELLED
  for (Result* r : {&patient, &patient_second}) {
    ASSERT_TRUE(r->done.HasBeenNotified());
    EXPECT_EQ(r->response.status().code(), absl::StatusCode::kCancelled);
  }
}

// A request that gave up waiting for the connection is never sent when the connection comes up
// later: the server sees the HEADERS of the call that waited, and nothing of the other.
TEST_F(H2cTest, ARequestThatGaveUpWaitingForItsConnectionIsNeverSent) {
  UnansweredListener listener;
  ASSERT_NE(listener.port(), 0);
  Result patient, hasty;
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  client->Send(ToListener(Chat(), listener.port(), absl::Seconds(600)), patient.Callback());
  client->Send(ToListener(Chat(), listener.port(), absl::Milliseconds(100)), hasty.Callback());
  ASSERT_TRUE(hasty.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_EQ(hasty.response.status().code(), absl::StatusCode::kDeadlineExceeded);

  const int fd = listener.Release();
  ASSERT_GE(fd, 0) << "the client's connection did not come in";
  // Frames until the waiting call's request ended (END_STREAM on stream 1), then whatever
  // follows within a moment: streams named by HEADERS and RST_STREAM frames.
  std::string wire;
  std::vector<int32_t> headers_streams, reset_streams;
  bool request_ended = false;
  size_t offset = 24;  // the client preface
  while (UnansweredListener::Readable(fd, request_ended ? absl::Milliseconds(300) : kWait)) {
    char buf[16384];
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    wire.append(buf, static_cast<size_t>(n));
    while (wire.size() >= offset + 9) {
      const auto* h = reinterpret_cast<const unsigned char*>(wire.data() + offset);
      const size_t length = (size_t{h[0]} << 16) | (size_t{h[1]} << 8) | h[2];
      if (wire.size() < offset + 9 + length) break;
      const int32_t stream =
          static_cast<int32_t>(((h[5] & 0x7fu) << 24) | (h[6] << 16) | (h[7] << 8) | h[8]);
      if (h[3] == 0x1) headers_streams.push_back(stream);  // HEADERS
      if (h[3] == 0x3) reset_streams.push_back(stream);    // RST_STREAM
      if ((h[3] == 0x0 || h[3] == 0x1) && (h[4] & 0x1) != 0 && stream == 1) request_ended = true;
      offset += 9 + length;
    }
  }
  EXPECT_TRUE(request_ended);
  EXPECT_EQ(headers_streams, std::vector<int32_t>{1});
  EXPECT_TRUE(reset_streams.empty());
  EXPECT_FALSE(patient.done.HasBeenNotified());
  client.reset();
}

TEST_F(H2cTest, ErrorStatusIsAnAnswerAndRetried) {
  testing::Behaviour busy;
  busy.status = 503;
  busy.headers = {{"retry-after", "0"}};
  fake_->Enqueue(busy);
  std::unique_ptr<HttpClient> client = MakeClient();
  ASSERT_NE(client, nullptr);
  HttpRequest request = Chat();
  request.retry.max_attempts = 2;
  absl::StatusOr<HttpResponse> result = SendAndWait(client, request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->status, 200);
  EXPECT_EQ(result->attempts, 2u);
}

}  // namespace
}  // namespace montage::http
