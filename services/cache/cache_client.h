// How a service remembers expensive results (generated answers, synthesised speech segments): the
// cache service over gRPC when an address is configured (shared by every replica), else an
// in-process cache engine. Both are asynchronous; an unreachable cache answers with an error and
// the caller goes on uncached.
#ifndef MONTAGE_SERVICES_CACHE_CACHE_CLIENT_H_
#define MONTAGE_SERVICES_CACHE_CACHE_CLIENT_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "montage/config/v1/config.pb.h"
#include "services/cache/cache_engine.h"

namespace montage::cache {

class CacheClient {
 public:
  // A value is shared, never copied, between the in-process cache and its readers; null is a miss.
  using GetCallback = absl::AnyInvocable<void(absl::StatusOr<Value>) &&>;
  virtual ~CacheClient() = default;
  // `done` runs once, on any thread, possibly before Get returns.
  virtual void Get(const std::string& key, GetCallback done) = 0;
  // Fire and forget; failures are counted, not reported. A zero ttl means the default; a null
  // value is ignored. The caller must not change the value afterwards.
  virtual void Set(const std::string& key, Value value, absl::Duration ttl) = 0;
  virtual absl::string_view kind() const = 0;
  // Cancels calls in flight and waits for their callbacks; later calls fail at once (Get) or are
  // dropped (Set). Must not be called from one of this cache's callbacks. Idempotent.
  virtual void Close() {}
};

// Remote when `address` is set, else in-process. Entries go to config.namespace, or to
// `default_namespace` when that is empty.
absl::StatusOr<std::unique_ptr<CacheClient>> MakeCacheClient(
    const config::v1::CacheClientConfig& config, absl::string_view default_namespace, Clock& clock);

}  // namespace montage::cache

#endif  // MONTAGE_SERVICES_CACHE_CACHE_CLIENT_H_
