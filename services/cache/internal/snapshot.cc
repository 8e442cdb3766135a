#include "services/cache/internal/snapshot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace montage::cache::internal {
namespace {

constexpr size_t kHeaderBytes = 8 + 4 + 4;
constexpr size_t kTrailerBytes = 8 + 4;
constexpr size_t kFlushBytes = 1 << 20;

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void PutU64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i)
    v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

unsigned long Crc32(unsigned long crc, absl::string_view bytes) {
  return crc32_z(crc, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size());
}

int64_t ToNanos(absl::Time t) {
  return t == absl::InfiniteFuture() ? kNeverExpires : absl::ToUnixNanos(t);
}

absl::Time FromNanos(int64_t nanos) {
  return nanos == kNeverExpires ? absl::InfiniteFuture() : absl::FromUnixNanos(nanos);
}

absl::Status WriteAll(int fd, absl::string_view bytes, const std::string& path) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("writing snapshot file \"", path, "\""));
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Walks the record area of a snapshot; every read is checked against what is left.
class Cursor {
 public:
  Cursor(absl::string_view bytes) : rest_(bytes) {}
  bool done() const { return rest_.empty(); }
  size_t left() const { return rest_.size(); }

  bool ReadU32(uint32_t& v) {
    if (rest_.size() < 4) return false;
    v = GetU32(rest_.data());
    rest_.remove_prefix(4);
    return true;
  }
  bool ReadI64(int64_t& v) {
    if (rest_.size() < 8) return false;
    v = static_cast<int64_t>(GetU64(rest_.data()));
    rest_.remove_prefix(8);
    return true;
  }
  absl::string_view Take(size_t n) {
    absl::string_view out = rest_.substr(0, n);
    rest_.remove_prefix(n);
    return out;
  }

 private:
  absl::string_view rest_;
};

}  // namespace

ScopedFd::~ScopedFd() {
  if (fd_ >= 0) ::close(fd_);
}

ScopedFd& ScopedFd::operator=(ScopedFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

absl::Status ScopedFd::Close(absl::string_view what) {
  const int fd = std::exchange(fd_, -1);
  // Linux releases the descriptor even when close fails, so it is never retried.
  if (fd >= 0 && ::close(fd) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("closing ", what));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SnapshotWriter>> SnapshotWriter::Create(const std::string& path) {
  const std::string tmp_path = path + ".tmp";
  ScopedFd fd(::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) {
    return absl::ErrnoToStatus(errno,
                               absl::StrCat("cannot create snapshot file \"", tmp_path, "\""));
  }
  return std::unique_ptr<SnapshotWriter>(new SnapshotWriter(path, std::move(fd)));
}

SnapshotWriter::SnapshotWriter(std::string path, ScopedFd fd)
    : path_(std::move(path)), tmp_path_(path_ + ".tmp"), fd_(std::move(fd)), crc_(Crc32(0, "")) {
  buffer_.append(kSnapshotMagic.data(), kSnapshotMagic.size());
  PutU32(buffer_, kSnapshotVersion);
  PutU32(buffer_, 0);
}

SnapshotWriter::~SnapshotWriter() {
  if (!committed_) {
    fd_.Close(tmp_path_).IgnoreError();
    ::unlink(tmp_path_.c_str());
  }
}

absl::Status SnapshotWriter::Append(const SnapshotRecord& record) {
  if (committed_) return absl::FailedPreconditionError("snapshot already committed");
  for (absl::string_view field : {record.ns, record.key, record.value}) {
    if (field.size() > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError("snapshot field longer than 4 GiB");
    }
  }
  for (absl::string_view field : {record.ns, record.key, record.value}) {
    PutU32(buffer_, static_cast<uint32_t>(field.size()));
    buffer_.append(field.data(), field.size());
  }
  PutU64(buffer_, static_cast<uint64_t>(ToNanos(record.expire_time)));
  PutU64(buffer_, static_cast<uint64_t>(ToNanos(record.update_time)));
  ++records_;
  if (buffer_.size() >= kFlushBytes) return Flush();
  return absl::OkStatus();
}

absl::Status SnapshotWriter::Flush() {
  crc_ = Crc32(crc_, buffer_);
  absl::Status status = WriteAll(fd_.get(), buffer_, tmp_path_);
  buffer_.clear();
  return status;
}

absl::Status SnapshotWriter::Commit() {
  if (committed_) return absl::FailedPreconditionError("snapshot already committed");
  PutU64(buffer_, records_);
  RETURN_IF_ERROR(Flush());
  std::string crc;
  PutU32(crc, static_cast<uint32_t>(crc_));
  RETURN_IF_ERROR(WriteAll(fd_.get(), crc, tmp_path_));
  if (::fsync(fd_.get()) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("fsync of \"", tmp_path_, "\""));
  }
  RETURN_IF_ERROR(fd_.Close(tmp_path_));
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    return absl::ErrnoToStatus(errno,
                               absl::StrCat("renaming \"", tmp_path_, "\" to \"", path_, "\""));
  }
  committed_ = true;
  // The rename is durable only once the directory entry is.
  const std::string dir = DirectoryOf(path_);
  ScopedFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd.valid() || ::fsync(dir_fd.get()) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("fsync of directory \"", dir, "\""));
  }
  return dir_fd.Close(dir);
}

absl::StatusOr<std::unique_ptr<SnapshotReader>> SnapshotReader::Open(const std::string& path,
                                                                     const SnapshotLimits& limits) {
  ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("snapshot file \"", path, "\" does not exist"));
    }
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open snapshot file \"", path, "\""));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot stat snapshot file \"", path, "\""));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("snapshot file \"", path, "\" is not a regular file"));
  }
  std::unique_ptr<SnapshotReader> reader(new SnapshotReader());
  // The buffer is as large as the file really is, never as large as a field claims.
  reader->data_.resize(static_cast<size_t>(st.st_size));
  size_t filled = 0;
  while (filled < reader->data_.size()) {
    const ssize_t n =
        ::read(fd.get(), reader->data_.data() + filled, reader->data_.size() - filled);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("reading snapshot file \"", path, "\""));
    }
    if (n == 0) break;  // The file shrank since fstat; what was read is the file.
    filled += static_cast<size_t>(n);
  }
  reader->data_.resize(filled);
  RETURN_IF_ERROR(reader->Parse(path, limits));
  return reader;
}

absl::Status SnapshotReader::Parse(const std::string& path, const SnapshotLimits& limits) {
  const auto corrupt = [&path](auto&&... what) {
    return absl::DataLossError(absl::StrCat("snapshot file \"", path, "\" ", what...));
  };
  const absl::string_view data = data_;
  if (data.empty()) return corrupt("is empty");
  if (data.size() < kSnapshotMagic.size() ||
      data.substr(0, kSnapshotMagic.size()) != kSnapshotMagic) {
    return corrupt("does not start with \"", kSnapshotMagic, "\": not a cache snapshot");
  }
  if (data.size() < kHeaderBytes + kTrailerBytes) {
    return corrupt("is truncated: ", data.size(), " bytes, less than a header and trailer (",
                   kHeaderBytes + kTrailerBytes, ")");
  }
  const uint32_t version = GetU32(data.data() + kSnapshotMagic.size());
  if (version != kSnapshotVersion) {
    return corrupt("has unsupported version ", version, " (this build reads ", kSnapshotVersion,
                   ")");
  }
  if (GetU32(data.data() + kSnapshotMagic.size() + 4) != 0) return corrupt("has unknown flags");
  const uint32_t stored_crc = GetU32(data.data() + data.size() - 4);
  const uint32_t computed_crc =
      static_cast<uint32_t>(Crc32(Crc32(0, ""), data.substr(0, data.size() - 4)));
  if (stored_crc != computed_crc) {
    return corrupt("fails its checksum (stored ", absl::Hex(stored_crc, absl::kZeroPad8),
                   ", computed ", absl::Hex(computed_crc, absl::kZeroPad8),
                   "): it is truncated or corrupt");
  }
  const uint64_t expected_records = GetU64(data.data() + data.size() - kTrailerBytes);

  // The checksum catches accidents, not crafted files: every length is still checked.
  Cursor cursor(data.substr(kHeaderBytes, data.size() - kHeaderBytes - kTrailerBytes));
  std::vector<SnapshotRecord> records;
  while (!cursor.done()) {
    const uint64_t index = records.size();
    SnapshotRecord record;
    struct Field {
      absl::string_view name;
      absl::string_view* out;
      uint64_t min;
      uint64_t max;
    };
    for (const Field& field : {Field{"namespace", &record.ns, 1, limits.max_namespace_bytes},
                               Field{"key", &record.key, 1, limits.max_key_bytes},
                               Field{"value", &record.value, 0, limits.max_value_bytes}}) {
      uint32_t length = 0;
      if (!cursor.ReadU32(length)) {
        return corrupt("record ", index, " is cut off before its ", field.name, " length");
      }
      if (length < field.min || length > field.max) {
        return corrupt("record ", index, " has a ", field.name, " of ", length, " bytes, outside [",
                       field.min, ", ", field.max, "]");
      }
      if (length > cursor.left()) {
        return corrupt("record ", index, " has a ", field.name, " of ", length, " bytes but only ",
                       cursor.left(), " bytes of records remain");
      }
      *field.out = cursor.Take(length);
    }
    int64_t expire_nanos = 0;
    int64_t update_nanos = 0;
    if (!cursor.ReadI64(expire_nanos) || !cursor.ReadI64(update_nanos)) {
      return corrupt("record ", index, " is cut off in its timestamps");
    }
    record.expire_time = FromNanos(expire_nanos);
    record.update_time = absl::FromUnixNanos(update_nanos);
    records.push_back(record);
  }
  if (records.size() != expected_records) {
    return corrupt("holds ", records.size(), " records but its trailer says ", expected_records);
  }
  records_ = std::move(records);
  return absl::OkStatus();
}

}  // namespace montage::cache::internal
