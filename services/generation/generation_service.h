// The generation service's registration entry point. Until the real service is built, every method
// answers UNIMPLEMENTED naming what is missing (the generation service (LLM providers, prompt
// catalogue, streaming, campaigns) arrives with issue #4), while health and reflection already
// report the service so clients and the gateway can be written against its API.
#ifndef MONTAGE_SERVICES_GENERATION_GENERATION_SERVICE_H_
#define MONTAGE_SERVICES_GENERATION_GENERATION_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::generation {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGenerationModule(ServiceContext& context);

}  // namespace montage::generation

#endif  // MONTAGE_SERVICES_GENERATION_GENERATION_SERVICE_H_
