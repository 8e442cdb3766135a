// JSON forms of finished spans: Zipkin v2 (POST /api/v2/spans), OTLP/HTTP JSON (POST
// /v1/traces) and the waterfall document behind the gateway's /debug/traces page.
// Pure functions; invalid UTF-8 in names or attributes is replaced, never fatal.
#ifndef MONTAGE_COMMON_TELEMETRY_SPAN_JSON_H_
#define MONTAGE_COMMON_TELEMETRY_SPAN_JSON_H_

#include <string>

#include "absl/types/span.h"
#include "common/telemetry/span_data.h"

namespace montage::telemetry {

// A Zipkin v2 span list: [{traceId, id, parentId?, name, kind?, timestamp (µs), duration (µs),
// localEndpoint{serviceName}, tags{...}, annotations[{timestamp, value}]}]. Attribute values
// become strings; an ERROR status adds the "error" tag.
std::string ZipkinJson(absl::Span<const SpanData* const> spans);
std::string ZipkinJson(absl::Span<const SpanData> spans);

// An OTLP ExportTraceServiceRequest in the protobuf JSON mapping (ids as hex, 64-bit integers as
// strings), one resourceSpans entry per service name, scope "montage".
std::string OtlpJson(absl::Span<const SpanData* const> spans);
std::string OtlpJson(absl::Span<const SpanData> spans);

// {"traces": [{traceId, rootName, startUnixMicros, durationMicros, spanCount, spans: [{spanId,
// parentSpanId, name, kind, service, startUnixMicros, offsetMicros, durationMicros, attributes,
// status{code, message}, events[{name, offsetMicros}]}]}]}: spans grouped by trace, each trace's
// spans ordered by start time, traces newest first. A span whose parent is not in the list is
// shown as a root of its trace.
std::string TracesWaterfallJson(absl::Span<const SpanData> spans);

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_SPAN_JSON_H_
