#include "services/cache/cache_engine.h"

#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/clock.h"
#include "gmock/gmock.h"
#include "google/rpc/error_details.pb.h"
#include "gtest/gtest.h"

namespace montage::cache {
namespace {

using ::testing::ElementsAre;
using ::testing::Optional;
using Kind = LookupResult::Kind;

constexpr absl::string_view kBadRequestUrl = "type.googleapis.com/google.rpc.BadRequest";

uint64_t Charged(absl::string_view key, absl::string_view value) {
  return key.size() + value.size() + kEntryOverheadBytes;
}

// The single field a status's google.rpc.BadRequest names, or a description of what is wrong.
std::string ViolatedField(const absl::Status& status) {
  auto payload = status.GetPayload(kBadRequestUrl);
  if (!payload.has_value()) return "<no BadRequest payload>";
  google::rpc::BadRequest bad_request;
  if (!bad_request.ParseFromString(std::string(*payload))) return "<unparsable BadRequest>";
  if (bad_request.field_violations_size() != 1) return "<not exactly one violation>";
  return bad_request.field_violations(0).field();
}

std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteFileBytes(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string TempPath(absl::string_view name) {
  return absl::StrCat(::testing::TempDir(), "/cache_engine_test_", getpid(), "_", name);
}

// Records every callback of the Lookups it hands out.
class Results {
 public:
  CacheEngine::LookupCallback Callback(int who) {
    return [this, who](absl::StatusOr<LookupResult> result) {
      absl::MutexLock lock(&mu_);
      results_.emplace_back(who, std::move(result));
    };
  }
  std::vector<std::pair<int, absl::StatusOr<LookupResult>>> Take() {
    absl::MutexLock lock(&mu_);
    return std::exchange(results_, {});
  }
  size_t size() {
    absl::MutexLock lock(&mu_);
    return results_.size();
  }

 private:
  absl::Mutex mu_;
  std::vector<std::pair<int, absl::StatusOr<LookupResult>>> results_ ABSL_GUARDED_BY(mu_);
};

class CacheEngineTest : public ::testing::Test {
 protected:
  std::unique_ptr<CacheEngine> Make(CacheOptions options) {
    absl::StatusOr<std::unique_ptr<CacheEngine>> engine = CacheEngine::Create(options, clock_);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? *std::move(engine) : nullptr;
  }
  std::unique_ptr<CacheEngine> Make() { return Make(CacheOptions()); }

  static NamespaceStats StatsOf(const CacheEngine& engine, absl::string_view ns) {
    absl::StatusOr<CacheStats> stats = engine.Stats(ns);
    EXPECT_TRUE(stats.ok()) << stats.status();
    return stats.ok() && stats->namespaces.size() == 1 ? stats->namespaces[0] : NamespaceStats();
  }

  static std::optional<std::string> ValueOf(CacheEngine& engine, absl::string_view ns,
                                            absl::string_view key) {
    absl::StatusOr<std::optional<Entry>> entry = engine.Get(ns, key);
    EXPECT_TRUE(entry.ok()) << entry.status();
    if (!entry.ok() || !entry->has_value()) return std::nullopt;
    return *(*entry)->value;
  }

  FakeClock clock_;
};

// --- TTL ---------------------------------------------------------------------------------------

TEST_F(CacheEngineTest, DefaultTtlExpiresEntries) {
  CacheOptions options;
  options.defaults.default_ttl = absl::Seconds(10);
  auto engine = Make(options);
  ASSERT_TRUE(engine->Set("", "k", "v", std::nullopt).ok());

  clock_.Advance(absl::Seconds(9));
  EXPECT_THAT(ValueOf(*engine, "", "k"), Optional(std::string("v")));
  clock_.Advance(absl::Seconds(1));
  EXPECT_EQ(ValueOf(*engine, "", "k"), std::nullopt);

  NamespaceStats stats = StatsOf(*engine, "default");
  EXPECT_EQ(stats.expirations, 1u);
  EXPECT_EQ(stats.entries, 0u);
  EXPECT_EQ(stats.bytes, 0u);
}

TEST_F(CacheEngineTest, TtlOverrideAndNeverExpire) {
  CacheOptions options;
  options.defaults.default_ttl = absl::Seconds(10);
  auto engine = Make(options);
  absl::StatusOr<Entry> short_lived = engine->Set("", "short", "v", absl::Seconds(2));
  absl::StatusOr<Entry> forever = engine->Set("", "forever", "v", absl::ZeroDuration());
  ASSERT_TRUE(short_lived.ok() && forever.ok());
  EXPECT_EQ(short_lived->expire_time, clock_.Now() + absl::Seconds(2));
  EXPECT_EQ(forever->expire_time, absl::InfiniteFuture());

  clock_.Advance(absl::Seconds(2));
  EXPECT_EQ(ValueOf(*engine, "", "short"), std::nullopt);
  clock_.Advance(absl::Hours(24 * 365));
  EXPECT_THAT(ValueOf(*engine, "", "forever"), Optional(std::string("v")));
}

TEST_F(CacheEngineTest, NamespaceWithoutDefaultTtlKeepsEntries) {
  CacheOptions options;
  options.namespaces["pinned"].default_ttl = absl::ZeroDuration();
  auto engine = Make(options);
  ASSERT_TRUE(engine->Set("pinned", "k", "v", std::nullopt).ok());
  clock_.Advance(absl::Hours(1000));
  EXPECT_THAT(ValueOf(*engine, "pinned", "k"), Optional(std::string("v")));
}

TEST_F(CacheEngineTest, CleanupRemovesExpiredEntries) {
  auto engine = Make();
  ASSERT_TRUE(engine->Set("", "a", "1", absl::Seconds(1)).ok());
  ASSERT_TRUE(engine->Set("", "b", "2", absl::Seconds(1)).ok());
  ASSERT_TRUE(engine->Set("other", "c", "3", absl::Seconds(1)).ok());
  ASSERT_TRUE(engine->Set("", "d", "4", absl::Seconds(5)).ok());
  EXPECT_EQ(engine->Cleanup(), 0u);
  clock_.Advance(absl::Seconds(1));
  EXPECT_EQ(engine->Cleanup(), 3u);

  absl::StatusOr<CacheStats> stats = engine->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->total.expirations, 3u);
  EXPECT_EQ(stats->total.entries, 1u);
  EXPECT_EQ(stats->total.bytes, Charged("d", "4"));
}

// --- LRU and byte accounting ---------------------------------------------------------------------

TEST_F(CacheEngineTest, TouchedEntriesSurviveEvictionWithOneShard) {
  CacheOptions options;
  options.shards = 1;
  options.defaults.max_bytes = 3 * Charged("k1", "v");
  auto engine = Make(options);
  for (const char* key : {"k1", "k2", "k3"}) ASSERT_TRUE(engine->Set("", key, "v", {}).ok());
  ASSERT_TRUE(ValueOf(*engine, "", "k1").has_value());  // k2 is now the least recently used.

  ASSERT_TRUE(engine->Set("", "k4", "v", {}).ok());
  EXPECT_EQ(ValueOf(*engine, "", "k2"), std::nullopt);
  EXPECT_TRUE(ValueOf(*engine, "", "k1").has_value());
  EXPECT_TRUE(ValueOf(*engine, "", "k3").has_value());
  EXPECT_TRUE(ValueOf(*engine, "", "k4").has_value());

  // k1, k3, k4 were just read in that order, so k1 goes next.
  ASSERT_TRUE(engine->Set("", "k5", "v", {}).ok());
  EXPECT_EQ(ValueOf(*engine, "", "k1"), std::nullopt);
  EXPECT_EQ(StatsOf(*engine, "default").evictions, 2u);
}

TEST_F(CacheEngineTest, BytesEqualSumOfChargedSizes) {
  CacheOptions options;
  options.defaults.max_bytes = 1000;
  auto engine = Make(options);
  const auto bytes = [&] { return StatsOf(*engine, "default").bytes; };

  ASSERT_TRUE(engine->Set("", "a", std::string(100, 'x'), {}).ok());
  EXPECT_EQ(bytes(), Charged("a", std::string(100, 'x')));
  ASSERT_TRUE(engine->Set("", "a", std::string(10, 'x'), {}).ok());  // Overwrite shrinks.
  EXPECT_EQ(bytes(), Charged("a", std::string(10, 'x')));
  ASSERT_TRUE(engine->Set("", "bb", std::string(200, 'x'), {}).ok());
  EXPECT_EQ(bytes(), Charged("a", std::string(10, 'x')) + Charged("bb", std::string(200, 'x')));
  ASSERT_THAT(engine->Delete("", "a"), absl::StatusOr<bool>(true));
  EXPECT_EQ(bytes(), Charged("bb", std::string(200, 'x')));
  EXPECT_THAT(engine->Delete("", "a"), absl::StatusOr<bool>(false));

  // 800 + 266 > 1000: bb is evicted to make room.
  ASSERT_TRUE(engine->Set("", "c", std::string(735, 'x'), {}).ok());
  EXPECT_EQ(bytes(), Charged("c", std::string(735, 'x')));
  NamespaceStats stats = StatsOf(*engine, "default");
  EXPECT_EQ(stats.entries, 1u);
  EXPECT_EQ(stats.evictions, 1u);
  EXPECT_EQ(stats.deletes, 1u);
}

TEST_F(CacheEngineTest, BudgetIsNeverExceeded) {
  CacheOptions options;
  options.shards = 8;
  options.defaults.max_bytes = 10'000;
  auto engine = Make(options);
  std::mt19937 rng(42);
  std::uniform_int_distribution<int> key_dist(0, 500);
  std::uniform_int_distribution<int> size_dist(0, 2000);
  uint64_t evictions_seen = 0;
  for (int i = 0; i < 5000; ++i) {
    const std::string key = absl::StrCat("key", key_dist(rng));
    ASSERT_TRUE(engine->Set("", key, std::string(size_dist(rng), 'v'), {}).ok());
    NamespaceStats stats = StatsOf(*engine, "default");
    ASSERT_LE(stats.bytes, options.defaults.max_bytes) << "after insert " << i;
    evictions_seen = stats.evictions;
  }
  EXPECT_GT(evictions_seen, 0u);
}

TEST_F(CacheEngineTest, ValueLargerThanBudgetIsRejected) {
  CacheOptions options;
  options.defaults.max_bytes = 100;
  auto engine = Make(options);
  absl::StatusOr<Entry> entry = engine->Set("", "k", std::string(100, 'x'), {});
  EXPECT_EQ(entry.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ViolatedField(entry.status()), "value");
  EXPECT_THAT(std::string(entry.status().message()), testing::HasSubstr("budget"));
  EXPECT_TRUE(engine->Set("", "k", std::string(100 - 1 - kEntryOverheadBytes, 'x'), {}).ok());
}

TEST_F(CacheEngineTest, NamespacesAreIsolated) {
  CacheOptions options;
  options.defaults.max_bytes = 2000;
  options.namespaces["big"].max_bytes = 50'000;
  auto engine = Make(options);
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(engine->Set("quiet", absl::StrCat("k", i), std::string(50, 'q'), {}).ok());
  }
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(engine->Set("noisy", absl::StrCat("k", i), std::string(100, 'n'), {}).ok());
    ASSERT_TRUE(engine->Set("big", absl::StrCat("k", i), std::string(100, 'n'), {}).ok());
  }
  NamespaceStats quiet = StatsOf(*engine, "quiet");
  EXPECT_EQ(quiet.entries, 10u);
  EXPECT_EQ(quiet.evictions, 0u);
  for (int i = 0; i < 10; ++i) EXPECT_TRUE(ValueOf(*engine, "quiet", absl::StrCat("k", i)));
  EXPECT_GT(StatsOf(*engine, "noisy").evictions, 0u);
  EXPECT_LE(StatsOf(*engine, "noisy").bytes, 2000u);
  // Configured namespaces get their own budget.
  EXPECT_EQ(StatsOf(*engine, "big").max_bytes, 50'000u);
  EXPECT_LE(StatsOf(*engine, "big").bytes, 50'000u);
  EXPECT_GT(StatsOf(*engine, "big").bytes, 2000u);
}

// --- Invalidate and batches
// ------------------------------------------------------------------------

TEST_F(CacheEngineTest, InvalidateByKeysPrefixAndAll) {
  auto engine = Make();
  for (const char* key : {"user:1", "user:2", "user:3", "post:1", "post:2", "misc"}) {
    ASSERT_TRUE(engine->Set("", key, "v", {}).ok());
  }
  ASSERT_TRUE(engine->Set("other", "user:1", "v", {}).ok());

  EXPECT_THAT(engine->Invalidate("", {"misc", "absent"}, "", false), absl::StatusOr<uint64_t>(1));
  EXPECT_THAT(engine->Invalidate("", {}, "user:", false), absl::StatusOr<uint64_t>(3));
  EXPECT_EQ(ValueOf(*engine, "", "user:1"), std::nullopt);
  EXPECT_TRUE(ValueOf(*engine, "", "post:1").has_value());
  EXPECT_TRUE(ValueOf(*engine, "other", "user:1").has_value());

  EXPECT_THAT(engine->Invalidate("", {}, "", true), absl::StatusOr<uint64_t>(2));
  EXPECT_EQ(StatsOf(*engine, "default").entries, 0u);
  EXPECT_EQ(StatsOf(*engine, "default").bytes, 0u);
  EXPECT_EQ(StatsOf(*engine, "other").entries, 1u);
  EXPECT_THAT(engine->Invalidate("unknown", {}, "", true), absl::StatusOr<uint64_t>(0));

  absl::StatusOr<uint64_t> nothing = engine->Invalidate("", {}, "", false);
  EXPECT_EQ(nothing.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CacheEngineTest, BatchGetAndSet) {
  auto engine = Make();
  std::vector<SetItem> items = {
      {"a", "1", std::nullopt}, {"b", "2", absl::Seconds(1)}, {"c", "3", absl::ZeroDuration()}};
  EXPECT_THAT(engine->BatchSet("ns", items), absl::StatusOr<uint32_t>(3));
  clock_.Advance(absl::Seconds(1));

  absl::StatusOr<std::vector<std::optional<Entry>>> got =
      engine->BatchGet("ns", {"a", "b", "c", "zzz"});
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 4u);
  EXPECT_EQ(*(*got)[0]->value, "1");
  EXPECT_FALSE((*got)[1].has_value());  // Expired.
  EXPECT_EQ(*(*got)[2]->value, "3");
  EXPECT_FALSE((*got)[3].has_value());
  NamespaceStats stats = StatsOf(*engine, "ns");
  EXPECT_EQ(stats.hits, 2u);
  EXPECT_EQ(stats.misses, 2u);
  EXPECT_EQ(stats.sets, 3u);
}

TEST_F(CacheEngineTest, BatchSetValidatesEverythingBeforeWriting) {
  CacheOptions options;
  options.max_value_bytes = 10;
  auto engine = Make(options);
  std::vector<SetItem> items = {{"a", "1", std::nullopt},
                                {"b", "2", std::nullopt},
                                {"c", std::string(11, 'x'), std::nullopt}};
  absl::StatusOr<uint32_t> written = engine->BatchSet("", items);
  EXPECT_EQ(written.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ViolatedField(written.status()), "items[2].value");
  EXPECT_EQ(ValueOf(*engine, "", "a"), std::nullopt);
  EXPECT_EQ(StatsOf(*engine, "default").sets, 0u);

  items[2].value = "3";
  items[1].ttl = absl::Seconds(-1);
  written = engine->BatchSet("", items);
  EXPECT_EQ(ViolatedField(written.status()), "items[1].ttl");
  EXPECT_EQ(StatsOf(*engine, "default").entries, 0u);
}

// --- Limits
// -----------------------------------------------------------------------------------------

TEST_F(CacheEngineTest, InvalidInputNamesTheField) {
  CacheOptions options;
  options.max_key_bytes = 8;
  options.max_value_bytes = 16;
  options.max_batch_items = 2;
  auto engine = Make(options);
  const auto expect_field = [](const absl::Status& status, absl::string_view field) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_TRUE(status.GetPayload(kBadRequestUrl).has_value()) << status;
    EXPECT_EQ(ViolatedField(status), field) << status;
  };
  expect_field(engine->Set("", "", "v", {}).status(), "key");
  expect_field(engine->Set("", "123456789", "v", {}).status(), "key");
  expect_field(engine->Set("", "k", std::string(17, 'x'), {}).status(), "value");
  expect_field(engine->Set("", "k", "v", absl::Seconds(-1)).status(), "ttl");
  expect_field(engine->Set("bad name", "k", "v", {}).status(), "namespace");
  expect_field(engine->Set("bad/name", "k", "v", {}).status(), "namespace");
  expect_field(engine->Set(std::string(65, 'n'), "k", "v", {}).status(), "namespace");
  expect_field(engine->Get("", "").status(), "key");
  expect_field(engine->Delete("", "123456789").status(), "key");
  expect_field(engine->BatchGet("", {"a", "b", "c"}).status(), "keys");
  expect_field(engine->BatchGet("", {"a", ""}).status(), "keys[1]");
  expect_field(engine->BatchSet("", {{"a", "1", {}}, {"b", "2", {}}, {"c", "3", {}}}).status(),
               "items");
  expect_field(engine->Invalidate("", {"a", "b", "c"}, "", false).status(), "keys");
  expect_field(engine->ReleaseLease("", "k", "").status(), "lease_token");
  expect_field(engine->Stats("no way").status(), "namespace");

  // Limits themselves are allowed; names of 64 characters too.
  EXPECT_TRUE(engine->Set(std::string(64, 'n'), "12345678", std::string(16, 'x'), {}).ok());
  EXPECT_TRUE(engine->Set("a-b_c.D9", "k", "", {}).ok());
}

TEST_F(CacheEngineTest, TooManyNamespacesIsResourceExhausted) {
  CacheOptions options;
  options.max_namespaces = 3;  // "default" is one of them.
  auto engine = Make(options);
  ASSERT_TRUE(engine->Set("one", "k", "v", {}).ok());
  ASSERT_TRUE(engine->Set("two", "k", "v", {}).ok());
  absl::StatusOr<Entry> third = engine->Set("three", "k", "v", {});
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(third.status().message()), testing::HasSubstr("max_namespaces"));
  EXPECT_TRUE(engine->Set("one", "k2", "v", {}).ok());

  // Reads of unknown namespaces are misses and create nothing.
  EXPECT_EQ(ValueOf(*engine, "four", "k"), std::nullopt);
  EXPECT_EQ(engine->Stats("four").status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<CacheStats> stats = engine->Stats();
  ASSERT_TRUE(stats.ok());
  ASSERT_EQ(stats->namespaces.size(), 3u);
  EXPECT_EQ(stats->namespaces[0].ns, "default");
  EXPECT_EQ(stats->namespaces[1].ns, "one");
  EXPECT_EQ(stats->namespaces[2].ns, "two");
}

TEST_F(CacheEngineTest, CreateRejectsBadOptions) {
  const auto field_of = [this](CacheOptions options) {
    absl::StatusOr<std::unique_ptr<CacheEngine>> engine = CacheEngine::Create(options, clock_);
    EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
    return ViolatedField(engine.status());
  };
  CacheOptions options;
  options.shards = 0;
  EXPECT_EQ(field_of(options), "shards");
  options = CacheOptions();
  options.defaults.max_bytes = 0;
  EXPECT_EQ(field_of(options), "max_bytes");
  options = CacheOptions();
  options.namespaces["x"].default_ttl = absl::Seconds(-1);
  EXPECT_EQ(field_of(options), "default_ttl");
  options = CacheOptions();
  options.namespaces["not valid"] = NamespaceOptions();
  EXPECT_EQ(field_of(options), "namespaces");
  options = CacheOptions();
  options.max_namespaces = 1;
  options.namespaces["x"] = NamespaceOptions();
  EXPECT_EQ(field_of(options), "max_namespaces");
  options = CacheOptions();
  options.lease_ttl = absl::ZeroDuration();
  EXPECT_EQ(field_of(options), "lease_ttl");
}

// --- Stats
// ------------------------------------------------------------------------------------------

TEST_F(CacheEngineTest, StatsCountAndHitRate) {
  CacheOptions options;
  options.namespaces["b"].max_bytes = 5000;
  auto engine = Make(options);
  ASSERT_TRUE(engine->Set("a", "k", "v", {}).ok());
  ASSERT_TRUE(engine->Set("b", "k", "v", {}).ok());
  ValueOf(*engine, "a", "k");
  ValueOf(*engine, "a", "k");
  ValueOf(*engine, "a", "k");
  ValueOf(*engine, "a", "missing");
  ValueOf(*engine, "b", "missing");
  ASSERT_TRUE(engine->Delete("a", "k").ok());

  NamespaceStats a = StatsOf(*engine, "a");
  EXPECT_EQ(a.hits, 3u);
  EXPECT_EQ(a.misses, 1u);
  EXPECT_DOUBLE_EQ(a.hit_rate(), 0.75);
  EXPECT_EQ(a.sets, 1u);
  EXPECT_EQ(a.deletes, 1u);
  EXPECT_EQ(a.entries, 0u);
  EXPECT_EQ(a.default_ttl, absl::Hours(1));

  absl::StatusOr<CacheStats> all = engine->Stats();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->total.ns, "");
  EXPECT_EQ(all->total.hits, 3u);
  EXPECT_EQ(all->total.misses, 2u);
  EXPECT_EQ(all->total.entries, 1u);
  EXPECT_EQ(all->total.bytes, Charged("k", "v"));
  // default + a + b.
  EXPECT_EQ(all->total.max_bytes, 2 * NamespaceOptions().max_bytes + 5000);
  EXPECT_DOUBLE_EQ(NamespaceStats().hit_rate(), 0.0);
}

// --- Single-flight
// ---------------------------------------------------------------------------------

TEST_F(CacheEngineTest, LookupHitsAndGrantsLease) {
  auto engine = Make();
  Results results;
  EXPECT_EQ(engine->Lookup("", "k", {}, results.Callback(1)), 0u);
  ASSERT_TRUE(engine->Set("", "present", "v", {}).ok());
  EXPECT_EQ(engine->Lookup("", "present", {}, results.Callback(2)), 0u);
  auto got = results.Take();
  ASSERT_EQ(got.size(), 2u);
  ASSERT_TRUE(got[0].second.ok());
  EXPECT_EQ(got[0].second->kind, Kind::kLeaseGranted);
  EXPECT_FALSE(got[0].second->coalesced);
  EXPECT_EQ(got[0].second->lease->token.size(), 32u);
  EXPECT_EQ(got[0].second->lease->expire_time, clock_.Now() + engine->options().lease_ttl);
  ASSERT_TRUE(got[1].second.ok());
  EXPECT_EQ(got[1].second->kind, Kind::kHit);
  EXPECT_EQ(*got[1].second->entry->value, "v");

  // Tokens are random, not sequential.
  EXPECT_EQ(engine->Lookup("", "k2", {}, results.Callback(3)), 0u);
  auto second = results.Take();
  ASSERT_EQ(second.size(), 1u);
  EXPECT_NE(second[0].second->lease->token, got[0].second->lease->token);
}

TEST_F(CacheEngineTest, HundredConcurrentLookupsShareOneLease) {
  auto engine = Make();
  Results results;
  absl::Notification start;
  std::vector<std::thread> threads;
  for (int i = 0; i < 100; ++i) {
    threads.emplace_back([&, i] {
      start.WaitForNotification();
      engine->Lookup("", "hot", {}, results.Callback(i));
    });
  }
  start.Notify();
  for (std::thread& t : threads) t.join();

  auto granted = results.Take();
  ASSERT_EQ(granted.size(), 1u);
  ASSERT_TRUE(granted[0].second.ok());
  ASSERT_EQ(granted[0].second->kind, Kind::kLeaseGranted);
  const std::string token = granted[0].second->lease->token;

  ASSERT_TRUE(engine->Set("", "hot", "computed", {}, token).ok());
  auto woken = results.Take();
  ASSERT_EQ(woken.size(), 99u);
  std::set<int> callers = {granted[0].first};
  for (const auto& [who, result] : woken) {
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->kind, Kind::kHit);
    EXPECT_TRUE(result->coalesced);
    ASSERT_TRUE(result->entry.has_value());
    EXPECT_EQ(*result->entry->value, "computed");
    callers.insert(who);
  }
  EXPECT_EQ(callers.size(), 100u);
  NamespaceStats stats = StatsOf(*engine, "default");
  EXPECT_EQ(stats.leases_granted, 1u);
  EXPECT_EQ(stats.coalesced_waits, 99u);
  // The matching Set ended the lease.
  EXPECT_THAT(engine->ReleaseLease("", "hot", token), absl::StatusOr<bool>(false));
}

TEST_F(CacheEngineTest, ExpiredLeasePassesToOldestWaiter) {
  auto engine = Make();
  Results results;
  LookupOptions lookup;
  lookup.lease_ttl = absl::Seconds(5);
  engine->Lookup("", "k", lookup, results.Callback(1));
  const std::string first_token = results.Take()[0].second->lease->token;
  EXPECT_NE(engine->Lookup("", "k", lookup, results.Callback(2)), 0u);
  EXPECT_NE(engine->Lookup("", "k", lookup, results.Callback(3)), 0u);

  clock_.Advance(absl::Seconds(4));
  engine->Tick();
  EXPECT_EQ(results.size(), 0u);
  clock_.Advance(absl::Seconds(1));
  engine->Tick();
  auto handed = results.Take();
  ASSERT_EQ(handed.size(), 1u);
  EXPECT_EQ(handed[0].first, 2);
  ASSERT_TRUE(handed[0].second.ok());
  EXPECT_EQ(handed[0].second->kind, Kind::kLeaseGranted);
  EXPECT_TRUE(handed[0].second->coalesced);
  const std::string second_token = handed[0].second->lease->token;
  EXPECT_NE(second_token, first_token);
  EXPECT_EQ(handed[0].second->lease->expire_time, clock_.Now() + absl::Seconds(5));

  // A stale token still stores the value and wakes the remaining waiter; the lease stays.
  ASSERT_TRUE(engine->Set("", "k", "late", {}, first_token).ok());
  auto woken = results.Take();
  ASSERT_EQ(woken.size(), 1u);
  EXPECT_EQ(woken[0].first, 3);
  EXPECT_EQ(*woken[0].second->entry->value, "late");
  EXPECT_THAT(engine->ReleaseLease("", "k", first_token), absl::StatusOr<bool>(false));
  EXPECT_THAT(engine->ReleaseLease("", "k", second_token), absl::StatusOr<bool>(true));
  EXPECT_EQ(StatsOf(*engine, "default").leases_granted, 2u);
}

TEST_F(CacheEngineTest, ExpiredLeaseWithoutWaitersDisappears) {
  auto engine = Make();
  Results results;
  engine->Lookup("", "k", {}, results.Callback(1));
  const std::string token = results.Take()[0].second->lease->token;
  clock_.Advance(engine->options().lease_ttl);
  engine->Tick();
  EXPECT_EQ(results.size(), 0u);
  EXPECT_THAT(engine->ReleaseLease("", "k", token), absl::StatusOr<bool>(false));
  EXPECT_EQ(engine->Lookup("", "k", {}, results.Callback(2)), 0u);
  auto again = results.Take();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].second->kind, Kind::kLeaseGranted);
  EXPECT_FALSE(again[0].second->coalesced);
}

TEST_F(CacheEngineTest, ReleasedLeasePassesToOldestWaiter) {
  auto engine = Make();
  Results results;
  engine->Lookup("", "k", {}, results.Callback(1));
  const std::string first_token = results.Take()[0].second->lease->token;
  engine->Lookup("", "k", {}, results.Callback(2));
  EXPECT_THAT(engine->ReleaseLease("", "k", "not-the-token"), absl::StatusOr<bool>(false));
  EXPECT_EQ(results.size(), 0u);

  EXPECT_THAT(engine->ReleaseLease("", "k", first_token), absl::StatusOr<bool>(true));
  auto handed = results.Take();
  ASSERT_EQ(handed.size(), 1u);
  EXPECT_EQ(handed[0].first, 2);
  EXPECT_EQ(handed[0].second->kind, Kind::kLeaseGranted);
  EXPECT_TRUE(handed[0].second->coalesced);
  EXPECT_THAT(engine->ReleaseLease("", "k", first_token), absl::StatusOr<bool>(false));

  // Released with nobody waiting: the next Lookup gets a fresh lease at once.
  EXPECT_THAT(engine->ReleaseLease("", "k", handed[0].second->lease->token),
              absl::StatusOr<bool>(true));
  EXPECT_EQ(engine->Lookup("", "k", {}, results.Callback(3)), 0u);
  EXPECT_EQ(results.Take()[0].second->kind, Kind::kLeaseGranted);
}

TEST_F(CacheEngineTest, WaiterGivesUpAfterMaxWaitOrDeadline) {
  auto engine = Make();
  Results results;
  LookupOptions holder;
  holder.lease_ttl = absl::Minutes(10);
  engine->Lookup("", "k", holder, results.Callback(1));
  results.Take();

  LookupOptions patient;
  patient.max_wait = absl::Seconds(5);
  LookupOptions hurried;
  hurried.deadline = clock_.Now() + absl::Seconds(2);
  engine->Lookup("", "k", patient, results.Callback(2));
  engine->Lookup("", "k", hurried, results.Callback(3));

  clock_.Advance(absl::Seconds(1));
  engine->Tick();
  EXPECT_EQ(results.size(), 0u);
  clock_.Advance(absl::Seconds(1));
  engine->Tick();
  auto first = results.Take();
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].first, 3);
  EXPECT_EQ(first[0].second->kind, Kind::kMiss);

  clock_.Advance(absl::Seconds(3));
  engine->Tick();
  auto second = results.Take();
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].first, 2);
  EXPECT_EQ(second[0].second->kind, Kind::kMiss);
  EXPECT_FALSE(second[0].second->entry.has_value());

  // A deadline already past is a miss at once.
  LookupOptions late;
  late.deadline = clock_.Now();
  EXPECT_EQ(engine->Lookup("", "k", late, results.Callback(4)), 0u);
  EXPECT_EQ(results.Take()[0].second->kind, Kind::kMiss);
}

TEST_F(CacheEngineTest, CancelledLookupGetsCancelledOnce) {
  auto engine = Make();
  Results results;
  engine->Lookup("", "k", {}, results.Callback(1));
  const std::string token = results.Take()[0].second->lease->token;
  const uint64_t id = engine->Lookup("", "k", {}, results.Callback(2));
  ASSERT_NE(id, 0u);
  engine->Lookup("", "k", {}, results.Callback(3));

  engine->CancelLookup(id);
  auto cancelled = results.Take();
  ASSERT_EQ(cancelled.size(), 1u);
  EXPECT_EQ(cancelled[0].first, 2);
  EXPECT_EQ(cancelled[0].second.status().code(), absl::StatusCode::kCancelled);
  engine->CancelLookup(id);  // Finished: a no-op.
  EXPECT_EQ(results.size(), 0u);

  ASSERT_TRUE(engine->Set("", "k", "v", {}, token).ok());
  auto woken = results.Take();
  ASSERT_EQ(woken.size(), 1u);
  EXPECT_EQ(woken[0].first, 3);
  engine->CancelLookup(id);
  EXPECT_EQ(results.size(), 0u);
}

TEST_F(CacheEngineTest, InvalidLookupCallsBackAtOnce) {
  auto engine = Make();
  Results results;
  EXPECT_EQ(engine->Lookup("", "", {}, results.Callback(1)), 0u);
  EXPECT_EQ(engine->Lookup("bad name", "k", {}, results.Callback(2)), 0u);
  LookupOptions negative;
  negative.max_wait = absl::Seconds(-1);
  EXPECT_EQ(engine->Lookup("", "k", negative, results.Callback(3)), 0u);
  auto got = results.Take();
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(ViolatedField(got[0].second.status()), "key");
  EXPECT_EQ(ViolatedField(got[1].second.status()), "namespace");
  EXPECT_EQ(ViolatedField(got[2].second.status()), "max_wait");
}

TEST_F(CacheEngineTest, DeleteLeavesLeaseAndWaitersAlone) {
  auto engine = Make();
  Results results;
  engine->Lookup("", "k", {}, results.Callback(1));
  const std::string token = results.Take()[0].second->lease->token;
  engine->Lookup("", "k", {}, results.Callback(2));
  ASSERT_TRUE(engine->Delete("", "k").ok());
  ASSERT_TRUE(engine->Invalidate("", {}, "", true).ok());
  EXPECT_EQ(results.size(), 0u);
  EXPECT_THAT(engine->ReleaseLease("", "k", token), absl::StatusOr<bool>(true));
  EXPECT_EQ(results.Take()[0].second->kind, Kind::kLeaseGranted);
}

TEST_F(CacheEngineTest, CallbacksMayCallBackIntoTheEngine) {
  auto engine = Make();
  int inner_calls = 0;
  std::string token;
  engine->Lookup("", "k", {}, [&](absl::StatusOr<LookupResult> result) {
    token = result->lease->token;
    // A lock held here would deadlock these calls.
    engine->Lookup("", "k", {}, [&](absl::StatusOr<LookupResult> inner) {
      ++inner_calls;
      EXPECT_EQ(inner->kind, Kind::kHit);
      EXPECT_TRUE(engine->Set("", "other", "x", {}).ok());
      engine->Tick();
    });
  });
  ASSERT_TRUE(engine->Set("", "k", "v", {}, token).ok());
  EXPECT_EQ(inner_calls, 1);
  EXPECT_TRUE(ValueOf(*engine, "", "other").has_value());
}

TEST_F(CacheEngineTest, DestroyingTheEngineCancelsWaiters) {
  auto engine = Make();
  Results results;
  engine->Lookup("", "k", {}, results.Callback(1));
  engine->Lookup("", "k", {}, results.Callback(2));
  results.Take();
  engine.reset();
  auto got = results.Take();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].second.status().code(), absl::StatusCode::kCancelled);
}

// --- Concurrency
// -----------------------------------------------------------------------------------

TEST_F(CacheEngineTest, ConcurrentMixedOperationsKeepAccountsExact) {
  CacheOptions options;
  options.shards = 4;
  options.defaults.max_bytes = 8 * 1024;
  options.defaults.default_ttl = absl::ZeroDuration();
  auto engine = Make(options);
  constexpr int kKeys = 64;
  std::vector<std::string> keys;
  for (int i = 0; i < kKeys; ++i) keys.push_back(absl::StrCat(i % 4, "/key", i));

  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 20'000; ++i) {
        const std::string& key = keys[rng() % kKeys];
        const int op = static_cast<int>(rng() % 100);
        bool ok = true;
        if (op < 45) {
          ok = engine->Get("", key).ok();
        } else if (op < 85) {
          ok = engine->Set("", key, std::string(rng() % 400, 'v'), {}).ok();
        } else if (op < 95) {
          ok = engine->Delete("", key).ok();
        } else if (op < 98) {
          ok = engine->Invalidate("", {}, absl::StrCat(rng() % 4, "/"), false).ok();
        } else {
          ok = engine->BatchGet("", {keys[rng() % kKeys], keys[rng() % kKeys]}).ok();
        }
        if (!ok) failures.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);

  absl::StatusOr<CacheStats> stats = engine->Stats();
  ASSERT_TRUE(stats.ok());
  absl::StatusOr<std::vector<std::optional<Entry>>> found = engine->BatchGet("", keys);
  ASSERT_TRUE(found.ok());
  uint64_t bytes = 0;
  uint64_t entries = 0;
  for (const std::optional<Entry>& entry : *found) {
    if (!entry.has_value()) continue;
    EXPECT_EQ(entry->size_bytes, Charged(entry->key, *entry->value));
    bytes += entry->size_bytes;
    ++entries;
  }
  EXPECT_EQ(stats->total.bytes, bytes);
  EXPECT_EQ(stats->total.entries, entries);
  EXPECT_LE(stats->total.bytes, options.defaults.max_bytes);
  EXPECT_GT(stats->total.evictions, 0u);
}

TEST_F(CacheEngineTest, ConcurrentLookupsEachCallBackExactlyOnce) {
  CacheOptions options;
  options.lease_ttl = absl::Seconds(1);
  options.max_wait = absl::Seconds(2);
  auto engine = Make(options);
  constexpr int kThreads = 8;
  constexpr int kLookupsPerThread = 3000;
  std::vector<std::atomic<int>> calls(kThreads * kLookupsPerThread);
  std::atomic<int> errors{0};
  // Leases are settled later by any thread (set, released or left to expire), so that waiters
  // pile up, inherit leases, time out and get cancelled while other threads run.
  absl::Mutex mu;
  std::vector<std::pair<std::string, std::string>> leases;  // Guarded by mu.
  const auto settle_one = [&](std::mt19937& rng) {
    std::pair<std::string, std::string> lease;
    {
      absl::MutexLock lock(&mu);
      if (leases.empty()) return false;
      lease = std::move(leases.back());
      leases.pop_back();
    }
    const auto& [key, token] = lease;
    const int choice = static_cast<int>(rng() % 3);
    if (choice == 0 && !engine->Set("", key, "v", absl::Milliseconds(100), token).ok()) {
      errors.fetch_add(1);
    } else if (choice == 1 && !engine->ReleaseLease("", key, token).ok()) {
      errors.fetch_add(1);
    }
    return true;
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < kLookupsPerThread; ++i) {
        const int index = t * kLookupsPerThread + i;
        const std::string key = absl::StrCat("k", rng() % 8);
        const uint64_t id =
            engine->Lookup("", key, {}, [&, index, key](absl::StatusOr<LookupResult> result) {
              calls[index].fetch_add(1);
              if (!result.ok()) {
                if (result.status().code() != absl::StatusCode::kCancelled) errors.fetch_add(1);
                return;
              }
              if (result->kind == Kind::kLeaseGranted) {
                absl::MutexLock lock(&mu);
                leases.emplace_back(key, result->lease->token);
              }
            });
        if (id != 0 && rng() % 10 == 0) engine->CancelLookup(id);
        if (rng() % 2 == 0) settle_one(rng);
        if (t == 0 && i % 20 == 0) {
          clock_.Advance(absl::Milliseconds(250));
          engine->Tick();
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  // Whatever still waits gives up or inherits a lease, which is then settled.
  std::mt19937 rng(99);
  for (int round = 0; round < 100; ++round) {
    while (settle_one(rng)) {
    }
    clock_.Advance(absl::Seconds(3));
    engine->Tick();
  }
  int wrong = 0;
  for (const std::atomic<int>& n : calls) wrong += n.load() == 1 ? 0 : 1;
  EXPECT_EQ(wrong, 0) << "lookups whose callback did not run exactly once";
  EXPECT_EQ(errors.load(), 0);
  NamespaceStats stats = StatsOf(*engine, "default");
  EXPECT_GT(stats.coalesced_waits, 0u);
  EXPECT_GT(stats.leases_granted, 8u);
}

// --- Persistence
// -----------------------------------------------------------------------------------

class SnapshotTest : public CacheEngineTest {
 protected:
  void SetUp() override {
    path_ = TempPath(::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::remove(path_.c_str());
  }
  void TearDown() override {
    std::remove(path_.c_str());
    std::remove((path_ + ".tmp").c_str());
  }

  // A small engine's snapshot, as bytes.
  std::string ValidSnapshot() {
    auto engine = Make();
    EXPECT_TRUE(engine->Set("", "a", "alpha", {}).ok());
    EXPECT_TRUE(engine->Set("other", "b", "beta", absl::ZeroDuration()).ok());
    EXPECT_TRUE(engine->SaveSnapshot(path_).ok());
    return ReadFileBytes(path_);
  }

  std::string path_;
};

TEST_F(SnapshotTest, RoundTripKeepsValuesNamespacesAndTtls) {
  CacheOptions options;
  options.namespaces["configured"].max_bytes = 1 << 20;
  auto engine = Make(options);
  ASSERT_TRUE(engine->Set("", "plain", "p", absl::Minutes(10)).ok());
  ASSERT_TRUE(engine->Set("", "forever", "f", absl::ZeroDuration()).ok());
  ASSERT_TRUE(engine->Set("users", "u1", std::string("bin\0ary", 7), absl::Hours(2)).ok());
  ASSERT_TRUE(engine->Set("configured", "c", "", {}).ok());
  ASSERT_TRUE(engine->Set("", "soon", "s", absl::Seconds(30)).ok());
  const absl::Time saved_at = clock_.Now();

  absl::StatusOr<SnapshotInfo> saved = engine->SaveSnapshot(path_);
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->entries, 5u);
  EXPECT_EQ(saved->bytes, StatsOf(*engine, "default").bytes + StatsOf(*engine, "users").bytes +
                              StatsOf(*engine, "configured").bytes);

  clock_.Advance(absl::Minutes(1));  // "soon" has expired by the time it is loaded.
  auto restored = Make(options);
  absl::StatusOr<SnapshotInfo> loaded = restored->LoadSnapshot(path_);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->entries, 4u);

  absl::StatusOr<std::optional<Entry>> plain = restored->Get("", "plain");
  ASSERT_TRUE(plain.ok() && plain->has_value());
  EXPECT_EQ(*(*plain)->value, "p");
  EXPECT_EQ((*plain)->expire_time, saved_at + absl::Minutes(10));
  EXPECT_EQ((*plain)->update_time, saved_at);
  absl::StatusOr<std::optional<Entry>> forever = restored->Get("", "forever");
  ASSERT_TRUE(forever.ok() && forever->has_value());
  EXPECT_EQ((*forever)->expire_time, absl::InfiniteFuture());
  EXPECT_THAT(ValueOf(*restored, "users", "u1"), Optional(std::string("bin\0ary", 7)));
  EXPECT_THAT(ValueOf(*restored, "configured", "c"), Optional(std::string("")));
  EXPECT_EQ(ValueOf(*restored, "", "soon"), std::nullopt);
  EXPECT_EQ(StatsOf(*restored, "configured").max_bytes, 1u << 20);
  // Absolute expiry survives: "plain" still dies 10 minutes after it was first set.
  clock_.Advance(absl::Minutes(9));
  EXPECT_EQ(ValueOf(*restored, "", "plain"), std::nullopt);
}

TEST_F(SnapshotTest, LoadRespectsBudgetAndOverwritesExistingEntries) {
  CacheOptions one_shard;
  one_shard.shards = 1;  // The file then lists k0..k99 from least to most recently used.
  auto source = Make(one_shard);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(source->Set("", absl::StrCat("k", i), std::string(100, 'x'), {}).ok());
  }
  ASSERT_TRUE(source->SaveSnapshot(path_).ok());

  CacheOptions small;
  small.defaults.max_bytes = 2000;
  small.shards = 1;
  auto target = Make(small);
  ASSERT_TRUE(target->Set("", "k99", "old", {}).ok());
  ASSERT_TRUE(target->Set("", "mine", "evicted", {}).ok());
  absl::StatusOr<SnapshotInfo> loaded = target->LoadSnapshot(path_);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  NamespaceStats stats = StatsOf(*target, "default");
  EXPECT_LE(stats.bytes, 2000u);
  EXPECT_GT(stats.evictions, 0u);
  EXPECT_THAT(ValueOf(*target, "", "k99"), Optional(std::string(100, 'x')));
  EXPECT_EQ(ValueOf(*target, "", "k0"), std::nullopt);
  EXPECT_EQ(ValueOf(*target, "", "mine"), std::nullopt);
}

TEST_F(SnapshotTest, MissingFileIsNotFound) {
  auto engine = Make();
  EXPECT_EQ(engine->LoadSnapshot(path_ + ".absent").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SnapshotTest, CorruptFilesAreDataLossAndLoadNothing) {
  const std::string valid = ValidSnapshot();
  ASSERT_GT(valid.size(), 28u);
  auto engine = Make();
  ASSERT_TRUE(engine->Set("", "existing", "e", {}).ok());
  const auto expect_rejected = [&](absl::string_view bytes, const std::string& what) {
    WriteFileBytes(path_, bytes);
    absl::StatusOr<SnapshotInfo> loaded = engine->LoadSnapshot(path_);
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss)
        << what << ": " << loaded.status();
    EXPECT_THAT(std::string(loaded.status().message()), testing::HasSubstr(path_)) << what;
  };

  for (size_t i = 0; i < valid.size(); ++i) {
    std::string flipped = valid;
    flipped[i] = static_cast<char>(flipped[i] ^ 0x40);
    expect_rejected(flipped, absl::StrCat("byte ", i, " flipped"));
  }
  for (size_t length = 0; length < valid.size(); ++length) {
    expect_rejected(absl::string_view(valid).substr(0, length), absl::StrCat("cut at ", length));
  }
  expect_rejected("", "empty");
  expect_rejected(std::string(4096, '\xab'), "garbage");
  expect_rejected(absl::StrCat("MONTAGEX", valid.substr(8)), "wrong magic");
  expect_rejected(absl::StrCat(valid, "extra"), "trailing bytes");

  absl::StatusOr<CacheStats> stats = engine->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->namespaces.size(), 1u);  // "other" was never created.
  EXPECT_EQ(stats->total.entries, 1u);
  EXPECT_EQ(stats->total.sets, 1u);
  EXPECT_EQ(ValueOf(*engine, "", "a"), std::nullopt);
}

// Files whose checksum is right but whose contents are not: lengths are still checked.
TEST_F(SnapshotTest, CraftedFilesWithValidChecksumAreRejected) {
  const auto le32 = [](uint32_t v) {
    std::string out;
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
    return out;
  };
  const auto le64 = [](uint64_t v) {
    std::string out;
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
    return out;
  };
  const auto file = [&](absl::string_view records, uint64_t count) {
    std::string bytes = absl::StrCat("MONTAGEC", le32(1), le32(0), records, le64(count));
    const uLong crc = crc32_z(0, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size());
    return absl::StrCat(bytes, le32(static_cast<uint32_t>(crc)));
  };
  const auto record = [&](absl::string_view ns, absl::string_view key, absl::string_view value) {
    return absl::StrCat(le32(ns.size()), ns, le32(key.size()), key, le32(value.size()), value,
                        le64(INT64_MAX), le64(0));
  };
  CacheOptions options;
  options.max_key_bytes = 16;
  auto engine = Make(options);
  const auto load = [&](absl::string_view bytes) {
    WriteFileBytes(path_, bytes);
    return engine->LoadSnapshot(path_).status();
  };

  ASSERT_TRUE(load(file(record("ns", "k", "v"), 1)).ok());  // The helpers make valid files.
  const std::string huge_length = absl::StrCat(le32(2), "ns", le32(0xfffffff0u), "k");
  EXPECT_EQ(load(file(huge_length, 1)).code(), absl::StatusCode::kDataLoss);
  const std::string past_end = absl::StrCat(le32(2), "ns", le32(10), "k");
  EXPECT_EQ(load(file(past_end, 1)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(load(file(record("ns", std::string(17, 'k'), "v"), 1)).code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(load(file(record("ns", "", "v"), 1)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(load(file(record("bad name", "k", "v"), 1)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(load(file(record("ns", "k", "v"), 2)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(load(file(absl::StrCat(record("ns", "k", "v"), "\x01"), 1)).code(),
            absl::StatusCode::kDataLoss);
  std::string wrong_version = file("", 0);
  wrong_version[8] = 2;
  EXPECT_EQ(load(wrong_version).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(StatsOf(*engine, "ns").sets, 1u);  // Only the valid file loaded.
}

TEST_F(SnapshotTest, FailedSaveLeavesPreviousFileIntact) {
  const std::string previous = ValidSnapshot();
  auto engine = Make();
  ASSERT_TRUE(engine->Set("", "new", "value", {}).ok());

  EXPECT_FALSE(engine->SaveSnapshot(TempPath("no/such/dir/snapshot")).ok());
  // The temp file's name is taken by a directory, so this save fails before the rename.
  ASSERT_EQ(mkdir((path_ + ".tmp").c_str(), 0700), 0);
  EXPECT_FALSE(engine->SaveSnapshot(path_).ok());
  rmdir((path_ + ".tmp").c_str());
  EXPECT_EQ(ReadFileBytes(path_), previous);
  auto restored = Make();
  ASSERT_TRUE(restored->LoadSnapshot(path_).ok());
  EXPECT_THAT(ValueOf(*restored, "", "a"), Optional(std::string("alpha")));

  // A successful save replaces it and leaves no temp file behind.
  ASSERT_TRUE(engine->SaveSnapshot(path_).ok());
  EXPECT_NE(ReadFileBytes(path_), previous);
  EXPECT_FALSE(std::ifstream(path_ + ".tmp").good());
}

}  // namespace
}  // namespace montage::cache
