#include "common/http/internal/curl_errors.h"

namespace montage::http::internal {

CurlErrorClass ClassifyCurlError(CURLcode code) {
  switch (code) {
    case CURLE_OK:
      return {absl::StatusCode::kOk, false};
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_BAD_FUNCTION_ARGUMENT:
    case CURLE_NOT_BUILT_IN:
      return {absl::StatusCode::kInvalidArgument, false};
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_PARTIAL_FILE:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_HTTP3:
    case CURLE_QUIC_CONNECT_ERROR:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PROXY:
      return {absl::StatusCode::kUnavailable, true};
    case CURLE_OPERATION_TIMEDOUT:
      return {absl::StatusCode::kDeadlineExceeded, true};
    // The peer is reachable but cannot be trusted or spoken to; trying again changes nothing.
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED:
      return {absl::StatusCode::kUnavailable, false};
    case CURLE_OUT_OF_MEMORY:
    case CURLE_FILESIZE_EXCEEDED:
    case CURLE_TOO_MANY_REDIRECTS:
      return {absl::StatusCode::kResourceExhausted, false};
    case CURLE_BAD_CONTENT_ENCODING:
      return {absl::StatusCode::kDataLoss, false};
    case CURLE_ABORTED_BY_CALLBACK:
      return {absl::StatusCode::kCancelled, false};
    default:
      return {absl::StatusCode::kInternal, false};
  }
}

int HttpVersionNumber(long curl_http_version) {
  switch (curl_http_version) {
    case CURL_HTTP_VERSION_1_0:
    case CURL_HTTP_VERSION_1_1:
      return 1;
    case CURL_HTTP_VERSION_2_0:
      return 2;
    case CURL_HTTP_VERSION_3:
      return 3;
    default:
      return 0;
  }
}

}  // namespace montage::http::internal
