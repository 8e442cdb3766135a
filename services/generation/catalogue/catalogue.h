// The creator's prompt catalogue: prompt templates kept as data files (YAML, one per template),
// each with typed, validated variables, Mustache prompts, an optional JSON Schema for structured
// answers and a recipe for the offline provider's deterministic answer. The built-in templates
// (services/generation/templates/*.yaml) are compiled into the binary as data; folders named in
// config add templates or replace built-ins of the same name.
//
// Rendering uses kainjow's Mustache engine; schema validation uses RapidJSON's JSON Schema
// validator. Thread-safe after loading (read-only).
#ifndef MONTAGE_SERVICES_GENERATION_CATALOGUE_CATALOGUE_H_
#define MONTAGE_SERVICES_GENERATION_CATALOGUE_CATALOGUE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/struct.pb.h"
#include "montage/generation/v1/generation.pb.h"

namespace montage::generation {

// One message of a rendered prompt.
struct PromptMessage {
  enum class Role { kSystem, kUser, kAssistant };
  Role role = Role::kUser;
  std::string content;
};

struct TemplateDef;  // defined in catalogue.cc

struct RenderedPrompt {
  std::string template_name;
  std::vector<PromptMessage> messages;
  // The variables after defaults were applied and types checked.
  google::protobuf::Struct variables;
  // JSON Schema (as JSON text) the answer must satisfy; empty for free text.
  std::string output_schema_json;
};

class Catalogue {
 public:
  // The built-in templates, then each folder's *.yaml in order (same name replaces). A broken
  // file is an error naming the file and what is wrong (INVALID_ARGUMENT).
  static absl::StatusOr<std::unique_ptr<Catalogue>> Load(const std::vector<std::string>& dirs);
  // From YAML texts (name of source, text); used by Load and by tests.
  static absl::StatusOr<std::unique_ptr<Catalogue>> FromSources(
      const std::vector<std::pair<std::string, std::string>>& sources);
  ~Catalogue();

  // Public descriptions (sorted by name) for ListTemplates / GetTemplate.
  std::vector<v1::Template> List() const;
  // NOT_FOUND naming the template when unknown.
  absl::StatusOr<v1::Template> Get(absl::string_view name) const;

  // Checks and completes `variables` (required present, types match, defaults applied, unknown
  // names rejected, string sizes bounded) and renders the template's messages. Errors are
  // INVALID_ARGUMENT with a google.rpc.BadRequest field violation on "variables.<name>" (use
  // montage::InvalidFieldError from common/status.h); an unknown template is INVALID_ARGUMENT on
  // field "template".
  absl::StatusOr<RenderedPrompt> Render(absl::string_view name,
                                        const google::protobuf::Struct& variables) const;

  // Parses `text` as JSON (tolerating a ```json fenced block around it) and validates it against
  // `schema_json`. On success fills `parsed`. INVALID_ARGUMENT describing the first violation
  // (JSON pointer and keyword) otherwise.
  static absl::Status ValidateOutput(absl::string_view schema_json, absl::string_view text,
                                     google::protobuf::Value* parsed);

  // The offline provider's answer for a rendered template: deterministic for the same variables
  // and `seed`, produced from the template's offline recipe; for templates with a schema it is
  // valid JSON that satisfies the schema.
  absl::StatusOr<std::string> OfflineAnswer(const RenderedPrompt& prompt, uint64_t seed) const;

 private:
  Catalogue();
  std::vector<std::unique_ptr<TemplateDef>> templates_;  // sorted by name
};

}  // namespace montage::generation

#endif  // MONTAGE_SERVICES_GENERATION_CATALOGUE_CATALOGUE_H_
