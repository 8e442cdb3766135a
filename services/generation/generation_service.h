// The generation service's registration entry point: the GenerationService reactors over a
// Generator (providers, prompt catalogue, cache, single-flight, campaigns), with the service's own
// HTTP client, built from the `generation` section of the config.
#ifndef MONTAGE_SERVICES_GENERATION_GENERATION_SERVICE_H_
#define MONTAGE_SERVICES_GENERATION_GENERATION_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::generation {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGenerationModule(ServiceContext& context);

}  // namespace montage::generation

#endif  // MONTAGE_SERVICES_GENERATION_GENERATION_SERVICE_H_
