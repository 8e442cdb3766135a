// How libcurl's transfer errors become absl::Status codes, and which of them a retry may cure.
// Private to common/http.
#ifndef MONTAGE_COMMON_HTTP_INTERNAL_CURL_ERRORS_H_
#define MONTAGE_COMMON_HTTP_INTERNAL_CURL_ERRORS_H_

#include <curl/curl.h>

#include "absl/status/status.h"

namespace montage::http::internal {

struct CurlErrorClass {
  absl::StatusCode code;
  // A fresh attempt may succeed (the peer was down, slow or reset the connection); false for
  // errors of the request itself or of the peer's identity (bad URL, certificate mismatch).
  bool transient;
};

CurlErrorClass ClassifyCurlError(CURLcode code);

// HTTP version number (1, 2 or 3) of a CURLINFO_HTTP_VERSION value; 0 when unknown.
int HttpVersionNumber(long curl_http_version);

}  // namespace montage::http::internal

#endif  // MONTAGE_COMMON_HTTP_INTERNAL_CURL_ERRORS_H_
