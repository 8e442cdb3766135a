#include "gateway/transcode/transcoder.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/utf8.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/message.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "google/protobuf/util/type_resolver_util.h"
#include "google/protobuf/wire_format_lite.h"

namespace montage::gateway::transcode {
namespace {

namespace pb = google::protobuf;

constexpr absl::string_view kTypeUrlPrefix = "type.googleapis.com";
// JSON this shallow cannot make a message deeper than protobuf's recursion limit (100), even
// when every level is a google.protobuf.Struct (three messages each).
constexpr int kShallowJsonDepth = 30;

// Deeper JSON is refused before the protobuf parser sees it (its own limit is 100, and a body of
// nested arrays costs it stack frames per level).
constexpr int kMaxJsonDepth = 64;

constexpr absl::string_view kHttpBodyType = "google.api.HttpBody";
constexpr absl::string_view kJsonContentType = "application/json";
constexpr absl::string_view kOctetStream = "application/octet-stream";

// ---------------------------------------------------------------------------------------------
// Text helpers.

// `s` with every byte that does not start a valid UTF-8 sequence replaced by U+FFFD.
std::string ToValidUtf8(absl::string_view s) {
  if (IsValidUtf8(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceLength(s, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s.data() + i, len);
      i += len;
    }
  }
  return out;
}

// A JSON string literal of `s` (which must be valid UTF-8). Used only to write JSON.
std::string JsonQuote(absl::string_view s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
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
      default:
        if (c < 0x20) {
          absl::StrAppend(&out, "\\u00", absl::Hex(c, absl::kZeroPad2));
        } else {
          out += ch;
        }
    }
  }
  out += '"';
  return out;
}

// A value quoted for an error message, valid UTF-8 and cut to a readable length.
std::string Quoted(absl::string_view value) {
  constexpr size_t kMax = 64;
  std::string text = ToValidUtf8(Utf8Prefix(value, kMax));
  if (value.size() > kMax) text += "...";
  return JsonQuote(text);
}

bool IsBlank(absl::string_view s) { return absl::StripAsciiWhitespace(s).empty(); }

// ---------------------------------------------------------------------------------------------
// JSON shape checks. These do not parse JSON (protobuf's parser does); they only bound the
// nesting depth and, for a body spliced into {"field": <body>}, make sure the body is one value
// that cannot close the wrapper and add fields of its own.

absl::Status CheckJsonShape(absl::string_view json, bool single_value, int* max_depth = nullptr) {
  int depth = 0;
  if (max_depth != nullptr) *max_depth = 0;
  bool in_string = false;
  bool escaped = false;
  bool value_done = false;  // a top-level container has closed
  for (size_t i = 0; i < json.size(); ++i) {
    const char c = json[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '{':
      case '[':
        if (single_value && depth == 0 && value_done) {
          return absl::InvalidArgumentError(
              absl::StrCat("request body must be a single JSON value; more follows at byte ", i));
        }
        if (max_depth != nullptr) *max_depth = std::max(*max_depth, depth + 1);
        if (++depth > kMaxJsonDepth) {
          return absl::InvalidArgumentError(absl::StrCat(
              "request body is nested deeper than ", kMaxJsonDepth, " levels (at byte ", i, ")"));
        }
        break;
      case '}':
      case ']':
        if (depth == 0) {
          if (single_value) {
            return absl::InvalidArgumentError(absl::StrCat("request body has an unmatched '",
                                                           std::string(1, c), "' at byte ", i));
          }
          break;  // the JSON parser reports it with its context
        }
        if (--depth == 0) value_done = true;
        break;
      case ',':
      case ':':
        if (single_value && depth == 0) {
          return absl::InvalidArgumentError(
              absl::StrCat("request body must be a single JSON value; unexpected '",
                           std::string(1, c), "' at byte ", i));
        }
        break;
      default:
        break;
    }
  }
  return absl::OkStatus();
}

// protobuf's JSON errors, rewritten to one line that says what to fix. Syntax errors come as
// "<reason>\n<up to 40 bytes of context>\n<caret>"; field errors as "(<path>): invalid value <v>
// for type <t>" or "(<parent>) <name>: Cannot find field.". `prefix_len` bytes of `json` were
// added by us (a body spliced into a wrapper object) and are not counted in positions.
std::string DescribeJsonError(absl::string_view error, absl::string_view json, size_t prefix_len,
                              const pb::Descriptor& type) {
  // "<reason>\n<context>\n<spaces>^": the context may itself hold line breaks.
  const size_t first_break = error.find('\n');
  const size_t last_break = error.rfind('\n');
  if (first_break != absl::string_view::npos && last_break > first_break &&
      absl::StripLeadingAsciiWhitespace(error.substr(last_break + 1)) == "^") {
    const absl::string_view reason = absl::StripSuffix(error.substr(0, first_break), ".");
    const absl::string_view context = error.substr(first_break + 1, last_break - first_break - 1);
    const size_t caret = error.size() - last_break - 2;  // spaces before '^'
    size_t offset = json.size();
    if (!context.empty() && caret <= context.size()) {
      // The parser's context starts at most 20 bytes before the error; the last occurrence is
      // the likeliest (an error usually stops the parse at its furthest point).
      const size_t at = json.rfind(context);
      if (at != absl::string_view::npos) offset = at + caret;
    }
    offset = offset > prefix_len ? offset - prefix_len : 0;
    std::string near;
    if (caret < context.size()) near = absl::StrCat(" near ", Quoted(context.substr(caret, 20)));
    return absl::StrCat("request body is not valid JSON: ", reason, " at byte ", offset, near);
  }
  const std::vector<absl::string_view> lines = absl::StrSplit(error, '\n');
  const absl::string_view line = lines.empty() ? error : lines[0];
  if (absl::EndsWith(line, ": Cannot find field.")) {
    absl::string_view where = absl::StripSuffix(line, ": Cannot find field.");
    std::string field(where);
    if (absl::ConsumePrefix(&where, "(")) {  // "(parent.path) name"
      const size_t close = where.find(") ");
      if (close != absl::string_view::npos) {
        field = absl::StrCat(where.substr(0, close), ".", where.substr(close + 2));
      }
    }
    return absl::StrCat("request body has unknown field \"", ToValidUtf8(field), "\" (",
                        type.full_name(), " has no such field)");
  }
  static constexpr absl::string_view kInvalid = "): invalid value ";
  const size_t invalid = line.find(kInvalid);
  if (absl::StartsWith(line, "(") && invalid != absl::string_view::npos) {
    const absl::string_view field = line.substr(1, invalid - 1);
    absl::string_view rest = line.substr(invalid + kInvalid.size());
    const size_t for_type = rest.rfind(" for type ");
    absl::string_view value = rest;
    std::string expected;
    if (for_type != absl::string_view::npos) {
      value = rest.substr(0, for_type);
      absl::string_view t = rest.substr(for_type + 10);
      absl::ConsumePrefix(&t, "type.googleapis.com/");
      if (absl::ConsumePrefix(&t, "TYPE_")) {
        expected = absl::AsciiStrToLower(t);
      } else {
        expected = std::string(t);
      }
    }
    return absl::StrCat("request body field \"", ToValidUtf8(field), "\": invalid value ",
                        ToValidUtf8(value), expected.empty() ? "" : ", expected ", expected);
  }
  if (absl::StrContains(line, "produced invalid protobuf output")) {
    // The JSON was fine, but the message it makes nests deeper than protobuf reads (100
    // messages; a google.protobuf.Struct spends three per JSON level).
    return absl::StrCat("request body nests too deeply for ", type.full_name());
  }
  if (absl::StrContains(line, "Root element must be a message")) {
    return absl::StrCat("request body must be a JSON object (", type.full_name(), ")");
  }
  return absl::StrCat("request body does not fit ", type.full_name(), ": ",
                      ToValidUtf8(absl::StrJoin(lines, " ")));
}

// ---------------------------------------------------------------------------------------------
// Descriptor helpers.

bool IsHttpBody(const pb::Descriptor* type) {
  return type != nullptr && type->full_name() == kHttpBodyType;
}

bool IsSingularMessage(const pb::FieldDescriptor& field) {
  return field.cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && !field.is_repeated();
}

bool IsWrapper(const pb::Descriptor& type) {
  static const std::set<std::string>* const kWrappers = new std::set<std::string>{
      "google.protobuf.DoubleValue", "google.protobuf.FloatValue",  "google.protobuf.Int64Value",
      "google.protobuf.UInt64Value", "google.protobuf.Int32Value",  "google.protobuf.UInt32Value",
      "google.protobuf.BoolValue",   "google.protobuf.StringValue", "google.protobuf.BytesValue"};
  return kWrappers->count(type.full_name()) > 0;
}

// Message types that are written as one JSON string or number, so a path variable or a query
// parameter can carry them: the wrappers, Timestamp, Duration and FieldMask. (Struct, Value, Any
// and ordinary messages need JSON structure and belong in the body.)
bool IsScalarLike(const pb::Descriptor& type) {
  const std::string& name = type.full_name();
  return IsWrapper(type) || name == "google.protobuf.Timestamp" ||
         name == "google.protobuf.Duration" || name == "google.protobuf.FieldMask";
}

const pb::FieldDescriptor* FindField(const pb::Descriptor& type, absl::string_view name,
                                     bool allow_json_name) {
  const pb::FieldDescriptor* field = type.FindFieldByName(std::string(name));
  if (field != nullptr || !allow_json_name) return field;
  for (int i = 0; i < type.field_count(); ++i) {
    if (type.field(i)->json_name() == name) return type.field(i);
  }
  return nullptr;
}

// The fields along `path` from `root`, for a binding (path variable or query parameter):
// intermediate fields must be singular messages; the last must be a scalar or scalar-like
// message, repeated only when `allow_repeated_leaf`. NOT_FOUND when a name is not a field (the
// caller decides whether that is an unknown query parameter), INVALID_ARGUMENT when a field is
// there but cannot be bound.
absl::StatusOr<std::vector<const pb::FieldDescriptor*>> ResolveBinding(
    const pb::Descriptor& root, const std::vector<std::string>& path, bool allow_json_name,
    bool allow_repeated_leaf) {
  std::vector<const pb::FieldDescriptor*> fields;
  const pb::Descriptor* type = &root;
  const std::string dotted = absl::StrJoin(path, ".");
  if (path.empty()) return absl::NotFoundError("empty field path");
  for (size_t i = 0; i < path.size(); ++i) {
    const pb::FieldDescriptor* field = FindField(*type, path[i], allow_json_name);
    if (field == nullptr) {
      return absl::NotFoundError(
          absl::StrCat(type->full_name(), " has no field \"", ToValidUtf8(path[i]), "\""));
    }
    fields.push_back(field);
    const bool last = i + 1 == path.size();
    if (field->is_map()) {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", dotted, "\" is the map field ", field->full_name(),
                       ", which cannot be bound from the URL; send it in the JSON body"));
    }
    if (!last) {
      if (field->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE) {
        return absl::NotFoundError(absl::StrCat(field->full_name(), " is not a message, so \"",
                                                ToValidUtf8(dotted), "\" names no field"));
      }
      if (field->is_repeated()) {
        return absl::InvalidArgumentError(
            absl::StrCat("\"", dotted, "\" goes through the repeated field ", field->full_name(),
                         ", which cannot be bound from the URL; send it in the JSON body"));
      }
      type = field->message_type();
      continue;
    }
    if (field->is_repeated() && !allow_repeated_leaf) {
      return absl::InvalidArgumentError(absl::StrCat("\"", dotted, "\" is the repeated field ",
                                                     field->full_name(),
                                                     ", which a path variable cannot bind"));
    }
    if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE &&
        !IsScalarLike(*field->message_type())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "\"", dotted, "\" is the message field ", field->full_name(), " (",
          field->message_type()->full_name(), "); bind one of its fields, such as \"", dotted, ".",
          field->message_type()->field_count() > 0 ? field->message_type()->field(0)->name()
                                                   : "<field>",
          "\""));
    }
  }
  return fields;
}

// ---------------------------------------------------------------------------------------------
// Setting a field from the text of a path variable or query parameter.

struct BindingSource {
  absl::string_view kind;  // "path variable" or "query parameter"
  std::string name;        // as the client wrote it ("shelf.id")
};

absl::Status BadValue(const BindingSource& source, absl::string_view value,
                      absl::string_view expected) {
  return absl::InvalidArgumentError(absl::StrCat(source.kind, " \"", ToValidUtf8(source.name),
                                                 "\": ", Quoted(value), " is not ", expected));
}

bool ParseDouble(absl::string_view text, double* out) {
  if (text == "NaN") {
    *out = std::nan("");
    return true;
  }
  if (text == "Infinity") {
    *out = HUGE_VAL;
    return true;
  }
  if (text == "-Infinity") {
    *out = -HUGE_VAL;
    return true;
  }
  // absl also accepts "inf"/"nan" spellings; proto3 JSON uses the ones above, so take numbers
  // only.
  if (text.empty() || !(absl::ascii_isdigit(text[0]) || text[0] == '-' || text[0] == '.')) {
    return false;
  }
  return absl::SimpleAtod(text, out);
}

absl::Status SetScalar(pb::Message* message, const pb::FieldDescriptor& field,
                       absl::string_view value, const RequestOptions& options,
                       const BindingSource& source) {
  const pb::Reflection* reflection = message->GetReflection();
  const bool repeated = field.is_repeated();
  switch (field.cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: {
      int32_t v = 0;
      if (!absl::SimpleAtoi(value, &v)) return BadValue(source, value, "an int32");
      repeated ? reflection->AddInt32(message, &field, v)
               : reflection->SetInt32(message, &field, v);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_INT64: {
      int64_t v = 0;
      if (!absl::SimpleAtoi(value, &v)) return BadValue(source, value, "an int64");
      repeated ? reflection->AddInt64(message, &field, v)
               : reflection->SetInt64(message, &field, v);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_UINT32: {
      uint32_t v = 0;
      if (absl::StartsWith(value, "-") || !absl::SimpleAtoi(value, &v)) {
        return BadValue(source, value, "a uint32");
      }
      repeated ? reflection->AddUInt32(message, &field, v)
               : reflection->SetUInt32(message, &field, v);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_UINT64: {
      uint64_t v = 0;
      if (absl::StartsWith(value, "-") || !absl::SimpleAtoi(value, &v)) {
        return BadValue(source, value, "a uint64");
      }
      repeated ? reflection->AddUInt64(message, &field, v)
               : reflection->SetUInt64(message, &field, v);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_DOUBLE: {
      double v = 0;
      if (!ParseDouble(value, &v)) return BadValue(source, value, "a double");
      repeated ? reflection->AddDouble(message, &field, v)
               : reflection->SetDouble(message, &field, v);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_FLOAT: {
      double v = 0;
      if (!ParseDouble(value, &v) || (std::isfinite(v) && std::fabs(v) > FLT_MAX)) {
        return BadValue(source, value, "a float");
      }
      const auto f = static_cast<float>(v);
      repeated ? reflection->AddFloat(message, &field, f)
               : reflection->SetFloat(message, &field, f);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_BOOL: {
      bool v = false;
      if (absl::EqualsIgnoreCase(value, "true") || value == "1") {
        v = true;
      } else if (absl::EqualsIgnoreCase(value, "false") || value == "0") {
        v = false;
      } else {
        return BadValue(source, value, "a bool (true or false)");
      }
      repeated ? reflection->AddBool(message, &field, v) : reflection->SetBool(message, &field, v);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_ENUM: {
      const pb::EnumDescriptor& type = *field.enum_type();
      const pb::EnumValueDescriptor* by_name = type.FindValueByName(std::string(value));
      if (by_name == nullptr && options.case_insensitive_enum_parsing) {
        by_name = type.FindValueByName(absl::AsciiStrToUpper(value));
      }
      int number = 0;
      if (by_name != nullptr) {
        number = by_name->number();
      } else if (!absl::SimpleAtoi(value, &number) ||
                 // proto3 enums are open: any number is kept; proto2 ones know their values.
                 (type.file()->syntax() != pb::FileDescriptor::SYNTAX_PROTO3 &&
                  type.FindValueByNumber(number) == nullptr)) {
        std::vector<std::string> names;
        for (int i = 0; i < type.value_count() && i < 12; ++i)
          names.push_back(type.value(i)->name());
        if (type.value_count() > 12) names.push_back("...");
        return BadValue(source, value,
                        absl::StrCat("a ", type.full_name(), " (one of ",
                                     absl::StrJoin(names, ", "), ", or its number)"));
      }
      repeated ? reflection->AddEnumValue(message, &field, number)
               : reflection->SetEnumValue(message, &field, number);
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_STRING: {
      std::string v;
      if (field.type() == pb::FieldDescriptor::TYPE_BYTES) {
        // Standard or URL-safe alphabet, padded or not, as proto3 JSON accepts.
        if (!absl::Base64Unescape(value, &v) && !absl::WebSafeBase64Unescape(value, &v)) {
          return BadValue(source, value, "base64 bytes");
        }
      } else {
        if (!IsValidUtf8(value)) return BadValue(source, value, "valid UTF-8 text");
        v = std::string(value);
      }
      repeated ? reflection->AddString(message, &field, std::move(v))
               : reflection->SetString(message, &field, std::move(v));
      return absl::OkStatus();
    }
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      break;
  }
  return absl::InternalError(absl::StrCat(field.full_name(), " is not a scalar field"));
}

// Sets (or, for a repeated field, adds) `field` of `message` from `value`.
absl::Status SetFromString(pb::Message* message, const pb::FieldDescriptor& field,
                           absl::string_view value, const RequestOptions& options,
                           const BindingSource& source) {
  if (field.cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE) {
    return SetScalar(message, field, value, options, source);
  }
  const pb::Reflection* reflection = message->GetReflection();
  pb::Message* sub = field.is_repeated() ? reflection->AddMessage(message, &field)
                                         : reflection->MutableMessage(message, &field);
  const pb::Descriptor& type = *field.message_type();
  if (IsWrapper(type)) {
    const pb::FieldDescriptor* inner = type.FindFieldByName("value");
    if (inner == nullptr) return absl::InternalError(type.full_name() + " has no value field");
    return SetScalar(sub, *inner, value, options, source);
  }
  if (!IsValidUtf8(value)) return BadValue(source, value, "valid UTF-8 text");
  // Timestamp, Duration and FieldMask: their JSON form is a string, which protobuf parses.
  const auto status = pb::util::JsonStringToMessage(JsonQuote(value), sub);
  if (status.ok()) return absl::OkStatus();
  const std::string& name = type.full_name();
  if (name == "google.protobuf.Timestamp") {
    return BadValue(source, value, "a Timestamp (RFC 3339, such as 2017-01-15T01:30:15Z)");
  }
  if (name == "google.protobuf.Duration") {
    return BadValue(source, value, "a Duration (seconds with an s suffix, such as 1.5s)");
  }
  if (name == "google.protobuf.FieldMask") {
    return BadValue(source, value,
                    "a FieldMask (comma-separated paths, such as title,author.name)");
  }
  return BadValue(source, value, absl::StrCat("a ", name));
}

// ---------------------------------------------------------------------------------------------
// HTTP rules read by reflection from the pool's own google.api.http extension.

struct RuleBinding {
  std::string http_method;
  std::string path;
  std::string body;
  std::string response_body;
};

std::string GetStringField(const pb::Message& message, absl::string_view name) {
  const pb::FieldDescriptor* field = message.GetDescriptor()->FindFieldByName(std::string(name));
  if (field == nullptr || field->cpp_type() != pb::FieldDescriptor::CPPTYPE_STRING ||
      field->is_repeated()) {
    return "";
  }
  return message.GetReflection()->GetString(message, field);
}

std::string GetBytesField(const pb::Message& message, absl::string_view name) {
  return GetStringField(message, name);  // bytes and string share the reflection accessors
}

// One HttpRule's own pattern (without its additional_bindings); nullopt when it has none.
std::optional<RuleBinding> ReadPattern(const pb::Message& rule) {
  const pb::Descriptor& type = *rule.GetDescriptor();
  const pb::Reflection& reflection = *rule.GetReflection();
  RuleBinding binding;
  binding.body = GetStringField(rule, "body");
  binding.response_body = GetStringField(rule, "response_body");
  for (const char* verb : {"get", "put", "post", "delete", "patch"}) {
    const pb::FieldDescriptor* field = type.FindFieldByName(verb);
    if (field != nullptr && reflection.HasField(rule, field)) {
      binding.http_method = absl::AsciiStrToUpper(verb);
      binding.path = reflection.GetString(rule, field);
      return binding;
    }
  }
  const pb::FieldDescriptor* custom = type.FindFieldByName("custom");
  if (custom != nullptr && IsSingularMessage(*custom) && reflection.HasField(rule, custom)) {
    const pb::Message& pattern = reflection.GetMessage(rule, custom);
    binding.http_method = GetStringField(pattern, "kind");
    binding.path = GetStringField(pattern, "path");
    return binding;
  }
  return std::nullopt;
}

// The method's bindings from its google.api.http option: the rule, then its additional_bindings.
absl::StatusOr<std::vector<RuleBinding>> ReadRules(const pb::MethodDescriptor& method,
                                                   const pb::FieldDescriptor* http_extension,
                                                   pb::DynamicMessageFactory& factory) {
  std::vector<RuleBinding> out;
  if (http_extension == nullptr) return out;
  // The option is an extension the generated MethodOptions may not know (it keeps it as unknown
  // fields), so re-read the options as the pool's own MethodOptions, where it is known.
  std::string bytes;
  if (!method.options().SerializeToString(&bytes)) return out;
  std::unique_ptr<pb::Message> options(
      factory.GetPrototype(http_extension->containing_type())->New());
  if (!options->ParseFromString(bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(method.full_name(), ": method options do not parse"));
  }
  const pb::Reflection& reflection = *options->GetReflection();
  if (!reflection.HasField(*options, http_extension)) return out;
  const pb::Message& rule = reflection.GetMessage(*options, http_extension, &factory);
  if (auto pattern = ReadPattern(rule)) out.push_back(*std::move(pattern));
  const pb::FieldDescriptor* additional =
      rule.GetDescriptor()->FindFieldByName("additional_bindings");
  if (additional != nullptr && additional->is_repeated() &&
      additional->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
    const pb::Reflection& rule_reflection = *rule.GetReflection();
    for (int i = 0; i < rule_reflection.FieldSize(rule, additional); ++i) {
      const pb::Message& extra = rule_reflection.GetRepeatedMessage(rule, additional, i);
      if (extra.GetReflection()->FieldSize(extra, additional) > 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            method.full_name(), ": additional_bindings may not nest additional_bindings"));
      }
      auto pattern = ReadPattern(extra);
      if (!pattern) {
        return absl::InvalidArgumentError(absl::StrCat(method.full_name(), ": additional_bindings[",
                                                       i, "] has no HTTP method and path"));
      }
      out.push_back(*std::move(pattern));
    }
  }
  return out;
}

absl::Status ValidateBinding(const pb::MethodDescriptor& method, const RuleBinding& rule,
                             const PathTemplate& path_template) {
  const auto where = [&] {
    return absl::StrCat(method.full_name(), " (", rule.http_method, " ", rule.path, "): ");
  };
  if (rule.http_method.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where(), "custom pattern without a kind"));
  }
  const pb::Descriptor& input = *method.input_type();
  for (const PathTemplate::Variable& variable : path_template.variables()) {
    // A path variable is a single value, so its field may not be repeated; scalar-like
    // well-known messages (wrappers, Timestamp, Duration, FieldMask) are written as one string
    // and are accepted like scalars.
    auto resolved = ResolveBinding(input, variable.field_path, /*allow_json_name=*/false,
                                   /*allow_repeated_leaf=*/false);
    if (!resolved.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where(), "path variable: ", resolved.status().message()));
    }
  }
  if (!rule.body.empty() && rule.body != "*" && input.FindFieldByName(rule.body) == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where(), "body \"", rule.body, "\" names no field of ", input.full_name()));
  }
  if (!rule.response_body.empty() &&
      method.output_type()->FindFieldByName(rule.response_body) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(where(), "response_body \"", rule.response_body,
                                                   "\" names no field of ",
                                                   method.output_type()->full_name()));
  }
  return absl::OkStatus();
}

// The requests a template matches, without its variables' names: "/v1/{a}" and "/v1/{b=*}"
// match the same paths, so binding both under one HTTP method is ambiguous.
std::string RouteShape(const PathTemplate& path_template) {
  std::string out;
  for (const PathTemplate::Segment& segment : path_template.segments()) {
    switch (segment.kind) {
      case PathTemplate::SegmentKind::kLiteral:
        absl::StrAppend(&out, "/=", segment.literal);
        break;
      case PathTemplate::SegmentKind::kSingleWildcard:
        out += "/*";
        break;
      case PathTemplate::SegmentKind::kMultiWildcard:
        out += "/**";
        break;
    }
  }
  if (!path_template.verb().empty()) absl::StrAppend(&out, ":", path_template.verb());
  return out;
}

std::string GrpcPath(const pb::MethodDescriptor& method) {
  return absl::StrCat("/", method.service()->full_name(), "/", method.name());
}

absl::string_view StripQuery(absl::string_view path) {
  const size_t q = path.find('?');
  return q == absl::string_view::npos ? path : path.substr(0, q);
}

}  // namespace

// =============================================================================================
// TranscodingTable

absl::StatusOr<std::unique_ptr<TranscodingTable>> TranscodingTable::Build(
    const pb::DescriptorPool& pool, const std::vector<std::string>& services, bool auto_mapping) {
  if (services.empty()) {
    return absl::InvalidArgumentError(
        "no services listed: name the services to transcode (a descriptor pool cannot list its "
        "own; the overload that takes the descriptor set's file names can)");
  }
  return Build(pool, services, auto_mapping, {});
}

absl::StatusOr<std::unique_ptr<TranscodingTable>> TranscodingTable::Build(
    const pb::DescriptorPool& pool, const std::vector<std::string>& services, bool auto_mapping,
    const std::vector<std::string>& files) {
  pb::DynamicMessageFactory factory(&pool);
  const pb::FieldDescriptor* http_extension = pool.FindExtensionByName("google.api.http");
  if (http_extension != nullptr &&
      (http_extension->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE ||
       http_extension->is_repeated())) {
    http_extension = nullptr;
  }

  // The services, in the order given (or the files' order), each once.
  std::vector<const pb::ServiceDescriptor*> selected;
  std::set<const pb::ServiceDescriptor*> seen;
  std::map<const pb::MethodDescriptor*, std::vector<RuleBinding>> rules;
  const auto read_service = [&](const pb::ServiceDescriptor* service) -> absl::Status {
    for (int i = 0; i < service->method_count(); ++i) {
      auto method_rules = ReadRules(*service->method(i), http_extension, factory);
      if (!method_rules.ok()) return method_rules.status();
      rules[service->method(i)] = *std::move(method_rules);
    }
    return absl::OkStatus();
  };
  if (!services.empty()) {
    for (const std::string& name : services) {
      const pb::ServiceDescriptor* service = pool.FindServiceByName(name);
      if (service == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("service \"", name, "\" is not in the descriptor set"));
      }
      if (!seen.insert(service).second) continue;
      if (auto status = read_service(service); !status.ok()) return status;
      selected.push_back(service);
    }
  } else {
    for (const std::string& file_name : files) {
      const pb::FileDescriptor* file = pool.FindFileByName(file_name);
      if (file == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("file \"", file_name, "\" is not in the descriptor pool"));
      }
      for (int s = 0; s < file->service_count(); ++s) {
        const pb::ServiceDescriptor* service = file->service(s);
        if (!seen.insert(service).second) continue;
        if (auto status = read_service(service); !status.ok()) return status;
        bool has_rule = false;
        for (int m = 0; m < service->method_count(); ++m) {
          has_rule = has_rule || !rules[service->method(m)].empty();
        }
        if (has_rule) selected.push_back(service);
      }
    }
  }

  auto table = std::unique_ptr<TranscodingTable>(new TranscodingTable());
  // HTTP method + route shape → the binding that has it, to name both in a duplicate error.
  std::map<std::pair<std::string, std::string>, const HttpBinding*> taken;
  const auto add = [&](const pb::MethodDescriptor& method, const RuleBinding& rule,
                       bool automatic) -> absl::Status {
    auto path_template = PathTemplate::Parse(rule.path);
    if (!path_template.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(method.full_name(), ": path template \"", rule.path,
                       "\" does not parse: ", path_template.status().message()));
    }
    if (auto status = ValidateBinding(method, rule, *path_template); !status.ok()) return status;
    const auto key = std::make_pair(rule.http_method, RouteShape(*path_template));
    if (auto it = taken.find(key); it != taken.end()) {
      if (automatic) return absl::OkStatus();  // an explicit rule already has this route
      return absl::InvalidArgumentError(
          absl::StrCat(rule.http_method, " ", rule.path, " is bound twice: by ",
                       it->second->method->full_name(), " and by ", method.full_name()));
    }
    auto binding = std::make_unique<HttpBinding>();
    binding->method = &method;
    binding->grpc_path = GrpcPath(method);
    binding->http_method = rule.http_method;
    binding->path = rule.path;
    binding->body = rule.body;
    binding->response_body = rule.response_body;
    const int id = static_cast<int>(table->bindings_.size());
    if (auto status = table->matcher_.Add(rule.http_method, *std::move(path_template), id);
        !status.ok()) {
      if (automatic && absl::IsAlreadyExists(status)) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat(method.full_name(), ": ", rule.http_method,
                                                     " ", rule.path, ": ", status.message()));
    }
    taken[key] = binding.get();
    table->bindings_.push_back(std::move(binding));
    return absl::OkStatus();
  };

  for (const pb::ServiceDescriptor* service : selected) {
    for (int i = 0; i < service->method_count(); ++i) {
      const pb::MethodDescriptor* method = service->method(i);
      table->methods_.push_back(method);
      for (const RuleBinding& rule : rules[method]) {
        if (auto status = add(*method, rule, false); !status.ok()) return status;
      }
    }
  }
  // After every explicit rule, so that an explicit rule wins a clash with a generated one.
  if (auto_mapping) {
    for (const pb::ServiceDescriptor* service : selected) {
      for (int i = 0; i < service->method_count(); ++i) {
        const pb::MethodDescriptor* method = service->method(i);
        RuleBinding rule;
        rule.http_method = "POST";
        rule.path = GrpcPath(*method);
        rule.body = "*";
        if (auto status = add(*method, rule, true); !status.ok()) return status;
      }
    }
  }
  return table;
}

std::optional<RouteMatch> TranscodingTable::Match(absl::string_view http_method,
                                                  absl::string_view path) const {
  auto found = matcher_.Lookup(http_method, StripQuery(path));
  if (!found || found->id < 0 || static_cast<size_t>(found->id) >= bindings_.size()) {
    return std::nullopt;
  }
  RouteMatch match;
  match.binding = bindings_[found->id].get();
  match.variables = std::move(found->bindings);
  return match;
}

bool TranscodingTable::PathMatchesAnyMethod(absl::string_view path) const {
  return matcher_.MatchesAnyMethod(StripQuery(path));
}

const pb::MethodDescriptor* TranscodingTable::FindMethod(absl::string_view grpc_path) const {
  if (!absl::ConsumePrefix(&grpc_path, "/")) return nullptr;
  const size_t slash = grpc_path.rfind('/');
  if (slash == absl::string_view::npos) return nullptr;
  const absl::string_view service = grpc_path.substr(0, slash);
  const absl::string_view name = grpc_path.substr(slash + 1);
  for (const pb::MethodDescriptor* method : methods_) {
    if (method->name() == name && method->service()->full_name() == service) return method;
  }
  return nullptr;
}

// =============================================================================================
// Transcoder

namespace {

pb::util::JsonPrintOptions ToJsonPrintOptions(const PrintOptions& options) {
  pb::util::JsonPrintOptions out;
  out.add_whitespace = options.add_whitespace;
  out.always_print_primitive_fields = options.always_print_primitive_fields;
  out.always_print_enums_as_ints = options.always_print_enums_as_ints;
  out.preserve_proto_field_names = options.preserve_proto_field_names;
  return out;
}

// Parses `json` into `message` (replacing its contents). Unknown fields are dropped unless
// options.reject_unknown_fields. An enum name the type does not know is an error either way:
// protobuf's ignore_unknown_fields would also turn it silently into the default value, so it is
// used only when a strict parse failed on an unknown field (a body that has both an unknown
// field and an unknown enum name then keeps the enum's default).
std::string TypeUrl(const pb::Descriptor& type) {
  return absl::StrCat(kTypeUrlPrefix, "/", type.full_name());
}

// `json` as the serialized bytes of `type`, with ParseJson's rules and errors.
// `depth` (optional) is set to the JSON's nesting depth.
absl::StatusOr<std::string> JsonToBinary(pb::util::TypeResolver* resolver, absl::string_view json,
                                         const pb::Descriptor& type, const RequestOptions& options,
                                         size_t prefix_len = 0, int* depth = nullptr) {
  if (auto status = CheckJsonShape(json.substr(std::min(prefix_len, json.size())), false, depth);
      !status.ok()) {
    return status;
  }
  pb::util::JsonParseOptions parse;
  parse.ignore_unknown_fields = false;
  parse.case_insensitive_enum_parsing = options.case_insensitive_enum_parsing;
  const std::string url = TypeUrl(type);
  const pb::StringPiece input(json.data(), json.size());
  std::string binary;
  auto status = pb::util::JsonToBinaryString(resolver, url, input, &binary, parse);
  if (!status.ok() && !options.reject_unknown_fields &&
      absl::StrContains(absl::string_view(status.message().data(), status.message().size()),
                        "Cannot find field")) {
    parse.ignore_unknown_fields = true;
    binary.clear();
    status = pb::util::JsonToBinaryString(resolver, url, input, &binary, parse);
  }
  if (status.ok()) return binary;
  return absl::InvalidArgumentError(DescribeJsonError(
      absl::string_view(status.message().data(), status.message().size()), json, prefix_len, type));
}

absl::Status ParseJson(pb::util::TypeResolver* resolver, absl::string_view json,
                       pb::Message* message, const RequestOptions& options, size_t prefix_len = 0) {
  absl::StatusOr<std::string> binary =
      JsonToBinary(resolver, json, *message->GetDescriptor(), options, prefix_len);
  if (!binary.ok()) return binary.status();
  if (!message->ParseFromString(*binary)) {
    return absl::InvalidArgumentError(absl::StrCat("the JSON body does not make a valid ",
                                                   message->GetDescriptor()->full_name()));
  }
  return absl::OkStatus();
}

// True when `bytes` parse as protobuf wire format (tags, lengths and groups), whatever the type.
bool IsWellFormedWire(absl::string_view bytes) {
  if (bytes.size() > static_cast<size_t>(INT32_MAX)) return false;
  pb::io::CodedInputStream input(reinterpret_cast<const uint8_t*>(bytes.data()),
                                 static_cast<int>(bytes.size()));
  return pb::internal::WireFormatLite::SkipMessage(&input) && input.ConsumedEntireMessage() &&
         input.CurrentPosition() == static_cast<int>(bytes.size());
}

// A message as JSON through `resolver` (MessageToJsonString without building a resolver).
pb::util::Status MessageToJson(pb::util::TypeResolver* resolver, const pb::Message& message,
                               std::string* json, const pb::util::JsonPrintOptions& options) {
  return pb::util::BinaryToJsonString(resolver, TypeUrl(*message.GetDescriptor()),
                                      message.SerializeAsString(), json, options);
}

// A message from its serialized bytes (missing proto2 required fields are not an error).
bool ParseBytes(absl::string_view bytes, pb::Message* message) {
  if (bytes.size() > static_cast<size_t>(INT32_MAX)) return false;
  return message->ParsePartialFromArray(bytes.data(), static_cast<int>(bytes.size()));
}

void SetHttpBody(pb::Message* http_body, absl::string_view data, absl::string_view content_type) {
  const pb::Descriptor& type = *http_body->GetDescriptor();
  const pb::Reflection& reflection = *http_body->GetReflection();
  if (const auto* field = type.FindFieldByName("data"); field != nullptr) {
    reflection.SetString(http_body, field, std::string(data));
  }
  if (const auto* field = type.FindFieldByName("content_type"); field != nullptr) {
    reflection.SetString(http_body, field, ToValidUtf8(content_type));
  }
}

HttpResponseParts HttpBodyToResponse(const pb::Message& http_body) {
  HttpResponseParts out;
  out.content_type = GetStringField(http_body, "content_type");
  if (out.content_type.empty()) out.content_type = std::string(kOctetStream);
  const pb::FieldDescriptor* data = http_body.GetDescriptor()->FindFieldByName("data");
  if (data != nullptr) out.body = http_body.GetReflection()->GetString(http_body, data);
  return out;
}

// The JSON of a field's default value, for a response_body field that is unset.
std::string DefaultFieldJson(const pb::FieldDescriptor& field, const PrintOptions& options) {
  if (field.is_map()) return "{}";
  if (field.is_repeated()) return "[]";
  switch (field.cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      return "false";
    case pb::FieldDescriptor::CPPTYPE_INT64:
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      return "\"0\"";
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return "\"\"";
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      if (options.always_print_enums_as_ints)
        return absl::StrCat(field.default_value_enum()->number());
      return JsonQuote(field.default_value_enum()->name());
    default:
      return "0";
  }
}

}  // namespace

CachingTypeResolver::CachingTypeResolver(const pb::DescriptorPool& pool)
    : inner_(pb::util::NewTypeResolverForDescriptorPool(std::string(kTypeUrlPrefix), &pool)) {}

CachingTypeResolver::~CachingTypeResolver() = default;

namespace {

// The cached answer for `url`, or the inner resolver's, remembered. The inner resolver runs
// outside the lock: it only reads the (immutable) pool.
template <typename T, typename Resolve>
pb::util::Status ResolveCached(absl::Mutex& mu, absl::flat_hash_map<std::string, T>& cache,
                               const std::string& url, T* out, Resolve resolve) {
  {
    absl::MutexLock lock(&mu);
    if (auto it = cache.find(url); it != cache.end()) {
      *out = it->second;
      return pb::util::Status();
    }
  }
  T resolved;
  pb::util::Status status = resolve(url, &resolved);
  if (!status.ok()) return status;
  *out = resolved;
  absl::MutexLock lock(&mu);
  cache.emplace(url, std::move(resolved));
  return status;
}

}  // namespace

pb::util::Status CachingTypeResolver::ResolveMessageType(const std::string& type_url,
                                                         pb::Type* message_type) {
  return ResolveCached(
      mu_, types_, type_url, message_type,
      [this](const std::string& url, pb::Type* t) { return inner_->ResolveMessageType(url, t); });
}

pb::util::Status CachingTypeResolver::ResolveEnumType(const std::string& type_url,
                                                      pb::Enum* enum_type) {
  return ResolveCached(
      mu_, enums_, type_url, enum_type,
      [this](const std::string& url, pb::Enum* e) { return inner_->ResolveEnumType(url, e); });
}

Transcoder::Transcoder(const pb::DescriptorPool& pool)
    : pool_(pool),
      factory_(std::make_unique<pb::DynamicMessageFactory>(&pool)),
      resolver_(std::make_unique<CachingTypeResolver>(pool)) {}

Transcoder::~Transcoder() = default;

absl::StatusOr<std::string> Transcoder::RequestToProto(const HttpBinding& binding,
                                                       const HttpRequestParts& request,
                                                       const RequestOptions& options) const {
  if (binding.method == nullptr) return absl::InternalError("binding without a method");
  const pb::Descriptor& type = *binding.method->input_type();
  std::unique_ptr<pb::Message> message(factory_->GetPrototype(&type)->New());
  const pb::Reflection& reflection = *message->GetReflection();

  // 1. The body.
  if (binding.body.empty()) {
    // The rule says the method has no body (google/api/http.proto: "omitted for not having any
    // HTTP request body"). Envoy's transcoder would parse a body anyway, as if the rule said
    // "*"; dropping it silently would lose what the client meant. A body is refused instead,
    // except nothing, whitespace or an empty object, which some clients send with DELETE.
    std::string compact(request.body.substr(0, 64));
    compact.erase(std::remove_if(compact.begin(), compact.end(),
                                 [](char c) { return absl::ascii_isspace(c); }),
                  compact.end());
    if (request.body.size() > 64 || (!compact.empty() && compact != "{}")) {
      return absl::InvalidArgumentError(
          absl::StrCat(binding.http_method, " ", binding.path,
                       " takes no request body; send the fields as path or query parameters"));
    }
  } else if (binding.body == "*") {
    if (IsHttpBody(&type)) {
      SetHttpBody(message.get(), request.body, request.content_type);
    } else if (!IsBlank(request.body)) {
      if (auto status = ParseJson(resolver_.get(), request.body, message.get(), options);
          !status.ok()) {
        return status;
      }
    }
  } else {
    const pb::FieldDescriptor* field = type.FindFieldByName(binding.body);
    if (field == nullptr) {
      return absl::InternalError(
          absl::StrCat("body \"", binding.body, "\" names no field of ", type.full_name()));
    }
    if (IsSingularMessage(*field) && IsHttpBody(field->message_type())) {
      SetHttpBody(reflection.MutableMessage(message.get(), field, factory_.get()), request.body,
                  request.content_type);
    } else if (IsBlank(request.body)) {
      // No body: the field stays unset.
    } else if (IsSingularMessage(*field)) {
      if (auto status =
              ParseJson(resolver_.get(), request.body,
                        reflection.MutableMessage(message.get(), field, factory_.get()), options);
          !status.ok()) {
        return status;
      }
    } else {
      // A repeated, map or scalar field: its JSON value goes into a one-field object. The shape
      // check makes sure the body is exactly one value, so it cannot add sibling fields.
      if (auto status = CheckJsonShape(request.body, /*single_value=*/true); !status.ok()) {
        return status;
      }
      const std::string prefix = absl::StrCat("{", JsonQuote(field->json_name()), ":");
      const std::string wrapped = absl::StrCat(prefix, request.body, "}");
      if (auto status = ParseJson(resolver_.get(), wrapped, message.get(), options, prefix.size());
          !status.ok()) {
        return status;
      }
    }
  }

  // 2. Query parameters, then path variables. Both are applied on top of the body, so the path
  // decides over the body (Envoy lets the body win; montage does not, because the path is what
  // routing and authorisation looked at). With reject_binding_body_field_collisions, a binding
  // whose value differs from the body's is refused, as in Envoy.
  struct Assignment {
    std::vector<const pb::FieldDescriptor*> fields;
    BindingSource source;
    std::vector<std::string> values;
  };
  std::vector<Assignment> assignments;
  std::map<std::string, const VariableBinding*> path_values;  // "shelf.id" → binding
  for (const VariableBinding& variable : request.variables) {
    path_values[absl::StrJoin(variable.field_path, ".")] = &variable;
  }

  std::map<std::vector<const pb::FieldDescriptor*>, size_t> query_index;
  for (const auto& [name, value] : request.query) {
    if (std::find(options.ignored_query_parameters.begin(), options.ignored_query_parameters.end(),
                  name) != options.ignored_query_parameters.end()) {
      continue;
    }
    const std::vector<std::string> path = absl::StrSplit(name, '.');
    auto resolved = ResolveBinding(type, path, /*allow_json_name=*/true,
                                   /*allow_repeated_leaf=*/true);
    if (absl::IsNotFound(resolved.status())) {
      // Envoy's default does not transcode a request with a query parameter that names no
      // field: it passes it upstream untranscoded, and rejects it (400) only with
      // reject_unknown_query_parameters. montage has no untranscoded route for a REST call, so
      // the default and reject_unknown_query_parameters both answer INVALID_ARGUMENT naming the
      // parameter; ignore_unknown_query_parameters and ignored_query_parameters skip it.
      if (options.ignore_unknown_query_parameters) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown query parameter \"", ToValidUtf8(name), "\": ", resolved.status().message()));
    }
    if (!resolved.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("query parameter ", resolved.status().message()));
    }
    // The same field as a path variable: fine when it says the same thing.
    std::string canonical;
    for (const pb::FieldDescriptor* field : *resolved) {
      absl::StrAppend(&canonical, canonical.empty() ? "" : ".", field->name());
    }
    if (auto it = path_values.find(canonical); it != path_values.end()) {
      if (it->second->value == value) continue;
      return absl::InvalidArgumentError(
          absl::StrCat("query parameter \"", ToValidUtf8(name), "\" is ", Quoted(value),
                       " but the path binds \"", canonical, "\" to ", Quoted(it->second->value)));
    }
    auto [it, inserted] = query_index.emplace(*resolved, assignments.size());
    if (inserted) {
      assignments.push_back(Assignment{*resolved, {"query parameter", name}, {}});
    } else if (!resolved->back()->is_repeated()) {
      return absl::InvalidArgumentError(
          absl::StrCat("query parameter \"", ToValidUtf8(name), "\" is given more than once, but ",
                       resolved->back()->full_name(), " is not a repeated field"));
    }
    assignments[it->second].values.push_back(value);
  }
  for (const VariableBinding& variable : request.variables) {
    auto resolved = ResolveBinding(type, variable.field_path, /*allow_json_name=*/false,
                                   /*allow_repeated_leaf=*/false);
    const std::string name = absl::StrJoin(variable.field_path, ".");
    if (!resolved.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("path variable \"", name, "\": ", resolved.status().message()));
    }
    assignments.push_back(Assignment{*resolved, {"path variable", name}, {variable.value}});
  }

  const bool body_present = !binding.body.empty();
  for (Assignment& assignment : assignments) {
    pb::Message* parent = message.get();
    for (size_t i = 0; i + 1 < assignment.fields.size(); ++i) {
      parent =
          parent->GetReflection()->MutableMessage(parent, assignment.fields[i], factory_.get());
    }
    const pb::FieldDescriptor* leaf = assignment.fields.back();
    const pb::Reflection& parent_reflection = *parent->GetReflection();
    // Build the field's new value in a scratch message of the same type, then swap it in: a
    // repeated field gets exactly the bound values, and the old value can be compared.
    std::unique_ptr<pb::Message> scratch(parent->New());
    for (const std::string& value : assignment.values) {
      if (auto status = SetFromString(scratch.get(), *leaf, value, options, assignment.source);
          !status.ok()) {
        return status;
      }
    }
    const bool already_set = leaf->is_repeated() ? parent_reflection.FieldSize(*parent, leaf) > 0
                                                 : parent_reflection.HasField(*parent, leaf);
    if (body_present && already_set && options.reject_binding_body_field_collisions &&
        !pb::util::MessageDifferencer().CompareWithFields(*parent, *scratch, {leaf}, {leaf})) {
      return absl::InvalidArgumentError(absl::StrCat(
          assignment.source.kind, " \"", ToValidUtf8(assignment.source.name), "\" sets ",
          leaf->full_name(), " to ", Quoted(absl::StrJoin(assignment.values, ",")),
          " but the request body sets it to something else"));
    }
    parent_reflection.SwapFields(parent, scratch.get(), {leaf});
  }

  std::string out;
  if (!message->SerializePartialToString(&out)) {
    return absl::InternalError(absl::StrCat("cannot serialize ", type.full_name()));
  }
  return out;
}

absl::StatusOr<std::string> Transcoder::JsonToProto(const pb::Descriptor& type,
                                                    absl::string_view json,
                                                    const RequestOptions& options) const {
  if (IsBlank(json)) return std::string();
  int depth = 0;
  absl::StatusOr<std::string> binary =
      JsonToBinary(resolver_.get(), json, type, options, 0, &depth);
  // protobuf reads messages at most 100 deep, and a google.protobuf.Struct level is three
  // messages: deep JSON is parsed once more as the message, to refuse what no server would read.
  if (!binary.ok() || depth <= kShallowJsonDepth) return binary;
  std::unique_ptr<pb::Message> message(factory_->GetPrototype(&type)->New());
  if (!message->ParseFromString(*binary)) {
    return absl::InvalidArgumentError(
        absl::StrCat("request body nests too deeply for ", type.full_name()));
  }
  return binary;
}

absl::StatusOr<HttpResponseParts> Transcoder::ResponseToHttp(const pb::MethodDescriptor& method,
                                                             const HttpBinding* binding,
                                                             absl::string_view proto_bytes,
                                                             const PrintOptions& options) const {
  const pb::Descriptor& type = *method.output_type();
  const bool whole = binding == nullptr || binding->response_body.empty();
  if (whole && !IsHttpBody(&type)) {
    auto json = ProtoToJson(type, proto_bytes, options);
    if (!json.ok()) return json.status();
    return HttpResponseParts{std::string(kJsonContentType), *std::move(json)};
  }
  std::unique_ptr<pb::Message> message(factory_->GetPrototype(&type)->New());
  if (!ParseBytes(proto_bytes, message.get())) {
    return absl::InternalError(
        absl::StrCat("the response is not a valid ", type.full_name(), " message"));
  }
  if (whole) return HttpBodyToResponse(*message);

  const pb::FieldDescriptor* field = type.FindFieldByName(binding->response_body);
  if (field == nullptr) {
    return absl::InternalError(absl::StrCat("response_body \"", binding->response_body,
                                            "\" names no field of ", type.full_name()));
  }
  const pb::Reflection& reflection = *message->GetReflection();
  if (IsSingularMessage(*field)) {
    const pb::Message& sub = reflection.GetMessage(*message, field, factory_.get());
    if (IsHttpBody(field->message_type())) return HttpBodyToResponse(sub);
    std::string json;
    const auto status = MessageToJson(resolver_.get(), sub, &json, ToJsonPrintOptions(options));
    if (!status.ok()) {
      return absl::InternalError(
          absl::StrCat("the response's ", field->name(),
                       " cannot be written as JSON: ", status.message().ToString()));
    }
    return HttpResponseParts{std::string(kJsonContentType), std::move(json)};
  }
  // A repeated, map or scalar field: print a message holding only that field and take the
  // value out of {"<name>": <value>}.
  std::unique_ptr<pb::Message> only(message->New());
  reflection.SwapFields(message.get(), only.get(), {field});
  PrintOptions field_options = options;
  field_options.always_print_primitive_fields = false;
  std::string json;
  const auto status =
      MessageToJson(resolver_.get(), *only, &json, ToJsonPrintOptions(field_options));
  if (!status.ok()) {
    return absl::InternalError(
        absl::StrCat("the response's ", field->name(),
                     " cannot be written as JSON: ", status.message().ToString()));
  }
  const std::string key =
      JsonQuote(options.preserve_proto_field_names ? field->name() : field->json_name());
  const size_t key_at = json.find(key);
  const size_t colon =
      key_at == std::string::npos ? std::string::npos : json.find(':', key_at + key.size());
  const size_t close = json.rfind('}');
  std::string value;
  if (colon == std::string::npos || close == std::string::npos || close < colon) {
    value = DefaultFieldJson(*field, options);  // "{}": the field has its default value
  } else {
    value = std::string(
        absl::StripAsciiWhitespace(absl::string_view(json).substr(colon + 1, close - colon - 1)));
  }
  if (options.add_whitespace) value += "\n";
  return HttpResponseParts{std::string(kJsonContentType), std::move(value)};
}

absl::StatusOr<std::string> Transcoder::ProtoToJson(const pb::Descriptor& type,
                                                    absl::string_view proto_bytes,
                                                    const PrintOptions& options) const {
  // Straight from bytes to JSON once the bytes are well-formed protobuf wire format (the
  // converter reads some malformed bytes without complaint); a failure builds the message, to
  // say which step failed.
  std::string json;
  if (IsWellFormedWire(proto_bytes) &&
      pb::util::BinaryToJsonString(resolver_.get(), TypeUrl(type),
                                   std::string(proto_bytes.data(), proto_bytes.size()), &json,
                                   ToJsonPrintOptions(options))
          .ok() &&
      IsValidUtf8(json)) {  // a string field holding invalid UTF-8 is refused below
    return json;
  }
  json.clear();
  std::unique_ptr<pb::Message> message(factory_->GetPrototype(&type)->New());
  if (!ParseBytes(proto_bytes, message.get())) {
    return absl::InternalError(
        absl::StrCat("the response is not a valid ", type.full_name(), " message"));
  }
  const auto status = MessageToJson(resolver_.get(), *message, &json, ToJsonPrintOptions(options));
  if (!status.ok()) {
    return absl::InternalError(
        absl::StrCat("the response (", type.full_name(),
                     ") cannot be written as JSON: ", ToValidUtf8(status.message().ToString())));
  }
  return json;
}

std::string Transcoder::StatusToJson(int code, absl::string_view message,
                                     absl::string_view status_details_bin) const {
  const std::string text = ToValidUtf8(message);
  const pb::Descriptor* status_type = pool_.FindMessageTypeByName("google.rpc.Status");
  const pb::FieldDescriptor* code_field =
      status_type ? status_type->FindFieldByName("code") : nullptr;
  const pb::FieldDescriptor* message_field =
      status_type ? status_type->FindFieldByName("message") : nullptr;
  const pb::FieldDescriptor* details_field =
      status_type ? status_type->FindFieldByName("details") : nullptr;
  if (code_field != nullptr && code_field->cpp_type() == pb::FieldDescriptor::CPPTYPE_INT32 &&
      message_field != nullptr &&
      message_field->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING &&
      details_field != nullptr && details_field->is_repeated() &&
      details_field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
    const pb::Message* prototype = factory_->GetPrototype(status_type);
    std::unique_ptr<pb::Message> parsed(prototype->New());
    if (!status_details_bin.empty() && !ParseBytes(status_details_bin, parsed.get())) {
      parsed->Clear();  // not a Status: keep code and message only
    }
    const pb::Reflection& reflection = *parsed->GetReflection();
    std::unique_ptr<pb::Message> status(prototype->New());
    // grpc-status and grpc-message are authoritative; the details' own message fills in when
    // grpc-message is empty.
    reflection.SetInt32(status.get(), code_field, code);
    reflection.SetString(status.get(), message_field,
                         text.empty() ? reflection.GetString(*parsed, message_field) : text);
    for (int i = 0; i < reflection.FieldSize(*parsed, details_field); ++i) {
      const pb::Message& detail = reflection.GetRepeatedMessage(*parsed, details_field, i);
      // A detail whose type the pool does not know, or whose bytes do not parse as that type,
      // cannot be written as JSON: drop it rather than fail the whole error. (The JSON printer
      // alone would write a truncated detail for bytes that do not parse.)
      const std::string type_url = GetStringField(detail, "type_url");
      const pb::Descriptor* detail_type =
          pool_.FindMessageTypeByName(type_url.substr(type_url.rfind('/') + 1));
      if (detail_type == nullptr) continue;
      std::unique_ptr<pb::Message> value(factory_->GetPrototype(detail_type)->New());
      if (!value->ParseFromString(GetBytesField(detail, "value"))) continue;
      std::string probe;
      if (pb::util::MessageToJsonString(detail, &probe).ok()) {
        reflection.AddMessage(status.get(), details_field)->CopyFrom(detail);
      }
    }
    std::string json;
    if (pb::util::MessageToJsonString(*status, &json).ok()) return ToValidUtf8(json);
  }
  return absl::StrCat("{\"code\":", code,
                      text.empty() ? "" : ",\"message\":", text.empty() ? "" : JsonQuote(text),
                      "}");
}

bool Transcoder::ReturnsHttpBody(const pb::MethodDescriptor& method, const HttpBinding* binding) {
  const pb::Descriptor* type = method.output_type();
  if (binding != nullptr && !binding->response_body.empty()) {
    const pb::FieldDescriptor* field = type->FindFieldByName(binding->response_body);
    return field != nullptr && IsSingularMessage(*field) && IsHttpBody(field->message_type());
  }
  return IsHttpBody(type);
}

// =============================================================================================
// Stream framing

std::string StreamMessagePrefix(StreamFraming framing, size_t index) {
  switch (framing) {
    case StreamFraming::kJsonArray:
      return index == 0 ? "[" : ",";
    case StreamFraming::kNdjson:
      return "";
    case StreamFraming::kSse:
      return "data: ";
  }
  return "";
}

std::string StreamMessageSuffix(StreamFraming framing) {
  switch (framing) {
    case StreamFraming::kJsonArray:
      return "";
    case StreamFraming::kNdjson:
      return "\n";
    case StreamFraming::kSse:
      return "\n\n";
  }
  return "";
}

std::string StreamClose(StreamFraming framing, size_t messages_sent, absl::string_view error_json) {
  // Outside strings, raw line breaks in JSON are only whitespace (inside strings they are
  // escaped), so removing them keeps the error on one NDJSON line / one SSE data line.
  std::string error;
  for (const char c : error_json) {
    if (c != '\n' && c != '\r') error += c;
  }
  switch (framing) {
    case StreamFraming::kJsonArray:
      if (error.empty()) return messages_sent == 0 ? "[]" : "]";
      return absl::StrCat(messages_sent == 0 ? "[" : ",", "{\"error\":", error, "}]");
    case StreamFraming::kNdjson:
      if (error.empty()) return "";
      return absl::StrCat("{\"error\":", error, "}\n");
    case StreamFraming::kSse:
      if (error.empty()) return "";
      return absl::StrCat("event: error\ndata: {\"error\":", error, "}\n\n");
  }
  return "";
}

}  // namespace montage::gateway::transcode
