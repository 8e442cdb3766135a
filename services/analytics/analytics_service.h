// The analytics service's registration entry point. Until the real service is built, every method
// answers UNIMPLEMENTED naming what is missing (the analytics service (YouTube adapters, safe
// fetching, keyword and competitor analysis) is on the roadmap after the first wave), while health
// and reflection already report the service so clients and the gateway can be written against its
// API.
#ifndef MONTAGE_SERVICES_ANALYTICS_ANALYTICS_SERVICE_H_
#define MONTAGE_SERVICES_ANALYTICS_ANALYTICS_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::analytics {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewAnalyticsModule(ServiceContext& context);

}  // namespace montage::analytics

#endif  // MONTAGE_SERVICES_ANALYTICS_ANALYTICS_SERVICE_H_
