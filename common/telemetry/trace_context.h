// Trace context and its propagation: W3C Trace Context (`traceparent`, `tracestate`) and B3
// (`b3` single header and the `x-b3-*` headers). The same functions serve gRPC metadata and HTTP
// headers: callers pass a lookup (name -> value) and a setter, so nothing here knows either.
#ifndef MONTAGE_COMMON_TELEMETRY_TRACE_CONTEXT_H_
#define MONTAGE_COMMON_TELEMETRY_TRACE_CONTEXT_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/strings/string_view.h"

namespace montage::telemetry {

using TraceId = std::array<uint8_t, 16>;
using SpanId = std::array<uint8_t, 8>;

// Header names, lowercase as gRPC metadata requires.
inline constexpr char kTraceparentHeader[] = "traceparent";
inline constexpr char kTracestateHeader[] = "tracestate";
inline constexpr char kB3Header[] = "b3";
inline constexpr char kB3TraceIdHeader[] = "x-b3-traceid";
inline constexpr char kB3SpanIdHeader[] = "x-b3-spanid";
inline constexpr char kB3ParentSpanIdHeader[] = "x-b3-parentspanid";
inline constexpr char kB3SampledHeader[] = "x-b3-sampled";
inline constexpr char kB3FlagsHeader[] = "x-b3-flags";

// Identifies one span of one trace, as it travels between processes. A plain value.
struct SpanContext {
  TraceId trace_id{};
  SpanId span_id{};
  bool sampled = false;
  // B3 allows a caller to send ids without a sampling decision; the receiver then decides.
  // When true, `sampled` carries no meaning.
  bool sampling_deferred = false;
  // W3C tracestate, passed through untouched (vendor data), empty when absent.
  std::string tracestate;

  // Both ids are non-zero.
  bool IsValid() const;
  std::string TraceIdHex() const;
  std::string SpanIdHex() const;

  friend bool operator==(const SpanContext& a, const SpanContext& b) {
    return a.trace_id == b.trace_id && a.span_id == b.span_id && a.sampled == b.sampled &&
           a.sampling_deferred == b.sampling_deferred && a.tracestate == b.tracestate;
  }
  friend bool operator!=(const SpanContext& a, const SpanContext& b) { return !(a == b); }
};

// Lowercase hex of the bytes.
std::string ToHex(const TraceId& id);
std::string ToHex(const SpanId& id);
// Parses exactly 32 (trace) or 16 (span) hex digits. Uppercase is accepted only when
// `allow_uppercase` (B3 is lenient there, W3C is not).
std::optional<TraceId> TraceIdFromHex(absl::string_view hex, bool allow_uppercase = false);
std::optional<SpanId> SpanIdFromHex(absl::string_view hex, bool allow_uppercase = false);

bool IsZero(const TraceId& id);
bool IsZero(const SpanId& id);

// W3C traceparent "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>". Rejects bad lengths,
// non-lowercase hex, all-zero ids and version ff; a future version may append fields after a
// '-', which are ignored. The result's tracestate is empty.
std::optional<SpanContext> ParseTraceparent(absl::string_view value);
std::string FormatTraceparent(const SpanContext& ctx);

// B3 single header "<trace id>-<span id>[-<sampled 0|1|d>[-<parent span id>]]". A 64-bit
// (16 hex) trace id is widened to 128 bits with leading zeros. The sampling-only forms ("0",
// "1", "d") carry no ids and yield nullopt.
std::optional<SpanContext> ParseB3Single(absl::string_view value);
std::string FormatB3Single(const SpanContext& ctx);

// Looks a header up by its lowercase name; the returned view must stay valid until the next
// call. Callers over case-insensitive HTTP headers map the case themselves.
using HeaderLookup = absl::FunctionRef<std::optional<absl::string_view>(absl::string_view name)>;
using HeaderSetter = absl::FunctionRef<void(absl::string_view name, absl::string_view value)>;

// B3 multi-header form (x-b3-traceid, x-b3-spanid, x-b3-sampled, x-b3-flags).
std::optional<SpanContext> ExtractB3Multi(HeaderLookup lookup);

// The caller's span context: traceparent (with tracestate) if valid, else `b3`, else x-b3-*.
std::optional<SpanContext> Extract(HeaderLookup lookup);

// Writes traceparent (and tracestate when not empty) and x-b3-traceid, x-b3-spanid and
// x-b3-sampled (omitted when the decision is deferred).
void Inject(const SpanContext& ctx, HeaderSetter setter);

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_TRACE_CONTEXT_H_
