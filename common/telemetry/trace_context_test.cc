#include "common/telemetry/trace_context.h"

#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::telemetry {
namespace {

using ::testing::Optional;

constexpr char kTraceHex[] = "4bf92f3577b34da6a3ce929d0e0e4736";
constexpr char kSpanHex[] = "00f067aa0ba902b7";
constexpr char kTraceparent[] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// Headers as a test double for both gRPC metadata and HTTP headers.
class Headers {
 public:
  Headers() = default;
  Headers(std::initializer_list<std::pair<const std::string, std::string>> init) : map_(init) {}

  std::optional<absl::string_view> Lookup(absl::string_view name) const {
    auto it = map_.find(std::string(name));
    if (it == map_.end()) return std::nullopt;
    return absl::string_view(it->second);
  }
  void Set(absl::string_view name, absl::string_view value) {
    map_[std::string(name)] = std::string(value);
  }
  auto Lookuper() const {
    return [this](absl::string_view name) { return Lookup(name); };
  }
  const std::map<std::string, std::string>& map() const { return map_; }

 private:
  std::map<std::string, std::string> map_;
};

TEST(HexTest, RoundTrips) {
  const auto trace_id = TraceIdFromHex(kTraceHex);
  ASSERT_TRUE(trace_id.has_value());
  EXPECT_EQ(ToHex(*trace_id), kTraceHex);
  EXPECT_EQ((*trace_id)[0], 0x4b);
  const auto span_id = SpanIdFromHex(kSpanHex);
  ASSERT_TRUE(span_id.has_value());
  EXPECT_EQ(ToHex(*span_id), kSpanHex);
  EXPECT_FALSE(SpanIdFromHex("00F067AA0BA902B7").has_value());
  EXPECT_TRUE(SpanIdFromHex("00F067AA0BA902B7", /*allow_uppercase=*/true).has_value());
  EXPECT_FALSE(SpanIdFromHex("00f067aa0ba902b").has_value());
  EXPECT_FALSE(SpanIdFromHex("00f067aa0ba902bx").has_value());
}

TEST(TraceparentTest, ParsesAndFormatsTheSpecExample) {
  const auto ctx = ParseTraceparent(kTraceparent);
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), kTraceHex);
  EXPECT_EQ(ctx->SpanIdHex(), kSpanHex);
  EXPECT_TRUE(ctx->sampled);
  EXPECT_FALSE(ctx->sampling_deferred);
  EXPECT_TRUE(ctx->IsValid());
  EXPECT_EQ(FormatTraceparent(*ctx), kTraceparent);
}

TEST(TraceparentTest, UnsampledFlagRoundTrips) {
  const auto ctx = ParseTraceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
  ASSERT_TRUE(ctx.has_value());
  EXPECT_FALSE(ctx->sampled);
  EXPECT_EQ(FormatTraceparent(*ctx), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
  // Other flag bits do not change the sampled bit.
  const auto other = ParseTraceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03");
  ASSERT_TRUE(other.has_value());
  EXPECT_TRUE(other->sampled);
}

TEST(TraceparentTest, AcceptsFutureVersionsWithExtraFields) {
  const auto ctx =
      ParseTraceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future");
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), kTraceHex);
  EXPECT_FALSE(
      ParseTraceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what").has_value());
}

TEST(TraceparentTest, RejectsMalformedValues) {
  for (const char* bad : {
           "",
           "00",
           // all-zero trace id / span id
           "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
           // version ff
           "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
           // uppercase hex
           "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
           "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
           // bad lengths
           "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
           // version 00 must not have trailing data
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
           // bad separators / characters
           "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
       }) {
    EXPECT_FALSE(ParseTraceparent(bad).has_value()) << bad;
  }
}

TEST(B3Test, ParsesSingleHeaderForms) {
  auto ctx = ParseB3Single(absl::StrCat(kTraceHex, "-", kSpanHex, "-1-05e3ac9a4f6e3b90"));
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), kTraceHex);
  EXPECT_EQ(ctx->SpanIdHex(), kSpanHex);
  EXPECT_TRUE(ctx->sampled);
  EXPECT_FALSE(ctx->sampling_deferred);

  ctx = ParseB3Single(absl::StrCat(kTraceHex, "-", kSpanHex, "-0"));
  ASSERT_TRUE(ctx.has_value());
  EXPECT_FALSE(ctx->sampled);
  EXPECT_FALSE(ctx->sampling_deferred);

  ctx = ParseB3Single(absl::StrCat(kTraceHex, "-", kSpanHex, "-d"));
  ASSERT_TRUE(ctx.has_value());
  EXPECT_TRUE(ctx->sampled);

  // No sampling state: the receiver decides.
  ctx = ParseB3Single(absl::StrCat(kTraceHex, "-", kSpanHex));
  ASSERT_TRUE(ctx.has_value());
  EXPECT_TRUE(ctx->sampling_deferred);

  // A 64-bit trace id is the low half of a 128-bit one.
  ctx = ParseB3Single(absl::StrCat("a3ce929d0e0e4736-", kSpanHex, "-1"));
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), "0000000000000000a3ce929d0e0e4736");
}

TEST(B3Test, SingleHeaderRoundTrips) {
  const auto ctx = ParseB3Single(absl::StrCat(kTraceHex, "-", kSpanHex, "-1"));
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(FormatB3Single(*ctx), absl::StrCat(kTraceHex, "-", kSpanHex, "-1"));
  const auto deferred = ParseB3Single(absl::StrCat(kTraceHex, "-", kSpanHex));
  ASSERT_TRUE(deferred.has_value());
  EXPECT_EQ(FormatB3Single(*deferred), absl::StrCat(kTraceHex, "-", kSpanHex));
}

TEST(B3Test, RejectsMalformedSingleHeaders) {
  for (const std::string& bad : {
           std::string("0"),
           std::string("1"),
           std::string("d"),
           absl::StrCat(kTraceHex),
           absl::StrCat(kTraceHex, "-", kSpanHex, "-x"),
           absl::StrCat(kTraceHex, "-", kSpanHex, "-1-bad"),
           absl::StrCat(kTraceHex, "-", kSpanHex, "-1-", kSpanHex, "-more"),
           absl::StrCat("4bf92f3577b34da6a3ce", "-", kSpanHex, "-1"),
           absl::StrCat("00000000000000000000000000000000-", kSpanHex, "-1"),
           absl::StrCat(kTraceHex, "-0000000000000000-1"),
       }) {
    EXPECT_FALSE(ParseB3Single(bad).has_value()) << bad;
  }
}

TEST(B3Test, ExtractsMultiHeaders) {
  Headers headers{{"x-b3-traceid", kTraceHex},
                  {"x-b3-spanid", kSpanHex},
                  {"x-b3-parentspanid", "05e3ac9a4f6e3b90"},
                  {"x-b3-sampled", "1"}};
  auto ctx = ExtractB3Multi(headers.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), kTraceHex);
  EXPECT_EQ(ctx->SpanIdHex(), kSpanHex);
  EXPECT_TRUE(ctx->sampled);

  headers.Set("x-b3-sampled", "0");
  ctx = ExtractB3Multi(headers.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_FALSE(ctx->sampled);
  EXPECT_FALSE(ctx->sampling_deferred);

  headers.Set("x-b3-flags", "1");  // debug implies sampled
  ctx = ExtractB3Multi(headers.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_TRUE(ctx->sampled);

  Headers deferred{{"x-b3-traceid", "a3ce929d0e0e4736"}, {"x-b3-spanid", kSpanHex}};
  ctx = ExtractB3Multi(deferred.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_TRUE(ctx->sampling_deferred);
  EXPECT_EQ(ctx->TraceIdHex(), "0000000000000000a3ce929d0e0e4736");

  Headers bad_sampled{
      {"x-b3-traceid", kTraceHex}, {"x-b3-spanid", kSpanHex}, {"x-b3-sampled", "2"}};
  EXPECT_FALSE(ExtractB3Multi(bad_sampled.Lookuper()).has_value());
  Headers no_span{{"x-b3-traceid", kTraceHex}};
  EXPECT_FALSE(ExtractB3Multi(no_span.Lookuper()).has_value());
  Headers short_span{{"x-b3-traceid", kTraceHex}, {"x-b3-spanid", "abc"}};
  EXPECT_FALSE(ExtractB3Multi(short_span.Lookuper()).has_value());
}

TEST(ExtractTest, PrefersTraceparentThenB3ThenMultiHeaders) {
  const std::string other_trace = "11111111111111111111111111111111";
  const std::string third_trace = "22222222222222222222222222222222";
  Headers headers{{"traceparent", kTraceparent},
                  {"tracestate", "congo=t61rcWkgMzE"},
                  {"b3", absl::StrCat(other_trace, "-", kSpanHex, "-1")},
                  {"x-b3-traceid", third_trace},
                  {"x-b3-spanid", kSpanHex}};
  auto ctx = Extract(headers.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), kTraceHex);
  EXPECT_EQ(ctx->tracestate, "congo=t61rcWkgMzE");

  // An invalid traceparent falls back to the next form.
  headers.Set("traceparent", "00-garbage");
  ctx = Extract(headers.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), other_trace);
  EXPECT_TRUE(ctx->tracestate.empty());

  headers.Set("b3", "1");
  ctx = Extract(headers.Lookuper());
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->TraceIdHex(), third_trace);

  EXPECT_FALSE(Extract(Headers{}.Lookuper()).has_value());
  EXPECT_FALSE(Extract(Headers{{"traceparent", "nope"}}.Lookuper()).has_value());
}

TEST(InjectTest, WritesW3CAndB3AndRoundTrips) {
  auto ctx = ParseTraceparent(kTraceparent);
  ASSERT_TRUE(ctx.has_value());
  ctx->tracestate = "rojo=00f067aa0ba902b7";
  Headers headers;
  Inject(*ctx,
         [&headers](absl::string_view name, absl::string_view value) { headers.Set(name, value); });
  EXPECT_THAT(headers.Lookup("traceparent"), Optional(absl::string_view(kTraceparent)));
  EXPECT_THAT(headers.Lookup("tracestate"), Optional(absl::string_view("rojo=00f067aa0ba902b7")));
  EXPECT_THAT(headers.Lookup("x-b3-traceid"), Optional(absl::string_view(kTraceHex)));
  EXPECT_THAT(headers.Lookup("x-b3-spanid"), Optional(absl::string_view(kSpanHex)));
  EXPECT_THAT(headers.Lookup("x-b3-sampled"), Optional(absl::string_view("1")));
  EXPECT_THAT(Extract(headers.Lookuper()), Optional(*ctx));

  // Without traceparent, the B3 headers alone carry the same ids.
  Headers b3_only;
  for (const auto& [name, value] : headers.map()) {
    if (name.rfind("x-b3-", 0) == 0) b3_only.Set(name, value);
  }
  const auto from_b3 = Extract(b3_only.Lookuper());
  ASSERT_TRUE(from_b3.has_value());
  EXPECT_EQ(from_b3->trace_id, ctx->trace_id);
  EXPECT_EQ(from_b3->span_id, ctx->span_id);
  EXPECT_TRUE(from_b3->sampled);
}

TEST(InjectTest, OmitsEmptyTracestateAndUnsampledFlag) {
  auto ctx = ParseTraceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
  ASSERT_TRUE(ctx.has_value());
  Headers headers;
  Inject(*ctx,
         [&headers](absl::string_view name, absl::string_view value) { headers.Set(name, value); });
  EXPECT_FALSE(headers.Lookup("tracestate").has_value());
  EXPECT_THAT(headers.Lookup("x-b3-sampled"), Optional(absl::string_view("0")));
  EXPECT_THAT(
      headers.Lookup("traceparent"),
      Optional(absl::string_view("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")));
}

}  // namespace
}  // namespace montage::telemetry
