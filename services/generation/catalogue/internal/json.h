// JSON for the catalogue: output schemas written in YAML turned into JSON, checked when a
// template loads, and answers validated against them with RapidJSON's JSON Schema (draft-04)
// validator, with messages that name the JSON pointer, the keyword and what was expected.
#ifndef MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_JSON_H_
#define MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_JSON_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "rapidjson/document.h"
#include "rapidjson/schema.h"
#include "yaml-cpp/yaml.h"

namespace montage::generation::internal {

// A YAML value as compact JSON. Quoted scalars are strings; plain scalars that read as JSON
// numbers, true, false or null take that type. Errors name the line.
absl::StatusOr<std::string> YamlToJson(const YAML::Node& node);

// The JSON inside a Markdown code fence (```json … ```) when `text` is or contains one;
// otherwise `text` with surrounding whitespace removed.
absl::string_view StripCodeFence(absl::string_view text);

// `value` as compact or as indented (two spaces) JSON text.
std::string WriteJson(const rapidjson::Value& value, bool pretty);

// Schemas keep their parts in a memory pool released as a whole: RapidJSON 1.1 loses some
// strings when a schema built with its default allocator is destroyed.
using SchemaDocument =
    rapidjson::GenericSchemaDocument<rapidjson::Value, rapidjson::MemoryPoolAllocator<>>;

// A JSON Schema ready to validate documents. Thread-safe: Validate only reads.
class CompiledSchema {
 public:
  // INVALID_ARGUMENT when `schema_json` is not JSON, not an object, or uses keywords or forms
  // RapidJSON does not enforce (so that nothing in a schema is silently ignored).
  static absl::StatusOr<std::unique_ptr<CompiledSchema>> Compile(absl::string_view schema_json);

  // OK, or INVALID_ARGUMENT "at /pointer: keyword \"k\" (what was expected)".
  absl::Status Validate(const rapidjson::Value& document) const;

  // The schema as compact JSON.
  const std::string& json() const { return json_; }

 private:
  CompiledSchema() = default;

  std::string json_;
  rapidjson::Document document_;
  std::unique_ptr<SchemaDocument> schema_;
};

// Parses `text` as strict JSON into `document`; INVALID_ARGUMENT with the reason and offset.
absl::Status ParseJson(absl::string_view text, rapidjson::Document& document,
                       bool allow_trailing_commas = false);

}  // namespace montage::generation::internal

#endif  // MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_JSON_H_
