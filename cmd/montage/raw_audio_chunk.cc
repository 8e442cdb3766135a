#include "cmd/montage/raw_audio_chunk.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>

namespace montage::cli {
namespace {

// AudioChunk.data; every other field is small and parsed as a message.
constexpr uint32_t kAudioField = 1;
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

}  // namespace

bool RawAudioChunk::Parse(grpc::ByteBuffer& buffer) {
  Release();
  audio_bytes_ = 0;
  meta_.Clear();
  if (!buffer.Dump(&slices_).ok()) return false;
  slice_ = 0;
  offset_ = 0;
  std::string rest;  // every field but the audio, in wire format
  while (!AtEnd()) {
    const size_t field_start = rest.size();
    uint64_t tag = 0;
    if (!Varint(tag, &rest)) return false;
    const uint64_t field = tag >> 3;
    switch (static_cast<uint32_t>(tag & 7)) {
      case kVarint: {
        uint64_t value = 0;
        if (!Varint(value, &rest)) return false;
        break;
      }
      case kFixed64:
        if (!Take(8, &rest)) return false;
        break;
      case kFixed32:
        if (!Take(4, &rest)) return false;
        break;
      case kLengthDelimited: {
        uint64_t length = 0;
        if (!Varint(length, &rest)) return false;
        if (field == kAudioField) {
          rest.resize(field_start);
          // A field that comes twice is the last one, as protobuf parses it.
          audio_.clear();
          if (!Take(length, nullptr)) return false;
          audio_bytes_ = length;
        } else if (!Take(length, &rest)) {
          return false;
        }
        break;
      }
      default:
        return false;  // groups are not in this message
    }
  }
  return meta_.ParseFromString(rest);
}

bool RawAudioChunk::WriteAudio(int fd) const {
  std::vector<iovec> left = audio_;
  size_t i = 0;
  while (i < left.size()) {
    const int count = static_cast<int>(std::min<size_t>(left.size() - i, IOV_MAX));
    const ssize_t n = writev(fd, left.data() + i, count);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    size_t done = static_cast<size_t>(n);
    while (i < left.size() && done >= left[i].iov_len) done -= left[i++].iov_len;
    if (done > 0) {  // a short write ended inside this span
      left[i].iov_base = static_cast<char*>(left[i].iov_base) + done;
      left[i].iov_len -= done;
    }
  }
  return true;
}

void RawAudioChunk::Release() {
  audio_.clear();
  slices_.clear();
}

bool RawAudioChunk::AtEnd() {
  while (slice_ < slices_.size() && offset_ == slices_[slice_].size()) {
    ++slice_;
    offset_ = 0;
  }
  return slice_ == slices_.size();
}

bool RawAudioChunk::Byte(uint8_t& b, std::string* copy) {
  if (AtEnd()) return false;
  b = slices_[slice_].begin()[offset_++];
  if (copy != nullptr) copy->push_back(static_cast<char>(b));
  return true;
}

bool RawAudioChunk::Varint(uint64_t& value, std::string* copy) {
  value = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    uint8_t b = 0;
    if (!Byte(b, copy)) return false;
    value |= static_cast<uint64_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}

bool RawAudioChunk::Take(uint64_t n, std::string* copy) {
  while (n > 0) {
    if (AtEnd()) return false;
    const grpc::Slice& slice = slices_[slice_];
    const size_t here = static_cast<size_t>(std::min<uint64_t>(n, slice.size() - offset_));
    const uint8_t* p = slice.begin() + offset_;
    if (copy != nullptr) {
      copy->append(reinterpret_cast<const char*>(p), here);
    } else {
      audio_.push_back(iovec{const_cast<uint8_t*>(p), here});
    }
    offset_ += here;
    n -= here;
  }
  return true;
}

}  // namespace montage::cli
