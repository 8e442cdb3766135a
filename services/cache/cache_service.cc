#include "services/cache/cache_service.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/proto_time.h"
#include "common/status.h"
#include "common/telemetry/metrics.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace montage::cache {
namespace {

void FillEntry(Entry& entry, bool with_value, v1::Entry* out) {
  out->set_namespace_(entry.ns);
  out->set_key(entry.key);
  if (with_value) out->set_value(*entry.value);
  out->set_size_bytes(entry.size_bytes);
  if (entry.expire_time != absl::InfiniteFuture()) {
    *out->mutable_expire_time() = ToProtoTimestamp(entry.expire_time);
  }
  *out->mutable_update_time() = ToProtoTimestamp(entry.update_time);
}

absl::StatusOr<std::optional<absl::Duration>> TtlFromProto(bool has_ttl,
                                                           const google::protobuf::Duration& ttl) {
  if (!has_ttl) return std::optional<absl::Duration>();
  if (ttl.seconds() < 0 || ttl.nanos() < 0) return InvalidFieldError("ttl", "must not be negative");
  return std::optional<absl::Duration>(FromProtoDuration(ttl));
}

void FillStats(const NamespaceStats& s, v1::NamespaceStats* out) {
  out->set_namespace_(s.ns);
  out->set_entries(s.entries);
  out->set_bytes(s.bytes);
  out->set_max_bytes(s.max_bytes);
  out->set_hits(s.hits);
  out->set_misses(s.misses);
  out->set_hit_rate(s.hit_rate());
  out->set_evictions(s.evictions);
  out->set_expirations(s.expirations);
  out->set_sets(s.sets);
  out->set_deletes(s.deletes);
  out->set_leases_granted(s.leases_granted);
  out->set_coalesced_waits(s.coalesced_waits);
  *out->mutable_default_ttl() = ToProtoDuration(s.default_ttl);
}

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// A Get with lease_on_miss: completes when the engine calls back, which may be at once or much
// later from another thread. Finish is only called after Start() has recorded the lookup id, so
// OnCancel can always find it; the reactor deletes itself in OnDone.
class LeaseGetReactor final : public grpc::ServerUnaryReactor {
 public:
  LeaseGetReactor(CacheEngine& engine, v1::GetResponse* response)
      : engine_(engine), response_(response) {}

  void Start(const v1::GetRequest& request, absl::Time deadline) {
    LookupOptions options;
    if (request.has_lease_ttl()) options.lease_ttl = FromProtoDuration(request.lease_ttl());
    if (request.has_max_wait()) options.max_wait = FromProtoDuration(request.max_wait());
    options.deadline = deadline;
    const uint64_t id = engine_.Lookup(
        request.namespace_(), request.key(), options,
        [this](absl::StatusOr<LookupResult> result) { Complete(std::move(result)); });
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      lookup_id_ = id;
      started_ = true;
      finish = std::move(pending_);
    }
    if (finish.has_value()) Finish(*finish);
  }

  void OnCancel() override {
    uint64_t id = 0;
    {
      absl::MutexLock lock(&mu_);
      if (!started_ || completed_) return;
      id = lookup_id_;
    }
    if (id != 0) engine_.CancelLookup(id);
  }

  void OnDone() override { delete this; }

 private:
  void Complete(absl::StatusOr<LookupResult> result) {
    grpc::Status status;
    if (!result.ok()) {
      status = ToGrpcStatus(result.status());
    } else {
      response_->set_coalesced(result->coalesced);
      switch (result->kind) {
        case LookupResult::Kind::kHit:
          response_->set_found(true);
          FillEntry(*result->entry, /*with_value=*/true, response_->mutable_entry());
          break;
        case LookupResult::Kind::kLeaseGranted:
          response_->mutable_lease()->set_token(result->lease->token);
          *response_->mutable_lease()->mutable_expire_time() =
              ToProtoTimestamp(result->lease->expire_time);
          break;
        case LookupResult::Kind::kMiss:
          break;
      }
    }
    {
      absl::MutexLock lock(&mu_);
      completed_ = true;
      if (!started_) {
        pending_ = status;
        return;
      }
    }
    Finish(status);  // last touch of `this`
  }

  CacheEngine& engine_;
  v1::GetResponse* const response_;
  absl::Mutex mu_;
  uint64_t lookup_id_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool completed_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

CacheServiceImpl::CacheServiceImpl(CacheEngine& engine, Executor& executor,
                                   std::string persist_path)
    : engine_(engine), executor_(executor), persist_path_(std::move(persist_path)) {}

grpc::ServerUnaryReactor* CacheServiceImpl::Get(grpc::CallbackServerContext* context,
                                                const v1::GetRequest* request,
                                                v1::GetResponse* response) {
  if (request->lease_on_miss()) {
    auto* reactor = new LeaseGetReactor(engine_, response);
    // End the wait a little before the caller's deadline so it gets an answer, not a timeout.
    absl::Time deadline = absl::FromChrono(context->deadline());
    if (deadline != absl::InfiniteFuture()) deadline -= absl::Milliseconds(20);
    reactor->Start(*request, deadline);
    return reactor;
  }
  absl::StatusOr<std::optional<Entry>> entry = engine_.Get(request->namespace_(), request->key());
  if (!entry.ok()) return Done(context, entry.status());
  if (entry->has_value()) {
    response->set_found(true);
    FillEntry(**entry, /*with_value=*/true, response->mutable_entry());
  }
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::Set(grpc::CallbackServerContext* context,
                                                const v1::SetRequest* request,
                                                v1::Entry* response) {
  auto ttl = TtlFromProto(request->has_ttl(), request->ttl());
  if (!ttl.ok()) return Done(context, ttl.status());
  absl::StatusOr<Entry> entry = engine_.Set(request->namespace_(), request->key(), request->value(),
                                            *ttl, request->lease_token());
  if (!entry.ok()) return Done(context, entry.status());
  FillEntry(*entry, /*with_value=*/false, response);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::Delete(grpc::CallbackServerContext* context,
                                                   const v1::DeleteRequest* request,
                                                   v1::DeleteResponse* response) {
  absl::StatusOr<bool> deleted = engine_.Delete(request->namespace_(), request->key());
  if (!deleted.ok()) return Done(context, deleted.status());
  response->set_deleted(*deleted);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::BatchGet(grpc::CallbackServerContext* context,
                                                     const v1::BatchGetRequest* request,
                                                     v1::BatchGetResponse* response) {
  std::vector<std::string> keys(request->keys().begin(), request->keys().end());
  auto entries = engine_.BatchGet(request->namespace_(), keys);
  if (!entries.ok()) return Done(context, entries.status());
  for (std::optional<Entry>& entry : *entries) {
    v1::GetResponse* result = response->add_results();
    if (entry.has_value()) {
      result->set_found(true);
      FillEntry(*entry, /*with_value=*/true, result->mutable_entry());
    }
  }
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::BatchSet(grpc::CallbackServerContext* context,
                                                     const v1::BatchSetRequest* request,
                                                     v1::BatchSetResponse* response) {
  std::vector<SetItem> items;
  items.reserve(request->items_size());
  for (int i = 0; i < request->items_size(); ++i) {
    const auto& item = request->items(i);
    auto ttl = TtlFromProto(item.has_ttl(), item.ttl());
    if (!ttl.ok()) {
      return Done(context,
                  InvalidFieldError(absl::StrCat("items[", i, "].ttl"), "must not be negative"));
    }
    items.push_back(SetItem{item.key(), item.value(), *ttl});
  }
  auto written = engine_.BatchSet(request->namespace_(), std::move(items));
  if (!written.ok()) return Done(context, written.status());
  response->set_written(*written);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::Invalidate(grpc::CallbackServerContext* context,
                                                       const v1::InvalidateRequest* request,
                                                       v1::InvalidateResponse* response) {
  std::vector<std::string> keys(request->keys().begin(), request->keys().end());
  auto removed = engine_.Invalidate(request->namespace_(), keys, request->prefix(), request->all());
  if (!removed.ok()) return Done(context, removed.status());
  response->set_removed(*removed);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::ReleaseLease(grpc::CallbackServerContext* context,
                                                         const v1::ReleaseLeaseRequest* request,
                                                         v1::ReleaseLeaseResponse* response) {
  auto released =
      engine_.ReleaseLease(request->namespace_(), request->key(), request->lease_token());
  if (!released.ok()) return Done(context, released.status());
  response->set_released(*released);
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::Cleanup(grpc::CallbackServerContext* context,
                                                    const v1::CleanupRequest* request,
                                                    v1::CleanupResponse* response) {
  response->set_expired_removed(engine_.Cleanup());
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::GetStats(grpc::CallbackServerContext* context,
                                                     const v1::GetStatsRequest* request,
                                                     v1::CacheStats* response) {
  absl::StatusOr<CacheStats> stats = engine_.Stats(request->namespace_());
  if (!stats.ok()) return Done(context, stats.status());
  FillStats(stats->total, response->mutable_total());
  for (const NamespaceStats& ns : stats->namespaces) FillStats(ns, response->add_namespaces());
  return Done(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CacheServiceImpl::Snapshot(grpc::CallbackServerContext* context,
                                                     const v1::SnapshotRequest* request,
                                                     v1::SnapshotResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (persist_path_.empty()) {
    reactor->Finish(ToGrpcStatus(absl::FailedPreconditionError(
        "persistence is off: set cache.persist_path in the config to enable snapshots")));
    return reactor;
  }
  // File I/O runs on the executor, never on a gRPC thread.
  absl::Status scheduled = executor_.Schedule([this, reactor, response] {
    absl::StatusOr<SnapshotInfo> info = engine_.SaveSnapshot(persist_path_);
    if (info.ok()) {
      response->set_path(persist_path_);
      response->set_entries(info->entries);
      response->set_bytes(info->bytes);
    }
    reactor->Finish(ToGrpcStatus(info.status()));
  });
  if (!scheduled.ok()) reactor->Finish(ToGrpcStatus(scheduled));
  return reactor;
}

CacheOptions CacheOptionsFromConfig(const config::v1::CacheConfig& c) {
  CacheOptions options;
  options.defaults.max_bytes = c.max_bytes();
  options.defaults.default_ttl = FromProtoDuration(c.default_ttl());
  for (const auto& [name, ns] : c.namespaces()) {
    NamespaceOptions nso;
    nso.max_bytes = ns.max_bytes();
    nso.default_ttl =
        ns.has_default_ttl() ? FromProtoDuration(ns.default_ttl()) : options.defaults.default_ttl;
    options.namespaces[name] = nso;
  }
  options.shards = static_cast<int>(c.shards());
  options.max_key_bytes = c.max_key_bytes();
  options.max_value_bytes = c.max_value_bytes();
  options.max_batch_items = c.max_batch_items();
  options.max_namespaces = c.max_namespaces();
  options.lease_ttl = FromProtoDuration(c.lease_ttl());
  options.max_wait = FromProtoDuration(c.max_wait());
  return options;
}

namespace {

// The engine's stats as Prometheus series (montage_cache_*{namespace}), read at scrape time.
// Counters advance by the difference since the last scrape, so they stay monotonic.
class CacheMetrics {
 public:
  explicit CacheMetrics(prometheus::Registry& registry)
      : entries_(prometheus::BuildGauge()
                     .Name("montage_cache_entries")
                     .Help("Live entries in the cache.")
                     .Register(registry)),
        bytes_(prometheus::BuildGauge()
                   .Name("montage_cache_bytes")
                   .Help("Bytes charged to the cache (keys, values and bookkeeping).")
                   .Register(registry)),
        max_bytes_(prometheus::BuildGauge()
                       .Name("montage_cache_max_bytes")
                       .Help("Byte budget of the namespace.")
                       .Register(registry)),
        events_(prometheus::BuildCounter()
                    .Name("montage_cache_events_total")
                    .Help("Cache events by kind: hit, miss, eviction, expiration, set, delete, "
                          "lease_granted, coalesced_wait.")
                    .Register(registry)) {}

  void Update(const CacheStats& stats) {
    absl::MutexLock lock(&mu_);
    for (const NamespaceStats& ns : stats.namespaces) {
      const prometheus::Labels labels{{"namespace", ns.ns}};
      entries_.Add(labels).Set(static_cast<double>(ns.entries));
      bytes_.Add(labels).Set(static_cast<double>(ns.bytes));
      max_bytes_.Add(labels).Set(static_cast<double>(ns.max_bytes));
      const std::pair<const char*, uint64_t> events[] = {{"hit", ns.hits},
                                                         {"miss", ns.misses},
                                                         {"eviction", ns.evictions},
                                                         {"expiration", ns.expirations},
                                                         {"set", ns.sets},
                                                         {"delete", ns.deletes},
                                                         {"lease_granted", ns.leases_granted},
                                                         {"coalesced_wait", ns.coalesced_waits}};
      for (const auto& [kind, value] : events) {
        uint64_t& last = last_[std::make_pair(ns.ns, std::string(kind))];
        if (value > last) {
          events_.Add({{"namespace", ns.ns}, {"event", kind}})
              .Increment(static_cast<double>(value - last));
          last = value;
        }
      }
    }
  }

 private:
  prometheus::Family<prometheus::Gauge>& entries_;
  prometheus::Family<prometheus::Gauge>& bytes_;
  prometheus::Family<prometheus::Gauge>& max_bytes_;
  prometheus::Family<prometheus::Counter>& events_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::pair<std::string, std::string>, uint64_t> last_ ABSL_GUARDED_BY(mu_);
};

// Process-wide, like the registry the families live in.
CacheMetrics& ProcessCacheMetrics() {
  static CacheMetrics* const metrics = new CacheMetrics(telemetry::MetricsRegistry());
  return *metrics;
}

class CacheModule final : public ServiceModule {
 public:
  CacheModule(std::unique_ptr<CacheEngine> engine, ServiceContext& context)
      : engine_(std::move(engine)),
        persist_path_(context.config.cache().persist_path()),
        service_(*engine_, context.executor, persist_path_) {
    const auto& c = context.config.cache();
    CacheEngine* engine_ptr = engine_.get();
    sweeper_ = std::make_unique<PeriodicTask>(
        FromProtoDuration(c.lease_sweep_interval()), [engine_ptr] { engine_ptr->Tick(); },
        "cache-sweep");
    cleaner_ = std::make_unique<PeriodicTask>(
        FromProtoDuration(c.cleanup_interval()), [engine_ptr] { engine_ptr->Cleanup(); },
        "cache-clean");
    if (!persist_path_.empty()) {
      persister_ = std::make_unique<PeriodicTask>(
          FromProtoDuration(c.persist_interval()), [this] { Persist(); }, "cache-persist");
    }
  }

  std::vector<grpc::Service*> GrpcServices() override { return {&service_}; }
  void RefreshMetrics() override {
    absl::StatusOr<CacheStats> stats = engine_->Stats();
    if (stats.ok()) ProcessCacheMetrics().Update(*stats);
  }
  std::vector<std::string> HealthNames() const override {
    return {std::string(v1::CacheService::service_full_name())};
  }

  void Stop() override {
    sweeper_.reset();
    cleaner_.reset();
    persister_.reset();
    if (!persist_path_.empty()) Persist();
  }

 private:
  void Persist() {
    absl::StatusOr<SnapshotInfo> info = engine_->SaveSnapshot(persist_path_);
    if (info.ok()) {
      LogInfo("cache snapshot saved",
              {{"path", persist_path_}, {"entries", info->entries}, {"bytes", info->bytes}});
    } else {
      LogError("cache snapshot failed",
               {{"path", persist_path_}, {"error", std::string(info.status().message())}});
    }
  }

  std::unique_ptr<CacheEngine> engine_;
  const std::string persist_path_;
  CacheServiceImpl service_;
  std::unique_ptr<PeriodicTask> sweeper_;
  std::unique_ptr<PeriodicTask> cleaner_;
  std::unique_ptr<PeriodicTask> persister_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewCacheModule(ServiceContext& context) {
  const auto& c = context.config.cache();
  ASSIGN_OR_RETURN(std::unique_ptr<CacheEngine> engine,
                   CacheEngine::Create(CacheOptionsFromConfig(c), context.clock));
  if (!c.persist_path().empty()) {
    absl::StatusOr<SnapshotInfo> loaded = engine->LoadSnapshot(c.persist_path());
    if (loaded.ok()) {
      LogInfo("cache snapshot loaded",
              {{"path", c.persist_path()}, {"entries", loaded->entries}, {"bytes", loaded->bytes}});
    } else if (loaded.status().code() == absl::StatusCode::kNotFound) {
      LogInfo("no cache snapshot yet; starting empty", {{"path", c.persist_path()}});
    } else {
      // Keep the bad file for inspection instead of overwriting it at the next snapshot.
      const std::string aside = absl::StrCat(c.persist_path(), ".corrupt");
      std::rename(c.persist_path().c_str(), aside.c_str());
      LogError("cache snapshot unreadable; starting empty",
               {{"path", c.persist_path()},
                {"moved_to", aside},
                {"error", std::string(loaded.status().message())}});
    }
  }
  return std::unique_ptr<ServiceModule>(new CacheModule(std::move(engine), context));
}

}  // namespace montage::cache
