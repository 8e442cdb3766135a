#include "gateway/gateway_service.h"

#include "common/server/not_built.h"
#include "montage/gateway/v1/batch.grpc.pb.h"

namespace montage::gateway {
namespace {

constexpr absl::string_view kWhy =
    "the gateway (REST/JSON, gRPC-Web, fan-out) arrives with issue #3";

class BatchServiceStub final : public v1::BatchService::CallbackService {
 public:
  grpc::ServerUnaryReactor* Batch(grpc::CallbackServerContext* context, const v1::BatchRequest*,
                                  v1::BatchResponse*) override {
    return NotBuiltUnary(context, "montage.gateway.v1.BatchService/Batch", kWhy);
  }
  grpc::ServerWriteReactor<v1::BatchItemResult>* StreamBatch(grpc::CallbackServerContext*,
                                                             const v1::BatchRequest*) override {
    return NotBuiltStream<v1::BatchItemResult>("montage.gateway.v1.BatchService/StreamBatch", kWhy);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGatewayModule(ServiceContext&) {
  return MakeStubModule(std::make_unique<BatchServiceStub>(),
                        std::string(v1::BatchService::service_full_name()));
}

}  // namespace montage::gateway
