// One libevent loop on its own thread, with a thread-safe Post() that runs a closure on it. The
// gateway runs a few of these (its worker threads); each downstream connection lives on exactly
// one, and everything that touches a connection runs there.
#ifndef MONTAGE_GATEWAY_SERVER_EVENT_LOOP_H_
#define MONTAGE_GATEWAY_SERVER_EVENT_LOOP_H_

#include <string>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

struct event_base;
struct event;

namespace montage::gateway {

// Thread-safe: Post() from any thread; base() only on the loop thread.
class EventLoop {
 public:
  static absl::StatusOr<std::unique_ptr<EventLoop>> Start(std::string name);
  // Stops the loop and joins its thread; closures still queued are destroyed without running.
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Runs `fn` on the loop thread, after what was posted before it. Never runs it inline.
  void Post(absl::AnyInvocable<void() &&> fn);
  bool InLoopThread() const { return std::this_thread::get_id() == thread_.get_id(); }
  event_base* base() const { return base_; }
  const std::string& name() const { return name_; }

 private:
  explicit EventLoop(std::string name) : name_(std::move(name)) {}
  void RunPosted();

  std::string name_;
  event_base* base_ = nullptr;
  event* wakeup_ = nullptr;
  std::thread thread_;
  absl::Mutex mu_;
  std::vector<absl::AnyInvocable<void() &&>> posted_ ABSL_GUARDED_BY(mu_);
  bool wakeup_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_SERVER_EVENT_LOOP_H_
