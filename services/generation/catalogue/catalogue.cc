#include "services/generation/catalogue/catalogue.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "google/protobuf/util/json_util.h"
#include "services/generation/catalogue/internal/builtin_templates.h"
#include "services/generation/catalogue/internal/json.h"
#include "services/generation/catalogue/internal/mustache_renderer.h"
#include "services/generation/catalogue/internal/text.h"
#include "yaml-cpp/yaml.h"

namespace montage::generation {

using internal::VariableType;
using internal::VariableValue;
using internal::VariableValues;

struct VariableDef {
  std::string name;
  VariableType type = VariableType::kString;
  bool required = false;
  std::string description;
  std::optional<google::protobuf::Value> default_value;
  size_t max_length = 0;  // strings and array items, in characters
  std::optional<double> min, max;
  std::vector<std::string> enum_values;
  size_t max_items = 0;
};

struct TemplateDef {
  std::string source;
  std::string name;
  std::string description;
  std::vector<VariableDef> variables;
  std::string system;
  std::string user;
  internal::HelperUse prompt_use;
  std::unique_ptr<internal::CompiledSchema> schema;  // null for free text
  std::string offline_answer;
  internal::PhraseLists phrases;
  internal::HelperUse offline_use;
  v1::Template proto;
};

namespace {

namespace fs = std::filesystem;

constexpr size_t kDefaultMaxLength = 20000;
constexpr size_t kDefaultMaxItems = 50;
constexpr double kMaxSafeInteger = 9007199254740992.0;  // 2^53: exact in a JSON number

// The helpers' names; a variable or phrase list cannot take them. (Loop fields such as `index`
// may be variable names: inside a loop the loop's field wins, as Mustache scoping has it.)
const absl::flat_hash_set<absl::string_view>& ReservedNames() {
  static const auto* const kNames = new absl::flat_hash_set<absl::string_view>{
      "json",   "join", "is",  "times", "each", "words",     "tag",
      "points", "clip", "nth", "is_n",  "seed", "capitalize"};
  return *kNames;
}

bool IsIdentifier(absl::string_view name) {
  if (name.empty() || !absl::ascii_islower(static_cast<unsigned char>(name[0]))) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_islower(static_cast<unsigned char>(c)) ||
           absl::ascii_isdigit(static_cast<unsigned char>(c)) || c == '_';
  });
}

const char* TypeName(VariableType type) {
  switch (type) {
    case VariableType::kString:
      return "string";
    case VariableType::kInteger:
      return "integer";
    case VariableType::kNumber:
      return "number";
    case VariableType::kBoolean:
      return "boolean";
    case VariableType::kArray:
      return "array";
  }
  return "?";
}

std::optional<VariableType> ParseTypeName(absl::string_view name) {
  for (VariableType t : {VariableType::kString, VariableType::kInteger, VariableType::kNumber,
                         VariableType::kBoolean, VariableType::kArray}) {
    if (name == TypeName(t)) return t;
  }
  return std::nullopt;
}

std::string FormatNumber(double d) { return absl::StrFormat("%.15g", d); }

// ---------------------------------------------------------------------------------------------
// Values: checking a request's variables and turning them into what templates see.

absl::Status CheckString(const VariableDef& def, const std::string& field, absl::string_view s,
                         bool is_item) {
  const size_t length = internal::CountCodePoints(s);
  if (length > def.max_length) {
    return InvalidFieldError(
        field, absl::StrCat("must be at most ", def.max_length, " characters (got ", length, ")"));
  }
  if (!def.enum_values.empty() &&
      std::find(def.enum_values.begin(), def.enum_values.end(), s) == def.enum_values.end()) {
    return InvalidFieldError(
        field, absl::StrCat("must be one of: ", absl::StrJoin(def.enum_values, ", "), " (got \"",
                            internal::Clip(s, 40), "\")"));
  }
  if ((is_item || def.required) && absl::StripAsciiWhitespace(s).empty()) {
    return InvalidFieldError(
        field,
        is_item ? "must not be empty" : absl::StrCat("must not be empty (", def.description, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckRange(const VariableDef& def, const std::string& field, double d) {
  const auto text = [&def](double v) {
    return def.type == VariableType::kInteger ? absl::StrCat(static_cast<int64_t>(v))
                                              : FormatNumber(v);
  };
  const bool low = def.min.has_value() && d < *def.min;
  const bool high = def.max.has_value() && d > *def.max;
  if (!low && !high) return absl::OkStatus();
  std::string rule;
  if (def.min.has_value() && def.max.has_value()) {
    rule = absl::StrCat("must be between ", text(*def.min), " and ", text(*def.max));
  } else if (low) {
    rule = absl::StrCat("must be at least ", text(*def.min));
  } else {
    rule = absl::StrCat("must be at most ", text(*def.max));
  }
  return InvalidFieldError(field, absl::StrCat(rule, " (got ", FormatNumber(d), ")"));
}

// Checks one supplied value against its declaration.
absl::StatusOr<VariableValue> CheckValue(const VariableDef& def, const std::string& field,
                                         const google::protobuf::Value& value) {
  using Kind = google::protobuf::Value::KindCase;
  VariableValue out;
  out.type = def.type;
  switch (def.type) {
    case VariableType::kString:
      if (value.kind_case() != Kind::kStringValue) {
        return InvalidFieldError(field, "must be a string");
      }
      RETURN_IF_ERROR(CheckString(def, field, value.string_value(), /*is_item=*/false));
      out.text = value.string_value();
      return out;
    case VariableType::kInteger: {
      const double d = value.number_value();
      if (value.kind_case() != Kind::kNumberValue || !std::isfinite(d) || std::trunc(d) != d ||
          std::fabs(d) > kMaxSafeInteger) {
        return InvalidFieldError(field, "must be an integer");
      }
      RETURN_IF_ERROR(CheckRange(def, field, d));
      out.integer = static_cast<int64_t>(d);
      out.text = absl::StrCat(out.integer);
      return out;
    }
    case VariableType::kNumber: {
      const double d = value.number_value();
      if (value.kind_case() != Kind::kNumberValue || !std::isfinite(d)) {
        return InvalidFieldError(field, "must be a number");
      }
      RETURN_IF_ERROR(CheckRange(def, field, d));
      out.text = FormatNumber(d);
      return out;
    }
    case VariableType::kBoolean:
      if (value.kind_case() != Kind::kBoolValue) {
        return InvalidFieldError(field, "must be a boolean (true or false)");
      }
      out.boolean = value.bool_value();
      out.text = out.boolean ? "true" : "false";
      return out;
    case VariableType::kArray: {
      if (value.kind_case() != Kind::kListValue) {
        return InvalidFieldError(field, "must be an array of strings");
      }
      const auto& list = value.list_value().values();
      if (static_cast<size_t>(list.size()) > def.max_items) {
        return InvalidFieldError(field, absl::StrCat("must have at most ", def.max_items,
                                                     " items (got ", list.size(), ")"));
      }
      if (def.required && list.empty()) {
        return InvalidFieldError(field, absl::StrCat("must not be empty (", def.description, ")"));
      }
      for (int i = 0; i < list.size(); ++i) {
        const std::string item_field = absl::StrCat(field, "[", i, "]");
        if (list[i].kind_case() != Kind::kStringValue) {
          return InvalidFieldError(item_field, "must be a string");
        }
        RETURN_IF_ERROR(CheckString(def, item_field, list[i].string_value(), /*is_item=*/true));
        out.items.push_back(list[i].string_value());
      }
      return out;
    }
  }
  return absl::InternalError("unknown variable type");
}

google::protobuf::Value ToProtoValue(const VariableValue& value) {
  google::protobuf::Value out;
  switch (value.type) {
    case VariableType::kString:
      out.set_string_value(value.text);
      break;
    case VariableType::kInteger:
      out.set_number_value(static_cast<double>(value.integer));
      break;
    case VariableType::kNumber: {
      double d = 0;
      (void)absl::SimpleAtod(value.text, &d);
      out.set_number_value(d);
      break;
    }
    case VariableType::kBoolean:
      out.set_bool_value(value.boolean);
      break;
    case VariableType::kArray:
      out.mutable_list_value();  // an empty list is still a list
      for (const std::string& item : value.items) {
        out.mutable_list_value()->add_values()->set_string_value(item);
      }
      break;
  }
  return out;
}

struct CheckedVariables {
  VariableValues values;
  google::protobuf::Struct normalized;
};

absl::StatusOr<CheckedVariables> CheckVariables(const TemplateDef& def,
                                                const google::protobuf::Struct& variables) {
  // Unknown names first, in name order so that the error is stable.
  std::vector<std::string> given;
  for (const auto& [name, unused] : variables.fields()) given.push_back(name);
  std::sort(given.begin(), given.end());
  for (const std::string& name : given) {
    const bool known = std::any_of(def.variables.begin(), def.variables.end(),
                                   [&name](const VariableDef& v) { return v.name == name; });
    if (!known) {
      std::vector<std::string> names;
      for (const VariableDef& v : def.variables) names.push_back(v.name);
      return InvalidFieldError(
          absl::StrCat("variables.", name),
          absl::StrCat("is not a variable of template ", def.name,
                       " (known: ", names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
    }
  }
  CheckedVariables out;
  for (const VariableDef& v : def.variables) {
    const std::string field = absl::StrCat("variables.", v.name);
    auto it = variables.fields().find(v.name);
    const bool present = it != variables.fields().end() &&
                         it->second.kind_case() != google::protobuf::Value::kNullValue &&
                         it->second.kind_case() != google::protobuf::Value::KIND_NOT_SET;
    const google::protobuf::Value* value = present ? &it->second : nullptr;
    if (value == nullptr && v.default_value.has_value()) value = &*v.default_value;
    if (value == nullptr) {
      if (v.required)
        return InvalidFieldError(field, absl::StrCat("is required (", v.description, ")"));
      continue;
    }
    ASSIGN_OR_RETURN(VariableValue checked, CheckValue(v, field, *value));
    (*out.normalized.mutable_fields())[v.name] = ToProtoValue(checked);
    out.values.emplace_back(v.name, std::move(checked));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Rendering.

// Trailing spaces go, runs of blank lines become one, and the ends are trimmed.
std::string Tidy(absl::string_view text) {
  std::vector<absl::string_view> lines = absl::StrSplit(text, '\n');
  std::string out;
  int blank = 0;
  for (absl::string_view line : lines) {
    line = absl::StripTrailingAsciiWhitespace(line);
    if (line.empty()) {
      if (++blank > 1) continue;
    } else {
      blank = 0;
    }
    absl::StrAppend(&out, line, "\n");
  }
  return std::string(absl::StripAsciiWhitespace(out));
}

// JSON recipes are written across lines for readability; the line breaks, with the indentation
// after them, are layout and not part of the answer. (Values never contain raw line breaks here:
// they are escaped as \n.)
std::string JoinLines(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    if (text[i] == '\n' || text[i] == '\r') {
      while (i < text.size() && absl::ascii_isspace(static_cast<unsigned char>(text[i]))) ++i;
      continue;
    }
    out.push_back(text[i++]);
  }
  return out;
}

uint64_t Fnv1a(absl::string_view text, uint64_t hash = 1469598103934665603ull) {
  for (char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 1099511628211ull;
  }
  return hash;
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::string SchemaInstruction(const internal::CompiledSchema& schema) {
  return absl::StrCat(
      "Reply with one JSON object and nothing else: no introduction, no comments, no Markdown "
      "code fence. It must be valid against this JSON Schema:\n",
      schema.json());
}

absl::StatusOr<RenderedPrompt> RenderPrompt(const TemplateDef& def,
                                            const google::protobuf::Struct& variables) {
  ASSIGN_OR_RETURN(CheckedVariables checked, CheckVariables(def, variables));
  RenderedPrompt prompt;
  prompt.template_name = def.name;
  if (!def.system.empty()) {
    ASSIGN_OR_RETURN(std::string system,
                     internal::RenderTemplate(def.system, checked.values, def.prompt_use, nullptr));
    system = Tidy(system);
    if (!system.empty()) {
      prompt.messages.push_back({PromptMessage::Role::kSystem, std::move(system)});
    }
  }
  ASSIGN_OR_RETURN(std::string user,
                   internal::RenderTemplate(def.user, checked.values, def.prompt_use, nullptr));
  user = Tidy(user);
  if (def.schema != nullptr) {
    absl::StrAppend(&user, "\n\n", SchemaInstruction(*def.schema));
    prompt.output_schema_json = def.schema->json();
  }
  prompt.messages.push_back({PromptMessage::Role::kUser, std::move(user)});
  prompt.variables = std::move(checked.normalized);
  return prompt;
}

absl::StatusOr<std::string> RenderOffline(const TemplateDef& def, const VariableValues& values,
                                          uint64_t seed) {
  // Phrase lists start at a place chosen by the seed and the variables, so that different seeds
  // and different inputs read differently while each stays reproducible.
  uint64_t fingerprint = Fnv1a(def.name);
  for (const auto& [name, value] : values) {
    fingerprint = Fnv1a(name, fingerprint);
    fingerprint = Fnv1a(value.text, fingerprint);
    for (const std::string& item : value.items) fingerprint = Fnv1a(item, fingerprint);
  }
  internal::OfflineOptions options;
  options.seed = seed;
  options.phrase_offset = SplitMix64(seed ^ fingerprint) >> 1;
  options.phrases = &def.phrases;
  options.json = def.schema != nullptr;
  ASSIGN_OR_RETURN(std::string text,
                   internal::RenderTemplate(def.offline_answer, values, def.offline_use, &options));
  if (def.schema == nullptr) {
    text = Tidy(text);
    if (text.empty()) {
      return absl::InternalError(
          absl::StrCat("the offline recipe of template ", def.name, " produced an empty answer"));
    }
    return text;
  }
  rapidjson::Document doc;
  if (absl::Status s = internal::ParseJson(JoinLines(text), doc, /*allow_trailing_commas=*/true);
      !s.ok()) {
    return absl::InternalError(absl::StrCat("the offline recipe of template ", def.name,
                                            " produced an answer that is ", s.message()));
  }
  if (absl::Status s = def.schema->Validate(doc); !s.ok()) {
    return absl::InternalError(absl::StrCat("the offline recipe of template ", def.name,
                                            " produced an answer that does not match "
                                            "output_schema: ",
                                            s.message()));
  }
  return internal::WriteJson(doc, /*pretty=*/true);
}

// ---------------------------------------------------------------------------------------------
// Loading.

class YamlError {
 public:
  explicit YamlError(const std::string& source) : source_(source) {}
  absl::Status operator()(const YAML::Node& node, absl::string_view message) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ":", node.Mark().line + 1, ": ", message));
  }
  absl::Status operator()(absl::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", message));
  }

 private:
  const std::string& source_;
};

absl::StatusOr<std::string> ScalarText(const YAML::Node& node, absl::string_view what,
                                       const YamlError& error) {
  if (!node.IsScalar()) return error(node, absl::StrCat(what, " must be text"));
  return node.Scalar();
}

absl::StatusOr<double> ScalarNumber(const YAML::Node& node, absl::string_view what,
                                    const YamlError& error) {
  double d = 0;
  if (!node.IsScalar() || !absl::SimpleAtod(node.Scalar(), &d) || !std::isfinite(d)) {
    return error(node, absl::StrCat(what, " must be a number"));
  }
  return d;
}

absl::StatusOr<bool> ScalarBool(const YAML::Node& node, absl::string_view what,
                                const YamlError& error) {
  if (node.IsScalar() && (node.Scalar() == "true" || node.Scalar() == "false")) {
    return node.Scalar() == "true";
  }
  return error(node, absl::StrCat(what, " must be true or false"));
}

absl::Status CheckKeys(const YAML::Node& map, std::initializer_list<absl::string_view> allowed,
                       absl::string_view what, const YamlError& error) {
  for (const auto& kv : map) {
    const std::string key = kv.first.IsScalar() ? kv.first.Scalar() : "?";
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      return error(kv.first, absl::StrCat("unknown key \"", key, "\" in ", what,
                                          " (allowed: ", absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<VariableDef> ParseVariable(const YAML::Node& node, size_t index,
                                          const YamlError& error) {
  const std::string where = absl::StrCat("variables[", index, "]");
  if (!node.IsMap()) return error(node, absl::StrCat(where, " must be a mapping"));
  RETURN_IF_ERROR(CheckKeys(node,
                            {"name", "type", "required", "description", "default", "max_length",
                             "min", "max", "enum", "max_items"},
                            where, error));
  VariableDef v;
  if (!node["name"]) return error(node, absl::StrCat(where, " needs a name"));
  ASSIGN_OR_RETURN(v.name, ScalarText(node["name"], where + ".name", error));
  const std::string at = absl::StrCat("variable ", v.name);
  if (!IsIdentifier(v.name) || ReservedNames().contains(v.name)) {
    return error(node["name"], absl::StrCat("\"", v.name,
                                            "\" cannot name a variable: use lower_snake_case, "
                                            "and not a helper's name"));
  }
  if (!node["type"]) return error(node, absl::StrCat(at, " needs a type"));
  ASSIGN_OR_RETURN(std::string type, ScalarText(node["type"], at + ": type", error));
  std::optional<VariableType> parsed_type = ParseTypeName(type);
  if (!parsed_type) {
    return error(node["type"], absl::StrCat(at,
                                            ": type must be one of string, integer, number, "
                                            "boolean, array (got \"",
                                            type, "\")"));
  }
  v.type = *parsed_type;
  if (node["required"]) {
    ASSIGN_OR_RETURN(v.required, ScalarBool(node["required"], at + ": required", error));
  }
  if (!node["description"]) return error(node, absl::StrCat(at, " needs a description"));
  ASSIGN_OR_RETURN(v.description, ScalarText(node["description"], at + ": description", error));
  v.description = std::string(absl::StripAsciiWhitespace(v.description));

  const bool text_like = v.type == VariableType::kString || v.type == VariableType::kArray;
  const bool numeric = v.type == VariableType::kInteger || v.type == VariableType::kNumber;
  v.max_length = kDefaultMaxLength;
  if (node["max_length"]) {
    if (!text_like) return error(node["max_length"], at + ": max_length is for strings and arrays");
    ASSIGN_OR_RETURN(double d, ScalarNumber(node["max_length"], at + ": max_length", error));
    if (d < 1 || std::trunc(d) != d) {
      return error(node["max_length"], at + ": max_length must be a positive integer");
    }
    v.max_length = static_cast<size_t>(d);
  }
  for (const char* key : {"min", "max"}) {
    if (!node[key]) continue;
    if (!numeric) return error(node[key], absl::StrCat(at, ": ", key, " is for numbers"));
    ASSIGN_OR_RETURN(double d, ScalarNumber(node[key], absl::StrCat(at, ": ", key), error));
    if (v.type == VariableType::kInteger && std::trunc(d) != d) {
      return error(node[key], absl::StrCat(at, ": ", key, " must be an integer"));
    }
    (absl::string_view(key) == "min" ? v.min : v.max) = d;
  }
  if (v.min && v.max && *v.min > *v.max) return error(node, at + ": min is above max");
  if (node["enum"]) {
    if (!text_like) return error(node["enum"], at + ": enum is for strings and arrays");
    if (!node["enum"].IsSequence() || node["enum"].size() == 0) {
      return error(node["enum"], at + ": enum must be a non-empty list");
    }
    for (const YAML::Node& item : node["enum"]) {
      ASSIGN_OR_RETURN(std::string value, ScalarText(item, at + ": enum values", error));
      v.enum_values.push_back(value);
    }
  }
  v.max_items = kDefaultMaxItems;
  if (node["max_items"]) {
    if (v.type != VariableType::kArray)
      return error(node["max_items"], at + ": max_items is for arrays");
    ASSIGN_OR_RETURN(double d, ScalarNumber(node["max_items"], at + ": max_items", error));
    if (d < 1 || std::trunc(d) != d) {
      return error(node["max_items"], at + ": max_items must be a positive integer");
    }
    v.max_items = static_cast<size_t>(d);
  }
  if (node["default"]) {
    if (v.required) return error(node["default"], at + " has a default, so it cannot be required");
    ASSIGN_OR_RETURN(std::string json, internal::YamlToJson(node["default"]));
    google::protobuf::Value value;
    if (!google::protobuf::util::JsonStringToMessage(json, &value).ok()) {
      return error(node["default"], at + ": default is not a plain value");
    }
    absl::StatusOr<VariableValue> checked = CheckValue(v, "default", value);
    if (!checked.ok()) {
      return error(node["default"], absl::StrCat(at, ": ", checked.status().message()));
    }
    v.default_value = ToProtoValue(*checked);
  }
  return v;
}

std::string DescribeForCallers(const VariableDef& v) {
  std::string text = v.description;
  const auto number = [&v](double d) {
    return v.type == VariableType::kInteger ? absl::StrCat(static_cast<int64_t>(d))
                                            : FormatNumber(d);
  };
  if (!v.enum_values.empty()) {
    absl::StrAppend(&text, v.type == VariableType::kArray ? " Each one of: " : " One of: ",
                    absl::StrJoin(v.enum_values, ", "), ".");
  }
  if (v.min && v.max) {
    absl::StrAppend(&text, " From ", number(*v.min), " to ", number(*v.max), ".");
  } else if (v.min) {
    absl::StrAppend(&text, " At least ", number(*v.min), ".");
  } else if (v.max) {
    absl::StrAppend(&text, " At most ", number(*v.max), ".");
  }
  if (v.type == VariableType::kString && v.enum_values.empty()) {
    absl::StrAppend(&text, " Up to ", v.max_length, " characters.");
  }
  if (v.type == VariableType::kArray) absl::StrAppend(&text, " Up to ", v.max_items, " items.");
  return text;
}

// Variables to exercise a template with at load: `stress` takes the largest counts, long texts
// and leaves optional variables without defaults out; otherwise typical values and every
// optional variable set. Strings carry quotes, backslashes, newlines, Unicode and braces.
google::protobuf::Struct SampleVariables(const TemplateDef& def, bool stress) {
  static constexpr absl::string_view kNasty =
      "Say \"hi\" \\ to {{topic}} & <b>you</b>\nnew line, tab\t, café ✓ 🎬 ";
  google::protobuf::Struct out;
  for (const VariableDef& v : def.variables) {
    if (stress && !v.required && !v.default_value) continue;
    google::protobuf::Value value;
    switch (v.type) {
      case VariableType::kString:
        if (!v.enum_values.empty()) {
          value.set_string_value(stress ? v.enum_values.back() : v.enum_values.front());
        } else {
          std::string text(kNasty);
          while (stress && internal::CountCodePoints(text) < std::min<size_t>(v.max_length, 3000)) {
            absl::StrAppend(&text, kNasty);
          }
          value.set_string_value(internal::TruncateCodePoints(text, v.max_length));
        }
        break;
      case VariableType::kInteger:
      case VariableType::kNumber: {
        double d = v.type == VariableType::kInteger ? 1 : 1.5;
        if (v.default_value) d = v.default_value->number_value();
        if (stress && v.max) d = *v.max;
        if (v.min) d = std::max(d, *v.min);
        if (v.max) d = std::min(d, *v.max);
        value.set_number_value(d);
        break;
      }
      case VariableType::kBoolean:
        value.set_bool_value(!stress);
        break;
      case VariableType::kArray: {
        std::vector<std::string> items = v.enum_values;
        if (items.empty()) {
          items = {"first \"item\"", "second\\item\nwith a line", "drittes {{.}} ✓", "four",
                   "five"};
        }
        items.resize(std::min<size_t>({items.size(), stress ? items.size() : 2, v.max_items}));
        for (const std::string& item : items) {
          value.mutable_list_value()->add_values()->set_string_value(
              internal::TruncateCodePoints(item, v.max_length));
        }
        break;
      }
    }
    (*out.mutable_fields())[v.name] = value;
  }
  return out;
}

// Renders the prompt and the offline answer for sample variables and a few seeds, so that a
// template whose recipe cannot produce a valid answer never loads.
absl::Status SelfCheck(const TemplateDef& def) {
  for (bool stress : {false, true}) {
    const google::protobuf::Struct sample = SampleVariables(def, stress);
    const std::string which = stress ? "long sample values" : "typical sample values";
    absl::StatusOr<RenderedPrompt> prompt = RenderPrompt(def, sample);
    if (!prompt.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(def.source, ": rendering the prompt with ",
                                                     which,
                                                     " failed: ", prompt.status().message()));
    }
    absl::StatusOr<CheckedVariables> checked = CheckVariables(def, sample);
    if (!checked.ok()) return checked.status();
    for (uint64_t seed : {0, 1, 2}) {
      absl::StatusOr<std::string> answer = RenderOffline(def, checked->values, seed);
      if (!answer.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(def.source, ": with ", which, " and seed ",
                                                       seed, ", ", answer.status().message()));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TemplateDef>> ParseTemplate(const std::string& source,
                                                           const std::string& text) {
  const YamlError error(source);
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", e.mark.line + 1, ": not valid YAML: ", e.msg));
  }
  auto def = std::make_unique<TemplateDef>();
  def->source = source;
  try {
    if (!root.IsMap()) return error("a template must be a YAML mapping");
    RETURN_IF_ERROR(CheckKeys(
        root, {"name", "description", "variables", "system", "user", "output_schema", "offline"},
        "the template", error));
    for (const char* key : {"name", "description", "user", "offline"}) {
      if (!root[key]) return error(absl::StrCat("missing \"", key, "\""));
    }
    ASSIGN_OR_RETURN(def->name, ScalarText(root["name"], "name", error));
    if (!IsIdentifier(def->name)) {
      return error(root["name"], "name must be lower_snake_case (a-z, 0-9, _)");
    }
    ASSIGN_OR_RETURN(def->description, ScalarText(root["description"], "description", error));
    def->description = std::string(absl::StripAsciiWhitespace(def->description));
    if (def->description.empty()) return error(root["description"], "description is empty");
    if (root["system"]) {
      ASSIGN_OR_RETURN(def->system, ScalarText(root["system"], "system", error));
    }
    ASSIGN_OR_RETURN(def->user, ScalarText(root["user"], "user", error));
    if (absl::StripAsciiWhitespace(def->user).empty()) return error(root["user"], "user is empty");

    internal::Scope scope;
    if (const YAML::Node vars = root["variables"]) {
      if (!vars.IsSequence()) return error(vars, "variables must be a list");
      for (size_t i = 0; i < vars.size(); ++i) {
        ASSIGN_OR_RETURN(VariableDef v, ParseVariable(vars[i], i, error));
        if (scope.variables.count(v.name)) {
          return error(vars[i], absl::StrCat("variable ", v.name, " is declared twice"));
        }
        scope.variables[v.name] = {v.type, v.max.has_value(), v.max.value_or(0)};
        def->variables.push_back(std::move(v));
      }
    }

    if (const YAML::Node schema = root["output_schema"]) {
      ASSIGN_OR_RETURN(std::string json, internal::YamlToJson(schema));
      absl::StatusOr<std::unique_ptr<internal::CompiledSchema>> compiled =
          internal::CompiledSchema::Compile(json);
      if (!compiled.ok()) {
        return error(schema, absl::StrCat("output_schema: ", compiled.status().message()));
      }
      def->schema = *std::move(compiled);
      if (!schema.IsMap() || !schema["type"] || !schema["type"].IsScalar() ||
          schema["type"].Scalar() != "object") {
        return error(schema, "output_schema must describe an object (type: object)");
      }
    }

    const YAML::Node offline = root["offline"];
    if (!offline.IsMap()) return error(offline, "offline must be a mapping with an answer");
    RETURN_IF_ERROR(CheckKeys(offline, {"answer", "phrases"}, "offline", error));
    if (!offline["answer"]) return error(offline, "offline needs an answer (a Mustache recipe)");
    ASSIGN_OR_RETURN(def->offline_answer, ScalarText(offline["answer"], "offline.answer", error));
    if (const YAML::Node phrases = offline["phrases"]) {
      if (!phrases.IsMap()) return error(phrases, "offline.phrases must map names to lists");
      for (const auto& kv : phrases) {
        const std::string name = kv.first.Scalar();
        if (!IsIdentifier(name) || ReservedNames().contains(name) || scope.variables.count(name)) {
          return error(kv.first, absl::StrCat("\"", name,
                                              "\" cannot name a phrase list: use "
                                              "lower_snake_case, not a variable or helper name"));
        }
        if (!kv.second.IsSequence() || kv.second.size() == 0) {
          return error(kv.second, absl::StrCat("offline.phrases.", name,
                                               " must be a non-empty list of texts"));
        }
        std::vector<std::string>& list = def->phrases[name];
        for (const YAML::Node& item : kv.second) {
          ASSIGN_OR_RETURN(
              std::string phrase,
              ScalarText(item, absl::StrCat("offline.phrases.", name, " items"), error));
          list.emplace_back(absl::StripAsciiWhitespace(phrase));
        }
      }
    }

    // Tags name variables and helpers that exist; remember which helpers each part uses.
    const auto check = [&](const std::string& text, const internal::Scope& s,
                           internal::HelperUse& use, const YAML::Node& node,
                           absl::string_view what) -> absl::Status {
      absl::Status status = internal::CheckTemplate(text, s, use);
      if (!status.ok()) return error(node, absl::StrCat(what, ": ", status.message()));
      return absl::OkStatus();
    };
    if (root["system"])
      RETURN_IF_ERROR(check(def->system, scope, def->prompt_use, root["system"], "system"));
    RETURN_IF_ERROR(check(def->user, scope, def->prompt_use, root["user"], "user"));
    internal::Scope offline_scope = scope;
    offline_scope.phrases = &def->phrases;
    RETURN_IF_ERROR(check(def->offline_answer, offline_scope, def->offline_use, offline["answer"],
                          "offline.answer"));
    offline_scope.allow_partials = false;
    for (const auto& [name, list] : def->phrases) {
      for (const std::string& phrase : list) {
        RETURN_IF_ERROR(check(phrase, offline_scope, def->offline_use, offline["phrases"][name],
                              absl::StrCat("offline.phrases.", name)));
        if (def->schema != nullptr && phrase.find("{{{") != std::string::npos) {
          return error(offline["phrases"][name],
                       absl::StrCat("offline.phrases.", name,
                                    ": phrases are text; {{{raw}}} values would break the JSON"));
        }
      }
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ":", e.mark.line + 1, ": ", e.msg));
  }

  // The public description.
  v1::Template& proto = def->proto;
  proto.set_name(def->name);
  proto.set_description(def->description);
  for (const VariableDef& v : def->variables) {
    v1::Template::Variable* out = proto.add_variables();
    out->set_name(v.name);
    out->set_type(TypeName(v.type));
    out->set_required(v.required);
    out->set_description(DescribeForCallers(v));
    if (v.default_value) *out->mutable_default_value() = *v.default_value;
  }
  if (def->schema != nullptr && !google::protobuf::util::JsonStringToMessage(
                                     def->schema->json(), proto.mutable_output_schema())
                                     .ok()) {
    return error("output_schema cannot be represented as a google.protobuf.Struct");
  }

  RETURN_IF_ERROR(SelfCheck(*def));
  return def;
}

}  // namespace

Catalogue::Catalogue() = default;
Catalogue::~Catalogue() = default;

absl::StatusOr<std::unique_ptr<Catalogue>> Catalogue::FromSources(
    const std::vector<std::pair<std::string, std::string>>& sources) {
  std::map<std::string, std::unique_ptr<TemplateDef>> by_name;  // later sources replace
  for (const auto& [source, text] : sources) {
    ASSIGN_OR_RETURN(std::unique_ptr<TemplateDef> def, ParseTemplate(source, text));
    std::string name = def->name;
    by_name[name] = std::move(def);
  }
  std::unique_ptr<Catalogue> catalogue(new Catalogue);
  for (auto& entry : by_name) catalogue->templates_.push_back(std::move(entry.second));
  return catalogue;
}

absl::StatusOr<std::unique_ptr<Catalogue>> Catalogue::Load(const std::vector<std::string>& dirs) {
  std::vector<std::pair<std::string, std::string>> sources = internal::BuiltinTemplateSources();
  for (const std::string& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat("template folder \"", dir, "\" does not exist or is not a folder"));
    }
    std::vector<fs::path> files;
    for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
      if (entry.is_regular_file() && entry.path().extension() == ".yaml") {
        files.push_back(entry.path());
      }
    }
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot list template folder \"", dir, "\": ", ec.message()));
    }
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) {
      std::ifstream in(file, std::ios::binary);
      std::ostringstream text;
      text << in.rdbuf();
      if (!in) {
        return absl::InvalidArgumentError(absl::StrCat("cannot read \"", file.string(), "\""));
      }
      sources.emplace_back(file.string(), text.str());
    }
  }
  return FromSources(sources);
}

std::vector<v1::Template> Catalogue::List() const {
  std::vector<v1::Template> out;
  out.reserve(templates_.size());
  for (const auto& def : templates_) out.push_back(def->proto);
  return out;
}

absl::StatusOr<v1::Template> Catalogue::Get(absl::string_view name) const {
  for (const auto& def : templates_) {
    if (def->name == name) return def->proto;
  }
  return absl::NotFoundError(absl::StrCat("no template named \"", name, "\""));
}

absl::StatusOr<RenderedPrompt> Catalogue::Render(absl::string_view name,
                                                 const google::protobuf::Struct& variables) const {
  for (const auto& def : templates_) {
    if (def->name == name) return RenderPrompt(*def, variables);
  }
  std::vector<std::string> names;
  for (const auto& def : templates_) names.push_back(def->name);
  return InvalidFieldError(
      "template",
      absl::StrCat("unknown template \"", name, "\" (known: ", absl::StrJoin(names, ", "), ")"));
}

absl::Status Catalogue::ValidateOutput(absl::string_view schema_json, absl::string_view text,
                                       google::protobuf::Value* parsed) {
  rapidjson::Document doc;
  if (absl::Status s = internal::ParseJson(internal::StripCodeFence(text), doc); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("the answer is ", s.message()));
  }
  if (!absl::StripAsciiWhitespace(schema_json).empty()) {
    absl::StatusOr<std::unique_ptr<internal::CompiledSchema>> schema =
        internal::CompiledSchema::Compile(schema_json);
    if (!schema.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("the output schema is unusable: ", schema.status().message()));
    }
    if (absl::Status s = (*schema)->Validate(doc); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("the answer does not match the output schema ", s.message()));
    }
  }
  if (parsed != nullptr) {
    parsed->Clear();
    if (!google::protobuf::util::JsonStringToMessage(internal::WriteJson(doc, false), parsed)
             .ok()) {
      return absl::InvalidArgumentError("the answer cannot be represented as a protobuf Value");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Catalogue::OfflineAnswer(const RenderedPrompt& prompt,
                                                     uint64_t seed) const {
  for (const auto& def : templates_) {
    if (def->name != prompt.template_name) continue;
    ASSIGN_OR_RETURN(CheckedVariables checked, CheckVariables(*def, prompt.variables));
    return RenderOffline(*def, checked.values, seed);
  }
  return absl::NotFoundError(absl::StrCat("no template named \"", prompt.template_name, "\""));
}

}  // namespace montage::generation
