#include "gateway/server/event_loop.h"

#include <event2/event.h>
#include <event2/thread.h>
#include <pthread.h>

#include <mutex>

namespace montage::gateway {

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Start(std::string name) {
  static std::once_flag threads_enabled;
  std::call_once(threads_enabled, [] { evthread_use_pthreads(); });
  std::unique_ptr<EventLoop> loop(new EventLoop(std::move(name)));
  loop->base_ = event_base_new();
  if (loop->base_ == nullptr) return absl::InternalError("event_base_new failed");
  loop->wakeup_ = event_new(
      loop->base_, -1, EV_PERSIST,
      [](evutil_socket_t, short, void* self) { static_cast<EventLoop*>(self)->RunPosted(); },
      loop.get());
  if (loop->wakeup_ == nullptr) return absl::InternalError("event_new failed");
  // A persistent event with no fd and no timeout is never "added"; event_active wakes it. A long
  // timer keeps the loop running while nothing else is registered.
  const timeval forever{3600 * 24 * 365, 0};
  event_add(loop->wakeup_, &forever);
  EventLoop* raw = loop.get();
  loop->thread_ = std::thread([raw] {
    pthread_setname_np(pthread_self(), raw->name_.substr(0, 15).c_str());
    event_base_loop(raw->base_, EVLOOP_NO_EXIT_ON_EMPTY);
  });
  return loop;
}

EventLoop::~EventLoop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  // The loop breaks itself when it sees the wake-up: a loopbreak from here could come before
  // event_base_loop started, which clears it.
  if (wakeup_ != nullptr) event_active(wakeup_, EV_TIMEOUT, 0);
  if (thread_.joinable()) thread_.join();
  std::vector<absl::AnyInvocable<void() &&>> dropped;
  {
    absl::MutexLock lock(&mu_);
    dropped.swap(posted_);
  }
  dropped.clear();
  if (wakeup_ != nullptr) event_free(wakeup_);
  if (base_ != nullptr) event_base_free(base_);
}

void EventLoop::Post(absl::AnyInvocable<void() &&> fn) {
  bool wake = false;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    posted_.push_back(std::move(fn));
    wake = !wakeup_pending_;
    wakeup_pending_ = true;
  }
  if (wake) event_active(wakeup_, EV_TIMEOUT, 0);
}

void EventLoop::RunPosted() {
  std::vector<absl::AnyInvocable<void() &&>> batch;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      event_base_loopbreak(base_);
      return;
    }
    batch.swap(posted_);
    wakeup_pending_ = false;
  }
  for (auto& fn : batch) std::move(fn)();
}

}  // namespace montage::gateway
