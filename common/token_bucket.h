// A token bucket on an injectable clock: `capacity` tokens, refilled continuously at
// capacity / period. Used for per-deployment requests-per-minute and tokens-per-minute limits.
// Take() may drive the balance below zero (a debt) when the real cost turns out larger than the
// estimate (Adjust), so the limit holds over time even when costs are only known afterwards.
// Thread-safe.
#ifndef MONTAGE_COMMON_TOKEN_BUCKET_H_
#define MONTAGE_COMMON_TOKEN_BUCKET_H_

#include <algorithm>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"

namespace montage {

class TokenBucket {
 public:
  // capacity 0 means unlimited.
  TokenBucket(double capacity, absl::Duration period, Clock& clock)
      : capacity_(capacity),
        period_(period),
        clock_(clock),
        tokens_(capacity),
        last_(clock.Now()) {}

  bool unlimited() const { return capacity_ <= 0; }

  // Takes `n` tokens when the balance covers them; false (taking nothing) otherwise.
  bool TryTake(double n) {
    if (unlimited()) return true;
    absl::MutexLock lock(&mu_);
    Refill();
    if (tokens_ < n) return false;
    tokens_ -= n;
    return true;
  }

  // Corrects an earlier take by `delta` tokens (positive: take more; negative: give back).
  void Adjust(double delta) {
    if (unlimited()) return;
    absl::MutexLock lock(&mu_);
    Refill();
    tokens_ = std::min(capacity_, tokens_ - delta);
  }

  // How long until `n` tokens are available (zero when they are now; InfiniteDuration when n
  // exceeds the capacity).
  absl::Duration TimeUntil(double n) {
    if (unlimited()) return absl::ZeroDuration();
    if (n > capacity_) return absl::InfiniteDuration();
    absl::MutexLock lock(&mu_);
    Refill();
    if (tokens_ >= n) return absl::ZeroDuration();
    return period_ * ((n - tokens_) / capacity_);
  }

 private:
  void Refill() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const absl::Time now = clock_.Now();
    if (now <= last_) return;
    tokens_ = std::min(capacity_, tokens_ + capacity_ * absl::FDivDuration(now - last_, period_));
    last_ = now;
  }

  const double capacity_;
  const absl::Duration period_;
  Clock& clock_;
  absl::Mutex mu_;
  double tokens_ ABSL_GUARDED_BY(mu_);
  absl::Time last_ ABSL_GUARDED_BY(mu_);
};

}  // namespace montage

#endif  // MONTAGE_COMMON_TOKEN_BUCKET_H_
