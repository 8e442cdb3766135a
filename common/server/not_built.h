// Answers for methods whose service is not built yet: UNIMPLEMENTED with a message naming what is
// missing and a google.rpc.ErrorInfo (reason NOT_BUILT_YET), so callers and the gateway can tell
// "not yet" from "no such method". Each later issue replaces a stub service with the real one.
#ifndef MONTAGE_COMMON_SERVER_NOT_BUILT_H_
#define MONTAGE_COMMON_SERVER_NOT_BUILT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/server/service_module.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"

namespace montage {

grpc::Status NotBuiltStatus(absl::string_view method, absl::string_view arrives_with);

inline grpc::ServerUnaryReactor* NotBuiltUnary(grpc::CallbackServerContext* context,
                                               absl::string_view method,
                                               absl::string_view arrives_with) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(NotBuiltStatus(method, arrives_with));
  return reactor;
}

// A server-streaming reactor that finishes at once with the status and deletes itself.
template <typename Response>
class FinishedWriter final : public grpc::ServerWriteReactor<Response> {
 public:
  explicit FinishedWriter(grpc::Status status) { this->Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

template <typename Response>
grpc::ServerWriteReactor<Response>* NotBuiltStream(absl::string_view method,
                                                   absl::string_view arrives_with) {
  return new FinishedWriter<Response>(NotBuiltStatus(method, arrives_with));
}

// A module serving one stub service under its health name.
std::unique_ptr<ServiceModule> MakeStubModule(std::unique_ptr<grpc::Service> service,
                                              std::string health_name);

}  // namespace montage

#endif  // MONTAGE_COMMON_SERVER_NOT_BUILT_H_
