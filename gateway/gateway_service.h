// The gateway's registration entry point. The gateway itself (one port for REST/JSON, gRPC-Web
// and native gRPC, Envoy-compatible config, fan-out) arrives with issue #3; until then this
// module serves the gateway's own BatchService API, whose methods answer UNIMPLEMENTED.
#ifndef MONTAGE_GATEWAY_GATEWAY_SERVICE_H_
#define MONTAGE_GATEWAY_GATEWAY_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::gateway {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGatewayModule(ServiceContext& context);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_GATEWAY_SERVICE_H_
