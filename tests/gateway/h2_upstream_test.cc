// The gateway's direct HTTP/2 upstream path (gateway/proxy/h2_upstream.h) against real servers on
// loopback: the echo backend (a gRPC server), Debian's nghttpd (HTTP/2 that is not gRPC) and a
// port nobody listens on.
#include "gateway/proxy/h2_upstream.h"

#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <future>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gateway/proxy/upstream.h"
#include "gateway/server/event_loop.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "montage/testing/v1/echo.pb.h"
#include "tests/gateway/echo_backend.h"
#include "tests/gateway/test_support.h"
#include "tests/testing/unused_port.h"

namespace montage::gateway {
namespace {

using ::testing::Contains;
using testing::EchoBackend;
using ::testing::HasSubstr;
using testing::v1::EchoRequest;
using testing::v1::EchoResponse;

TEST(GrpcTimeoutHeaderTest, FinestUnitThatFitsEightDigitsRoundedUp) {
  EXPECT_EQ(GrpcTimeoutHeader(absl::Milliseconds(1500)), "1500000u");
  EXPECT_EQ(GrpcTimeoutHeader(absl::Nanoseconds(1)), "1u");
  EXPECT_EQ(GrpcTimeoutHeader(absl::Nanoseconds(1001)), "2u");
  EXPECT_EQ(GrpcTimeoutHeader(absl::ZeroDuration()), "1u");
  EXPECT_EQ(GrpcTimeoutHeader(-absl::Seconds(3)), "1u");
  EXPECT_EQ(GrpcTimeoutHeader(absl::Seconds(200)), "200000m");
  EXPECT_EQ(GrpcTimeoutHeader(absl::Hours(200)), "720000S");
  EXPECT_EQ(GrpcTimeoutHeader(absl::Hours(1000000)), "60000000M");
  // Saturated at absl's int64 nanoseconds, without overflowing.
  EXPECT_EQ(GrpcTimeoutHeader(absl::InfiniteDuration()), "2562048H");
}

TEST(PercentDecodeGrpcMessageTest, DecodesEscapesAndKeepsBrokenOnes) {
  EXPECT_EQ(PercentDecodeGrpcMessage("100%25 gone%0Areally"), "100% gone\nreally");
  EXPECT_EQ(PercentDecodeGrpcMessage("caf%C3%A9"), "caf\xc3\xa9");
  EXPECT_EQ(PercentDecodeGrpcMessage("%zz and %4"), "%zz and %4");
  EXPECT_EQ(PercentDecodeGrpcMessage("%"), "%");
}

TEST(StatusMappingTest, HttpAndHttp2ErrorsMapAsGrpcClientsMapThem) {
  EXPECT_EQ(GrpcCodeForHttpStatus(400), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(GrpcCodeForHttpStatus(401), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(GrpcCodeForHttpStatus(403), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(GrpcCodeForHttpStatus(404), grpc::StatusCode::UNIMPLEMENTED);
  for (int code : {429, 502, 503, 504}) {
    EXPECT_EQ(GrpcCodeForHttpStatus(code), grpc::StatusCode::UNAVAILABLE) << code;
  }
  EXPECT_EQ(GrpcCodeForHttpStatus(500), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(GrpcCodeForH2Error(0x7), grpc::StatusCode::UNAVAILABLE);  // REFUSED_STREAM
  EXPECT_EQ(GrpcCodeForH2Error(0x8), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(GrpcCodeForH2Error(0xb), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(GrpcCodeForH2Error(0xc), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(GrpcCodeForH2Error(0x2), grpc::StatusCode::INTERNAL);
}

// A loop, a pool on it and a one-host STATIC cluster; calls are started and awaited from the test
// thread.
class H2UpstreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // As the gateway does (Gateway::Start): libevent writes with writev, and an upstream that
    // closed first must cost an EPIPE, not the process.
    signal(SIGPIPE, SIG_IGN);
    auto loop = EventLoop::Start("h2-test");
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = *std::move(loop);
    pool_ = std::make_unique<H2UpstreamPool>(*loop_);
  }
  void TearDown() override {
    OnLoop([&] { pool_.reset(); });
    loop_.reset();
  }

  void UseHost(int port, uint32_t max_pending_requests = 1024,
               std::optional<absl::Duration> keepalive = std::nullopt) {
    config::Cluster c;
    c.circuit_breakers.max_pending_requests = max_pending_requests;
    if (keepalive.has_value()) {
      c.http2_options.keepalive_interval = *keepalive;
      c.http2_options.keepalive_timeout = *keepalive * 2;
    }
    c.name = "backend";
    c.type = config::Cluster::Type::kStatic;
    c.connect_timeout = absl::Seconds(2);
    c.http2 = true;
    config::SocketAddress a;
    a.address = "127.0.0.1";
    a.port_value = port;
    c.endpoints.push_back(a);
    auto cluster = Cluster::Create(c, 1);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = *std::move(cluster);
    ASSERT_NE(cluster_->hosts()[0]->direct_address(), nullptr);
  }

  // Runs `fn` on the loop and waits for it.
  template <typename Fn>
  void OnLoop(Fn fn) {
    std::promise<void> done;
    loop_->Post([&] {
      fn();
      done.set_value();
    });
    done.get_future().wait();
  }

  H2UnaryRequest Request(const EchoRequest& message, absl::Duration timeout = absl::Seconds(10)) {
    H2UnaryRequest r;
    r.method = "/montage.testing.v1.EchoService/Unary";
    r.deadline = absl::Now() + timeout;
    r.message = message.SerializeAsString();
    return r;
  }

  // Starts a call; the future resolves with its result.
  std::future<UnaryResult> Start(H2UnaryRequest request,
                                 std::unique_ptr<H2UnaryCall>* handle = nullptr) {
    auto promise = std::make_shared<std::promise<UnaryResult>>();
    std::future<UnaryResult> future = promise->get_future();
    OnLoop([&] {
      std::unique_ptr<H2UnaryCall> call = pool_->Start(
          *cluster_, *cluster_->hosts()[0], std::move(request), [this, promise](UnaryResult& r) {
            reports_.fetch_add(1);
            promise->set_value(std::move(r));
          });
      if (handle != nullptr) {
        *handle = std::move(call);
      } else {
        calls_.push_back(std::move(call));
      }
    });
    return future;
  }

  UnaryResult Call(H2UnaryRequest request) {
    std::future<UnaryResult> f = Start(std::move(request));
    EXPECT_EQ(f.wait_for(std::chrono::seconds(30)), std::future_status::ready);
    return f.get();
  }

  size_t Connections() {
    size_t n = 0;
    OnLoop([&] { n = pool_->connection_count(); });
    return n;
  }

  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<H2UpstreamPool> pool_;
  std::unique_ptr<Cluster> cluster_;
  std::vector<std::unique_ptr<H2UnaryCall>> calls_;  // loop thread
  std::atomic<int> reports_{0};
};

TEST_F(H2UpstreamTest, UnaryCallCarriesMessageMetadataAndDeadline) {
  auto backend = EchoBackend::Start();
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  EchoRequest req;
  req.set_message("ping");
  H2UnaryRequest request = Request(req, absl::Seconds(5));
  request.metadata = {{"x-custom", "hello"}, {"x-blob-bin", std::string("\x00\x01\xff", 3)}};
  UnaryResult r = Call(std::move(request));
  ASSERT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
  EchoResponse resp;
  ASSERT_TRUE(resp.ParseFromString(r.response));
  EXPECT_EQ(resp.message(), "ping");
  EXPECT_THAT(resp.metadata(), Contains("x-custom=hello"));
  EXPECT_THAT(resp.metadata(), Contains("x-blob-bin=AAH/"));  // binary arrived intact
  // grpc-timeout reached the backend as its deadline.
  EXPECT_GT(resp.deadline_ms(), 0);
  EXPECT_LE(resp.deadline_ms(), 5000);
}

TEST_F(H2UpstreamTest, ErrorsKeepCodeAndDecodedMessage) {
  auto backend = EchoBackend::Start();
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  EchoRequest req;
  req.set_fail_code(grpc::StatusCode::NOT_FOUND);
  req.set_fail_message("no such thing: 100% gone\nreally");
  UnaryResult r = Call(Request(req));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(r.status.error_message(), "no such thing: 100% gone\nreally");
  EXPECT_TRUE(r.response.empty());
}

TEST_F(H2UpstreamTest, ConcurrentCallsShareOneConnection) {
  auto backend = EchoBackend::Start();
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  std::vector<std::future<UnaryResult>> futures;
  for (int i = 0; i < 50; ++i) {
    EchoRequest req;
    req.set_message(absl::StrCat("m", i));
    req.mutable_delay()->set_nanos(50 * 1000 * 1000);
    futures.push_back(Start(Request(req)));
  }
  for (int i = 0; i < 50; ++i) {
    ASSERT_EQ(futures[i].wait_for(std::chrono::seconds(30)), std::future_status::ready);
    UnaryResult r = futures[i].get();
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EchoResponse resp;
    ASSERT_TRUE(resp.ParseFromString(r.response));
    EXPECT_EQ(resp.message(), absl::StrCat("m", i));
  }
  EXPECT_EQ(Connections(), 1u);
  EXPECT_EQ((*backend)->calls(), 50);
}

TEST_F(H2UpstreamTest, DeadlineResetsTheStreamAndTheBackendSeesTheCancel) {
  auto backend = EchoBackend::Start();
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  EchoRequest req;
  req.mutable_delay()->set_seconds(20);
  UnaryResult r = Call(Request(req, absl::Milliseconds(200)));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 0; }));
  // The connection stays usable.
  EchoRequest ok;
  ok.set_message("after");
  EXPECT_TRUE(Call(Request(ok)).status.ok());
  EXPECT_EQ(Connections(), 1u);
}

TEST_F(H2UpstreamTest, CancelReachesTheBackendAndDropsTheReport) {
  auto backend = EchoBackend::Start();
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  EchoRequest req;
  req.mutable_delay()->set_seconds(20);
  std::unique_ptr<H2UnaryCall> handle;
  std::future<UnaryResult> f = Start(Request(req), &handle);
  ASSERT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 1; }));
  OnLoop([&] { handle->Cancel(); });
  EXPECT_TRUE(testing::Eventually([&] { return (*backend)->cancellations() >= 1; }));
  EXPECT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 0; }));
  // The stream is gone: whatever the backend answered to the reset is not reported.
  OnLoop([&] { handle.reset(); });
  OnLoop([] {});
  EXPECT_EQ(reports_.load(), 0);
  (void)f;
}

TEST_F(H2UpstreamTest, NobodyListeningIsUnavailableAndALaterBackendIsReached) {
  UseHost(testing::UnusedLoopbackPort());
  UnaryResult r = Call(Request(EchoRequest()));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(r.status.error_message(), HasSubstr("connection failure"));
  EXPECT_EQ(Connections(), 0u);
  // A backend that comes up on that port is reached by the next call.
  const auto* address =
      reinterpret_cast<const sockaddr_in*>(&cluster_->hosts()[0]->direct_address()->storage);
  auto backend = EchoBackend::Start(ntohs(address->sin_port));
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_TRUE(Call(Request(EchoRequest())).status.ok());
}

TEST_F(H2UpstreamTest, BackendGoingAwayFailsCallsInFlightAsUnavailable) {
  auto backend = EchoBackend::Start();
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  EchoRequest req;
  req.mutable_delay()->set_seconds(20);
  std::future<UnaryResult> f = Start(Request(req));
  ASSERT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 1; }));
  (*backend)->Shutdown();
  ASSERT_EQ(f.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  UnaryResult r = f.get();
  // The backend cancelled its call as it stopped (CANCELLED from the server, or the connection
  // went away first).
  EXPECT_FALSE(r.status.ok());
  EXPECT_TRUE(r.status.error_code() == grpc::StatusCode::UNAVAILABLE ||
              r.status.error_code() == grpc::StatusCode::CANCELLED)
      << r.status.error_code() << " " << r.status.error_message();
  EXPECT_TRUE(testing::Eventually([&] { return Connections() == 0; }));
}

TEST_F(H2UpstreamTest, RequestsWaitingForAStreamAreBoundedByMaxPendingRequests) {
  // Two streams at a time upstream; one request may wait for a stream.
  auto backend = EchoBackend::Start(0, /*max_concurrent_streams=*/2);
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port(), /*max_pending_requests=*/1);
  // Two calls that hold both streams until this test lets them go (cancels them).
  EchoRequest held;
  held.mutable_delay()->set_seconds(600);
  std::unique_ptr<H2UnaryCall> a, b;
  Start(Request(held, absl::Seconds(600)), &a);
  Start(Request(held, absl::Seconds(600)), &b);
  ASSERT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 2; }));
  EchoRequest quick;
  quick.set_message("waited");
  std::future<UnaryResult> waiting = Start(Request(quick));  // waits for a stream
  std::future<UnaryResult> over = Start(Request(quick));     // over the pending limit
  ASSERT_EQ(over.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  UnaryResult refused = over.get();
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("max_pending_requests"));
  EXPECT_EQ(cluster_->stats().upstream_rq_pending_overflow.load(), 1u);
  // Still waiting, as long as both streams are held.
  EXPECT_EQ(waiting.wait_for(std::chrono::seconds(0)), std::future_status::timeout);
  OnLoop([&] { a->Cancel(); });  // a stream frees: the waiting request takes it
  ASSERT_EQ(waiting.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  UnaryResult served = waiting.get();
  EXPECT_TRUE(served.status.ok()) << served.status.error_message();
  // The pending slot is free again.
  EXPECT_TRUE(Call(Request(quick)).status.ok());
  EXPECT_EQ(cluster_->stats().upstream_rq_pending_overflow.load(), 1u);
  OnLoop([&] {  // calls belong to the loop
    a.reset();
    b.reset();
  });
}

TEST_F(H2UpstreamTest, ADeadlineEndsARequestStillWaitingForAStream) {
  auto backend = EchoBackend::Start(0, /*max_concurrent_streams=*/1);
  ASSERT_TRUE(backend.ok()) << backend.status();
  UseHost((*backend)->port());
  // Holds the only stream until this test cancels it.
  EchoRequest held;
  held.mutable_delay()->set_seconds(600);
  std::unique_ptr<H2UnaryCall> busy;
  Start(Request(held, absl::Seconds(600)), &busy);
  ASSERT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 1; }));
  // Waits behind `busy` for the only stream, and times out there, while it is still taken.
  UnaryResult waited = Call(Request(EchoRequest(), absl::Milliseconds(200)));
  EXPECT_EQ(waited.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ((*backend)->in_flight(), 1);
  OnLoop([&] { busy.reset(); });  // cancels it
  EXPECT_TRUE(testing::Eventually([&] { return (*backend)->in_flight() == 0; }));
}

TEST_F(H2UpstreamTest, AnUpstreamThatStopsAnsweringPingsIsDropped) {
  // A TCP listener that accepts and never speaks: the connection is up, nothing answers.
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 4), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  UseHost(ntohs(addr.sin_port), 1024, absl::Milliseconds(50));
  UnaryResult r = Call(Request(EchoRequest(), absl::Seconds(25)));
  close(listener);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), HasSubstr("keepalive timeout"));
  EXPECT_TRUE(testing::Eventually([&] { return Connections() == 0; }));
}

// nghttpd (Debian's nghttp2-server) speaks HTTP/2 but not gRPC: its 404 without grpc-status is
// UNIMPLEMENTED, as gRPC's client maps it.
TEST_F(H2UpstreamTest, PlainHttp2ServerAnswerMapsByHttpStatus) {
  const int port = testing::UnusedLoopbackPort();
  char dir_template[] = "/tmp/montage-nghttpd-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const std::string port_arg = std::to_string(port);
    execlp("nghttpd", "nghttpd", "--no-tls", "--address=127.0.0.1", "-d", dir.c_str(),
           port_arg.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  UseHost(port);
  // nghttpd may take a moment to listen: a refused connect is UNAVAILABLE, so ask again.
  UnaryResult r;
  ASSERT_TRUE(testing::Eventually([&] {
    r = Call(Request(EchoRequest()));
    return r.status.error_code() != grpc::StatusCode::UNAVAILABLE;
  })) << r.status.error_message();
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(r.status.error_message(), HasSubstr("HTTP 404"));
}

}  // namespace
}  // namespace montage::gateway
