#include "services/generation/catalogue/internal/json.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "rapidjson/error/en.h"
#include "rapidjson/internal/regex.h"
#include "rapidjson/pointer.h"
#include "rapidjson/prettywriter.h"
#include "rapidjson/stringbuffer.h"
#include "rapidjson/writer.h"

namespace montage::generation::internal {
namespace {

// The part of JSON Schema draft-04 that RapidJSON 1.1 enforces. Schemas are checked against it
// so that a keyword RapidJSON would skip (say "const" or "format") is an error at load, not a
// rule that silently never applies.
constexpr char kMetaSchema[] = R"json({
  "type": "object",
  "additionalProperties": false,
  "definitions": {
    "typeName": {"enum": ["null", "boolean", "object", "array", "string", "number", "integer"]},
    "count": {"type": "integer", "minimum": 0},
    "schemaList": {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
    "schemaMap": {"type": "object", "additionalProperties": {"$ref": "#"}}
  },
  "properties": {
    "$schema": {"type": "string"},
    "$ref": {"type": "string", "pattern": "^#"},
    "id": {"type": "string"},
    "title": {"type": "string"},
    "description": {"type": "string"},
    "default": {},
    "definitions": {"$ref": "#/definitions/schemaMap"},
    "type": {"anyOf": [
      {"$ref": "#/definitions/typeName"},
      {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/typeName"}}]},
    "enum": {"type": "array", "minItems": 1},
    "allOf": {"$ref": "#/definitions/schemaList"},
    "anyOf": {"$ref": "#/definitions/schemaList"},
    "oneOf": {"$ref": "#/definitions/schemaList"},
    "not": {"$ref": "#"},
    "properties": {"$ref": "#/definitions/schemaMap"},
    "patternProperties": {"$ref": "#/definitions/schemaMap"},
    "additionalProperties": {"anyOf": [{"type": "boolean"}, {"$ref": "#"}]},
    "required": {"type": "array", "uniqueItems": true, "items": {"type": "string"}},
    "dependencies": {"type": "object", "additionalProperties": {"anyOf": [
      {"$ref": "#"}, {"type": "array", "items": {"type": "string"}}]}},
    "minProperties": {"$ref": "#/definitions/count"},
    "maxProperties": {"$ref": "#/definitions/count"},
    "items": {"anyOf": [{"$ref": "#"}, {"$ref": "#/definitions/schemaList"}]},
    "additionalItems": {"anyOf": [{"type": "boolean"}, {"$ref": "#"}]},
    "minItems": {"$ref": "#/definitions/count"},
    "maxItems": {"$ref": "#/definitions/count"},
    "uniqueItems": {"type": "boolean"},
    "minLength": {"$ref": "#/definitions/count"},
    "maxLength": {"$ref": "#/definitions/count"},
    "pattern": {"type": "string"},
    "minimum": {"type": "number"},
    "maximum": {"type": "number"},
    "exclusiveMinimum": {"type": "boolean"},
    "exclusiveMaximum": {"type": "boolean"},
    "multipleOf": {"type": "number", "minimum": 0, "exclusiveMinimum": true}
  }
})json";

bool IsJsonNumber(absl::string_view s) {
  size_t i = 0;
  auto digits = [&] {
    const size_t start = i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    return i - start;
  };
  if (i < s.size() && s[i] == '-') ++i;
  const size_t start = i;
  const size_t n = digits();
  if (n == 0 || (n > 1 && s[start] == '0')) return false;
  if (i < s.size() && s[i] == '.') {
    ++i;
    if (digits() == 0) return false;
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    if (digits() == 0) return false;
  }
  return i == s.size();
}

absl::Status YamlToValue(const YAML::Node& node, rapidjson::Value& out,
                         rapidjson::Document::AllocatorType& alloc) {
  const auto line = [&node] { return absl::StrCat("line ", node.Mark().line + 1); };
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      out.SetNull();
      return absl::OkStatus();
    case YAML::NodeType::Scalar: {
      const std::string& s = node.Scalar();
      if (node.Tag() != "?") {  // quoted or explicitly tagged: a string
        out.SetString(s.data(), static_cast<rapidjson::SizeType>(s.size()), alloc);
      } else if (s == "true" || s == "false") {
        out.SetBool(s == "true");
      } else if (s == "null" || s == "~") {
        out.SetNull();
      } else if (int64_t i; IsJsonNumber(s) && absl::SimpleAtoi(s, &i)) {
        out.SetInt64(i);
      } else if (double d; IsJsonNumber(s) && absl::SimpleAtod(s, &d) && std::isfinite(d)) {
        out.SetDouble(d);
      } else {
        out.SetString(s.data(), static_cast<rapidjson::SizeType>(s.size()), alloc);
      }
      return absl::OkStatus();
    }
    case YAML::NodeType::Sequence:
      out.SetArray();
      for (const YAML::Node& item : node) {
        rapidjson::Value v;
        if (absl::Status s = YamlToValue(item, v, alloc); !s.ok()) return s;
        out.PushBack(v, alloc);
      }
      return absl::OkStatus();
    case YAML::NodeType::Map:
      out.SetObject();
      for (const auto& kv : node) {
        if (!kv.first.IsScalar()) {
          return absl::InvalidArgumentError(absl::StrCat(line(), ": keys must be plain text"));
        }
        const std::string& key = kv.first.Scalar();
        if (out.HasMember(key.c_str())) {
          return absl::InvalidArgumentError(absl::StrCat(line(), ": duplicate key \"", key, "\""));
        }
        rapidjson::Value v;
        if (absl::Status s = YamlToValue(kv.second, v, alloc); !s.ok()) return s;
        out.AddMember(rapidjson::Value(key.c_str(), alloc), v, alloc);
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(line(), ": unsupported YAML node"));
}

template <typename Pointer>
std::string PointerText(const Pointer& pointer) {
  rapidjson::StringBuffer buffer;
  pointer.Stringify(buffer);
  return buffer.GetSize() == 0 ? "/" : buffer.GetString();
}

const char* TypeName(const rapidjson::Value& v) {
  if (v.IsNull()) return "null";
  if (v.IsBool()) return "boolean";
  if (v.IsObject()) return "object";
  if (v.IsArray()) return "array";
  if (v.IsString()) return "string";
  if (v.IsInt64() || v.IsUint64()) return "integer";
  return "number";
}

// What the failed keyword asked for, read from the schema, and what the document had.
std::string Explain(const char* keyword, const rapidjson::Value* schema,
                    const rapidjson::Value* doc) {
  const absl::string_view k = keyword;
  const rapidjson::Value* rule =
      schema != nullptr && schema->IsObject() && schema->HasMember(keyword) ? &(*schema)[keyword]
                                                                            : nullptr;
  if (k == "required" && rule != nullptr && rule->IsArray() && doc != nullptr && doc->IsObject()) {
    std::vector<std::string> missing;
    for (const auto& name : rule->GetArray()) {
      if (name.IsString() && !doc->HasMember(name)) {
        missing.push_back(absl::StrCat("\"", name.GetString(), "\""));
      }
    }
    return absl::StrCat("missing ", absl::StrJoin(missing, ", "));
  }
  if (k == "additionalProperties") return "property not allowed by the schema";
  if (rule == nullptr) return "";
  const std::string want = WriteJson(*rule, /*pretty=*/false);
  const std::string got = doc == nullptr ? "" : absl::StrCat(", got ", TypeName(*doc));
  if (k == "type") return absl::StrCat("expected ", want, got);
  if (k == "enum") return absl::StrCat("expected one of ", want);
  if (k == "maxLength" || k == "maxItems" || k == "maxProperties" || k == "maximum") {
    return absl::StrCat("limit is ", want);
  }
  if (k == "minLength" || k == "minItems" || k == "minProperties" || k == "minimum") {
    return absl::StrCat("minimum is ", want);
  }
  if (k == "pattern") return absl::StrCat("must match ", want);
  return absl::StrCat(k, " ", want);
}

// Checks what the meta-schema cannot: `$ref`s resolve and regular expressions compile (RapidJSON
// skips both silently when they are broken).
absl::Status CheckRefsAndPatterns(const rapidjson::Value& root, const rapidjson::Value& node,
                                  const std::string& where) {
  if (node.IsArray()) {
    for (rapidjson::SizeType i = 0; i < node.Size(); ++i) {
      if (absl::Status s = CheckRefsAndPatterns(root, node[i], absl::StrCat(where, "/", i));
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  if (!node.IsObject()) return absl::OkStatus();
  for (const auto& member : node.GetObject()) {
    const std::string key = member.name.GetString();
    const std::string path = absl::StrCat(where, "/", key);
    if (key == "$ref" && member.value.IsString()) {
      const absl::string_view ref = member.value.GetString();
      rapidjson::Pointer pointer(ref.data(), ref.size());  // a URI fragment, "#/…"
      if (!pointer.IsValid() || pointer.Get(root) == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("at ", path, ": \"", ref, "\" does not point into this schema"));
      }
    }
    if (key == "pattern" && member.value.IsString()) {
      rapidjson::internal::Regex regex(member.value.GetString());
      if (!regex.IsValid()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "at ", path, ": \"", member.value.GetString(), "\" is not a supported regex"));
      }
    }
    if (key == "patternProperties" && member.value.IsObject()) {
      for (const auto& p : member.value.GetObject()) {
        rapidjson::internal::Regex regex(p.name.GetString());
        if (!regex.IsValid()) {
          return absl::InvalidArgumentError(
              absl::StrCat("at ", path, ": \"", p.name.GetString(), "\" is not a supported regex"));
        }
      }
    }
    // "enum" and "default" hold data, not schemas.
    if (key == "enum" || key == "default") continue;
    if (absl::Status s = CheckRefsAndPatterns(root, member.value, path); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ValidateWith(const SchemaDocument& schema, const rapidjson::Value& schema_root,
                          const rapidjson::Value& document) {
  rapidjson::GenericSchemaValidator<SchemaDocument> validator(schema);
  document.Accept(validator);
  if (validator.IsValid()) return absl::OkStatus();
  const char* keyword = validator.GetInvalidSchemaKeyword();
  const rapidjson::Value* rule = validator.GetInvalidSchemaPointer().Get(schema_root);
  const rapidjson::Value* at = validator.GetInvalidDocumentPointer().Get(document);
  const std::string why = Explain(keyword, rule, at);
  return absl::InvalidArgumentError(
      absl::StrCat("at ", PointerText(validator.GetInvalidDocumentPointer()), ": keyword \"",
                   keyword, "\" failed", why.empty() ? "" : ": ", why));
}

const rapidjson::Document& MetaSchemaDocument() {
  static const auto* const kDoc = [] {
    auto* doc = new rapidjson::Document;
    doc->Parse(kMetaSchema);
    return doc;
  }();
  return *kDoc;
}

const SchemaDocument& MetaSchema() {
  static const auto* const kSchema = new SchemaDocument(MetaSchemaDocument());
  return *kSchema;
}

}  // namespace

absl::StatusOr<std::string> YamlToJson(const YAML::Node& node) {
  rapidjson::Document doc;
  if (absl::Status s = YamlToValue(node, doc, doc.GetAllocator()); !s.ok()) return s;
  return WriteJson(doc, /*pretty=*/false);
}

absl::string_view StripCodeFence(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  const size_t open = text.find("```");
  // A fence counts when the text starts with it, or when the text is not JSON by itself (prose
  // around a fenced block).
  if (open == absl::string_view::npos ||
      (open != 0 && !text.empty() && (text.front() == '{' || text.front() == '['))) {
    return text;
  }
  const size_t body = text.find('\n', open);
  if (body == absl::string_view::npos) return text;
  const size_t close = text.find("```", body);
  if (close == absl::string_view::npos) return absl::StripAsciiWhitespace(text.substr(body));
  return absl::StripAsciiWhitespace(text.substr(body, close - body));
}

std::string WriteJson(const rapidjson::Value& value, bool pretty) {
  rapidjson::StringBuffer buffer;
  if (pretty) {
    rapidjson::PrettyWriter<rapidjson::StringBuffer> writer(buffer);
    writer.SetIndent(' ', 2);
    value.Accept(writer);
  } else {
    rapidjson::Writer<rapidjson::StringBuffer> writer(buffer);
    value.Accept(writer);
  }
  return std::string(buffer.GetString(), buffer.GetSize());
}

absl::Status ParseJson(absl::string_view text, rapidjson::Document& document,
                       bool allow_trailing_commas) {
  constexpr unsigned kStrict = rapidjson::kParseValidateEncodingFlag;
  constexpr unsigned kLenient = kStrict | rapidjson::kParseTrailingCommasFlag;
  if (allow_trailing_commas) {
    document.Parse<kLenient>(text.data(), text.size());
  } else {
    document.Parse<kStrict>(text.data(), text.size());
  }
  if (!document.HasParseError()) return absl::OkStatus();
  const size_t offset = document.GetErrorOffset();
  const size_t from = offset > 20 ? offset - 20 : 0;
  return absl::InvalidArgumentError(
      absl::StrCat("not valid JSON: ", rapidjson::GetParseError_En(document.GetParseError()),
                   " (at offset ", offset, ", near \"", text.substr(from, 40), "\")"));
}

absl::StatusOr<std::unique_ptr<CompiledSchema>> CompiledSchema::Compile(
    absl::string_view schema_json) {
  std::unique_ptr<CompiledSchema> compiled(new CompiledSchema);
  if (absl::Status s = ParseJson(schema_json, compiled->document_); !s.ok()) return s;
  if (!compiled->document_.IsObject()) {
    return absl::InvalidArgumentError("a JSON Schema must be an object");
  }
  if (absl::Status s = ValidateWith(MetaSchema(), MetaSchemaDocument(), compiled->document_);
      !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not a JSON Schema that RapidJSON enforces (draft-04 keywords only) ", s.message()));
  }
  if (absl::Status s = CheckRefsAndPatterns(compiled->document_, compiled->document_, "");
      !s.ok()) {
    return s;
  }
  compiled->schema_ = std::make_unique<SchemaDocument>(compiled->document_);
  compiled->json_ = WriteJson(compiled->document_, /*pretty=*/false);
  return compiled;
}

absl::Status CompiledSchema::Validate(const rapidjson::Value& document) const {
  return ValidateWith(*schema_, document_, document);
}

}  // namespace montage::generation::internal
