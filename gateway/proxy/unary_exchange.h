// A unary call with the route's retry policy, as Envoy's router retries: each attempt on a host
// picked anew (another one when there is), a per-try timeout inside the route's deadline, fully
// jittered exponential back-off between attempts (base 25 ms, cap 250 ms by default), retries
// admitted by the cluster's retry budget or max_retries, and outlier detection told about every
// attempt. Only unary calls retry: their request is complete and nothing reached the client yet.
#ifndef MONTAGE_GATEWAY_PROXY_UNARY_EXCHANGE_H_
#define MONTAGE_GATEWAY_PROXY_UNARY_EXCHANGE_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "gateway/config/bootstrap.h"
#include "gateway/proxy/upstream.h"
#include "gateway/proxy/upstream_call.h"

namespace montage::gateway {

struct RetrySettings {
  uint32_t num_retries = 0;
  std::optional<absl::Duration> per_try_timeout;
  absl::Duration base_interval = absl::Milliseconds(25);
  absl::Duration max_interval = absl::Milliseconds(250);
  // gRPC codes retried when the upstream answers with them (retry_on / x-envoy-retry-grpc-on:
  // cancelled, deadline-exceeded, internal, resource-exhausted, unavailable).
  absl::flat_hash_set<int> grpc_codes;
  // 5xx, gateway-error, connect-failure, reset or refused-stream: a host that could not be
  // reached or reset the call (gRPC reports UNAVAILABLE) and, for 5xx and gateway-error, a
  // per-try timeout.
  bool connect_failure = false;
  bool per_try_timeout_retriable = false;

  // From a route's retry_policy (nullopt: no retries).
  static RetrySettings FromPolicy(const std::optional<config::RetryPolicy>& policy);
  // Adds the conditions of an x-envoy-retry-on / x-envoy-retry-grpc-on value.
  void AddConditions(absl::string_view comma_list);
};

// Loop thread only.
class UnaryExchange : public std::enable_shared_from_this<UnaryExchange> {
 public:
  struct Outcome {
    UnaryUpstreamCall::Result result;
    int attempts = 0;
    UpstreamHost* host = nullptr;  // the last attempt's
  };
  // `params.stub` is ignored: each attempt takes its host's stub for `worker`. `done` runs once,
  // on the loop, unless Cancel() came first.
  static std::shared_ptr<UnaryExchange> Start(EventLoop& loop, Cluster& cluster,
                                              UpstreamHost* first_host, size_t worker,
                                              UpstreamCallParams params, std::string request,
                                              RetrySettings retry,
                                              std::function<void(Outcome&)> done);
  void Cancel();
  absl::Time started() const { return started_; }

 private:
  UnaryExchange(EventLoop& loop, Cluster& cluster, size_t worker)
      : loop_(loop), cluster_(cluster), worker_(worker), started_(absl::Now()) {}
  void Attempt(UpstreamHost* host);
  void AttemptDone(UpstreamHost* host, bool per_try_deadline, UnaryUpstreamCall::Result& result);
  bool Retriable(const grpc::Status& status, bool per_try_timed_out) const;

  EventLoop& loop_;
  Cluster& cluster_;
  const size_t worker_;
  const absl::Time started_;
  UpstreamCallParams params_;
  std::string request_;  // the message, unframed
  RetrySettings retry_;
  std::function<void(Outcome&)> done_;
  std::shared_ptr<UnaryUpstreamCall> current_;
  int attempts_ = 0;
  UpstreamHost* last_host_ = nullptr;
  bool retrying_ = false;  // holds one of the cluster's retry slots
  bool cancelled_ = false;
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_PROXY_UNARY_EXCHANGE_H_
