#include "common/telemetry/grpc_interceptors.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/metrics_test_util.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "montage/cache/v1/cache.grpc.pb.h"
#include "prometheus/registry.h"

namespace montage::telemetry {
namespace {

using cache::v1::CacheService;
using cache::v1::GetRequest;
using cache::v1::GetResponse;
using testing::SampleValue;

constexpr char kGetMethod[] = "/montage.cache.v1.CacheService/Get";

// Get answers INVALID_ARGUMENT for an empty key, OK otherwise, and remembers what the handler
// could see of its call's trace.
class TestCacheService final : public CacheService::CallbackService {
 public:
  struct Seen {
    const grpc::ServerContextBase* context = nullptr;
    std::optional<SpanContext> span_context;
    std::string traceparent;
    std::string b3_span_id;
  };

  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* context, const GetRequest* request,
                                GetResponse* response) override {
    Seen seen;
    seen.context = context;
    seen.span_context = ServerSpanContext(context);
    const auto& metadata = context->client_metadata();
    if (auto it = metadata.find("traceparent"); it != metadata.end()) {
      seen.traceparent = std::string(it->second.data(), it->second.size());
    }
    if (auto it = metadata.find("x-b3-spanid"); it != metadata.end()) {
      seen.b3_span_id = std::string(it->second.data(), it->second.size());
    }
    {
      absl::MutexLock lock(&mu_);
      seen_.push_back(std::move(seen));
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    if (request->key().empty()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "key: must not be empty"));
    } else {
      response->set_found(false);
      reactor->Finish(grpc::Status::OK);
    }
    return reactor;
  }

  std::vector<Seen> seen() const {
    absl::MutexLock lock(&mu_);
    return seen_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<Seen> seen_ ABSL_GUARDED_BY(mu_);
};

std::vector<SpanData> SpansOfKind(const Tracer& tracer, SpanKind kind) {
  std::vector<SpanData> out;
  for (SpanData& span : tracer.RecentSpans(1000)) {
    if (span.kind == kind) out.push_back(std::move(span));
  }
  return out;
}

// A callback server with the telemetry interceptor on 127.0.0.1 (kernel-chosen port), and a
// traced channel to it. Server and client have their own tracers, as two processes would.
class GrpcTelemetryTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(/*client_sample_ratio=*/1.0); }

  void StartServer(double client_sample_ratio) {
    TracerOptions server_options;
    server_options.service_name = "cache";
    server_tracer_ =
        std::make_unique<Tracer>(server_options, TracerDeps{nullptr, &registry_, nullptr});
    TracerOptions client_options;
    client_options.service_name = "caller";
    client_options.sample_ratio = client_sample_ratio;
    client_tracer_ =
        std::make_unique<Tracer>(client_options, TracerDeps{nullptr, &registry_, nullptr});

    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> factories;
    factories.push_back(MakeServerTelemetryInterceptorFactory(*server_tracer_, registry_));
    builder.experimental().SetInterceptorCreators(std::move(factories));
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
    channel_ = CreateTracedChannel(Target(), grpc::InsecureChannelCredentials(),
                                   grpc::ChannelArguments(), *client_tracer_, registry_);
    stub_ = CacheService::NewStub(channel_);
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
  }

  std::string Target() const { return "127.0.0.1:" + std::to_string(port_); }

  grpc::Status Get(const std::string& key,
                   const std::optional<SpanContext>& parent = std::nullopt) {
    grpc::ClientContext context;
    if (parent) SetParentSpan(context, *parent);
    GetRequest request;
    request.set_key(key);
    GetResponse response;
    return stub_->Get(&context, request, &response);
  }

  prometheus::Registry registry_;
  std::unique_ptr<Tracer> server_tracer_;
  std::unique_ptr<Tracer> client_tracer_;
  TestCacheService service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<CacheService::Stub> stub_;
};

TEST_F(GrpcTelemetryTest, ServerSpanContinuesTheClientsTrace) {
  Span root = client_tracer_->StartSpan("handle request");
  ASSERT_TRUE(Get("k", root.context()).ok());
  root.End();

  const std::vector<SpanData> client_spans = SpansOfKind(*client_tracer_, SpanKind::kClient);
  ASSERT_EQ(client_spans.size(), 1u);
  const SpanData& client = client_spans[0];
  EXPECT_EQ(client.name, kGetMethod);
  EXPECT_EQ(client.trace_id, root.context().trace_id);
  EXPECT_EQ(client.parent_span_id, root.context().span_id);
  EXPECT_EQ(client.service_name, "caller");

  const std::vector<SpanData> server_spans = SpansOfKind(*server_tracer_, SpanKind::kServer);
  ASSERT_EQ(server_spans.size(), 1u);
  const SpanData& server = server_spans[0];
  EXPECT_EQ(server.name, kGetMethod);
  EXPECT_EQ(server.trace_id, client.trace_id);
  EXPECT_EQ(server.parent_span_id, client.span_id);
  EXPECT_EQ(server.service_name, "cache");
  EXPECT_THAT(
      server.FindAttribute("rpc.service"),
      ::testing::Pointee(::testing::VariantWith<std::string>("montage.cache.v1.CacheService")));
  EXPECT_THAT(server.FindAttribute("rpc.method"),
              ::testing::Pointee(::testing::VariantWith<std::string>("Get")));
  EXPECT_THAT(server.FindAttribute("rpc.grpc.status_code"),
              ::testing::Pointee(::testing::VariantWith<int64_t>(0)));
  EXPECT_EQ(server.status_code, SpanStatusCode::kUnset);

  // The handler saw its own span, and the metadata carried the client span in both formats.
  const auto seen = service_.seen();
  ASSERT_EQ(seen.size(), 1u);
  ASSERT_TRUE(seen[0].span_context.has_value());
  EXPECT_EQ(seen[0].span_context->span_id, server.span_id);
  EXPECT_EQ(seen[0].span_context->trace_id, server.trace_id);
  EXPECT_EQ(seen[0].traceparent,
            "00-" + ToHex(client.trace_id) + "-" + ToHex(client.span_id) + "-01");
  EXPECT_EQ(seen[0].b3_span_id, ToHex(client.span_id));
}

TEST_F(GrpcTelemetryTest, CallsWithoutAParentStartANewTraceAtTheClient) {
  ASSERT_TRUE(Get("k").ok());
  const auto client = SpansOfKind(*client_tracer_, SpanKind::kClient);
  const auto server = SpansOfKind(*server_tracer_, SpanKind::kServer);
  ASSERT_EQ(client.size(), 1u);
  ASSERT_EQ(server.size(), 1u);
  EXPECT_TRUE(client[0].IsRoot());
  EXPECT_EQ(server[0].trace_id, client[0].trace_id);
  EXPECT_EQ(server[0].parent_span_id, client[0].span_id);
}

TEST_F(GrpcTelemetryTest, ErrorsAreRecordedOnBothSpans) {
  EXPECT_EQ(Get("").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const auto client = SpansOfKind(*client_tracer_, SpanKind::kClient);
  const auto server = SpansOfKind(*server_tracer_, SpanKind::kServer);
  ASSERT_EQ(client.size(), 1u);
  ASSERT_EQ(server.size(), 1u);
  EXPECT_THAT(server[0].FindAttribute("rpc.grpc.status_code"),
              ::testing::Pointee(::testing::VariantWith<int64_t>(3)));
  // A caller's mistake is not a server error; for the client it is.
  EXPECT_EQ(server[0].status_code, SpanStatusCode::kUnset);
  EXPECT_EQ(client[0].status_code, SpanStatusCode::kError);
  EXPECT_EQ(client[0].status_message, "key: must not be empty");
}

TEST_F(GrpcTelemetryTest, PrometheusCountsCallsByMethodAndCode) {
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Get("k").ok());
  for (int i = 0; i < 2; ++i) ASSERT_FALSE(Get("").ok());

  const std::string text = RenderPrometheusText(registry_);
  EXPECT_EQ(SampleValue(text, "montage_grpc_server_requests_total",
                        {{"method", kGetMethod}, {"code", "OK"}}),
            3)
      << text;
  EXPECT_EQ(SampleValue(text, "montage_grpc_server_requests_total",
                        {{"method", kGetMethod}, {"code", "INVALID_ARGUMENT"}}),
            2);
  EXPECT_EQ(SampleValue(text, "montage_grpc_server_request_duration_seconds_count",
                        {{"method", kGetMethod}}),
            5);
  EXPECT_EQ(SampleValue(text, "montage_grpc_server_request_duration_seconds_bucket",
                        {{"method", kGetMethod}, {"le", "+Inf"}}),
            5);
  EXPECT_EQ(SampleValue(text, "montage_grpc_server_in_flight", {{"method", kGetMethod}}), 0);
  EXPECT_EQ(SampleValue(text, "montage_grpc_client_requests_total",
                        {{"method", kGetMethod}, {"code", "OK"}}),
            3);
  EXPECT_EQ(SampleValue(text, "montage_grpc_client_requests_total",
                        {{"method", kGetMethod}, {"code", "INVALID_ARGUMENT"}}),
            2);
  EXPECT_EQ(SampleValue(text, "montage_grpc_client_request_duration_seconds_count",
                        {{"method", kGetMethod}}),
            5);
  // Codes never seen are not listed.
  EXPECT_FALSE(SampleValue(text, "montage_grpc_server_requests_total", {{"code", "INTERNAL"}}));
}

TEST_F(GrpcTelemetryTest, UnsampledCallersAreNotRecordedOnEitherSide) {
  server_->Shutdown();
  StartServer(/*client_sample_ratio=*/0.0);
  ASSERT_TRUE(Get("k").ok());
  EXPECT_TRUE(client_tracer_->RecentSpans(100).empty());
  EXPECT_TRUE(server_tracer_->RecentSpans(100).empty());
  // The context still travelled: the handler has one, marked unsampled.
  const auto seen = service_.seen();
  ASSERT_EQ(seen.size(), 1u);
  ASSERT_TRUE(seen[0].span_context.has_value());
  EXPECT_FALSE(seen[0].span_context->sampled);
  EXPECT_THAT(seen[0].traceparent, ::testing::EndsWith("-00"));
  // Metrics do not depend on sampling.
  EXPECT_EQ(SampleValue(RenderPrometheusText(registry_), "montage_grpc_server_requests_total",
                        {{"method", kGetMethod}, {"code", "OK"}}),
            1);
}

TEST_F(GrpcTelemetryTest, B3FromAnUntracedClientIsHonoured) {
  auto plain =
      CacheService::NewStub(grpc::CreateChannel(Target(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.AddMetadata("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1");
  GetRequest request;
  request.set_key("k");
  GetResponse response;
  ASSERT_TRUE(plain->Get(&context, request, &response).ok());
  const auto server = SpansOfKind(*server_tracer_, SpanKind::kServer);
  ASSERT_EQ(server.size(), 1u);
  EXPECT_EQ(ToHex(server[0].trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(ToHex(server[0].parent_span_id), "00f067aa0ba902b7");
}

TEST_F(GrpcTelemetryTest, ServerSpanContextIsEmptyOutsideACall) {
  EXPECT_FALSE(ServerSpanContext(nullptr).has_value());
  grpc::ServerContext unrelated;
  EXPECT_FALSE(ServerSpanContext(&unrelated).has_value());
  ASSERT_TRUE(Get("k").ok());
  const auto seen = service_.seen();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_TRUE(seen[0].span_context.has_value());
  // The entry goes when gRPC destroys the call's context, shortly after the client has its
  // answer: poll (bounded) rather than assume when.
  bool erased = false;
  for (int i = 0; i < 30'000 && !erased; ++i) {
    erased = !ServerSpanContext(seen[0].context).has_value();
    if (!erased) absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_TRUE(erased);
}

}  // namespace
}  // namespace montage::telemetry
