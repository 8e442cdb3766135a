#include "services/generation/generation_service.h"

#include "common/server/not_built.h"
#include "montage/generation/v1/generation.grpc.pb.h"

namespace montage::generation {
namespace {

constexpr absl::string_view kWhy =
    "the generation service (LLM providers, prompt catalogue, streaming, campaigns) arrives with "
    "issue #4";

class GenerationServiceStub final : public v1::GenerationService::CallbackService {
 public:
  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const v1::GenerateRequest*, v1::GenerateResponse*) override {
    return NotBuiltUnary(context, "montage.generation.v1.GenerationService/Generate", kWhy);
  }
  grpc::ServerWriteReactor<v1::GenerateEvent>* StreamGenerate(grpc::CallbackServerContext*,
                                                              const v1::GenerateRequest*) override {
    return NotBuiltStream<v1::GenerateEvent>(
        "montage.generation.v1.GenerationService/StreamGenerate", kWhy);
  }
  grpc::ServerWriteReactor<v1::CampaignEvent>* GenerateCampaign(
      grpc::CallbackServerContext*, const v1::GenerateCampaignRequest*) override {
    return NotBuiltStream<v1::CampaignEvent>(
        "montage.generation.v1.GenerationService/GenerateCampaign", kWhy);
  }
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest*,
                                       v1::ListModelsResponse*) override {
    return NotBuiltUnary(context, "montage.generation.v1.GenerationService/ListModels", kWhy);
  }
  grpc::ServerUnaryReactor* ListTemplates(grpc::CallbackServerContext* context,
                                          const v1::ListTemplatesRequest*,
                                          v1::ListTemplatesResponse*) override {
    return NotBuiltUnary(context, "montage.generation.v1.GenerationService/ListTemplates", kWhy);
  }
  grpc::ServerUnaryReactor* GetTemplate(grpc::CallbackServerContext* context,
                                        const v1::GetTemplateRequest*, v1::Template*) override {
    return NotBuiltUnary(context, "montage.generation.v1.GenerationService/GetTemplate", kWhy);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGenerationModule(ServiceContext&) {
  return MakeStubModule(std::make_unique<GenerationServiceStub>(),
                        std::string(v1::GenerationService::service_full_name()));
}

}  // namespace montage::generation
