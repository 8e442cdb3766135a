// Executors for CPU work and background tasks. Request handlers never block: work that takes
// CPU time (encoding, synthesis, big JSON) is scheduled on a bounded ThreadPool sized to the
// cores, and periodic housekeeping (sweeps, snapshots) runs on a PeriodicTask thread.
#ifndef MONTAGE_COMMON_EXECUTOR_H_
#define MONTAGE_COMMON_EXECUTOR_H_

#include <cstddef>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace montage {

// Runs closures somewhere else. Thread-safe.
class Executor {
 public:
  virtual ~Executor() = default;
  // RESOURCE_EXHAUSTED when the queue is full (the caller answers the client, never waits);
  // FAILED_PRECONDITION after shutdown.
  virtual absl::Status Schedule(absl::AnyInvocable<void() &&> fn) = 0;
};

// A fixed number of threads draining a bounded FIFO queue. Thread-safe. The destructor runs what
// is queued, then joins.
class ThreadPool final : public Executor {
 public:
  // `threads` 0 means one per core.
  ThreadPool(size_t threads, size_t max_queue, std::string name);
  ~ThreadPool() override;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  absl::Status Schedule(absl::AnyInvocable<void() &&> fn) override;
  // Stops accepting work, finishes what is queued and joins. Idempotent.
  void Shutdown();
  size_t threads() const { return workers_.size(); }
  size_t queued() const;

 private:
  void Work();

  const size_t max_queue_;
  const std::string name_;
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

// Calls `fn` every `interval` on its own thread until destroyed (or Stop()). The first call
// happens one interval after construction. Stop() waits for a running call to finish.
class PeriodicTask {
 public:
  PeriodicTask(absl::Duration interval, absl::AnyInvocable<void()> fn, std::string name);
  ~PeriodicTask();
  PeriodicTask(const PeriodicTask&) = delete;
  PeriodicTask& operator=(const PeriodicTask&) = delete;
  void Stop();

 private:
  void Run();
  const absl::Duration interval_;
  absl::AnyInvocable<void()> fn_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace montage

#endif  // MONTAGE_COMMON_EXECUTOR_H_
