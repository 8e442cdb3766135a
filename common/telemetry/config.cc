#include "common/telemetry/config.h"

#include <utility>

#include "common/proto_time.h"

namespace montage::telemetry {
namespace {}  // namespace

absl::StatusOr<TracerOptions> TracerOptionsFromConfig(const config::v1::TracingConfig& config,
                                                      std::string service_name) {
  TracerOptions options;
  if (!service_name.empty()) options.service_name = std::move(service_name);
  switch (config.exporter()) {
    case config::v1::TracingConfig::ZIPKIN:
      options.exporter = ExporterKind::kZipkin;
      break;
    case config::v1::TracingConfig::OTLP:
      options.exporter = ExporterKind::kOtlp;
      break;
    default:
      options.exporter = ExporterKind::kNone;
      break;
  }
  options.endpoint = config.endpoint();
  options.sample_ratio = config.sample_ratio();
  if (config.ring_buffer_spans() > 0) options.ring_buffer_spans = config.ring_buffer_spans();
  if (config.has_export_interval())
    options.export_interval = FromProtoDuration(config.export_interval());
  if (config.max_export_batch() > 0) options.max_export_batch = config.max_export_batch();
  if (config.max_export_queue() > 0) options.max_export_queue = config.max_export_queue();
  if (absl::Status status = ValidateTracerOptions(options); !status.ok()) return status;
  return options;
}

}  // namespace montage::telemetry
