// The cache's domain logic, free of gRPC: namespaces with byte budgets and LRU eviction, TTLs on
// an injectable clock, single-flight leases with waiters, stats, and persistence to a file.
//
// Thread-safe. Each namespace is split into shards with a lock each, so concurrent callers on
// different keys rarely meet on one lock. The namespace's byte budget is exact (one atomic
// counter); eviction order is LRU within a shard and approximately LRU across shards (with
// `shards = 1` it is exact LRU).
#ifndef MONTAGE_SERVICES_CACHE_CACHE_ENGINE_H_
#define MONTAGE_SERVICES_CACHE_CACHE_ENGINE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/clock.h"

namespace montage::cache {

// Every entry is charged its key and value bytes plus this much bookkeeping.
inline constexpr uint64_t kEntryOverheadBytes = 64;
inline constexpr absl::string_view kDefaultNamespace = "default";

// A stored value. It never changes once stored, so the cache and every reader share one buffer:
// a hit hands out a reference, not a copy (a speech script's segments are megabytes of PCM).
using Value = std::shared_ptr<const std::string>;

struct NamespaceOptions {
  uint64_t max_bytes = 100ull << 20;
  // absl::ZeroDuration() means entries set without a TTL never expire.
  absl::Duration default_ttl = absl::Hours(1);
};

struct CacheOptions {
  // Options of "default" and of namespaces created on first use.
  NamespaceOptions defaults;
  // Namespaces with their own options.
  absl::flat_hash_map<std::string, NamespaceOptions> namespaces;
  int shards = 16;
  uint64_t max_key_bytes = 1024;
  uint64_t max_value_bytes = 4ull << 20;
  uint32_t max_batch_items = 1000;
  // Namespaces are created on first use, up to this many (RESOURCE_EXHAUSTED beyond).
  uint32_t max_namespaces = 256;
  absl::Duration lease_ttl = absl::Seconds(10);
  absl::Duration max_wait = absl::Seconds(30);
};

struct Entry {
  std::string ns;
  std::string key;
  Value value;  // never null
  // Charged size (key + value + kEntryOverheadBytes).
  uint64_t size_bytes = 0;
  // absl::InfiniteFuture() when the entry never expires.
  absl::Time expire_time = absl::InfiniteFuture();
  absl::Time update_time;
};

struct Lease {
  std::string token;
  absl::Time expire_time;
};

struct LookupOptions {
  // Zero means CacheOptions::lease_ttl / max_wait.
  absl::Duration lease_ttl = absl::ZeroDuration();
  absl::Duration max_wait = absl::ZeroDuration();
  // The caller's own deadline; the wait never outlasts it.
  absl::Time deadline = absl::InfiniteFuture();
};

struct LookupResult {
  enum class Kind {
    // `entry` is set.
    kHit,
    // `lease` is set: the caller computes the value and calls Set with lease.token.
    kLeaseGranted,
    // The wait ended (max_wait or deadline) without a value; the caller proceeds uncached.
    kMiss,
  };
  Kind kind = Kind::kMiss;
  std::optional<Entry> entry;
  std::optional<Lease> lease;
  // The value (or the lease) arrived while this caller waited.
  bool coalesced = false;
};

struct NamespaceStats {
  std::string ns;
  uint64_t entries = 0;
  uint64_t bytes = 0;
  uint64_t max_bytes = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
  uint64_t expirations = 0;
  uint64_t sets = 0;
  uint64_t deletes = 0;
  uint64_t leases_granted = 0;
  uint64_t coalesced_waits = 0;
  absl::Duration default_ttl;
  double hit_rate() const {
    return hits + misses == 0 ? 0.0
                              : static_cast<double>(hits) / static_cast<double>(hits + misses);
  }
};

struct CacheStats {
  // Sums; total.ns is empty and total.max_bytes the sum of budgets.
  NamespaceStats total;
  // Sorted by name.
  std::vector<NamespaceStats> namespaces;
};

struct SetItem {
  std::string key;
  std::string value;
  // nullopt: the namespace's default TTL; ZeroDuration: never expires.
  std::optional<absl::Duration> ttl;
};

struct SnapshotInfo {
  uint64_t entries = 0;
  uint64_t bytes = 0;
};

class CacheEngine {
 public:
  // Called exactly once per Lookup: at once (hit, lease granted, or invalid input) or later, from
  // whichever thread sets the value, releases the lease or runs Tick(). Never called while the
  // engine holds a lock, so it may call back into the engine.
  using LookupCallback = absl::AnyInvocable<void(absl::StatusOr<LookupResult>) &&>;

  // Validates options (INVALID_ARGUMENT naming the option).
  static absl::StatusOr<std::unique_ptr<CacheEngine>> Create(CacheOptions options, Clock& clock);
  ~CacheEngine();

  // An empty namespace means kDefaultNamespace. Names: 1..64 of [a-zA-Z0-9_.-].
  // Keys: 1..max_key_bytes bytes. Values: 0..max_value_bytes bytes. Violations are
  // INVALID_ARGUMENT with a google.rpc.BadRequest naming "namespace", "key" or "value".

  // A plain read: nullopt on a miss. Counts a hit or a miss.
  absl::StatusOr<std::optional<Entry>> Get(absl::string_view ns, absl::string_view key);

  // Single-flight read. On a hit: kHit. On a miss with no lease outstanding: kLeaseGranted. On a
  // miss while another caller holds the lease: waits for Set (kHit, coalesced), or inherits the
  // lease when it expires or is released (kLeaseGranted, coalesced), or gives up at
  // min(now + max_wait, deadline) (kMiss). Returns an id for CancelLookup (0 if `done` already
  // ran).
  uint64_t Lookup(absl::string_view ns, absl::string_view key, const LookupOptions& options,
                  LookupCallback done);
  // Ends a waiting Lookup early (its caller went away); `done` gets CANCELLED. No-op if finished.
  void CancelLookup(uint64_t lookup_id);

  // Stores the value (evicting LRU entries of the namespace to stay within budget) and wakes
  // every waiter on the key. A value larger than the namespace's whole budget is
  // INVALID_ARGUMENT. `lease_token`, when set and current, ends that lease; a stale token is
  // not an error (the value is still good).
  absl::StatusOr<Entry> Set(absl::string_view ns, absl::string_view key, Value value,
                            std::optional<absl::Duration> ttl, absl::string_view lease_token = "");
  absl::StatusOr<Entry> Set(absl::string_view ns, absl::string_view key, std::string value,
                            std::optional<absl::Duration> ttl, absl::string_view lease_token = "");

  absl::StatusOr<bool> Delete(absl::string_view ns, absl::string_view key);

  // One result per key, in order. At most max_batch_items keys.
  absl::StatusOr<std::vector<std::optional<Entry>>> BatchGet(absl::string_view ns,
                                                             const std::vector<std::string>& keys);
  // Validates every item before writing any. At most max_batch_items items.
  absl::StatusOr<uint32_t> BatchSet(absl::string_view ns, std::vector<SetItem> items);

  // Removes `keys`, every key starting with `prefix` (when not empty), or everything (`all`).
  // At least one of the three must be given.
  absl::StatusOr<uint64_t> Invalidate(absl::string_view ns, const std::vector<std::string>& keys,
                                      absl::string_view prefix, bool all);

  // Gives the lease back: the oldest waiter (if any) inherits it at once. False if the token is
  // not the key's current lease.
  absl::StatusOr<bool> ReleaseLease(absl::string_view ns, absl::string_view key,
                                    absl::string_view lease_token);

  // Removes expired entries of every namespace; returns how many.
  uint64_t Cleanup();

  // Handles leases and waits whose time has come (by the clock). Call it periodically.
  void Tick();

  // Empty `ns`: every namespace. An unknown namespace is NOT_FOUND.
  absl::StatusOr<CacheStats> Stats(absl::string_view ns = "") const;

  // Writes every live entry to `path` atomically (temp file, fsync, rename) with a checksum.
  absl::StatusOr<SnapshotInfo> SaveSnapshot(const std::string& path) const;
  // Loads a snapshot written by SaveSnapshot, skipping expired entries and respecting budgets.
  // A missing file is NOT_FOUND; a corrupt or truncated one is DATA_LOSS and loads nothing.
  absl::StatusOr<SnapshotInfo> LoadSnapshot(const std::string& path);

  const CacheOptions& options() const { return options_; }

 private:
  class Namespace;
  CacheEngine(CacheOptions options, Clock& clock);

  CacheOptions options_;
  Clock& clock_;
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace montage::cache

#endif  // MONTAGE_SERVICES_CACHE_CACHE_ENGINE_H_
