// Where generated answers are remembered: the cache service over gRPC when an address is
// configured (shared by every replica), else an in-process cache engine. Both are asynchronous;
// an unreachable cache answers with an error and generation goes on uncached.
#ifndef MONTAGE_SERVICES_GENERATION_ANSWER_CACHE_H_
#define MONTAGE_SERVICES_GENERATION_ANSWER_CACHE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "montage/config/v1/config.pb.h"

namespace montage::generation {

class AnswerCache {
 public:
  using GetCallback = absl::AnyInvocable<void(absl::StatusOr<std::optional<std::string>>) &&>;
  virtual ~AnswerCache() = default;
  // `done` runs once, on any thread, possibly before Get returns.
  virtual void Get(const std::string& key, GetCallback done) = 0;
  // Fire and forget; failures are counted, not reported. A zero ttl means the default.
  virtual void Set(const std::string& key, std::string value, absl::Duration ttl) = 0;
  virtual absl::string_view kind() const = 0;
  // Cancels calls in flight and waits for their callbacks; later calls fail at once (Get) or are
  // dropped (Set). Must not be called from one of this cache's callbacks. Idempotent.
  virtual void Close() {}
};

// From generation.cache: remote when `address` is set, else in-process.
absl::StatusOr<std::unique_ptr<AnswerCache>> MakeAnswerCache(
    const config::v1::GenerationCacheConfig& config, Clock& clock);

}  // namespace montage::generation

#endif  // MONTAGE_SERVICES_GENERATION_ANSWER_CACHE_H_
