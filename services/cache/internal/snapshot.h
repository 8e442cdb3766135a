// The cache's snapshot file format and the code that writes and reads it. Internal to the cache
// engine: callers use CacheEngine::SaveSnapshot / LoadSnapshot.
//
// Layout (integers little-endian):
//
//   header   "MONTAGEC" (8 bytes) | u32 version (= 1) | u32 flags (= 0, reserved)
//   record*  u32 ns_len | ns | u32 key_len | key | u32 value_len | value
//            | i64 expire (unix nanos; kNeverExpires when the entry never expires)
//            | i64 update (unix nanos)
//   trailer  u64 record count | u32 CRC-32 (zlib) of every byte before it
//
// Records need no count up front, so the writer streams them; the trailer ends the file.
#ifndef MONTAGE_SERVICES_CACHE_INTERNAL_SNAPSHOT_H_
#define MONTAGE_SERVICES_CACHE_INTERNAL_SNAPSHOT_H_

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace montage::cache::internal {

inline constexpr absl::string_view kSnapshotMagic = "MONTAGEC";
inline constexpr uint32_t kSnapshotVersion = 1;
inline constexpr int64_t kNeverExpires = std::numeric_limits<int64_t>::max();

// One entry as stored. The views point into the writer's caller or the reader's buffer.
struct SnapshotRecord {
  absl::string_view ns;
  absl::string_view key;
  absl::string_view value;
  // absl::InfiniteFuture() when the entry never expires.
  absl::Time expire_time = absl::InfiniteFuture();
  absl::Time update_time;
};

// What a record may hold; longer fields make the file DATA_LOSS.
struct SnapshotLimits {
  uint64_t max_namespace_bytes = 64;
  uint64_t max_key_bytes = 1024;
  uint64_t max_value_bytes = 4ull << 20;
};

// Owns a file descriptor and closes it once.
class ScopedFd {
 public:
  explicit ScopedFd(int fd = -1) : fd_(fd) {}
  ~ScopedFd();
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  ScopedFd& operator=(ScopedFd&& other) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Closes now and reports the error close(2) gives (it can surface a failed delayed write).
  absl::Status Close(absl::string_view what);

 private:
  int fd_;
};

// Writes `path` atomically: records go to `path + ".tmp"`, and Commit() fsyncs it, renames it over
// `path` and fsyncs the directory. A writer destroyed before Commit() removes the temp file, so a
// failed save never touches an existing `path`. Not thread-safe.
class SnapshotWriter {
 public:
  static absl::StatusOr<std::unique_ptr<SnapshotWriter>> Create(const std::string& path);
  ~SnapshotWriter();
  SnapshotWriter(const SnapshotWriter&) = delete;
  SnapshotWriter& operator=(const SnapshotWriter&) = delete;

  absl::Status Append(const SnapshotRecord& record);
  absl::Status Commit();

  uint64_t records() const { return records_; }

 private:
  SnapshotWriter(std::string path, ScopedFd fd);
  absl::Status Flush();

  const std::string path_;
  const std::string tmp_path_;
  ScopedFd fd_;
  std::string buffer_;
  unsigned long crc_;
  uint64_t records_ = 0;
  bool committed_ = false;
};

// Reads a whole snapshot into memory and verifies it (magic, version, checksum, every length
// against the remaining bytes and `limits`, the record count) before exposing any record. A
// missing file is NOT_FOUND; anything malformed is DATA_LOSS naming the file and the defect.
// Immutable after Open(), so thread-compatible.
class SnapshotReader {
 public:
  static absl::StatusOr<std::unique_ptr<SnapshotReader>> Open(const std::string& path,
                                                              const SnapshotLimits& limits);
  SnapshotReader(const SnapshotReader&) = delete;
  SnapshotReader& operator=(const SnapshotReader&) = delete;

  // Views into this reader's buffer, in file order.
  const std::vector<SnapshotRecord>& records() const { return records_; }

 private:
  SnapshotReader() = default;
  absl::Status Parse(const std::string& path, const SnapshotLimits& limits);

  std::string data_;
  std::vector<SnapshotRecord> records_;
};

}  // namespace montage::cache::internal

#endif  // MONTAGE_SERVICES_CACHE_INTERNAL_SNAPSHOT_H_
