// SHA-256 as lower-case hex: the content keys of caches (generated answers, speech segments).
#ifndef MONTAGE_COMMON_SHA256_H_
#define MONTAGE_COMMON_SHA256_H_

#include <string>

#include "absl/strings/string_view.h"

namespace montage {

std::string Sha256Hex(absl::string_view bytes);

}  // namespace montage

#endif  // MONTAGE_COMMON_SHA256_H_
