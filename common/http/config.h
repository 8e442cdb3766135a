// The HTTP client's options and retry policy from montaged's config (config.proto's
// HttpClientConfig and RetryConfig), shared by every service that calls out.
#ifndef MONTAGE_COMMON_HTTP_CONFIG_H_
#define MONTAGE_COMMON_HTTP_CONFIG_H_

#include <string>

#include "common/http/http_client.h"
#include "montage/config/v1/config.pb.h"

namespace montage::http {

// Unset fields keep HttpClientOptions' defaults; max_connections_per_host and
// max_total_connections are taken as given (0: no limit).
HttpClientOptions HttpClientOptionsFromConfig(const config::v1::HttpClientConfig& config,
                                              std::string name);

// Unset fields keep RetryPolicy's defaults; max_attempts is at least 1.
RetryPolicy RetryPolicyFromConfig(const config::v1::RetryConfig& config);

}  // namespace montage::http

#endif  // MONTAGE_COMMON_HTTP_CONFIG_H_
