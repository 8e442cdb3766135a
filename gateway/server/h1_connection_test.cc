// The HTTP/1.1 downstream codec against real sockets on loopback: a Listener on port 0 with one
// worker loop, and a dispatcher whose handlers echo, stream, hold or record. Clients are libcurl
// or raw sockets (responses parsed with http-parser) where the bytes on the wire matter.
#include <curl/curl.h>
#include <fcntl.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gateway/server/listener.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::gateway {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

constexpr size_t kWindow = 64 << 10;
// How long anything may take before the test gives up: a guard against hanging, not a measure.
constexpr absl::Duration kPatience = absl::Seconds(20);

class TestHandler;

// What the handlers did, shared with the test thread.
class Log {
 public:
  void Event(std::string event) {
    absl::MutexLock lock(&mu_);
    events_.push_back(std::move(event));
  }
  std::vector<std::string> events() {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  // Waits until `event` has been logged.
  bool AwaitEvent(const std::string& event) {
    absl::MutexLock lock(&mu_);
    auto logged = [&] {
      mu_.AssertHeld();
      return std::find(events_.begin(), events_.end(), event) != events_.end();
    };
    return mu_.AwaitWithTimeout(absl::Condition(&logged), kPatience);
  }

  void Dispatched(const RequestHead& head) {
    absl::MutexLock lock(&mu_);
    max_open_at_dispatch_ = std::max(max_open_at_dispatch_, open_);
    ++open_;
    heads_.push_back(head);
  }
  void Closed() {
    absl::MutexLock lock(&mu_);
    --open_;
  }
  int max_open_at_dispatch() {
    absl::MutexLock lock(&mu_);
    return max_open_at_dispatch_;
  }
  int open() {
    absl::MutexLock lock(&mu_);
    return open_;
  }
  std::vector<RequestHead> heads() {
    absl::MutexLock lock(&mu_);
    return heads_;
  }

  // Request-body accounting of the "sink" handlers.
  void Received(size_t received, size_t unconsumed) {
    absl::MutexLock lock(&mu_);
    received_ = received;
    max_unconsumed_ = std::max(max_unconsumed_, unconsumed);
  }
  bool AwaitReceived(size_t bytes) {
    absl::MutexLock lock(&mu_);
    auto reached = [&] {
      mu_.AssertHeld();
      return received_ >= bytes;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kPatience);
  }
  size_t received() {
    absl::MutexLock lock(&mu_);
    return received_;
  }
  size_t max_unconsumed() {
    absl::MutexLock lock(&mu_);
    return max_unconsumed_;
  }

  // Live handlers by request path; used on the loop thread only.
  std::map<std::string, TestHandler*> live;

 private:
  absl::Mutex mu_;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
  std::vector<RequestHead> heads_ ABSL_GUARDED_BY(mu_);
  int open_ ABSL_GUARDED_BY(mu_) = 0;
  int max_open_at_dispatch_ ABSL_GUARDED_BY(mu_) = 0;
  size_t received_ ABSL_GUARDED_BY(mu_) = 0;
  size_t max_unconsumed_ ABSL_GUARDED_BY(mu_) = 0;
};

// One behaviour per path prefix; every handler logs "dispatch", "end" and "closed" with its path.
//   /echo    the request body back (content-length with ?cl, else chunked)
//   /fixed   "hello world" with content-length
//   /empty   headers only, end_stream
//   /stream  three SendData calls and a trailer
//   /big     2 MiB in one SendData, the end after OnSendBufferDrained
//   /hold    nothing until the test acts (?start: headers and a first piece at once)
//   /sink    counts the body and consumes it only once the test says so; answers the count
//   /reset   Reset() from inside Dispatch
class TestHandler final : public StreamHandler {
 public:
  TestHandler(Log& log, ServerStream& stream, std::string kind, std::string name)
      : log_(log), stream_(&stream), kind_(std::move(kind)), name_(std::move(name)) {
    log_.live[name_] = this;
  }
  ~TestHandler() override { log_.live.erase(name_); }

  void Begin() {
    if (kind_ == "/reset") {
      stream_->Reset();
    } else if (kind_ == "/hold" && absl::StrContains(stream_->head().path, "start")) {
      stream_->SendHeaders(200, {{"content-type", "text/plain"}}, /*end_stream=*/false);
      stream_->SendData("partial", /*end_stream=*/false);
    }
  }

  ServerStream* stream() { return stream_; }

  // From the test (on the loop): consume what is held and everything that follows.
  void ConsumeFromNowOn() {
    consume_ = true;
    stream_->ConsumeRequestData(unconsumed_);
    unconsumed_ = 0;
  }

  void OnRequestData(absl::string_view data, bool end_stream) override {
    received_ += data.size();
    if (kind_ == "/sink") {
      if (consume_) {
        stream_->ConsumeRequestData(data.size());
      } else {
        unconsumed_ += data.size();
      }
      log_.Received(received_, unconsumed_);
    } else {
      body_.append(data.data(), data.size());
      stream_->ConsumeRequestData(data.size());
    }
    if (end_stream) {
      log_.Event("end " + name_);
      Respond();
    }
  }

  void OnSendBufferDrained() override {
    log_.Event("drained " + name_);
    if (kind_ == "/big" && waiting_for_drain_) {
      waiting_for_drain_ = false;
      stream_->SendData({}, /*end_stream=*/true);
    }
  }

  void OnStreamClosed(bool completed) override {
    stream_ = nullptr;
    log_.Event(absl::StrCat("closed ", name_, " ", completed ? "true" : "false"));
    log_.Closed();
  }

 private:
  void Respond() {
    if (kind_ == "/echo") {
      HeaderList headers = {{"content-type", "text/plain"}};
      if (absl::StrContains(stream_->head().path, "cl")) {
        headers.emplace_back("content-length", std::to_string(body_.size()));
      }
      stream_->SendHeaders(200, std::move(headers), /*end_stream=*/false);
      stream_->SendData(body_, /*end_stream=*/true);
    } else if (kind_ == "/fixed") {
      stream_->SendHeaders(200, {{"content-length", "11"}, {"connection", "keep-alive"}}, false);
      stream_->SendData("hello world", /*end_stream=*/true);
    } else if (kind_ == "/empty") {
      stream_->SendHeaders(200, {{"x-empty", "yes"}}, /*end_stream=*/true);
    } else if (kind_ == "/stream") {
      stream_->SendHeaders(200, {{"content-type", "text/plain"}}, /*end_stream=*/false);
      stream_->SendData("one,", false);
      stream_->SendData("two,", false);
      stream_->SendData("three", false);
      stream_->SendTrailers({{"x-trailer", "done"}, {"x-count", "3"}});
    } else if (kind_ == "/big") {
      const std::string big(2 << 20, 'x');
      stream_->SendHeaders(200, {{"content-length", std::to_string(big.size())}}, false);
      stream_->SendData(big, /*end_stream=*/false);
      log_.Event(stream_->PendingSendBytes() > 0 ? "pending>0" : "pending=0");
      waiting_for_drain_ = true;
    } else if (kind_ == "/sink") {
      const std::string count = std::to_string(received_);
      stream_->SendHeaders(200, {{"content-length", std::to_string(count.size())}}, false);
      stream_->SendData(count, /*end_stream=*/true);
    }
  }

  Log& log_;
  ServerStream* stream_;
  const std::string kind_;
  const std::string name_;
  std::string body_;
  size_t received_ = 0;
  size_t unconsumed_ = 0;
  bool consume_ = false;
  bool waiting_for_drain_ = false;
};

class TestDispatcher final : public StreamDispatcher {
 public:
  explicit TestDispatcher(Log& log) : log_(log) {}

  std::unique_ptr<StreamHandler> Dispatch(ServerStream& stream) override {
    const std::string& path = stream.head().path;
    const std::string name = path.substr(0, path.find('?'));
    const std::string kind = name.substr(0, name.find('/', 1));
    log_.Dispatched(stream.head());
    log_.Event("dispatch " + name);
    if (kind == "/reject") {
      // Answered by the dispatcher itself.
      stream.SendHeaders(404, {{"content-type", "text/plain"}}, /*end_stream=*/false);
      stream.SendData("nothing here\n", /*end_stream=*/true);
      log_.Closed();
      return nullptr;
    }
    auto handler = std::make_unique<TestHandler>(log_, stream, kind, name);
    handler->Begin();
    return handler;
  }

 private:
  Log& log_;
};

struct Response {
  int status = 0;
  HeaderList headers;   // names lower-cased
  HeaderList trailers;  // chunked trailer fields
  std::string body;

  const std::string* Header(absl::string_view name) const { return FindHeader(headers, name); }
};

// A client on a plain socket. Responses are parsed with http-parser, one at a time.
class RawClient {
 public:
  explicit RawClient(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    http_parser_init(&parser_, HTTP_RESPONSE);
    parser_.data = this;
  }
  ~RawClient() { Close(); }

  bool connected() const { return connected_; }
  int fd() const { return fd_; }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  // Writes everything, waiting for the socket as needed.
  bool Send(absl::string_view bytes) {
    const absl::Time deadline = absl::Now() + kPatience;
    while (!bytes.empty()) {
      if (!WaitFor(POLLOUT, deadline)) return false;
      const ssize_t n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  // The next response (a 1xx is one too). `head_request`: it answers a HEAD (no body).
  std::optional<Response> Read(bool head_request = false) {
    response_ = Response();
    complete_ = false;
    head_request_ = head_request;
    const absl::Time deadline = absl::Now() + kPatience;
    for (;;) {
      if (!unparsed_.empty()) {
        const size_t n =
            http_parser_execute(&parser_, &Settings(), unparsed_.data(), unparsed_.size());
        unparsed_.erase(0, n);
        if (!ParserOk()) return std::nullopt;
      }
      if (complete_) return response_;
      char buf[1 << 16];
      const ssize_t n = ReadSome(buf, sizeof(buf), deadline);
      if (n < 0) return std::nullopt;
      if (n == 0) {  // the end of a close-delimited body
        http_parser_execute(&parser_, &Settings(), nullptr, 0);
        if (!ParserOk() || !complete_) return std::nullopt;
        return response_;
      }
      unparsed_.append(buf, static_cast<size_t>(n));
    }
  }

  // Reads raw bytes until `text` has arrived.
  bool ReadUntil(absl::string_view text) {
    const absl::Time deadline = absl::Now() + kPatience;
    while (!absl::StrContains(unparsed_, text)) {
      char buf[4096];
      const ssize_t n = ReadSome(buf, sizeof(buf), deadline);
      if (n <= 0) return false;
      unparsed_.append(buf, static_cast<size_t>(n));
    }
    return true;
  }

  // True when the server closes the connection (what it still sends is dropped).
  bool ReadEof() {
    const absl::Time deadline = absl::Now() + kPatience;
    for (;;) {
      char buf[4096];
      const ssize_t n = ReadSome(buf, sizeof(buf), deadline);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
      if (n < 0) return false;
    }
  }

  // Bytes received and not yet parsed as a response.
  const std::string& unparsed() const { return unparsed_; }

 private:
  bool WaitFor(short events, absl::Time deadline) {
    for (;;) {
      const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (ms <= 0) return false;
      pollfd p{fd_, events, 0};
      const int rc = poll(&p, 1, static_cast<int>(ms));
      if (rc > 0) return true;
      if (rc < 0 && errno != EINTR) return false;
    }
  }

  // recv's result; -1 with errno ETIMEDOUT when nothing came in time.
  ssize_t ReadSome(char* buf, size_t size, absl::Time deadline) {
    for (;;) {
      if (!WaitFor(POLLIN, deadline)) {
        errno = ETIMEDOUT;
        return -1;
      }
      const ssize_t n = recv(fd_, buf, size, MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      return n;
    }
  }

  bool ParserOk() {
    const http_errno error = HTTP_PARSER_ERRNO(&parser_);
    if (error == HPE_PAUSED) {
      http_parser_pause(&parser_, 0);
      return true;
    }
    if (error == HPE_OK) return true;
    ADD_FAILURE() << "bad response from the server: " << http_errno_description(error);
    return false;
  }

  static RawClient* Self(http_parser* p) { return static_cast<RawClient*>(p->data); }
  HeaderList& Fields() { return in_trailers_ ? response_.trailers : response_.headers; }

  static const http_parser_settings& Settings() {
    static const http_parser_settings settings = [] {
      http_parser_settings s;
      http_parser_settings_init(&s);
      s.on_message_begin = [](http_parser* p) {
        Self(p)->in_trailers_ = false;
        Self(p)->in_value_ = false;
        return 0;
      };
      s.on_header_field = [](http_parser* p, const char* at, size_t n) {
        RawClient* c = Self(p);
        if (c->in_value_ || c->Fields().empty()) c->Fields().emplace_back();
        c->in_value_ = false;
        c->Fields().back().first += absl::AsciiStrToLower(absl::string_view(at, n));
        return 0;
      };
      s.on_header_value = [](http_parser* p, const char* at, size_t n) {
        RawClient* c = Self(p);
        c->in_value_ = true;
        c->Fields().back().second.append(at, n);
        return 0;
      };
      s.on_headers_complete = [](http_parser* p) {
        RawClient* c = Self(p);
        c->response_.status = static_cast<int>(p->status_code);
        c->in_trailers_ = true;
        c->in_value_ = false;
        return c->head_request_ ? 1 : 0;
      };
      s.on_body = [](http_parser* p, const char* at, size_t n) {
        Self(p)->response_.body.append(at, n);
        return 0;
      };
      s.on_message_complete = [](http_parser* p) {
        Self(p)->complete_ = true;
        http_parser_pause(p, 1);
        return 0;
      };
      return s;
    }();
    return settings;
  }

  int fd_ = -1;
  bool connected_ = false;
  http_parser parser_;
  std::string unparsed_;
  Response response_;
  bool complete_ = false;
  bool head_request_ = false;
  bool in_trailers_ = false;
  bool in_value_ = false;
};

// libcurl: a body and headers collected from one transfer.
struct CurlResult {
  CURLcode code = CURLE_OK;
  long status = 0;
  long connects = 0;
  std::string body;
  std::string headers;
};

size_t AppendTo(char* data, size_t size, size_t count, void* out) {
  static_cast<std::string*>(out)->append(data, size * count);
  return size * count;
}

CurlResult Perform(CURL* curl) {
  CurlResult r;
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &AppendTo);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &r.body);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &AppendTo);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &r.headers);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS,
                   static_cast<long>(absl::ToInt64Milliseconds(kPatience)));
  r.code = curl_easy_perform(curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r.status);
  curl_easy_getinfo(curl, CURLINFO_NUM_CONNECTS, &r.connects);
  return r;
}

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
using CurlHandle = std::unique_ptr<CURL, CurlDeleter>;

CurlHandle NewCurl() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  return CurlHandle(curl_easy_init());
}

class H1ConnectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Start("h1-test");
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = *std::move(loop);
    CodecOptions options;
    options.initial_stream_window = kWindow;
    absl::StatusOr<std::unique_ptr<Listener>> listener =
        Listener::Start("127.0.0.1:0", {loop_.get()}, dispatcher_, options);
    ASSERT_TRUE(listener.ok()) << listener.status();
    listener_ = *std::move(listener);
  }

  void TearDown() override {
    listener_.reset();  // closes what is still open: every handler hears of it
    loop_.reset();
    EXPECT_EQ(log_.open(), 0) << "a handler was never told its stream closed";
    EXPECT_EQ(log_.max_open_at_dispatch(), 0) << "a request was dispatched during another";
  }

  int port() const { return listener_->port(); }
  std::string Url(absl::string_view path) const {
    return absl::StrCat("http://127.0.0.1:", port(), path);
  }

  // Runs `fn` on the worker loop and waits for it.
  void OnLoop(std::function<void()> fn) {
    absl::Notification done;
    loop_->Post([&] {
      fn();
      done.Notify();
    });
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(kPatience));
  }

  // The live handler for `name`, on the loop thread.
  TestHandler* Handler(const std::string& name) {
    auto it = log_.live.find(name);
    return it == log_.live.end() ? nullptr : it->second;
  }

  Log log_;
  TestDispatcher dispatcher_{log_};
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Listener> listener_;
};

TEST_F(H1ConnectionTest, SimpleGetWithCurl) {
  CurlHandle curl = NewCurl();
  curl_easy_setopt(curl.get(), CURLOPT_URL, Url("/fixed?x=1").c_str());
  const CurlResult r = Perform(curl.get());
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "hello world");
  EXPECT_THAT(r.headers, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(r.headers, HasSubstr("content-length: 11\r\n"));
  EXPECT_THAT(r.headers, ::testing::Not(HasSubstr("connection:")));  // hop-by-hop: stripped

  ASSERT_TRUE(log_.AwaitEvent("closed /fixed true"));
  const std::vector<RequestHead> heads = log_.heads();
  ASSERT_EQ(heads.size(), 1u);
  EXPECT_EQ(heads[0].method, "GET");
  EXPECT_EQ(heads[0].path, "/fixed?x=1");
  EXPECT_EQ(heads[0].authority, absl::StrCat("127.0.0.1:", port()));
  EXPECT_EQ(heads[0].scheme, "http");
  EXPECT_EQ(heads[0].peer_ip, "127.0.0.1");
  EXPECT_FALSE(heads[0].http2);
}

TEST_F(H1ConnectionTest, RequestHeadFieldsAreLowerCasedInOrder) {
  RawClient client(port());
  ASSERT_TRUE(client.connected());
  ASSERT_TRUE(client.Send(
      "GET /echo/head?a=1&b=2 HTTP/1.1\r\nHost: example.test:8080\r\nX-Custom-Header: Value \r\n"
      "B-Second: 2\r\nA-First: 1\r\nConnection: keep-alive\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  const std::vector<RequestHead> heads = log_.heads();
  ASSERT_EQ(heads.size(), 1u);
  EXPECT_EQ(heads[0].path, "/echo/head?a=1&b=2");
  EXPECT_EQ(heads[0].authority, "example.test:8080");
  EXPECT_THAT(heads[0].headers,
              ElementsAre(Pair("host", "example.test:8080"), Pair("x-custom-header", "Value"),
                          Pair("b-second", "2"), Pair("a-first", "1")));
}

TEST_F(H1ConnectionTest, AbsoluteFormTargetGivesPathAndAuthority) {
  RawClient client(port());
  ASSERT_TRUE(
      client.Send("GET http://other.test:81/echo/abs?q=1 HTTP/1.1\r\nHost: ignored.test\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  const std::vector<RequestHead> heads = log_.heads();
  ASSERT_EQ(heads.size(), 1u);
  EXPECT_EQ(heads[0].path, "/echo/abs?q=1");
  EXPECT_EQ(heads[0].authority, "other.test:81");
}

TEST_F(H1ConnectionTest, PostWithContentLengthIsEchoed) {
  CurlHandle curl = NewCurl();
  curl_easy_setopt(curl.get(), CURLOPT_URL, Url("/echo").c_str());
  curl_easy_setopt(curl.get(), CURLOPT_POSTFIELDS, "hello, body");
  const CurlResult r = Perform(curl.get());
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "hello, body");
  // No content-length from the handler: the response is chunked.
  EXPECT_THAT(r.headers, HasSubstr("transfer-encoding: chunked\r\n"));
}

TEST_F(H1ConnectionTest, PostWithChunkedBodyIsEchoed) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      "POST /echo?cl HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"));
  ASSERT_TRUE(log_.AwaitEvent("dispatch /echo"));
  ASSERT_TRUE(client.Send("7;ext=1\r\n, world\r\n0\r\nX-Request-Trailer: ignored\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "hello, world");
  ASSERT_NE(r->Header("content-length"), nullptr);
  EXPECT_EQ(*r->Header("content-length"), "12");
  EXPECT_EQ(r->Header("transfer-encoding"), nullptr);
}

// common_http_protocol_options.idle_timeout: a connection with no request in progress, or one
// that never sends a byte, is closed.
TEST_F(H1ConnectionTest, IdleConnectionsAreClosed) {
  CodecOptions options;
  options.idle_timeout = absl::Milliseconds(100);
  absl::StatusOr<std::unique_ptr<Listener>> idle =
      Listener::Start("127.0.0.1:0", {loop_.get()}, dispatcher_, options);
  ASSERT_TRUE(idle.ok()) << idle.status();
  {
    RawClient client((*idle)->port());
    ASSERT_TRUE(client.Send("GET /echo/idle HTTP/1.1\r\nHost: x\r\n\r\n"));
    std::optional<Response> r = client.Read();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, 200);
    EXPECT_TRUE(client.ReadEof());  // kept alive, then idle: closed
  }
  {
    RawClient silent((*idle)->port());
    EXPECT_TRUE(silent.ReadEof());  // never sent a byte
  }
  {
    // HTTP/2: the connection preface and an empty SETTINGS frame, then no stream.
    RawClient h2((*idle)->port());
    ASSERT_TRUE(h2.Send(std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") +
                        std::string("\x00\x00\x00\x04\x00\x00\x00\x00\x00", 9)));
    EXPECT_TRUE(h2.ReadEof());
  }
  idle->reset();
}

TEST_F(H1ConnectionTest, KeepAliveServesTwoRequestsOnOneConnection) {
  CurlHandle curl = NewCurl();
  curl_easy_setopt(curl.get(), CURLOPT_URL, Url("/echo/1").c_str());
  const CurlResult first = Perform(curl.get());
  ASSERT_EQ(first.code, CURLE_OK);
  EXPECT_EQ(first.connects, 1);
  curl_easy_setopt(curl.get(), CURLOPT_URL, Url("/fixed").c_str());
  const CurlResult second = Perform(curl.get());
  ASSERT_EQ(second.code, CURLE_OK);
  EXPECT_EQ(second.body, "hello world");
  EXPECT_EQ(second.connects, 0) << "the second request needed a new connection";

  // The same on a raw socket, both framings.
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /echo/2 HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> a = client.Read();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->status, 200);
  EXPECT_EQ(a->Header("connection"), nullptr);
  ASSERT_TRUE(client.Send("POST /echo/3?cl HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"));
  std::optional<Response> b = client.Read();
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->body, "abc");
}

TEST_F(H1ConnectionTest, PipelinedRequestsAreServedOneAfterTheOtherInOrder) {
  RawClient client(port());
  ASSERT_TRUE(
      client.Send("GET /hold/a HTTP/1.1\r\nHost: t\r\n\r\n"
                  "POST /echo/b?cl HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nbb"
                  "GET /stream/c HTTP/1.1\r\nHost: t\r\n\r\n"));
  ASSERT_TRUE(log_.AwaitEvent("end /hold/a"));
  // Everything sent has been read by now (one send, one read); nothing else was dispatched.
  OnLoop([] {});
  EXPECT_THAT(log_.events(), ElementsAre("dispatch /hold/a", "end /hold/a"));

  OnLoop([&] {
    TestHandler* h = Handler("/hold/a");
    ASSERT_NE(h, nullptr);
    ServerStream* s = h->stream();
    s->SendHeaders(200, {{"content-length", "1"}}, false);
    s->SendData("a", true);
  });
  std::optional<Response> a = client.Read();
  std::optional<Response> b = client.Read();
  std::optional<Response> c = client.Read();
  ASSERT_TRUE(a.has_value() && b.has_value() && c.has_value());
  EXPECT_EQ(a->body, "a");
  EXPECT_EQ(b->body, "bb");
  EXPECT_EQ(c->body, "one,two,three");
  ASSERT_TRUE(log_.AwaitEvent("closed /stream/c true"));
  EXPECT_THAT(log_.events(),
              ElementsAre("dispatch /hold/a", "end /hold/a", "closed /hold/a true",
                          "dispatch /echo/b", "end /echo/b", "closed /echo/b true",
                          "dispatch /stream/c", "end /stream/c", "closed /stream/c true"));
}

TEST_F(H1ConnectionTest, ChunkedResponseWithTrailers) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /stream HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  ASSERT_NE(r->Header("transfer-encoding"), nullptr);
  EXPECT_EQ(*r->Header("transfer-encoding"), "chunked");
  EXPECT_EQ(r->body, "one,two,three");
  EXPECT_THAT(r->trailers, ElementsAre(Pair("x-trailer", "done"), Pair("x-count", "3")));
  // The connection stays usable after the trailer section.
  ASSERT_TRUE(client.Send("GET /fixed HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> next = client.Read();
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->body, "hello world");
}

TEST_F(H1ConnectionTest, EndStreamWithoutBodyHasContentLengthZero) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /empty HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  ASSERT_NE(r->Header("content-length"), nullptr);
  EXPECT_EQ(*r->Header("content-length"), "0");
  EXPECT_EQ(r->Header("transfer-encoding"), nullptr);
  EXPECT_EQ(r->body, "");
}

TEST_F(H1ConnectionTest, HeadGetsTheHeadersAndNoBody) {
  RawClient client(port());
  // Pipelined: a stray body byte after the HEAD answer would corrupt the GET's answer.
  ASSERT_TRUE(client.Send(
      "HEAD /fixed HTTP/1.1\r\nHost: t\r\n\r\nHEAD /echo/chunky HTTP/1.1\r\nHost: t\r\n\r\n"
      "GET /fixed HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> head = client.Read(/*head_request=*/true);
  ASSERT_TRUE(head.has_value());
  EXPECT_EQ(head->status, 200);
  ASSERT_NE(head->Header("content-length"), nullptr);
  EXPECT_EQ(*head->Header("content-length"), "11");
  std::optional<Response> head2 = client.Read(/*head_request=*/true);
  ASSERT_TRUE(head2.has_value());
  EXPECT_EQ(head2->status, 200);
  std::optional<Response> get = client.Read();
  ASSERT_TRUE(get.has_value());
  EXPECT_EQ(get->body, "hello world");
  EXPECT_EQ(client.unparsed(), "");
}

TEST_F(H1ConnectionTest, ExpectContinueIsAnsweredBeforeTheBody) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      "PUT /echo?cl HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"));
  std::optional<Response> interim = client.Read();
  ASSERT_TRUE(interim.has_value());
  EXPECT_EQ(interim->status, 100);
  ASSERT_TRUE(client.Send("hello"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "hello");
  const std::vector<RequestHead> heads = log_.heads();
  ASSERT_EQ(heads.size(), 1u);
  EXPECT_EQ(FindHeader(heads[0].headers, "expect"), nullptr);
}

TEST_F(H1ConnectionTest, ClientDisconnectMidResponseClosesTheStream) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /hold/x?start HTTP/1.1\r\nHost: t\r\n\r\n"));
  ASSERT_TRUE(client.ReadUntil("partial"));
  client.Close();
  ASSERT_TRUE(log_.AwaitEvent("closed /hold/x false"));
}

TEST_F(H1ConnectionTest, ClientDisconnectBeforeAnyResponseClosesTheStream) {
  // A REST client that gives up while the upstream call is running: its handler must hear at
  // once, not when the answer is finally written.
  RawClient client(port());
  ASSERT_TRUE(client.Send("POST /hold/y HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"));
  ASSERT_TRUE(log_.AwaitEvent("end /hold/y"));
  client.Close();
  ASSERT_TRUE(log_.AwaitEvent("closed /hold/y false"));
}

TEST_F(H1ConnectionTest, SendBufferDrainedIsSignalled) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /big HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->body.size(), size_t{2} << 20);
  ASSERT_TRUE(log_.AwaitEvent("closed /big true"));
  const std::vector<std::string> events = log_.events();
  EXPECT_THAT(events, ::testing::Contains("pending>0"));
  EXPECT_THAT(events, ::testing::Contains("drained /big"));
}

TEST_F(H1ConnectionTest, RequestBodyBackpressure) {
  constexpr size_t kBody = 64 << 20;
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      absl::StrCat("POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: ", kBody, "\r\n\r\n")));
  ASSERT_TRUE(log_.AwaitEvent("dispatch /sink"));

  // The handler consumes nothing: the server takes one window, buffers a bounded amount, and
  // the client's writes stall long before the body is out.
  const std::string piece(1 << 16, 'b');
  size_t sent = 0;
  bool stalled = false;
  const absl::Time deadline = absl::Now() + kPatience;
  while (sent < kBody && absl::Now() < deadline) {
    const ssize_t n = send(client.fd(), piece.data(), std::min(piece.size(), kBody - sent),
                           MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    ASSERT_TRUE(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) << std::strerror(errno);
    pollfd p{client.fd(), POLLOUT, 0};
    if (poll(&p, 1, 250) == 0) {
      stalled = true;
      break;
    }
  }
  ASSERT_TRUE(stalled) << "the server read the whole unconsumed body (" << sent << " bytes)";
  EXPECT_LT(sent, kBody);
  ASSERT_TRUE(log_.AwaitReceived(kWindow));
  OnLoop([] {});
  EXPECT_EQ(log_.received(), kWindow);
  EXPECT_LE(log_.max_unconsumed(), kWindow);

  // Consuming lets the rest in.
  OnLoop([&] {
    TestHandler* h = Handler("/sink");
    ASSERT_NE(h, nullptr);
    h->ConsumeFromNowOn();
  });
  const std::string rest(kBody - sent, 'b');
  ASSERT_TRUE(client.Send(rest));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, std::to_string(kBody));
  EXPECT_LE(log_.max_unconsumed(), kWindow);
}

TEST_F(H1ConnectionTest, MalformedRequestIsAnswered400AndClosed) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET / HTTP/1.1\r\nHost: t\r\nno colon in this line\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 400);
  EXPECT_THAT(r->body, HasSubstr(http_errno_description(HPE_INVALID_HEADER_TOKEN)));
  ASSERT_NE(r->Header("connection"), nullptr);
  EXPECT_EQ(*r->Header("connection"), "close");
  EXPECT_TRUE(client.ReadEof());
  EXPECT_TRUE(log_.heads().empty());
}

TEST_F(H1ConnectionTest, GarbageIsAnswered400) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11)));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 400);
  EXPECT_TRUE(client.ReadEof());
}

TEST_F(H1ConnectionTest, MalformedChunkedBodyEndsTheStreamWith400) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 400);
  EXPECT_THAT(r->body, HasSubstr(http_errno_description(HPE_INVALID_CHUNK_SIZE)));
  EXPECT_TRUE(client.ReadEof());
  EXPECT_TRUE(log_.AwaitEvent("closed /echo false"));
}

TEST_F(H1ConnectionTest, HugeHeadersAreAnswered431) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(absl::StrCat(
      "GET /fixed HTTP/1.1\r\nHost: t\r\nX-Big: ", std::string(70 << 10, 'h'), "\r\n\r\n")));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 431);
  EXPECT_TRUE(client.ReadEof());
  EXPECT_TRUE(log_.heads().empty());
}

TEST_F(H1ConnectionTest, ManySmallHeadersOverTheLimitAreAnswered431) {
  std::string request = "GET /fixed HTTP/1.1\r\nHost: t\r\n";
  for (int i = 0; i < 8000; ++i) absl::StrAppend(&request, "X-", i, ": v\r\n");
  request += "\r\n";
  RawClient client(port());
  ASSERT_TRUE(client.Send(request));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 431);
  EXPECT_TRUE(client.ReadEof());
}

TEST_F(H1ConnectionTest, LongUrlIsAnswered414) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      absl::StrCat("GET /fixed?", std::string(70 << 10, 'u'), " HTTP/1.1\r\nHost: t\r\n\r\n")));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 414);
  EXPECT_TRUE(client.ReadEof());
}

TEST_F(H1ConnectionTest, UrlJustUnderTheLimitIsServed) {
  RawClient client(port());
  const std::string path = absl::StrCat("/fixed?", std::string((64 << 10) - 7, 'u'));
  ASSERT_EQ(path.size(), size_t{64} << 10);
  ASSERT_TRUE(client.Send(absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: t\r\n\r\n")));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  ASSERT_EQ(log_.heads().size(), 1u);
  EXPECT_EQ(log_.heads()[0].path, path);
}

TEST_F(H1ConnectionTest, Http10BodyIsDelimitedByClose) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /stream HTTP/1.0\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "one,two,three");
  EXPECT_TRUE(r->trailers.empty());
  EXPECT_EQ(r->Header("transfer-encoding"), nullptr);
  EXPECT_EQ(r->Header("content-length"), nullptr);
  ASSERT_NE(r->Header("connection"), nullptr);
  EXPECT_EQ(*r->Header("connection"), "close");
  EXPECT_TRUE(client.ReadEof());
  ASSERT_EQ(log_.heads().size(), 1u);
  EXPECT_EQ(log_.heads()[0].authority, "");
}

TEST_F(H1ConnectionTest, Http10KeepAliveOnlyWhenAsked) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /fixed HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
  std::optional<Response> first = client.Read();
  ASSERT_TRUE(first.has_value());
  ASSERT_NE(first->Header("connection"), nullptr);
  EXPECT_EQ(*first->Header("connection"), "keep-alive");
  ASSERT_TRUE(client.Send("GET /fixed HTTP/1.0\r\n\r\n"));
  std::optional<Response> second = client.Read();
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->body, "hello world");
  ASSERT_NE(second->Header("connection"), nullptr);
  EXPECT_EQ(*second->Header("connection"), "close");
  EXPECT_TRUE(client.ReadEof());
}

TEST_F(H1ConnectionTest, ConnectionCloseIsHonoured) {
  RawClient client(port());
  ASSERT_TRUE(
      client.Send("GET /fixed HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                  "GET /fixed HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->body, "hello world");
  ASSERT_NE(r->Header("connection"), nullptr);
  EXPECT_EQ(*r->Header("connection"), "close");
  EXPECT_TRUE(client.ReadEof());
  EXPECT_EQ(log_.heads().size(), 1u);  // the request after it was not served
}

TEST_F(H1ConnectionTest, ConnectIsAnswered405) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 405);
  EXPECT_TRUE(client.ReadEof());
  EXPECT_TRUE(log_.heads().empty());
}

TEST_F(H1ConnectionTest, UpgradeToH2cIsIgnored) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      "GET /fixed HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
      "HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nGET /echo/after HTTP/1.1\r\nHost: t\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "hello world");
  std::optional<Response> after = client.Read();
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->status, 200);
  const std::vector<RequestHead> heads = log_.heads();
  ASSERT_EQ(heads.size(), 2u);
  EXPECT_THAT(heads[0].headers, ElementsAre(Pair("host", "t")));
}

TEST_F(H1ConnectionTest, MissingHostIsAnswered400) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /fixed HTTP/1.1\r\n\r\n"));
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 400);
  EXPECT_THAT(r->body, HasSubstr("Host"));
  EXPECT_TRUE(client.ReadEof());
}

TEST_F(H1ConnectionTest, ResetFromDispatchClosesTheConnection) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("GET /reset HTTP/1.1\r\nHost: t\r\n\r\n"));
  EXPECT_TRUE(client.ReadEof());
  EXPECT_EQ(client.unparsed(), "");
  EXPECT_TRUE(log_.AwaitEvent("closed /reset false"));
}

TEST_F(H1ConnectionTest, AnswerFromTheDispatcherKeepsTheConnection) {
  RawClient client(port());
  ASSERT_TRUE(client.Send(
      "POST /reject HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET /fixed HTTP/1.1\r\n"
      "Host: t\r\n\r\n"));
  std::optional<Response> rejected = client.Read();
  ASSERT_TRUE(rejected.has_value());
  EXPECT_EQ(rejected->status, 404);
  EXPECT_EQ(rejected->body, "nothing here\n");
  std::optional<Response> next = client.Read();
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->body, "hello world");
}

TEST_F(H1ConnectionTest, AnswerBeforeTheBodyEndsClosesAfterTheResponse) {
  RawClient client(port());
  ASSERT_TRUE(client.Send("POST /hold/early HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab"));
  ASSERT_TRUE(log_.AwaitEvent("dispatch /hold/early"));
  OnLoop([&] {
    TestHandler* h = Handler("/hold/early");
    ASSERT_NE(h, nullptr);
    ServerStream* s = h->stream();
    s->SendHeaders(413, {{"content-length", "4"}}, false);
    s->SendData("big\n", true);
  });
  std::optional<Response> r = client.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 413);
  EXPECT_EQ(r->body, "big\n");
  EXPECT_TRUE(client.ReadEof());
  EXPECT_TRUE(log_.AwaitEvent("closed /hold/early true"));
}

}  // namespace
}  // namespace montage::gateway
