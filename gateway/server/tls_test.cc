// TLS on the downstream listener against real sockets on loopback: a Listener on port 0 with a
// certificate made for the test, one worker loop and a dispatcher whose handlers answer with the
// scheme they saw. Clients are libcurl (HTTP/2 through ALPN, HTTP/1.1) and a small blocking
// OpenSSL client where the handshake or the bytes on the wire matter.
#include <curl/curl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gateway/server/listener.h"
#include "gateway/server/tls_context.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::gateway {
namespace {

using ::testing::HasSubstr;

constexpr size_t kWindow = 64 << 10;
// How long anything may take before the test gives up: a guard against hanging, not a measure.
constexpr absl::Duration kPatience = absl::Seconds(20);

// ---- Certificates made for the test ------------------------------------------------------------

struct PkeyDeleter {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
struct X509Deleter {
  void operator()(X509* cert) const { X509_free(cert); }
};

bool WritePem(const std::string& path, const std::function<int(std::FILE*)>& write) {
  std::FILE* file = std::fopen(path.c_str(), "w");
  if (file == nullptr) return false;
  const bool ok = write(file) == 1;
  return std::fclose(file) == 0 && ok;
}

// A P-256 key in PEM at `key_path`; with `cert_path`, also a self-signed certificate for
// localhost and 127.0.0.1, valid for a day.
bool MakeKeyAndCertificate(const std::string& key_path, const std::string& cert_path) {
  std::unique_ptr<EVP_PKEY, PkeyDeleter> key(EVP_EC_gen("P-256"));
  if (key == nullptr) return false;
  if (!WritePem(key_path, [&](std::FILE* f) {
        return PEM_write_PrivateKey(f, key.get(), nullptr, nullptr, 0, nullptr, nullptr);
      })) {
    return false;
  }
  if (cert_path.empty()) return true;
  std::unique_ptr<X509, X509Deleter> cert(X509_new());
  X509_set_version(cert.get(), X509_VERSION_3);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -60);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 24 * 3600);
  X509_set_pubkey(cert.get(), key.get());
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("localhost"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, cert.get(), cert.get(), nullptr, nullptr, 0);
  X509_EXTENSION* san =
      X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
  if (san == nullptr) return false;
  X509_add_ext(cert.get(), san, -1);
  X509_EXTENSION_free(san);
  if (X509_sign(cert.get(), key.get(), EVP_sha256()) == 0) return false;
  return WritePem(cert_path, [&](std::FILE* f) { return PEM_write_X509(f, cert.get()); });
}

// ---- The server side ---------------------------------------------------------------------------

class TestHandler;

// What the handlers saw, shared with the test thread.
class Shared {
 public:
  void Dispatched(const RequestHead& head) {
    absl::MutexLock lock(&mu_);
    heads_.push_back(head);
  }
  std::vector<RequestHead> heads() {
    absl::MutexLock lock(&mu_);
    return heads_;
  }
  void Received(size_t bytes) {
    absl::MutexLock lock(&mu_);
    received_ = bytes;
  }
  bool AwaitReceived(size_t bytes) {
    absl::MutexLock lock(&mu_);
    auto reached = [&] {
      mu_.AssertHeld();
      return received_ >= bytes;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kPatience);
  }
  bool AwaitDispatched(size_t streams) {
    absl::MutexLock lock(&mu_);
    auto reached = [&] {
      mu_.AssertHeld();
      return heads_.size() >= streams;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kPatience);
  }
  void Closed() {
    absl::MutexLock lock(&mu_);
    ++closed_;
  }
  bool AwaitClosed(int streams) {
    absl::MutexLock lock(&mu_);
    auto reached = [&] {
      mu_.AssertHeld();
      return closed_ >= streams;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kPatience);
  }

  // The live /sink handler; loop thread only.
  TestHandler* sink = nullptr;

 private:
  absl::Mutex mu_;
  std::vector<RequestHead> heads_ ABSL_GUARDED_BY(mu_);
  size_t received_ ABSL_GUARDED_BY(mu_) = 0;
  int closed_ ABSL_GUARDED_BY(mu_) = 0;
};

// Answers "<scheme> <body bytes>" with content-length, except
//   /large?<n>  n bytes of 'x' in one SendData
//   /sink       holds its body (consumes nothing) until Release()
class TestHandler final : public StreamHandler {
 public:
  TestHandler(Shared& shared, ServerStream& stream) : shared_(shared), stream_(&stream) {
    if (stream.head().path == "/sink") shared_.sink = this;
  }
  ~TestHandler() override {
    if (shared_.sink == this) shared_.sink = nullptr;
  }

  // From the test, on the loop: consume what is held and everything that follows.
  void Release() {
    released_ = true;
    stream_->ConsumeRequestData(held_);
    held_ = 0;
  }

  void OnRequestData(absl::string_view data, bool end_stream) override {
    received_ += data.size();
    if (stream_->head().path == "/sink" && !released_) {
      held_ += data.size();
    } else {
      stream_->ConsumeRequestData(data.size());
    }
    shared_.Received(received_);
    if (!end_stream) return;
    const std::string& path = stream_->head().path;
    std::string body = absl::StrCat(stream_->head().scheme, " ", received_);
    if (absl::StartsWith(path, "/large?")) {
      body.assign(std::stoul(path.substr(7)), 'x');
    }
    stream_->SendHeaders(200, {{"content-length", std::to_string(body.size())}}, false);
    stream_->SendData(body, /*end_stream=*/true);
  }

  void OnStreamClosed(bool) override {
    stream_ = nullptr;
    shared_.Closed();
  }

 private:
  Shared& shared_;
  ServerStream* stream_;
  size_t received_ = 0;
  size_t held_ = 0;
  bool released_ = false;
};

class TestDispatcher final : public StreamDispatcher {
 public:
  explicit TestDispatcher(Shared& shared) : shared_(shared) {}
  std::unique_ptr<StreamHandler> Dispatch(ServerStream& stream) override {
    shared_.Dispatched(stream.head());
    return std::make_unique<TestHandler>(shared_, stream);
  }

 private:
  Shared& shared_;
};

// ---- Clients -----------------------------------------------------------------------------------

int ConnectLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  // Blocking, but never forever.
  timeval patience{static_cast<time_t>(absl::ToInt64Seconds(kPatience)), 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof(patience));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &patience, sizeof(patience));
  return fd;
}

// A blocking OpenSSL client that does not verify the server (the tests here are about the
// server's side of the handshake). Not thread-safe.
class TlsClient {
 public:
  // `alpn`: the protocols to offer, in ALPN's wire format; empty offers none.
  TlsClient(int port, const std::string& alpn) {
    ctx_ = SSL_CTX_new(TLS_client_method());
    fd_ = ConnectLoopback(port);
    if (ctx_ == nullptr || fd_ < 0) return;
    ssl_ = SSL_new(ctx_);
    SSL_set_fd(ssl_, fd_);
    if (!alpn.empty()) {
      SSL_set_alpn_protos(ssl_, reinterpret_cast<const unsigned char*>(alpn.data()),
                          static_cast<unsigned int>(alpn.size()));
    }
    handshaken_ = SSL_connect(ssl_) == 1;
    ERR_clear_error();
  }
  ~TlsClient() {
    if (ssl_ != nullptr) SSL_free(ssl_);
    if (fd_ >= 0) close(fd_);
    if (ctx_ != nullptr) SSL_CTX_free(ctx_);
  }

  bool handshaken() const { return handshaken_; }
  std::string alpn() const { return std::string(NegotiatedAlpn(ssl_)); }

  bool Write(absl::string_view bytes) {
    size_t written = 0;
    return SSL_write_ex(ssl_, bytes.data(), bytes.size(), &written) == 1 && written == bytes.size();
  }
  // Sends close_notify (our side is done; the server's may still send).
  void Shutdown() { SSL_shutdown(ssl_); }

  // Everything until the server closes. `clean`: it ended with close_notify.
  std::string ReadToEnd(bool* clean) {
    std::string out;
    char buffer[1 << 16];
    for (;;) {
      size_t n = 0;
      if (SSL_read_ex(ssl_, buffer, sizeof(buffer), &n) == 1) {
        out.append(buffer, n);
        continue;
      }
      *clean = SSL_get_error(ssl_, 0) == SSL_ERROR_ZERO_RETURN;
      ERR_clear_error();
      return out;
    }
  }

 private:
  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
  bool handshaken_ = false;
};

// ALPN's wire format for one protocol.
std::string Alpn(absl::string_view protocol) {
  return absl::StrCat(std::string(1, static_cast<char>(protocol.size())), protocol);
}

struct CurlResult {
  CURLcode code = CURLE_OK;
  long status = 0;
  long http_version = 0;
  std::string body;
};

size_t AppendTo(char* data, size_t size, size_t count, void* out) {
  static_cast<std::string*>(out)->append(data, size * count);
  return size * count;
}

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
using CurlHandle = std::unique_ptr<CURL, CurlDeleter>;

// ---- The fixture -------------------------------------------------------------------------------

class TlsListenerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // As in the gateway (Gateway::Start): a write to a client that has gone must not end the
    // process. OpenSSL writes to the socket without MSG_NOSIGNAL.
    signal(SIGPIPE, SIG_IGN);
    static std::once_flag once;
    std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
    std::string pattern = ::testing::TempDir() + "tls_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr) << std::strerror(errno);
    dir_ = new std::string(pattern);
    ASSERT_TRUE(MakeKeyAndCertificate(Path("key.pem"), Path("cert.pem")));
    ASSERT_TRUE(MakeKeyAndCertificate(Path("other_key.pem"), ""));
  }
  static void TearDownTestSuite() {
    std::error_code ignored;
    std::filesystem::remove_all(*dir_, ignored);
    delete dir_;
    dir_ = nullptr;
  }
  static std::string Path(absl::string_view name) { return absl::StrCat(*dir_, "/", name); }

  static config::DownstreamTls Tls(std::vector<std::string> alpn = {}) {
    config::DownstreamTls tls;
    tls.certificate_chain_file = Path("cert.pem");
    tls.private_key_file = Path("key.pem");
    tls.alpn_protocols = std::move(alpn);
    return tls;
  }

  void SetUp() override {
    absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Start("tls-test");
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = *std::move(loop);
    // Once the loop has run something it can be stopped at any time (EventLoop's destructor
    // cannot stop a loop that has not started running yet).
    OnLoop([] {});
  }

  void TearDown() override {
    listener_.reset();
    loop_.reset();
  }

  absl::Status StartListener(const std::optional<config::DownstreamTls>& tls) {
    CodecOptions options;
    options.initial_stream_window = kWindow;
    absl::StatusOr<std::unique_ptr<Listener>> listener =
        Listener::Start("127.0.0.1:0", {loop_.get()}, dispatcher_, options, tls);
    if (!listener.ok()) return listener.status();
    listener_ = *std::move(listener);
    return absl::OkStatus();
  }

  int port() const { return listener_->port(); }
  std::string Url(absl::string_view path) const {
    return absl::StrCat("https://127.0.0.1:", port(), path);
  }

  // A transfer that verifies the server against the test's certificate.
  CurlResult Get(absl::string_view path, long http_version) {
    CurlHandle curl(curl_easy_init());
    CurlResult r;
    const std::string url = Url(path);
    const std::string ca = Path("cert.pem");
    curl_easy_setopt(curl.get(), CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl.get(), CURLOPT_HTTP_VERSION, http_version);
    curl_easy_setopt(curl.get(), CURLOPT_CAINFO, ca.c_str());
    curl_easy_setopt(curl.get(), CURLOPT_WRITEFUNCTION, &AppendTo);
    curl_easy_setopt(curl.get(), CURLOPT_WRITEDATA, &r.body);
    curl_easy_setopt(curl.get(), CURLOPT_TIMEOUT_MS,
                     static_cast<long>(absl::ToInt64Milliseconds(kPatience)));
    r.code = curl_easy_perform(curl.get());
    curl_easy_getinfo(curl.get(), CURLINFO_RESPONSE_CODE, &r.status);
    curl_easy_getinfo(curl.get(), CURLINFO_HTTP_VERSION, &r.http_version);
    return r;
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

  static std::string* dir_;
  Shared shared_;
  TestDispatcher dispatcher_{shared_};
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Listener> listener_;
};

std::string* TlsListenerTest::dir_ = nullptr;

// ---- Protocol selection ------------------------------------------------------------------------

TEST_F(TlsListenerTest, Http2IsChosenByAlpn) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  const CurlResult r = Get("/hello", CURL_HTTP_VERSION_2TLS);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.http_version, CURL_HTTP_VERSION_2_0);
  EXPECT_EQ(r.body, "https 0");
  const std::vector<RequestHead> heads = shared_.heads();
  ASSERT_EQ(heads.size(), 1u);
  EXPECT_TRUE(heads[0].http2);
  EXPECT_EQ(heads[0].scheme, "https");
  EXPECT_EQ(heads[0].path, "/hello");
}

TEST_F(TlsListenerTest, Http11WhenTheClientAsksForIt) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  const CurlResult r = Get("/hello", CURL_HTTP_VERSION_1_1);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.http_version, CURL_HTTP_VERSION_1_1);
  EXPECT_EQ(r.body, "https 0");
  const std::vector<RequestHead> heads = shared_.heads();
  ASSERT_EQ(heads.size(), 1u);
  EXPECT_FALSE(heads[0].http2);
  EXPECT_EQ(heads[0].scheme, "https");
}

TEST_F(TlsListenerTest, Http11WhenTheListenerOffersOnlyThat) {
  ASSERT_TRUE(StartListener(Tls({"http/1.1"})).ok());
  const CurlResult r = Get("/hello", CURL_HTTP_VERSION_2TLS);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.http_version, CURL_HTTP_VERSION_1_1);
  EXPECT_EQ(r.body, "https 0");
}

TEST_F(TlsListenerTest, ListenerPreferenceOrderWins) {
  ASSERT_TRUE(StartListener(Tls({"http/1.1", "h2"})).ok());
  TlsClient client(port(), Alpn("h2") + Alpn("http/1.1"));
  ASSERT_TRUE(client.handshaken());
  EXPECT_EQ(client.alpn(), "http/1.1");
}

TEST_F(TlsListenerTest, NoCommonProtocolMeansNoAlpnAndHttp11) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  TlsClient client(port(), Alpn("spdy/3") + Alpn("foo"));
  ASSERT_TRUE(client.handshaken());
  EXPECT_EQ(client.alpn(), "");
  ASSERT_TRUE(client.Write("GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"));
  bool clean = false;
  const std::string response = client.ReadToEnd(&clean);
  EXPECT_THAT(response, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(response, HasSubstr("\r\n\r\nhttps 0"));
}

TEST_F(TlsListenerTest, WithoutAlpnTheHttp2PrefaceIsSniffed) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  CurlHandle curl(curl_easy_init());
  std::string body;
  const std::string url = Url("/sniffed");
  curl_easy_setopt(curl.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl.get(), CURLOPT_SSL_ENABLE_ALPN, 0L);
  curl_easy_setopt(curl.get(), CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
  curl_easy_setopt(curl.get(), CURLOPT_SSL_VERIFYPEER, 0L);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEFUNCTION, &AppendTo);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(curl.get(), CURLOPT_TIMEOUT_MS,
                   static_cast<long>(absl::ToInt64Milliseconds(kPatience)));
  const CURLcode code = curl_easy_perform(curl.get());
  ASSERT_EQ(code, CURLE_OK) << curl_easy_strerror(code);
  long version = 0;
  curl_easy_getinfo(curl.get(), CURLINFO_HTTP_VERSION, &version);
  EXPECT_EQ(version, CURL_HTTP_VERSION_2_0);
  EXPECT_EQ(body, "https 0");
}

TEST_F(TlsListenerTest, CleartextListenerStillSaysHttp) {
  ASSERT_TRUE(StartListener(std::nullopt).ok());
  CurlHandle curl(curl_easy_init());
  std::string body;
  const std::string url = absl::StrCat("http://127.0.0.1:", port(), "/plain");
  curl_easy_setopt(curl.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl.get(), CURLOPT_WRITEFUNCTION, &AppendTo);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEDATA, &body);
  const CURLcode code = curl_easy_perform(curl.get());
  ASSERT_EQ(code, CURLE_OK) << curl_easy_strerror(code);
  EXPECT_EQ(body, "http 0");
}

// ---- Bodies in both directions ------------------------------------------------------------------

TEST_F(TlsListenerTest, LargeResponsesArriveWhole) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  constexpr size_t kSize = 4 << 20;
  for (long version : {CURL_HTTP_VERSION_2TLS, CURL_HTTP_VERSION_1_1}) {
    const CurlResult r = Get(absl::StrCat("/large?", kSize), version);
    ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
    EXPECT_EQ(r.body.size(), kSize) << "version " << version;
  }
}

TEST_F(TlsListenerTest, HeldRequestBodyResumesOnceConsumed) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  // More than the handler's window plus what the codec buffers (1 MiB), so that reading stops
  // while the handler holds its window, then has to resume.
  const std::string body((1 << 20) + 3 * kWindow + 123, 'b');
  TlsClient client(port(), Alpn("http/1.1"));
  ASSERT_TRUE(client.handshaken());
  const std::string request =
      absl::StrCat("POST /sink HTTP/1.1\r\nHost: localhost\r\nContent-Length: ", body.size(),
                   "\r\nConnection: close\r\n\r\n", body);
  // The client blocks while the server holds back; it is not touched from here meanwhile.
  bool written = false;
  std::thread writer([&] { written = client.Write(request); });
  ASSERT_TRUE(shared_.AwaitReceived(kWindow));
  OnLoop([&] {
    ASSERT_NE(shared_.sink, nullptr);
    shared_.sink->Release();
  });
  writer.join();
  ASSERT_TRUE(written);
  bool clean = false;
  const std::string response = client.ReadToEnd(&clean);
  EXPECT_THAT(response, HasSubstr(absl::StrCat("\r\n\r\nhttps ", body.size())));
}

// ---- Closing -----------------------------------------------------------------------------------

TEST_F(TlsListenerTest, ConnectionCloseEndsWithCloseNotify) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  TlsClient client(port(), Alpn("http/1.1"));
  ASSERT_TRUE(client.handshaken());
  ASSERT_TRUE(client.Write("GET /bye HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"));
  bool clean = false;
  const std::string response = client.ReadToEnd(&clean);
  EXPECT_THAT(response, HasSubstr("\r\n\r\nhttps 0"));
  EXPECT_TRUE(clean) << "the server closed without close_notify";
}

TEST_F(TlsListenerTest, ClientCloseNotifyBeforeTheResponseIsRead) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  constexpr size_t kSize = 8 << 20;  // more than the socket buffers take at once
  TlsClient client(port(), Alpn("http/1.1"));
  ASSERT_TRUE(client.handshaken());
  ASSERT_TRUE(
      client.Write(absl::StrCat("GET /large?", kSize, " HTTP/1.1\r\nHost: localhost\r\n\r\n")));
  // The response is queued, and more of it than the socket takes, when the server reads the
  // close_notify.
  ASSERT_TRUE(shared_.AwaitDispatched(1));
  client.Shutdown();
  bool clean = false;
  const std::string response = client.ReadToEnd(&clean);
  EXPECT_THAT(response, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_GE(response.size(), kSize);
  EXPECT_TRUE(clean) << "the server closed without close_notify";
  EXPECT_TRUE(shared_.AwaitClosed(1));
}

TEST_F(TlsListenerTest, PlaintextOnTheTlsPortIsClosedAndServingGoesOn) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  const int fd = ConnectLoopback(port());
  ASSERT_GE(fd, 0);
  const std::string request = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
  ASSERT_EQ(send(fd, request.data(), request.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(request.size()));
  // Whatever comes back (at most a TLS alert), the server closes the connection.
  char buffer[4096];
  ssize_t n;
  size_t total = 0;
  while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) total += static_cast<size_t>(n);
  EXPECT_TRUE(n == 0 || errno == ECONNRESET) << std::strerror(errno);
  EXPECT_LT(total, 100u);
  close(fd);
  EXPECT_TRUE(shared_.heads().empty());

  const CurlResult r = Get("/after", CURL_HTTP_VERSION_2TLS);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.body, "https 0");
}

TEST_F(TlsListenerTest, ClientLeavingMidHandshakeIsHarmless) {
  ASSERT_TRUE(StartListener(Tls()).ok());
  for (int i = 0; i < 3; ++i) {
    const int fd = ConnectLoopback(port());
    ASSERT_GE(fd, 0);
    if (i == 1) send(fd, "\x16\x03\x01", 3, MSG_NOSIGNAL);  // the start of a ClientHello
    close(fd);
  }
  const CurlResult r = Get("/after", CURL_HTTP_VERSION_1_1);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.body, "https 0");
}

// ---- Start-up errors
// -----------------------------------------------------------------------------

TEST_F(TlsListenerTest, MissingCertificateFileIsNotFoundAndNamed) {
  config::DownstreamTls tls = Tls();
  tls.certificate_chain_file = Path("nowhere.pem");
  const absl::Status status = StartListener(tls);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_THAT(status.message(), HasSubstr(Path("nowhere.pem")));
}

TEST_F(TlsListenerTest, MissingKeyFileIsNotFoundAndNamed) {
  config::DownstreamTls tls = Tls();
  tls.private_key_file = Path("no_key.pem");
  const absl::Status status = StartListener(tls);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_THAT(status.message(), HasSubstr(Path("no_key.pem")));
}

TEST_F(TlsListenerTest, GarbageCertificateIsInvalidAndNamed) {
  ASSERT_TRUE(WritePem(Path("garbage.pem"), [](std::FILE* f) {
    return std::fputs("not a certificate\n", f) >= 0 ? 1 : 0;
  }));
  config::DownstreamTls tls = Tls();
  tls.certificate_chain_file = Path("garbage.pem");
  const absl::Status status = StartListener(tls);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(Path("garbage.pem")));
}

TEST_F(TlsListenerTest, CertificateAsKeyIsInvalidAndNamed) {
  config::DownstreamTls tls = Tls();
  tls.private_key_file = Path("cert.pem");
  const absl::Status status = StartListener(tls);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr("private key file '" + Path("cert.pem")));
}

TEST_F(TlsListenerTest, KeyOfAnotherCertificateIsInvalid) {
  config::DownstreamTls tls = Tls();
  tls.private_key_file = Path("other_key.pem");
  const absl::Status status = StartListener(tls);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(Path("other_key.pem")));
}

TEST_F(TlsListenerTest, UnknownAlpnProtocolIsInvalid) {
  const absl::Status status = StartListener(Tls({"h2", "spdy/3"}));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr("spdy/3"));
}

}  // namespace
}  // namespace montage::gateway
