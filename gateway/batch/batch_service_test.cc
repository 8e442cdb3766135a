// BatchServiceImpl against real servers on loopback: the echo backend, a gateway in front of it
// (whose listener the items go through) and a gRPC server hosting the batch service. Ordering,
// per-item errors, REST items, limits, deadlines, streaming, cancellation and trace propagation.
#include "gateway/batch/batch_service.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gateway/config/bootstrap.h"
#include "gateway/gateway.h"
#include "gateway/proxy/rest_handler.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "montage/gateway/v1/batch.grpc.pb.h"
#include "tests/gateway/echo_backend.h"
#include "tests/gateway/test_support.h"

namespace montage::gateway {
namespace {

using ::montage::testing::EchoBackend;
using ::montage::testing::Eventually;
using ::montage::testing::TestBootstrap;
using ::montage::testing::TestBootstrapYaml;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using v1::BatchItem;
using v1::BatchItemResult;
using v1::BatchRequest;
using v1::BatchResponse;

constexpr char kUnary[] = "/montage.testing.v1.EchoService/Unary";

std::string BootstrapYaml(int backend_port) {
  TestBootstrap b;
  b.ports = {backend_port};
  b.route_prefix = "/montage.testing.v1.EchoService/";
  b.descriptors = ECHO_DESCRIPTORS;
  b.services = {"montage.testing.v1.EchoService"};
  return TestBootstrapYaml(b);
}

google::protobuf::Value Json(const std::string& json) {
  google::protobuf::Value value;
  EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(json, &value).ok()) << json;
  return value;
}

BatchItem* AddItem(BatchRequest& request, const std::string& id, const std::string& method,
                   const std::string& body_json) {
  BatchItem* item = request.add_items();
  item->set_id(id);
  item->set_method(method);
  if (!body_json.empty()) *item->mutable_body() = Json(body_json);
  return item;
}

std::string Field(const BatchItemResult& result, const std::string& name) {
  const auto& fields = result.body().struct_value().fields();
  auto it = fields.find(name);
  return it == fields.end() ? "" : it->second.string_value();
}

std::vector<std::string> Metadata(const BatchItemResult& result) {
  std::vector<std::string> out;
  const auto& fields = result.body().struct_value().fields();
  auto it = fields.find("metadata");
  if (it == fields.end()) return out;
  for (const auto& v : it->second.list_value().values()) out.push_back(v.string_value());
  return out;
}

void WithDeadline(grpc::ClientContext& ctx, absl::Duration d = absl::Seconds(30)) {
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + d));
}

class BatchServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto backend = EchoBackend::Start();
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);

    absl::StatusOr<config::Bootstrap> bootstrap =
        config::ParseBootstrap(BootstrapYaml(backend_->port()), "batch_test.yaml");
    ASSERT_TRUE(bootstrap.ok()) << bootstrap.status();
    for (const config::HttpFilter& f : bootstrap->listeners[0].http.http_filters) {
      if (f.type != config::HttpFilter::Type::kGrpcJsonTranscoder) continue;
      auto rest = RestSettings::Load(f.transcoder, /*reject_unknown_fields=*/false, 1 << 20);
      ASSERT_TRUE(rest.ok()) << rest.status();
      rest_ = *std::move(rest);
    }
    ASSERT_NE(rest_, nullptr);
    GatewayOptions options;
    // The batch's sub-calls come from loopback; as in montaged, the gateway trusts them (so the
    // caller's x-request-id survives the second pass through the listener).
    options.trusted_callers = {"127.0.0.1"};
    auto gateway = Gateway::Start(*std::move(bootstrap), options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = *std::move(gateway);

    service_ = std::make_unique<BatchServiceImpl>();
    BatchTranscoding transcoding;
    transcoding.table = rest_->table.get();
    transcoding.transcoder = rest_->transcoder.get();
    transcoding.request = rest_->request;
    transcoding.print = rest_->print;
    service_->SetTarget(
        grpc::CreateChannel(gateway_->listener_addresses()[0], grpc::InsecureChannelCredentials()),
        transcoding);
    StartServer(service_.get());
  }

  void StartServer(BatchServiceImpl* service) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::BatchService::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    stub_.reset();
    if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    server_.reset();
    gateway_.reset();
    service_.reset();
    rest_.reset();
    backend_.reset();
  }

  grpc::Status Batch(const BatchRequest& request, BatchResponse* response,
                     absl::Duration deadline = absl::Seconds(30)) {
    grpc::ClientContext ctx;
    WithDeadline(ctx, deadline);
    return stub_->Batch(&ctx, request, response);
  }

  std::unique_ptr<EchoBackend> backend_;
  std::unique_ptr<RestSettings> rest_;
  std::unique_ptr<Gateway> gateway_;
  std::unique_ptr<BatchServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::BatchService::Stub> stub_;
};

TEST_F(BatchServiceTest, ResultsComeInRequestOrder) {
  BatchRequest request;
  // The first finishes last.
  AddItem(request, "slow", kUnary, R"({"message":"a","delay":"0.3s"})");
  AddItem(request, "fast", kUnary, R"({"message":"b"})");
  AddItem(request, "middle", "montage.testing.v1.EchoService.Unary",
          R"({"message":"c","delay":"0.1s"})");
  BatchResponse response;
  grpc::Status status = Batch(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 3);
  const std::vector<std::string> ids = {"slow", "fast", "middle"};
  const std::vector<std::string> messages = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    const BatchItemResult& r = response.results(i);
    EXPECT_EQ(r.index(), static_cast<uint32_t>(i));
    EXPECT_EQ(r.id(), ids[i]);
    EXPECT_EQ(r.status().code(), 0) << r.status().message();
    EXPECT_EQ(Field(r, "message"), messages[i]);
    EXPECT_TRUE(r.has_latency());
  }
  EXPECT_GE(response.results(0).latency().nanos() + response.results(0).latency().seconds() * 1e9,
            300e6);
}

TEST_F(BatchServiceTest, ItemErrorsDoNotFailTheBatch) {
  BatchRequest request;
  AddItem(request, "ok", kUnary, R"({"message":"fine"})");
  AddItem(request, "bad", kUnary, R"({"failCode":5,"failMessage":"gone"})");
  BatchResponse response;
  grpc::Status status = Batch(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 2);
  EXPECT_EQ(response.results(0).status().code(), 0);
  EXPECT_EQ(Field(response.results(0), "message"), "fine");
  EXPECT_EQ(response.results(1).status().code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(response.results(1).status().message(), "gone");
  EXPECT_FALSE(response.results(1).has_body());
}

TEST_F(BatchServiceTest, RestItemsUseTheRoutes) {
  BatchRequest request;
  BatchItem* post = request.add_items();
  post->set_http("POST /v1/echo");
  *post->mutable_body() = Json(R"({"message":"posted"})");
  request.add_items()->set_http("GET /v1/echo/from%20path?payloadBytes=3");
  request.add_items()->set_http("GET /v1/nowhere");
  request.add_items()->set_http("GET /v1/echo/x?noSuchField=1");
  request.add_items()->set_http("nonsense");
  BatchResponse response;
  grpc::Status status = Batch(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 5);
  EXPECT_EQ(response.results(0).status().code(), 0) << response.results(0).status().message();
  EXPECT_EQ(Field(response.results(0), "message"), "posted");
  EXPECT_EQ(response.results(1).status().code(), 0) << response.results(1).status().message();
  EXPECT_EQ(Field(response.results(1), "message"), "from path");
  EXPECT_EQ(Field(response.results(1), "payload"), "eHh4");  // "xxx", base64
  for (int i : {2, 3, 4}) {
    EXPECT_EQ(response.results(i).status().code(), grpc::StatusCode::INVALID_ARGUMENT) << i;
    EXPECT_THAT(response.results(i).status().message(), HasSubstr(absl::StrCat("items[", i, "]")));
  }
  EXPECT_THAT(response.results(2).status().message(), HasSubstr("no REST method for GET"));
}

TEST_F(BatchServiceTest, BadItemsAreThatItemsInvalidArgument) {
  BatchRequest request;
  AddItem(request, "unknown", "/montage.testing.v1.EchoService/Nope", "");
  AddItem(request, "json", kUnary, R"({"repeat":"many"})");
  AddItem(request, "stream", "/montage.testing.v1.EchoService/ServerStream", "");
  request.add_items()->set_id("no target");
  AddItem(request, "timeout", kUnary, "")->mutable_timeout()->set_seconds(-1);
  AddItem(request, "good", kUnary, R"({"message":"still here"})");
  BatchResponse response;
  grpc::Status status = Batch(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 6);
  const std::vector<std::string> fields = {"items[0].method", "items[1].body", "items[2].method",
                                           "items[3]", "items[4].timeout"};
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(response.results(i).status().code(), grpc::StatusCode::INVALID_ARGUMENT) << i;
    EXPECT_THAT(response.results(i).status().message(), HasSubstr(fields[i]));
    // InvalidFieldError's google.rpc.BadRequest travels with it.
    EXPECT_EQ(response.results(i).status().details_size(), 1) << i;
  }
  EXPECT_EQ(response.results(5).status().code(), 0);
  EXPECT_EQ(Field(response.results(5), "message"), "still here");
  EXPECT_EQ(backend_->calls(), 1);
}

TEST_F(BatchServiceTest, TooManyItemsIsInvalidArgument) {
  BatchRequest request;
  for (int i = 0; i < 1001; ++i) AddItem(request, "", kUnary, "");
  BatchResponse response;
  grpc::Status status = Batch(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("items"));
  EXPECT_EQ(backend_->calls(), 0);
}

TEST_F(BatchServiceTest, EmptyBatchAnswersAtOnce) {
  BatchResponse response;
  grpc::Status status = Batch(BatchRequest(), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.results_size(), 0);
}

// The backend's in_flight() counts a call until its reactor is torn down, a little after its
// answer has left, so a sample where one wave hands over to the next may read above the limit.
// The limit is checked where it is exact: while the first wave runs (each item waits 1 s), the
// backend has seen exactly `max_concurrency` calls.
TEST_F(BatchServiceTest, ConcurrencyLimitIsHonoured) {
  BatchRequest request;
  request.set_max_concurrency(5);
  for (int i = 0; i < 10; ++i) {
    AddItem(request, absl::StrCat(i), kUnary, R"({"message":"m","delay":"1s"})");
  }
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  BatchResponse response;
  grpc::Status status;
  absl::Notification done;
  stub_->async()->Batch(&ctx, &request, &response, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  int64_t peak = 0;
  int64_t first_wave_calls = -1;
  const absl::Time limit = absl::Now() + absl::Seconds(30);
  while (!done.WaitForNotificationWithTimeout(absl::Milliseconds(1)) && absl::Now() < limit) {
    const int64_t in_flight = backend_->in_flight();
    if (in_flight >= 5 && first_wave_calls < 0) first_wave_calls = backend_->calls();
    peak = std::max(peak, in_flight);
  }
  ASSERT_TRUE(done.HasBeenNotified());
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(first_wave_calls, 5) << "calls the backend had seen when 5 were in flight";
  EXPECT_GE(peak, 5);
  EXPECT_EQ(backend_->calls(), 10);
  for (const BatchItemResult& r : response.results()) EXPECT_EQ(r.status().code(), 0);
}

TEST_F(BatchServiceTest, ItemDeadlineIsTheEarlierOfItsOwnAndTheCallers) {
  BatchRequest request;
  BatchItem* slow = AddItem(request, "slow", kUnary, R"({"delay":"5s"})");
  slow->mutable_timeout()->set_nanos(100'000'000);
  AddItem(request, "caller's", kUnary, R"({"message":"quick"})");
  BatchItem* own = AddItem(request, "own", kUnary, R"({"message":"quick"})");
  own->mutable_timeout()->set_seconds(2);
  BatchResponse response;
  grpc::Status status = Batch(request, &response, absl::Seconds(10));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.results(0).status().code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  ASSERT_EQ(response.results(1).status().code(), 0);
  ASSERT_EQ(response.results(2).status().code(), 0);
  // deadlineMs is an int64, which JSON writes as a string. gRPC rounds grpc-timeout up (a coarse
  // encoding) at each hop, hence the slack above the 10 s and 2 s.
  const auto deadline_ms = [](const BatchItemResult& r) {
    return std::stoll(r.body().struct_value().fields().at("deadlineMs").string_value());
  };
  EXPECT_GT(deadline_ms(response.results(1)), 3000);
  EXPECT_LE(deadline_ms(response.results(1)), 10500);
  EXPECT_GT(deadline_ms(response.results(2)), 0);
  EXPECT_LE(deadline_ms(response.results(2)), 2500);
  EXPECT_TRUE(Eventually([&] { return backend_->in_flight() == 0; }));
}

TEST_F(BatchServiceTest, ItemsCarryTheCallersTraceAndRequestId) {
  BatchRequest request;
  AddItem(request, "a", kUnary, "");
  AddItem(request, "b", kUnary, "");
  const std::string trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
  const std::string traceparent = "00-" + trace_id + "-00f067aa0ba902b7-01";
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  ctx.AddMetadata("traceparent", traceparent);
  ctx.AddMetadata("x-request-id", "batch-1");
  ctx.AddMetadata("x-private", "not forwarded");
  BatchResponse response;
  grpc::Status status = stub_->Batch(&ctx, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  for (const BatchItemResult& r : response.results()) {
    ASSERT_EQ(r.status().code(), 0);
    // The same trace (the gateway's own hop may make itself the parent span).
    EXPECT_THAT(Metadata(r), Contains(StartsWith("traceparent=00-" + trace_id + "-")));
    EXPECT_THAT(Metadata(r), Contains("x-request-id=batch-1"));
    EXPECT_THAT(Metadata(r), ::testing::Not(Contains("x-private=not forwarded")));
  }
}

TEST_F(BatchServiceTest, StreamBatchDeliversEveryIndexOnce) {
  BatchRequest request;
  request.set_max_concurrency(4);
  for (int i = 0; i < 20; ++i) {
    AddItem(request, absl::StrCat("item", i), kUnary,
            absl::StrCat(R"({"message":"m)", i, R"(","delay":")", (i * 7) % 5 * 0.02, R"(s"})"));
  }
  AddItem(request, "bad", "/nowhere/Nothing", "");
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  auto reader = stub_->StreamBatch(&ctx, request);
  std::multiset<uint32_t> seen;
  BatchItemResult result;
  while (reader->Read(&result)) {
    seen.insert(result.index());
    if (result.index() < 20) {
      EXPECT_EQ(result.status().code(), 0) << result.status().message();
      EXPECT_EQ(result.id(), absl::StrCat("item", result.index()));
      EXPECT_EQ(Field(result, "message"), absl::StrCat("m", result.index()));
    } else {
      EXPECT_EQ(result.status().code(), grpc::StatusCode::INVALID_ARGUMENT);
    }
  }
  grpc::Status status = reader->Finish();
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(seen.size(), 21u);
  for (uint32_t i = 0; i < 21; ++i) EXPECT_EQ(seen.count(i), 1u) << i;
}

TEST_F(BatchServiceTest, CallerCancelCancelsEveryRunningItem) {
  BatchRequest request;
  request.set_max_concurrency(3);
  for (int i = 0; i < 6; ++i) AddItem(request, "", kUnary, R"({"delay":"20s"})");
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  BatchResponse response;
  grpc::Status status;
  absl::Notification done;
  stub_->async()->Batch(&ctx, &request, &response, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  ASSERT_TRUE(Eventually([&] { return backend_->in_flight() == 3; }));
  ctx.TryCancel();
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(Eventually([&] { return backend_->cancellations() == 3; }));
  EXPECT_TRUE(Eventually([&] { return backend_->in_flight() == 0; }));
  // The items that had not started never do.
  EXPECT_EQ(backend_->calls(), 3);
}

TEST_F(BatchServiceTest, StreamCallerCancelCancelsEveryRunningItem) {
  BatchRequest request;
  AddItem(request, "", kUnary, R"({"message":"first"})");
  for (int i = 0; i < 4; ++i) AddItem(request, "", kUnary, R"({"delay":"20s"})");
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  auto reader = stub_->StreamBatch(&ctx, request);
  BatchItemResult result;
  ASSERT_TRUE(reader->Read(&result));
  EXPECT_EQ(result.index(), 0u);
  ASSERT_TRUE(Eventually([&] { return backend_->in_flight() == 4; }));
  ctx.TryCancel();
  while (reader->Read(&result)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(Eventually([&] { return backend_->cancellations() == 4; }));
  EXPECT_TRUE(Eventually([&] { return backend_->in_flight() == 0; }));
}

// The issue's benchmark shape, as a smoke: 100 calls of 200 ms each in one batch (the target is
// at most 220 ms). After a warm-up batch of the same size (connections, gRPC's thread pools), it
// prints three runs and asserts only that every call succeeded.
TEST_F(BatchServiceTest, HundredCallsOf200ms) {
  BatchRequest warm;
  for (int i = 0; i < 100; ++i) AddItem(warm, absl::StrCat(i), kUnary, R"({"message":"x"})");
  BatchResponse warm_response;
  ASSERT_TRUE(Batch(warm, &warm_response).ok());

  BatchRequest request;
  for (int i = 0; i < 100; ++i) {
    AddItem(request, absl::StrCat(i), kUnary, R"({"message":"x","delay":"0.2s"})");
  }
  for (int run = 1; run <= 3; ++run) {
    BatchResponse response;
    const absl::Time start = absl::Now();
    grpc::Status status = Batch(request, &response);
    const absl::Duration took = absl::Now() - start;
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(response.results_size(), 100);
    double fastest = 1e9, slowest = 0;
    for (const BatchItemResult& r : response.results()) {
      EXPECT_EQ(r.status().code(), 0) << r.status().message();
      const double ms = r.latency().seconds() * 1e3 + r.latency().nanos() / 1e6;
      fastest = std::min(fastest, ms);
      slowest = std::max(slowest, ms);
    }
    std::printf("run %d: batch of 100 x 200 ms calls took %.1f ms (items %.1f..%.1f ms)\n", run,
                absl::ToDoubleMilliseconds(took), fastest, slowest);
  }
}

TEST(BatchServiceNotListeningTest, AnswersUnavailableUntilSetTarget) {
  BatchServiceImpl service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = v1::BatchService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  BatchRequest request;
  request.add_items()->set_method(kUnary);
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    BatchResponse response;
    grpc::Status status = stub->Batch(&ctx, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(status.error_message(), "the gateway is not listening yet");
  }
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    auto reader = stub->StreamBatch(&ctx, request);
    BatchItemResult result;
    EXPECT_FALSE(reader->Read(&result));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  server->Shutdown();
}

}  // namespace
}  // namespace montage::gateway
