#include "common/telemetry/trace_context.h"

#include <algorithm>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace montage::telemetry {
namespace {

constexpr char kHexDigits[] = "0123456789abcdef";
// Tracestate beyond this is dropped rather than forwarded (W3C: at least 512 must be kept).
constexpr size_t kMaxTracestateLength = 512;

int HexValue(char c, bool allow_uppercase) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (allow_uppercase && c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

template <size_t N>
std::string BytesToHex(const std::array<uint8_t, N>& bytes) {
  std::string out(2 * N, '0');
  for (size_t i = 0; i < N; ++i) {
    out[2 * i] = kHexDigits[bytes[i] >> 4];
    out[2 * i + 1] = kHexDigits[bytes[i] & 0xf];
  }
  return out;
}

template <size_t N>
std::optional<std::array<uint8_t, N>> HexToBytes(absl::string_view hex, bool allow_uppercase) {
  if (hex.size() != 2 * N) return std::nullopt;
  std::array<uint8_t, N> bytes{};
  for (size_t i = 0; i < N; ++i) {
    const int hi = HexValue(hex[2 * i], allow_uppercase);
    const int lo = HexValue(hex[2 * i + 1], allow_uppercase);
    if (hi < 0 || lo < 0) return std::nullopt;
    bytes[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return bytes;
}

template <size_t N>
bool AllZero(const std::array<uint8_t, N>& bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b == 0; });
}

// B3 trace ids are 64 or 128 bits; 64-bit ids are the low half of a 128-bit one.
std::optional<TraceId> B3TraceId(absl::string_view hex) {
  if (hex.size() == 16) {
    auto low = HexToBytes<8>(hex, /*allow_uppercase=*/true);
    if (!low) return std::nullopt;
    TraceId id{};
    std::copy(low->begin(), low->end(), id.begin() + 8);
    return id;
  }
  return HexToBytes<16>(hex, /*allow_uppercase=*/true);
}

}  // namespace

bool SpanContext::IsValid() const { return !AllZero(trace_id) && !AllZero(span_id); }
std::string SpanContext::TraceIdHex() const { return BytesToHex(trace_id); }
std::string SpanContext::SpanIdHex() const { return BytesToHex(span_id); }

std::string ToHex(const TraceId& id) { return BytesToHex(id); }
std::string ToHex(const SpanId& id) { return BytesToHex(id); }

std::optional<TraceId> TraceIdFromHex(absl::string_view hex, bool allow_uppercase) {
  return HexToBytes<16>(hex, allow_uppercase);
}
std::optional<SpanId> SpanIdFromHex(absl::string_view hex, bool allow_uppercase) {
  return HexToBytes<8>(hex, allow_uppercase);
}

bool IsZero(const TraceId& id) { return AllZero(id); }
bool IsZero(const SpanId& id) { return AllZero(id); }

std::optional<SpanContext> ParseTraceparent(absl::string_view value) {
  // version(2) '-' trace-id(32) '-' parent-id(16) '-' flags(2) = 55 characters.
  constexpr size_t kLength = 55;
  value = absl::StripAsciiWhitespace(value);
  if (value.size() < kLength) return std::nullopt;
  const auto version = HexToBytes<1>(value.substr(0, 2), /*allow_uppercase=*/false);
  if (!version || (*version)[0] == 0xff) return std::nullopt;
  if ((*version)[0] == 0x00 && value.size() != kLength) return std::nullopt;
  // Later versions may append fields, always after a '-'.
  if (value.size() > kLength && value[kLength] != '-') return std::nullopt;
  if (value[2] != '-' || value[35] != '-' || value[52] != '-') return std::nullopt;
  const auto trace_id = HexToBytes<16>(value.substr(3, 32), /*allow_uppercase=*/false);
  const auto span_id = HexToBytes<8>(value.substr(36, 16), /*allow_uppercase=*/false);
  const auto flags = HexToBytes<1>(value.substr(53, 2), /*allow_uppercase=*/false);
  if (!trace_id || !span_id || !flags || AllZero(*trace_id) || AllZero(*span_id)) {
    return std::nullopt;
  }
  SpanContext ctx;
  ctx.trace_id = *trace_id;
  ctx.span_id = *span_id;
  ctx.sampled = ((*flags)[0] & 0x01) != 0;
  return ctx;
}

std::string FormatTraceparent(const SpanContext& ctx) {
  const bool sampled = ctx.sampled && !ctx.sampling_deferred;
  return absl::StrCat("00-", BytesToHex(ctx.trace_id), "-", BytesToHex(ctx.span_id),
                      sampled ? "-01" : "-00");
}

std::optional<SpanContext> ParseB3Single(absl::string_view value) {
  value = absl::StripAsciiWhitespace(value);
  const std::vector<absl::string_view> parts = absl::StrSplit(value, '-');
  if (parts.size() < 2 || parts.size() > 4) return std::nullopt;
  const auto trace_id = B3TraceId(parts[0]);
  const auto span_id = HexToBytes<8>(parts[1], /*allow_uppercase=*/true);
  if (!trace_id || !span_id || AllZero(*trace_id) || AllZero(*span_id)) return std::nullopt;
  SpanContext ctx;
  ctx.trace_id = *trace_id;
  ctx.span_id = *span_id;
  ctx.sampling_deferred = true;
  if (parts.size() >= 3) {
    if (parts[2] == "1" || parts[2] == "d") {
      ctx.sampled = true;
    } else if (parts[2] != "0") {
      return std::nullopt;
    }
    ctx.sampling_deferred = false;
  }
  if (parts.size() == 4) {
    const auto parent = HexToBytes<8>(parts[3], /*allow_uppercase=*/true);
    if (!parent || AllZero(*parent)) return std::nullopt;
  }
  return ctx;
}

std::string FormatB3Single(const SpanContext& ctx) {
  std::string out = absl::StrCat(BytesToHex(ctx.trace_id), "-", BytesToHex(ctx.span_id));
  if (!ctx.sampling_deferred) absl::StrAppend(&out, ctx.sampled ? "-1" : "-0");
  return out;
}

std::optional<SpanContext> ExtractB3Multi(HeaderLookup lookup) {
  const auto trace_hex = lookup(kB3TraceIdHeader);
  const auto span_hex = lookup(kB3SpanIdHeader);
  if (!trace_hex || !span_hex) return std::nullopt;
  const auto trace_id = B3TraceId(absl::StripAsciiWhitespace(*trace_hex));
  const auto span_id = HexToBytes<8>(absl::StripAsciiWhitespace(*span_hex), true);
  if (!trace_id || !span_id || AllZero(*trace_id) || AllZero(*span_id)) return std::nullopt;
  SpanContext ctx;
  ctx.trace_id = *trace_id;
  ctx.span_id = *span_id;
  ctx.sampling_deferred = true;
  if (const auto flags = lookup(kB3FlagsHeader);
      flags && absl::StripAsciiWhitespace(*flags) == "1") {
    ctx.sampled = true;  // debug
    ctx.sampling_deferred = false;
  } else if (const auto sampled = lookup(kB3SampledHeader)) {
    const absl::string_view s = absl::StripAsciiWhitespace(*sampled);
    if (s == "1" || absl::EqualsIgnoreCase(s, "true")) {
      ctx.sampled = true;
      ctx.sampling_deferred = false;
    } else if (s == "0" || absl::EqualsIgnoreCase(s, "false")) {
      ctx.sampling_deferred = false;
    } else {
      return std::nullopt;
    }
  }
  return ctx;
}

std::optional<SpanContext> Extract(HeaderLookup lookup) {
  if (const auto traceparent = lookup(kTraceparentHeader)) {
    if (auto ctx = ParseTraceparent(*traceparent)) {
      if (const auto tracestate = lookup(kTracestateHeader);
          tracestate && tracestate->size() <= kMaxTracestateLength) {
        ctx->tracestate = std::string(absl::StripAsciiWhitespace(*tracestate));
      }
      return ctx;
    }
  }
  if (const auto b3 = lookup(kB3Header)) {
    if (auto ctx = ParseB3Single(*b3)) return ctx;
  }
  return ExtractB3Multi(lookup);
}

void Inject(const SpanContext& ctx, HeaderSetter setter) {
  setter(kTraceparentHeader, FormatTraceparent(ctx));
  if (!ctx.tracestate.empty()) setter(kTracestateHeader, ctx.tracestate);
  setter(kB3TraceIdHeader, BytesToHex(ctx.trace_id));
  setter(kB3SpanIdHeader, BytesToHex(ctx.span_id));
  if (!ctx.sampling_deferred) setter(kB3SampledHeader, ctx.sampled ? "1" : "0");
}

}  // namespace montage::telemetry
