// Tracer options from the tracing section of the config file (montage.config.v1.TracingConfig).
#ifndef MONTAGE_COMMON_TELEMETRY_CONFIG_H_
#define MONTAGE_COMMON_TELEMETRY_CONFIG_H_

#include "absl/status/statusor.h"
#include "common/telemetry/tracer.h"
#include "montage/config/v1/config.pb.h"

namespace montage::telemetry {

// Unset (zero) fields take TracerOptions' defaults, except sample_ratio, where 0 is a real
// choice (sample no new traces). The result is validated: INVALID_ARGUMENT names the field.
absl::StatusOr<TracerOptions> TracerOptionsFromConfig(const config::v1::TracingConfig& config,
                                                      std::string service_name);

}  // namespace montage::telemetry

#endif  // MONTAGE_COMMON_TELEMETRY_CONFIG_H_
