#include "common/telemetry/span_exporter.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/metrics_test_util.h"
#include "common/telemetry/tracer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"

namespace montage::telemetry {
namespace {

using Json = nlohmann::json;
using ::testing::UnorderedElementsAreArray;

// A trace collector on 127.0.0.1 with a port chosen by the kernel: records every request and
// answers with a fixed status. Runs its own event loop thread.
class FakeCollector {
 public:
  struct Request {
    std::string method;
    std::string uri;
    std::string content_type;
    std::string body;
  };

  explicit FakeCollector(int status = 202) : status_(status) {
    static const int threads_ready = evthread_use_pthreads();
    EXPECT_EQ(threads_ready, 0);
    base_ = event_base_new();
    http_ = evhttp_new(base_);
    evhttp_set_gencb(http_, &FakeCollector::Handle, this);
    evhttp_bound_socket* socket = evhttp_bind_socket_with_handle(http_, "127.0.0.1", 0);
    EXPECT_NE(socket, nullptr);
    if (socket != nullptr) {
      sockaddr_in addr{};
      socklen_t len = sizeof(addr);
      getsockname(evhttp_bound_socket_get_fd(socket), reinterpret_cast<sockaddr*>(&addr), &len);
      port_ = ntohs(addr.sin_port);
    }
    thread_ = std::thread([this] { event_base_dispatch(base_); });
  }

  ~FakeCollector() {
    event_base_loopbreak(base_);
    thread_.join();
    evhttp_free(http_);
    event_base_free(base_);
  }

  std::string Url(absl::string_view path) const {
    return absl::StrCat("http://127.0.0.1:", port_, path);
  }

  // Waits (bounded) until `n` requests have arrived; returns what arrived.
  std::vector<Request> WaitForRequests(size_t n, absl::Duration timeout = absl::Seconds(30)) {
    absl::MutexLock lock(&mu_);
    auto enough = [this, n]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return requests_.size() >= n; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
    return requests_;
  }

 private:
  static void Handle(evhttp_request* request, void* arg) {
    auto* self = static_cast<FakeCollector*>(arg);
    Request recorded;
    recorded.method = evhttp_request_get_command(request) == EVHTTP_REQ_POST ? "POST" : "OTHER";
    recorded.uri = evhttp_request_get_uri(request);
    if (const char* type =
            evhttp_find_header(evhttp_request_get_input_headers(request), "Content-Type")) {
      recorded.content_type = type;
    }
    evbuffer* input = evhttp_request_get_input_buffer(request);
    recorded.body.resize(evbuffer_get_length(input));
    evbuffer_copyout(input, recorded.body.data(), recorded.body.size());
    {
      absl::MutexLock lock(&self->mu_);
      self->requests_.push_back(std::move(recorded));
    }
    evhttp_send_reply(request, self->status_, "Whatever", nullptr);
  }

  const int status_;
  event_base* base_ = nullptr;
  evhttp* http_ = nullptr;
  int port_ = 0;
  std::thread thread_;
  absl::Mutex mu_;
  std::vector<Request> requests_ ABSL_GUARDED_BY(mu_);
};

// Ends `n` spans in `tracer` (two per trace, so that parents appear) and returns their span ids.
std::vector<std::string> EndSpans(Tracer& tracer, int n) {
  std::vector<std::string> ids;
  for (int i = 0; i < n; i += 2) {
    Span root = tracer.StartSpan("root" + std::to_string(i), SpanKind::kServer);
    ids.push_back(root.context().SpanIdHex());
    if (i + 1 < n) {
      Span child = tracer.StartSpan("child" + std::to_string(i), SpanKind::kClient, root.context());
      child.SetAttribute("n", i);
      ids.push_back(child.context().SpanIdHex());
    }
  }
  return ids;
}

TEST(HttpSpanExporterTest, ZipkinExportReachesTheCollector) {
  FakeCollector collector;
  prometheus::Registry registry;
  TracerOptions options;
  options.service_name = "zipkin-test";
  options.exporter = ExporterKind::kZipkin;
  options.endpoint = collector.Url("/api/v2/spans");
  options.max_export_batch = 4;
  ASSERT_TRUE(ValidateTracerOptions(options).ok());
  Tracer tracer(options, TracerDeps{nullptr, &registry, nullptr});
  const std::vector<std::string> ids = EndSpans(tracer, 6);
  tracer.Shutdown();

  std::vector<std::string> received;
  const std::vector<FakeCollector::Request> requests = collector.WaitForRequests(1);
  ASSERT_FALSE(requests.empty());
  for (const auto& request : requests) {
    EXPECT_EQ(request.method, "POST");
    EXPECT_EQ(request.uri, "/api/v2/spans");
    EXPECT_EQ(request.content_type, "application/json");
    const Json json = Json::parse(request.body, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(json.is_array()) << request.body;
    for (const Json& span : json) {
      received.push_back(span["id"]);
      EXPECT_EQ(span["localEndpoint"]["serviceName"], "zipkin-test");
      EXPECT_EQ(span["traceId"].get<std::string>().size(), 32u);
    }
  }
  EXPECT_THAT(received, UnorderedElementsAreArray(ids));
  EXPECT_EQ(tracer.stats().spans_exported, 6u);
  EXPECT_EQ(
      testing::SampleValue(RenderPrometheusText(registry), "montage_trace_spans_exported_total"),
      6);
}

TEST(HttpSpanExporterTest, OtlpExportReachesTheCollector) {
  FakeCollector collector(200);
  prometheus::Registry registry;
  TracerOptions options;
  options.service_name = "otlp-test";
  options.exporter = ExporterKind::kOtlp;
  options.endpoint = collector.Url("/v1/traces");
  Tracer tracer(options, TracerDeps{nullptr, &registry, nullptr});
  const std::vector<std::string> ids = EndSpans(tracer, 5);
  ASSERT_TRUE(tracer.ForceFlush(absl::Seconds(30)));

  std::vector<std::string> received;
  const std::vector<FakeCollector::Request> requests = collector.WaitForRequests(1);
  ASSERT_FALSE(requests.empty());
  for (const auto& request : requests) {
    EXPECT_EQ(request.uri, "/v1/traces");
    EXPECT_EQ(request.content_type, "application/json");
    const Json json = Json::parse(request.body, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(json.is_object()) << request.body;
    for (const Json& resource : json["resourceSpans"]) {
      EXPECT_EQ(resource["resource"]["attributes"][0]["value"]["stringValue"], "otlp-test");
      for (const Json& span : resource["scopeSpans"][0]["spans"]) {
        received.push_back(span["spanId"]);
        EXPECT_TRUE(span["startTimeUnixNano"].is_string());
      }
    }
  }
  EXPECT_THAT(received, UnorderedElementsAreArray(ids));
  tracer.Shutdown();
  EXPECT_EQ(tracer.stats().spans_exported, 5u);
  EXPECT_EQ(tracer.stats().export_failures, 0u);
}

TEST(HttpSpanExporterTest, ErrorAnswersCountAsFailures) {
  FakeCollector collector(500);
  prometheus::Registry registry;
  TracerOptions options;
  options.exporter = ExporterKind::kZipkin;
  options.endpoint = collector.Url("/api/v2/spans");
  Tracer tracer(options, TracerDeps{nullptr, &registry, nullptr});
  EndSpans(tracer, 2);
  tracer.Shutdown();
  EXPECT_EQ(collector.WaitForRequests(1).size(), 1u);
  EXPECT_EQ(tracer.stats().export_failures, 1u);
  EXPECT_EQ(tracer.stats().spans_exported, 0u);
  EXPECT_EQ(
      testing::SampleValue(RenderPrometheusText(registry), "montage_trace_export_failures_total"),
      1);
}

TEST(HttpSpanExporterTest, UnreachableCollectorFailsWithinTheDeadline) {
  // A port that is bound but not listening refuses connections at once.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  auto exporter = MakeHttpSpanExporter(SpanFormat::kZipkin,
                                       absl::StrCat("http://127.0.0.1:", port, "/api/v2/spans"));
  SpanData span;
  span.name = "x";
  const SpanData* spans[] = {&span};
  const absl::Status status = exporter->Export(spans, absl::Now() + absl::Seconds(10));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_EQ(exporter->Export(spans, absl::Now() - absl::Seconds(1)).code(),
            absl::StatusCode::kDeadlineExceeded);
  close(fd);
}

TEST(ValidateExportEndpointTest, AcceptsHttpUrlsOnly) {
  EXPECT_TRUE(ValidateExportEndpoint("http://127.0.0.1:9411/api/v2/spans").ok());
  EXPECT_TRUE(ValidateExportEndpoint("https://collector.example/v1/traces").ok());
  EXPECT_FALSE(ValidateExportEndpoint("").ok());
  EXPECT_FALSE(ValidateExportEndpoint("collector:4318").ok());
  EXPECT_FALSE(ValidateExportEndpoint("file:///etc/passwd").ok());
  EXPECT_FALSE(ValidateExportEndpoint("http://").ok());
}

}  // namespace
}  // namespace montage::telemetry
