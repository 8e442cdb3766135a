// The cache service's gRPC adapter (montage.cache.v1.CacheService) and its registration entry
// point. The adapter only converts between protos and the engine (cache_engine.h); waiting on a
// lease holds no thread: the call's reactor is completed by whoever sets the value or by the
// sweeper.
#ifndef MONTAGE_SERVICES_CACHE_CACHE_SERVICE_H_
#define MONTAGE_SERVICES_CACHE_CACHE_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"
#include "montage/cache/v1/cache.grpc.pb.h"
#include "services/cache/cache_engine.h"

namespace montage::cache {

// Thread-safe (the engine is). Does not own the engine.
class CacheServiceImpl final : public v1::CacheService::CallbackService {
 public:
  // `executor` runs snapshot writes (file I/O) off the gRPC threads; `persist_path` may be empty.
  CacheServiceImpl(CacheEngine& engine, Executor& executor, std::string persist_path);

  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* context, const v1::GetRequest* request,
                                v1::GetResponse* response) override;
  grpc::ServerUnaryReactor* Set(grpc::CallbackServerContext* context, const v1::SetRequest* request,
                                v1::Entry* response) override;
  grpc::ServerUnaryReactor* Delete(grpc::CallbackServerContext* context,
                                   const v1::DeleteRequest* request,
                                   v1::DeleteResponse* response) override;
  grpc::ServerUnaryReactor* BatchGet(grpc::CallbackServerContext* context,
                                     const v1::BatchGetRequest* request,
                                     v1::BatchGetResponse* response) override;
  grpc::ServerUnaryReactor* BatchSet(grpc::CallbackServerContext* context,
                                     const v1::BatchSetRequest* request,
                                     v1::BatchSetResponse* response) override;
  grpc::ServerUnaryReactor* Invalidate(grpc::CallbackServerContext* context,
                                       const v1::InvalidateRequest* request,
                                       v1::InvalidateResponse* response) override;
  grpc::ServerUnaryReactor* ReleaseLease(grpc::CallbackServerContext* context,
                                         const v1::ReleaseLeaseRequest* request,
                                         v1::ReleaseLeaseResponse* response) override;
  grpc::ServerUnaryReactor* Cleanup(grpc::CallbackServerContext* context,
                                    const v1::CleanupRequest* request,
                                    v1::CleanupResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const v1::GetStatsRequest* request,
                                     v1::CacheStats* response) override;
  grpc::ServerUnaryReactor* Snapshot(grpc::CallbackServerContext* context,
                                     const v1::SnapshotRequest* request,
                                     v1::SnapshotResponse* response) override;

 private:
  CacheEngine& engine_;
  Executor& executor_;
  const std::string persist_path_;
};

// Engine options from the config's `cache` section.
CacheOptions CacheOptionsFromConfig(const config::v1::CacheConfig& config);

// The registration entry point montaged lists under "cache".
absl::StatusOr<std::unique_ptr<ServiceModule>> NewCacheModule(ServiceContext& context);

}  // namespace montage::cache

#endif  // MONTAGE_SERVICES_CACHE_CACHE_SERVICE_H_
