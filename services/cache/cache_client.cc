#include "services/cache/cache_client.h"

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/proto_time.h"
#include "common/status.h"
#include "common/telemetry/grpc_interceptors.h"
#include "grpcpp/grpcpp.h"
#include "montage/cache/v1/cache.grpc.pb.h"
#include "services/cache/cache_engine.h"

namespace montage::cache {
namespace {

// The process's own cache (the embedded default, and a service run alone).
class InProcessCacheClient final : public CacheClient {
 public:
  InProcessCacheClient(std::unique_ptr<CacheEngine> engine, std::string ns)
      : engine_(std::move(engine)), ns_(std::move(ns)) {}

  void Get(const std::string& key, GetCallback done) override {
    absl::StatusOr<std::optional<Entry>> entry = engine_->Get(ns_, key);
    if (!entry.ok()) {
      std::move(done)(entry.status());
      return;
    }
    if (!entry->has_value()) {
      std::move(done)(Value());
      return;
    }
    std::move(done)(std::move((*entry)->value));
  }

  void Set(const std::string& key, Value value, absl::Duration ttl) override {
    if (value == nullptr) return;  // nothing to store, as the remote client does
    std::optional<absl::Duration> t;
    if (ttl > absl::ZeroDuration()) t = ttl;
    (void)engine_->Set(ns_, key, std::move(value), t);
  }

  absl::string_view kind() const override { return "in-process"; }

 private:
  std::unique_ptr<CacheEngine> engine_;
  const std::string ns_;
};

// The cache service over gRPC (async callback stubs; no thread waits). Each call object is
// owned by its callback and by the table Close() walks, so Close can cancel calls without holding
// the lock while gRPC runs their callbacks.
class RemoteCacheClient final : public CacheClient {
 public:
  RemoteCacheClient(std::shared_ptr<grpc::Channel> channel, std::string ns, absl::Duration timeout)
      : stub_(cache::v1::CacheService::NewStub(std::move(channel))),
        ns_(std::move(ns)),
        timeout_(timeout) {}
  ~RemoteCacheClient() override { Close(); }

  void Close() override {
    std::vector<std::shared_ptr<CallBase>> calls;
    {
      absl::MutexLock lock(&mu_);
      closed_ = true;
      for (auto& [raw, call] : calls_) calls.push_back(call);
    }
    for (auto& call : calls) call->context.TryCancel();
    calls.clear();
    std::vector<std::shared_ptr<CallBase>> finished;
    {
      absl::MutexLock lock(&mu_);
      auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_.empty(); };
      mu_.Await(absl::Condition(&drained));
      finished.swap(finished_);
    }
  }

  void Get(const std::string& key, GetCallback done) override {
    struct Call : CallBase {
      cache::v1::GetRequest request;
      cache::v1::GetResponse response;
      GetCallback done;
    };
    auto call = std::make_shared<Call>();
    call->request.set_namespace_(ns_);
    call->request.set_key(key);
    if (!Register(call)) {
      std::move(done)(absl::UnavailableError("the cache client is closed"));
      return;
    }
    call->done = std::move(done);
    stub_->async()->Get(&call->context, &call->request, &call->response,
                        [this, call = call.get()](grpc::Status status) {
                          if (!status.ok()) {
                            std::move(call->done)(FromGrpcStatus(status));
                          } else if (!call->response.found()) {
                            std::move(call->done)(Value());
                          } else {
                            std::move(call->done)(std::make_shared<const std::string>(
                                std::move(*call->response.mutable_entry()->mutable_value())));
                          }
                          Unregister(call);
                        });
  }

  void Set(const std::string& key, Value value, absl::Duration ttl) override {
    if (value == nullptr) return;
    struct Call : CallBase {
      cache::v1::SetRequest request;
      cache::v1::Entry response;
    };
    auto call = std::make_shared<Call>();
    call->request.set_namespace_(ns_);
    call->request.set_key(key);
    call->request.set_value(*value);
    if (ttl > absl::ZeroDuration()) {
      *call->request.mutable_ttl() = ToProtoDuration(ttl);
    }
    if (!Register(call)) return;
    stub_->async()->Set(&call->context, &call->request, &call->response,
                        [this, raw = call.get()](grpc::Status) { Unregister(raw); });
  }

  absl::string_view kind() const override { return "remote"; }

 private:
  struct CallBase {
    virtual ~CallBase() = default;
    grpc::ClientContext context;
  };

  // A call's objects (its ClientContext above all) are never destroyed inside gRPC's callback:
  // the callback moves them to `finished_`, destroyed later by a thread of ours (the next
  // Register, or Close). Destroying the context from within its own completion raced with
  // gRPC's callback queue (an abort in grpc_cq_internal_unref, about one test run in four).
  bool Register(const std::shared_ptr<CallBase>& call) {
    call->context.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
    std::vector<std::shared_ptr<CallBase>> finished;  // destroyed on return, outside the lock
    absl::MutexLock lock(&mu_);
    if (closed_) return false;
    calls_[call.get()] = call;
    finished.swap(finished_);
    return true;
  }
  void Unregister(CallBase* call) {
    absl::MutexLock lock(&mu_);
    auto it = calls_.find(call);
    if (it == calls_.end()) return;
    finished_.push_back(std::move(it->second));
    calls_.erase(it);
  }

  std::unique_ptr<cache::v1::CacheService::Stub> stub_;
  const std::string ns_;
  const absl::Duration timeout_;
  absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_map<CallBase*, std::shared_ptr<CallBase>> calls_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<CallBase>> finished_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<CacheClient>> MakeCacheClient(
    const config::v1::CacheClientConfig& config, absl::string_view default_namespace,
    Clock& clock) {
  const std::string ns =
      config.namespace_().empty() ? std::string(default_namespace) : config.namespace_();
  const absl::Duration ttl =
      config.has_default_ttl() ? FromProtoDuration(config.default_ttl()) : absl::Hours(24);
  if (!config.address().empty()) {
    const absl::Duration timeout =
        config.has_timeout() ? FromProtoDuration(config.timeout()) : absl::Milliseconds(250);
    auto channel = telemetry::CreateTracedChannel(
        config.address(), grpc::InsecureChannelCredentials(), grpc::ChannelArguments());
    return std::make_unique<RemoteCacheClient>(std::move(channel), ns, timeout);
  }
  CacheOptions options;
  options.defaults.max_bytes = config.max_bytes() > 0 ? config.max_bytes() : (64ull << 20);
  options.defaults.default_ttl = ttl;
  options.namespaces[ns] = options.defaults;
  options.max_value_bytes = options.defaults.max_bytes;
  options.shards = 4;
  ASSIGN_OR_RETURN(std::unique_ptr<CacheEngine> engine, CacheEngine::Create(options, clock));
  return std::make_unique<InProcessCacheClient>(std::move(engine), ns);
}

}  // namespace montage::cache
