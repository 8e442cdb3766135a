#include "tests/gateway/echo_backend.h"

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "montage/testing/v1/echo.grpc.pb.h"

namespace montage::testing {
namespace {

using v1::EchoRequest;
using v1::EchoResponse;

// Runs closures at given times on one thread, so delays never hold a gRPC thread.
class Timer {
 public:
  Timer() : thread_([this] { Run(); }) {}
  ~Timer() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void At(absl::Time when, std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace(when, std::move(fn));
    }
    cv_.notify_all();
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      auto first = queue_.begin();
      if (first->first > absl::Now()) {
        cv_.wait_until(lock, absl::ToChronoTime(first->first));
        continue;
      }
      std::function<void()> fn = std::move(first->second);
      queue_.erase(first);
      lock.unlock();
      fn();
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<absl::Time, std::function<void()>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

struct Counters {
  std::atomic<int64_t> calls{0};
  std::atomic<int64_t> cancellations{0};
  std::atomic<int64_t> in_flight{0};
};

absl::Duration DelayOf(const EchoRequest& r) {
  return absl::Seconds(r.delay().seconds()) + absl::Nanoseconds(r.delay().nanos());
}

void Describe(grpc::CallbackServerContext* ctx, EchoResponse* out) {
  std::vector<std::string> md;
  for (const auto& [k, v] : ctx->client_metadata()) {
    const absl::string_view key(k.data(), k.size());
    const absl::string_view value(v.data(), v.size());
    // Binary values are shown base64-encoded (the field is a string).
    md.push_back(absl::StrCat(
        key, "=", absl::EndsWith(key, "-bin") ? absl::Base64Escape(value) : std::string(value)));
  }
  std::sort(md.begin(), md.end());
  for (auto& m : md) out->add_metadata(std::move(m));
  const auto deadline = ctx->deadline();
  out->set_deadline_ms(deadline == std::chrono::system_clock::time_point::max()
                           ? -1
                           : std::chrono::duration_cast<std::chrono::milliseconds>(
                                 deadline - std::chrono::system_clock::now())
                                 .count());
}

EchoResponse Answer(grpc::CallbackServerContext* ctx, const EchoRequest& r, int index) {
  EchoResponse out;
  out.set_message(r.message());
  out.set_index(index);
  if (r.payload_bytes() > 0) out.set_payload(std::string(r.payload_bytes(), 'x'));
  Describe(ctx, &out);
  return out;
}

// What a delayed completion needs to know: whether the reactor still exists.
struct Liveness {
  std::mutex mu;
  bool alive = true;
};

class EchoService final : public v1::EchoService::CallbackService {
 public:
  EchoService(Counters& counters, Timer& timer) : counters_(counters), timer_(timer) {}

  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const EchoRequest* request,
                                  EchoResponse* response) override {
    class Reactor final : public grpc::ServerUnaryReactor {
     public:
      Reactor(EchoService* svc, grpc::CallbackServerContext* ctx, const EchoRequest* request,
              EchoResponse* response)
          : svc_(svc), live_(std::make_shared<Liveness>()) {
        svc_->counters_.calls++;
        svc_->counters_.in_flight++;
        auto finish = [this, ctx, request, response] {
          if (finished_) return;
          finished_ = true;
          if (request->fail_code() != 0) {
            Finish(grpc::Status(static_cast<grpc::StatusCode>(request->fail_code()),
                                request->fail_message()));
          } else {
            *response = Answer(ctx, *request, 0);
            Finish(grpc::Status::OK);
          }
        };
        const absl::Duration delay = DelayOf(*request);
        if (delay <= absl::ZeroDuration()) {
          std::lock_guard<std::mutex> lock(live_->mu);
          finish();
          return;
        }
        svc_->timer_.At(absl::Now() + delay, [live = live_, this, finish] {
          std::lock_guard<std::mutex> lock(live->mu);
          if (live->alive && !cancelled_) finish();
        });
      }
      void OnCancel() override {
        std::lock_guard<std::mutex> lock(live_->mu);
        svc_->counters_.cancellations++;
        cancelled_ = true;
        if (!finished_) {
          finished_ = true;
          Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
        }
      }
      void OnDone() override {
        {
          std::lock_guard<std::mutex> lock(live_->mu);
          live_->alive = false;
        }
        svc_->counters_.in_flight--;
        delete this;
      }

     private:
      EchoService* svc_;
      std::shared_ptr<Liveness> live_;
      bool cancelled_ = false;
      bool finished_ = false;
    };
    return new Reactor(this, ctx, request, response);
  }

  grpc::ServerWriteReactor<EchoResponse>* ServerStream(grpc::CallbackServerContext* ctx,
                                                       const EchoRequest* request) override {
    class Reactor final : public grpc::ServerWriteReactor<EchoResponse> {
     public:
      Reactor(EchoService* svc, grpc::CallbackServerContext* ctx, const EchoRequest* request)
          : svc_(svc), ctx_(ctx), request_(*request), live_(std::make_shared<Liveness>()) {
        svc_->counters_.calls++;
        svc_->counters_.in_flight++;
        total_ = std::max(1, request_.repeat());
        std::lock_guard<std::mutex> lock(live_->mu);
        Next();
      }
      void OnWriteDone(bool ok) override {
        if (!ok) return;  // cancelled: OnCancel/OnDone follow
        std::lock_guard<std::mutex> lock(live_->mu);
        Next();
      }
      void OnCancel() override {
        std::lock_guard<std::mutex> lock(live_->mu);
        svc_->counters_.cancellations++;
        cancelled_ = true;
        if (!finished_) {
          finished_ = true;
          Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
        }
      }
      void OnDone() override {
        {
          std::lock_guard<std::mutex> lock(live_->mu);
          live_->alive = false;
        }
        svc_->counters_.in_flight--;
        delete this;
      }

     private:
      void Next() {
        auto step = [this] {
          if (finished_) return;
          if (request_.fail_code() != 0 && sent_ >= request_.fail_after()) {
            finished_ = true;
            Finish(grpc::Status(static_cast<grpc::StatusCode>(request_.fail_code()),
                                request_.fail_message()));
            return;
          }
          if (sent_ >= total_) {
            finished_ = true;
            Finish(grpc::Status::OK);
            return;
          }
          current_ = Answer(ctx_, request_, sent_++);
          StartWrite(&current_);
        };
        const absl::Duration delay = DelayOf(request_);
        if (delay <= absl::ZeroDuration()) {
          step();
          return;
        }
        svc_->timer_.At(absl::Now() + delay, [live = live_, this, step] {
          std::lock_guard<std::mutex> lock(live->mu);
          if (live->alive && !cancelled_) step();
        });
      }
      EchoService* svc_;
      grpc::CallbackServerContext* ctx_;
      EchoRequest request_;
      std::shared_ptr<Liveness> live_;
      EchoResponse current_;
      int total_ = 1;
      int sent_ = 0;
      bool cancelled_ = false;
      bool finished_ = false;
    };
    return new Reactor(this, ctx, request);
  }

  grpc::ServerReadReactor<EchoRequest>* ClientStream(grpc::CallbackServerContext* ctx,
                                                     EchoResponse* response) override {
    class Reactor final : public grpc::ServerReadReactor<EchoRequest> {
     public:
      Reactor(EchoService* svc, grpc::CallbackServerContext* ctx, EchoResponse* response)
          : svc_(svc), ctx_(ctx), response_(response) {
        svc_->counters_.calls++;
        svc_->counters_.in_flight++;
        StartRead(&request_);
      }
      void OnReadDone(bool ok) override {
        if (ok) {
          if (request_.fail_code() != 0) {
            Finish(grpc::Status(static_cast<grpc::StatusCode>(request_.fail_code()),
                                request_.fail_message()));
            return;
          }
          parts_.push_back(request_.message());
          StartRead(&request_);
          return;
        }
        response_->set_message(absl::StrJoin(parts_, ","));
        response_->set_index(static_cast<int>(parts_.size()));
        Describe(ctx_, response_);
        Finish(grpc::Status::OK);
      }
      void OnCancel() override { svc_->counters_.cancellations++; }
      void OnDone() override {
        svc_->counters_.in_flight--;
        delete this;
      }

     private:
      EchoService* svc_;
      grpc::CallbackServerContext* ctx_;
      EchoResponse* response_;
      EchoRequest request_;
      std::vector<std::string> parts_;
    };
    return new Reactor(this, ctx, response);
  }

  grpc::ServerBidiReactor<EchoRequest, EchoResponse>* Bidi(
      grpc::CallbackServerContext* ctx) override {
    class Reactor final : public grpc::ServerBidiReactor<EchoRequest, EchoResponse> {
     public:
      Reactor(EchoService* svc, grpc::CallbackServerContext* ctx) : svc_(svc), ctx_(ctx) {
        svc_->counters_.calls++;
        svc_->counters_.in_flight++;
        StartRead(&request_);
      }
      void OnReadDone(bool ok) override {
        if (!ok) {
          Done(grpc::Status::OK);
          return;
        }
        if (request_.fail_code() != 0 && index_ >= request_.fail_after()) {
          Done(grpc::Status(static_cast<grpc::StatusCode>(request_.fail_code()),
                            request_.fail_message()));
          return;
        }
        response_ = Answer(ctx_, request_, index_++);
        StartWrite(&response_);
      }
      void OnWriteDone(bool ok) override {
        if (ok) {
          StartRead(&request_);
        } else {
          Done(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
        }
      }
      void Done(const grpc::Status& status) {
        std::lock_guard<std::mutex> lock(mu_);
        if (finished_) return;
        finished_ = true;
        Finish(status);
      }
      void OnCancel() override { svc_->counters_.cancellations++; }
      void OnDone() override {
        svc_->counters_.in_flight--;
        delete this;
      }

     private:
      EchoService* svc_;
      grpc::CallbackServerContext* ctx_;
      EchoRequest request_;
      EchoResponse response_;
      int index_ = 0;
      std::mutex mu_;
      bool finished_ = false;
    };
    return new Reactor(this, ctx);
  }

 private:
  Counters& counters_;
  Timer& timer_;
};

}  // namespace

class EchoBackend::Impl {
 public:
  Counters counters;
  Timer timer;
  EchoService service{counters, timer};
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

EchoBackend::EchoBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<EchoBackend>> EchoBackend::Start(int port,
                                                                int max_concurrent_streams) {
  auto impl = std::make_unique<Impl>();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  if (max_concurrent_streams > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, max_concurrent_streams);
  }
  builder.AddListeningPort(absl::StrCat("127.0.0.1:", port), grpc::InsecureServerCredentials(),
                           &impl->port);
  builder.RegisterService(&impl->service);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("echo backend cannot listen on port ", port));
  }
  return std::unique_ptr<EchoBackend>(new EchoBackend(std::move(impl)));
}

EchoBackend::~EchoBackend() { Shutdown(); }

void EchoBackend::Shutdown() {
  if (impl_->server != nullptr) {
    impl_->server->Shutdown(std::chrono::system_clock::now());
    impl_->server->Wait();
    impl_->server.reset();
  }
}

void EchoBackend::SetServing(bool serving) {
  if (impl_->server != nullptr) impl_->server->GetHealthCheckService()->SetServingStatus(serving);
}

int EchoBackend::port() const { return impl_->port; }
std::string EchoBackend::address() const { return absl::StrCat("127.0.0.1:", impl_->port); }
int64_t EchoBackend::calls() const { return impl_->counters.calls.load(); }
int64_t EchoBackend::cancellations() const { return impl_->counters.cancellations.load(); }
int64_t EchoBackend::in_flight() const { return impl_->counters.in_flight.load(); }

}  // namespace montage::testing
