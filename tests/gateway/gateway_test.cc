// A real `montaged gateway` in front of the echo backend: native gRPC in all four shapes,
// statuses, deadlines, cancellation, metadata, gRPC-Web, a backend that goes away and returns.
#include <curl/curl.h>

#include <algorithm>
#include <fstream>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "montage/testing/v1/echo.grpc.pb.h"
#include "tests/gateway/echo_backend.h"
#include "tests/gateway/test_support.h"
#include "tests/integration/montaged_process.h"

namespace montage::testing {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using v1::EchoRequest;
using v1::EchoResponse;

std::string Bootstrap(int backend_port) {
  TestBootstrap b;
  b.ports = {backend_port};
  b.route_prefix = "/montage.testing.v1.EchoService/";
  b.grpc_web = true;
  b.descriptors = ECHO_DESCRIPTORS;
  b.services = {"montage.testing.v1.EchoService"};
  b.transcoder_extra = R"(              convert_grpc_status: true
              max_request_body_size: 65536
              request_validation_options:
                reject_unknown_method: true
)";
  return TestBootstrapYaml(b);
}

// Every test runs twice: unary calls over the gateway's own HTTP/2 connections (the default) and
// through gRPC's client library (gateway.unary_via_grpc_client); both must behave the same.
std::string TransportArg(bool via_grpc_client) {
  return absl::StrCat("--set=gateway.unary_via_grpc_client=", via_grpc_client ? "true" : "false");
}
std::string TransportName(const ::testing::TestParamInfo<bool>& info) {
  return info.param ? "ViaGrpcClient" : "DirectH2";
}

class GatewayTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    auto backend = EchoBackend::Start();
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
    const std::string dir = MakeTempDir();
    bootstrap_path_ = dir + "/envoy.yaml";
    std::ofstream(bootstrap_path_) << Bootstrap(backend_->port());
    auto gateway = MontagedProcess::Start(
        {"gateway", absl::StrCat("--set=gateway.envoy_bootstrap=", bootstrap_path_),
         TransportArg(GetParam())});
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = *std::move(gateway);
    address_ = gateway_->endpoint("gateway");
    ASSERT_FALSE(address_.empty()) << "the port file names no gateway";
    stub_ =
        v1::EchoService::NewStub(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    stub_.reset();
    if (gateway_ != nullptr) {
      ProcessResult r = gateway_->Stop();
      EXPECT_TRUE(r.exited && r.exit_code == 0) << "signal " << r.signal << "\n" << gateway_->log();
    }
  }

  std::unique_ptr<EchoBackend> backend_;
  std::unique_ptr<MontagedProcess> gateway_;
  std::string bootstrap_path_;
  std::string address_;
  std::unique_ptr<v1::EchoService::Stub> stub_;
};

TEST_P(GatewayTest, UnaryPassesMessageAndHeadersBothWays) {
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(10));
  ctx.AddMetadata("x-custom", "hello");
  ctx.AddMetadata("x-blob-bin", std::string("\x00\x01\xff", 3));
  EchoRequest req;
  req.set_message("ping");
  EchoResponse resp;
  grpc::Status s = stub_->Unary(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
  EXPECT_EQ(resp.message(), "ping");
  EXPECT_THAT(resp.metadata(), Contains("x-custom=hello"));
  EXPECT_THAT(resp.metadata(), Contains("x-blob-bin=AAH/"));
  EXPECT_THAT(resp.metadata(), Contains("x-forwarded-for=127.0.0.1"));
  bool has_request_id = false;
  for (const auto& m : resp.metadata()) has_request_id |= absl::StartsWith(m, "x-request-id=");
  EXPECT_TRUE(has_request_id);
  // The route's 30 s timeout became the upstream deadline (the caller's 10 s is earlier).
  EXPECT_GT(resp.deadline_ms(), 0);
  EXPECT_LE(resp.deadline_ms(), 10000);
  const auto& initial = ctx.GetServerInitialMetadata();
  EXPECT_EQ(initial.count("x-envoy-upstream-service-time"), 1u);
  EXPECT_EQ(initial.count("x-request-id"), 1u);
}

TEST_P(GatewayTest, ServerStreamingDeliversEveryMessageInOrder) {
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  EchoRequest req;
  req.set_message("s");
  req.set_repeat(50);
  req.set_payload_bytes(1000);
  auto reader = stub_->ServerStream(&ctx, req);
  EchoResponse resp;
  int n = 0;
  while (reader->Read(&resp)) {
    EXPECT_EQ(resp.index(), n);
    EXPECT_EQ(resp.payload().size(), 1000u);
    ++n;
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(n, 50);
}

TEST_P(GatewayTest, ClientStreamingAndBidi) {
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    EchoResponse resp;
    auto writer = stub_->ClientStream(&ctx, &resp);
    for (const char* m : {"a", "b", "c"}) {
      EchoRequest req;
      req.set_message(m);
      ASSERT_TRUE(writer->Write(req));
    }
    writer->WritesDone();
    grpc::Status s = writer->Finish();
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.message(), "a,b,c");
    EXPECT_EQ(resp.index(), 3);
  }
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    auto stream = stub_->Bidi(&ctx);
    for (int i = 0; i < 4; ++i) {
      EchoRequest req;
      req.set_message(absl::StrCat("m", i));
      ASSERT_TRUE(stream->Write(req));
      EchoResponse resp;
      ASSERT_TRUE(stream->Read(&resp));
      EXPECT_EQ(resp.message(), absl::StrCat("m", i));
      EXPECT_EQ(resp.index(), i);
    }
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
}

TEST_P(GatewayTest, StatusesPassThroughIncludingMidStream) {
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    EchoRequest req;
    req.set_fail_code(grpc::StatusCode::NOT_FOUND);
    req.set_fail_message("no such thing: 100% gone\nreally");
    EchoResponse resp;
    grpc::Status s = stub_->Unary(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(s.error_message(), "no such thing: 100% gone\nreally");
  }
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    EchoRequest req;
    req.set_repeat(5);
    req.set_fail_code(grpc::StatusCode::RESOURCE_EXHAUSTED);
    req.set_fail_message("quota");
    req.set_fail_after(2);
    auto reader = stub_->ServerStream(&ctx, req);
    EchoResponse resp;
    int n = 0;
    while (reader->Read(&resp)) ++n;
    grpc::Status s = reader->Finish();
    EXPECT_EQ(n, 2);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_EQ(s.error_message(), "quota");
  }
}

TEST_P(GatewayTest, DeadlinePassesThroughAndCancelsTheBackend) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  EchoRequest req;
  req.mutable_delay()->set_seconds(20);
  EchoResponse resp;
  grpc::Status s = stub_->Unary(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(Eventually([&] { return backend_->cancellations() >= 1; }));
  EXPECT_TRUE(Eventually([&] { return backend_->in_flight() == 0; }));
}

TEST_P(GatewayTest, ClientCancellationReachesTheBackend) {
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(30));
  EchoRequest req;
  req.set_repeat(2);
  req.mutable_delay()->set_seconds(20);
  auto reader = stub_->ServerStream(&ctx, req);
  ASSERT_TRUE(Eventually([&] { return backend_->in_flight() == 1; }));
  ctx.TryCancel();
  EchoResponse resp;
  EXPECT_FALSE(reader->Read(&resp));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(Eventually([&] { return backend_->cancellations() == 1; }));
  EXPECT_TRUE(Eventually([&] { return backend_->in_flight() == 0; }));
}

TEST_P(GatewayTest, UnknownRouteIsUnimplemented) {
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  grpc::ByteBuffer request, response;
  grpc::Slice empty("", 0);
  request = grpc::ByteBuffer(&empty, 1);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  generic.UnaryCall(&ctx, "/montage.nowhere.v1.Nothing/Call", grpc::StubOptions(), &request,
                    &response, [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      status = s;
                      done = true;
                      cv.notify_all();
                    });
  std::unique_lock<std::mutex> lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(20), [&] { return done; }));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(status.error_message(), HasSubstr("no route"));
}

TEST_P(GatewayTest, BackendGoneIsUnavailableAndRecoveryFollowsItsReturn) {
  const int port = backend_->port();
  backend_.reset();
  grpc::Status s;
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext ctx;
    WithDeadline(ctx, absl::Seconds(10));
    EchoRequest req;
    EchoResponse resp;
    s = stub_->Unary(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  }
  auto back = EchoBackend::Start(port);
  ASSERT_TRUE(back.ok()) << back.status();
  backend_ = *std::move(back);
  EXPECT_TRUE(Eventually(
      [&] {
        grpc::ClientContext ctx;
        WithDeadline(ctx, absl::Seconds(5));
        EchoRequest req;
        req.set_message("back");
        EchoResponse resp;
        return stub_->Unary(&ctx, req, &resp).ok() && resp.message() == "back";
      },
      absl::Seconds(20)));
}

// gRPC-Web over HTTP/2 with prior knowledge (curl), binary and base64 text.
struct WebAnswer {
  long status = 0;
  std::string content_type;
  std::string body;
};

size_t Collect(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

WebAnswer PostGrpcWeb(const std::string& address, const std::string& path,
                      const std::string& content_type, const std::string& body,
                      const std::vector<std::string>& extra_headers = {}) {
  WebAnswer answer;
  CURL* curl = curl_easy_init();
  const std::string url = absl::StrCat("http://", address, path);
  curl_slist* headers = nullptr;
  headers = curl_slist_append(headers, absl::StrCat("content-type: ", content_type).c_str());
  headers = curl_slist_append(headers, "x-grpc-web: 1");
  for (const std::string& h : extra_headers) headers = curl_slist_append(headers, h.c_str());
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Collect);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &answer.body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 20L);
  if (curl_easy_perform(curl) == CURLE_OK) {
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &answer.status);
    char* ct = nullptr;
    curl_easy_getinfo(curl, CURLINFO_CONTENT_TYPE, &ct);
    if (ct != nullptr) answer.content_type = ct;
  }
  curl_slist_free_all(headers);
  curl_easy_cleanup(curl);
  return answer;
}

std::string Frame(uint8_t flags, const std::string& payload) {
  std::string out(5, '\0');
  out[0] = static_cast<char>(flags);
  const uint32_t n = payload.size();
  out[1] = static_cast<char>(n >> 24);
  out[2] = static_cast<char>(n >> 16);
  out[3] = static_cast<char>(n >> 8);
  out[4] = static_cast<char>(n);
  return out + payload;
}

// Splits a gRPC-Web body into (flags, payload) frames.
std::vector<std::pair<uint8_t, std::string>> Frames(const std::string& body) {
  std::vector<std::pair<uint8_t, std::string>> out;
  size_t at = 0;
  while (body.size() - at >= 5) {
    const auto* p = reinterpret_cast<const unsigned char*>(body.data() + at);
    const size_t n = (size_t{p[1]} << 24) | (size_t{p[2]} << 16) | (size_t{p[3]} << 8) | p[4];
    if (body.size() - at - 5 < n) break;
    out.emplace_back(p[0], body.substr(at + 5, n));
    at += 5 + n;
  }
  EXPECT_EQ(at, body.size()) << "trailing bytes after the last frame";
  return out;
}

TEST_P(GatewayTest, GrpcWebBinaryAndTextCarryMessagesAndTrailerFrame) {
  EchoRequest req;
  req.set_message("web");
  req.set_repeat(3);
  const std::string body = Frame(0, req.SerializeAsString());

  WebAnswer binary = PostGrpcWeb(address_, "/montage.testing.v1.EchoService/ServerStream",
                                 "application/grpc-web+proto", body);
  ASSERT_EQ(binary.status, 200);
  EXPECT_EQ(binary.content_type, "application/grpc-web+proto");
  auto frames = Frames(binary.body);
  ASSERT_EQ(frames.size(), 4u);
  for (int i = 0; i < 3; ++i) {
    EchoResponse resp;
    ASSERT_TRUE(resp.ParseFromString(frames[i].second));
    EXPECT_EQ(frames[i].first, 0);
    EXPECT_EQ(resp.message(), "web");
    EXPECT_EQ(resp.index(), i);
  }
  EXPECT_EQ(frames[3].first, 0x80);
  EXPECT_THAT(frames[3].second, HasSubstr("grpc-status:0\r\n"));

  WebAnswer text = PostGrpcWeb(address_, "/montage.testing.v1.EchoService/ServerStream",
                               "application/grpc-web-text", absl::Base64Escape(body));
  ASSERT_EQ(text.status, 200);
  EXPECT_EQ(text.content_type, "application/grpc-web-text+proto");
  // Each frame is base64 on its own; decode piece by piece at the padding.
  std::string decoded;
  size_t start = 0;
  while (start < text.body.size()) {
    size_t end = start;
    while (end < text.body.size()) {
      end += 4;
      if (text.body[end - 1] == '=') break;
    }
    std::string piece;
    ASSERT_TRUE(absl::Base64Unescape(text.body.substr(start, end - start), &piece));
    decoded += piece;
    start = end;
  }
  auto text_frames = Frames(decoded);
  ASSERT_EQ(text_frames.size(), 4u);
  EXPECT_EQ(text_frames[3].first, 0x80);

  // An error arrives in the trailer frame.
  EchoRequest failing;
  failing.set_fail_code(grpc::StatusCode::PERMISSION_DENIED);
  failing.set_fail_message("denied");
  WebAnswer error =
      PostGrpcWeb(address_, "/montage.testing.v1.EchoService/Unary", "application/grpc-web+proto",
                  Frame(0, failing.SerializeAsString()));
  ASSERT_EQ(error.status, 200);
  auto error_frames = Frames(error.body);
  ASSERT_EQ(error_frames.size(), 1u);
  EXPECT_THAT(error_frames[0].second, HasSubstr("grpc-status:7\r\n"));
  EXPECT_THAT(error_frames[0].second, HasSubstr("grpc-message:denied\r\n"));
}

TEST_P(GatewayTest, HeadersGrpcCannotCarryAreDroppedNotFatal) {
  EchoRequest req;
  req.set_message("still here");
  WebAnswer answer = PostGrpcWeb(address_, "/montage.testing.v1.EchoService/Unary",
                                 "application/grpc-web+proto", Frame(0, req.SerializeAsString()),
                                 {"x-name: caf\xc3\xa9", "x-tab: a\tb", "x-ok: fine"});
  ASSERT_EQ(answer.status, 200);
  auto frames = Frames(answer.body);
  ASSERT_EQ(frames.size(), 2u);
  EchoResponse resp;
  ASSERT_TRUE(resp.ParseFromString(frames[0].second));
  EXPECT_EQ(resp.message(), "still here");
  EXPECT_THAT(resp.metadata(), Contains("x-ok=fine"));
  for (const auto& m : resp.metadata()) {
    EXPECT_FALSE(absl::StartsWith(m, "x-name=")) << m;
    EXPECT_FALSE(absl::StartsWith(m, "x-tab=")) << m;
  }
  EXPECT_THAT(frames[1].second, HasSubstr("grpc-status:0\r\n"));
}

// The upstream ends a bidi call while the client still has its side open: the client gets the
// status at once (the proxy must not wait for the client to finish writing).
TEST_P(GatewayTest, UpstreamEndingFirstReachesAnIdleClient) {
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(20));
  auto stream = stub_->Bidi(&ctx);
  EchoRequest req;
  req.set_fail_code(grpc::StatusCode::FAILED_PRECONDITION);
  req.set_fail_message("stop here");
  ASSERT_TRUE(stream->Write(req));
  EchoResponse resp;
  EXPECT_FALSE(stream->Read(&resp));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_EQ(s.error_message(), "stop here");
}

// A REST call with libcurl (HTTP/2 prior knowledge, or HTTP/1.1).
struct RestAnswer {
  long status = 0;
  std::string content_type;
  std::string body;
};

RestAnswer Rest(const std::string& address, const std::string& method, const std::string& path,
                const std::string& body = "", std::vector<std::string> headers = {},
                bool http2 = true) {
  RestAnswer answer;
  CURL* curl = curl_easy_init();
  const std::string url = absl::StrCat("http://", address, path);
  curl_slist* list = nullptr;
  if (!body.empty()) headers.push_back("content-type: application/json");
  for (const std::string& h : headers) list = curl_slist_append(list, h.c_str());
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTP_VERSION,
                   http2 ? CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE : CURL_HTTP_VERSION_1_1);
  curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, list);
  if (!body.empty()) {
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
  }
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Collect);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &answer.body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 20L);
  if (curl_easy_perform(curl) == CURLE_OK) {
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &answer.status);
    char* ct = nullptr;
    curl_easy_getinfo(curl, CURLINFO_CONTENT_TYPE, &ct);
    if (ct != nullptr) answer.content_type = ct;
  }
  curl_slist_free_all(list);
  curl_easy_cleanup(curl);
  return answer;
}

TEST_P(GatewayTest, RestUnaryByBodyAndByPath) {
  RestAnswer post = Rest(address_, "POST", "/v1/echo", R"({"message":"from json"})");
  ASSERT_EQ(post.status, 200) << post.body;
  EXPECT_EQ(post.content_type, "application/json");
  EXPECT_THAT(post.body, HasSubstr(R"("message":"from json")"));
  EXPECT_THAT(post.body, HasSubstr("x-envoy-original-path=/v1/echo"));

  RestAnswer get = Rest(address_, "GET", "/v1/echo/hello%20there?repeat=3");
  ASSERT_EQ(get.status, 200) << get.body;
  EXPECT_THAT(get.body, HasSubstr(R"("message":"hello there")"));
}

TEST_P(GatewayTest, RestErrorsFollowEnvoysStatusTable) {
  RestAnswer missing = Rest(address_, "POST", "/v1/echo", R"({"failCode":5,"failMessage":"gone"})");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(missing.content_type, "application/json");
  EXPECT_THAT(missing.body, HasSubstr(R"("code":5)"));
  EXPECT_THAT(missing.body, HasSubstr(R"("message":"gone")"));

  RestAnswer busy = Rest(address_, "POST", "/v1/echo", R"({"failCode":14})");
  EXPECT_EQ(busy.status, 503);

  RestAnswer bad_json = Rest(address_, "POST", "/v1/echo", R"({"message": )");
  EXPECT_EQ(bad_json.status, 400);
  EXPECT_EQ(bad_json.content_type, "text/plain");

  RestAnswer unknown_method = Rest(address_, "DELETE", "/v1/echo");
  EXPECT_EQ(unknown_method.status, 404);

  RestAnswer unknown_query = Rest(address_, "GET", "/v1/echo/x?nope=1");
  EXPECT_EQ(unknown_query.status, 400);
  EXPECT_THAT(unknown_query.body, HasSubstr("nope"));

  const std::string big = absl::StrCat(R"({"message":")", std::string(70000, 'a'), R"("})");
  RestAnswer too_big = Rest(address_, "POST", "/v1/echo", big);
  EXPECT_EQ(too_big.status, 413);
  EXPECT_EQ(backend_->calls(), 2);  // only the two answered by the backend reached it
}

TEST_P(GatewayTest, RestServerStreamAsArrayNdjsonAndSse) {
  const std::string body = R"({"message":"s","repeat":3})";
  RestAnswer array = Rest(address_, "POST", "/v1/echo:stream", body);
  ASSERT_EQ(array.status, 200) << array.body;
  EXPECT_EQ(array.content_type, "application/json");
  ASSERT_FALSE(array.body.empty());
  EXPECT_EQ(array.body.front(), '[');
  EXPECT_EQ(array.body.back(), ']');
  EXPECT_THAT(array.body, HasSubstr(R"("index":2)"));

  RestAnswer ndjson =
      Rest(address_, "POST", "/v1/echo:stream", body, {"accept: application/x-ndjson"});
  ASSERT_EQ(ndjson.status, 200);
  EXPECT_EQ(ndjson.content_type, "application/x-ndjson");
  EXPECT_EQ(std::count(ndjson.body.begin(), ndjson.body.end(), '\n'), 3);

  RestAnswer sse = Rest(address_, "POST", "/v1/echo:stream", body, {"accept: text/event-stream"});
  ASSERT_EQ(sse.status, 200);
  EXPECT_EQ(sse.content_type, "text/event-stream");
  EXPECT_THAT(sse.body, HasSubstr("data: {"));
}

TEST_P(GatewayTest, RestMidStreamErrorIsTheLastElementNotATruncation) {
  const std::string body =
      R"({"message":"s","repeat":5,"failCode":8,"failMessage":"quota","failAfter":2})";
  RestAnswer array = Rest(address_, "POST", "/v1/echo:stream", body);
  ASSERT_EQ(array.status, 200);
  EXPECT_THAT(array.body, HasSubstr(R"({"error":{"code":8,"message":"quota")"));
  EXPECT_EQ(array.body.back(), ']');

  RestAnswer sse = Rest(address_, "POST", "/v1/echo:stream", body, {"accept: text/event-stream"});
  EXPECT_THAT(sse.body, HasSubstr("event: error\n"));

  // An error before the first message is an ordinary error answer.
  RestAnswer early =
      Rest(address_, "POST", "/v1/echo:stream", R"({"repeat":5,"failCode":7,"failMessage":"no"})");
  EXPECT_EQ(early.status, 403);
  EXPECT_THAT(early.body, HasSubstr(R"("code":7)"));
}

TEST_P(GatewayTest, RestClientDisconnectCancelsTheBackendCall) {
  std::thread client([&] {
    CURL* curl = curl_easy_init();
    const std::string url = absl::StrCat("http://", address_, "/v1/echo");
    const std::string body = R"({"message":"slow","delay":"20s"})";
    curl_slist* list = curl_slist_append(nullptr, "content-type: application/json");
    std::string sink;
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.c_str());
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Collect);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 500L);  // the client gives up and disconnects
    curl_easy_perform(curl);
    curl_slist_free_all(list);
    curl_easy_cleanup(curl);
  });
  client.join();
  EXPECT_TRUE(Eventually([&] { return backend_->cancellations() == 1; }));
  EXPECT_TRUE(Eventually([&] { return backend_->in_flight() == 0; }));
}

TEST_P(GatewayTest, TracesHaveASpanPerRequestAndPerUpstreamAttempt) {
  const std::string trace = "4bf92f3577b34da6a3ce929d0e0e4736";
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  ctx.AddMetadata("traceparent", absl::StrCat("00-", trace, "-00f067aa0ba902b7-01"));
  EchoRequest req;
  EchoResponse resp;
  ASSERT_TRUE(stub_->Unary(&ctx, req, &resp).ok());
  // The backend saw the same trace, with the gateway's upstream span as parent.
  std::string seen;
  for (const auto& m : resp.metadata()) {
    if (absl::StartsWith(m, "traceparent=")) seen = m;
  }
  EXPECT_THAT(seen, HasSubstr(absl::StrCat("-", trace, "-")));
  EXPECT_THAT(seen, ::testing::Not(HasSubstr("00f067aa0ba902b7")));
  std::string traces;
  ASSERT_TRUE(Eventually([&] {
    traces = HttpGet(gateway_->admin_address(), "/debug/traces").second;
    return absl::StrContains(traces, "upstream echo /montage.testing.v1.EchoService/Unary");
  })) << traces;
  EXPECT_THAT(traces, HasSubstr(trace));
  EXPECT_THAT(traces, HasSubstr("gateway POST /montage.testing.v1.EchoService/Unary"));
  EXPECT_THAT(traces, HasSubstr("00f067aa0ba902b7"));  // the caller's span is the parent
}

TEST_P(GatewayTest, AdminPagesUseEnvoysNames) {
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    EchoRequest req;
    EchoResponse resp;
    ASSERT_TRUE(stub_->Unary(&ctx, req, &resp).ok());
  }
  auto [status, stats] =
      HttpGet(gateway_->admin_address(), "/stats?filter=cluster.echo.upstream_rq");
  ASSERT_EQ(status, 200);
  EXPECT_THAT(stats, HasSubstr("cluster.echo.upstream_rq_total: 3\n"));
  EXPECT_THAT(stats, HasSubstr("cluster.echo.upstream_rq_200: 3\n"));
  EXPECT_THAT(stats, HasSubstr("cluster.echo.upstream_rq_2xx: 3\n"));
  EXPECT_THAT(stats, ::testing::Not(HasSubstr("membership")));  // the filter applies

  auto [jstatus, json] = HttpGet(gateway_->admin_address(), "/stats?format=json");
  ASSERT_EQ(jstatus, 200);
  EXPECT_THAT(json, HasSubstr(R"("name": "cluster.echo.upstream_rq_total")"));

  auto [pstatus, prom] = HttpGet(gateway_->admin_address(), "/stats/prometheus");
  ASSERT_EQ(pstatus, 200);
  EXPECT_THAT(prom, HasSubstr(R"(envoy_cluster_upstream_rq_total{envoy_cluster_name="echo"} 3)"));
  EXPECT_THAT(
      prom,
      HasSubstr(
          R"(envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="echo"} 3)"));
  EXPECT_THAT(prom,
              HasSubstr(R"(envoy_cluster_upstream_rq_time_count{envoy_cluster_name="echo"} 3)"));

  auto [cstatus, clusters] = HttpGet(gateway_->admin_address(), "/clusters");
  ASSERT_EQ(cstatus, 200);
  EXPECT_THAT(clusters, HasSubstr(absl::StrCat("echo::", backend_->address(), "::rq_total::3\n")));
  EXPECT_THAT(clusters,
              HasSubstr(absl::StrCat("echo::", backend_->address(), "::rq_success::3\n")));
  EXPECT_THAT(clusters, HasSubstr("::health_flags::healthy"));

  auto [bad, text] = HttpGet(gateway_->admin_address(), "/stats?filter=(");
  EXPECT_EQ(bad, 400);
}

// Several backends behind one cluster with health checks, outlier detection or circuit breakers.
std::string ClusterBootstrap(const std::vector<int>& ports, const std::string& cluster_extra,
                             std::string route_action = "",
                             std::vector<std::string> services = {}) {
  TestBootstrap b;
  b.ports = ports;
  b.descriptors = ECHO_DESCRIPTORS;
  b.services = {"montage.testing.v1.EchoService"};
  for (auto& s : services) b.services.push_back(std::move(s));
  if (!route_action.empty()) b.route_action = std::move(route_action);
  b.cluster_extra = cluster_extra;
  return TestBootstrapYaml(b);
}

INSTANTIATE_TEST_SUITE_P(Transports, GatewayTest, ::testing::Bool(), TransportName);

class GatewayUpstreamTest : public ::testing::TestWithParam<bool> {
 protected:
  void StartBackends(int n) {
    for (int i = 0; i < n; ++i) {
      auto b = EchoBackend::Start();
      ASSERT_TRUE(b.ok()) << b.status();
      backends_.push_back(*std::move(b));
    }
  }
  void StartGateway(const std::string& cluster_extra, std::vector<std::string> extra_args = {}) {
    std::vector<int> ports;
    for (auto& b : backends_) ports.push_back(b->port());
    const std::string path = MakeTempDir() + "/envoy.yaml";
    std::ofstream(path) << ClusterBootstrap(ports, cluster_extra);
    std::vector<std::string> args = {
        "gateway", absl::StrCat("--set=gateway.envoy_bootstrap=", path), TransportArg(GetParam())};
    for (auto& a : extra_args) args.push_back(std::move(a));
    auto gateway = MontagedProcess::Start(args);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = *std::move(gateway);
    stub_ = v1::EchoService::NewStub(
        grpc::CreateChannel(gateway_->endpoint("gateway"), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    stub_.reset();
    if (gateway_ != nullptr) {
      ProcessResult r = gateway_->Stop();
      EXPECT_TRUE(r.exited && r.exit_code == 0) << "signal " << r.signal << "\n" << gateway_->log();
    }
  }
  grpc::Status Call(EchoRequest req = {}) {
    grpc::ClientContext ctx;
    WithDeadline(ctx, absl::Seconds(10));
    EchoResponse resp;
    return stub_->Unary(&ctx, req, &resp);
  }
  std::string Clusters() { return HttpGet(gateway_->admin_address(), "/clusters").second; }
  std::string HostLine(int i, const std::string& what) {
    return absl::StrCat("echo::", backends_[i]->address(), "::", what);
  }

  std::vector<std::unique_ptr<EchoBackend>> backends_;
  std::unique_ptr<MontagedProcess> gateway_;
  std::unique_ptr<v1::EchoService::Stub> stub_;
};

TEST_P(GatewayUpstreamTest, FailingHealthChecksTakeAHostOutOfRotationAndBack) {
  StartBackends(2);
  StartGateway(R"(    health_checks:
    - timeout: 1s
      interval: 0.05s
      no_traffic_interval: 0.05s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check: {}
)");
  // Hosts take traffic once a first check passed.
  ASSERT_TRUE(Eventually([&] {
    const std::string c = Clusters();
    return absl::StrContains(c, HostLine(0, "health_flags::healthy")) &&
           absl::StrContains(c, HostLine(1, "health_flags::healthy"));
  })) << Clusters();
  backends_[0]->SetServing(false);
  ASSERT_TRUE(Eventually([&] {
    return absl::StrContains(Clusters(), HostLine(0, "health_flags::/failed_active_hc"));
  })) << Clusters();
  const int64_t calls0 = backends_[0]->calls();
  const int64_t calls1 = backends_[1]->calls();
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(Call().ok());
  EXPECT_EQ(backends_[0]->calls(), calls0);
  EXPECT_EQ(backends_[1]->calls(), calls1 + 20);
  backends_[0]->SetServing(true);
  EXPECT_TRUE(Eventually([&] {
    return absl::StrContains(Clusters(), HostLine(0, "health_flags::healthy"));
  })) << Clusters();
}

TEST_P(GatewayUpstreamTest, ConsecutiveFailuresEjectAHostUntilItsTimeIsUp) {
  StartBackends(2);
  StartGateway(R"(    outlier_detection:
      consecutive_5xx: 3
      interval: 0.1s
      base_ejection_time: 3s
      max_ejection_percent: 50
)");
  const int port0 = backends_[0]->port();
  backends_[0]->Shutdown();  // every call sent there now fails with UNAVAILABLE
  int failures = 0;
  for (int i = 0; i < 30; ++i) failures += Call().ok() ? 0 : 1;
  // Round robin sends every other call to the dead host until the third failure ejects it.
  EXPECT_EQ(failures, 3);
  EXPECT_THAT(Clusters(), HasSubstr(HostLine(0, "health_flags::/failed_outlier_check")));
  auto stats = HttpGet(gateway_->admin_address(), "/stats?filter=outlier").second;
  EXPECT_THAT(stats, HasSubstr("cluster.echo.outlier_detection.ejections_enforced_total: 1\n"));
  // The ejection ends by itself; the host is back (and serving again) afterwards.
  auto back = EchoBackend::Start(port0);
  ASSERT_TRUE(back.ok());
  backends_[0] = *std::move(back);
  EXPECT_TRUE(Eventually(
      [&] { return absl::StrContains(Clusters(), HostLine(0, "health_flags::healthy")); },
      absl::Seconds(20)))
      << Clusters();
  EXPECT_TRUE(Eventually([&] {
    Call();
    return backends_[0]->calls() > 0;
  }));
}

TEST_P(GatewayUpstreamTest, MaxRequestsRefusesTheOverflowAtOnce) {
  StartBackends(1);
  StartGateway(R"(    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_requests: 2
)");
  std::vector<std::thread> slow;
  for (int i = 0; i < 2; ++i) {
    slow.emplace_back([&] {
      EchoRequest req;
      req.mutable_delay()->set_seconds(3);
      EXPECT_TRUE(Call(req).ok());
    });
  }
  ASSERT_TRUE(Eventually([&] { return backends_[0]->in_flight() == 2; }));
  grpc::Status s = Call();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("max_requests"));
  for (auto& t : slow) t.join();
  auto stats = HttpGet(gateway_->admin_address(), "/stats?filter=overflow").second;
  EXPECT_THAT(stats, HasSubstr("cluster.echo.upstream_rq_pending_overflow: 1\n"));
  EXPECT_TRUE(Call().ok());  // the limit counts active requests only
}

TEST_P(GatewayUpstreamTest, RetriesGoElsewhereWithinTheRouteTimeout) {
  StartBackends(2);
  std::vector<int> ports = {backends_[0]->port(), backends_[1]->port()};
  const std::string yaml =
      ClusterBootstrap(ports, "",
                       "{ cluster: echo, timeout: 30s, retry_policy: { retry_on: "
                       "\"unavailable,connect-failure\", num_retries: 2 } }");
  const std::string path = MakeTempDir() + "/envoy.yaml";
  std::ofstream(path) << yaml;
  auto gateway =
      MontagedProcess::Start({"gateway", absl::StrCat("--set=gateway.envoy_bootstrap=", path)});
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  gateway_ = *std::move(gateway);
  stub_ = v1::EchoService::NewStub(
      grpc::CreateChannel(gateway_->endpoint("gateway"), grpc::InsecureChannelCredentials()));

  backends_[0]->Shutdown();  // half the first attempts fail to connect
  for (int i = 0; i < 10; ++i) {
    grpc::Status s = Call();
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  auto stats = HttpGet(gateway_->admin_address(), "/stats?filter=retry").second;
  EXPECT_THAT(stats, ::testing::ContainsRegex("cluster.echo.upstream_rq_retry: [1-9]"));
  EXPECT_THAT(stats, ::testing::ContainsRegex("cluster.echo.upstream_rq_retry_success: [1-9]"));

  // A status the backends themselves keep answering is retried num_retries times, then stands.
  const int port0 = backends_[0]->port();
  auto back = EchoBackend::Start(port0);
  ASSERT_TRUE(back.ok());
  backends_[0] = *std::move(back);
  ASSERT_TRUE(Eventually([&] {
    Call();
    return backends_[0]->calls() > 0;
  }));
  const int64_t before = backends_[0]->calls() + backends_[1]->calls();
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  EchoRequest req;
  req.set_fail_code(grpc::StatusCode::UNAVAILABLE);
  req.set_fail_message("busy");
  EchoResponse resp;
  grpc::Status s = stub_->Unary(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(backends_[0]->calls() + backends_[1]->calls() - before, 3);
  const auto& initial = ctx.GetServerInitialMetadata();
  auto attempts = initial.find("x-envoy-attempt-count");
  ASSERT_NE(attempts, initial.end());
  EXPECT_EQ(std::string(attempts->second.data(), attempts->second.size()), "3");
}

// x-envoy-* request headers and x-request-id count only from trusted callers.
TEST_P(GatewayUpstreamTest, EnvoyHeadersAreHonouredFromTrustedCallersOnly) {
  StartBackends(1);
  auto failing_call = [&](const std::string& request_id) {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ctx.AddMetadata("x-envoy-retry-grpc-on", "unavailable");
    ctx.AddMetadata("x-envoy-max-retries", "2");
    ctx.AddMetadata("x-request-id", request_id);
    EchoRequest req;
    req.set_fail_code(grpc::StatusCode::UNAVAILABLE);
    EchoResponse resp;
    grpc::Status s = stub_->Unary(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    const auto& md = ctx.GetServerInitialMetadata();
    auto id = md.find("x-request-id");
    return id == md.end() ? std::string() : std::string(id->second.data(), id->second.size());
  };
  StartGateway("");  // nobody trusted
  int64_t before = backends_[0]->calls();
  EXPECT_NE(failing_call("mine-1"), "mine-1");   // generated at the edge instead
  EXPECT_EQ(backends_[0]->calls() - before, 1);  // the retry headers were stripped
  TearDown();
  gateway_.reset();

  StartGateway("", {"--set=gateway.trusted_callers=127.0.0.1"});
  before = backends_[0]->calls();
  EXPECT_EQ(failing_call("mine-2"), "mine-2");
  EXPECT_EQ(backends_[0]->calls() - before, 3);  // 1 + x-envoy-max-retries
}

// The embedded default (`montaged all`): REST for every montage service, and fan-out.
INSTANTIATE_TEST_SUITE_P(Transports, GatewayUpstreamTest, ::testing::Bool(), TransportName);

TEST(GatewayEmbeddedTest, BatchFansOutThroughTheGatewayInRequestOrder) {
  auto all = MontagedProcess::Start({"all"});
  ASSERT_TRUE(all.ok()) << all.status();
  const std::string gateway = (*all)->endpoint("gateway");
  std::string items;
  for (int i = 0; i < 20; ++i) {
    absl::StrAppend(&items, i == 0 ? "" : ",", R"({"id":"set)", i,
                    R"(","http":"PUT /v1/cache/namespaces/default/entries/k)", i,
                    R"(","body":{"value":"aGk="}})");
  }
  absl::StrAppend(&items, R"(,{"id":"bad","method":"/no.Such/Method"})");
  RestAnswer answer =
      Rest(gateway, "POST", "/v1/batch", absl::StrCat(R"({"items":[)", items, R"(]})"));
  ASSERT_EQ(answer.status, 200) << answer.body;
  // Every item answered, in request order, the bad one with its own error.
  size_t at = 0;
  for (int i = 0; i < 20; ++i) {
    const size_t found = answer.body.find(absl::StrCat(R"("id":"set)", i, R"(")"), at);
    ASSERT_NE(found, std::string::npos) << i << ": " << answer.body;
    at = found;
  }
  EXPECT_THAT(answer.body, HasSubstr(R"("id":"bad","status":{"code":3)"));
  // The writes happened.
  RestAnswer read = Rest(gateway, "GET", "/v1/cache/namespaces/default/entries/k7");
  EXPECT_THAT(read.body, HasSubstr(R"("value":"aGk=")"));
  (*all)->Stop();
}

TEST(GatewayEmbeddedTest, ApiKeysAreCheckedBeforeAnyUpstreamCall) {
  setenv("MONTAGE_TEST_GATEWAY_KEYS", "s3cr3t-key-A, s3cr3t-key-B", 1);
  auto all =
      MontagedProcess::Start({"all", "--set=gateway.api_keys.env=MONTAGE_TEST_GATEWAY_KEYS"});
  ASSERT_TRUE(all.ok()) << all.status();
  const std::string gateway = (*all)->endpoint("gateway");
  RestAnswer none = Rest(gateway, "GET", "/v1/cache/stats", "", {}, /*http2=*/false);
  EXPECT_EQ(none.status, 401);
  EXPECT_THAT(none.body, HasSubstr("API key"));
  RestAnswer wrong = Rest(gateway, "GET", "/v1/cache/stats", "", {"x-api-key: nope"});
  EXPECT_EQ(wrong.status, 401);
  RestAnswer right = Rest(gateway, "GET", "/v1/cache/stats", "", {"x-api-key: s3cr3t-key-B"});
  EXPECT_EQ(right.status, 200) << right.body;
  RestAnswer bearer =
      Rest(gateway, "GET", "/v1/cache/stats", "", {"authorization: Bearer s3cr3t-key-A"});
  EXPECT_EQ(bearer.status, 200);
  // Items of a batch carry the caller's key through the gateway again.
  RestAnswer batch =
      Rest(gateway, "POST", "/v1/batch", R"({"items":[{"http":"GET /v1/cache/stats"}]})",
           {"x-api-key: s3cr3t-key-A"});
  EXPECT_EQ(batch.status, 200);
  EXPECT_THAT(batch.body, HasSubstr("maxBytes"));
  // Native gRPC: UNAUTHENTICATED without a key.
  auto channel = grpc::CreateChannel(gateway, grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    EXPECT_EQ(health->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ctx.AddMetadata("authorization", "Bearer s3cr3t-key-A");
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    EXPECT_TRUE(health->Check(&ctx, req, &resp).ok());
  }
  (*all)->Stop();
  EXPECT_THAT((*all)->log(), ::testing::Not(HasSubstr("s3cr3t")));
  unsetenv("MONTAGE_TEST_GATEWAY_KEYS");
}

// Descriptors read from a backend's reflection make its REST routes work with no descriptor
// file naming them.
TEST(GatewayReflectionTest, RestRoutesComeFromTheBackendsReflection) {
  auto backend = MontagedProcess::Start({"cache"});
  ASSERT_TRUE(backend.ok()) << backend.status();
  const std::string address = (*backend)->grpc_address();
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  // The cache service is in no descriptor file the gateway reads: only reflection knows it.
  const std::string yaml = ClusterBootstrap({port}, "", "", {"montage.cache.v1.CacheService"});
  const std::string dir = MakeTempDir();
  std::ofstream(dir + "/envoy.yaml") << yaml;
  std::ofstream(dir + "/montage.yaml") << "gateway:\n  envoy_bootstrap: " << dir
                                       << "/envoy.yaml\n  reflection:\n    - cluster: echo\n";
  auto gateway =
      MontagedProcess::Start({"gateway", absl::StrCat("--config=", dir, "/montage.yaml")});
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  RestAnswer stats = Rest((*gateway)->endpoint("gateway"), "GET", "/v1/cache/stats");
  EXPECT_EQ(stats.status, 200) << stats.body;
  EXPECT_THAT(stats.body, HasSubstr("maxBytes"));
  (*gateway)->Stop();
  (*backend)->Stop();
}

}  // namespace
}  // namespace montage::testing
