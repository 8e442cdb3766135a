#include "services/cache/cache_engine.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <iterator>
#include <limits>
#include <list>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/hash/hash.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "services/cache/internal/snapshot.h"

namespace montage::cache {
namespace {

constexpr size_t kMaxNamespaceNameBytes = 64;
constexpr int kMaxShards = 1024;
// Bounds on the configurable limits, so that a snapshot record always fits its u32 lengths.
constexpr uint64_t kMaxKeyBytesLimit = 64 << 10;
constexpr uint64_t kMaxValueBytesLimit = 1ull << 30;
// Salts the shard choice so that it is independent of the hash the shard's own map uses.
constexpr uint32_t kShardHashSalt = 0x5eed;

absl::Status CheckNamespaceName(absl::string_view name, absl::string_view field) {
  if (name.empty() || name.size() > kMaxNamespaceNameBytes) {
    return InvalidFieldError(field, absl::StrCat("must be 1 to ", kMaxNamespaceNameBytes,
                                                 " characters, got ", name.size()));
  }
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '-') {
      return InvalidFieldError(field, "may only contain letters, digits, '_', '.' and '-'");
    }
  }
  return absl::OkStatus();
}

// The namespace a request means: empty is the default one.
absl::StatusOr<absl::string_view> ResolveNamespace(absl::string_view ns) {
  if (ns.empty()) return kDefaultNamespace;
  RETURN_IF_ERROR(CheckNamespaceName(ns, "namespace"));
  return ns;
}

absl::Status CheckKey(absl::string_view key, uint64_t max_bytes, absl::string_view field) {
  if (key.empty()) return InvalidFieldError(field, "must not be empty");
  if (key.size() > max_bytes) {
    return InvalidFieldError(
        field, absl::StrCat("is ", key.size(), " bytes, more than the limit of ", max_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckValue(absl::string_view value, uint64_t max_bytes, absl::string_view field) {
  if (value.size() > max_bytes) {
    return InvalidFieldError(
        field, absl::StrCat("is ", value.size(), " bytes, more than the limit of ", max_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckTtl(const std::optional<absl::Duration>& ttl, absl::string_view field) {
  if (ttl.has_value() && *ttl < absl::ZeroDuration()) {
    return InvalidFieldError(field, "must not be negative");
  }
  return absl::OkStatus();
}

// The options a namespace has, or will have once created.
const NamespaceOptions& OptionsFor(const CacheOptions& options, absl::string_view name) {
  auto configured = options.namespaces.find(name);
  return configured == options.namespaces.end() ? options.defaults : configured->second;
}

absl::Status CheckFitsBudget(uint64_t size, const NamespaceOptions& options,
                             absl::string_view field) {
  if (size > options.max_bytes) {
    return InvalidFieldError(
        field, absl::StrCat("entry of ", size, " bytes is larger than the namespace budget of ",
                            options.max_bytes, " bytes"));
  }
  return absl::OkStatus();
}

uint64_t ChargedSize(absl::string_view key, size_t value_bytes) {
  return key.size() + value_bytes + kEntryOverheadBytes;
}

absl::Time ExpireTime(absl::Time now, absl::Duration ttl) {
  return ttl == absl::ZeroDuration() ? absl::InfiniteFuture() : now + ttl;
}

// Saturates: InfiniteFuture() is the largest value.
int64_t Nanos(absl::Time t) { return absl::ToUnixNanos(t); }

// Namespace names cannot hold '\0', so this never confuses two (namespace, key) pairs.
std::string FlightKey(absl::string_view ns, absl::string_view key) {
  return absl::StrCat(ns, absl::string_view("\0", 1), key);
}

struct Node {
  std::string key;
  Value value;
  uint64_t size_bytes = 0;
  absl::Time expire_time;
  absl::Time update_time;
};

using NodeList = std::list<Node>;

struct Shard {
  absl::Mutex mu;
  // Front: most recently used.
  NodeList lru ABSL_GUARDED_BY(mu);
  // Keys view Node::key; list nodes never move.
  absl::flat_hash_map<absl::string_view, NodeList::iterator> index ABSL_GUARDED_BY(mu);
};

class Counter {
 public:
  void Add(uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t Get() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// A callback and what to give it, run once every lock is released.
struct Ready {
  CacheEngine::LookupCallback done;
  absl::StatusOr<LookupResult> result;
};

void RunAll(std::vector<Ready>& ready) {
  for (Ready& r : ready) std::move(r.done)(std::move(r.result));
  ready.clear();
}

LookupResult HitResult(Entry entry, bool coalesced) {
  LookupResult result;
  result.kind = LookupResult::Kind::kHit;
  result.entry = std::move(entry);
  result.coalesced = coalesced;
  return result;
}

LookupResult LeaseResult(Lease lease, bool coalesced) {
  LookupResult result;
  result.kind = LookupResult::Kind::kLeaseGranted;
  result.lease = std::move(lease);
  result.coalesced = coalesced;
  return result;
}

LookupResult MissResult() { return LookupResult{}; }

}  // namespace

// One namespace: its shards, its byte budget and its counters. Thread-safe; holds at most one
// shard lock at a time.
class CacheEngine::Namespace {
 public:
  enum class CountMisses { kNo, kYes };

  Namespace(std::string name, NamespaceOptions options, int shards)
      : name_(std::move(name)), options_(options) {
    shards_.reserve(static_cast<size_t>(shards));
    for (int i = 0; i < shards; ++i) shards_.push_back(std::make_unique<Shard>());
  }

  const std::string& name() const { return name_; }
  const NamespaceOptions& options() const { return options_; }
  size_t shard_count() const { return shards_.size(); }

  // A live entry, touched as most recently used. An expired one is removed and is a miss.
  std::optional<Entry> Get(absl::string_view key, absl::Time now, CountMisses count_misses) {
    Shard& shard = ShardFor(key);
    {
      absl::MutexLock lock(&shard.mu);
      auto found = shard.index.find(key);
      if (found != shard.index.end()) {
        const NodeList::iterator node = found->second;
        if (now < node->expire_time) {
          shard.lru.splice(shard.lru.begin(), shard.lru, node);
          hits_.Add();
          return ToEntry(*node);
        }
        EraseLocked(shard, node);
        expirations_.Add();
      }
    }
    if (count_misses == CountMisses::kYes) misses_.Add();
    return std::nullopt;
  }

  // Stores the entry, then evicts least recently used entries until the namespace is within its
  // budget again. The caller has checked that the entry alone fits the budget.
  Entry Put(std::string key, Value value, absl::Time expire_time, absl::Time update_time) {
    const uint64_t size = ChargedSize(key, value->size());
    Entry entry{name_, key, value, size, expire_time, update_time};
    const size_t s = ShardIndex(key);
    Shard& shard = *shards_[s];
    {
      absl::MutexLock lock(&shard.mu);
      auto found = shard.index.find(key);
      if (found != shard.index.end()) {
        Node& node = *found->second;
        // Add before subtracting: the counter may briefly read high, never low.
        bytes_.fetch_add(size);
        bytes_.fetch_sub(node.size_bytes);
        node.value = std::move(value);
        node.size_bytes = size;
        node.expire_time = expire_time;
        node.update_time = update_time;
        shard.lru.splice(shard.lru.begin(), shard.lru, found->second);
      } else {
        shard.lru.push_front(
            Node{std::move(key), std::move(value), size, expire_time, update_time});
        shard.index.emplace(shard.lru.front().key, shard.lru.begin());
        bytes_.fetch_add(size);
        entries_.fetch_add(1);
      }
      sets_.Add();
      EvictLocked(shard, &shard.lru.front());
    }
    EvictFromOtherShards(s);
    return entry;
  }

  // True when a live entry was removed; an expired one is removed too but counts as expired.
  bool Remove(absl::string_view key, absl::Time now) {
    Shard& shard = ShardFor(key);
    absl::MutexLock lock(&shard.mu);
    auto found = shard.index.find(key);
    if (found == shard.index.end()) return false;
    const bool live = now < found->second->expire_time;
    EraseLocked(shard, found->second);
    (live ? deletes_ : expirations_).Add();
    return live;
  }

  // Removes every entry whose key matches; returns how many of them were live.
  uint64_t RemoveIf(absl::Time now, absl::FunctionRef<bool(absl::string_view key)> matches) {
    uint64_t removed = 0;
    for (auto& shard : shards_) {
      absl::MutexLock lock(&shard->mu);
      for (auto node = shard->lru.begin(); node != shard->lru.end();) {
        auto next = std::next(node);
        if (matches(node->key)) {
          const bool live = now < node->expire_time;
          EraseLocked(*shard, node);
          (live ? deletes_ : expirations_).Add();
          removed += live ? 1 : 0;
        }
        node = next;
      }
    }
    return removed;
  }

  uint64_t RemoveExpired(absl::Time now) {
    uint64_t removed = 0;
    for (auto& shard : shards_) {
      absl::MutexLock lock(&shard->mu);
      for (auto node = shard->lru.begin(); node != shard->lru.end();) {
        auto next = std::next(node);
        if (now >= node->expire_time) {
          EraseLocked(*shard, node);
          ++removed;
        }
        node = next;
      }
    }
    expirations_.Add(removed);
    return removed;
  }

  // Appends copies of the shard's live entries, least recently used first, so that loading them
  // in order rebuilds the same recency.
  void CopyShard(size_t s, absl::Time now, std::vector<Entry>& out) {
    Shard& shard = *shards_[s];
    absl::MutexLock lock(&shard.mu);
    for (auto node = shard.lru.rbegin(); node != shard.lru.rend(); ++node) {
      if (now < node->expire_time) out.push_back(ToEntry(*node));
    }
  }

  void CountLeaseGranted() { leases_granted_.Add(); }
  void CountCoalescedWait() { coalesced_waits_.Add(); }

  NamespaceStats Stats() const {
    NamespaceStats stats;
    stats.ns = name_;
    stats.entries = entries_.load();
    stats.bytes = bytes_.load();
    stats.max_bytes = options_.max_bytes;
    stats.hits = hits_.Get();
    stats.misses = misses_.Get();
    stats.evictions = evictions_.Get();
    stats.expirations = expirations_.Get();
    stats.sets = sets_.Get();
    stats.deletes = deletes_.Get();
    stats.leases_granted = leases_granted_.Get();
    stats.coalesced_waits = coalesced_waits_.Get();
    stats.default_ttl = options_.default_ttl;
    return stats;
  }

 private:
  size_t ShardIndex(absl::string_view key) const {
    const size_t hash = absl::Hash<std::pair<absl::string_view, uint32_t>>{}({key, kShardHashSalt});
    return hash % shards_.size();
  }
  Shard& ShardFor(absl::string_view key) { return *shards_[ShardIndex(key)]; }

  Entry ToEntry(const Node& node) const {
    return Entry{name_, node.key, node.value, node.size_bytes, node.expire_time, node.update_time};
  }

  bool OverBudget() const { return bytes_.load() > options_.max_bytes; }

  void EraseLocked(Shard& shard, NodeList::iterator node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    shard.index.erase(absl::string_view(node->key));
    bytes_.fetch_sub(node->size_bytes);
    entries_.fetch_sub(1);
    shard.lru.erase(node);
  }

  // Evicts from the back of `shard` while over budget, stopping at `keep` (the entry just stored).
  void EvictLocked(Shard& shard, const Node* keep) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    while (OverBudget() && !shard.lru.empty() && &shard.lru.back() != keep) {
      EraseLocked(shard, std::prev(shard.lru.end()));
      evictions_.Add();
    }
  }

  // Still over budget after emptying the writer's shard: take the oldest entry of each other
  // shard in turn, one lock at a time, until within budget or there is nothing left to take.
  void EvictFromOtherShards(size_t s) {
    const size_t n = shards_.size();
    bool progress = true;
    while (progress && OverBudget()) {
      progress = false;
      for (size_t i = 1; i < n && OverBudget(); ++i) {
        Shard& other = *shards_[(s + i) % n];
        absl::MutexLock lock(&other.mu);
        if (OverBudget() && !other.lru.empty()) {
          EraseLocked(other, std::prev(other.lru.end()));
          evictions_.Add();
          progress = true;
        }
      }
    }
  }

  const std::string name_;
  const NamespaceOptions options_;
  std::vector<std::unique_ptr<Shard>> shards_;
  // Changed only under a shard lock, read anywhere; equals the sum of the shards' charged sizes
  // whenever no Put is between its insert and its eviction.
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> entries_{0};
  Counter hits_, misses_, evictions_, expirations_, sets_, deletes_, leases_granted_,
      coalesced_waits_;
};

// The engine's shared state: the namespaces and the single-flight bookkeeping, which is kept
// apart from entry storage. Lock order: flight_mu before a shard lock, never the reverse; ns_mu
// is never held with another lock.
struct CacheEngine::State {
  struct Waiter {
    uint64_t id = 0;
    absl::Time deadline;
    absl::Duration lease_ttl;
    LookupCallback done;
  };
  // Exists exactly while its key has a lease; waiters queue behind the lease, oldest first.
  struct Flight {
    Namespace* space = nullptr;
    Lease lease;
    std::deque<Waiter> waiters;
  };
  using FlightMap = absl::flat_hash_map<std::string, Flight>;

  absl::Mutex ns_mu;
  // Namespaces are never removed, so a Namespace* stays valid for the engine's life.
  absl::flat_hash_map<std::string, std::unique_ptr<Namespace>> namespaces ABSL_GUARDED_BY(ns_mu);

  absl::Mutex flight_mu;
  FlightMap flights ABSL_GUARDED_BY(flight_mu);
  // Lookup id of each waiter → its flight's key.
  absl::flat_hash_map<uint64_t, std::string> waiting ABSL_GUARDED_BY(flight_mu);
  absl::BitGen bitgen ABSL_GUARDED_BY(flight_mu);
  uint64_t next_lookup_id ABSL_GUARDED_BY(flight_mu) = 1;
  // flights.size() and the earliest lease expiry or wait deadline (unix nanos), readable without
  // the lock so that Set and Tick skip it when there is nothing to do.
  std::atomic<size_t> flight_count{0};
  std::atomic<int64_t> next_due_nanos{std::numeric_limits<int64_t>::max()};

  Namespace* FindNamespace(absl::string_view name) {
    absl::ReaderMutexLock lock(&ns_mu);
    auto found = namespaces.find(name);
    return found == namespaces.end() ? nullptr : found->second.get();
  }

  // Every namespace, sorted by name.
  std::vector<Namespace*> AllNamespaces() {
    std::vector<Namespace*> all;
    {
      absl::ReaderMutexLock lock(&ns_mu);
      all.reserve(namespaces.size());
      for (const auto& [name, space] : namespaces) all.push_back(space.get());
    }
    std::sort(all.begin(), all.end(),
              [](const Namespace* a, const Namespace* b) { return a->name() < b->name(); });
    return all;
  }

  // Creates the missing ones among `names`, all or none.
  absl::Status CreateNamespaces(const std::vector<absl::string_view>& names,
                                const CacheOptions& options) {
    absl::MutexLock lock(&ns_mu);
    std::vector<absl::string_view> missing;
    for (absl::string_view name : names) {
      if (!namespaces.contains(name)) missing.push_back(name);
    }
    if (namespaces.size() + missing.size() > options.max_namespaces) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot create namespace \"", missing.front(), "\": the cache already has ",
                       namespaces.size(), " namespaces and allows ", options.max_namespaces,
                       " (max_namespaces)"));
    }
    for (absl::string_view name : missing) {
      namespaces.emplace(name, std::make_unique<Namespace>(
                                   std::string(name), OptionsFor(options, name), options.shards));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Namespace*> GetOrCreateNamespace(absl::string_view name,
                                                  const CacheOptions& options) {
    if (Namespace* space = FindNamespace(name)) return space;
    RETURN_IF_ERROR(CreateNamespaces({name}, options));
    return FindNamespace(name);
  }

  std::string NewToken() ABSL_EXCLUSIVE_LOCKS_REQUIRED(flight_mu) {
    return absl::StrCat(absl::Hex(absl::Uniform<uint64_t>(bitgen), absl::kZeroPad16),
                        absl::Hex(absl::Uniform<uint64_t>(bitgen), absl::kZeroPad16));
  }

  void NoteDueLocked(absl::Time t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(flight_mu) {
    const int64_t nanos = Nanos(t);
    if (nanos < next_due_nanos.load()) next_due_nanos.store(nanos);
  }

  void EraseFlightLocked(FlightMap::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(flight_mu) {
    flights.erase(it);
    flight_count.fetch_sub(1);
  }

  // Hands the flight's lease to its oldest waiter; false when nobody waits.
  bool GrantToNextWaiterLocked(Flight& flight, absl::Time now, std::vector<Ready>& ready)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(flight_mu) {
    if (flight.waiters.empty()) return false;
    Waiter waiter = std::move(flight.waiters.front());
    flight.waiters.pop_front();
    waiting.erase(waiter.id);
    flight.lease = Lease{NewToken(), now + waiter.lease_ttl};
    NoteDueLocked(flight.lease.expire_time);
    flight.space->CountLeaseGranted();
    ready.push_back({std::move(waiter.done), LeaseResult(flight.lease, /*coalesced=*/true)});
    return true;
  }

  // Stores an entry and gives it to everyone waiting on its key; a current `lease_token` ends
  // the lease.
  Entry Store(Namespace& space, std::string key, Value value, absl::Time expire_time,
              absl::Time update_time, absl::string_view lease_token) {
    Entry entry = space.Put(std::move(key), std::move(value), expire_time, update_time);
    // A waiter joins only a flight that already existed, so a count of 0 means nobody waits.
    if (flight_count.load() == 0) return entry;
    std::vector<Ready> ready;
    {
      absl::MutexLock lock(&flight_mu);
      auto it = flights.find(FlightKey(space.name(), entry.key));
      if (it == flights.end()) return entry;
      Flight& flight = it->second;
      for (Waiter& waiter : flight.waiters) {
        waiting.erase(waiter.id);
        space.CountCoalescedWait();
        ready.push_back({std::move(waiter.done), HitResult(entry, /*coalesced=*/true)});
      }
      flight.waiters.clear();
      if (!lease_token.empty() && lease_token == flight.lease.token) EraseFlightLocked(it);
    }
    RunAll(ready);
    return entry;
  }
};

absl::StatusOr<std::unique_ptr<CacheEngine>> CacheEngine::Create(CacheOptions options,
                                                                 Clock& clock) {
  if (options.shards < 1 || options.shards > kMaxShards) {
    return InvalidFieldError("shards", absl::StrCat("must be between 1 and ", kMaxShards));
  }
  if (options.max_key_bytes < 1 || options.max_key_bytes > kMaxKeyBytesLimit) {
    return InvalidFieldError("max_key_bytes",
                             absl::StrCat("must be between 1 and ", kMaxKeyBytesLimit));
  }
  if (options.max_value_bytes > kMaxValueBytesLimit) {
    return InvalidFieldError("max_value_bytes",
                             absl::StrCat("must be at most ", kMaxValueBytesLimit));
  }
  if (options.max_batch_items < 1) return InvalidFieldError("max_batch_items", "must be positive");
  if (options.max_namespaces < 1) return InvalidFieldError("max_namespaces", "must be positive");
  if (options.lease_ttl <= absl::ZeroDuration()) {
    return InvalidFieldError("lease_ttl", "must be positive");
  }
  if (options.max_wait <= absl::ZeroDuration()) {
    return InvalidFieldError("max_wait", "must be positive");
  }
  const auto check_namespace_options = [](absl::string_view name, const NamespaceOptions& o) {
    if (o.max_bytes < 1) {
      return InvalidFieldError("max_bytes",
                               absl::StrCat("namespace \"", name, "\": must be positive"));
    }
    if (o.default_ttl < absl::ZeroDuration()) {
      return InvalidFieldError("default_ttl",
                               absl::StrCat("namespace \"", name, "\": must not be negative"));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check_namespace_options("defaults", options.defaults));
  std::vector<absl::string_view> initial = {kDefaultNamespace};
  for (const auto& [name, ns_options] : options.namespaces) {
    RETURN_IF_ERROR(CheckNamespaceName(name, "namespaces"));
    RETURN_IF_ERROR(check_namespace_options(name, ns_options));
    if (name != kDefaultNamespace) initial.push_back(name);
  }
  if (initial.size() > options.max_namespaces) {
    return InvalidFieldError("max_namespaces",
                             absl::StrCat("is ", options.max_namespaces, " but ", initial.size(),
                                          " namespaces are configured (default included)"));
  }
  std::unique_ptr<CacheEngine> engine(new CacheEngine(std::move(options), clock));
  RETURN_IF_ERROR(engine->state_->CreateNamespaces(initial, engine->options_));
  return engine;
}

CacheEngine::CacheEngine(CacheOptions options, Clock& clock)
    : options_(std::move(options)), clock_(clock), state_(std::make_unique<State>()) {}

CacheEngine::~CacheEngine() {
  // Every Lookup's callback runs exactly once, so the ones still waiting hear that it is over.
  std::vector<Ready> ready;
  {
    absl::MutexLock lock(&state_->flight_mu);
    for (auto& [flight_key, flight] : state_->flights) {
      for (State::Waiter& waiter : flight.waiters) {
        ready.push_back(
            {std::move(waiter.done), absl::CancelledError("the cache is shutting down")});
      }
      flight.waiters.clear();
    }
    state_->waiting.clear();
  }
  RunAll(ready);
}

absl::StatusOr<std::optional<Entry>> CacheEngine::Get(absl::string_view ns, absl::string_view key) {
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  RETURN_IF_ERROR(CheckKey(key, options_.max_key_bytes, "key"));
  Namespace* space = state_->FindNamespace(name);
  // An unknown namespace holds nothing; reads do not create namespaces.
  if (space == nullptr) return std::optional<Entry>();
  return space->Get(key, clock_.Now(), Namespace::CountMisses::kYes);
}

uint64_t CacheEngine::Lookup(absl::string_view ns, absl::string_view key,
                             const LookupOptions& options, LookupCallback done) {
  const auto fail = [&done](absl::Status status) {
    std::move(done)(std::move(status));
    return uint64_t{0};
  };
  absl::StatusOr<absl::string_view> name = ResolveNamespace(ns);
  if (!name.ok()) return fail(name.status());
  if (absl::Status s = CheckKey(key, options_.max_key_bytes, "key"); !s.ok()) return fail(s);
  if (options.lease_ttl < absl::ZeroDuration()) {
    return fail(InvalidFieldError("lease_ttl", "must not be negative"));
  }
  if (options.max_wait < absl::ZeroDuration()) {
    return fail(InvalidFieldError("max_wait", "must not be negative"));
  }
  // A lease is a promise to write, so Lookup creates the namespace as Set would.
  absl::StatusOr<Namespace*> space = state_->GetOrCreateNamespace(*name, options_);
  if (!space.ok()) return fail(space.status());

  const absl::Time now = clock_.Now();
  // Hits, the common case, never touch the flight lock.
  if (std::optional<Entry> entry = (*space)->Get(key, now, Namespace::CountMisses::kNo)) {
    std::move(done)(HitResult(*std::move(entry), /*coalesced=*/false));
    return 0;
  }
  const absl::Duration lease_ttl =
      options.lease_ttl == absl::ZeroDuration() ? options_.lease_ttl : options.lease_ttl;
  const absl::Duration max_wait =
      options.max_wait == absl::ZeroDuration() ? options_.max_wait : options.max_wait;

  const std::string flight_key = FlightKey(*name, key);
  absl::StatusOr<LookupResult> result;
  uint64_t id = 0;
  {
    State& state = *state_;
    absl::MutexLock lock(&state.flight_mu);
    // Checked again under the flight lock: a Set that lands after this check wakes us, because
    // Set takes the flight lock only after storing.
    if (std::optional<Entry> entry = (*space)->Get(key, now, Namespace::CountMisses::kYes)) {
      result = HitResult(*std::move(entry), /*coalesced=*/false);
    } else if (auto [it, inserted] = state.flights.try_emplace(flight_key); inserted) {
      State::Flight& flight = it->second;
      state.flight_count.fetch_add(1);
      flight.space = *space;
      flight.lease = Lease{state.NewToken(), now + lease_ttl};
      state.NoteDueLocked(flight.lease.expire_time);
      (*space)->CountLeaseGranted();
      result = LeaseResult(flight.lease, /*coalesced=*/false);
    } else {
      const absl::Time deadline = std::min(now + max_wait, options.deadline);
      if (deadline <= now) {
        result = MissResult();
      } else {
        id = state.next_lookup_id++;
        it->second.waiters.push_back(State::Waiter{id, deadline, lease_ttl, std::move(done)});
        state.waiting.emplace(id, it->first);
        state.NoteDueLocked(deadline);
      }
    }
  }
  if (id == 0) std::move(done)(std::move(result));
  return id;
}

void CacheEngine::CancelLookup(uint64_t lookup_id) {
  std::optional<LookupCallback> done;
  {
    State& state = *state_;
    absl::MutexLock lock(&state.flight_mu);
    auto waiting = state.waiting.find(lookup_id);
    if (waiting == state.waiting.end()) return;
    auto flight = state.flights.find(waiting->second);
    state.waiting.erase(waiting);
    if (flight == state.flights.end()) return;
    auto& waiters = flight->second.waiters;
    auto waiter = std::find_if(waiters.begin(), waiters.end(),
                               [lookup_id](const State::Waiter& w) { return w.id == lookup_id; });
    if (waiter == waiters.end()) return;
    done = std::move(waiter->done);
    waiters.erase(waiter);
  }
  std::move (*done)(absl::CancelledError("lookup cancelled"));
}

absl::StatusOr<Entry> CacheEngine::Set(absl::string_view ns, absl::string_view key,
                                       std::string value, std::optional<absl::Duration> ttl,
                                       absl::string_view lease_token) {
  return Set(ns, key, std::make_shared<const std::string>(std::move(value)), ttl, lease_token);
}

absl::StatusOr<Entry> CacheEngine::Set(absl::string_view ns, absl::string_view key, Value value,
                                       std::optional<absl::Duration> ttl,
                                       absl::string_view lease_token) {
  if (value == nullptr) value = std::make_shared<const std::string>();
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  RETURN_IF_ERROR(CheckKey(key, options_.max_key_bytes, "key"));
  RETURN_IF_ERROR(CheckValue(*value, options_.max_value_bytes, "value"));
  RETURN_IF_ERROR(CheckTtl(ttl, "ttl"));
  RETURN_IF_ERROR(
      CheckFitsBudget(ChargedSize(key, value->size()), OptionsFor(options_, name), "value"));
  ASSIGN_OR_RETURN(Namespace * space, state_->GetOrCreateNamespace(name, options_));
  const absl::Time now = clock_.Now();
  return state_->Store(*space, std::string(key), std::move(value),
                       ExpireTime(now, ttl.value_or(space->options().default_ttl)), now,
                       lease_token);
}

absl::StatusOr<bool> CacheEngine::Delete(absl::string_view ns, absl::string_view key) {
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  RETURN_IF_ERROR(CheckKey(key, options_.max_key_bytes, "key"));
  Namespace* space = state_->FindNamespace(name);
  if (space == nullptr) return false;
  return space->Remove(key, clock_.Now());
}

absl::StatusOr<std::vector<std::optional<Entry>>> CacheEngine::BatchGet(
    absl::string_view ns, const std::vector<std::string>& keys) {
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  if (keys.size() > options_.max_batch_items) {
    return InvalidFieldError("keys", absl::StrCat("at most ", options_.max_batch_items,
                                                  " keys per batch, got ", keys.size()));
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    RETURN_IF_ERROR(CheckKey(keys[i], options_.max_key_bytes, absl::StrCat("keys[", i, "]")));
  }
  std::vector<std::optional<Entry>> entries(keys.size());
  Namespace* space = state_->FindNamespace(name);
  if (space == nullptr) return entries;
  const absl::Time now = clock_.Now();
  for (size_t i = 0; i < keys.size(); ++i) {
    entries[i] = space->Get(keys[i], now, Namespace::CountMisses::kYes);
  }
  return entries;
}

absl::StatusOr<uint32_t> CacheEngine::BatchSet(absl::string_view ns, std::vector<SetItem> items) {
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  if (items.size() > options_.max_batch_items) {
    return InvalidFieldError("items", absl::StrCat("at most ", options_.max_batch_items,
                                                   " items per batch, got ", items.size()));
  }
  const NamespaceOptions& ns_options = OptionsFor(options_, name);
  for (size_t i = 0; i < items.size(); ++i) {
    const SetItem& item = items[i];
    const std::string field = absl::StrCat("items[", i, "]");
    RETURN_IF_ERROR(CheckKey(item.key, options_.max_key_bytes, absl::StrCat(field, ".key")));
    RETURN_IF_ERROR(
        CheckValue(item.value, options_.max_value_bytes, absl::StrCat(field, ".value")));
    RETURN_IF_ERROR(CheckTtl(item.ttl, absl::StrCat(field, ".ttl")));
    RETURN_IF_ERROR(CheckFitsBudget(ChargedSize(item.key, item.value.size()), ns_options,
                                    absl::StrCat(field, ".value")));
  }
  if (items.empty()) return 0u;
  ASSIGN_OR_RETURN(Namespace * space, state_->GetOrCreateNamespace(name, options_));
  const absl::Time now = clock_.Now();
  for (SetItem& item : items) {
    state_->Store(*space, std::move(item.key),
                  std::make_shared<const std::string>(std::move(item.value)),
                  ExpireTime(now, item.ttl.value_or(space->options().default_ttl)), now, "");
  }
  return static_cast<uint32_t>(items.size());
}

absl::StatusOr<uint64_t> CacheEngine::Invalidate(absl::string_view ns,
                                                 const std::vector<std::string>& keys,
                                                 absl::string_view prefix, bool all) {
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  if (keys.empty() && prefix.empty() && !all) {
    return InvalidFieldError("keys", "give keys, a prefix or all");
  }
  if (keys.size() > options_.max_batch_items) {
    return InvalidFieldError("keys", absl::StrCat("at most ", options_.max_batch_items,
                                                  " keys per batch, got ", keys.size()));
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    RETURN_IF_ERROR(CheckKey(keys[i], options_.max_key_bytes, absl::StrCat("keys[", i, "]")));
  }
  Namespace* space = state_->FindNamespace(name);
  if (space == nullptr) return uint64_t{0};
  const absl::Time now = clock_.Now();
  if (all) return space->RemoveIf(now, [](absl::string_view) { return true; });
  uint64_t removed = 0;
  for (const std::string& key : keys) removed += space->Remove(key, now) ? 1 : 0;
  if (!prefix.empty()) {
    removed += space->RemoveIf(
        now, [prefix](absl::string_view key) { return absl::StartsWith(key, prefix); });
  }
  return removed;
}

absl::StatusOr<bool> CacheEngine::ReleaseLease(absl::string_view ns, absl::string_view key,
                                               absl::string_view lease_token) {
  ASSIGN_OR_RETURN(const absl::string_view name, ResolveNamespace(ns));
  RETURN_IF_ERROR(CheckKey(key, options_.max_key_bytes, "key"));
  if (lease_token.empty()) return InvalidFieldError("lease_token", "must not be empty");
  std::vector<Ready> ready;
  {
    State& state = *state_;
    absl::MutexLock lock(&state.flight_mu);
    auto it = state.flights.find(FlightKey(name, key));
    if (it == state.flights.end() || it->second.lease.token != lease_token) return false;
    if (!state.GrantToNextWaiterLocked(it->second, clock_.Now(), ready)) {
      state.EraseFlightLocked(it);
    }
  }
  RunAll(ready);
  return true;
}

uint64_t CacheEngine::Cleanup() {
  const absl::Time now = clock_.Now();
  uint64_t removed = 0;
  for (Namespace* space : state_->AllNamespaces()) removed += space->RemoveExpired(now);
  return removed;
}

void CacheEngine::Tick() {
  State& state = *state_;
  if (state.flight_count.load() == 0) return;
  const absl::Time now = clock_.Now();
  if (Nanos(now) < state.next_due_nanos.load()) return;
  std::vector<Ready> ready;
  {
    absl::MutexLock lock(&state.flight_mu);
    int64_t next_due = std::numeric_limits<int64_t>::max();
    for (auto it = state.flights.begin(); it != state.flights.end();) {
      State::Flight& flight = it->second;
      // Waits that ran out end first, so that an expiring lease never goes to one of them.
      std::deque<State::Waiter> still_waiting;
      for (State::Waiter& waiter : flight.waiters) {
        if (waiter.deadline <= now) {
          state.waiting.erase(waiter.id);
          ready.push_back({std::move(waiter.done), MissResult()});
        } else {
          still_waiting.push_back(std::move(waiter));
        }
      }
      flight.waiters = std::move(still_waiting);
      if (flight.lease.expire_time <= now && !state.GrantToNextWaiterLocked(flight, now, ready)) {
        state.EraseFlightLocked(it++);
        continue;
      }
      next_due = std::min(next_due, Nanos(flight.lease.expire_time));
      for (const State::Waiter& waiter : flight.waiters) {
        next_due = std::min(next_due, Nanos(waiter.deadline));
      }
      ++it;
    }
    state.next_due_nanos.store(next_due);
  }
  RunAll(ready);
}

absl::StatusOr<CacheStats> CacheEngine::Stats(absl::string_view ns) const {
  std::vector<Namespace*> spaces;
  if (ns.empty()) {
    spaces = state_->AllNamespaces();
  } else {
    RETURN_IF_ERROR(CheckNamespaceName(ns, "namespace"));
    Namespace* space = state_->FindNamespace(ns);
    if (space == nullptr) {
      return absl::NotFoundError(absl::StrCat("namespace \"", ns, "\" does not exist"));
    }
    spaces.push_back(space);
  }
  CacheStats stats;
  for (const Namespace* space : spaces) {
    NamespaceStats s = space->Stats();
    NamespaceStats& t = stats.total;
    t.entries += s.entries;
    t.bytes += s.bytes;
    t.max_bytes += s.max_bytes;
    t.hits += s.hits;
    t.misses += s.misses;
    t.evictions += s.evictions;
    t.expirations += s.expirations;
    t.sets += s.sets;
    t.deletes += s.deletes;
    t.leases_granted += s.leases_granted;
    t.coalesced_waits += s.coalesced_waits;
    stats.namespaces.push_back(std::move(s));
  }
  return stats;
}

absl::StatusOr<SnapshotInfo> CacheEngine::SaveSnapshot(const std::string& path) const {
  ASSIGN_OR_RETURN(std::unique_ptr<internal::SnapshotWriter> writer,
                   internal::SnapshotWriter::Create(path));
  const absl::Time now = clock_.Now();
  SnapshotInfo info;
  std::vector<Entry> copied;
  for (Namespace* space : state_->AllNamespaces()) {
    for (size_t s = 0; s < space->shard_count(); ++s) {
      // Each shard is locked only while it is copied; the file is written outside every lock.
      copied.clear();
      space->CopyShard(s, now, copied);
      for (const Entry& entry : copied) {
        RETURN_IF_ERROR(writer->Append(internal::SnapshotRecord{
            entry.ns, entry.key, *entry.value, entry.expire_time, entry.update_time}));
        ++info.entries;
        info.bytes += entry.size_bytes;
      }
    }
  }
  RETURN_IF_ERROR(writer->Commit());
  return info;
}

absl::StatusOr<SnapshotInfo> CacheEngine::LoadSnapshot(const std::string& path) {
  internal::SnapshotLimits limits;
  limits.max_namespace_bytes = kMaxNamespaceNameBytes;
  limits.max_key_bytes = options_.max_key_bytes;
  limits.max_value_bytes = options_.max_value_bytes;
  ASSIGN_OR_RETURN(std::unique_ptr<internal::SnapshotReader> reader,
                   internal::SnapshotReader::Open(path, limits));
  const absl::Time now = clock_.Now();

  // What the file format cannot check is checked here, still before anything is stored.
  std::vector<absl::string_view> names;
  absl::flat_hash_set<absl::string_view> seen;
  const std::vector<internal::SnapshotRecord>& records = reader->records();
  for (size_t i = 0; i < records.size(); ++i) {
    if (!CheckNamespaceName(records[i].ns, "namespace").ok()) {
      return absl::DataLossError(absl::StrCat("snapshot file \"", path, "\" record ", i,
                                              " has an invalid namespace name"));
    }
    if (now < records[i].expire_time && seen.insert(records[i].ns).second) {
      names.push_back(records[i].ns);
    }
  }
  RETURN_IF_ERROR(state_->CreateNamespaces(names, options_));

  SnapshotInfo info;
  for (const internal::SnapshotRecord& record : records) {
    if (now >= record.expire_time) continue;
    Namespace* space = state_->FindNamespace(record.ns);
    const uint64_t size = ChargedSize(record.key, record.value.size());
    // The budget may have shrunk since the save; such an entry cannot be kept at all.
    if (size > space->options().max_bytes) continue;
    state_->Store(*space, std::string(record.key),
                  std::make_shared<const std::string>(record.value), record.expire_time,
                  record.update_time, "");
    ++info.entries;
    info.bytes += size;
  }
  return info;
}

}  // namespace montage::cache
