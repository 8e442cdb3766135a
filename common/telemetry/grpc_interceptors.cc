#include "common/telemetry/grpc_interceptors.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "common/telemetry/metrics.h"
#include "grpcpp/create_channel.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace montage::telemetry {
namespace {

using grpc::experimental::InterceptionHookPoints;
using grpc::experimental::InterceptorBatchMethods;

constexpr int kNumStatusCodes = 17;  // OK .. UNAUTHENTICATED

const prometheus::Histogram::BucketBoundaries& DurationBuckets() {
  static const auto* const buckets = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
      0.25,   0.5,     1,      2.5,   5,      10,    30,   60,    120,  300};
  return *buckets;
}

// "/pkg.Service/Method" -> ("pkg.Service", "Method").
std::pair<absl::string_view, absl::string_view> SplitMethod(absl::string_view full) {
  if (!full.empty() && full.front() == '/') full.remove_prefix(1);
  const size_t slash = full.rfind('/');
  if (slash == absl::string_view::npos) return {absl::string_view(), full};
  return {full.substr(0, slash), full.substr(slash + 1)};
}

// The status code attribute every call span ends with. The span templates list it (with
// UNKNOWN until the call sets the real code) so that setting it allocates nothing.
constexpr char kStatusCodeAttribute[] = "rpc.grpc.status_code";

// Everything calls of one method share: its name, the span template with the rpc.* attributes
// (OpenTelemetry's rpc conventions) and the metric children, built on the method's first call
// and kept for the life of the factory, so that a call allocates nothing for them. The metric
// pointers are owned by the prometheus families.
struct MethodState {
  explicit MethodState(absl::string_view method) : name(method) {
    const auto [service, rpc_method] = SplitMethod(name);
    span_template = std::make_shared<const SpanTemplate>(
        name, SpanTemplate::Attributes{
                  {"rpc.system", std::string("grpc")},
                  {"rpc.service", std::string(service)},
                  {"rpc.method", std::string(rpc_method)},
                  {kStatusCodeAttribute, static_cast<int64_t>(grpc::StatusCode::UNKNOWN)}});
  }

  const std::string name;
  std::shared_ptr<const SpanTemplate> span_template;
  prometheus::Gauge* in_flight = nullptr;  // server only
  prometheus::Histogram* duration = nullptr;
  std::array<std::atomic<prometheus::Counter*>, kNumStatusCodes> requests{};
};

// Per-method state of one side (server or client). Thread-safe. A call finds its method's
// state through a small per-thread cache keyed by the address of gRPC's method name (a static
// string for generated services), checked against the name itself, so the usual lookup takes
// no lock and hashes nothing; a miss takes a mutex.
class RpcMetrics {
 public:
  RpcMetrics(prometheus::Registry& registry, const std::string& side, bool with_in_flight)
      : id_(NextId()),
        requests_(prometheus::BuildCounter()
                      .Name("montage_grpc_" + side + "_requests_total")
                      .Help("gRPC calls completed, by method and status code.")
                      .Register(registry)),
        duration_(prometheus::BuildHistogram()
                      .Name("montage_grpc_" + side + "_request_duration_seconds")
                      .Help("Time from the start of a gRPC call to its status, in seconds.")
                      .Register(registry)),
        in_flight_(with_in_flight ? &prometheus::BuildGauge()
                                         .Name("montage_grpc_" + side + "_in_flight")
                                         .Help("gRPC calls started and not yet finished.")
                                         .Register(registry)
                                  : nullptr) {}

  // `method` as gRPC gives it ("/pkg.Service/Method"), null meaning "unknown".
  MethodState& ForMethod(const char* method) {
    if (method == nullptr) method = "unknown";
    // Entries of RpcMetrics that no longer exist never match: ids are not reused.
    struct CacheEntry {
      uint64_t owner;
      const char* method;
      MethodState* state;
    };
    constexpr size_t kCacheSize = 8;
    thread_local CacheEntry cache[kCacheSize];  // zero-initialised, no guard
    CacheEntry& entry = cache[(reinterpret_cast<uintptr_t>(method) >> 3) % kCacheSize];
    // The address alone is not enough: a generic service's name may live in memory that a
    // later call reuses for another name.
    if (entry.owner == id_ && entry.method == method && entry.state->name == method) {
      return *entry.state;
    }
    MethodState& state = Lookup(method);
    entry = CacheEntry{id_, method, &state};
    return state;
  }

  // Counters per code are created on first use so that the exposition lists only codes seen.
  prometheus::Counter& Requests(MethodState& method, grpc::StatusCode code) {
    int index = static_cast<int>(code);
    if (index < 0 || index >= kNumStatusCodes) index = static_cast<int>(grpc::StatusCode::UNKNOWN);
    std::atomic<prometheus::Counter*>& slot = method.requests[index];
    prometheus::Counter* counter = slot.load(std::memory_order_acquire);
    if (counter == nullptr) {
      // Family::Add returns the existing child for equal labels, so a race is harmless.
      counter = &requests_.Add(
          {{"method", method.name},
           {"code", std::string(GrpcCodeName(static_cast<grpc::StatusCode>(index)))}});
      slot.store(counter, std::memory_order_release);
    }
    return *counter;
  }

 private:
  static uint64_t NextId() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
  }

  MethodState& Lookup(absl::string_view method) {
    absl::MutexLock lock(&mu_);
    auto& slot = methods_[method];
    if (slot == nullptr) {
      slot = std::make_unique<MethodState>(method);
      slot->duration = &duration_.Add({{"method", slot->name}}, DurationBuckets());
      if (in_flight_ != nullptr) slot->in_flight = &in_flight_->Add({{"method", slot->name}});
    }
    return *slot;
  }

  const uint64_t id_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Gauge>* const in_flight_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<MethodState>> methods_ ABSL_GUARDED_BY(mu_);
};

// OpenTelemetry's rpc conventions: a server span is an error only for codes that mean the
// server failed; a client span for every non-OK code.
bool IsServerError(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::UNIMPLEMENTED:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DATA_LOSS:
      return true;
    default:
      return false;
  }
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool IsTraceHeader(absl::string_view name) {
  return name == kTraceparentHeader || name == kTracestateHeader || name == kB3Header ||
         name == kB3TraceIdHeader || name == kB3SpanIdHeader || name == kB3ParentSpanIdHeader ||
         name == kB3SampledHeader || name == kB3FlagsHeader;
}

// True when a metadata entry named `name` may carry a caller's trace context; most calls have
// none, and then extracting is skipped.
bool HasTraceHeader(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
  for (const auto& entry : metadata) {
    if (IsTraceHeader(absl::string_view(entry.first.data(), entry.first.size()))) return true;
  }
  return false;
}

// ----------------------------------------------------------------------------------------------
// Span contexts of server calls in progress, keyed by their ServerContext. An entry points at
// the span context inside its interceptor, which erases the entry (under the shard lock) before
// that span goes away, so readers copy it under the same lock. The pointer also identifies the
// owner: a context's memory may be reused by a new call before the old interceptor is
// destroyed, and the old one must not erase the new entry.
//
// gRPC 1.51 offers no public way from a ServerContext to its interceptors, hence the table.
// The shard locks are std::mutex because every call takes one twice: absl::Mutex as Debian
// builds it (without NDEBUG) does deadlock detection bookkeeping on every acquisition.

class ServerSpanTable {
 public:
  void Put(const grpc::ServerContextBase* context, const SpanContext* span) {
    Shard& shard = ShardFor(context);
    std::lock_guard<std::mutex> lock(shard.mu);
    shard.entries.insert_or_assign(context, span);
  }

  void Erase(const grpc::ServerContextBase* context, const SpanContext* span) {
    Shard& shard = ShardFor(context);
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.entries.find(context);
    if (it != shard.entries.end() && it->second == span) shard.entries.erase(it);
  }

  std::optional<SpanContext> Get(const grpc::ServerContextBase* context) {
    Shard& shard = ShardFor(context);
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.entries.find(context);
    if (it == shard.entries.end()) return std::nullopt;
    return *it->second;
  }

 private:
  struct Shard {
    std::mutex mu;
    absl::flat_hash_map<const grpc::ServerContextBase*, const SpanContext*> entries
        ABSL_GUARDED_BY(mu);
  };
  static constexpr size_t kShards = 16;

  Shard& ShardFor(const grpc::ServerContextBase* context) {
    return shards_[absl::Hash<const void*>()(context) % kShards];
  }

  std::array<Shard, kShards> shards_;
};

ServerSpanTable& ServerSpans() {
  static ServerSpanTable* const table = new ServerSpanTable();
  return *table;
}

// What the interceptors of one factory share. Null tracer means GlobalTracer().
struct SideState {
  SideState(Tracer* tracer, prometheus::Registry& registry, const std::string& side)
      : tracer(tracer), metrics(registry, side, /*with_in_flight=*/side == "server") {}
  Tracer& tracer_for_call() const { return tracer != nullptr ? *tracer : GlobalTracer(); }

  Tracer* const tracer;
  RpcMetrics metrics;
};

// ----------------------------------------------------------------------------------------------
// Server

// One per server call; created and destroyed by gRPC. Intercept is called for one batch at a
// time, so the members need no lock.
class ServerTelemetryInterceptor final : public grpc::experimental::Interceptor {
 public:
  ServerTelemetryInterceptor(std::shared_ptr<SideState> state,
                             grpc::experimental::ServerRpcInfo* info)
      : state_(std::move(state)),
        context_(info->server_context()),
        method_(state_->metrics.ForMethod(info->method())),
        start_(std::chrono::steady_clock::now()) {
    method_.in_flight->Increment();
  }

  ~ServerTelemetryInterceptor() override {
    // No status was ever sent (the call was torn down): count it as cancelled.
    if (!finished_)
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call ended without a status"));
    if (registered_) ServerSpans().Erase(context_, &span_.context());
  }

  void Intercept(InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      StartSpan(methods->GetRecvInitialMetadata());
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      // Before the status leaves, so the span and the metrics exist once the client has it.
      Finish(methods->GetSendStatus());
    }
    methods->Proceed();
  }

 private:
  void StartSpan(std::multimap<grpc::string_ref, grpc::string_ref>* metadata) {
    if (started_) return;
    started_ = true;
    std::optional<SpanContext> parent;
    if (metadata != nullptr && HasTraceHeader(*metadata)) {
      parent = Extract([metadata](absl::string_view name) -> std::optional<absl::string_view> {
        auto it = metadata->find(grpc::string_ref(name.data(), name.size()));
        if (it == metadata->end()) return std::nullopt;
        return absl::string_view(it->second.data(), it->second.size());
      });
    }
    span_ = state_->tracer_for_call().StartSpan(method_.span_template, SpanKind::kServer, parent);
    if (context_ != nullptr) {
      ServerSpans().Put(context_, &span_.context());
      registered_ = true;
    }
  }

  void Finish(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    const grpc::StatusCode code = status.error_code();
    method_.in_flight->Decrement();
    method_.duration->Observe(SecondsSince(start_));
    state_->metrics.Requests(method_, code).Increment();
    if (span_.IsRecording()) {
      span_.SetAttribute(kStatusCodeAttribute, static_cast<int64_t>(code));
      if (IsServerError(code)) span_.SetStatus(SpanStatusCode::kError, status.error_message());
      span_.End();
    }
  }

  const std::shared_ptr<SideState> state_;
  const grpc::ServerContextBase* const context_;
  MethodState& method_;
  const std::chrono::steady_clock::time_point start_;
  bool started_ = false;
  bool finished_ = false;
  bool registered_ = false;  // in ServerSpans()
  Span span_;
};

class ServerTelemetryInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  ServerTelemetryInterceptorFactory(Tracer* tracer, prometheus::Registry& registry)
      : state_(std::make_shared<SideState>(tracer, registry, "server")) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new ServerTelemetryInterceptor(state_, info);
  }

 private:
  const std::shared_ptr<SideState> state_;
};

// ----------------------------------------------------------------------------------------------
// Client

class ClientTelemetryInterceptor final : public grpc::experimental::Interceptor {
 public:
  ClientTelemetryInterceptor(std::shared_ptr<SideState> state,
                             grpc::experimental::ClientRpcInfo* info)
      : state_(std::move(state)), method_(info->method()) {}

  ~ClientTelemetryInterceptor() override {
    if (started_ && !finished_) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call ended without a status"));
    }
  }

  void Intercept(InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      Start(methods->GetSendInitialMetadata());
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_STATUS)) {
      // Before the application sees the status.
      if (const grpc::Status* status = methods->GetRecvStatus(); status != nullptr) {
        Finish(*status);
      }
    }
    methods->Proceed();
  }

 private:
  void Start(std::multimap<std::string, std::string>* metadata) {
    if (started_) return;
    started_ = true;
    metrics_ = &state_->metrics.ForMethod(method_);
    start_ = std::chrono::steady_clock::now();
    std::optional<SpanContext> parent;
    if (metadata != nullptr) {
      parent = Extract([metadata](absl::string_view name) -> std::optional<absl::string_view> {
        auto it = metadata->find(std::string(name));
        if (it == metadata->end()) return std::nullopt;
        return absl::string_view(it->second);
      });
    }
    span_ = state_->tracer_for_call().StartSpan(metrics_->span_template, SpanKind::kClient, parent);
    if (metadata != nullptr) {
      for (auto it = metadata->begin(); it != metadata->end();) {
        it = IsTraceHeader(it->first) ? metadata->erase(it) : std::next(it);
      }
      Inject(span_.context(), [metadata](absl::string_view name, absl::string_view value) {
        metadata->emplace(std::string(name), std::string(value));
      });
    }
  }

  void Finish(const grpc::Status& status) {
    if (finished_ || !started_) return;
    finished_ = true;
    const grpc::StatusCode code = status.error_code();
    metrics_->duration->Observe(SecondsSince(start_));
    state_->metrics.Requests(*metrics_, code).Increment();
    if (span_.IsRecording()) {
      span_.SetAttribute(kStatusCodeAttribute, static_cast<int64_t>(code));
      if (code != grpc::StatusCode::OK) {
        span_.SetStatus(SpanStatusCode::kError, status.error_message());
      }
      span_.End();
    }
  }

  const std::shared_ptr<SideState> state_;
  const char* const method_;  // gRPC's; lives as long as the call
  MethodState* metrics_ = nullptr;
  std::chrono::steady_clock::time_point start_;
  bool started_ = false;
  bool finished_ = false;
  Span span_;
};

class ClientTelemetryInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  ClientTelemetryInterceptorFactory(Tracer* tracer, prometheus::Registry& registry)
      : state_(std::make_shared<SideState>(tracer, registry, "client")) {}

  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new ClientTelemetryInterceptor(state_, info);
  }

 private:
  const std::shared_ptr<SideState> state_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeServerTelemetryInterceptorFactory(Tracer& tracer, prometheus::Registry& registry) {
  return std::make_unique<ServerTelemetryInterceptorFactory>(&tracer, registry);
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeServerTelemetryInterceptorFactory() {
  return std::make_unique<ServerTelemetryInterceptorFactory>(nullptr, MetricsRegistry());
}

std::optional<SpanContext> ServerSpanContext(const grpc::ServerContextBase* context) {
  if (context == nullptr) return std::nullopt;
  return ServerSpans().Get(context);
}

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeClientTelemetryInterceptorFactory(Tracer& tracer, prometheus::Registry& registry) {
  return std::make_unique<ClientTelemetryInterceptorFactory>(&tracer, registry);
}

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeClientTelemetryInterceptorFactory() {
  return std::make_unique<ClientTelemetryInterceptorFactory>(nullptr, MetricsRegistry());
}

void SetParentSpan(grpc::ClientContext& context, const SpanContext& parent) {
  if (!parent.IsValid()) return;
  context.AddMetadata(kTraceparentHeader, FormatTraceparent(parent));
  if (!parent.tracestate.empty()) context.AddMetadata(kTracestateHeader, parent.tracestate);
}

std::shared_ptr<grpc::Channel> CreateTracedChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args) {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(MakeClientTelemetryInterceptorFactory());
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                                 std::move(factories));
}

std::shared_ptr<grpc::Channel> CreateTracedChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args, Tracer& tracer, prometheus::Registry& registry) {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(MakeClientTelemetryInterceptorFactory(tracer, registry));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                                 std::move(factories));
}

}  // namespace montage::telemetry
