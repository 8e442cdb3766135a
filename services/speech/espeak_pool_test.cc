// The espeak pool with real worker processes (`montaged espeak-worker`): segments spread over the
// in-process engine and a worker, a killed worker fails only its segment and is replaced,
// cancellation and shutdown.
#include "services/speech/espeak_pool.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/speech/testing/audio_probe.h"
#include "tests/testing/child_processes.h"
#include "tests/testing/eventually.h"

namespace montage::speech {
namespace {

using ::testing::HasSubstr;

// This process's children running `espeak-worker`.
std::vector<pid_t> WorkerPids() {
  std::vector<pid_t> pids;
  for (const montage::testing::ChildProcess& child : montage::testing::ChildProcesses(getpid())) {
    if (child.cmdline.find("espeak-worker") != std::string::npos) pids.push_back(child.pid);
  }
  return pids;
}

// CPU ticks a process has used.
long CpuTicks(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  std::getline(stat, line);
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return -1;
  std::vector<std::string> fields = absl::StrSplit(line.substr(close + 2), ' ');
  long user = 0, sys = 0;
  if (fields.size() < 13 || !absl::SimpleAtoi(fields[11], &user) ||
      !absl::SimpleAtoi(fields[12], &sys)) {
    return -1;
  }
  return user + sys;
}

std::string Words(int n) {
  std::string text;
  for (int i = 0; i < n; ++i) {
    absl::StrAppend(&text, i % 12 == 11 ? "creators. " : "creators plan every video shot ");
  }
  return text;
}

// Workers are the small program beside montaged (what montaged uses when it finds one), or
// montaged itself (`montaged espeak-worker`, the fallback).
class EspeakPoolTest : public ::testing::TestWithParam<std::vector<std::string>> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<TtsEngine>> local = NewEspeakEngine({});
    ASSERT_TRUE(local.ok()) << local.status();
    EspeakPoolOptions options;
    options.lanes = 2;
    options.worker_command = GetParam();
    absl::StatusOr<std::unique_ptr<TtsEngine>> pool = NewEspeakPool(*std::move(local), options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = *std::move(pool);
  }
  void TearDown() override {
    if (pool_ != nullptr) pool_->Shutdown();
  }

  // Starts one segment; the future resolves with its PCM.
  std::future<absl::StatusOr<std::string>> Speak(
      const std::string& text, std::shared_ptr<SynthesisHandle>* handle = nullptr) {
    auto promise = std::make_shared<std::promise<absl::StatusOr<std::string>>>();
    std::future<absl::StatusOr<std::string>> future = promise->get_future();
    Segment segment;
    segment.text = text;
    std::shared_ptr<SynthesisHandle> h = pool_->Synthesize(
        std::move(segment), absl::Now() + absl::Seconds(60),
        [promise](absl::StatusOr<std::string> pcm) { promise->set_value(std::move(pcm)); });
    if (handle != nullptr) *handle = std::move(h);
    return future;
  }

  static absl::StatusOr<std::string> Get(std::future<absl::StatusOr<std::string>>& f) {
    if (f.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
      return absl::DeadlineExceededError("no answer within 60 s");
    }
    return f.get();
  }

  std::unique_ptr<TtsEngine> pool_;
};

TEST_P(EspeakPoolTest, SegmentsSpreadOverTheEngineAndAWorker) {
  EXPECT_EQ(pool_->max_concurrency(), 2u);
  std::vector<pid_t> workers = WorkerPids();
  ASSERT_EQ(workers.size(), 1u);
  const long before = CpuTicks(workers[0]);
  std::vector<std::future<absl::StatusOr<std::string>>> futures;
  for (int i = 0; i < 8; ++i) futures.push_back(Speak(absl::StrCat(Words(60), " number ", i, ".")));
  for (auto& f : futures) {
    absl::StatusOr<std::string> pcm = Get(f);
    ASSERT_TRUE(pcm.ok()) << pcm.status();
    testing::AudioInfo info = testing::ProbePcm(*pcm, pool_->sample_rate());
    EXPECT_GT(info.duration_seconds, 5.0);  // 60 words
    EXPECT_GT(info.rms, 0.01);              // not silence
  }
  // The worker spoke some of them.
  EXPECT_GT(CpuTicks(workers[0]), before);
}

TEST_P(EspeakPoolTest, AKilledWorkerFailsOnlyItsSegmentAndIsReplaced) {
  std::vector<pid_t> workers = WorkerPids();
  ASSERT_EQ(workers.size(), 1u);
  // Two long texts: the first goes to the in-process engine, the second to the worker.
  std::future<absl::StatusOr<std::string>> local = Speak(Words(1500));
  std::future<absl::StatusOr<std::string>> remote = Speak(Words(1500));
  kill(workers[0], SIGKILL);
  absl::StatusOr<std::string> lost = Get(remote);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kUnavailable) << lost.status();
  EXPECT_THAT(lost.status().message(), HasSubstr("worker"));
  EXPECT_TRUE(Get(local).ok());
  // The next segments are spoken again by both lanes, with a new worker.
  std::future<absl::StatusOr<std::string>> a = Speak(Words(200));
  std::future<absl::StatusOr<std::string>> b = Speak(Words(200));
  EXPECT_TRUE(Get(a).ok());
  EXPECT_TRUE(Get(b).ok());
  std::vector<pid_t> now = WorkerPids();
  ASSERT_EQ(now.size(), 1u);
  EXPECT_NE(now[0], workers[0]);
}

TEST_P(EspeakPoolTest, CancelReportsCancelledAndShutdownEndsTheQueue) {
  std::vector<std::future<absl::StatusOr<std::string>>> futures;
  std::vector<std::shared_ptr<SynthesisHandle>> handles(6);
  for (int i = 0; i < 6; ++i) futures.push_back(Speak(Words(800), &handles[i]));
  handles[1]->Cancel();  // on the worker
  handles[5]->Cancel();  // still queued
  EXPECT_EQ(Get(futures[1]).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(Get(futures[5]).status().code(), absl::StatusCode::kCancelled);
  pool_->Shutdown();
  for (int i : {0, 2, 3, 4}) {
    absl::StatusOr<std::string> r = Get(futures[i]);
    // Each ends once: spoken before the shutdown, or cancelled by it.
    EXPECT_TRUE(r.ok() || r.status().code() == absl::StatusCode::kCancelled) << r.status();
  }
  EXPECT_TRUE(WorkerPids().empty());
  // After shutdown: CANCELLED at once.
  std::future<absl::StatusOr<std::string>> late = Speak("late.");
  EXPECT_EQ(Get(late).status().code(), absl::StatusCode::kCancelled);
}

TEST_P(EspeakPoolTest, CancellingAWorkersSegmentFreesItsLane) {
  std::vector<pid_t> workers = WorkerPids();
  ASSERT_EQ(workers.size(), 1u);
  // The in-process lane is busy for a long while; the worker starts a long text too.
  std::future<absl::StatusOr<std::string>> local = Speak(Words(20000));
  std::shared_ptr<SynthesisHandle> remote_handle;
  std::future<absl::StatusOr<std::string>> remote = Speak(Words(20000), &remote_handle);
  remote_handle->Cancel();
  EXPECT_EQ(Get(remote).status().code(), absl::StatusCode::kCancelled);
  // The worker speaking the cancelled text is killed and replaced (without that, it would go on
  // speaking the cancelled text and keep its lane).
  std::future<absl::StatusOr<std::string>> next = Speak("A short one.");
  EXPECT_TRUE(Get(next).ok());
  std::vector<pid_t> now = WorkerPids();
  ASSERT_EQ(now.size(), 1u);
  EXPECT_NE(now[0], workers[0]);
}

INSTANTIATE_TEST_SUITE_P(Workers, EspeakPoolTest,
                         ::testing::Values(std::vector<std::string>{ESPEAK_WORKER_PATH},
                                           std::vector<std::string>{MONTAGED_PATH,
                                                                    "espeak-worker"}),
                         [](const ::testing::TestParamInfo<std::vector<std::string>>& info) {
                           return info.param.size() == 1 ? std::string("WorkerProgram")
                                                         : std::string("Montaged");
                         });

TEST(EspeakPoolSetupTest, WithoutAWorkerCommandTheEngineStaysInProcess) {
  absl::StatusOr<std::unique_ptr<TtsEngine>> local = NewEspeakEngine({});
  ASSERT_TRUE(local.ok()) << local.status();
  TtsEngine* raw = local->get();
  EspeakPoolOptions options;
  options.lanes = 4;
  absl::StatusOr<std::unique_ptr<TtsEngine>> pool = NewEspeakPool(*std::move(local), options);
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ(pool->get(), raw);
  EXPECT_EQ((*pool)->max_concurrency(), 1u);
}

TEST(EspeakPoolRespawnTest, ALaneWhoseWorkerCannotBeRestartedIsTriedAgainLater) {
  // The worker program is a link in a directory of the test's own: without the link, starts fail.
  char dir_template[] = "/tmp/espeak_pool_testXXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string link = dir + "/montage-espeak-worker";
  ASSERT_EQ(symlink(ESPEAK_WORKER_PATH, link.c_str()), 0);
  absl::StatusOr<std::unique_ptr<TtsEngine>> local = NewEspeakEngine({});
  ASSERT_TRUE(local.ok()) << local.status();
  EspeakPoolOptions options;
  options.lanes = 2;
  options.worker_command = {link};
  options.respawn_delay = absl::Milliseconds(20);
  absl::StatusOr<std::unique_ptr<TtsEngine>> pool = NewEspeakPool(*std::move(local), options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto speak = [&pool](int words) {
    auto promise = std::make_shared<std::promise<absl::StatusOr<std::string>>>();
    std::future<absl::StatusOr<std::string>> future = promise->get_future();
    Segment segment;
    segment.text = Words(words);
    (*pool)->Synthesize(
        std::move(segment), absl::Now() + absl::Seconds(60),
        [promise](absl::StatusOr<std::string> pcm) { promise->set_value(std::move(pcm)); });
    return future;
  };
  std::vector<pid_t> workers = WorkerPids();
  ASSERT_EQ(workers.size(), 1u);

  ASSERT_EQ(unlink(link.c_str()), 0);
  kill(workers[0], SIGKILL);
  EXPECT_TRUE(montage::testing::Eventually([] { return WorkerPids().empty(); }));
  // No worker can start: the in-process lane speaks everything.
  for (int i = 0; i < 3; ++i) {
    std::future<absl::StatusOr<std::string>> f = speak(40);
    ASSERT_EQ(f.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_TRUE(f.get().ok());
  }
  EXPECT_TRUE(WorkerPids().empty());

  // The program is back: the lane's next try starts a worker, and both lanes speak again.
  ASSERT_EQ(symlink(ESPEAK_WORKER_PATH, link.c_str()), 0);
  EXPECT_TRUE(montage::testing::Eventually([] { return WorkerPids().size() == 1; }));
  std::vector<std::future<absl::StatusOr<std::string>>> futures;
  for (int i = 0; i < 4; ++i) futures.push_back(speak(40));
  for (auto& f : futures) {
    ASSERT_EQ(f.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_TRUE(f.get().ok());
  }
  (*pool)->Shutdown();
  unlink(link.c_str());
  rmdir(dir.c_str());
}

// A worker program that starts but ends at once (a missing library, a crash at start-up) is not
// restarted in a loop: its lane waits respawn_delay (an hour here) after it ended unanswered.
TEST(EspeakPoolRespawnTest, AWorkerThatEndsBeforeAnsweringIsNotRestartedInALoop) {
  char dir_template[] = "/tmp/espeak_pool_testXXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string starts = std::string(dir_template) + "/starts";
  absl::StatusOr<std::unique_ptr<TtsEngine>> local = NewEspeakEngine({});
  ASSERT_TRUE(local.ok()) << local.status();
  EspeakPoolOptions options;
  options.lanes = 2;
  options.worker_command = {"/bin/sh", "-c", absl::StrCat("echo started >> ", starts, "; exit 1")};
  options.respawn_delay = absl::Hours(1);
  absl::StatusOr<std::unique_ptr<TtsEngine>> pool = NewEspeakPool(*std::move(local), options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto start_count = [&starts] {
    std::ifstream in(starts);
    int lines = 0;
    for (std::string line; std::getline(in, line);) ++lines;
    return lines;
  };
  ASSERT_TRUE(montage::testing::Eventually([&] { return start_count() >= 1; }));
  // Segments are still spoken, by the in-process lane.
  for (int i = 0; i < 3; ++i) {
    auto promise = std::make_shared<std::promise<absl::StatusOr<std::string>>>();
    std::future<absl::StatusOr<std::string>> future = promise->get_future();
    Segment segment;
    segment.text = Words(30);
    (*pool)->Synthesize(
        std::move(segment), absl::Now() + absl::Seconds(60),
        [promise](absl::StatusOr<std::string> pcm) { promise->set_value(std::move(pcm)); });
    ASSERT_EQ(future.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_TRUE(future.get().ok());
  }
  // Restarted at once, the broken program would have run hundreds of times by now.
  EXPECT_EQ(start_count(), 1);
  (*pool)->Shutdown();
  unlink(starts.c_str());
  rmdir(dir_template);
}

TEST(EspeakPoolSetupTest, AWorkerThatCannotStartIsFailedPrecondition) {
  absl::StatusOr<std::unique_ptr<TtsEngine>> local = NewEspeakEngine({});
  ASSERT_TRUE(local.ok()) << local.status();
  EspeakPoolOptions options;
  options.lanes = 2;
  options.worker_command = {"/nonexistent/montaged", "espeak-worker"};
  absl::StatusOr<std::unique_ptr<TtsEngine>> pool = NewEspeakPool(*std::move(local), options);
  EXPECT_EQ(pool.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(pool.status().message(), HasSubstr("/nonexistent/montaged"));
}

}  // namespace
}  // namespace montage::speech
