#include "services/generation/answer_cache.h"

#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "common/telemetry/grpc_interceptors.h"
#include "google/protobuf/util/time_util.h"
#include "grpcpp/grpcpp.h"
#include "montage/cache/v1/cache.grpc.pb.h"
#include "services/cache/cache_engine.h"

namespace montage::generation {
namespace {

absl::Duration ToAbsl(const google::protobuf::Duration& d) {
  return absl::Nanoseconds(google::protobuf::util::TimeUtil::DurationToNanoseconds(d));
}

// The generation process's own cache (the embedded default and `montaged generation` alone).
class InProcessAnswerCache final : public AnswerCache {
 public:
  InProcessAnswerCache(std::unique_ptr<cache::CacheEngine> engine, std::string ns)
      : engine_(std::move(engine)), ns_(std::move(ns)) {}

  void Get(const std::string& key, GetCallback done) override {
    absl::StatusOr<std::optional<cache::Entry>> entry = engine_->Get(ns_, key);
    if (!entry.ok()) {
      std::move(done)(entry.status());
      return;
    }
    if (!entry->has_value()) {
      std::move(done)(std::optional<std::string>());
      return;
    }
    std::move(done)(std::optional<std::string>(std::move((*entry)->value)));
  }

  void Set(const std::string& key, std::string value, absl::Duration ttl) override {
    std::optional<absl::Duration> t;
    if (ttl > absl::ZeroDuration()) t = ttl;
    (void)engine_->Set(ns_, key, std::move(value), t);
  }

  absl::string_view kind() const override { return "in-process"; }

 private:
  std::unique_ptr<cache::CacheEngine> engine_;
  const std::string ns_;
};

// The cache service over gRPC (async callback stubs; no thread waits).
class RemoteAnswerCache final : public AnswerCache {
 public:
  RemoteAnswerCache(std::shared_ptr<grpc::Channel> channel, std::string ns, absl::Duration timeout)
      : stub_(cache::v1::CacheService::NewStub(std::move(channel))),
        ns_(std::move(ns)),
        timeout_(timeout) {}

  // Outstanding calls are cancelled and waited for (bounded), so no callback outlives the cache
  // or the gRPC library.
  ~RemoteAnswerCache() override {
    absl::MutexLock lock(&mu_);
    for (grpc::ClientContext* c : calls_) c->TryCancel();
    auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_.empty(); };
    mu_.AwaitWithTimeout(absl::Condition(&drained), absl::Seconds(5));
  }

  void Get(const std::string& key, GetCallback done) override {
    struct Call {
      grpc::ClientContext context;
      cache::v1::GetRequest request;
      cache::v1::GetResponse response;
      GetCallback done;
    };
    auto* call = new Call;
    Prepare(call->context);
    call->request.set_namespace_(ns_);
    call->request.set_key(key);
    call->done = std::move(done);
    stub_->async()->Get(&call->context, &call->request, &call->response,
                        [this, call](grpc::Status status) {
                          std::unique_ptr<Call> owned(call);
                          if (!status.ok()) {
                            std::move(owned->done)(FromGrpcStatus(status));
                          } else if (!owned->response.found()) {
                            std::move(owned->done)(std::optional<std::string>());
                          } else {
                            std::move(owned->done)(std::optional<std::string>(
                                std::move(*owned->response.mutable_entry()->mutable_value())));
                          }
                          Finished(&owned->context);
                        });
  }

  void Set(const std::string& key, std::string value, absl::Duration ttl) override {
    struct Call {
      grpc::ClientContext context;
      cache::v1::SetRequest request;
      cache::v1::Entry response;
    };
    auto* call = new Call;
    Prepare(call->context);
    call->request.set_namespace_(ns_);
    call->request.set_key(key);
    call->request.set_value(std::move(value));
    if (ttl > absl::ZeroDuration()) {
      *call->request.mutable_ttl() =
          google::protobuf::util::TimeUtil::NanosecondsToDuration(absl::ToInt64Nanoseconds(ttl));
    }
    stub_->async()->Set(&call->context, &call->request, &call->response,
                        [this, call](grpc::Status) {
                          std::unique_ptr<Call> owned(call);
                          Finished(&owned->context);
                        });
  }

  absl::string_view kind() const override { return "remote"; }

 private:
  void Prepare(grpc::ClientContext& context) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
    absl::MutexLock lock(&mu_);
    calls_.insert(&context);
  }
  void Finished(grpc::ClientContext* context) {
    absl::MutexLock lock(&mu_);
    calls_.erase(context);
  }

  absl::Mutex mu_;
  absl::flat_hash_set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<cache::v1::CacheService::Stub> stub_;
  const std::string ns_;
  const absl::Duration timeout_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AnswerCache>> MakeAnswerCache(
    const config::v1::GenerationCacheConfig& config, Clock& clock) {
  const std::string ns = config.namespace_().empty() ? "generation" : config.namespace_();
  const absl::Duration ttl =
      config.has_default_ttl() ? ToAbsl(config.default_ttl()) : absl::Hours(24);
  if (!config.address().empty()) {
    const absl::Duration timeout =
        config.has_timeout() ? ToAbsl(config.timeout()) : absl::Milliseconds(250);
    auto channel = telemetry::CreateTracedChannel(
        config.address(), grpc::InsecureChannelCredentials(), grpc::ChannelArguments());
    return std::make_unique<RemoteAnswerCache>(std::move(channel), ns, timeout);
  }
  cache::CacheOptions options;
  options.defaults.max_bytes = config.max_bytes() > 0 ? config.max_bytes() : (64ull << 20);
  options.defaults.default_ttl = ttl;
  options.namespaces[ns] = options.defaults;
  options.max_value_bytes = options.defaults.max_bytes;
  options.shards = 4;
  ASSIGN_OR_RETURN(std::unique_ptr<cache::CacheEngine> engine,
                   cache::CacheEngine::Create(options, clock));
  return std::make_unique<InProcessAnswerCache>(std::move(engine), ns);
}

}  // namespace montage::generation
