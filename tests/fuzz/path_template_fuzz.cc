// Fuzz target for gateway/transcode/path_template.h. An input is up to three parts separated by
// '\n': a template, a request path and a query string ("/v1/{name}\n/v1/x\na=1"). Besides "never
// crashes", it checks what must hold for any input:
//  - a template that parses prints (ToString) to a template that parses to the same print and
//    the same structure, and rejects what it rejects with INVALID_ARGUMENT naming an offset;
//  - every template matches a path made from itself (literals as printed, "*" → "x", "**" →
//    "y/z", the verb), with or without a trailing '/', binding every variable;
//  - the request path gets the same answer from the template, from its reprint, and from a
//    PathMatcher holding it; a fixed matcher's choice really matches the path;
//  - a query string that parses re-encodes to one that parses to the same pairs.
// A broken invariant aborts with a message (libFuzzer then saves the input).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "gateway/transcode/path_template.h"

namespace montage::gateway::transcode {
namespace {

void Require(bool condition, const char* what, absl::string_view detail) {
  if (condition) return;
  std::fprintf(stderr, "path_template_fuzz: invariant broken: %s [%.*s]\n", what,
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

bool SameBindings(const std::optional<std::vector<VariableBinding>>& a,
                  const std::optional<std::vector<VariableBinding>>& b) {
  if (a.has_value() != b.has_value()) return false;
  if (!a) return true;
  if (a->size() != b->size()) return false;
  for (size_t i = 0; i < a->size(); ++i) {
    if ((*a)[i].field_path != (*b)[i].field_path || (*a)[i].value != (*b)[i].value) return false;
  }
  return true;
}

bool SameStructure(const PathTemplate& a, const PathTemplate& b) {
  if (a.verb() != b.verb() || a.segments().size() != b.segments().size() ||
      a.variables().size() != b.variables().size()) {
    return false;
  }
  for (size_t i = 0; i < a.segments().size(); ++i) {
    if (a.segments()[i].kind != b.segments()[i].kind ||
        a.segments()[i].literal != b.segments()[i].literal) {
      return false;
    }
  }
  for (size_t i = 0; i < a.variables().size(); ++i) {
    const PathTemplate::Variable& x = a.variables()[i];
    const PathTemplate::Variable& y = b.variables()[i];
    if (x.field_path != y.field_path || x.start_segment != y.start_segment ||
        x.end_segment != y.end_segment) {
      return false;
    }
  }
  return true;
}

// What the header promises about a parsed template's shape.
void CheckShape(const PathTemplate& t, absl::string_view printed) {
  const std::vector<PathTemplate::Segment>& segments = t.segments();
  for (size_t i = 0; i < segments.size(); ++i) {
    const bool last = i + 1 == segments.size();
    Require(segments[i].kind != PathTemplate::SegmentKind::kMultiWildcard || last,
            "'**' only as the last segment", printed);
    Require(
        (segments[i].kind == PathTemplate::SegmentKind::kLiteral) == !segments[i].literal.empty(),
        "exactly the literals have text", printed);
  }
  int previous_end = 0;
  for (const PathTemplate::Variable& v : t.variables()) {
    Require(!v.field_path.empty(), "a variable has a field path", printed);
    Require(v.start_segment >= previous_end && v.start_segment < v.end_segment &&
                v.end_segment <= static_cast<int>(segments.size()),
            "variables cover disjoint, ordered, non-empty segment ranges", printed);
    previous_end = v.end_segment;
  }
  Require(t.verb().empty() || !segments.empty(), "a verb follows a segment", printed);
}

// A request path the template must match, and the value each variable must then have when it
// can be known without decoding (empty when not).
std::pair<std::string, std::vector<std::optional<std::string>>> Instance(const PathTemplate& t) {
  std::vector<std::string> texts;
  for (const PathTemplate::Segment& s : t.segments()) {
    switch (s.kind) {
      case PathTemplate::SegmentKind::kLiteral:
        texts.push_back(s.literal);
        break;
      case PathTemplate::SegmentKind::kSingleWildcard:
        texts.push_back("x");
        break;
      case PathTemplate::SegmentKind::kMultiWildcard:
        texts.push_back("y/z");
        break;
    }
  }
  std::string path = "/" + absl::StrJoin(texts, "/");
  if (!t.verb().empty()) path += ":" + t.verb();
  std::vector<std::optional<std::string>> values;
  for (const PathTemplate::Variable& v : t.variables()) {
    std::vector<std::string> parts(texts.begin() + v.start_segment, texts.begin() + v.end_segment);
    std::string value = absl::StrJoin(parts, "/");
    if (absl::StrContains(value, '%')) {
      values.push_back(std::nullopt);
    } else {
      values.push_back(std::move(value));
    }
  }
  return {std::move(path), std::move(values)};
}

void CheckInstanceMatches(const PathTemplate& t) {
  auto [path, values] = Instance(t);
  std::optional<std::vector<VariableBinding>> bindings = t.Match(path);
  Require(bindings.has_value(), "a template matches its own instance", path);
  Require(bindings->size() == t.variables().size(), "every variable is bound", path);
  for (size_t i = 0; i < bindings->size(); ++i) {
    Require((*bindings)[i].field_path == t.variables()[i].field_path,
            "bindings in the variables' order", path);
    if (values[i]) Require((*bindings)[i].value == *values[i], "the instance's value", path);
  }
  if (!t.segments().empty()) {
    Require(SameBindings(bindings, t.Match(path + "/")), "one trailing '/' is ignored", path);
  }
}

// A fixed matcher with every kind of template, for Lookup on arbitrary paths.
struct FixedMatcher {
  std::vector<PathTemplate> templates;
  PathMatcher matcher;
};

const FixedMatcher& Fixed() {
  static const FixedMatcher* fixed = [] {
    auto* f = new FixedMatcher;
    const char* kPatterns[] = {
        "/",
        "/**",
        "/v1/shelves",
        "/v1/{name}",
        "/v1/{name=shelves/*}",
        "/v1/{name=shelves/*}/books/{book.id}",
        "/v1/{name=**}",
        "/v1/{name=**}:cancel",
        "/v1/{name=operations/**}:cancel",
        "/v1/*:run",
        "/v1/{a}/{b}/{c=**}",
        "/v1/a%2Fb/{x}",
    };
    for (const char* pattern : kPatterns) {
      absl::StatusOr<PathTemplate> t = PathTemplate::Parse(pattern);
      Require(t.ok(), "the fixed templates parse", pattern);
      Require(f->matcher.Add("GET", *t, static_cast<int>(f->templates.size())).ok(),
              "the fixed templates are distinct", pattern);
      f->templates.push_back(*std::move(t));
    }
    return f;
  }();
  return *fixed;
}

void CheckTemplate(absl::string_view pattern, absl::string_view path) {
  absl::StatusOr<PathTemplate> t = PathTemplate::Parse(pattern);
  if (!t.ok()) {
    Require(t.status().code() == absl::StatusCode::kInvalidArgument,
            "a bad template is INVALID_ARGUMENT", pattern);
    Require(absl::StrContains(t.status().message(), "(at offset "),
            "a bad template's error names the offset", t.status().message());
    return;
  }
  const std::string printed = t->ToString();
  CheckShape(*t, printed);
  absl::StatusOr<PathTemplate> again = PathTemplate::Parse(printed);
  Require(again.ok(), "ToString() parses", printed);
  Require(again->ToString() == printed, "ToString() is a fixed point", printed);
  Require(SameStructure(*t, *again), "ToString() keeps the structure", printed);
  CheckInstanceMatches(*t);

  const std::optional<std::vector<VariableBinding>> bindings = t->Match(path);
  if (bindings) {
    Require(bindings->size() == t->variables().size(), "every variable is bound", path);
  }
  Require(SameBindings(bindings, again->Match(path)), "the reprint matches alike", path);

  PathMatcher matcher;
  Require(matcher.Add("GET", *t, 7).ok(), "an empty matcher takes any template", printed);
  Require(matcher.Add("GET", *again, 8).code() == absl::StatusCode::kAlreadyExists,
          "the same template twice is ALREADY_EXISTS", printed);
  const std::optional<PathMatcher::Match> found = matcher.Lookup("GET", path);
  Require(found.has_value() == bindings.has_value(), "Lookup agrees with Match", path);
  if (found) {
    Require(found->id == 7, "Lookup returns the id", path);
    Require(SameBindings(found->bindings, bindings), "Lookup binds as Match", path);
  }
  Require(matcher.MatchesAnyMethod(path) == bindings.has_value(),
          "MatchesAnyMethod agrees with Match", path);
  Require(!matcher.Lookup("POST", path).has_value(), "another method never matches", path);
}

void CheckFixedMatcher(absl::string_view path) {
  const FixedMatcher& fixed = Fixed();
  const std::optional<PathMatcher::Match> found = fixed.matcher.Lookup("GET", path);
  bool any_matches = false;
  bool verb_matches = false;
  for (const PathTemplate& t : fixed.templates) {
    if (t.Match(path)) {
      any_matches = true;
      verb_matches = verb_matches || !t.verb().empty();
    }
  }
  Require(found.has_value() == any_matches, "Lookup finds a match when there is one", path);
  Require(fixed.matcher.MatchesAnyMethod(path) == any_matches, "MatchesAnyMethod", path);
  if (!found) return;
  const PathTemplate& chosen = fixed.templates[static_cast<size_t>(found->id)];
  Require(SameBindings(found->bindings, chosen.Match(path)), "the chosen template matches", path);
  Require(!verb_matches || !chosen.verb().empty(), "a verb template wins when one matches", path);
}

// '%'-escapes every byte but the unreserved ones.
std::string Encode(absl::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xF]);
    }
  }
  return out;
}

void CheckQuery(absl::string_view query) {
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> params = ParseQueryString(query);
  if (!params.ok()) {
    Require(params.status().code() == absl::StatusCode::kInvalidArgument,
            "a bad query is INVALID_ARGUMENT", query);
    return;
  }
  std::vector<std::string> parts;
  for (const auto& [name, value] : *params) parts.push_back(Encode(name) + "=" + Encode(value));
  const std::string encoded = absl::StrJoin(parts, "&");
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> again =
      ParseQueryString(encoded);
  Require(again.ok(), "a re-encoded query parses", encoded);
  Require(*again == *params, "a re-encoded query gives the same pairs", encoded);
}

}  // namespace
}  // namespace montage::gateway::transcode

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace t = montage::gateway::transcode;
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const std::vector<absl::string_view> parts = absl::StrSplit(input, absl::MaxSplits('\n', 2));
  const absl::string_view pattern = parts[0];
  const absl::string_view path = parts.size() > 1 ? parts[1] : absl::string_view();
  const absl::string_view query = parts.size() > 2 ? parts[2] : absl::string_view();
  t::CheckTemplate(pattern, path);
  t::CheckFixedMatcher(path);
  t::CheckQuery(query);
  return 0;
}
