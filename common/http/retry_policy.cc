// The pure parts of the retry policy: which answers are retriable and how long to wait.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/http/http_client.h"

namespace montage::http {
namespace {

// A non-negative, finite number.
std::optional<double> ParseNonNegative(absl::string_view text) {
  double value = 0;
  if (!absl::SimpleAtod(absl::StripAsciiWhitespace(text), &value)) return std::nullopt;
  if (!std::isfinite(value) || value < 0) return std::nullopt;
  return value;
}

// HTTP-date in any of the three forms RFC 9110 makes recipients accept.
std::optional<absl::Time> ParseHttpDate(absl::string_view text) {
  static constexpr const char* kFormats[] = {
      "%a, %d %b %Y %H:%M:%S GMT",  // IMF-fixdate, the one servers should send
      "%A, %d-%b-%y %H:%M:%S GMT",  // obsolete RFC 850
      "%a %b %e %H:%M:%S %Y",       // obsolete asctime()
  };
  const std::string input(absl::StripAsciiWhitespace(text));
  for (const char* format : kFormats) {
    absl::Time time;
    if (absl::ParseTime(format, input, absl::UTCTimeZone(), &time, nullptr)) return time;
  }
  return std::nullopt;
}

// Retry-After: delay-seconds or an HTTP-date.
std::optional<absl::Duration> ParseRetryAfter(absl::string_view value, absl::Time now) {
  if (std::optional<double> seconds = ParseNonNegative(value)) return absl::Seconds(*seconds);
  if (std::optional<absl::Time> when = ParseHttpDate(value)) {
    return std::max(*when - now, absl::ZeroDuration());
  }
  return std::nullopt;
}

// OpenAI's x-ratelimit-reset-*: Go durations such as "1s", "6m0s", "20ms" or "1h2m3.5s".
std::optional<absl::Duration> ParseGoDuration(absl::string_view value) {
  absl::Duration duration;
  if (!absl::ParseDuration(absl::StripAsciiWhitespace(value), &duration)) return std::nullopt;
  if (duration < absl::ZeroDuration() || duration == absl::InfiniteDuration()) return std::nullopt;
  return duration;
}

// Anthropic's anthropic-ratelimit-*-reset: the RFC 3339 time the limit is replenished.
std::optional<absl::Duration> ParseResetTime(absl::string_view value, absl::Time now) {
  absl::Time when;
  if (!absl::ParseTime(absl::RFC3339_full, absl::StripAsciiWhitespace(value), &when, nullptr)) {
    return std::nullopt;
  }
  return std::max(when - now, absl::ZeroDuration());
}

// The wait the rate-limit reset headers of a 429 ask for. Providers send a reset time per limit
// (requests, tokens, input and output tokens) with every answer, most of them for limits that
// were not hit; when a "-remaining" header says which limit is exhausted only its reset counts,
// otherwise the longest reset does.
std::optional<absl::Duration> RateLimitResetDelay(const Headers& headers, absl::Time now) {
  std::optional<absl::Duration> exhausted;
  std::optional<absl::Duration> any;
  auto consider = [&](absl::Duration delay, absl::string_view remaining_header) {
    any = std::max(any.value_or(delay), delay);
    std::optional<absl::string_view> remaining = FindHeader(headers, remaining_header);
    if (remaining.has_value() && absl::StripAsciiWhitespace(*remaining) == "0") {
      exhausted = std::max(exhausted.value_or(delay), delay);
    }
  };
  static constexpr absl::string_view kOpenAiReset = "x-ratelimit-reset-";
  static constexpr absl::string_view kAnthropic = "anthropic-ratelimit-";
  static constexpr absl::string_view kResetSuffix = "-reset";
  for (const auto& [name, value] : headers) {
    if (absl::StartsWithIgnoreCase(name, kOpenAiReset)) {
      const absl::string_view limit = absl::string_view(name).substr(kOpenAiReset.size());
      if (std::optional<absl::Duration> delay = ParseGoDuration(value)) {
        consider(*delay, absl::StrCat("x-ratelimit-remaining-", limit));
      }
    } else if (absl::StartsWithIgnoreCase(name, kAnthropic) &&
               absl::EndsWithIgnoreCase(name, kResetSuffix) &&
               name.size() > kAnthropic.size() + kResetSuffix.size()) {
      const absl::string_view limit = absl::string_view(name).substr(
          kAnthropic.size(), name.size() - kAnthropic.size() - kResetSuffix.size());
      if (std::optional<absl::Duration> delay = ParseResetTime(value, now)) {
        consider(*delay, absl::StrCat(kAnthropic, limit, "-remaining"));
      }
    }
  }
  return exhausted.has_value() ? exhausted : any;
}

// The delay the server asked for, if it did. Retry-After (and OpenAI's more precise
// retry-after-ms) apply to any answer, 503 included; the rate-limit reset headers only to 429,
// since providers send them with every answer.
std::optional<absl::Duration> ServerDelay(const HttpResponse& response, absl::Time now) {
  if (std::optional<absl::string_view> ms = FindHeader(response.headers, "retry-after-ms")) {
    if (std::optional<double> value = ParseNonNegative(*ms)) return absl::Milliseconds(*value);
  }
  if (std::optional<absl::string_view> value = FindHeader(response.headers, "retry-after")) {
    if (std::optional<absl::Duration> delay = ParseRetryAfter(*value, now)) return delay;
  }
  if (response.status == 429) return RateLimitResetDelay(response.headers, now);
  return std::nullopt;
}

}  // namespace

bool IsRetriableByDefault(const HttpResponse& response) {
  // OpenAI answers an exhausted budget with 429 too; waiting does not refill it.
  if (response.status == 429) return !absl::StrContains(response.body, "insufficient_quota");
  return response.status >= 500 && response.status <= 599;
}

std::optional<absl::Duration> RetryDelay(const RetryPolicy& policy, uint32_t retry,
                                         const HttpResponse* response, absl::Time now,
                                         double uniform01) {
  if (response != nullptr) {
    std::optional<absl::Duration> delay;
    if (policy.server_delay) delay = policy.server_delay(*response);
    if (!delay) delay = ServerDelay(*response, now);
    if (delay) {
      if (*delay > policy.max_server_delay) return std::nullopt;
      return delay;
    }
  }
  // Full jitter (uniform in [0, cap]) spreads the retries of many clients hit by the same outage
  // instead of having them return in waves.
  absl::Duration cap = std::max(policy.initial_backoff, absl::ZeroDuration());
  const absl::Duration max_backoff = std::max(policy.max_backoff, absl::ZeroDuration());
  for (uint32_t n = 1; n < retry && cap > absl::ZeroDuration() && cap < max_backoff; ++n) {
    cap *= 2;
  }
  cap = std::min(cap, max_backoff);
  if (!(uniform01 > 0)) uniform01 = 0;  // NaN too
  if (uniform01 > 1) uniform01 = 1;
  return cap * uniform01;
}

}  // namespace montage::http
