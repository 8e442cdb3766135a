#include "common/telemetry/tracer.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "absl/random/distributions.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/span_json.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"

namespace montage::telemetry {
namespace {

// Trace and span ids come from a per-thread xoshiro256++ generator seeded from absl::BitGen
// (OS entropy) on the thread's first use: a few instructions per id, no lock, no system call.
// Ids must be unique and unpredictable enough to not collide, not secret.
class FastRandom {
 public:
  uint64_t Next() {
    if (!seeded_) Seed();
    const uint64_t result = Rotl(s_[0] + s_[3], 23) + s_[0];
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }

  // True with probability `p` (0 < p < 1).
  bool Bernoulli(double p) { return static_cast<double>(Next() >> 11) * 0x1.0p-53 < p; }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

  void Seed() {
    absl::BitGen gen;
    do {
      for (uint64_t& word : s_) word = absl::Uniform<uint64_t>(gen);
    } while ((s_[0] | s_[1] | s_[2] | s_[3]) == 0);  // the one state xoshiro cannot leave
    seeded_ = true;
  }

  // Trivially constructible, so the thread_local below needs no initialisation guard.
  uint64_t s_[4];
  bool seeded_;
};

FastRandom& ThreadRandom() {
  thread_local FastRandom random;
  return random;
}

template <size_t N>
std::array<uint8_t, N> RandomNonZeroId() {
  static_assert(N % 8 == 0);
  FastRandom& random = ThreadRandom();
  std::array<uint8_t, N> id{};
  uint64_t any = 0;
  do {
    for (size_t i = 0; i < N; i += 8) {
      const uint64_t bits = random.Next();
      any |= bits;
      std::memcpy(id.data() + i, &bits, sizeof(bits));
    }
  } while (any == 0);
  return id;
}

// Span records are recycled per thread: a span takes one when it starts and the ring gives back
// the one it evicts when the span ends, so once the ring is full a span allocates nothing. A
// few records per thread are kept; they hold no references (Clear drops the template).
class RecordPool {
 public:
  std::unique_ptr<tracer_internal::SpanRecord> Take() {
    if (size_ == 0) return std::make_unique<tracer_internal::SpanRecord>();
    return std::move(free_[--size_]);
  }

  void Give(std::unique_ptr<tracer_internal::SpanRecord> record) {
    if (size_ == free_.size()) return;  // freed here
    record->Clear();
    free_[size_++] = std::move(record);
  }

 private:
  std::array<std::unique_ptr<tracer_internal::SpanRecord>, 4> free_;
  size_t size_ = 0;
};

RecordPool& ThreadRecordPool() {
  thread_local RecordPool pool;
  return pool;
}

prometheus::Family<prometheus::Counter>& CounterFamily(prometheus::Registry& registry,
                                                       const std::string& name,
                                                       const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry);
}

prometheus::Counter& DroppedCounter(prometheus::Registry& registry, const std::string& reason) {
  return CounterFamily(registry, "montage_trace_spans_dropped_total",
                       "Finished spans that were not exported, by reason.")
      .Add({{"reason", reason}});
}

std::unique_ptr<SpanExporter> ExporterFor(const TracerOptions& options) {
  switch (options.exporter) {
    case ExporterKind::kNone:
      return nullptr;
    case ExporterKind::kZipkin:
      return MakeHttpSpanExporter(SpanFormat::kZipkin, options.endpoint);
    case ExporterKind::kOtlp:
      return MakeHttpSpanExporter(SpanFormat::kOtlp, options.endpoint);
  }
  return nullptr;
}

prometheus::Registry& RegistryOr(prometheus::Registry* registry) {
  return registry != nullptr ? *registry : MetricsRegistry();
}

// The constructor cannot fail: options that were not validated are made harmless.
TracerOptions Sanitized(TracerOptions options) {
  if (!(options.sample_ratio > 0.0)) options.sample_ratio = 0.0;  // NaN included
  if (options.sample_ratio > 1.0) options.sample_ratio = 1.0;
  options.ring_buffer_spans = std::max<size_t>(1, options.ring_buffer_spans);
  options.max_export_batch = std::max<size_t>(1, options.max_export_batch);
  options.max_export_queue = std::max<size_t>(1, options.max_export_queue);
  if (options.export_interval <= absl::ZeroDuration()) options.export_interval = absl::Seconds(1);
  if (options.export_timeout <= absl::ZeroDuration()) options.export_timeout = absl::Seconds(5);
  return options;
}

}  // namespace

absl::Status ValidateTracerOptions(const TracerOptions& options) {
  if (!(options.sample_ratio >= 0.0 && options.sample_ratio <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tracing.sample_ratio: must be within [0, 1], got ", options.sample_ratio));
  }
  if (options.ring_buffer_spans == 0) {
    return absl::InvalidArgumentError("tracing.ring_buffer_spans: must be positive");
  }
  if (options.exporter == ExporterKind::kNone) return absl::OkStatus();
  if (options.endpoint.empty()) {
    return absl::InvalidArgumentError("tracing.endpoint: required when an exporter is set");
  }
  if (absl::Status status = ValidateExportEndpoint(options.endpoint); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tracing.endpoint: ", status.message()));
  }
  if (options.export_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("tracing.export_interval: must be positive");
  }
  if (options.max_export_batch == 0) {
    return absl::InvalidArgumentError("tracing.max_export_batch: must be positive");
  }
  if (options.max_export_queue == 0) {
    return absl::InvalidArgumentError("tracing.max_export_queue: must be positive");
  }
  if (options.export_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("tracing.export_timeout: must be positive");
  }
  return absl::OkStatus();
}

// ----------------------------------------------------------------------------------------------
// Span

int SpanTemplate::Find(absl::string_view key) const {
  for (size_t i = 0; i < attributes_.size(); ++i) {
    if (attributes_[i].first == key) return static_cast<int>(i);
  }
  return -1;
}

namespace tracer_internal {

void SpanRecord::Clear() {
  span_template.reset();
  name.clear();
  parent_span_id = {};
  kind = SpanKind::kInternal;
  template_overrides.clear();
  attributes.clear();
  status_code = SpanStatusCode::kUnset;
  status_message.clear();
  events.clear();
}

}  // namespace tracer_internal

Span::Span(Span&& other) noexcept
    : tracer_(std::exchange(other.tracer_, nullptr)),
      context_(std::move(other.context_)),
      record_(std::move(other.record_)) {}

Span& Span::operator=(Span&& other) noexcept {
  if (this != &other) {
    End();
    tracer_ = std::exchange(other.tracer_, nullptr);
    context_ = std::move(other.context_);
    record_ = std::move(other.record_);
  }
  return *this;
}

void Span::Set(absl::string_view key, AttributeValue value) {
  tracer_internal::SpanRecord& record = *record_;
  if (record.span_template != nullptr) {
    if (const int index = record.span_template->Find(key); index >= 0) {
      for (auto& [i, v] : record.template_overrides) {
        if (i == index) {
          v = std::move(value);
          return;
        }
      }
      record.template_overrides.emplace_back(index, std::move(value));
      return;
    }
  }
  for (auto& [k, v] : record.attributes) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  record.attributes.emplace_back(std::string(key), std::move(value));
}

void Span::SetAttribute(absl::string_view key, absl::string_view value) {
  if (record_ != nullptr) Set(key, std::string(value));
}
void Span::SetAttribute(absl::string_view key, double value) {
  if (record_ != nullptr) Set(key, value);
}
void Span::SetAttribute(absl::string_view key, bool value) {
  if (record_ != nullptr) Set(key, value);
}
void Span::SetIntAttribute(absl::string_view key, int64_t value) {
  if (record_ != nullptr) Set(key, value);
}

void Span::SetStatus(SpanStatusCode code, absl::string_view message) {
  if (record_ == nullptr) return;
  record_->status_code = code;
  record_->status_message.assign(message.data(), message.size());
}

void Span::AddEvent(absl::string_view name) {
  if (record_ == nullptr) return;
  record_->events.push_back({std::string(name), tracer_->clock().Now()});
}

void Span::End() {
  if (record_ == nullptr) return;
  record_->end = tracer_->clock().Now();
  tracer_->Record(std::move(record_));
}

// ----------------------------------------------------------------------------------------------
// Tracer

Tracer::Tracer(TracerOptions options, TracerDeps deps)
    : options_(Sanitized(std::move(options))),
      clock_(deps.clock != nullptr ? *deps.clock : RealClock()),
      exporter_(deps.exporter != nullptr ? std::move(deps.exporter) : ExporterFor(options_)),
      exported_counter_(CounterFamily(RegistryOr(deps.registry),
                                      "montage_trace_spans_exported_total",
                                      "Spans accepted by the trace collector.")
                            .Add({})),
      dropped_queue_full_counter_(DroppedCounter(RegistryOr(deps.registry), "queue_full")),
      dropped_export_failed_counter_(DroppedCounter(RegistryOr(deps.registry), "export_failed")),
      dropped_shutdown_counter_(DroppedCounter(RegistryOr(deps.registry), "shutdown")),
      export_failures_counter_(CounterFamily(RegistryOr(deps.registry),
                                             "montage_trace_export_failures_total",
                                             "Span export requests that failed.")
                                   .Add({})),
      ring_() {
  if (exporter_ != nullptr) export_thread_ = std::thread([this] { ExportLoop(); });
}

Tracer::~Tracer() { Shutdown(); }

bool Tracer::Begin(Span& span, SpanKind kind, const std::optional<SpanContext>& parent) {
  span.tracer_ = this;
  SpanContext& ctx = span.context_;
  const bool has_parent = parent.has_value() && parent->IsValid();
  if (has_parent) {
    ctx.trace_id = parent->trace_id;
    ctx.tracestate = parent->tracestate;
  } else {
    ctx.trace_id = RandomNonZeroId<16>();
  }
  ctx.span_id = RandomNonZeroId<8>();
  if (has_parent && !parent->sampling_deferred) {
    ctx.sampled = parent->sampled;
  } else if (options_.sample_ratio >= 1.0) {
    ctx.sampled = true;
  } else if (options_.sample_ratio == 0.0) {
    ctx.sampled = false;
  } else {
    ctx.sampled = ThreadRandom().Bernoulli(options_.sample_ratio);
  }
  if (!ctx.sampled) return false;

  span.record_ = ThreadRecordPool().Take();
  tracer_internal::SpanRecord& record = *span.record_;
  record.trace_id = ctx.trace_id;
  record.span_id = ctx.span_id;
  if (has_parent) record.parent_span_id = parent->span_id;
  record.kind = kind;
  record.start = clock_.Now();
  return true;
}

Span Tracer::StartSpan(absl::string_view name, SpanKind kind,
                       const std::optional<SpanContext>& parent) {
  Span span;
  if (Begin(span, kind, parent)) span.record_->name.assign(name.data(), name.size());
  return span;
}

Span Tracer::StartSpan(const std::shared_ptr<const SpanTemplate>& span_template, SpanKind kind,
                       const std::optional<SpanContext>& parent) {
  Span span;
  if (Begin(span, kind, parent)) span.record_->span_template = span_template;
  return span;
}

SpanData Tracer::ToSpanData(const tracer_internal::SpanRecord& record) const {
  SpanData data;
  const SpanTemplate* const span_template = record.span_template.get();
  data.name = span_template != nullptr ? span_template->name() : record.name;
  data.service_name = options_.service_name;
  data.trace_id = record.trace_id;
  data.span_id = record.span_id;
  data.parent_span_id = record.parent_span_id;
  data.kind = record.kind;
  data.start = record.start;
  data.end = record.end;
  if (span_template != nullptr) {
    data.attributes.reserve(span_template->attributes().size() + record.attributes.size());
    data.attributes = span_template->attributes();
    for (const auto& [index, value] : record.template_overrides) {
      data.attributes[static_cast<size_t>(index)].second = value;
    }
  }
  data.attributes.insert(data.attributes.end(), record.attributes.begin(), record.attributes.end());
  data.status_code = record.status_code;
  data.status_message = record.status_message;
  data.events = record.events;
  return data;
}

void Tracer::Record(std::unique_ptr<tracer_internal::SpanRecord> record) {
  spans_recorded_.fetch_add(1, std::memory_order_relaxed);
  // The exporter gets its own copy, made only when there is an exporter.
  std::shared_ptr<const SpanData> exported;
  if (exporter_ != nullptr) exported = std::make_shared<const SpanData>(ToSpanData(*record));
  {
    std::lock_guard<std::mutex> lock(ring_mu_);
    if (ring_.size() < options_.ring_buffer_spans) {
      ring_.push_back(std::move(record));
    } else {
      ring_[ring_next_ % ring_.size()].swap(record);
    }
    ++ring_next_;
  }
  // `record` is now the evicted (oldest) span, if any: recycled outside the lock.
  if (record != nullptr) ThreadRecordPool().Give(std::move(record));
  if (exported != nullptr) Enqueue(std::move(exported));
}

void Tracer::Enqueue(std::shared_ptr<const SpanData> span) {
  prometheus::Counter* dropped = nullptr;
  {
    absl::MutexLock lock(&queue_mu_);
    if (stopping_) {
      dropped = &dropped_shutdown_counter_;
    } else if (queue_.size() >= options_.max_export_queue) {
      dropped = &dropped_queue_full_counter_;
    } else {
      queue_.push_back(std::move(span));
      ++enqueued_;
    }
  }
  if (dropped != nullptr) CountDropped(*dropped, 1);
}

void Tracer::CountDropped(prometheus::Counter& counter, uint64_t n) {
  spans_dropped_.fetch_add(n, std::memory_order_relaxed);
  counter.Increment(static_cast<double>(n));
}

bool Tracer::ExportReady() const {
  return stopping_ || queue_.size() >= options_.max_export_batch ||
         (flush_requested_ && !queue_.empty());
}

void Tracer::ExportLoop() {
  std::vector<std::shared_ptr<const SpanData>> batch;
  std::vector<const SpanData*> pointers;
  while (true) {
    absl::Time deadline;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.AwaitWithTimeout(absl::Condition(this, &Tracer::ExportReady),
                                 options_.export_interval);
      if (queue_.empty()) {
        flush_requested_ = false;
        if (stopping_) return;
        continue;
      }
      const absl::Time now = absl::Now();
      if (stopping_ && now >= shutdown_deadline_) {
        const uint64_t n = queue_.size();
        queue_.clear();
        handled_ += n;
        CountDropped(dropped_shutdown_counter_, n);
        return;
      }
      const size_t n = std::min(queue_.size(), options_.max_export_batch);
      for (size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      if (queue_.empty()) flush_requested_ = false;
      deadline = std::min(now + options_.export_timeout, shutdown_deadline_);
    }
    pointers.clear();
    for (const auto& span : batch) pointers.push_back(span.get());
    const absl::Status status = exporter_->Export(pointers, deadline);
    if (status.ok()) {
      spans_exported_.fetch_add(batch.size(), std::memory_order_relaxed);
      exported_counter_.Increment(static_cast<double>(batch.size()));
    } else {
      export_failures_.fetch_add(1, std::memory_order_relaxed);
      export_failures_counter_.Increment();
      CountDropped(dropped_export_failed_counter_, batch.size());
    }
    const size_t n = batch.size();
    batch.clear();
    absl::MutexLock lock(&queue_mu_);
    handled_ += n;
  }
}

std::vector<SpanData> Tracer::RecentSpans(size_t max) const {
  // Copied in small chunks so that a large ring never holds up the requests ending spans. Spans
  // overwritten between chunks (the oldest ones) are skipped; spans finished meanwhile are not
  // included.
  constexpr uint64_t kChunk = 64;
  uint64_t next;
  uint64_t end;
  {
    std::lock_guard<std::mutex> lock(ring_mu_);
    end = ring_next_;
    next = end - std::min<uint64_t>({max, ring_next_, ring_.size()});
  }
  std::vector<SpanData> out;
  out.reserve(end - next);
  while (next < end) {
    std::lock_guard<std::mutex> lock(ring_mu_);
    const uint64_t size = ring_.size();
    next = std::max(next, ring_next_ - std::min<uint64_t>(ring_next_, size));
    for (const uint64_t stop = std::min(end, next + kChunk); next < stop; ++next) {
      out.push_back(ToSpanData(*ring_[next % size]));
    }
  }
  return out;
}

std::string Tracer::RecentTracesJson(size_t max) const {
  return TracesWaterfallJson(RecentSpans(max));
}

bool Tracer::ForceFlush(absl::Duration timeout) {
  if (exporter_ == nullptr) return true;
  absl::MutexLock lock(&queue_mu_);
  const uint64_t target = enqueued_;
  if (handled_ >= target) return true;
  flush_requested_ = true;
  struct Done {
    const Tracer* tracer;
    uint64_t target;
    bool operator()() const ABSL_NO_THREAD_SAFETY_ANALYSIS { return tracer->handled_ >= target; }
  } done{this, target};
  return queue_mu_.AwaitWithTimeout(absl::Condition(&done), timeout);
}

void Tracer::Shutdown(absl::Duration timeout) {
  std::call_once(shutdown_once_, [&] {
    {
      absl::MutexLock lock(&queue_mu_);
      stopping_ = true;
      shutdown_deadline_ = absl::Now() + timeout;
    }
    if (export_thread_.joinable()) export_thread_.join();
  });
}

Tracer::Stats Tracer::stats() const {
  Stats stats;
  stats.spans_recorded = spans_recorded_.load(std::memory_order_relaxed);
  stats.spans_exported = spans_exported_.load(std::memory_order_relaxed);
  stats.spans_dropped = spans_dropped_.load(std::memory_order_relaxed);
  stats.export_failures = export_failures_.load(std::memory_order_relaxed);
  return stats;
}

// ----------------------------------------------------------------------------------------------
// The global tracer

namespace {

std::atomic<Tracer*>& GlobalTracerSlot() {
  static std::atomic<Tracer*> slot{nullptr};
  return slot;
}

}  // namespace

Tracer& GlobalTracer() {
  std::atomic<Tracer*>& slot = GlobalTracerSlot();
  Tracer* tracer = slot.load(std::memory_order_acquire);
  if (tracer != nullptr) return *tracer;
  // Leaked on purpose, like every global tracer: references to it must never dangle.
  auto* fresh = new Tracer(TracerOptions{});
  if (slot.compare_exchange_strong(tracer, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread won; `tracer` now holds its value
  return *tracer;
}

absl::Status ConfigureGlobalTracer(TracerOptions options) {
  if (absl::Status status = ValidateTracerOptions(options); !status.ok()) return status;
  auto* fresh = new Tracer(std::move(options));
  Tracer* old = GlobalTracerSlot().exchange(fresh, std::memory_order_acq_rel);
  if (old != nullptr) {
    // Someone may still hold a reference: stop its exporter but keep it alive (and reachable).
    old->Shutdown();
    static absl::Mutex retired_mu(absl::kConstInit);
    static auto* const retired = new std::vector<Tracer*>();
    absl::MutexLock lock(&retired_mu);
    retired->push_back(old);
  }
  return absl::OkStatus();
}

void ShutdownGlobalTracer(absl::Duration timeout) { GlobalTracer().Shutdown(timeout); }

}  // namespace montage::telemetry
