#include "common/http/config.h"

#include <algorithm>
#include <utility>

#include "common/proto_time.h"

namespace montage::http {

HttpClientOptions HttpClientOptionsFromConfig(const config::v1::HttpClientConfig& config,
                                              std::string name) {
  HttpClientOptions o;
  o.name = std::move(name);
  o.max_connections_per_host = config.max_connections_per_host();
  o.max_total_connections = config.max_total_connections();
  if (config.has_idle_connection_timeout()) {
    o.idle_connection_timeout = FromProtoDuration(config.idle_connection_timeout());
  }
  if (config.max_concurrent_streams() > 0)
    o.max_concurrent_streams = config.max_concurrent_streams();
  o.resolve.assign(config.resolve().begin(), config.resolve().end());
  return o;
}

RetryPolicy RetryPolicyFromConfig(const config::v1::RetryConfig& config) {
  RetryPolicy p;
  p.max_attempts = std::max<uint32_t>(1, config.max_attempts());
  if (config.has_initial_backoff()) p.initial_backoff = FromProtoDuration(config.initial_backoff());
  if (config.has_max_backoff()) p.max_backoff = FromProtoDuration(config.max_backoff());
  if (config.has_max_server_delay()) {
    p.max_server_delay = FromProtoDuration(config.max_server_delay());
  }
  return p;
}

}  // namespace montage::http
