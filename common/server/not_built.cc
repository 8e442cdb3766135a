#include "common/server/not_built.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace montage {

grpc::Status NotBuiltStatus(absl::string_view method, absl::string_view arrives_with) {
  absl::Status status =
      absl::UnimplementedError(absl::StrCat(method, " is not built yet: ", arrives_with));
  AttachErrorInfo(status, "NOT_BUILT_YET", "montage.dev", {{"method", method}});
  return ToGrpcStatus(status);
}

namespace {

class StubModule final : public ServiceModule {
 public:
  StubModule(std::unique_ptr<grpc::Service> service, std::string health_name)
      : service_(std::move(service)), health_name_(std::move(health_name)) {}
  std::vector<grpc::Service*> GrpcServices() override { return {service_.get()}; }
  std::vector<std::string> HealthNames() const override { return {health_name_}; }

 private:
  std::unique_ptr<grpc::Service> service_;
  std::string health_name_;
};

}  // namespace

std::unique_ptr<ServiceModule> MakeStubModule(std::unique_ptr<grpc::Service> service,
                                              std::string health_name) {
  return std::make_unique<StubModule>(std::move(service), std::move(health_name));
}

}  // namespace montage
