// Mustache rendering for prompt templates and offline recipes (kainjow's engine), with the
// helpers documented in services/generation/templates/README.md: json.*, join.*, is.*, times.*,
// each.*, words.*, tag.*, points.*, clip.N, nth.*, capitalize and, in offline recipes, phrase
// lists used as partials. Templates are checked before use: every tag must name a variable of the
// template or a helper, so a typo is a load error rather than a silently empty prompt.
//
// Escaping: prompts and free-text recipes are never escaped (kainjow's HTML escaping is off). In
// JSON recipes `{{x}}` writes x escaped for use inside a JSON string and `{{{x}}}` writes it as is.
//
// Nothing here keeps state between calls; every function is thread-safe.
#ifndef MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_MUSTACHE_RENDERER_H_
#define MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_MUSTACHE_RENDERER_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::generation::internal {

enum class VariableType { kString, kInteger, kNumber, kBoolean, kArray };

// A checked variable value as templates see it.
struct VariableValue {
  VariableType type = VariableType::kString;
  // The string, the number written out, or "true"/"false".
  std::string text;
  int64_t integer = 0;
  bool boolean = false;
  std::vector<std::string> items;  // arrays
};

// The variables present after checking, in the template's declaration order.
using VariableValues = std::vector<std::pair<std::string, VariableValue>>;

// Named lists of alternative texts for offline recipes.
using PhraseLists = std::map<std::string, std::vector<std::string>>;

// What a template's text may refer to.
struct Scope {
  struct Variable {
    VariableType type = VariableType::kString;
    // The declared maximum, for integers used with times.*.
    bool has_max = false;
    double max = 0;
  };
  std::map<std::string, Variable> variables;
  // Set for offline recipes: the phrase lists usable as partials, and `seed`.
  const PhraseLists* phrases = nullptr;
  // False for the phrases themselves, so that a phrase cannot include itself.
  bool allow_partials = true;
};

// The helpers a template uses (by variable, or by length for clip), so that rendering computes
// only those.
struct HelperUse {
  std::set<std::string> json, join, is, times, each, words, tag, points, nth;
  std::set<size_t> clip;
};

// Parses `text` and checks every tag against `scope`, adding the helpers it uses to `use`.
// INVALID_ARGUMENT naming the tag otherwise.
absl::Status CheckTemplate(absl::string_view text, const Scope& scope, HelperUse& use);

struct OfflineOptions {
  uint64_t seed = 0;
  // Where every phrase list starts (each use advances its list by one).
  uint64_t phrase_offset = 0;
  const PhraseLists* phrases = nullptr;
  // JSON recipe: escape values for JSON strings.
  bool json = false;
};

// Renders a template checked with CheckTemplate. `offline` is null for prompts.
absl::StatusOr<std::string> RenderTemplate(absl::string_view text, const VariableValues& values,
                                           const HelperUse& use, const OfflineOptions* offline);

}  // namespace montage::generation::internal

#endif  // MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_MUSTACHE_RENDERER_H_
