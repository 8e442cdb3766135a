// Bounded polling for tests: wait for a condition that another thread or process makes true,
// without asserting how long it takes. Header-only so any test target can use it.
#ifndef MONTAGE_TESTS_TESTING_EVENTUALLY_H_
#define MONTAGE_TESTS_TESTING_EVENTUALLY_H_

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace montage::testing {

// True once `done` holds (checked every 5 ms, for at most `limit`).
template <typename F>
bool Eventually(F done, absl::Duration limit = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + limit;
  while (absl::Now() < end) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return done();
}

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_TESTING_EVENTUALLY_H_
