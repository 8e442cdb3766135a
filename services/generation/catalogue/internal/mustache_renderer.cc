#include "services/generation/catalogue/internal/mustache_renderer.h"

#include <algorithm>
#include <functional>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kainjow/mustache.hpp"
#include "services/generation/catalogue/internal/text.h"

namespace montage::generation::internal {
namespace {

namespace mustache = kainjow::mustache;

// Loops over integers are bounded so that a template cannot be asked for a million turns.
constexpr double kMaxLoop = 1000;
constexpr size_t kMaxClip = 100000;
constexpr size_t kKeywordCount = 6;
constexpr size_t kMaxPoints = 40;
constexpr size_t kPointLength = 240;
// Separates the alternatives of an nth.* section.
constexpr absl::string_view kAlternativeSeparator = "||";

struct Tag {
  char kind;  // 'v' variable, '{' or '&' unescaped, '#', '^', '/' sections, '>' partial, '!'
  std::string name;
  size_t line;
};

absl::StatusOr<std::vector<Tag>> ScanTags(absl::string_view text) {
  std::vector<Tag> tags;
  size_t i = 0;
  while ((i = text.find("{{", i)) != absl::string_view::npos) {
    const size_t line = std::count(text.begin(), text.begin() + i, '\n') + 1;
    const bool triple = text.substr(i, 3) == "{{{";
    const size_t start = i + (triple ? 3 : 2);
    const absl::string_view close = triple ? "}}}" : "}}";
    const size_t end = text.find(close, start);
    if (end == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line, ": a tag is not closed"));
    }
    absl::string_view inner = absl::StripAsciiWhitespace(text.substr(start, end - start));
    char kind = triple ? '{' : 'v';
    if (!triple && !inner.empty() &&
        absl::string_view("#^/>&!=").find(inner[0]) != absl::string_view::npos) {
      kind = inner[0];
      inner = absl::StripAsciiWhitespace(inner.substr(1));
    }
    if (kind == '=') {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", line, ": changing the delimiters is not supported"));
    }
    tags.push_back({kind, std::string(inner), line});
    i = end + close.size();
  }
  return tags;
}

bool IsLoopField(absl::string_view name) {
  return name == "n" || name == "index" || name == "first" || name == "last" || name == "odd" ||
         name == "even" || name == "value";
}

bool IsSection(const Tag& tag) { return tag.kind == '#' || tag.kind == '/'; }

// Checks one tag and records the helper it uses. Returns why it is wrong, or "" when it is fine.
std::string CheckTag(const Tag& tag, const Scope& scope, HelperUse& use) {
  const std::string& name = tag.name;
  const auto variable = [&scope](absl::string_view v) -> const Scope::Variable* {
    auto it = scope.variables.find(std::string(v));
    return it == scope.variables.end() ? nullptr : &it->second;
  };
  const auto of_type = [&variable](absl::string_view v, std::initializer_list<VariableType> types) {
    const Scope::Variable* var = variable(v);
    return var != nullptr && std::find(types.begin(), types.end(), var->type) != types.end();
  };

  if (tag.kind == '!') return "";
  if (tag.kind == '>') {
    if (scope.phrases == nullptr) return "phrase lists ({{> name}}) exist only in offline recipes";
    if (!scope.allow_partials) return "a phrase cannot use phrase lists";
    if (scope.phrases->count(name) == 0) {
      std::vector<std::string> names;
      for (const auto& entry : *scope.phrases) names.push_back(entry.first);
      return absl::StrCat("no phrase list \"", name, "\" (offline.phrases has: ",
                          names.empty() ? "none" : absl::StrJoin(names, ", "), ")");
    }
    return "";
  }
  if (name == ".") return "";

  const size_t dot = name.find('.');
  if (dot == std::string::npos) {
    if (variable(name) != nullptr || IsLoopField(name)) return "";
    if (name == "capitalize") {
      return IsSection(tag) ? "" : "capitalize is a section: {{#capitalize}}…{{/capitalize}}";
    }
    if (name == "seed") {
      return scope.phrases != nullptr ? "" : "seed exists only in offline recipes";
    }
    for (absl::string_view suffix : {"_n", "_index"}) {
      absl::string_view base = name;
      if (absl::ConsumeSuffix(&base, suffix) &&
          of_type(base, {VariableType::kInteger, VariableType::kArray})) {
        return "";
      }
    }
    return "is neither a variable of this template nor a helper";
  }

  const std::string family = name.substr(0, dot);
  const std::string rest = name.substr(dot + 1);
  if (family == "json") {
    if (variable(rest) == nullptr) return "json.* needs a variable of this template";
    use.json.insert(rest);
  } else if (family == "join" || family == "each") {
    if (!of_type(rest, {VariableType::kArray})) return family + ".* needs an array variable";
    (family == "join" ? use.join : use.each).insert(rest);
  } else if (family == "words" || family == "tag" || family == "points") {
    if (!of_type(rest, {VariableType::kString})) return family + ".* needs a string variable";
    (family == "words" ? use.words : family == "tag" ? use.tag : use.points).insert(rest);
  } else if (family == "is") {
    const size_t value_dot = rest.find('.');
    const std::string v = rest.substr(0, value_dot);
    if (value_dot == std::string::npos || value_dot + 1 == rest.size() ||
        !of_type(v, {VariableType::kString, VariableType::kInteger, VariableType::kBoolean,
                     VariableType::kArray})) {
      return "is.<variable>.<value> needs a string, integer, boolean or array variable";
    }
    use.is.insert(v);
  } else if (family == "times") {
    const Scope::Variable* var = variable(rest);
    if (var == nullptr || var->type != VariableType::kInteger) {
      return "times.* needs an integer variable";
    }
    if (!var->has_max || var->max > kMaxLoop) {
      return absl::StrCat("times.", rest, " needs ", rest, " to declare a max of at most ",
                          kMaxLoop);
    }
    use.times.insert(rest);
  } else if (family == "nth") {
    if (!of_type(rest, {VariableType::kInteger, VariableType::kArray})) {
      return "nth.* needs the integer or array variable of an enclosing times.* or each.* loop";
    }
    if (!IsSection(tag)) return "nth.* is a section: {{#nth.x}}a||b{{/nth.x}}";
    use.nth.insert(rest);
  } else if (family == "clip") {
    size_t length = 0;
    if (!absl::SimpleAtoi(rest, &length) || length == 0 || length > kMaxClip) {
      return absl::StrCat("clip.N needs a length between 1 and ", kMaxClip);
    }
    if (!IsSection(tag)) return "clip.N is a section: {{#clip.N}}…{{/clip.N}}";
    use.clip.insert(length);
  } else if (family == "is_n") {
    size_t n = 0;
    if (!absl::SimpleAtoi(rest, &n)) return "is_n.<number> needs a number";
  } else {
    return "is neither a variable of this template nor a helper";
  }
  return "";
}

std::string JsonLiteral(const VariableValue& value) {
  switch (value.type) {
    case VariableType::kString:
      return absl::StrCat("\"", JsonEscape(value.text), "\"");
    case VariableType::kArray: {
      std::vector<std::string> items;
      for (const std::string& item : value.items) {
        items.push_back(absl::StrCat("\"", JsonEscape(item), "\""));
      }
      return absl::StrCat("[", absl::StrJoin(items, ","), "]");
    }
    default:
      return value.text;
  }
}

mustache::data StringList(const std::vector<std::string>& items) {
  mustache::data list(mustache::data::type::list);
  for (const std::string& item : items) list.push_back(mustache::data(item));
  return list;
}

// One iteration of times.<v> or each.<v>.
mustache::data LoopItem(const std::string& v, size_t index, size_t count) {
  const size_t n = index + 1;
  mustache::data item;
  item.set("n", absl::StrCat(n));
  item.set("index", absl::StrCat(index));
  item.set(v + "_n", absl::StrCat(n));
  item.set(v + "_index", absl::StrCat(index));
  item.set("first", index == 0);
  item.set("last", n == count);
  item.set("odd", n % 2 == 1);
  item.set("even", n % 2 == 0);
  mustache::data is_n;
  is_n.set(absl::StrCat(n), true);
  item.set("is_n", is_n);
  return item;
}

// State shared by the escape function, the lambdas and the phrase lists of one rendering.
struct RenderState {
  bool json = false;
  // Above zero while clip.N renders its content: values stay raw until the clip is escaped whole.
  int raw_depth = 0;
  uint64_t phrase_offset = 0;
  const PhraseLists* phrases = nullptr;
  std::map<std::string, uint64_t> phrase_uses;

  bool escaping() const { return json && raw_depth == 0; }
  // Template text written as plain prose (phrases, nth alternatives) made safe inside a JSON
  // string. Tags hold no characters that JSON escapes, so they survive unchanged.
  std::string Prose(const std::string& text) const { return escaping() ? JsonEscape(text) : text; }
};

std::vector<std::string> Alternatives(const std::string& text) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(text, kAlternativeSeparator)) {
    out.emplace_back(absl::StripAsciiWhitespace(part));
  }
  return out;
}

mustache::data BuildContext(const VariableValues& values, const HelperUse& use,
                            const OfflineOptions* offline, RenderState* state) {
  mustache::data root;
  mustache::data json, join, is, times, each, words, tag, points;
  for (const auto& [name, value] : values) {
    switch (value.type) {
      case VariableType::kBoolean:
        root.set(name, value.boolean);
        break;
      case VariableType::kArray:
        root.set(name, StringList(value.items));
        break;
      default:
        root.set(name, value.text);
    }
    if (use.json.count(name)) json.set(name, JsonLiteral(value));
    // Left out when empty, so that {{#join.x}} sections skip it.
    if (use.join.count(name) && !value.items.empty()) join.set(name, JoinForProse(value.items));
    if (use.is.count(name)) {
      mustache::data equal;
      if (value.type == VariableType::kArray) {
        for (const std::string& item : value.items) equal.set(item, true);
      } else {
        equal.set(value.text, true);
      }
      is.set(name, equal);
    }
    if (use.times.count(name)) {
      const auto count = static_cast<size_t>(std::clamp<int64_t>(value.integer, 0, kMaxLoop));
      mustache::data list(mustache::data::type::list);
      for (size_t i = 0; i < count; ++i) list.push_back(LoopItem(name, i, count));
      times.set(name, list);
    }
    if (use.each.count(name)) {
      mustache::data list(mustache::data::type::list);
      for (size_t i = 0; i < value.items.size(); ++i) {
        mustache::data item = LoopItem(name, i, value.items.size());
        item.set("value", value.items[i]);
        list.push_back(item);
      }
      each.set(name, list);
    }
    if (use.words.count(name)) words.set(name, StringList(Keywords(value.text, kKeywordCount)));
    if (use.tag.count(name)) {
      // Left out when empty so that {{#tag.x}} sections skip it.
      if (std::string body = HashtagBody(value.text); !body.empty()) tag.set(name, body);
    }
    if (use.points.count(name)) {
      points.set(name, StringList(Points(value.text, kMaxPoints, kPointLength)));
    }
  }
  // An optional variable left unset is null in JSON.
  for (const std::string& name : use.json) {
    if (json.get(name) == nullptr) json.set(name, "null");
  }
  root.set("json", json);
  root.set("join", join);
  root.set("is", is);
  root.set("times", times);
  root.set("each", each);
  root.set("words", words);
  root.set("tag", tag);
  root.set("points", points);

  mustache::data clip;
  for (size_t length : use.clip) {
    clip.set(absl::StrCat(length),
             mustache::lambda2{
                 [state, length](const std::string& text, const mustache::renderer& render) {
                   ++state->raw_depth;
                   std::string rendered = render(text);
                   --state->raw_depth;
                   std::string clipped = Clip(rendered, length);
                   return state->escaping() ? JsonEscape(clipped) : clipped;
                 }});
  }
  root.set("clip", clip);

  root.set("capitalize",
           mustache::lambda2{[](const std::string& text, const mustache::renderer& render) {
             std::string rendered = render(text);
             // Only a leading ASCII letter changes, so escaped JSON stays intact.
             if (!rendered.empty()) {
               rendered[0] = absl::ascii_toupper(static_cast<unsigned char>(rendered[0]));
             }
             return rendered;
           }});

  mustache::data nth;
  for (const std::string& name : use.nth) {
    nth.set(name, mustache::lambda2{[state, name](const std::string& text,
                                                  const mustache::renderer& render) {
              size_t index = 0;
              if (!absl::SimpleAtoi(render(absl::StrCat("{{", name, "_index}}")), &index)) {
                index = 0;  // outside its loop: the first alternative
              }
              const std::vector<std::string> alternatives = Alternatives(text);
              return render(state->Prose(alternatives[index % alternatives.size()]));
            }});
  }
  root.set("nth", nth);

  if (offline != nullptr) {
    root.set("seed", absl::StrCat(offline->seed));
    if (offline->phrases != nullptr) {
      for (const auto& entry : *offline->phrases) {
        const std::string name = entry.first;
        root.set(name, mustache::partial{[state, name] {
                   const std::vector<std::string>& list = state->phrases->at(name);
                   const uint64_t use_count = state->phrase_uses[name]++;
                   return state->Prose(list[(state->phrase_offset + use_count) % list.size()]);
                 }});
      }
    }
  }
  return root;
}

}  // namespace

absl::Status CheckTemplate(absl::string_view text, const Scope& scope, HelperUse& use) {
  mustache::mustache parsed{std::string(text)};
  if (!parsed.is_valid()) {
    return absl::InvalidArgumentError(absl::StrCat("not valid Mustache: ", parsed.error_message()));
  }
  absl::StatusOr<std::vector<Tag>> tags = ScanTags(text);
  if (!tags.ok()) return tags.status();
  for (const Tag& tag : *tags) {
    const std::string reason = CheckTag(tag, scope, use);
    if (!reason.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", tag.line, ": {{", tag.kind == 'v' ? "" : std::string(1, tag.kind),
                       tag.name, "}} ", reason));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> RenderTemplate(absl::string_view text, const VariableValues& values,
                                           const HelperUse& use, const OfflineOptions* offline) {
  RenderState state;
  if (offline != nullptr) {
    state.json = offline->json;
    state.phrase_offset = offline->phrase_offset;
    state.phrases = offline->phrases;
  }
  const mustache::data context = BuildContext(values, use, offline, &state);
  mustache::mustache engine{std::string(text)};
  engine.set_custom_escape(
      [&state](const std::string& s) { return state.escaping() ? JsonEscape(s) : s; });
  std::string out = engine.render(context);
  if (!engine.is_valid()) {
    return absl::InvalidArgumentError(absl::StrCat("rendering failed: ", engine.error_message()));
  }
  return out;
}

}  // namespace montage::generation::internal
