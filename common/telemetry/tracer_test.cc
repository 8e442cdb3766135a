#include "common/telemetry/tracer.h"

#include <atomic>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/clock.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/metrics_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"

namespace montage::telemetry {
namespace {

using ::testing::ElementsAre;
using ::testing::Field;
using ::testing::IsEmpty;
using ::testing::Pointee;
using testing::SampleValue;
using ::testing::VariantWith;

SpanContext RemoteContext(bool sampled, bool deferred = false) {
  SpanContext ctx;
  ctx.trace_id = *TraceIdFromHex("4bf92f3577b34da6a3ce929d0e0e4736");
  ctx.span_id = *SpanIdFromHex("00f067aa0ba902b7");
  ctx.sampled = sampled;
  ctx.sampling_deferred = deferred;
  return ctx;
}

class TracerTest : public ::testing::Test {
 protected:
  FakeClock clock_;
  prometheus::Registry registry_;
};

TEST_F(TracerTest, RatioOneSamplesNewRoots) {
  TracerOptions options;
  options.sample_ratio = 1.0;
  TracerDeps deps{&clock_, &registry_, nullptr};
  Tracer tracer(options, std::move(deps));
  Span span = tracer.StartSpan("root");
  EXPECT_TRUE(span.IsRecording());
  EXPECT_TRUE(span.context().sampled);
  EXPECT_TRUE(span.context().IsValid());
  span.End();
  EXPECT_FALSE(span.IsRecording());
  EXPECT_EQ(tracer.RecentSpans(10).size(), 1u);
  EXPECT_EQ(tracer.stats().spans_recorded, 1u);
}

TEST_F(TracerTest, RatioZeroSamplesNoNewRootsButKeepsIncomingSampledTraces) {
  TracerOptions options;
  options.sample_ratio = 0.0;
  Tracer tracer(options, TracerDeps{&clock_, &registry_, nullptr});
  for (int i = 0; i < 100; ++i) {
    Span span = tracer.StartSpan("root");
    EXPECT_FALSE(span.IsRecording());
    EXPECT_FALSE(span.context().sampled);
    // An unsampled span still has ids to propagate.
    EXPECT_TRUE(span.context().IsValid());
    span.SetAttribute("ignored", 1);
  }
  EXPECT_THAT(tracer.RecentSpans(1000), IsEmpty());

  Span child = tracer.StartSpan("child", SpanKind::kServer, RemoteContext(/*sampled=*/true));
  EXPECT_TRUE(child.IsRecording());
  EXPECT_TRUE(child.context().sampled);
  child.End();
  EXPECT_EQ(tracer.RecentSpans(1000).size(), 1u);

  // A deferred decision falls back to the local ratio.
  Span deferred = tracer.StartSpan("d", SpanKind::kServer, RemoteContext(true, /*deferred=*/true));
  EXPECT_FALSE(deferred.IsRecording());
}

TEST_F(TracerTest, IncomingUnsampledDecisionIsRespected) {
  TracerOptions options;
  options.sample_ratio = 1.0;
  Tracer tracer(options, TracerDeps{&clock_, &registry_, nullptr});
  Span span = tracer.StartSpan("child", SpanKind::kServer, RemoteContext(/*sampled=*/false));
  EXPECT_FALSE(span.IsRecording());
  EXPECT_FALSE(span.context().sampled);
  EXPECT_EQ(span.context().trace_id, RemoteContext(false).trace_id);
  Span deferred = tracer.StartSpan("d", SpanKind::kServer, RemoteContext(false, /*deferred=*/true));
  EXPECT_TRUE(deferred.IsRecording());
}

TEST_F(TracerTest, ChildrenJoinTheParentsTrace) {
  TracerOptions options;
  options.service_name = "svc";
  Tracer tracer(options, TracerDeps{&clock_, &registry_, nullptr});
  SpanContext remote = RemoteContext(true);
  remote.tracestate = "congo=t61rcWkgMzE";
  Span server = tracer.StartSpan("server", SpanKind::kServer, remote);
  Span internal = tracer.StartSpan("work", SpanKind::kInternal, server.context());
  EXPECT_EQ(internal.context().trace_id, remote.trace_id);
  EXPECT_EQ(internal.context().tracestate, "congo=t61rcWkgMzE");
  EXPECT_NE(internal.context().span_id, server.context().span_id);
  internal.End();
  server.End();

  const std::vector<SpanData> spans = tracer.RecentSpans(10);
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(spans[0].name, "work");
  EXPECT_EQ(spans[0].parent_span_id, server.context().span_id);
  EXPECT_EQ(spans[0].service_name, "svc");
  EXPECT_EQ(spans[1].name, "server");
  EXPECT_EQ(spans[1].parent_span_id, remote.span_id);
  EXPECT_EQ(spans[1].kind, SpanKind::kServer);
  EXPECT_FALSE(spans[1].IsRoot());

  Span root = tracer.StartSpan("root");
  EXPECT_NE(root.context().trace_id, remote.trace_id);
  root.End();
  EXPECT_TRUE(tracer.RecentSpans(1)[0].IsRoot());
}

TEST_F(TracerTest, RecordsTimesAttributesStatusAndEventsFromTheClock) {
  Tracer tracer(TracerOptions{}, TracerDeps{&clock_, &registry_, nullptr});
  const absl::Time t0 = clock_.Now();
  Span span = tracer.StartSpan("op");
  clock_.Advance(absl::Milliseconds(5));
  span.AddEvent("halfway");
  span.SetAttribute("str", "v1");
  span.SetAttribute("str", std::string("v2"));  // replaces
  span.SetAttribute("int", 42);
  span.SetAttribute("double", 0.5);
  span.SetAttribute("bool", true);
  span.SetStatus(SpanStatusCode::kError, "boom");
  clock_.Advance(absl::Milliseconds(5));
  {
    Span moved = std::move(span);
    EXPECT_FALSE(span.IsRecording());  // NOLINT(bugprone-use-after-move)
  }                                    // ends here
  span.End();                          // inert

  const std::vector<SpanData> spans = tracer.RecentSpans(10);
  ASSERT_EQ(spans.size(), 1u);
  const SpanData& data = spans[0];
  EXPECT_EQ(data.start, t0);
  EXPECT_EQ(data.end, t0 + absl::Milliseconds(10));
  ASSERT_EQ(data.attributes.size(), 4u);
  EXPECT_EQ(data.attributes[0].first, "str");
  EXPECT_THAT(data.FindAttribute("str"), Pointee(VariantWith<std::string>("v2")));
  EXPECT_THAT(data.FindAttribute("int"), Pointee(VariantWith<int64_t>(42)));
  EXPECT_THAT(data.FindAttribute("double"), Pointee(VariantWith<double>(0.5)));
  EXPECT_THAT(data.FindAttribute("bool"), Pointee(VariantWith<bool>(true)));
  EXPECT_EQ(data.status_code, SpanStatusCode::kError);
  EXPECT_EQ(data.status_message, "boom");
  EXPECT_THAT(data.events, ElementsAre(Field(&SpanEvent::name, "halfway")));
  EXPECT_EQ(data.events[0].time, t0 + absl::Milliseconds(5));
}

TEST_F(TracerTest, RingBufferKeepsTheNewestSpans) {
  TracerOptions options;
  options.ring_buffer_spans = 4;
  Tracer tracer(options, TracerDeps{&clock_, &registry_, nullptr});
  for (int i = 0; i < 10; ++i) tracer.StartSpan("s" + std::to_string(i)).End();
  std::vector<std::string> names;
  for (const SpanData& span : tracer.RecentSpans(100)) names.push_back(span.name);
  EXPECT_THAT(names, ElementsAre("s6", "s7", "s8", "s9"));
  names.clear();
  for (const SpanData& span : tracer.RecentSpans(2)) names.push_back(span.name);
  EXPECT_THAT(names, ElementsAre("s8", "s9"));
  EXPECT_EQ(tracer.stats().spans_recorded, 10u);
}

TEST_F(TracerTest, RecentTracesJsonGroupsSpansByTrace) {
  Tracer tracer(TracerOptions{}, TracerDeps{&clock_, &registry_, nullptr});
  Span root = tracer.StartSpan("root", SpanKind::kServer);
  clock_.Advance(absl::Milliseconds(1));
  Span child = tracer.StartSpan("child", SpanKind::kClient, root.context());
  clock_.Advance(absl::Milliseconds(2));
  child.End();
  root.End();
  clock_.Advance(absl::Milliseconds(1));
  Span other = tracer.StartSpan("other");
  other.End();

  const auto json = nlohmann::json::parse(tracer.RecentTracesJson(100));
  ASSERT_EQ(json["traces"].size(), 2u);
  // Newest first.
  EXPECT_EQ(json["traces"][0]["rootName"], "other");
  const auto& trace = json["traces"][1];
  EXPECT_EQ(trace["traceId"], root.context().TraceIdHex());
  EXPECT_EQ(trace["rootName"], "root");
  EXPECT_EQ(trace["spanCount"], 2);
  EXPECT_EQ(trace["durationMicros"], 3000);
  ASSERT_EQ(trace["spans"].size(), 2u);
  EXPECT_EQ(trace["spans"][0]["name"], "root");
  EXPECT_EQ(trace["spans"][0]["parentSpanId"], "");
  EXPECT_EQ(trace["spans"][1]["name"], "child");
  EXPECT_EQ(trace["spans"][1]["parentSpanId"], root.context().SpanIdHex());
  EXPECT_EQ(trace["spans"][1]["offsetMicros"], 1000);
  EXPECT_EQ(trace["spans"][1]["durationMicros"], 2000);
  EXPECT_EQ(trace["spans"][1]["kind"], "CLIENT");
}

// Records what it is given; optionally blocks each export until released.
class FakeExporter final : public SpanExporter {
 public:
  explicit FakeExporter(bool block_first) : block_first_(block_first) {}

  absl::Status Export(absl::Span<const SpanData* const> spans, absl::Time) override {
    if (block_first_ && !entered_.HasBeenNotified()) {
      entered_.Notify();
      release_.WaitForNotification();
    }
    absl::MutexLock lock(&mu_);
    for (const SpanData* span : spans) names_.push_back(span->name);
    ++batches_;
    return fail_ ? absl::UnavailableError("collector down") : absl::OkStatus();
  }

  std::vector<std::string> names() const {
    absl::MutexLock lock(&mu_);
    return names_;
  }
  int batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  void set_fail(bool fail) {
    absl::MutexLock lock(&mu_);
    fail_ = fail;
  }

  absl::Notification entered_;
  absl::Notification release_;

 private:
  const bool block_first_;
  mutable absl::Mutex mu_;
  std::vector<std::string> names_ ABSL_GUARDED_BY(mu_);
  int batches_ ABSL_GUARDED_BY(mu_) = 0;
  bool fail_ ABSL_GUARDED_BY(mu_) = false;
};

TEST_F(TracerTest, ShutdownExportsWhatIsQueuedInBatches) {
  TracerOptions options;
  options.export_interval = absl::Hours(1);  // only a full batch or shutdown triggers export
  options.max_export_batch = 3;
  auto exporter = std::make_unique<FakeExporter>(/*block_first=*/false);
  FakeExporter* fake = exporter.get();
  Tracer tracer(options, TracerDeps{&clock_, &registry_, std::move(exporter)});
  for (int i = 0; i < 7; ++i) tracer.StartSpan("s" + std::to_string(i)).End();
  tracer.Shutdown();
  EXPECT_THAT(fake->names(), ElementsAre("s0", "s1", "s2", "s3", "s4", "s5", "s6"));
  EXPECT_GE(fake->batches(), 3);
  EXPECT_EQ(tracer.stats().spans_exported, 7u);
  EXPECT_EQ(SampleValue(RenderPrometheusText(registry_), "montage_trace_spans_exported_total"), 7);

  // After shutdown spans still reach the ring buffer, and are counted as dropped for export.
  tracer.StartSpan("late").End();
  EXPECT_EQ(tracer.RecentSpans(1)[0].name, "late");
  EXPECT_EQ(SampleValue(RenderPrometheusText(registry_), "montage_trace_spans_dropped_total",
                        {{"reason", "shutdown"}}),
            1);
}

TEST_F(TracerTest, ForceFlushExportsWithoutWaitingForTheInterval) {
  TracerOptions options;
  options.export_interval = absl::Hours(1);
  auto exporter = std::make_unique<FakeExporter>(/*block_first=*/false);
  FakeExporter* fake = exporter.get();
  Tracer tracer(options, TracerDeps{&clock_, &registry_, std::move(exporter)});
  tracer.StartSpan("a").End();
  tracer.StartSpan("b").End();
  ASSERT_TRUE(tracer.ForceFlush(absl::Seconds(30)));
  EXPECT_THAT(fake->names(), ElementsAre("a", "b"));

  fake->set_fail(true);
  tracer.StartSpan("c").End();
  ASSERT_TRUE(tracer.ForceFlush(absl::Seconds(30)));
  EXPECT_EQ(tracer.stats().export_failures, 1u);
  const std::string text = RenderPrometheusText(registry_);
  EXPECT_EQ(SampleValue(text, "montage_trace_export_failures_total"), 1);
  EXPECT_EQ(SampleValue(text, "montage_trace_spans_dropped_total", {{"reason", "export_failed"}}),
            1);
}

TEST_F(TracerTest, FullExportQueueDropsInsteadOfBlocking) {
  TracerOptions options;
  options.export_interval = absl::Hours(1);
  options.max_export_batch = 2;
  options.max_export_queue = 4;
  auto exporter = std::make_unique<FakeExporter>(/*block_first=*/true);
  FakeExporter* fake = exporter.get();
  Tracer tracer(options, TracerDeps{&clock_, &registry_, std::move(exporter)});

  // A full batch wakes the exporter, which then hangs in its first export.
  tracer.StartSpan("first0").End();
  tracer.StartSpan("first1").End();
  fake->entered_.WaitForNotification();

  // The queue fills up and then overflows; none of this may wait for the exporter.
  for (int i = 0; i < 4; ++i) tracer.StartSpan("queued" + std::to_string(i)).End();
  for (int i = 0; i < 3; ++i) tracer.StartSpan("dropped" + std::to_string(i)).End();
  EXPECT_EQ(tracer.stats().spans_dropped, 3u);
  EXPECT_EQ(SampleValue(RenderPrometheusText(registry_), "montage_trace_spans_dropped_total",
                        {{"reason", "queue_full"}}),
            3);
  // The ring buffer has them all.
  EXPECT_EQ(tracer.RecentSpans(100).size(), 9u);

  fake->release_.Notify();
  tracer.Shutdown();
  EXPECT_THAT(fake->names(),
              ElementsAre("first0", "first1", "queued0", "queued1", "queued2", "queued3"));
  EXPECT_EQ(tracer.stats().spans_exported, 6u);
}

TEST(TracerOptionsTest, Validation) {
  EXPECT_TRUE(ValidateTracerOptions(TracerOptions{}).ok());
  TracerOptions options;
  options.sample_ratio = 1.5;
  EXPECT_EQ(ValidateTracerOptions(options).code(), absl::StatusCode::kInvalidArgument);
  options.sample_ratio = -0.1;
  EXPECT_FALSE(ValidateTracerOptions(options).ok());
  options = TracerOptions{};
  options.exporter = ExporterKind::kZipkin;
  EXPECT_THAT(std::string(ValidateTracerOptions(options).message()),
              ::testing::HasSubstr("tracing.endpoint"));
  options.endpoint = "127.0.0.1:9411";
  EXPECT_FALSE(ValidateTracerOptions(options).ok());
  options.endpoint = "ftp://127.0.0.1/api/v2/spans";
  EXPECT_FALSE(ValidateTracerOptions(options).ok());
  options.endpoint = "http://127.0.0.1:9411/api/v2/spans";
  EXPECT_TRUE(ValidateTracerOptions(options).ok());
  options.max_export_queue = 0;
  EXPECT_FALSE(ValidateTracerOptions(options).ok());
}

TEST(GlobalTracerTest, ConfigureReplacesTheGlobalTracer) {
  Tracer& before = GlobalTracer();
  EXPECT_EQ(&before, &GlobalTracer());
  TracerOptions bad;
  bad.sample_ratio = 2;
  EXPECT_FALSE(ConfigureGlobalTracer(bad).ok());
  EXPECT_EQ(&before, &GlobalTracer());
  TracerOptions options;
  options.service_name = "global-test";
  ASSERT_TRUE(ConfigureGlobalTracer(options).ok());
  EXPECT_NE(&before, &GlobalTracer());
  EXPECT_EQ(GlobalTracer().options().service_name, "global-test");
  // The old tracer is still usable.
  before.StartSpan("still alive").End();
  ShutdownGlobalTracer();
}

}  // namespace
}  // namespace montage::telemetry
