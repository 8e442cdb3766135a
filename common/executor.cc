#include "common/executor.h"

#include <pthread.h>

#include "absl/strings/str_cat.h"

namespace montage {
namespace {

void NameThread(const std::string& name) {
  // Linux limits thread names to 15 characters.
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
}

}  // namespace

ThreadPool::ThreadPool(size_t threads, size_t max_queue, std::string name)
    : max_queue_(max_queue), name_(std::move(name)) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  workers_.reserve(threads);
  for (size_t i = 0; i < threads; ++i) {
    workers_.emplace_back([this, i] {
      NameThread(absl::StrCat(name_, "-", i));
      Work();
    });
  }
}

ThreadPool::~ThreadPool() { Shutdown(); }

absl::Status ThreadPool::Schedule(absl::AnyInvocable<void() &&> fn) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::FailedPreconditionError(absl::StrCat(name_, " is shutting down"));
  if (queue_.size() >= max_queue_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(name_, " is busy (", max_queue_, " tasks queued); retry later"));
  }
  queue_.push_back(std::move(fn));
  return absl::OkStatus();
}

void ThreadPool::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
  }
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
  workers_.clear();
}

size_t ThreadPool::queued() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

void ThreadPool::Work() {
  while (true) {
    absl::AnyInvocable<void() &&> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ThreadPool* self)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return self->stopping_ || !self->queue_.empty(); },
          this));
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(task)();
  }
}

PeriodicTask::PeriodicTask(absl::Duration interval, absl::AnyInvocable<void()> fn, std::string name)
    : interval_(interval), fn_(std::move(fn)) {
  thread_ = std::thread([this, name] {
    NameThread(name);
    Run();
  });
}

PeriodicTask::~PeriodicTask() { Stop(); }

void PeriodicTask::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void PeriodicTask::Run() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      const absl::Time wake = absl::Now() + interval_;
      while (!stop_ && absl::Now() < wake) {
        mu_.AwaitWithDeadline(absl::Condition(&stop_), wake);
      }
      if (stop_) return;
    }
    fn_();
  }
}

}  // namespace montage
