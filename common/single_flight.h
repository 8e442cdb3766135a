// Single-flight: concurrent requests for the same key run the work once and share its result.
// Asynchronous: nobody waits on a thread. The first caller (the leader) starts the work; later
// callers for the same key only register a callback; when the work finishes every callback gets
// the result. Once finished, the key is forgotten (a later call starts new work).
//
// Thread-safe. Callbacks run on the thread that finishes the work, outside the lock.
#ifndef MONTAGE_COMMON_SINGLE_FLIGHT_H_
#define MONTAGE_COMMON_SINGLE_FLIGHT_H_

#include <cstddef>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace montage {

template <typename Key, typename Value>
class SingleFlight {
 public:
  using Result = absl::StatusOr<Value>;
  using Callback = absl::AnyInvocable<void(const Result&) &&>;
  // Must call `finish` exactly once, now or later, from any thread.
  using Work = absl::AnyInvocable<void(absl::AnyInvocable<void(Result) &&> finish) &&>;

  // Returns true when this call became the leader and started `work`.
  bool Do(const Key& key, Work work, Callback done) {
    {
      absl::MutexLock lock(&mu_);
      auto [it, inserted] = waiting_.try_emplace(key);
      it->second.push_back(std::move(done));
      if (!inserted) {
        ++coalesced_;
        return false;
      }
    }
    std::move(work)([this, key](Result result) { Finish(key, std::move(result)); });
    return true;
  }

  size_t in_flight() const {
    absl::MutexLock lock(&mu_);
    return waiting_.size();
  }
  // Calls that joined work already running.
  size_t coalesced() const {
    absl::MutexLock lock(&mu_);
    return coalesced_;
  }

 private:
  void Finish(const Key& key, Result result) {
    std::vector<Callback> callbacks;
    {
      absl::MutexLock lock(&mu_);
      auto it = waiting_.find(key);
      if (it == waiting_.end()) return;
      callbacks = std::move(it->second);
      waiting_.erase(it);
    }
    for (Callback& cb : callbacks) std::move(cb)(result);
  }

  mutable absl::Mutex mu_;
  absl::flat_hash_map<Key, std::vector<Callback>> waiting_ ABSL_GUARDED_BY(mu_);
  size_t coalesced_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace montage

#endif  // MONTAGE_COMMON_SINGLE_FLIGHT_H_
