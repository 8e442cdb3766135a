#include "gateway/proxy/health_checker.h"

#include <event2/event.h>

#include <future>

#include "absl/time/clock.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"

namespace montage::gateway {
namespace {

constexpr char kCheckMethod[] = "/grpc.health.v1.Health/Check";

}  // namespace

// Checks one host on the checker's loop. Shared with the gRPC callback of a check in flight.
class HealthChecker::HostCheck : public std::enable_shared_from_this<HostCheck> {
 public:
  HostCheck(EventLoop& loop, Cluster& cluster, UpstreamHost& host, const config::HealthCheck& cfg,
            std::atomic<int64_t>& in_flight)
      : loop_(loop), cluster_(cluster), host_(host), cfg_(cfg), in_flight_(in_flight) {}

  void Start() {
    timer_ = evtimer_new(
        loop_.base(),
        [](evutil_socket_t, short, void* self) { static_cast<HostCheck*>(self)->Fire(); }, this);
    Schedule(absl::ZeroDuration());
  }

  // On the loop thread, before the loop goes.
  void Stop() {
    stopped_ = true;
    if (timer_ != nullptr) {
      event_free(timer_);
      timer_ = nullptr;
    }
    if (context_ != nullptr) context_->TryCancel();
  }

 private:
  void Schedule(absl::Duration after) {
    const timeval tv = absl::ToTimeval(after);
    evtimer_add(timer_, &tv);
  }

  void Fire() {
    if (stopped_) return;
    cluster_.stats().health_check_attempt.fetch_add(1, std::memory_order_relaxed);
    traffic_at_check_ = cluster_.stats().upstream_rq_total.load();
    context_ = std::make_shared<grpc::ClientContext>();
    context_->set_deadline(absl::ToChronoTime(absl::Now() + cfg_.timeout));
    if (!cfg_.grpc_authority.empty()) context_->set_authority(cfg_.grpc_authority);
    auto request = std::make_shared<grpc::ByteBuffer>();
    grpc::health::v1::HealthCheckRequest check;
    check.set_service(cfg_.grpc_service_name);
    const std::string bytes = check.SerializeAsString();
    grpc::Slice slice(bytes.data(), bytes.size());
    *request = grpc::ByteBuffer(&slice, 1);
    auto response = std::make_shared<grpc::ByteBuffer>();
    in_flight_.fetch_add(1);
    host_.stub(0).UnaryCall(
        context_.get(), kCheckMethod, grpc::StubOptions(), request.get(), response.get(),
        [self = shared_from_this(), context = context_, request, response](grpc::Status status) {
          std::string body;
          if (status.ok()) {
            std::vector<grpc::Slice> slices;
            (void)response->Dump(&slices);
            for (const auto& s : slices)
              body.append(reinterpret_cast<const char*>(s.begin()), s.size());
          }
          grpc::health::v1::HealthCheckResponse answer;
          const bool serving = status.ok() && answer.ParseFromString(body) &&
                               answer.status() == grpc::health::v1::HealthCheckResponse::SERVING;
          self->loop_.Post([self, serving] { self->Done(serving); });
          self->in_flight_.fetch_sub(1);
        });
  }

  void Done(bool serving) {
    context_.reset();
    if (stopped_ || timer_ == nullptr) return;
    if (serving) {
      cluster_.stats().health_check_success.fetch_add(1, std::memory_order_relaxed);
      failures_ = 0;
      ++successes_;
      // One pass is enough at start-up; afterwards healthy_threshold in a row.
      if (host_.failed_active_hc() && (!checked_ || successes_ >= cfg_.healthy_threshold)) {
        host_.set_failed_active_hc(false);
      }
    } else {
      cluster_.stats().health_check_failure.fetch_add(1, std::memory_order_relaxed);
      successes_ = 0;
      ++failures_;
      if (!host_.failed_active_hc() &&
          failures_ >= std::max<uint32_t>(1, cfg_.unhealthy_threshold)) {
        host_.set_failed_active_hc(true);
      }
    }
    checked_ = true;
    // Envoy's intervals: unhealthy_interval while failing, no_traffic_interval (60 s by default)
    // when the cluster had no traffic since the last check, else interval.
    absl::Duration next = cfg_.interval;
    if (host_.failed_active_hc()) {
      next = cfg_.unhealthy_interval.value_or(cfg_.interval);
    } else if (cluster_.stats().upstream_rq_total.load() == traffic_at_check_) {
      next = cfg_.no_traffic_interval.value_or(absl::Seconds(60));
    }
    Schedule(next);
  }

  EventLoop& loop_;
  Cluster& cluster_;
  UpstreamHost& host_;
  const config::HealthCheck& cfg_;
  std::atomic<int64_t>& in_flight_;
  event* timer_ = nullptr;
  std::shared_ptr<grpc::ClientContext> context_;
  uint64_t traffic_at_check_ = 0;
  uint32_t successes_ = 0;
  uint32_t failures_ = 0;
  bool checked_ = false;
  bool stopped_ = false;
};

absl::StatusOr<std::unique_ptr<HealthChecker>> HealthChecker::Start(
    const ClusterManager& clusters) {
  std::unique_ptr<HealthChecker> checker(new HealthChecker());
  absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Start("gw-health");
  if (!loop.ok()) return loop.status();
  checker->loop_ = *std::move(loop);
  for (Cluster* cluster : clusters.clusters()) {
    if (cluster->config().health_checks.empty()) continue;
    const config::HealthCheck& cfg = cluster->config().health_checks.front();
    for (const auto& host : cluster->hosts()) {
      checker->checks_.push_back(
          std::make_shared<HostCheck>(*checker->loop_, *cluster, *host, cfg, checker->in_flight_));
    }
  }
  std::promise<void> started;
  checker->loop_->Post([c = checker.get(), &started] {
    for (auto& check : c->checks_) check->Start();
    started.set_value();
  });
  started.get_future().wait();
  return checker;
}

HealthChecker::~HealthChecker() {
  std::promise<void> stopped;
  loop_->Post([this, &stopped] {
    for (auto& check : checks_) check->Stop();
    stopped.set_value();
  });
  stopped.get_future().wait();
  const absl::Time limit = absl::Now() + absl::Seconds(10);
  while (in_flight_.load() > 0 && absl::Now() < limit) absl::SleepFor(absl::Milliseconds(5));
  // The checks' last posts run (or are dropped) with the loop; the checks die with it.
  loop_.reset();
  checks_.clear();
}

}  // namespace montage::gateway
