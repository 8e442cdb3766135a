// The process-wide Prometheus registry and its text exposition. Every component registers its
// metric families here (or in a registry it is handed, in tests), and the admin server serves
// RenderPrometheusText() at /stats/prometheus.
#ifndef MONTAGE_COMMON_TELEMETRY_METRICS_H_
#define MONTAGE_COMMON_TELEMETRY_METRICS_H_

#include <string>

#include "prometheus/registry.h"

namespace montage::telemetry {

// The registry of this process. Created on first use and never destroyed, so that metrics can
// be touched from any thread at any time, exit included. prometheus::Registry is thread-safe.
prometheus::Registry& MetricsRegistry();

// Every metric of `registry` in the Prometheus text exposition format (version 0.0.4).
std::string RenderPrometheusText(const prometheus::Registry& registry);

// Same, for MetricsRegistry().
std::string RenderPrometheusText();

// Content-Type of RenderPrometheusText() for HTTP responses.
inline constexpr char kPrometheusTextContentType[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_METRICS_H_
