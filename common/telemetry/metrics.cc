#include "common/telemetry/metrics.h"

#include "prometheus/text_serializer.h"

namespace montage::telemetry {

prometheus::Registry& MetricsRegistry() {
  // Leaked on purpose: metrics may be updated by threads that outlive static destruction.
  static prometheus::Registry* const registry = new prometheus::Registry();
  return *registry;
}

std::string RenderPrometheusText(const prometheus::Registry& registry) {
  return prometheus::TextSerializer().Serialize(registry.Collect());
}

std::string RenderPrometheusText() { return RenderPrometheusText(MetricsRegistry()); }

}  // namespace montage::telemetry
