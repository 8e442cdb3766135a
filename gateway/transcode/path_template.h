// google.api.http path templates ("/v1/{name=shelves/*/books/*}:publish") and a matcher that
// finds, for an HTTP method and a request path, the most specific template and the values of its
// variables. Grammar and percent-decoding follow google/api/http.proto:
//
//   Template = "/" Segments [ Verb ] ;
//   Segments = Segment { "/" Segment } ;
//   Segment  = "*" | "**" | LITERAL | Variable ;
//   Variable = "{" FieldPath [ "=" Segments ] "}" ;
//   FieldPath = IDENT { "." IDENT } ;
//   Verb     = ":" LITERAL ;
//
// Immutable after construction, so safe to share across threads.
#ifndef MONTAGE_GATEWAY_TRANSCODE_PATH_TEMPLATE_H_
#define MONTAGE_GATEWAY_TRANSCODE_PATH_TEMPLATE_H_

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::gateway::transcode {

// A variable's value as bound by a match: the field path ("shelf.theme" → {"shelf", "theme"})
// and the percent-decoded text.
struct VariableBinding {
  std::vector<std::string> field_path;
  std::string value;
};

class PathTemplate {
 public:
  enum class SegmentKind { kLiteral, kSingleWildcard /* * */, kMultiWildcard /* ** */ };
  struct Segment {
    SegmentKind kind = SegmentKind::kLiteral;
    std::string literal;  // for kLiteral
  };
  struct Variable {
    std::vector<std::string> field_path;
    int start_segment = 0;  // index into segments()
    int end_segment = 0;    // one past the last segment it covers
  };

  // INVALID_ARGUMENT naming the position and what is wrong ("'**' must be the last segment",
  // "nested variable", "empty field path", "variable bound twice"...).
  static absl::StatusOr<PathTemplate> Parse(absl::string_view pattern);

  // The variables' values when `path` (no query string, not yet percent-decoded) matches.
  std::optional<std::vector<VariableBinding>> Match(absl::string_view path) const;

  const std::vector<Segment>& segments() const { return segments_; }
  const std::vector<Variable>& variables() const { return variables_; }
  const std::string& verb() const { return verb_; }
  // The template as parsed, normalised ("{name}" is written "{name=*}").
  std::string ToString() const;

 private:
  friend class PathMatcher;
  // A request path split and percent-decoded once, then matched against many templates.
  struct RequestPath;
  std::optional<std::vector<VariableBinding>> MatchRequest(const RequestPath& request) const;

  std::vector<Segment> segments_;
  std::vector<Variable> variables_;
  std::string verb_;
  // The decoded bytes of each literal ("" for wildcards) and of the verb: a request matches a
  // literal when its decoded segment is equal, however either side spelled its escapes.
  std::vector<std::string> decoded_literals_;
  std::string decoded_verb_;
};

// Many templates, each under an HTTP method, mapping to caller-chosen ids. Lookup picks the most
// specific match: comparing segment by segment from the left, a literal beats "*", and "*" beats
// "**"; a template with a verb beats one without when the request has that verb.
class PathMatcher {
 public:
  struct Match {
    int id = 0;
    std::vector<VariableBinding> bindings;
  };

  // ALREADY_EXISTS when the same method and normalised template were added before.
  absl::Status Add(absl::string_view http_method, PathTemplate path_template, int id);
  // The best match for the method ("GET", "POST"...; custom methods as given) and path.
  std::optional<Match> Lookup(absl::string_view http_method, absl::string_view path) const;
  // True when some template matches `path` under any method (for error reporting).
  bool MatchesAnyMethod(absl::string_view path) const;
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string http_method;
    PathTemplate path_template;
    int id = 0;
  };
  std::vector<Entry> entries_;
};

// Splits a URL query string ("a=1&b=x%20y&b=z+w") into decoded name/value pairs in order ('+'
// is a space; a name without '=' has an empty value). INVALID_ARGUMENT for a bad %-escape or a
// name or value that is not valid UTF-8 after decoding.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseQueryString(
    absl::string_view query);

}  // namespace montage::gateway::transcode

#endif  // MONTAGE_GATEWAY_TRANSCODE_PATH_TEMPLATE_H_
