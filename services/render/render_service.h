// The render service's registration entry point. Until the real service is built, every method
// answers UNIMPLEMENTED naming what is missing (the render service (timelines rendered with FFmpeg
// libraries, durable jobs) is on the roadmap after the first wave), while health and reflection
// already report the service so clients and the gateway can be written against its API.
#ifndef MONTAGE_SERVICES_RENDER_RENDER_SERVICE_H_
#define MONTAGE_SERVICES_RENDER_RENDER_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::render {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewRenderModule(ServiceContext& context);

}  // namespace montage::render

#endif  // MONTAGE_SERVICES_RENDER_RENDER_SERVICE_H_
