// Small text helpers for prompt templates and offline answers: UTF-8 aware lengths and clipping,
// keywords and hashtags taken from free text, and notes split into points. Plain functions,
// thread-safe.
#ifndef MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_TEXT_H_
#define MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_TEXT_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace montage::generation::internal {

// Number of Unicode code points in valid UTF-8 `text`.
size_t CountCodePoints(absl::string_view text);

// The first `max_code_points` code points of `text` (never splits a code point).
std::string TruncateCodePoints(absl::string_view text, size_t max_code_points);

// `text` with every run of whitespace folded to one space and the ends trimmed; when that is
// longer than `max_code_points`, it is cut at a word boundary and ends with "…", the whole
// staying within `max_code_points`.
std::string Clip(absl::string_view text, size_t max_code_points);

// Up to `max_words` distinct lower-cased words of `text`, in order, without common English
// filler words ("the", "how", "your"…) and without punctuation.
std::vector<std::string> Keywords(absl::string_view text, size_t max_words);

// A hashtag body made of the first keywords of `text` in CamelCase ("SourdoughBakingBasics"),
// at most 28 characters; empty when `text` has no words.
std::string HashtagBody(absl::string_view text);

// The separate points of free-form notes: one per line and per sentence, with list markers
// ("-", "*", "•", "1.", "2)") removed, each clipped to `max_code_points`, at most `max_points`.
std::vector<std::string> Points(absl::string_view text, size_t max_points, size_t max_code_points);

// "a", "a and b", "a, b and c".
std::string JoinForProse(const std::vector<std::string>& items);

// `text` as the contents of a JSON string literal (no surrounding quotes).
std::string JsonEscape(absl::string_view text);

}  // namespace montage::generation::internal

#endif  // MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_TEXT_H_
