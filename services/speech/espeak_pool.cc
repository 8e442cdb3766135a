#include "services/speech/espeak_pool.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "services/speech/espeak_worker.h"

extern char** environ;

namespace montage::speech {
namespace {

// How often the poll thread looks at busy workers, and how long past a segment's deadline a
// worker may go on before it is killed.
constexpr int kBusyCheckMs = 100;
constexpr absl::Duration kStuckGrace = absl::Seconds(2);

absl::Mutex g_command_mu;
std::vector<std::string>* g_command ABSL_GUARDED_BY(g_command_mu) = nullptr;

// One segment in the pool. `done` runs once: by whoever moves `state` to kFinished.
struct PoolJob {
  enum State { kQueued, kRunning, kFinished };
  Segment segment;
  absl::Time deadline;
  TtsEngine::Done done;
  std::atomic<int> state{kQueued};
  std::shared_ptr<SynthesisHandle> local;  // the in-process lane's handle
  absl::Mutex mu;                          // guards `local`

  bool Finish(absl::StatusOr<std::string> result) {
    int expected = kRunning;
    if (!state.compare_exchange_strong(expected, kFinished)) {
      expected = kQueued;
      if (!state.compare_exchange_strong(expected, kFinished)) return false;
    }
    std::move(done)(std::move(result));
    return true;
  }
};

class PoolHandle final : public SynthesisHandle {
 public:
  explicit PoolHandle(std::weak_ptr<PoolJob> job) : job_(std::move(job)) {}
  void Cancel() override {
    std::shared_ptr<PoolJob> job = job_.lock();
    if (job == nullptr) return;
    std::shared_ptr<SynthesisHandle> local;
    {
      absl::MutexLock lock(&job->mu);
      local = job->local;
    }
    // In the in-process lane the engine reports CANCELLED itself; elsewhere the answer of a
    // worker that is still speaking is dropped when it comes.
    if (local != nullptr) {
      local->Cancel();
    } else {
      job->Finish(absl::CancelledError("synthesis cancelled"));
    }
  }

 private:
  std::weak_ptr<PoolJob> job_;
};

class EspeakPool final : public TtsEngine {
 public:
  EspeakPool(std::unique_ptr<TtsEngine> local, EspeakPoolOptions options)
      : local_(std::move(local)), options_(std::move(options)) {
    workers_.resize(options_.lanes > 1 ? options_.lanes - 1 : 0);
  }

  ~EspeakPool() override { Shutdown(); }

  absl::Status Start() {
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return absl::InternalError(absl::StrCat("eventfd: ", strerror(errno)));
    {
      absl::MutexLock lock(&mu_);
      for (Worker& w : workers_) {
        absl::StatusOr<Process> process = StartProcess();
        if (!process.ok()) {
          for (Worker& started : workers_) Stop(started);
          return process.status();
        }
        Install(w, *process);
      }
    }
    thread_ = std::thread([this] { Poll(); });
    return absl::OkStatus();
  }

  absl::string_view kind() const override { return local_->kind(); }
  uint32_t sample_rate() const override { return local_->sample_rate(); }
  bool supports_ssml() const override { return local_->supports_ssml(); }
  size_t max_segment_chars() const override { return local_->max_segment_chars(); }
  size_t max_concurrency() const override { return 1 + workers_.size(); }
  std::vector<VoiceInfo> Voices() const override { return local_->Voices(); }
  absl::Status Validate(const VoiceParams& voice) const override { return local_->Validate(voice); }

  std::shared_ptr<SynthesisHandle> Synthesize(Segment segment, absl::Time deadline,
                                              Done done) override {
    auto job = std::make_shared<PoolJob>();
    job->segment = std::move(segment);
    job->deadline = deadline;
    job->done = std::move(done);
    auto handle = std::make_shared<PoolHandle>(job);
    std::shared_ptr<PoolJob> local;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) {
        local = nullptr;
      } else {
        queue_.push_back(job);
        local = DispatchLocked();
        job = nullptr;
      }
    }
    if (job != nullptr) job->Finish(absl::CancelledError("the espeak engine is shutting down"));
    if (local != nullptr) RunLocal(std::move(local));
    return handle;
  }

  void Shutdown() override {
    std::deque<std::shared_ptr<PoolJob>> dropped;
    std::vector<std::shared_ptr<PoolJob>> running;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      stopping_ = true;
      // A segment handed to the in-process engine but not yet given to it is either given now
      // or refused; wait for that, so local_->Shutdown() below sees it.
      mu_.Await(absl::Condition(
          +[](int* handing) { return *handing == 0; }, &local_handoffs_));
      dropped.swap(queue_);
      for (Worker& w : workers_) {
        if (w.job != nullptr) running.push_back(std::move(w.job));
      }
    }
    Wake();
    if (thread_.joinable()) thread_.join();
    {
      absl::MutexLock lock(&mu_);
      for (Worker& w : workers_) Stop(w);
    }
    if (wake_fd_ >= 0) close(wake_fd_);
    wake_fd_ = -1;
    for (auto& job : dropped)
      job->Finish(absl::CancelledError("the espeak engine is shutting down"));
    for (auto& job : running)
      job->Finish(absl::CancelledError("the espeak engine is shutting down"));
    local_->Shutdown();
  }

 private:
  struct Worker {
    pid_t pid = -1;
    int fd = -1;
    std::shared_ptr<PoolJob> job;  // the segment it speaks now
    std::string out;               // request bytes not yet written
    size_t out_offset = 0;
    // The response being read: its header, then its body in place.
    char head[kWorkerResponseHeader];
    size_t head_len = 0;
    bool in_body = false;
    std::string body;
    size_t body_len = 0;
    // A worker that died is started again by the poll thread (the only thread that starts
    // workers after Start), outside the lock, at once; after a failed start, or a worker that
    // ended before its first answer, only after options_.respawn_delay (a broken installation is
    // not restarted in a loop).
    bool answered = false;  // this process has sent an answer
    bool failing = false;   // the lane's last start failed or ended before an answer
    absl::Time start_after = absl::InfinitePast();

    void ClearResponse() {
      head_len = 0;
      in_body = false;
      body = std::string();
      body_len = 0;
    }
  };

  struct Process {
    pid_t pid = -1;
    int fd = -1;  // our end of its socketpair, non-blocking
  };

  // Starts a worker process (touches nothing but options_, which never changes).
  absl::StatusOr<Process> StartProcess() const {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      return absl::InternalError(absl::StrCat("socketpair: ", strerror(errno)));
    }
    std::vector<std::string> args = options_.worker_command;
    if (!options_.espeak.data_path.empty()) args.push_back(options_.espeak.data_path);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 0);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    pid_t pid = -1;
    const int spawned = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    if (spawned != 0) {
      close(fds[0]);
      return absl::FailedPreconditionError(
          absl::StrCat("cannot start an espeak worker (", args[0], "): ", strerror(spawned)));
    }
    fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    return Process{pid, fds[0]};
  }

  void Install(Worker& w, const Process& process) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    w.pid = process.pid;
    w.fd = process.fd;
    w.answered = false;
    w.out.clear();
    w.out_offset = 0;
    w.ClearResponse();
  }

  // Starts the workers that died (on the poll thread, with mu_ released while each process
  // starts, so a caller handing in a segment never waits for a fork and exec).
  void RespawnDeadWorkers() ABSL_LOCKS_EXCLUDED(mu_) {
    std::vector<Worker*> dead;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      const absl::Time now = absl::Now();
      for (Worker& w : workers_) {
        if (w.fd < 0 && now >= w.start_after) dead.push_back(&w);
      }
    }
    for (Worker* w : dead) {
      absl::StatusOr<Process> process = StartProcess();
      absl::MutexLock lock(&mu_);
      if (!process.ok()) {
        Failing(*w, "cannot start an espeak worker", process.status().message());
        continue;
      }
      Install(*w, *process);
      if (stopping_) Stop(*w);
    }
    // Segments may be waiting for the lanes that came back: the poll loop hands them out.
    if (!dead.empty()) Wake();
  }

  // Closes the socket (the worker exits on EOF) and reaps the process.
  void Stop(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (w.fd >= 0) close(w.fd);
    w.fd = -1;
    if (w.pid > 0) {
      // A worker in the middle of a long text would finish it first: it is not waited for.
      kill(w.pid, SIGKILL);
      waitpid(w.pid, nullptr, 0);
    }
    w.pid = -1;
  }

  void Wake() {
    const uint64_t one = 1;
    if (wake_fd_ >= 0) (void)!write(wake_fd_, &one, sizeof(one));
  }

  // Hands queued segments to free lanes: the in-process engine first, then the workers. Returns
  // the segment for the in-process engine, which the caller starts once it let go of mu_ (the
  // engine may report at once, and its report takes mu_).
  [[nodiscard]] std::shared_ptr<PoolJob> DispatchLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    bool wrote = false;
    std::shared_ptr<PoolJob> local;
    while (!queue_.empty()) {
      std::shared_ptr<PoolJob> job = queue_.front();
      if (job->state.load() != PoolJob::kQueued) {  // cancelled while queued
        queue_.pop_front();
        continue;
      }
      if (!local_busy_) {
        queue_.pop_front();
        int expected = PoolJob::kQueued;
        if (!job->state.compare_exchange_strong(expected, PoolJob::kRunning)) continue;
        local_busy_ = true;
        ++local_handoffs_;
        local = std::move(job);
        continue;
      }
      Worker* free = nullptr;
      for (Worker& w : workers_) {
        if (w.job == nullptr && w.fd >= 0) {  // a dead one is started again by the poll thread
          free = &w;
          break;
        }
      }
      if (free == nullptr) break;
      queue_.pop_front();
      int expected = PoolJob::kQueued;
      if (!job->state.compare_exchange_strong(expected, PoolJob::kRunning)) continue;
      free->job = job;
      free->out = EncodeWorkerRequest(job->segment, job->deadline);
      free->out_offset = 0;
      free->ClearResponse();
      wrote = true;
    }
    if (wrote) Wake();  // the poll thread writes the requests
    return local;
  }

  // Runs `job` (already kRunning, local_busy_ set, counted in local_handoffs_) on the in-process
  // engine.
  void RunLocal(std::shared_ptr<PoolJob> job) ABSL_LOCKS_EXCLUDED(mu_) {
    bool refused = false;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) {
        local_busy_ = false;
        --local_handoffs_;
        refused = true;
      }
    }
    if (refused) {
      job->Finish(absl::CancelledError("the espeak engine is shutting down"));
      return;
    }
    Segment segment = job->segment;
    std::shared_ptr<SynthesisHandle> handle = local_->Synthesize(
        std::move(segment), job->deadline, [this, job](absl::StatusOr<std::string> pcm) mutable {
          job->Finish(std::move(pcm));
          std::shared_ptr<PoolJob> next;
          {
            absl::MutexLock lock(&mu_);
            local_busy_ = false;
            if (!stopping_) next = DispatchLocked();
          }
          if (next != nullptr) RunLocal(std::move(next));
        });
    {
      absl::MutexLock lock(&job->mu);
      job->local = std::move(handle);
    }
    absl::MutexLock lock(&mu_);
    --local_handoffs_;
  }

  // The poll thread: writes requests, reads answers, notices workers that died.
  void Poll() {
    std::vector<pollfd> fds;
    std::vector<Worker*> owners;
    for (;;) {
      fds.clear();
      owners.clear();
      fds.push_back({wake_fd_, POLLIN, 0});
      owners.push_back(nullptr);
      RespawnDeadWorkers();
      int timeout_ms = -1;
      auto wake_within = [&timeout_ms](int ms) {
        timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
      };
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) return;
        for (Worker& w : workers_) {
          if (w.fd < 0) {
            // One whose start failed is tried again when its delay is over.
            wake_within(static_cast<int>(
                std::clamp<int64_t>(absl::ToInt64Milliseconds(w.start_after - absl::Now()) + 1, 0,
                                    absl::ToInt64Milliseconds(options_.respawn_delay))));
            continue;
          }
          // A busy worker is looked at every so often: its segment may have been cancelled or
          // be long past its deadline.
          if (w.job != nullptr) wake_within(kBusyCheckMs);
          short events = POLLIN;
          if (w.out_offset < w.out.size()) events |= POLLOUT;
          fds.push_back({w.fd, events, 0});
          owners.push_back(&w);
        }
      }
      if (poll(fds.data(), fds.size(), timeout_ms) < 0 && errno != EINTR) {
        LogError("espeak pool: poll failed", {{"error", std::string(strerror(errno))}});
        return;
      }
      if (fds[0].revents & POLLIN) {
        uint64_t count;
        (void)!read(wake_fd_, &count, sizeof(count));
      }
      std::vector<std::pair<std::shared_ptr<PoolJob>, absl::StatusOr<std::string>>> finished;
      std::shared_ptr<PoolJob> local;
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) return;
        for (size_t i = 1; i < fds.size(); ++i) {
          Worker& w = *owners[i];
          if (w.fd != fds[i].fd) continue;
          if (fds[i].revents & POLLOUT) WriteSome(w);
          if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) ReadSome(w, finished);
        }
        ReclaimStuckWorkers(finished);
        local = DispatchLocked();
      }
      for (auto& [job, result] : finished) job->Finish(std::move(result));
      if (local != nullptr) RunLocal(std::move(local));
    }
  }

  // A worker still speaking a cancelled segment, or one far past its deadline (the worker stops
  // at the deadline itself; this is for one that hangs), is killed so that its lane serves the
  // next segment; the poll loop starts a new worker at once.
  void ReclaimStuckWorkers(
      std::vector<std::pair<std::shared_ptr<PoolJob>, absl::StatusOr<std::string>>>& finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const absl::Time now = absl::Now();
    for (Worker& w : workers_) {
      if (w.job == nullptr || w.fd < 0) continue;
      if (w.job->state.load() == PoolJob::kFinished) {
        w.job = nullptr;
        Stop(w);
      } else if (w.job->deadline != absl::InfiniteFuture() && now > w.job->deadline + kStuckGrace) {
        finished.emplace_back(std::move(w.job),
                              absl::DeadlineExceededError("the espeak worker passed the deadline"));
        w.job = nullptr;
        Stop(w);
      }
    }
  }

  void WriteSome(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    while (w.out_offset < w.out.size()) {
      // MSG_NOSIGNAL: a worker that died makes this EPIPE, not a SIGPIPE for the whole process.
      const ssize_t n =
          send(w.fd, w.out.data() + w.out_offset, w.out.size() - w.out_offset, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;  // EAGAIN, or the worker died (the read side notices)
      w.out_offset += static_cast<size_t>(n);
    }
    std::string().swap(w.out);
    w.out_offset = 0;
  }

  void ReadSome(
      Worker& w,
      std::vector<std::pair<std::shared_ptr<PoolJob>, absl::StatusOr<std::string>>>& finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (;;) {
      char* into = w.in_body ? w.body.data() + w.body_len : w.head + w.head_len;
      const size_t room =
          w.in_body ? w.body.size() - w.body_len : kWorkerResponseHeader - w.head_len;
      const ssize_t n = read(w.fd, into, room);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n <= 0) {
        Lost(w, absl::UnavailableError("the espeak worker process exited"), finished);
        return;
      }
      if (!w.in_body) {
        w.head_len += static_cast<size_t>(n);
        if (w.head_len < kWorkerResponseHeader) continue;
        const uint32_t length = GetU32(w.head);
        if (length < 4 || length > kMaxWorkerFrame) {
          Lost(w, absl::InternalError("an espeak worker sent a bad frame"), finished);
          return;
        }
        w.in_body = true;
        w.body.assign(length - 4, '\0');
        w.body_len = 0;
      } else {
        w.body_len += static_cast<size_t>(n);
      }
      if (w.body_len < w.body.size()) continue;
      const uint32_t code = GetU32(w.head + 4);
      absl::StatusOr<std::string> result =
          code == 0   ? absl::StatusOr<std::string>(std::move(w.body))
          : code > 16 ? absl::InternalError("bad status from an espeak worker")
                      : absl::Status(static_cast<absl::StatusCode>(code), w.body);
      w.ClearResponse();
      if (w.job != nullptr) finished.emplace_back(std::move(w.job), std::move(result));
      w.job = nullptr;
      w.answered = true;
      if (w.failing) LogInfo("espeak pool: a worker lane works again");
      w.failing = false;
    }
  }

  // A worker died or broke the protocol: its segment fails with `why`, and the worker is started
  // again (at once if it had answered before; see Worker::start_after).
  void Lost(Worker& w, absl::Status why,
            std::vector<std::pair<std::shared_ptr<PoolJob>, absl::StatusOr<std::string>>>& finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (w.job != nullptr) finished.emplace_back(std::move(w.job), why);
    w.job = nullptr;
    const int64_t pid = w.pid;
    const bool answered = w.answered;
    Stop(w);
    if (answered) {
      LogWarning("espeak pool: a worker ended; starting another",
                 {{"pid", pid}, {"error", std::string(why.message())}});
    } else {
      Failing(w, "an espeak worker ended before its first answer", why.message());
    }
  }

  // The lane's worker cannot start or ends before it answers: said once, tried again after
  // respawn_delay.
  void Failing(Worker& w, absl::string_view what, absl::string_view error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!w.failing) {
      LogWarning(absl::StrCat("espeak pool: ", what, "; its lane waits and tries again"),
                 {{"error", std::string(error)}});
    }
    w.failing = true;
    w.start_after = absl::Now() + options_.respawn_delay;
  }

  std::unique_ptr<TtsEngine> local_;
  const EspeakPoolOptions options_;
  int wake_fd_ = -1;
  std::thread thread_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool local_busy_ ABSL_GUARDED_BY(mu_) = false;
  // Segments DispatchLocked handed to the in-process engine that RunLocal has not given it yet.
  int local_handoffs_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<std::shared_ptr<PoolJob>> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<Worker> workers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<TtsEngine>> NewEspeakPool(std::unique_ptr<TtsEngine> local,
                                                         const EspeakPoolOptions& options) {
  if (options.lanes <= 1 || options.worker_command.empty()) return local;
  EspeakPoolOptions checked = options;
  checked.respawn_delay = std::max(checked.respawn_delay, absl::Milliseconds(1));
  auto pool = std::make_unique<EspeakPool>(std::move(local), std::move(checked));
  if (absl::Status s = pool->Start(); !s.ok()) return s;
  return pool;
}

void SetEspeakWorkerCommand(std::vector<std::string> argv) {
  absl::MutexLock lock(&g_command_mu);
  delete g_command;
  g_command = new std::vector<std::string>(std::move(argv));
}

std::vector<std::string> EspeakWorkerCommand() {
  absl::MutexLock lock(&g_command_mu);
  return g_command == nullptr ? std::vector<std::string>() : *g_command;
}

}  // namespace montage::speech
