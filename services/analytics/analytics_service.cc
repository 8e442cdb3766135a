#include "services/analytics/analytics_service.h"

#include "common/server/not_built.h"
#include "montage/analytics/v1/analytics.grpc.pb.h"

namespace montage::analytics {
namespace {

constexpr absl::string_view kWhy =
    "the analytics service (YouTube adapters, safe fetching, keyword and competitor analysis) is "
    "on the roadmap after the first wave";

class AnalyticsServiceStub final : public v1::AnalyticsService::CallbackService {
 public:
  grpc::ServerUnaryReactor* GetChannel(grpc::CallbackServerContext* context,
                                       const v1::GetChannelRequest*, v1::Channel*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/GetChannel", kWhy);
  }
  grpc::ServerUnaryReactor* ListChannelVideos(grpc::CallbackServerContext* context,
                                              const v1::ListChannelVideosRequest*,
                                              v1::ListChannelVideosResponse*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/ListChannelVideos", kWhy);
  }
  grpc::ServerUnaryReactor* GetVideo(grpc::CallbackServerContext* context,
                                     const v1::GetVideoRequest*, v1::VideoReport*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/GetVideo", kWhy);
  }
  grpc::ServerUnaryReactor* ResearchKeyword(grpc::CallbackServerContext* context,
                                            const v1::ResearchKeywordRequest*,
                                            v1::KeywordReport*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/ResearchKeyword", kWhy);
  }
  grpc::ServerUnaryReactor* AnalyzeCompetitors(grpc::CallbackServerContext* context,
                                               const v1::AnalyzeCompetitorsRequest*,
                                               v1::CompetitorReport*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/AnalyzeCompetitors", kWhy);
  }
  grpc::ServerUnaryReactor* FindTrends(grpc::CallbackServerContext* context,
                                       const v1::FindTrendsRequest*, v1::TrendReport*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/FindTrends", kWhy);
  }
  grpc::ServerUnaryReactor* FetchPage(grpc::CallbackServerContext* context,
                                      const v1::FetchPageRequest*, v1::PageSummary*) override {
    return NotBuiltUnary(context, "montage.analytics.v1.AnalyticsService/FetchPage", kWhy);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewAnalyticsModule(ServiceContext&) {
  return MakeStubModule(std::make_unique<AnalyticsServiceStub>(),
                        std::string(v1::AnalyticsService::service_full_name()));
}

}  // namespace montage::analytics
