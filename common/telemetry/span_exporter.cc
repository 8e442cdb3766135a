#include "common/telemetry/span_exporter.h"

#include <curl/curl.h>

#include <algorithm>
#include <mutex>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/telemetry/span_json.h"

namespace montage::telemetry {
namespace {

void EnsureCurlInitialised() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct CurlEasyDeleter {
  void operator()(CURL* curl) const { curl_easy_cleanup(curl); }
};
struct CurlSlistDeleter {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};
struct CurlUrlDeleter {
  void operator()(CURLU* url) const { curl_url_cleanup(url); }
};

size_t DiscardBody(char*, size_t size, size_t count, void*) { return size * count; }

// One easy handle reused for every POST, so that the connection to the collector stays open.
// Not thread-safe.
class CurlJsonPoster {
 public:
  CurlJsonPoster(std::string url, absl::Duration connect_timeout)
      : url_(std::move(url)), connect_timeout_(connect_timeout) {
    EnsureCurlInitialised();
    curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
    // Without this, curl waits up to a second for "100 Continue" before large bodies.
    if (headers != nullptr) headers = curl_slist_append(headers, "Expect:");
    headers_.reset(headers);
  }

  absl::Status Post(const std::string& body, absl::Time deadline) {
    const int64_t remaining_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (remaining_ms <= 0) return absl::DeadlineExceededError("span export deadline passed");
    if (easy_ == nullptr) easy_.reset(curl_easy_init());
    if (easy_ == nullptr || headers_ == nullptr) {
      return absl::ResourceExhaustedError("curl_easy_init failed");
    }
    CURL* curl = easy_.get();
    curl_easy_reset(curl);
    char error[CURL_ERROR_SIZE] = {0};
    const int64_t connect_ms =
        std::min<int64_t>(remaining_ms, absl::ToInt64Milliseconds(connect_timeout_));
    curl_easy_setopt(curl, CURLOPT_URL, url_.c_str());
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers_.get());
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS,
                     static_cast<long>(std::max<int64_t>(1, remaining_ms)));
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                     static_cast<long>(std::max<int64_t>(1, connect_ms)));
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &DiscardBody);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    const CURLcode code = curl_easy_perform(curl);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);
    if (code != CURLE_OK) {
      return absl::UnavailableError(
          absl::StrCat("POST ", url_, ": ", curl_easy_strerror(code),
                       error[0] != '\0' ? absl::StrCat(" (", error, ")") : std::string()));
    }
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    if (status < 200 || status >= 300) {
      return absl::UnavailableError(absl::StrCat("POST ", url_, ": HTTP ", status));
    }
    return absl::OkStatus();
  }

 private:
  const std::string url_;
  const absl::Duration connect_timeout_;
  std::unique_ptr<curl_slist, CurlSlistDeleter> headers_;
  std::unique_ptr<CURL, CurlEasyDeleter> easy_;
};

class HttpSpanExporter final : public SpanExporter {
 public:
  HttpSpanExporter(SpanFormat format, std::string endpoint, absl::Duration connect_timeout)
      : format_(format), poster_(std::move(endpoint), connect_timeout) {}

  absl::Status Export(absl::Span<const SpanData* const> spans, absl::Time deadline) override {
    if (spans.empty()) return absl::OkStatus();
    const std::string body = format_ == SpanFormat::kZipkin ? ZipkinJson(spans) : OtlpJson(spans);
    return poster_.Post(body, deadline);
  }

 private:
  const SpanFormat format_;
  CurlJsonPoster poster_;
};

}  // namespace

std::unique_ptr<SpanExporter> MakeHttpSpanExporter(SpanFormat format, std::string endpoint,
                                                   absl::Duration connect_timeout) {
  return std::make_unique<HttpSpanExporter>(format, std::move(endpoint), connect_timeout);
}

absl::Status ValidateExportEndpoint(absl::string_view endpoint) {
  EnsureCurlInitialised();
  std::unique_ptr<CURLU, CurlUrlDeleter> url(curl_url());
  if (url == nullptr) return absl::ResourceExhaustedError("curl_url failed");
  const std::string text(endpoint);
  if (curl_url_set(url.get(), CURLUPART_URL, text.c_str(), 0) != CURLUE_OK) {
    return absl::InvalidArgumentError(absl::StrCat("not a URL: \"", endpoint, "\""));
  }
  char* scheme = nullptr;
  if (curl_url_get(url.get(), CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK || scheme == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("URL without scheme: \"", endpoint, "\""));
  }
  const std::string lower = absl::AsciiStrToLower(scheme);
  curl_free(scheme);
  if (lower != "http" && lower != "https") {
    return absl::InvalidArgumentError(
        absl::StrCat("span export endpoint must be http or https: \"", endpoint, "\""));
  }
  return absl::OkStatus();
}

}  // namespace montage::telemetry
