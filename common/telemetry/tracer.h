// Spans: starting them, recording them when they end, and getting them out of the process.
//
// Recording is cheap and never waits on I/O: a finished span goes into a fixed-size ring
// buffer (the /debug/traces page reads it) and, when an exporter is configured, into a bounded
// queue. One background thread per tracer drains that queue in batches to a Zipkin or OTLP
// collector; when the queue is full, spans are dropped and counted rather than making a request
// wait. Metrics (in the tracer's Prometheus registry):
//   montage_trace_spans_exported_total
//   montage_trace_spans_dropped_total{reason="queue_full"|"export_failed"|"shutdown"}
//   montage_trace_export_failures_total   (failed export requests)
#ifndef MONTAGE_COMMON_TELEMETRY_TRACER_H_
#define MONTAGE_COMMON_TELEMETRY_TRACER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/telemetry/span_data.h"
#include "common/telemetry/span_exporter.h"
#include "common/telemetry/trace_context.h"

namespace prometheus {
class Counter;
class Registry;
}  // namespace prometheus

namespace montage::telemetry {

enum class ExporterKind { kNone, kZipkin, kOtlp };

// Values, as read from montage.config.v1.TracingConfig (see config.h).
struct TracerOptions {
  std::string service_name = "montage";
  // Fraction of new root traces that are sampled, 0..1. A caller's decision (traceparent flag,
  // B3 sampled) always wins.
  double sample_ratio = 1.0;
  size_t ring_buffer_spans = 4096;
  ExporterKind exporter = ExporterKind::kNone;
  // Full URL for the exporter, e.g. http://127.0.0.1:9411/api/v2/spans.
  std::string endpoint;
  absl::Duration export_interval = absl::Seconds(1);
  size_t max_export_batch = 512;
  size_t max_export_queue = 8192;
  // Bound of one export request.
  absl::Duration export_timeout = absl::Seconds(5);
};

// INVALID_ARGUMENT naming the first bad field.
absl::Status ValidateTracerOptions(const TracerOptions& options);

// What a tracer uses but does not configure. Every member may be left empty.
struct TracerDeps {
  // Span timestamps; RealClock() when null.
  Clock* clock = nullptr;
  // Where the tracer's own counters go; MetricsRegistry() when null. Must outlive the tracer.
  prometheus::Registry* registry = nullptr;
  // Replaces the exporter that options.exporter/endpoint describe (tests, custom sinks).
  std::unique_ptr<SpanExporter> exporter;
};

class Tracer;

// The fixed part of spans that are started many times alike, such as the server spans of one
// gRPC method: the name and a list of attributes, built once and shared by every span started
// from it, so that starting such a span copies no strings. Every span started from a template
// carries all of the template's attributes, in the template's order and before its own;
// SetAttribute with one of the template's keys replaces the value for that span only.
// Immutable, hence thread-safe.
class SpanTemplate {
 public:
  using Attributes = std::vector<std::pair<std::string, AttributeValue>>;
  SpanTemplate(std::string name, Attributes attributes)
      : name_(std::move(name)), attributes_(std::move(attributes)) {}

  const std::string& name() const { return name_; }
  const Attributes& attributes() const { return attributes_; }
  // Index of `key` in attributes(), or -1.
  int Find(absl::string_view key) const;

 private:
  const std::string name_;
  const Attributes attributes_;
};

namespace tracer_internal {

// A span while it is recorded, and in the tracer's ring once it ended: SpanData without the
// parts every span of a tracer or of a template shares (the service name; a template's name and
// attributes), so that recording a span from a template copies no strings. Records are
// recycled (see tracer.cc), so in the steady state starting a span allocates nothing either.
struct SpanRecord {
  std::shared_ptr<const SpanTemplate> span_template;  // null for spans started by name
  std::string name;                                   // when span_template is null
  TraceId trace_id{};
  SpanId span_id{};
  SpanId parent_span_id{};
  SpanKind kind = SpanKind::kInternal;
  absl::Time start;
  absl::Time end;
  // Values replacing those of span_template's attributes, by index; inline so that the usual
  // one or two replacements allocate nothing.
  absl::InlinedVector<std::pair<int, AttributeValue>, 2> template_overrides;
  std::vector<std::pair<std::string, AttributeValue>> attributes;
  SpanStatusCode status_code = SpanStatusCode::kUnset;
  std::string status_message;
  std::vector<SpanEvent> events;

  // Back to a default record, keeping the capacity of its strings and vectors.
  void Clear();
};

}  // namespace tracer_internal

// One operation in a trace. Created by Tracer::StartSpan; recorded when End() is called or the
// span is destroyed, whichever comes first. Movable, not copyable; a moved-from or
// default-constructed span is inert. A span is used by one thread at a time; its tracer must
// outlive it. Unsampled spans still carry a context (for propagation) but record nothing, so
// setting attributes on them costs next to nothing.
class Span {
 public:
  Span() = default;
  Span(Span&& other) noexcept;
  Span& operator=(Span&& other) noexcept;  // ends this span first
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;
  ~Span() { End(); }

  // The context to propagate to children and to other processes.
  const SpanContext& context() const { return context_; }
  // True until End() for sampled spans.
  bool IsRecording() const { return record_ != nullptr; }

  void SetAttribute(absl::string_view key, absl::string_view value);
  void SetAttribute(absl::string_view key, const char* value) {
    SetAttribute(key, absl::string_view(value));
  }
  void SetAttribute(absl::string_view key, double value);
  void SetAttribute(absl::string_view key, bool value);
  template <typename Int,
            std::enable_if_t<std::is_integral_v<Int> && !std::is_same_v<Int, bool>, int> = 0>
  void SetAttribute(absl::string_view key, Int value) {
    SetIntAttribute(key, static_cast<int64_t>(value));
  }
  void SetStatus(SpanStatusCode code, absl::string_view message = {});
  // A timestamped event ("cache miss", "retry").
  void AddEvent(absl::string_view name);
  // Records the span. Later calls do nothing.
  void End();

 private:
  friend class Tracer;
  void SetIntAttribute(absl::string_view key, int64_t value);
  void Set(absl::string_view key, AttributeValue value);

  Tracer* tracer_ = nullptr;
  SpanContext context_;
  std::unique_ptr<tracer_internal::SpanRecord> record_;  // null when not recording
};

// Starts spans and keeps/exports the finished ones. Thread-safe. Destruction calls Shutdown().
// Options are expected to pass ValidateTracerOptions; out-of-range values are clamped.
class Tracer {
 public:
  explicit Tracer(TracerOptions options, TracerDeps deps = {});
  Tracer(const Tracer&) = delete;
  Tracer& operator=(const Tracer&) = delete;
  ~Tracer();

  // A child of `parent` when it is given (same trace, parent's sampling decision unless it was
  // deferred), else the root of a new trace, sampled with probability sample_ratio.
  Span StartSpan(absl::string_view name, SpanKind kind = SpanKind::kInternal,
                 const std::optional<SpanContext>& parent = std::nullopt);
  // Same, named and attributed by `span_template` (see SpanTemplate), which must not be null.
  // Cheaper: nothing of the template is copied.
  Span StartSpan(const std::shared_ptr<const SpanTemplate>& span_template, SpanKind kind,
                 const std::optional<SpanContext>& parent = std::nullopt);

  // Up to `max` of the most recently finished sampled spans, oldest first.
  std::vector<SpanData> RecentSpans(size_t max) const;
  // The same spans as TracesWaterfallJson (see span_json.h).
  std::string RecentTracesJson(size_t max) const;

  // Waits until every span queued before the call has been handed to the exporter (and the
  // export finished or failed), or `timeout` passed. True when all were handled.
  bool ForceFlush(absl::Duration timeout);
  // Stops accepting spans for export, exports what is queued (bounded by `timeout`, the rest is
  // dropped and counted) and joins the export thread. Idempotent; spans ended afterwards still
  // reach the ring buffer.
  void Shutdown(absl::Duration timeout = absl::Seconds(5));

  struct Stats {
    uint64_t spans_recorded = 0;  // sampled spans that ended
    uint64_t spans_exported = 0;
    uint64_t spans_dropped = 0;  // every reason
    uint64_t export_failures = 0;
  };
  Stats stats() const;

  const TracerOptions& options() const { return options_; }
  Clock& clock() const { return clock_; }

 private:
  friend class Span;
  // Starts `span` (inert) as a child of `parent` or a new root; true when it is sampled, and
  // then its record has ids, kind and start filled in.
  bool Begin(Span& span, SpanKind kind, const std::optional<SpanContext>& parent);
  // Puts `record` into the ring (and a copy into the export queue).
  void Record(std::unique_ptr<tracer_internal::SpanRecord> record);
  SpanData ToSpanData(const tracer_internal::SpanRecord& record) const;
  void Enqueue(std::shared_ptr<const SpanData> span);
  bool ExportReady() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(queue_mu_);
  void ExportLoop();
  void CountDropped(prometheus::Counter& counter, uint64_t n);

  const TracerOptions options_;
  Clock& clock_;
  std::unique_ptr<SpanExporter> exporter_;

  prometheus::Counter& exported_counter_;
  prometheus::Counter& dropped_queue_full_counter_;
  prometheus::Counter& dropped_export_failed_counter_;
  prometheus::Counter& dropped_shutdown_counter_;
  prometheus::Counter& export_failures_counter_;
  std::atomic<uint64_t> spans_recorded_{0};
  std::atomic<uint64_t> spans_exported_{0};
  std::atomic<uint64_t> spans_dropped_{0};
  std::atomic<uint64_t> export_failures_{0};

  // The ring: slot (next_ % size) is overwritten next. It grows up to ring_buffer_spans and
  // then replaces the oldest record, which goes back to the recording thread's pool. Every finished
  // span takes this lock, so it is a std::mutex: absl::Mutex as Debian builds it (without NDEBUG)
  // does deadlock detection bookkeeping on every acquisition, which costs more than the critical
  // section.
  mutable std::mutex ring_mu_;
  std::vector<std::unique_ptr<tracer_internal::SpanRecord>> ring_ ABSL_GUARDED_BY(ring_mu_);
  uint64_t ring_next_ ABSL_GUARDED_BY(ring_mu_) = 0;

  absl::Mutex queue_mu_;
  std::deque<std::shared_ptr<const SpanData>> queue_ ABSL_GUARDED_BY(queue_mu_);
  bool stopping_ ABSL_GUARDED_BY(queue_mu_) = false;
  absl::Time shutdown_deadline_ ABSL_GUARDED_BY(queue_mu_) = absl::InfiniteFuture();
  bool flush_requested_ ABSL_GUARDED_BY(queue_mu_) = false;
  uint64_t enqueued_ ABSL_GUARDED_BY(queue_mu_) = 0;  // ever accepted into the queue
  uint64_t handled_ ABSL_GUARDED_BY(queue_mu_) = 0;   // ever exported, failed or dropped

  std::once_flag shutdown_once_;
  std::thread export_thread_;
};

// The process-wide tracer. Until ConfigureGlobalTracer is called it is a tracer with default
// options (ring buffer only). Never destroyed, so references to it stay valid.
Tracer& GlobalTracer();

// Validates `options` and makes a new global tracer from them. Meant to be called once by main
// before servers start; a later call replaces the tracer for subsequent GlobalTracer() calls and
// shuts the old one down (it stays alive, so references held elsewhere remain valid).
absl::Status ConfigureGlobalTracer(TracerOptions options);

// Flushes and stops the global tracer's exporter (on drain, before exit).
void ShutdownGlobalTracer(absl::Duration timeout = absl::Seconds(5));

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_TRACER_H_
