// Conversions between protobuf's Duration/Timestamp and absl's types, in one place. From-proto
// conversions saturate (absl::Duration is infinite beyond its range), so a huge value from a
// client or a config file cannot overflow.
#ifndef MONTAGE_COMMON_PROTO_TIME_H_
#define MONTAGE_COMMON_PROTO_TIME_H_

#include "absl/time/time.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "google/protobuf/util/time_util.h"

namespace montage {

inline absl::Duration FromProtoDuration(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

inline google::protobuf::Duration ToProtoDuration(absl::Duration d) {
  return google::protobuf::util::TimeUtil::NanosecondsToDuration(absl::ToInt64Nanoseconds(d));
}

inline google::protobuf::Timestamp ToProtoTimestamp(absl::Time t) {
  return google::protobuf::util::TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(t));
}

}  // namespace montage

#endif  // MONTAGE_COMMON_PROTO_TIME_H_
