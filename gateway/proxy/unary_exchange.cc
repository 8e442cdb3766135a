#include "gateway/proxy/unary_exchange.h"

#include <event2/event.h>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace montage::gateway {
void RetrySettings::AddConditions(absl::string_view comma_list) {
  for (absl::string_view raw : absl::StrSplit(comma_list, ',')) {
    const absl::string_view c = absl::StripAsciiWhitespace(raw);
    if (c == "cancelled") grpc_codes.insert(grpc::StatusCode::CANCELLED);
    if (c == "deadline-exceeded") grpc_codes.insert(grpc::StatusCode::DEADLINE_EXCEEDED);
    if (c == "internal") grpc_codes.insert(grpc::StatusCode::INTERNAL);
    if (c == "resource-exhausted") grpc_codes.insert(grpc::StatusCode::RESOURCE_EXHAUSTED);
    if (c == "unavailable") grpc_codes.insert(grpc::StatusCode::UNAVAILABLE);
    if (c == "5xx" || c == "gateway-error" || c == "connect-failure" || c == "reset" ||
        c == "refused-stream") {
      connect_failure = true;
    }
    if (c == "5xx" || c == "gateway-error") per_try_timeout_retriable = true;
  }
}

RetrySettings RetrySettings::FromPolicy(const std::optional<config::RetryPolicy>& policy) {
  RetrySettings r;
  if (!policy.has_value()) return r;
  r.num_retries = policy->num_retries;
  r.per_try_timeout = policy->per_try_timeout;
  r.base_interval = policy->base_interval;
  r.max_interval = policy->max_interval;
  for (const std::string& c : policy->retry_on) r.AddConditions(c);
  return r;
}

std::shared_ptr<UnaryExchange> UnaryExchange::Start(EventLoop& loop, Cluster& cluster,
                                                    UpstreamHost* first_host, size_t worker,
                                                    UpstreamCallParams params, std::string request,
                                                    RetrySettings retry,
                                                    std::function<void(Outcome&)> done) {
  std::shared_ptr<UnaryExchange> x(new UnaryExchange(loop, cluster, worker));
  x->params_ = std::move(params);
  x->request_ = std::move(request);
  x->retry_ = std::move(retry);
  x->done_ = std::move(done);
  x->Attempt(first_host);
  return x;
}

void UnaryExchange::Cancel() {
  if (cancelled_) return;
  cancelled_ = true;
  done_ = nullptr;
  if (current_ != nullptr) current_->Cancel();
  if (retrying_) cluster_.FinishRetry();
  retrying_ = false;
}

void UnaryExchange::Attempt(UpstreamHost* host) {
  ++attempts_;
  UpstreamCallParams params = params_;
  params.stub = &host->stub(worker_);
  params.host = host;
  bool per_try_deadline = false;
  if (retry_.per_try_timeout.has_value() && *retry_.per_try_timeout > absl::ZeroDuration()) {
    const absl::Time per_try = absl::Now() + *retry_.per_try_timeout;
    if (per_try < params.deadline) {
      params.deadline = per_try;
      per_try_deadline = true;
    }
  }
  if (attempts_ > 1) {
    params.metadata.emplace_back("x-envoy-attempt-count", std::to_string(attempts_));
    params.trace_name = absl::StrCat(params.trace_name, " (attempt ", attempts_, ")");
  }
  if (attempts_ > 1) host->stats().rq_total.fetch_add(1, std::memory_order_relaxed);
  current_ = UnaryUpstreamCall::Start(
      loop_, std::move(params),
      // The request is kept for another attempt only when there can be one.
      attempts_ > static_cast<int>(retry_.num_retries) ? std::move(request_) : request_,
      [self = shared_from_this(), host, per_try_deadline](UnaryUpstreamCall::Result& result) {
        self->AttemptDone(host, per_try_deadline, result);
      });
}

bool UnaryExchange::Retriable(const grpc::Status& status, bool per_try_timed_out) const {
  if (status.ok()) return false;
  if (per_try_timed_out)
    return retry_.per_try_timeout_retriable ||
           retry_.grpc_codes.contains(grpc::StatusCode::DEADLINE_EXCEEDED);
  if (retry_.grpc_codes.contains(status.error_code())) return true;
  return retry_.connect_failure && status.error_code() == grpc::StatusCode::UNAVAILABLE;
}

void UnaryExchange::AttemptDone(UpstreamHost* host, bool per_try_deadline,
                                UnaryUpstreamCall::Result& result) {
  current_.reset();
  if (retrying_) {
    cluster_.FinishRetry();
    retrying_ = false;
    if (result.status.ok()) {
      cluster_.stats().upstream_rq_retry_success.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (cancelled_) return;
  const bool per_try_timed_out =
      per_try_deadline && result.status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
      absl::Now() < params_.deadline;
  if (per_try_timed_out) {
    cluster_.stats().upstream_rq_per_try_timeout.fetch_add(1, std::memory_order_relaxed);
  }
  const bool last = attempts_ > static_cast<int>(retry_.num_retries);
  if (!last && Retriable(result.status, per_try_timed_out)) {
    // Outlier detection hears about every attempt but the last (the caller reports that one).
    cluster_.RecordHostResult(*host,
                              HttpStatusForGrpc(static_cast<int>(result.status.error_code())));
    if (!cluster_.TryStartRetry()) {
      // Over the budget: the answer stands.
    } else {
      retrying_ = true;
      cluster_.stats().upstream_rq_retry.fetch_add(1, std::memory_order_relaxed);
      // Fully jittered: uniform in [0, (2^n - 1) * base), capped at max_interval.
      const int n = std::min(attempts_, 20);
      const absl::Duration ceiling =
          std::min(retry_.max_interval, retry_.base_interval * ((int64_t{1} << n) - 1));
      absl::BitGen gen;
      const absl::Duration wait = absl::Nanoseconds(
          absl::Uniform<int64_t>(gen, 0, std::max<int64_t>(1, absl::ToInt64Nanoseconds(ceiling))));
      if (absl::Now() + wait >= params_.deadline) {
        // No time left inside the route's timeout: the answer stands.
        cluster_.FinishRetry();
        retrying_ = false;
      } else {
        auto* ticket = new std::weak_ptr<UnaryExchange>(weak_from_this());
        const timeval tv = absl::ToTimeval(wait);
        event_base_once(
            loop_.base(), -1, EV_TIMEOUT,
            [](evutil_socket_t, short, void* arg) {
              auto* weak = static_cast<std::weak_ptr<UnaryExchange>*>(arg);
              std::shared_ptr<UnaryExchange> self = weak->lock();
              delete weak;
              if (self == nullptr || self->cancelled_) return;
              UpstreamHost* next = self->cluster_.PickHost(self->last_host_);
              if (next == nullptr) next = self->last_host_;
              self->Attempt(next);
            },
            ticket, &tv);
        last_host_ = host;
        return;
      }
    }
  }
  Outcome outcome;
  outcome.result = std::move(result);
  outcome.attempts = attempts_;
  outcome.host = host;
  if (done_ != nullptr) {
    std::function<void(Outcome&)> done = std::move(done_);
    done_ = nullptr;
    done(outcome);
  }
}

}  // namespace montage::gateway
