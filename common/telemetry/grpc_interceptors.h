// Telemetry for every gRPC call, as interceptors: a span per call (SERVER on the receiving side,
// CLIENT on the sending side) joined across processes through traceparent/B3 metadata, and
// Prometheus metrics per method.
//
// Server metrics:
//   montage_grpc_server_requests_total{method, code}        code as in "OK", "INVALID_ARGUMENT"
//   montage_grpc_server_request_duration_seconds{method}    histogram, 100 µs .. 300 s
//   montage_grpc_server_in_flight{method}
// Client metrics:
//   montage_grpc_client_requests_total{method, code}
//   montage_grpc_client_request_duration_seconds{method}
//
// Installing on a server (works with callback, async and sync services alike):
//   std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> f;
//   f.push_back(telemetry::MakeServerTelemetryInterceptorFactory());
//   builder.experimental().SetInterceptorCreators(std::move(f));
// A handler finds its call's span with ServerSpanContext(context) and passes it on to outgoing
// calls with SetParentSpan(client_context, span_context) on a channel from CreateTracedChannel.
#ifndef MONTAGE_COMMON_TELEMETRY_GRPC_INTERCEPTORS_H_
#define MONTAGE_COMMON_TELEMETRY_GRPC_INTERCEPTORS_H_

#include <memory>
#include <optional>
#include <string>

#include "common/telemetry/trace_context.h"
#include "common/telemetry/tracer.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/channel_arguments.h"
#include "grpcpp/support/client_interceptor.h"
#include "grpcpp/support/server_interceptor.h"

namespace prometheus {
class Registry;
}

namespace montage::telemetry {

// For every call: extracts the caller's trace context from the client metadata (traceparent,
// else b3, else x-b3-*), starts a SERVER span named after the method
// ("/montage.cache.v1.CacheService/Get") with rpc.system/rpc.service/rpc.method attributes, ends
// it with rpc.grpc.status_code when the status is sent, and records the server metrics above.
// `tracer` and `registry` must outlive the server. The factory is thread-safe.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeServerTelemetryInterceptorFactory(Tracer& tracer, prometheus::Registry& registry);
// Same with GlobalTracer() (looked up per call, so ConfigureGlobalTracer may come later) and
// MetricsRegistry().
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeServerTelemetryInterceptorFactory();

// The span context of the call that `context` belongs to, when the call passes through a
// telemetry server interceptor. Available from the moment the handler is invoked until the
// call's context is destroyed (after OnDone); nullopt otherwise. Thread-safe; a hash lookup.
std::optional<SpanContext> ServerSpanContext(const grpc::ServerContextBase* context);

// For every call: starts a CLIENT span named after the method, child of the context the caller
// set with SetParentSpan (or of a traceparent/b3 the caller put in the metadata itself; else a
// new trace), replaces those headers with the CLIENT span's traceparent and x-b3-* metadata,
// ends the span when the status arrives and records the client metrics above. `tracer` and
// `registry` must outlive every channel using the factory. The factory is thread-safe.
std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeClientTelemetryInterceptorFactory(Tracer& tracer, prometheus::Registry& registry);
// Same with GlobalTracer() (looked up per call) and MetricsRegistry().
std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeClientTelemetryInterceptorFactory();

// Makes `parent` the parent of the CLIENT span of the call made with `context` (call once,
// before the call starts). It travels as traceparent/tracestate metadata, so even a channel
// without the telemetry interceptor propagates the trace.
void SetParentSpan(grpc::ClientContext& context, const SpanContext& parent);

// A channel whose calls carry the client telemetry interceptor (global tracer and registry).
std::shared_ptr<grpc::Channel> CreateTracedChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args);
// Same with an explicit tracer and registry (tests, or processes with several tracers).
std::shared_ptr<grpc::Channel> CreateTracedChannel(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args, Tracer& tracer, prometheus::Registry& registry);

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_GRPC_INTERCEPTORS_H_
