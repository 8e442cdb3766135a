// Tests of the small runtime pieces: logging, executors, single-flight, the fake clock.
#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/clock.h"
#include "common/executor.h"
#include "common/logging.h"
#include "common/single_flight.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace montage {
namespace {

using ::testing::HasSubstr;

TEST(LoggingTest, JsonLinesCarryFieldsAndTraceId) {
  const std::string line = FormatLogLine(LogLevel::kWarning, "upstream failed",
                                         {{"attempt", 2}, {"host", "a b"}, {"ok", false}},
                                         "4bf92f3577b34da6a3ce929d0e0e4736", /*json=*/true);
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "warning");
  EXPECT_EQ(j["msg"], "upstream failed");
  EXPECT_EQ(j["attempt"], 2);
  EXPECT_EQ(j["host"], "a b");
  EXPECT_EQ(j["ok"], false);
  EXPECT_EQ(j["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

TEST(LoggingTest, TextLinesQuoteValuesWithSpaces) {
  const std::string line =
      FormatLogLine(LogLevel::kInfo, "loaded", {{"path", "/a b"}, {"n", 3u}}, "", false);
  EXPECT_THAT(line, HasSubstr("info"));
  EXPECT_THAT(line, HasSubstr("path=\"/a b\""));
  EXPECT_THAT(line, HasSubstr("n=3"));
  EXPECT_EQ(line.back(), '\n');
}

TEST(ClockTest, FakeClockMovesOnlyWhenTold) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  EXPECT_EQ(clock.Now(), t0);
  clock.Advance(absl::Seconds(5));
  EXPECT_EQ(clock.Now() - t0, absl::Seconds(5));
}

TEST(ThreadPoolTest, RunsEverythingAndRejectsWhenFull) {
  std::atomic<int> ran{0};
  {
    ThreadPool pool(2, 1000, "test");
    for (int i = 0; i < 500; ++i) {
      ASSERT_TRUE(pool.Schedule([&ran] { ran.fetch_add(1); }).ok());
    }
  }  // destructor drains
  EXPECT_EQ(ran.load(), 500);

  ThreadPool pool(1, 1, "tiny");
  absl::Notification release;
  absl::Notification started;
  ASSERT_TRUE(pool.Schedule([&] {
                    started.Notify();
                    release.WaitForNotification();
                  })
                  .ok());
  started.WaitForNotification();
  ASSERT_TRUE(pool.Schedule([] {}).ok());  // fills the queue of one
  absl::Status full = pool.Schedule([] {});
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  release.Notify();
  pool.Shutdown();
  EXPECT_EQ(pool.Schedule([] {}).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SingleFlightTest, HundredConcurrentCallersRunTheWorkOnce) {
  SingleFlight<std::string, int> flight;
  std::atomic<int> starts{0};
  std::atomic<int> results{0};
  absl::Mutex mu;
  absl::AnyInvocable<void(absl::StatusOr<int>) &&> pending_finish;
  std::vector<std::thread> threads;
  for (int i = 0; i < 100; ++i) {
    threads.emplace_back([&] {
      flight.Do(
          "k",
          [&](absl::AnyInvocable<void(absl::StatusOr<int>) &&> finish) {
            starts.fetch_add(1);
            absl::MutexLock lock(&mu);
            pending_finish = std::move(finish);
          },
          [&](const absl::StatusOr<int>& r) {
            if (r.ok() && *r == 42) results.fetch_add(1);
          });
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(starts.load(), 1);
  EXPECT_EQ(flight.in_flight(), 1u);
  EXPECT_EQ(flight.coalesced(), 99u);
  EXPECT_EQ(results.load(), 0);  // nobody answered before the work finished
  absl::AnyInvocable<void(absl::StatusOr<int>) &&> finish;
  {
    absl::MutexLock lock(&mu);
    finish = std::move(pending_finish);
  }
  std::move(finish)(42);
  EXPECT_EQ(results.load(), 100);
  EXPECT_EQ(flight.in_flight(), 0u);
}

TEST(SingleFlightTest, ErrorsReachEveryWaiterAndTheKeyIsForgotten) {
  SingleFlight<int, std::string> flight;
  int errors = 0;
  flight.Do(
      1, [](auto finish) { std::move(finish)(absl::UnavailableError("down")); },
      [&](const absl::StatusOr<std::string>& r) { errors += !r.ok(); });
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(flight.in_flight(), 0u);
  bool led = flight.Do(
      1, [](auto finish) { std::move(finish)(std::string("v")); },
      [](const absl::StatusOr<std::string>&) {});
  EXPECT_TRUE(led);
}

}  // namespace
}  // namespace montage
