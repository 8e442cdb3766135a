#include "gateway/transcode/path_template.h"

#include <algorithm>
#include <cstdint>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/utf8.h"

// Choices the header leaves open, made here:
//  - "/" alone is a valid template with no segments; it matches the request path "/" only.
//  - Literals and the verb may hold unreserved and sub-delim characters except '*' (which would
//    read as a glob) and %-escapes. They are kept normalised: an escape of such a character is
//    written as the character, every other escape in upper-case hex ("%7e" → "~", "%2f" → "%2F").
//  - Request paths: one trailing '/' is ignored ("/v1/shelves/" is "/v1/shelves"). '*' and
//    literals never match an empty segment ("/v1//x"); '**' takes whatever is left, empty
//    segments included. A malformed %-escape anywhere in the path matches nothing.
//  - The verb of a request is the text after the last ':' of its last segment, and it is only
//    split off for templates that have a verb: "/v1/{name}" binds "a:cancel" for "/v1/a:cancel".
//  - PathMatcher::Add rejects a template that differs from an earlier one under the same method
//    only in its variables ("/v1/{a}" then "/v1/{b}"): the second could never be chosen.

namespace montage::gateway::transcode {
namespace {

using Segment = PathTemplate::Segment;
using SegmentKind = PathTemplate::SegmentKind;

// RFC 3986 unreserved and sub-delims, without '*'.
bool IsLiteralChar(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  switch (c) {
    case '-':
    case '.':
    case '_':
    case '~':
    case '!':
    case '$':
    case '&':
    case '\'':
    case '(':
    case ')':
    case '+':
    case ',':
    case ';':
    case '=':
      return true;
    default:
      return false;
  }
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The byte encoded by the escape at text[pos] ('%'), or -1 when it is not '%' and two hex digits.
int EscapedByte(absl::string_view text, size_t pos) {
  if (pos + 2 >= text.size()) return -1;
  const int high = HexValue(text[pos + 1]);
  const int low = HexValue(text[pos + 2]);
  if (high < 0 || low < 0) return -1;
  return high * 16 + low;
}

void AppendEscaped(unsigned char c, std::string* out) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  out->push_back('%');
  out->push_back(kHex[c >> 4]);
  out->push_back(kHex[c & 0xF]);
}

// Decodes %-escapes (and '+' as a space when `plus_is_space`). With `keep_slash`, "%2F" and
// "%2f" are copied as written, as http.proto asks for variables spanning several segments.
// The offset of the first malformed escape when there is one.
std::optional<size_t> PercentDecode(absl::string_view in, bool keep_slash, bool plus_is_space,
                                    std::string* out) {
  out->clear();
  out->reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const char c = in[i];
    if (c == '+' && plus_is_space) {
      out->push_back(' ');
    } else if (c != '%') {
      out->push_back(c);
    } else {
      const int byte = EscapedByte(in, i);
      if (byte < 0) return i;
      if (keep_slash && byte == '/') {
        out->append(in.data() + i, 3);
      } else {
        out->push_back(static_cast<char>(byte));
      }
      i += 2;
    }
  }
  return std::nullopt;
}

// Recursive-descent parser for the grammar in the header. Variables do not nest, so the
// recursion is at most two levels deep whatever the input.
class TemplateParser {
 public:
  explicit TemplateParser(absl::string_view pattern) : text_(pattern) {}

  absl::Status Parse() {
    if (text_.empty() || text_[0] != '/') return Error(0, "must start with '/'");
    pos_ = 1;
    if (text_.size() == 1) return absl::OkStatus();  // "/": the root, no segments
    if (absl::Status s = ParseSegments(/*in_variable=*/false); !s.ok()) return s;
    if (pos_ < text_.size() && text_[pos_] == ':') {
      const size_t colon = pos_++;
      std::string decoded;
      if (absl::Status s = ParseLiteral(&verb, &decoded); !s.ok()) return s;
      if (verb.empty()) return Error(colon, "empty verb after ':'");
      decoded_verb = std::move(decoded);
    }
    if (pos_ < text_.size()) {
      return Error(pos_, text_[pos_] == '}' ? "'}' without '{'"
                         : !verb.empty()    ? "the verb must end the template"
                                            : "unexpected character");
    }
    for (size_t i = 0; i + 1 < segments.size(); ++i) {
      if (segments[i].kind == SegmentKind::kMultiWildcard) {
        return Error(offsets_[i], "'**' must be the last segment");
      }
    }
    return absl::OkStatus();
  }

  std::vector<Segment> segments;
  std::vector<std::string> decoded_literals;
  std::vector<PathTemplate::Variable> variables;
  std::string verb;
  std::string decoded_verb;

 private:
  absl::Status Error(size_t offset, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("path template \"", absl::CHexEscape(text_),
                                                   "\": ", what, " (at offset ", offset, ")"));
  }

  bool AtSegmentEnd() const {
    return pos_ == text_.size() || text_[pos_] == '/' || text_[pos_] == ':' || text_[pos_] == '}';
  }

  absl::Status ParseSegments(bool in_variable) {
    while (true) {
      if (absl::Status s = ParseSegment(in_variable); !s.ok()) return s;
      if (pos_ == text_.size() || text_[pos_] != '/') return absl::OkStatus();
      ++pos_;
    }
  }

  void AddSegment(SegmentKind kind, std::string literal, std::string decoded, size_t offset) {
    Segment segment;
    segment.kind = kind;
    segment.literal = std::move(literal);
    segments.push_back(std::move(segment));
    decoded_literals.push_back(std::move(decoded));
    offsets_.push_back(offset);
  }

  absl::Status ParseSegment(bool in_variable) {
    const size_t start = pos_;
    if (AtSegmentEnd()) return Error(start, "empty segment");
    if (text_[pos_] == '{') {
      if (in_variable) return Error(start, "nested variable");
      if (absl::Status s = ParseVariable(); !s.ok()) return s;
      if (!AtSegmentEnd()) return Error(pos_, "a variable must be a whole segment");
      return absl::OkStatus();
    }
    if (text_[pos_] == '*') {
      const bool multi = pos_ + 1 < text_.size() && text_[pos_ + 1] == '*';
      pos_ += multi ? 2 : 1;
      if (!AtSegmentEnd()) return Error(start, "'*' and '**' must be whole segments");
      AddSegment(multi ? SegmentKind::kMultiWildcard : SegmentKind::kSingleWildcard, "", "", start);
      return absl::OkStatus();
    }
    std::string literal;
    std::string decoded;
    if (absl::Status s = ParseLiteral(&literal, &decoded); !s.ok()) return s;
    if (literal.empty() || !AtSegmentEnd()) {
      const char c = text_[pos_];
      if (c == '*') return Error(pos_, "'*' and '**' must be whole segments");
      if (c == '{') return Error(pos_, "a variable must be a whole segment");
      return Error(pos_, absl::StrCat("character '", absl::CHexEscape(absl::string_view(&c, 1)),
                                      "' must be %-escaped in a literal"));
    }
    AddSegment(SegmentKind::kLiteral, std::move(literal), std::move(decoded), start);
    return absl::OkStatus();
  }

  // Reads literal characters and escapes up to the first other character; both outputs may
  // end up empty.
  absl::Status ParseLiteral(std::string* canonical, std::string* decoded) {
    while (pos_ < text_.size()) {
      const unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (IsLiteralChar(c)) {
        canonical->push_back(static_cast<char>(c));
        decoded->push_back(static_cast<char>(c));
        ++pos_;
      } else if (c == '%') {
        const int byte = EscapedByte(text_, pos_);
        if (byte < 0) return Error(pos_, "'%' must be followed by two hex digits");
        decoded->push_back(static_cast<char>(byte));
        if (IsLiteralChar(static_cast<unsigned char>(byte))) {
          canonical->push_back(static_cast<char>(byte));
        } else {
          AppendEscaped(static_cast<unsigned char>(byte), canonical);
        }
        pos_ += 3;
      } else {
        break;
      }
    }
    return absl::OkStatus();
  }

  static bool IsIdentStart(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  static bool IsIdentChar(char c) { return IsIdentStart(c) || (c >= '0' && c <= '9'); }

  absl::Status ParseVariable() {
    const size_t open = pos_++;
    PathTemplate::Variable variable;
    while (true) {
      const size_t ident_start = pos_;
      if (pos_ == text_.size() || !IsIdentStart(text_[pos_])) {
        if (variable.field_path.empty() &&
            (pos_ == text_.size() || text_[pos_] == '}' || text_[pos_] == '=')) {
          return Error(pos_, "empty field path");
        }
        return Error(pos_, "a field path is identifiers separated by '.'");
      }
      while (pos_ < text_.size() && IsIdentChar(text_[pos_])) ++pos_;
      variable.field_path.emplace_back(text_.substr(ident_start, pos_ - ident_start));
      if (pos_ < text_.size() && text_[pos_] == '.') {
        ++pos_;
        continue;
      }
      break;
    }
    const std::string joined = absl::StrJoin(variable.field_path, ".");
    if (!bound_.insert(joined).second) {
      return Error(open, absl::StrCat("variable '", joined, "' bound twice"));
    }
    variable.start_segment = static_cast<int>(segments.size());
    if (pos_ < text_.size() && text_[pos_] == '=') {
      ++pos_;
      if (absl::Status s = ParseSegments(/*in_variable=*/true); !s.ok()) return s;
    } else {
      AddSegment(SegmentKind::kSingleWildcard, "", "", open);
    }
    if (pos_ == text_.size()) return Error(open, "unterminated variable");
    if (text_[pos_] != '}') {
      return Error(pos_, text_[pos_] == ':' ? "a verb cannot be inside a variable"
                                            : "expected '}' or '=' after the field path");
    }
    ++pos_;
    variable.end_segment = static_cast<int>(segments.size());
    variables.push_back(std::move(variable));
    return absl::OkStatus();
  }

  absl::string_view text_;
  size_t pos_ = 0;
  std::vector<size_t> offsets_;  // where each segment starts, for errors found after parsing
  std::set<std::string> bound_;
};

bool SameShape(const PathTemplate& a, const PathTemplate& b) {
  if (a.verb() != b.verb() || a.segments().size() != b.segments().size()) return false;
  for (size_t i = 0; i < a.segments().size(); ++i) {
    const Segment& x = a.segments()[i];
    const Segment& y = b.segments()[i];
    if (x.kind != y.kind || x.literal != y.literal) return false;
  }
  return true;
}

// How specific a template is at segment `i`: literal > "*" > (template ended) > "**". Two
// templates that match the same request line up segment by segment up to a "**", so the ended
// case only ever meets "**" (that matched nothing), and loses to nothing else.
int Rank(const PathTemplate& t, size_t i) {
  if (i >= t.segments().size()) return 1;
  switch (t.segments()[i].kind) {
    case SegmentKind::kLiteral:
      return 3;
    case SegmentKind::kSingleWildcard:
      return 2;
    case SegmentKind::kMultiWildcard:
      return 0;
  }
  return 0;
}

// Whether `a` is strictly more specific than `b`, both having matched the same request.
bool MoreSpecific(const PathTemplate& a, const PathTemplate& b) {
  if (a.verb().empty() != b.verb().empty()) return !a.verb().empty();
  const size_t n = std::max(a.segments().size(), b.segments().size());
  for (size_t i = 0; i < n; ++i) {
    const int ra = Rank(a, i);
    const int rb = Rank(b, i);
    if (ra != rb) return ra > rb;
  }
  return false;
}

}  // namespace

struct PathTemplate::RequestPath {
  // The request's segments, as sent and fully decoded.
  std::vector<absl::string_view> raw;
  std::vector<std::string> decoded;
  // When the last segment has a ':': the segment before it and the (decoded) verb after it.
  bool has_verb = false;
  absl::string_view raw_last_without_verb;
  std::string decoded_last_without_verb;
  std::string decoded_verb;

  static std::optional<RequestPath> Split(absl::string_view path) {
    if (path.empty() || path[0] != '/') return std::nullopt;
    absl::string_view body = path.substr(1);
    // "/x/" is "/x", but "//" stays two empty segments rather than becoming "/".
    if (body.size() > 1 && body.back() == '/') body.remove_suffix(1);
    RequestPath request;
    if (!body.empty()) request.raw = absl::StrSplit(body, '/');
    request.decoded.resize(request.raw.size());
    for (size_t i = 0; i < request.raw.size(); ++i) {
      if (PercentDecode(request.raw[i], false, false, &request.decoded[i])) return std::nullopt;
    }
    if (!request.raw.empty()) {
      const absl::string_view last = request.raw.back();
      const size_t colon = last.rfind(':');
      if (colon != absl::string_view::npos) {
        // Both halves decode: an escape never contains a ':'.
        request.has_verb = true;
        request.raw_last_without_verb = last.substr(0, colon);
        PercentDecode(request.raw_last_without_verb, false, false,
                      &request.decoded_last_without_verb);
        PercentDecode(last.substr(colon + 1), false, false, &request.decoded_verb);
      }
    }
    return request;
  }
};

absl::StatusOr<PathTemplate> PathTemplate::Parse(absl::string_view pattern) {
  TemplateParser parser(pattern);
  if (absl::Status s = parser.Parse(); !s.ok()) return s;
  PathTemplate result;
  result.segments_ = std::move(parser.segments);
  result.decoded_literals_ = std::move(parser.decoded_literals);
  result.variables_ = std::move(parser.variables);
  result.verb_ = std::move(parser.verb);
  result.decoded_verb_ = std::move(parser.decoded_verb);
  return result;
}

std::optional<std::vector<VariableBinding>> PathTemplate::Match(absl::string_view path) const {
  const std::optional<RequestPath> request = RequestPath::Split(path);
  if (!request) return std::nullopt;
  return MatchRequest(*request);
}

std::optional<std::vector<VariableBinding>> PathTemplate::MatchRequest(
    const RequestPath& request) const {
  const bool with_verb = !verb_.empty();
  if (with_verb && (!request.has_verb || request.decoded_verb != decoded_verb_)) {
    return std::nullopt;
  }
  const size_t m = request.raw.size();
  auto raw = [&](size_t i) {
    return with_verb && i + 1 == m ? request.raw_last_without_verb : request.raw[i];
  };
  auto decoded = [&](size_t i) -> const std::string& {
    return with_verb && i + 1 == m ? request.decoded_last_without_verb : request.decoded[i];
  };

  const size_t n = segments_.size();
  const bool ends_with_multi = n > 0 && segments_.back().kind == SegmentKind::kMultiWildcard;
  if (ends_with_multi ? m < n - 1 : m != n) return std::nullopt;
  const size_t fixed = ends_with_multi ? n - 1 : n;
  for (size_t i = 0; i < fixed; ++i) {
    if (segments_[i].kind == SegmentKind::kLiteral) {
      if (decoded(i) != decoded_literals_[i]) return std::nullopt;
    } else if (raw(i).empty()) {
      return std::nullopt;
    }
  }

  std::vector<VariableBinding> bindings;
  bindings.reserve(variables_.size());
  for (const Variable& variable : variables_) {
    const size_t start = static_cast<size_t>(variable.start_segment);
    const size_t end = static_cast<size_t>(variable.end_segment);
    VariableBinding binding;
    binding.field_path = variable.field_path;
    const bool multi = end - start > 1 || segments_[start].kind == SegmentKind::kMultiWildcard;
    if (!multi) {
      binding.value = decoded(start);
    } else {
      const size_t path_end = end == n && ends_with_multi ? m : end;
      std::string joined;
      for (size_t i = start; i < path_end; ++i) {
        if (i > start) joined.push_back('/');
        const absl::string_view part = raw(i);
        joined.append(part.data(), part.size());
      }
      PercentDecode(joined, /*keep_slash=*/true, false, &binding.value);
    }
    bindings.push_back(std::move(binding));
  }
  return bindings;
}

std::string PathTemplate::ToString() const {
  if (segments_.empty()) return "/";
  std::string out;
  size_t next_variable = 0;  // variables_ are in segment order
  for (size_t i = 0; i < segments_.size(); ++i) {
    out.push_back('/');
    const bool opens = next_variable < variables_.size() &&
                       static_cast<size_t>(variables_[next_variable].start_segment) == i;
    if (opens) {
      absl::StrAppend(&out, "{", absl::StrJoin(variables_[next_variable].field_path, "."), "=");
    }
    switch (segments_[i].kind) {
      case SegmentKind::kLiteral:
        out += segments_[i].literal;
        break;
      case SegmentKind::kSingleWildcard:
        out += "*";
        break;
      case SegmentKind::kMultiWildcard:
        out += "**";
        break;
    }
    if (next_variable < variables_.size() &&
        static_cast<size_t>(variables_[next_variable].end_segment) == i + 1) {
      out.push_back('}');
      ++next_variable;
    }
  }
  if (!verb_.empty()) absl::StrAppend(&out, ":", verb_);
  return out;
}

absl::Status PathMatcher::Add(absl::string_view http_method, PathTemplate path_template, int id) {
  for (const Entry& entry : entries_) {
    if (entry.http_method == http_method && SameShape(entry.path_template, path_template)) {
      return absl::AlreadyExistsError(absl::StrCat(
          http_method, " ", path_template.ToString(), ": the same route as ", entry.http_method,
          " ", entry.path_template.ToString(), " (id ", entry.id, ")"));
    }
  }
  Entry entry;
  entry.http_method = std::string(http_method);
  entry.path_template = std::move(path_template);
  entry.id = id;
  entries_.push_back(std::move(entry));
  return absl::OkStatus();
}

std::optional<PathMatcher::Match> PathMatcher::Lookup(absl::string_view http_method,
                                                      absl::string_view path) const {
  const std::optional<PathTemplate::RequestPath> request = PathTemplate::RequestPath::Split(path);
  if (!request) return std::nullopt;
  const Entry* best = nullptr;
  std::vector<VariableBinding> best_bindings;
  for (const Entry& entry : entries_) {
    if (entry.http_method != http_method) continue;
    if (best != nullptr && !MoreSpecific(entry.path_template, best->path_template)) continue;
    std::optional<std::vector<VariableBinding>> bindings =
        entry.path_template.MatchRequest(*request);
    if (!bindings) continue;
    best = &entry;
    best_bindings = std::move(*bindings);
  }
  if (best == nullptr) return std::nullopt;
  Match match;
  match.id = best->id;
  match.bindings = std::move(best_bindings);
  return match;
}

bool PathMatcher::MatchesAnyMethod(absl::string_view path) const {
  const std::optional<PathTemplate::RequestPath> request = PathTemplate::RequestPath::Split(path);
  if (!request) return false;
  return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& entry) {
    return entry.path_template.MatchRequest(*request).has_value();
  });
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseQueryString(
    absl::string_view query) {
  std::vector<std::pair<std::string, std::string>> params;
  size_t offset = 0;
  for (absl::string_view part : absl::StrSplit(query, '&')) {
    const size_t part_offset = offset;
    offset += part.size() + 1;
    if (part.empty()) continue;
    const size_t eq = part.find('=');
    const absl::string_view raw_name = part.substr(0, eq);
    const absl::string_view raw_value =
        eq == absl::string_view::npos ? absl::string_view() : part.substr(eq + 1);
    std::string name;
    std::string value;
    if (std::optional<size_t> bad = PercentDecode(raw_name, false, true, &name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("query string: '%' must be followed by two hex digits (at offset ",
                       part_offset + *bad, ")"));
    }
    const size_t value_offset = part_offset + eq + 1;
    if (std::optional<size_t> bad = PercentDecode(raw_value, false, true, &value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("query string: '%' must be followed by two hex digits (at offset ",
                       value_offset + *bad, ")"));
    }
    if (!IsValidUtf8(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("query string: the name at offset ", part_offset, " is not valid UTF-8"));
    }
    if (!IsValidUtf8(value)) {
      return absl::InvalidArgumentError(absl::StrCat("query string: the value of '", name,
                                                     "' at offset ", value_offset,
                                                     " is not valid UTF-8"));
    }
    params.emplace_back(std::move(name), std::move(value));
  }
  return params;
}

}  // namespace montage::gateway::transcode
