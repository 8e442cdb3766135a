#include "services/generation/catalogue/internal/text.h"

#include <algorithm>
#include <cstdint>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace montage::generation::internal {
namespace {

// Long hashtags are unreadable; a post that quotes one also needs to know its size.
constexpr size_t kMaxHashtagLength = 28;

bool IsContinuationByte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Decodes the code point starting at text[i]; `length` receives its size in bytes. Malformed
// input decodes byte by byte as U+FFFD so that callers always advance.
uint32_t DecodeAt(absl::string_view text, size_t i, size_t* length) {
  const auto b0 = static_cast<unsigned char>(text[i]);
  size_t n = 1;
  uint32_t cp = b0;
  if (b0 >= 0xF0) {
    n = 4;
    cp = b0 & 0x07;
  } else if (b0 >= 0xE0) {
    n = 3;
    cp = b0 & 0x0F;
  } else if (b0 >= 0xC0) {
    n = 2;
    cp = b0 & 0x1F;
  } else if (b0 >= 0x80) {
    *length = 1;
    return 0xFFFD;
  }
  if (i + n > text.size()) {
    *length = 1;
    return 0xFFFD;
  }
  for (size_t k = 1; k < n; ++k) {
    if (!IsContinuationByte(text[i + k])) {
      *length = 1;
      return 0xFFFD;
    }
    cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
  }
  *length = n;
  return cp;
}

// Letters and digits of any script count as word characters; ASCII and the common Unicode
// punctuation, symbol and emoji blocks do not.
bool IsWordCodePoint(uint32_t cp) {
  if (cp < 0x80) return absl::ascii_isalnum(static_cast<unsigned char>(cp));
  if (cp <= 0xBF) return false;                    // Latin-1 punctuation and symbols
  if (cp == 0xD7 || cp == 0xF7) return false;      // × ÷
  if (cp >= 0x2000 && cp <= 0x2BFF) return false;  // general punctuation … misc. symbols
  if (cp >= 0x3000 && cp <= 0x303F) return false;  // CJK punctuation
  if (cp >= 0xFE00 && cp <= 0xFE0F) return false;  // variation selectors
  if (cp >= 0xFF00 && cp <= 0xFF0F) return false;  // full-width punctuation
  if (cp >= 0x1F000) return false;                 // emoji and pictographs
  return cp != 0xFFFD;
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f'; }

const absl::flat_hash_set<absl::string_view>& StopWords() {
  static const auto* const kWords = new absl::flat_hash_set<absl::string_view>{
      "a",    "one",  "an",   "and",  "are",  "as",  "at",    "be",   "but",  "by",    "can",
      "do",   "does", "for",  "from", "get",  "has", "have",  "how",  "i",    "if",    "in",
      "into", "is",   "it",   "its",  "just", "me",  "more",  "my",   "not",  "of",    "on",
      "or",   "our",  "so",   "than", "that", "the", "their", "them", "then", "there", "these",
      "they", "this", "to",   "up",   "us",   "was", "we",    "what", "when", "where", "which",
      "who",  "why",  "will", "with", "you",  "your"};
  return *kWords;
}

}  // namespace

size_t CountCodePoints(absl::string_view text) {
  size_t n = 0;
  for (char c : text) n += IsContinuationByte(c) ? 0 : 1;
  return n;
}

std::string TruncateCodePoints(absl::string_view text, size_t max_code_points) {
  size_t seen = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (IsContinuationByte(text[i])) continue;
    if (seen == max_code_points) return std::string(text.substr(0, i));
    ++seen;
  }
  return std::string(text);
}

std::string Clip(absl::string_view text, size_t max_code_points) {
  std::string folded;
  folded.reserve(text.size());
  for (char c : text) {
    if (IsSpace(c)) {
      if (!folded.empty() && folded.back() != ' ') folded.push_back(' ');
    } else {
      folded.push_back(c);
    }
  }
  while (!folded.empty() && folded.back() == ' ') folded.pop_back();
  if (CountCodePoints(folded) <= max_code_points) return folded;
  if (max_code_points == 0) return "";

  // Keep room for the ellipsis, then prefer ending at a space when one is not too far back.
  std::string cut = TruncateCodePoints(folded, max_code_points - 1);
  const bool mid_word = folded.size() > cut.size() && folded[cut.size()] != ' ';
  if (mid_word) {
    const size_t space = cut.rfind(' ');
    if (space != std::string::npos &&
        CountCodePoints(cut.substr(0, space)) * 2 >= max_code_points) {
      cut.resize(space);
    }
  }
  while (!cut.empty() && absl::string_view(" ,;:-([").find(cut.back()) != absl::string_view::npos) {
    cut.pop_back();
  }
  return cut + "…";
}

std::vector<std::string> Keywords(absl::string_view text, size_t max_words) {
  std::vector<std::string> words;
  absl::flat_hash_set<std::string> seen;
  std::string word;
  auto flush = [&] {
    if (!word.empty() && !StopWords().contains(word) && seen.insert(word).second &&
        words.size() < max_words) {
      words.push_back(word);
    }
    word.clear();
  };
  for (size_t i = 0; i < text.size() && words.size() < max_words;) {
    size_t length = 1;
    const uint32_t cp = DecodeAt(text, i, &length);
    if (IsWordCodePoint(cp)) {
      for (size_t k = 0; k < length; ++k) {
        word.push_back(absl::ascii_tolower(static_cast<unsigned char>(text[i + k])));
      }
    } else if (cp != '\'' && cp != 0x2019) {  // "don't" stays one word
      flush();
    }
    i += length;
  }
  flush();
  return words;
}

std::string HashtagBody(absl::string_view text) {
  std::string body;
  for (std::string& word : Keywords(text, 4)) {
    word[0] = absl::ascii_toupper(static_cast<unsigned char>(word[0]));
    if (!body.empty() && CountCodePoints(body) + CountCodePoints(word) > kMaxHashtagLength) break;
    body += word;
  }
  return TruncateCodePoints(body, kMaxHashtagLength);
}

std::vector<std::string> Points(absl::string_view text, size_t max_points, size_t max_code_points) {
  std::vector<std::string> points;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    // List markers: bullets, and "12." or "3)" numbering.
    for (absl::string_view bullet : {"-", "*", "•", "–", "—", "+"}) {
      if (absl::ConsumePrefix(&line, bullet)) break;
    }
    size_t digits = 0;
    while (digits < line.size() && absl::ascii_isdigit(static_cast<unsigned char>(line[digits]))) {
      ++digits;
    }
    if (digits > 0 && digits < line.size() && (line[digits] == '.' || line[digits] == ')') &&
        (digits + 1 == line.size() || line[digits + 1] == ' ')) {
      line.remove_prefix(digits + 1);
    }
    // Sentences end at . ! or ? followed by a space.
    size_t start = 0;
    for (size_t i = 0; i <= line.size(); ++i) {
      const bool end = i == line.size() || ((line[i] == '.' || line[i] == '!' || line[i] == '?') &&
                                            i + 1 < line.size() && line[i + 1] == ' ');
      if (!end) continue;
      const size_t stop = i == line.size() ? i : i + 1;
      std::string point = Clip(line.substr(start, stop - start), max_code_points);
      if (!point.empty()) {
        if (points.size() == max_points) return points;
        points.push_back(std::move(point));
      }
      start = stop;
    }
  }
  return points;
}

std::string JoinForProse(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += i + 1 == items.size() ? " and " : ", ";
    out += items[i];
  }
  return out;
}

std::string JsonEscape(absl::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size() + 8);
  for (char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += "\\u00";
          out.push_back(kHex[(c >> 4) & 0xF]);
          out.push_back(kHex[c & 0xF]);
        } else {
          out.push_back(c);
        }
    }
  }
  return out;
}

}  // namespace montage::generation::internal
