// absl::Status is the error type of every engine; this file is the one place where it becomes a
// grpc::Status (and back). Rich details travel as absl::Status payloads keyed by their type URL
// and are sent as google.rpc.Status in the grpc-status-details-bin trailer.
#ifndef MONTAGE_COMMON_STATUS_H_
#define MONTAGE_COMMON_STATUS_H_

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/status.h"

namespace google::rpc {
class Status;
}

namespace montage {

// INVALID_ARGUMENT with a google.rpc.BadRequest naming the field, e.g.
// InvalidFieldError("key", "must not be empty").  The message reads "key: must not be empty".
absl::Status InvalidFieldError(absl::string_view field, absl::string_view description);

// Adds a google.rpc.ErrorInfo detail (reason, domain, metadata) to `status`.
void AttachErrorInfo(absl::Status& status, absl::string_view reason, absl::string_view domain,
                     std::initializer_list<std::pair<absl::string_view, absl::string_view>>
                         metadata = {});

// The google.rpc.Status form of `status`, details included.
google::rpc::Status ToRpcStatus(const absl::Status& status);

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Name of a gRPC code as in the spec ("INVALID_ARGUMENT"), for metrics labels and logs.
absl::string_view GrpcCodeName(grpc::StatusCode code);

}  // namespace montage

#define MONTAGE_STATUS_CONCAT_INNER_(a, b) a##b
#define MONTAGE_STATUS_CONCAT_(a, b) MONTAGE_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status montage_status_ = (expr);           \
    if (!montage_status_.ok()) return montage_status_; \
  } while (false)

// `ASSIGN_OR_RETURN(auto x, F());` unwraps an absl::StatusOr or returns its error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  MONTAGE_ASSIGN_OR_RETURN_IMPL_(MONTAGE_STATUS_CONCAT_(montage_statusor_, __LINE__), lhs, rexpr)
#define MONTAGE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();   \
  lhs = *std::move(statusor)

#endif  // MONTAGE_COMMON_STATUS_H_
