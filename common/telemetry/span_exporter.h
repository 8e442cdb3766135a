// Where finished spans go after the ring buffer: the interface the tracer's export thread calls,
// and the HTTP exporters (Zipkin v2 JSON, OTLP/HTTP JSON) that implement it.
#ifndef MONTAGE_COMMON_TELEMETRY_SPAN_EXPORTER_H_
#define MONTAGE_COMMON_TELEMETRY_SPAN_EXPORTER_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/telemetry/span_data.h"

namespace montage::telemetry {

// Sends batches of spans somewhere. Export is called by one thread at a time (the tracer's
// export thread) and may block, but must return by `deadline`. Implementations need not be
// thread-safe.
class SpanExporter {
 public:
  virtual ~SpanExporter() = default;
  virtual absl::Status Export(absl::Span<const SpanData* const> spans, absl::Time deadline) = 0;
};

enum class SpanFormat { kZipkin, kOtlp };

// POSTs each batch as JSON (Content-Type: application/json) to `endpoint`, e.g.
// http://127.0.0.1:9411/api/v2/spans (Zipkin) or http://127.0.0.1:4318/v1/traces (OTLP), with
// a blocking libcurl easy handle that keeps its connection between batches. Any 2xx answer is
// success; other answers and transport errors are UNAVAILABLE. No retries: the next batch is
// the retry.
std::unique_ptr<SpanExporter> MakeHttpSpanExporter(
    SpanFormat format, std::string endpoint, absl::Duration connect_timeout = absl::Seconds(2));

// OK when `endpoint` is an absolute http or https URL.
absl::Status ValidateExportEndpoint(absl::string_view endpoint);

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_SPAN_EXPORTER_H_
