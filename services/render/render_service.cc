#include "services/render/render_service.h"

#include "common/server/not_built.h"
#include "montage/render/v1/render.grpc.pb.h"

namespace montage::render {
namespace {

constexpr absl::string_view kWhy =
    "the render service (timelines rendered with FFmpeg libraries, durable jobs) is on the roadmap "
    "after the first wave";

class RenderServiceStub final : public v1::RenderService::CallbackService {
 public:
  grpc::ServerUnaryReactor* CreateJob(grpc::CallbackServerContext* context,
                                      const v1::CreateJobRequest*, v1::Job*) override {
    return NotBuiltUnary(context, "montage.render.v1.RenderService/CreateJob", kWhy);
  }
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context, const v1::GetJobRequest*,
                                   v1::Job*) override {
    return NotBuiltUnary(context, "montage.render.v1.RenderService/GetJob", kWhy);
  }
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest*, v1::ListJobsResponse*) override {
    return NotBuiltUnary(context, "montage.render.v1.RenderService/ListJobs", kWhy);
  }
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest*, v1::Job*) override {
    return NotBuiltUnary(context, "montage.render.v1.RenderService/CancelJob", kWhy);
  }
  grpc::ServerWriteReactor<v1::Job>* WatchJob(grpc::CallbackServerContext*,
                                              const v1::WatchJobRequest*) override {
    return NotBuiltStream<v1::Job>("montage.render.v1.RenderService/WatchJob", kWhy);
  }
  grpc::ServerWriteReactor<::google::api::HttpBody>* DownloadOutput(
      grpc::CallbackServerContext*, const v1::DownloadOutputRequest*) override {
    return NotBuiltStream<::google::api::HttpBody>("montage.render.v1.RenderService/DownloadOutput",
                                                   kWhy);
  }
  grpc::ServerUnaryReactor* CreateThumbnail(grpc::CallbackServerContext* context,
                                            const v1::CreateThumbnailRequest*,
                                            ::google::api::HttpBody*) override {
    return NotBuiltUnary(context, "montage.render.v1.RenderService/CreateThumbnail", kWhy);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewRenderModule(ServiceContext&) {
  return MakeStubModule(std::make_unique<RenderServiceStub>(),
                        std::string(v1::RenderService::service_full_name()));
}

}  // namespace montage::render
