#include <optional>

#include "absl/time/time.h"
#include "common/http/http_client.h"
#include "gtest/gtest.h"

namespace montage::http {
namespace {

HttpResponse Answer(int status, Headers headers = {}, std::string body = "") {
  HttpResponse response;
  response.status = status;
  response.headers = std::move(headers);
  response.body = std::move(body);
  return response;
}

absl::Time Now() {
  return absl::FromCivil(absl::CivilSecond(2024, 1, 1, 0, 0, 0), absl::UTCTimeZone());
}

RetryPolicy Policy() {
  RetryPolicy policy;
  policy.max_attempts = 5;
  policy.initial_backoff = absl::Milliseconds(100);
  policy.max_backoff = absl::Seconds(1);
  policy.max_server_delay = absl::Seconds(60);
  return policy;
}

std::optional<absl::Duration> Delay(const HttpResponse& response, RetryPolicy policy = Policy()) {
  return RetryDelay(policy, 1, &response, Now(), 0.5);
}

TEST(FindHeaderTest, CaseInsensitiveFirstMatch) {
  const Headers headers = {{"Content-Type", "a"}, {"X-Thing", "1"}, {"x-thing", "2"}};
  EXPECT_EQ(FindHeader(headers, "content-type"), "a");
  EXPECT_EQ(FindHeader(headers, "X-THING"), "1");
  EXPECT_EQ(FindHeader(headers, "missing"), std::nullopt);
}

TEST(IsRetriableByDefaultTest, Statuses) {
  for (int status : {429, 500, 502, 503, 504, 529, 599}) {
    EXPECT_TRUE(IsRetriableByDefault(Answer(status))) << status;
  }
  for (int status : {200, 204, 301, 304, 400, 401, 403, 404, 408, 409, 422}) {
    EXPECT_FALSE(IsRetriableByDefault(Answer(status))) << status;
  }
}

TEST(IsRetriableByDefaultTest, InsufficientQuotaIsNotRetriable) {
  EXPECT_FALSE(IsRetriableByDefault(
      Answer(429, {}, R"({"error":{"type":"insufficient_quota","code":"insufficient_quota"}})")));
  EXPECT_TRUE(IsRetriableByDefault(Answer(429, {}, R"({"error":{"type":"rate_limit_exceeded"}})")));
}

TEST(RetryDelayTest, FullJitterBounds) {
  const RetryPolicy policy = Policy();
  // Cap before retry n: min(1 s, 100 ms * 2^(n-1)).
  const absl::Duration caps[] = {absl::Milliseconds(100), absl::Milliseconds(200),
                                 absl::Milliseconds(400), absl::Milliseconds(800),
                                 absl::Seconds(1),        absl::Seconds(1)};
  for (uint32_t retry = 1; retry <= 6; ++retry) {
    const absl::Duration cap = caps[retry - 1];
    EXPECT_EQ(RetryDelay(policy, retry, nullptr, Now(), 0.0), absl::ZeroDuration());
    EXPECT_EQ(RetryDelay(policy, retry, nullptr, Now(), 0.5), cap / 2) << retry;
    for (double u = 0; u < 1; u += 0.01) {
      const std::optional<absl::Duration> delay = RetryDelay(policy, retry, nullptr, Now(), u);
      ASSERT_TRUE(delay.has_value());
      EXPECT_GE(*delay, absl::ZeroDuration());
      EXPECT_LE(*delay, cap);
    }
  }
}

TEST(RetryDelayTest, JitterEdgeCases) {
  RetryPolicy policy = Policy();
  // A huge retry number saturates at max_backoff without overflowing.
  EXPECT_EQ(RetryDelay(policy, 4'000'000'000u, nullptr, Now(), 0.5), absl::Milliseconds(500));
  // Retry 0 is treated as the first.
  EXPECT_EQ(RetryDelay(policy, 0, nullptr, Now(), 0.5), absl::Milliseconds(50));
  // Out-of-range random values are clamped.
  EXPECT_EQ(RetryDelay(policy, 1, nullptr, Now(), -1), absl::ZeroDuration());
  EXPECT_EQ(RetryDelay(policy, 1, nullptr, Now(), 7), absl::Milliseconds(100));
  policy.initial_backoff = absl::ZeroDuration();
  policy.max_backoff = absl::InfiniteDuration();
  EXPECT_EQ(RetryDelay(policy, 4'000'000'000u, nullptr, Now(), 0.5), absl::ZeroDuration());
}

TEST(RetryDelayTest, AnswerWithoutServerDelayUsesJitter) {
  EXPECT_EQ(Delay(Answer(503)), absl::Milliseconds(50));
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "soon"}})), absl::Milliseconds(50));
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "-3"}})), absl::Milliseconds(50));
}

TEST(RetryDelayTest, RetryAfterSeconds) {
  EXPECT_EQ(Delay(Answer(429, {{"Retry-After", "0"}})), absl::ZeroDuration());
  EXPECT_EQ(Delay(Answer(503, {{"retry-after", "5"}})), absl::Seconds(5));
  EXPECT_EQ(Delay(Answer(503, {{"RETRY-AFTER", " 7 "}})), absl::Seconds(7));
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "1.5"}})), absl::Milliseconds(1500));
}

TEST(RetryDelayTest, ServerDelayHookReadsTheBodyFirst) {
  RetryPolicy policy = Policy();
  policy.server_delay = [](const HttpResponse& r) -> std::optional<absl::Duration> {
    if (r.body == "wait 3") return absl::Seconds(3);
    return std::nullopt;
  };
  EXPECT_EQ(Delay(Answer(429, {{"Retry-After", "9"}}, "wait 3"), policy), absl::Seconds(3));
  EXPECT_EQ(Delay(Answer(429, {{"Retry-After", "9"}}, "other"), policy), absl::Seconds(9));
  policy.max_server_delay = absl::Seconds(2);
  EXPECT_EQ(Delay(Answer(429, {}, "wait 3"), policy), std::nullopt);
}

TEST(RetryDelayTest, RetryAfterHttpDate) {
  // Now() is 2024-01-01T00:00:00Z, a Monday.
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "Mon, 01 Jan 2024 00:00:10 GMT"}})),
            absl::Seconds(10));
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "Monday, 01-Jan-24 00:00:20 GMT"}})),
            absl::Seconds(20));
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "Mon Jan  1 00:00:30 2024"}})), absl::Seconds(30));
  // A date in the past means now.
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "Sun, 31 Dec 2023 23:00:00 GMT"}})),
            absl::ZeroDuration());
}

TEST(RetryDelayTest, RetryAfterMsWins) {
  EXPECT_EQ(Delay(Answer(429, {{"Retry-After", "2"}, {"retry-after-ms", "250"}})),
            absl::Milliseconds(250));
  EXPECT_EQ(Delay(Answer(429, {{"retry-after-ms", "12.5"}})), absl::Microseconds(12500));
  // A broken retry-after-ms falls back to Retry-After.
  EXPECT_EQ(Delay(Answer(429, {{"retry-after-ms", "x"}, {"Retry-After", "2"}})), absl::Seconds(2));
}

TEST(RetryDelayTest, ServerDelayAboveMaximumGivesUp) {
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "120"}})), std::nullopt);
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "60"}})), absl::Seconds(60));
  EXPECT_EQ(Delay(Answer(429, {{"retry-after-ms", "60001"}})), std::nullopt);
  EXPECT_EQ(Delay(Answer(503, {{"Retry-After", "Mon, 01 Jan 2024 01:00:00 GMT"}})), std::nullopt);
}

TEST(RetryDelayTest, OpenAiResetDurations) {
  RetryPolicy policy = Policy();
  policy.max_server_delay = absl::Hours(2);
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-requests", "1s"}}), policy), absl::Seconds(1));
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-tokens", "6m0s"}}), policy), absl::Minutes(6));
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-tokens", "20ms"}}), policy),
            absl::Milliseconds(20));
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-requests", "1h2m3.5s"}}), policy),
            absl::Hours(1) + absl::Minutes(2) + absl::Milliseconds(3500));
  // Over the default maximum.
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-tokens", "6m0s"}})), std::nullopt);
  // Garbage is ignored.
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-tokens", "soon"}})), absl::Milliseconds(50));
  EXPECT_EQ(Delay(Answer(429, {{"x-ratelimit-reset-tokens", "-1s"}})), absl::Milliseconds(50));
}

TEST(RetryDelayTest, ResetOfExhaustedLimitWins) {
  const Headers headers = {{"x-ratelimit-remaining-requests", "5"},
                           {"x-ratelimit-reset-requests", "1s"},
                           {"x-ratelimit-remaining-tokens", "0"},
                           {"x-ratelimit-reset-tokens", "20ms"}};
  EXPECT_EQ(Delay(Answer(429, headers)), absl::Milliseconds(20));
  // Without remaining counts the longest reset counts.
  EXPECT_EQ(Delay(Answer(
                429, {{"x-ratelimit-reset-requests", "1s"}, {"x-ratelimit-reset-tokens", "20ms"}})),
            absl::Seconds(1));
}

TEST(RetryDelayTest, ResetHeadersOnlyFor429) {
  // Providers send these with every answer; a 503 is retried on the usual back-off.
  EXPECT_EQ(Delay(Answer(503, {{"x-ratelimit-reset-requests", "30s"}})), absl::Milliseconds(50));
  EXPECT_EQ(Delay(Answer(500, {{"anthropic-ratelimit-requests-reset", "2024-01-01T00:00:30Z"}})),
            absl::Milliseconds(50));
}

TEST(RetryDelayTest, AnthropicResetTimestamps) {
  EXPECT_EQ(Delay(Answer(429, {{"anthropic-ratelimit-requests-reset", "2024-01-01T00:00:30Z"}})),
            absl::Seconds(30));
  EXPECT_EQ(Delay(Answer(429, {{"anthropic-ratelimit-tokens-reset", "2024-01-01T00:00:00.5Z"}})),
            absl::Milliseconds(500));
  EXPECT_EQ(Delay(Answer(429, {{"Anthropic-RateLimit-Tokens-Reset", "2024-01-01T01:00:05+01:00"}})),
            absl::Seconds(5));
  EXPECT_EQ(Delay(Answer(429, {{"anthropic-ratelimit-tokens-reset", "2023-12-31T23:59:00Z"}})),
            absl::ZeroDuration());
  EXPECT_EQ(Delay(Answer(429, {{"anthropic-ratelimit-tokens-reset", "2024-01-01T00:05:00Z"}})),
            std::nullopt);
  EXPECT_EQ(Delay(Answer(429, {{"anthropic-ratelimit-tokens-reset", "tomorrow"}})),
            absl::Milliseconds(50));
  // The exhausted limit's reset counts.
  EXPECT_EQ(
      Delay(Answer(429, {{"anthropic-ratelimit-requests-remaining", "10"},
                         {"anthropic-ratelimit-requests-reset", "2024-01-01T00:00:40Z"},
                         {"anthropic-ratelimit-output-tokens-remaining", "0"},
                         {"anthropic-ratelimit-output-tokens-reset", "2024-01-01T00:00:03Z"}})),
      absl::Seconds(3));
  // Retry-After, when Anthropic sends it, is preferred.
  EXPECT_EQ(Delay(Answer(429, {{"retry-after", "4"},
                               {"anthropic-ratelimit-requests-reset", "2024-01-01T00:00:30Z"}})),
            absl::Seconds(4));
}

}  // namespace
}  // namespace montage::http
