#include "common/telemetry/grpc_interceptors.h"

#include <array>
#include <atomic>
#include <chrono>
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

// The metric children of one method, created on its first call and kept for the life of the
// process. The pointers are owned by the prometheus families.
struct MethodMetrics {
  prometheus::Gauge* in_flight = nullptr;  // server only
  prometheus::Histogram* duration = nullptr;
  std::array<std::atomic<prometheus::Counter*>, kNumStatusCodes> requests{};
};

// Per-method metrics of one side (server or client). Thread-safe: after a method's first call
// its lookup takes a shared lock, and each update is an atomic operation.
class RpcMetrics {
 public:
  RpcMetrics(prometheus::Registry& registry, const std::string& side, bool with_in_flight)
      : requests_(prometheus::BuildCounter()
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

  MethodMetrics& ForMethod(const std::string& method) {
    {
      absl::ReaderMutexLock lock(&mu_);
      if (auto it = methods_.find(method); it != methods_.end()) return *it->second;
    }
    absl::MutexLock lock(&mu_);
    auto& slot = methods_[method];
    if (slot == nullptr) {
      slot = std::make_unique<MethodMetrics>();
      slot->duration = &duration_.Add({{"method", method}}, DurationBuckets());
      if (in_flight_ != nullptr) slot->in_flight = &in_flight_->Add({{"method", method}});
    }
    return *slot;
  }

  // Counters per code are created on first use so that the exposition lists only codes seen.
  prometheus::Counter& Requests(MethodMetrics& metrics, const std::string& method,
                                grpc::StatusCode code) {
    int index = static_cast<int>(code);
    if (index < 0 || index >= kNumStatusCodes) index = static_cast<int>(grpc::StatusCode::UNKNOWN);
    std::atomic<prometheus::Counter*>& slot = metrics.requests[index];
    prometheus::Counter* counter = slot.load(std::memory_order_acquire);
    if (counter == nullptr) {
      // Family::Add returns the existing child for equal labels, so a race is harmless.
      counter = &requests_.Add(
          {{"method", method},
           {"code", std::string(GrpcCodeName(static_cast<grpc::StatusCode>(index)))}});
      slot.store(counter, std::memory_order_release);
    }
    return *counter;
  }

 private:
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Gauge>* const in_flight_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<MethodMetrics>> methods_ ABSL_GUARDED_BY(mu_);
};

// "/pkg.Service/Method" -> ("pkg.Service", "Method").
std::pair<absl::string_view, absl::string_view> SplitMethod(absl::string_view full) {
  if (!full.empty() && full.front() == '/') full.remove_prefix(1);
  const size_t slash = full.rfind('/');
  if (slash == absl::string_view::npos) return {absl::string_view(), full};
  return {full.substr(0, slash), full.substr(slash + 1)};
}

void SetRpcAttributes(Span& span, absl::string_view method) {
  if (!span.IsRecording()) return;
  const auto [service, name] = SplitMethod(method);
  span.SetAttribute("rpc.system", "grpc");
  span.SetAttribute("rpc.service", service);
  span.SetAttribute("rpc.method", name);
}

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

// ----------------------------------------------------------------------------------------------
// Span contexts of server calls in progress, keyed by their ServerContext. Entries carry their
// interceptor as owner: a context's memory may be reused by a new call before the old
// interceptor is destroyed, and the old one must not erase the new entry.

class ServerSpanTable {
 public:
  void Put(const grpc::ServerContextBase* context, const void* owner, const SpanContext& span) {
    Shard& shard = ShardFor(context);
    absl::MutexLock lock(&shard.mu);
    shard.entries.insert_or_assign(context, Entry{owner, span});
  }

  void Erase(const grpc::ServerContextBase* context, const void* owner) {
    Shard& shard = ShardFor(context);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.entries.find(context);
    if (it != shard.entries.end() && it->second.owner == owner) shard.entries.erase(it);
  }

  std::optional<SpanContext> Get(const grpc::ServerContextBase* context) {
    Shard& shard = ShardFor(context);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.entries.find(context);
    if (it == shard.entries.end()) return std::nullopt;
    return it->second.span;
  }

 private:
  struct Entry {
    const void* owner;
    SpanContext span;
  };
  struct Shard {
    absl::Mutex mu;
    absl::flat_hash_map<const grpc::ServerContextBase*, Entry> entries ABSL_GUARDED_BY(mu);
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
        method_(info->method() != nullptr ? info->method() : "unknown"),
        metrics_(state_->metrics.ForMethod(method_)),
        start_(std::chrono::steady_clock::now()) {
    metrics_.in_flight->Increment();
  }

  ~ServerTelemetryInterceptor() override {
    // No status was ever sent (the call was torn down): count it as cancelled.
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call ended without a status"));
    ServerSpans().Erase(context_, this);
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
    if (metadata != nullptr) {
      parent = Extract([metadata](absl::string_view name) -> std::optional<absl::string_view> {
        auto it = metadata->find(grpc::string_ref(name.data(), name.size()));
        if (it == metadata->end()) return std::nullopt;
        return absl::string_view(it->second.data(), it->second.size());
      });
    }
    span_ = state_->tracer_for_call().StartSpan(method_, SpanKind::kServer, parent);
    SetRpcAttributes(span_, method_);
    if (context_ != nullptr) ServerSpans().Put(context_, this, span_.context());
  }

  void Finish(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    const grpc::StatusCode code = status.error_code();
    metrics_.in_flight->Decrement();
    metrics_.duration->Observe(SecondsSince(start_));
    state_->metrics.Requests(metrics_, method_, code).Increment();
    if (span_.IsRecording()) {
      span_.SetAttribute("rpc.grpc.status_code", static_cast<int64_t>(code));
      if (IsServerError(code)) span_.SetStatus(SpanStatusCode::kError, status.error_message());
      span_.End();
    }
  }

  const std::shared_ptr<SideState> state_;
  const grpc::ServerContextBase* const context_;
  const std::string method_;
  MethodMetrics& metrics_;
  const std::chrono::steady_clock::time_point start_;
  bool started_ = false;
  bool finished_ = false;
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
      : state_(std::move(state)), method_(info->method() != nullptr ? info->method() : "unknown") {}

  ~ClientTelemetryInterceptor() override {
    if (started_) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call ended without a status"));
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
    span_ = state_->tracer_for_call().StartSpan(method_, SpanKind::kClient, parent);
    SetRpcAttributes(span_, method_);
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
    state_->metrics.Requests(*metrics_, method_, code).Increment();
    if (span_.IsRecording()) {
      span_.SetAttribute("rpc.grpc.status_code", static_cast<int64_t>(code));
      if (code != grpc::StatusCode::OK) {
        span_.SetStatus(SpanStatusCode::kError, status.error_message());
      }
      span_.End();
    }
  }

  const std::shared_ptr<SideState> state_;
  const std::string method_;
  MethodMetrics* metrics_ = nullptr;
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
