// UTF-8 helpers for text that crosses into JSON or protobuf strings, both of which reject a cut
// multi-byte sequence.
#ifndef MONTAGE_COMMON_UTF8_H_
#define MONTAGE_COMMON_UTF8_H_

#include <cstddef>

#include "absl/strings/string_view.h"

namespace montage {

// The longest prefix of `text` of at most `max_bytes` bytes that does not cut a UTF-8 sequence.
inline absl::string_view Utf8Prefix(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  size_t n = max_bytes;
  while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return text.substr(0, n);
}

}  // namespace montage

#endif  // MONTAGE_COMMON_UTF8_H_
