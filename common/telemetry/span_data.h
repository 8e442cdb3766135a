// A finished span as the tracer records it: what the debug pages show and the exporters send.
#ifndef MONTAGE_COMMON_TELEMETRY_SPAN_DATA_H_
#define MONTAGE_COMMON_TELEMETRY_SPAN_DATA_H_

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/telemetry/trace_context.h"

namespace montage::telemetry {

// Who the span speaks for. OTLP numbers: INTERNAL=1, SERVER=2, CLIENT=3.
enum class SpanKind { kInternal, kServer, kClient };

// OpenTelemetry's status: UNSET unless someone said otherwise.
enum class SpanStatusCode { kUnset, kOk, kError };

absl::string_view SpanKindName(SpanKind kind);              // "INTERNAL", "SERVER", "CLIENT"
absl::string_view SpanStatusCodeName(SpanStatusCode code);  // "UNSET", "OK", "ERROR"

using AttributeValue = std::variant<std::string, int64_t, double, bool>;

struct SpanEvent {
  std::string name;
  absl::Time time;
};

// A plain value; copies are independent.
struct SpanData {
  std::string name;
  std::string service_name;
  TraceId trace_id{};
  SpanId span_id{};
  // All zero for a root span.
  SpanId parent_span_id{};
  SpanKind kind = SpanKind::kInternal;
  absl::Time start;
  absl::Time end;
  // In the order first set; setting a key again replaces its value.
  std::vector<std::pair<std::string, AttributeValue>> attributes;
  SpanStatusCode status_code = SpanStatusCode::kUnset;
  std::string status_message;
  std::vector<SpanEvent> events;

  bool IsRoot() const { return IsZero(parent_span_id); }
  // The value of attribute `key`, or nullptr.
  const AttributeValue* FindAttribute(absl::string_view key) const;
};

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_SPAN_DATA_H_
