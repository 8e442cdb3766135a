#include "common/status.h"

#include "gmock/gmock.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"

namespace montage {
namespace {

TEST(StatusTest, OkMapsToOk) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

TEST(StatusTest, CodesAndMessagesSurviveTheRoundTrip) {
  absl::Status in = absl::NotFoundError("no such key");
  grpc::Status wire = ToGrpcStatus(in);
  EXPECT_EQ(wire.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(wire.error_message(), "no such key");
  EXPECT_TRUE(wire.error_details().empty());
  absl::Status out = FromGrpcStatus(wire);
  EXPECT_EQ(out, in);
}

TEST(StatusTest, FieldViolationTravelsAsBadRequestDetail) {
  absl::Status in = InvalidFieldError("key", "must not be empty");
  EXPECT_EQ(in.message(), "key: must not be empty");
  grpc::Status wire = ToGrpcStatus(in);
  ASSERT_EQ(wire.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  google::rpc::Status rpc;
  ASSERT_TRUE(rpc.ParseFromString(wire.error_details()));
  EXPECT_EQ(rpc.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  ASSERT_EQ(rpc.details_size(), 1);
  google::rpc::BadRequest bad_request;
  ASSERT_TRUE(rpc.details(0).UnpackTo(&bad_request));
  ASSERT_EQ(bad_request.field_violations_size(), 1);
  EXPECT_EQ(bad_request.field_violations(0).field(), "key");

  absl::Status back = FromGrpcStatus(wire);
  EXPECT_EQ(back.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(back.GetPayload("type.googleapis.com/google.rpc.BadRequest").has_value());
}

TEST(StatusTest, ErrorInfoIsAttached) {
  absl::Status s = absl::FailedPreconditionError("provider rejected the key");
  AttachErrorInfo(s, "PROVIDER_AUTH", "generation.montage.dev", {{"provider", "openai"}});
  google::rpc::Status rpc = ToRpcStatus(s);
  ASSERT_EQ(rpc.details_size(), 1);
  google::rpc::ErrorInfo info;
  ASSERT_TRUE(rpc.details(0).UnpackTo(&info));
  EXPECT_EQ(info.reason(), "PROVIDER_AUTH");
  EXPECT_EQ(info.metadata().at("provider"), "openai");
}

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::StatusOr<int> Quarter(int x) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(StatusTest, Macros) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), absl::StatusCode::kInvalidArgument);
  auto f = [](bool fail) -> absl::Status {
    RETURN_IF_ERROR(fail ? absl::InternalError("x") : absl::OkStatus());
    return absl::OkStatus();
  };
  EXPECT_TRUE(f(false).ok());
  EXPECT_EQ(f(true).code(), absl::StatusCode::kInternal);
}

TEST(StatusTest, CodeNames) {
  EXPECT_EQ(GrpcCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
  EXPECT_EQ(GrpcCodeName(grpc::StatusCode::OK), "OK");
}

}  // namespace
}  // namespace montage
