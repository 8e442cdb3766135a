#include "services/generation/catalogue/catalogue.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "google/rpc/error_details.pb.h"
#include "gtest/gtest.h"

namespace montage::generation {
namespace {

using ::google::protobuf::Struct;
using ::google::protobuf::Value;
using ::testing::HasSubstr;

// ---- helpers --------------------------------------------------------------------------------

Value Str(const std::string& s) {
  Value v;
  v.set_string_value(s);
  return v;
}
Value Num(double d) {
  Value v;
  v.set_number_value(d);
  return v;
}
Value Bool(bool b) {
  Value v;
  v.set_bool_value(b);
  return v;
}
Value List(const std::vector<Value>& items) {
  Value v;
  for (const Value& item : items) *v.mutable_list_value()->add_values() = item;
  return v;
}
Value Strs(const std::vector<std::string>& items) {
  Value v;
  for (const std::string& item : items)
    v.mutable_list_value()->add_values()->set_string_value(item);
  return v;
}

Struct Vars(std::initializer_list<std::pair<std::string, Value>> fields) {
  Struct s;
  for (const auto& [name, value] : fields) (*s.mutable_fields())[name] = value;
  return s;
}

// The field named by the google.rpc.BadRequest detail of `status`.
std::string BadField(const absl::Status& status) {
  auto payload = status.GetPayload("type.googleapis.com/google.rpc.BadRequest");
  if (!payload.has_value()) return "<no BadRequest>";
  google::rpc::BadRequest bad_request;
  if (!bad_request.ParseFromString(std::string(*payload)) ||
      bad_request.field_violations_size() != 1) {
    return "<malformed BadRequest>";
  }
  return bad_request.field_violations(0).field();
}

size_t CodePoints(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Every string inside `value`, concatenated with newlines.
void CollectStrings(const Value& value, std::string& out) {
  switch (value.kind_case()) {
    case Value::kStringValue:
      absl::StrAppend(&out, value.string_value(), "\n");
      break;
    case Value::kListValue:
      for (const Value& item : value.list_value().values()) CollectStrings(item, out);
      break;
    case Value::kStructValue:
      for (const auto& [key, item] : value.struct_value().fields()) {
        absl::StrAppend(&out, key, "\n");
        CollectStrings(item, out);
      }
      break;
    default:
      break;
  }
}

std::string AllMessages(const RenderedPrompt& prompt) {
  std::string out;
  for (const PromptMessage& m : prompt.messages) absl::StrAppend(&out, m.content, "\n");
  return out;
}

// Loaded once: loading renders every template's self-check.
const Catalogue& Builtins() {
  static const Catalogue* const kCatalogue = [] {
    absl::StatusOr<std::unique_ptr<Catalogue>> loaded = Catalogue::Load({});
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? loaded->release() : nullptr;
  }();
  return *kCatalogue;
}

// Quotes, backslashes, newlines, tabs, Unicode and Mustache braces that must stay text; short
// enough for every free-text variable (at most 60 characters).
const std::string kNasty = "He said \"hi\" \\ {{topic}} {{{x}}} <b>\nline 2\tcafé ✓ 🎬 “q”";
// The part of kNasty that survives whitespace folding unchanged.
const std::string kNastyHead = "He said \"hi\" \\ {{topic}} {{{x}}} <b>";

struct TemplateCase {
  std::string name;
  Struct variables;                    // sensible values
  std::vector<std::string> in_prompt;  // must appear in the rendered prompt
  std::vector<std::string> free_text;  // variables that take any text
  bool offline_echoes = true;          // the offline answer quotes the free text
};

std::vector<TemplateCase> Cases() {
  return {
      {"brain_dump_outline",
       Vars({{"notes", Str("- first loaf was a brick\n- starter needs a week. feed it daily!\n"
                           "1. bake in a dutch oven")},
             {"format", Str("blog_post")},
             {"audience", Str("home bakers")}}),
       {"first loaf was a brick", "bake in a dutch oven", "blog_post", "home bakers"},
       {"notes", "audience"}},
      {"campaign_brief",
       Vars({{"brief", Str("Launching a free beta of our video toolkit for creators.")},
             {"platforms", Strs({"x", "linkedin", "tiktok"})},
             {"audience", Str("solo YouTubers")},
             {"tone", Str("playful")}}),
       {"Launching a free beta", "x, linkedin and tiktok", "solo YouTubers", "playful"},
       {"brief", "audience", "tone"}},
      {"content_calendar",
       Vars({{"topic", Str("home espresso")},
             {"platforms", Strs({"instagram", "tiktok", "x"})},
             {"weeks", Num(3)},
             {"posts_per_week", Num(2)},
             {"audience", Str("coffee beginners")}}),
       {"home espresso", "instagram, tiktok and x", "Plan 3 weeks with 2 posts",
        "coffee beginners"},
       {"topic", "audience"}},
      {"description_seo",
       Vars({{"title", Str("How to light a room with one lamp")},
             {"script_summary", Str("Where to put the lamp. Bouncing light off a wall.")},
             {"keywords", Strs({"home lighting", "one lamp setup"})},
             {"chapters", Bool(true)}}),
       {"How to light a room with one lamp", "Bouncing light off a wall",
        "home lighting and one lamp setup", "Propose chapters"},
       {"title", "script_summary"}},
      {"hooks",
       Vars({{"topic", Str("budget travel in Japan")},
             {"count", Num(4)},
             {"style", Str("mixed")},
             {"audience", Str("students")}}),
       {"budget travel in Japan", "Write 4 hooks", "students"},
       {"topic", "audience"}},
      {"platform_post",
       Vars({{"platform", Str("linkedin")},
             {"brief", Str("We open-sourced our video toolkit today.")},
             {"plan", Str("Key message: free and open.")},
             {"index", Num(2)},
             {"tone", Str("humble")}}),
       {"We open-sourced our video toolkit today.", "Key message: free and open.",
        "post 2 of the series", "humble", "linkedin"},
       {"brief", "plan", "tone"}},
      {"podcast_script",
       Vars({{"topic", Str("starting a vegetable garden on a balcony")},
             {"host_name", Str("Maya")},
             {"guest_name", Str("Tom")},
             {"turns", Num(6)},
             {"tone", Str("cosy")},
             {"audience", Str("city dwellers")}}),
       {"starting a vegetable garden on a balcony", "Host: Maya", "Guest: Tom", "at least 6 turns",
        "cosy", "city dwellers"},
       {"topic", "host_name", "guest_name", "tone", "audience"}},
      {"thumbnail_text",
       Vars({{"topic", Str("editing videos on a phone")},
             {"video_title", Str("I edited on my phone for 30 days")},
             {"count", Num(3)}}),
       {"editing videos on a phone", "I edited on my phone for 30 days", "Suggest 3"},
       {"topic", "video_title"},
       /*offline_echoes=*/false},
      {"titles_and_hashtags",
       Vars({{"topic", Str("sourdough baking for beginners")},
             {"platform", Str("instagram")},
             {"count", Num(6)}}),
       {"sourdough baking for beginners", "Write 6 title options", "Instagram"},
       {"topic"}},
      {"video_script",
       Vars({{"topic", Str("how to light a room with one lamp")},
             {"audience", Str("new YouTubers filming at home")},
             {"duration_seconds", Num(90)},
             {"tone", Str("calm")},
             {"platform", Str("youtube")}}),
       {"how to light a room with one lamp", "new YouTubers filming at home", "90-second video",
        "calm", "YouTube"},
       {"topic", "audience", "tone"}},
      {"x_post_rewrite",
       Vars({{"post", Str("Editing takes too long. Tools should do the boring parts.")},
             {"tone", Str("witty")},
             {"count", Num(4)}}),
       {"Editing takes too long. Tools should do the boring parts.", "witty", "Write 4 variants"},
       {"post", "tone"}},
  };
}

class TemplateTest : public ::testing::TestWithParam<TemplateCase> {};

std::string CaseName(const ::testing::TestParamInfo<TemplateCase>& info) { return info.param.name; }

// ---- every template -------------------------------------------------------------------------

TEST(CatalogueTest, ListsEveryBuiltinSortedAndDescribed) {
  std::vector<std::string> names;
  for (const v1::Template& t : Builtins().List()) {
    names.push_back(t.name());
    EXPECT_FALSE(t.description().empty()) << t.name();
    for (const v1::Template::Variable& v : t.variables()) {
      EXPECT_FALSE(v.description().empty()) << t.name() << "." << v.name();
      EXPECT_THAT(v.type(), ::testing::AnyOf("string", "integer", "number", "boolean", "array"));
    }
  }
  std::vector<std::string> expected;
  for (const TemplateCase& c : Cases()) expected.push_back(c.name);
  EXPECT_EQ(names, expected);  // Cases() is in name order; a new template needs a case
}

TEST_P(TemplateTest, RendersPromptWithTheValues) {
  const TemplateCase& c = GetParam();
  absl::StatusOr<RenderedPrompt> prompt = Builtins().Render(c.name, c.variables);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(prompt->template_name, c.name);
  ASSERT_FALSE(prompt->messages.empty());
  EXPECT_EQ(prompt->messages.back().role, PromptMessage::Role::kUser);
  const std::string text = AllMessages(*prompt);
  for (const std::string& expected : c.in_prompt) EXPECT_THAT(text, HasSubstr(expected));
  EXPECT_THAT(text, ::testing::Not(HasSubstr("{{")));

  absl::StatusOr<v1::Template> description = Builtins().Get(c.name);
  ASSERT_TRUE(description.ok());
  if (!prompt->output_schema_json.empty()) {
    EXPECT_TRUE(description->has_output_schema());
    EXPECT_THAT(prompt->messages.back().content, HasSubstr("JSON Schema"));
    EXPECT_THAT(prompt->messages.back().content, HasSubstr("\"required\""));
  } else {
    EXPECT_FALSE(description->has_output_schema());
  }
}

TEST_P(TemplateTest, OfflineAnswersAreValidAndDeterministic) {
  const TemplateCase& c = GetParam();
  absl::StatusOr<RenderedPrompt> prompt = Builtins().Render(c.name, c.variables);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  std::set<std::string> distinct;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    absl::StatusOr<std::string> answer = Builtins().OfflineAnswer(*prompt, seed);
    ASSERT_TRUE(answer.ok()) << answer.status();
    ASSERT_FALSE(answer->empty());
    EXPECT_EQ(*answer, *Builtins().OfflineAnswer(*prompt, seed)) << "seed " << seed;
    EXPECT_THAT(*answer, ::testing::Not(HasSubstr("{{")));
    if (!prompt->output_schema_json.empty()) {
      Value parsed;
      absl::Status valid = Catalogue::ValidateOutput(prompt->output_schema_json, *answer, &parsed);
      EXPECT_TRUE(valid.ok()) << valid << "\n" << *answer;
      EXPECT_EQ(parsed.kind_case(), Value::kStructValue);
    }
    distinct.insert(*answer);
  }
  EXPECT_GE(distinct.size(), 2u) << "seeds should vary the wording";
}

TEST_P(TemplateTest, NastyStringsStayText) {
  const TemplateCase& c = GetParam();
  ASSERT_LE(CodePoints(kNasty), 60u);
  Struct variables = c.variables;
  for (const std::string& name : c.free_text) (*variables.mutable_fields())[name] = Str(kNasty);
  absl::StatusOr<RenderedPrompt> prompt = Builtins().Render(c.name, variables);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  // Inserted verbatim: not HTML-escaped, and braces in values are not expanded as tags.
  EXPECT_THAT(AllMessages(*prompt), HasSubstr(kNasty));
  EXPECT_EQ(prompt->variables.fields().at(c.free_text[0]).string_value(), kNasty);

  for (uint64_t seed = 0; seed < 4; ++seed) {
    absl::StatusOr<std::string> answer = Builtins().OfflineAnswer(*prompt, seed);
    ASSERT_TRUE(answer.ok()) << answer.status();
    std::string text = *answer;
    if (!prompt->output_schema_json.empty()) {
      Value parsed;
      absl::Status valid = Catalogue::ValidateOutput(prompt->output_schema_json, *answer, &parsed);
      ASSERT_TRUE(valid.ok()) << valid << "\n" << *answer;
      text.clear();
      CollectStrings(parsed, text);
    }
    if (c.offline_echoes) {
      EXPECT_THAT(text, HasSubstr(kNastyHead)) << *answer;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Builtins, TemplateTest, ::testing::ValuesIn(Cases()), CaseName);

// ---- template-specific promises -------------------------------------------------------------

TEST(CatalogueTest, XPostsStayWithin280Characters) {
  std::string long_brief;
  while (long_brief.size() < 9000) {
    long_brief += "Our toolkit writes, narrates and edits short videos — “fast” 🎬 and free. ";
  }
  std::string one_word(3000, 'x');
  for (const std::string& brief : {long_brief, one_word, kNasty}) {
    for (int index = 1; index <= 3; ++index) {
      absl::StatusOr<RenderedPrompt> prompt = Builtins().Render(
          "platform_post",
          Vars({{"platform", Str("x")}, {"brief", Str(brief)}, {"index", Num(index)}}));
      ASSERT_TRUE(prompt.ok()) << prompt.status();
      for (uint64_t seed = 0; seed < 6; ++seed) {
        std::string post = *Builtins().OfflineAnswer(*prompt, seed);
        EXPECT_LE(CodePoints(post), 280u) << post;
        EXPECT_GT(CodePoints(post), 20u) << post;
      }
    }
  }

  absl::StatusOr<RenderedPrompt> rewrite = Builtins().Render(
      "x_post_rewrite", Vars({{"post", Str(long_brief.substr(0, 4990))}, {"count", Num(5)}}));
  ASSERT_TRUE(rewrite.ok()) << rewrite.status();
  for (uint64_t seed = 0; seed < 6; ++seed) {
    Value parsed;
    ASSERT_TRUE(Catalogue::ValidateOutput(rewrite->output_schema_json,
                                          *Builtins().OfflineAnswer(*rewrite, seed), &parsed)
                    .ok());
    const auto& variants = parsed.struct_value().fields().at("variants").list_value().values();
    EXPECT_EQ(variants.size(), 5);
    for (const Value& v : variants) EXPECT_LE(CodePoints(v.string_value()), 280u);
  }
}

TEST(CatalogueTest, PodcastIsAnAlternatingDialogueOfAtLeastTheTurnsAsked) {
  for (int turns : {4, 5, 8, 9, 40}) {
    absl::StatusOr<RenderedPrompt> prompt =
        Builtins().Render("podcast_script", Vars({{"topic", Str("learning the guitar as an adult")},
                                                  {"host_name", Str("Maya")},
                                                  {"guest_name", Str("Tom")},
                                                  {"turns", Num(turns)}}));
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    for (uint64_t seed = 0; seed < 3; ++seed) {
      Value parsed;
      ASSERT_TRUE(Catalogue::ValidateOutput(prompt->output_schema_json,
                                            *Builtins().OfflineAnswer(*prompt, seed), &parsed)
                      .ok());
      const auto& list = parsed.struct_value().fields().at("turns").list_value().values();
      ASSERT_GE(list.size(), turns);
      std::string all;
      std::set<std::string> distinct;
      for (int i = 0; i < list.size(); ++i) {
        const auto& fields = list[i].struct_value().fields();
        EXPECT_EQ(fields.at("speaker").string_value(), i % 2 == 0 ? "host" : "guest")
            << "turn " << i;
        const std::string& text = fields.at("text").string_value();
        // A few sentences each, ready to be read aloud.
        int sentences = 0;
        for (char ch : text) sentences += ch == '.' || ch == '?' || ch == '!';
        EXPECT_GE(sentences, 2) << text;
        EXPECT_THAT(text, ::testing::Not(HasSubstr("  ")));
        if (i > 0) {
          EXPECT_NE(text, list[i - 1].struct_value().fields().at("text").string_value());
        }
        distinct.insert(text);
        absl::StrAppend(&all, text, "\n");
      }
      EXPECT_EQ(list[list.size() - 1].struct_value().fields().at("speaker").string_value(),
                "host");  // the host closes the show
      EXPECT_GE(distinct.size(), std::min<size_t>(list.size(), 8));
      EXPECT_THAT(all, HasSubstr("learning the guitar as an adult"));
      EXPECT_THAT(all, HasSubstr("Maya"));
      EXPECT_THAT(all, HasSubstr("Tom"));
    }
  }
}

TEST(CatalogueTest, CalendarHasOneEntryPerPostSpreadOverTheWeek) {
  absl::StatusOr<RenderedPrompt> prompt =
      Builtins().Render("content_calendar", Vars({{"topic", Str("home espresso")},
                                                  {"platforms", Strs({"instagram", "x"})},
                                                  {"weeks", Num(3)},
                                                  {"posts_per_week", Num(3)}}));
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  Value parsed;
  ASSERT_TRUE(Catalogue::ValidateOutput(prompt->output_schema_json,
                                        *Builtins().OfflineAnswer(*prompt, 7), &parsed)
                  .ok());
  const auto& entries = parsed.struct_value().fields().at("entries").list_value().values();
  ASSERT_EQ(entries.size(), 3 * 3 * 2);
  const auto& first = entries[0].struct_value().fields();
  EXPECT_EQ(first.at("week").number_value(), 1);
  EXPECT_EQ(first.at("day").string_value(), "Monday");
  EXPECT_EQ(first.at("platform").string_value(), "instagram");
  const auto& last = entries[entries.size() - 1].struct_value().fields();
  EXPECT_EQ(last.at("week").number_value(), 3);
  EXPECT_EQ(last.at("day").string_value(), "Friday");
  EXPECT_EQ(last.at("platform").string_value(), "x");
}

TEST(CatalogueTest, RenderedVariablesHaveDefaultsAndNullMeansUnset) {
  absl::StatusOr<RenderedPrompt> prompt = Builtins().Render(
      "video_script", Vars({{"topic", Str("lamps")}, {"tone", Value()}}));  // Value() is unset
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  const auto& fields = prompt->variables.fields();
  EXPECT_EQ(fields.at("duration_seconds").number_value(), 60);
  EXPECT_EQ(fields.at("platform").string_value(), "youtube");
  EXPECT_EQ(fields.at("tone").string_value(), "friendly and energetic");

  Value null_value;
  null_value.set_null_value(google::protobuf::NULL_VALUE);
  prompt =
      Builtins().Render("video_script", Vars({{"topic", Str("lamps")}, {"platform", null_value}}));
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(prompt->variables.fields().at("platform").string_value(), "youtube");
}

// ---- bad input ------------------------------------------------------------------------------

struct BadInput {
  std::string template_name;
  Struct variables;
  std::string field;
  std::string message;
};

TEST(CatalogueTest, BadVariablesNameTheField) {
  const std::vector<BadInput> cases = {
      {"video_script", Vars({}), "variables.topic", "is required (What the video is about"},
      {"video_script", Vars({{"topic", Str("  ")}}), "variables.topic", "must not be empty"},
      {"video_script", Vars({{"topic", Num(5)}}), "variables.topic", "must be a string"},
      {"video_script", Vars({{"topic", Str("t")}, {"duration_seconds", Str("60")}}),
       "variables.duration_seconds", "must be an integer"},
      {"video_script", Vars({{"topic", Str("t")}, {"duration_seconds", Num(60.5)}}),
       "variables.duration_seconds", "must be an integer"},
      {"video_script", Vars({{"topic", Str("t")}, {"duration_seconds", Num(5)}}),
       "variables.duration_seconds", "must be between 15 and 1800 (got 5)"},
      {"video_script", Vars({{"topic", Str("t")}, {"platform", Str("myspace")}}),
       "variables.platform", "must be one of: youtube, youtube_shorts"},
      {"video_script", Vars({{"topic", Str(std::string(501, 'a'))}}), "variables.topic",
       "must be at most 500 characters (got 501)"},
      {"video_script", Vars({{"topic", Str("t")}, {"topik", Str("t")}}), "variables.topik",
       "is not a variable of template video_script (known: topic, audience, duration_seconds, "
       "tone, platform)"},
      {"description_seo",
       Vars({{"title", Str("t")}, {"script_summary", Str("s")}, {"chapters", Str("yes")}}),
       "variables.chapters", "must be a boolean"},
      {"description_seo",
       Vars({{"title", Str("t")}, {"script_summary", Str("s")}, {"keywords", Str("a, b")}}),
       "variables.keywords", "must be an array of strings"},
      {"description_seo",
       Vars({{"title", Str("t")}, {"script_summary", Str("s")}, {"keywords", List({Num(1)})}}),
       "variables.keywords[0]", "must be a string"},
      {"campaign_brief", Vars({{"brief", Str("b")}, {"platforms", Strs({"x", "myspace"})}}),
       "variables.platforms[1]", "must be one of"},
      {"campaign_brief", Vars({{"brief", Str("b")}, {"platforms", Strs({})}}),
       "variables.platforms", ""},
      {"podcast_script", Vars({{"topic", Str("t")}, {"turns", Num(41)}}), "variables.turns",
       "must be between 4 and 40"},
      {"nope", Vars({}), "template", "unknown template \"nope\" (known: brain_dump_outline"},
  };
  for (const BadInput& c : cases) {
    absl::StatusOr<RenderedPrompt> prompt = Builtins().Render(c.template_name, c.variables);
    if (c.message.empty()) {  // accepted: an empty optional list is fine
      EXPECT_TRUE(prompt.ok()) << prompt.status();
      continue;
    }
    ASSERT_FALSE(prompt.ok()) << c.field;
    EXPECT_EQ(prompt.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(BadField(prompt.status()), c.field) << prompt.status();
    EXPECT_THAT(prompt.status().message(), HasSubstr(c.message));
  }
}

TEST(CatalogueTest, StringsAreLimitedTo20000CharactersByDefault) {
  absl::StatusOr<std::unique_ptr<Catalogue>> catalogue = Catalogue::FromSources({{"mine.yaml", R"(
name: echo
description: Says the text back.
variables:
  - {name: text, type: string, required: true, description: Anything.}
user: "{{text}}"
offline:
  answer: "{{text}}"
)"}});
  ASSERT_TRUE(catalogue.ok()) << catalogue.status();
  // Code points, not bytes: 20000 × "é" is 40000 bytes.
  std::string ok;
  for (int i = 0; i < 20000; ++i) ok += "é";
  EXPECT_TRUE((*catalogue)->Render("echo", Vars({{"text", Str(ok)}})).ok());
  absl::StatusOr<RenderedPrompt> too_long =
      (*catalogue)->Render("echo", Vars({{"text", Str(ok + "é")}}));
  ASSERT_FALSE(too_long.ok());
  EXPECT_EQ(BadField(too_long.status()), "variables.text");
  EXPECT_THAT(too_long.status().message(), HasSubstr("at most 20000 characters"));
}

TEST(CatalogueTest, GetAndOfflineAnswerOfUnknownTemplate) {
  EXPECT_EQ(Builtins().Get("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Builtins().Get("nope").status().message(), HasSubstr("nope"));
  RenderedPrompt prompt;
  prompt.template_name = "nope";
  EXPECT_EQ(Builtins().OfflineAnswer(prompt, 1).status().code(), absl::StatusCode::kNotFound);
}

// ---- ValidateOutput -------------------------------------------------------------------------

TEST(CatalogueTest, ValidateOutputExplainsWhatIsWrong) {
  const std::string schema =
      Builtins().Render("podcast_script", Vars({{"topic", Str("t")}}))->output_schema_json;
  ASSERT_FALSE(schema.empty());
  struct Case {
    std::string text;
    std::vector<std::string> message;
  };
  const std::vector<Case> cases = {
      {"{\"title\": \"t\", \"turns\": [", {"not valid JSON", "offset"}},
      {"not json at all", {"not valid JSON"}},
      {R"({"title": 5, "turns": []})", {"/title", "\"type\"", "expected \"string\", got integer"}},
      {R"({"turns": [{"speaker": "host", "text": "hi"}, {"speaker": "guest", "text": "yo"}]})",
       {"at /:", "\"required\"", "missing \"title\""}},
      {R"({"title": "t", "turns": [{"speaker": "host", "text": "a"}, {"speaker": "bot", "text": "b"}]})",
       {"/turns/1/speaker", "\"enum\""}},
      {R"({"title": "t", "turns": [{"speaker": "host"}, {"speaker": "guest", "text": "b"}]})",
       {"/turns/0", "missing \"text\""}},
  };
  for (const Case& c : cases) {
    Value parsed;
    absl::Status status = Catalogue::ValidateOutput(schema, c.text, &parsed);
    ASSERT_FALSE(status.ok()) << c.text;
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    for (const std::string& part : c.message) EXPECT_THAT(status.message(), HasSubstr(part));
  }

  const std::string x_schema =
      Builtins().Render("x_post_rewrite", Vars({{"post", Str("p")}}))->output_schema_json;
  absl::Status too_long = Catalogue::ValidateOutput(
      x_schema, absl::StrCat(R"({"variants": [")", std::string(281, 'a'), "\"]}"), nullptr);
  EXPECT_THAT(too_long.message(), HasSubstr("maxLength"));
  EXPECT_THAT(too_long.message(), HasSubstr("/variants/0"));
}

TEST(CatalogueTest, ValidateOutputAcceptsFencedJsonAndFillsTheValue) {
  const std::string schema =
      Builtins().Render("hooks", Vars({{"topic", Str("t")}}))->output_schema_json;
  for (const std::string& text : {
           std::string("{\"hooks\": [\"one\", \"two ✓\"]}"),
           std::string("```json\n{\"hooks\": [\"one\", \"two ✓\"]}\n```"),
           std::string("  ```\n{\"hooks\": [\"one\", \"two ✓\"]}\n```  \n"),
           std::string("Here you go:\n\n```json\n{\"hooks\": [\"one\", \"two ✓\"]}\n```\nEnjoy!"),
       }) {
    Value parsed;
    absl::Status status = Catalogue::ValidateOutput(schema, text, &parsed);
    ASSERT_TRUE(status.ok()) << status << "\n" << text;
    const auto& hooks = parsed.struct_value().fields().at("hooks").list_value().values();
    ASSERT_EQ(hooks.size(), 2);
    EXPECT_EQ(hooks[1].string_value(), "two ✓");
  }
  // A fence around something that is not JSON is still an error.
  EXPECT_FALSE(Catalogue::ValidateOutput(schema, "```json\n{hooks: []}\n```", nullptr).ok());
}

// ---- loading --------------------------------------------------------------------------------

// A small valid template; tests break one part at a time.
std::string MiniTemplate(const std::string& name = "mini", const std::string& extra = "") {
  return absl::StrCat(R"(
name: )",
                      name, R"(
description: A tiny template for tests.
variables:
  - name: topic
    type: string
    required: true
    description: The subject.
  - name: count
    type: integer
    default: 2
    min: 1
    max: 5
    description: How many.
user: "Write {{count}} lines about {{topic}}."
output_schema:
  type: object
  required: [lines]
  properties:
    lines:
      type: array
      minItems: 1
      items: {type: string}
offline:
  answer: |
    {"lines": [
      {{#times.count}}"{{> line}}",{{/times.count}}
    ]}
  phrases:
    line: ["{{#capitalize}}{{topic}}{{/capitalize}} is great.", "More about {{topic}}."]
)",
                      extra);
}

TEST(CatalogueTest, MiniTemplateLoadsAndAnswers) {
  absl::StatusOr<std::unique_ptr<Catalogue>> catalogue =
      Catalogue::FromSources({{"mini.yaml", MiniTemplate()}});
  ASSERT_TRUE(catalogue.ok()) << catalogue.status();
  absl::StatusOr<RenderedPrompt> prompt =
      (*catalogue)->Render("mini", Vars({{"topic", Str("tea \"time\"")}, {"count", Num(3)}}));
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_THAT(prompt->messages[0].content, HasSubstr("Write 3 lines about tea \"time\"."));
  absl::StatusOr<std::string> answer = (*catalogue)->OfflineAnswer(*prompt, 0);
  ASSERT_TRUE(answer.ok()) << answer.status();
  Value parsed;
  ASSERT_TRUE(Catalogue::ValidateOutput(prompt->output_schema_json, *answer, &parsed).ok());
  const auto& lines = parsed.struct_value().fields().at("lines").list_value().values();
  ASSERT_EQ(lines.size(), 3);
  // The phrase list cycles: consecutive lines differ, the third repeats the first.
  EXPECT_NE(lines[0].string_value(), lines[1].string_value());
  EXPECT_EQ(lines[0].string_value(), lines[2].string_value());
  std::set<std::string> expected = {"Tea \"time\" is great.", "More about tea \"time\"."};
  EXPECT_TRUE(expected.count(lines[0].string_value())) << lines[0].string_value();
}

TEST(CatalogueTest, BrokenSourcesAreReportedWithTheirName) {
  struct Case {
    std::string what;
    std::string yaml;
    std::string message;
  };
  const std::string mini = MiniTemplate();
  const auto replace = [&mini](const std::string& from, const std::string& to) {
    std::string out = mini;
    const size_t at = out.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return out.replace(at, from.size(), to);
  };
  const std::vector<Case> cases = {
      {"not YAML", "name: [unclosed\n  - x", "not valid YAML"},
      {"not a mapping", "- a\n- b", "must be a YAML mapping"},
      {"unknown key", mini + "colour: blue\n", "unknown key \"colour\""},
      {"no offline recipe", mini.substr(0, mini.find("offline:")), "missing \"offline\""},
      {"bad type", replace("type: integer", "type: int"), "type must be one of"},
      {"required with default", replace("default: 2", "default: 2\n    required: true"),
       "cannot be required"},
      {"default out of range", replace("default: 2", "default: 9"), "must be between 1 and 5"},
      {"unknown tag", replace("Write {{count}}", "Write {{cuont}}"),
       "{{cuont}} is neither a variable"},
      {"unclosed section", replace("Write {{count}}", "Write {{#count}}"), "not valid Mustache"},
      {"schema keyword RapidJSON ignores", replace("items: {type: string}", "items: {const: x}"),
       "output_schema"},
      {"schema type typo", replace("type: array", "type: arrray"), "output_schema"},
      {"unsupported regex", replace("items: {type: string}", "items: {pattern: '\\d+'}"),
       "not a supported regex"},
      {"dangling $ref", replace("items: {type: string}", "items: {$ref: '#/definitions/x'}"),
       "does not point into this schema"},
      {"schema not an object", replace("  type: object\n", "  type: array\n"),
       "must describe an object"},
      {"unknown phrase list", replace("{{> line}}", "{{> lines}}"), "no phrase list \"lines\""},
      {"recipe writes invalid JSON", replace("\"{{> line}}\",", "{{{topic}}},"), "not valid JSON"},
      {"recipe misses the schema", replace("\"{{> line}}\",", "{{count}},"),
       "does not match output_schema"},
      {"times without max", replace("    max: 5\n", ""), "needs count to declare a max"},
      {"clip as a variable", replace("{{> line}}", "{{clip.10}}"), "clip.N is a section"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<Catalogue>> catalogue =
        Catalogue::FromSources({{"user/broken.yaml", c.yaml}});
    ASSERT_FALSE(catalogue.ok()) << c.what;
    EXPECT_EQ(catalogue.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(catalogue.status().message(), HasSubstr("user/broken.yaml")) << c.what;
    EXPECT_THAT(catalogue.status().message(), HasSubstr(c.message)) << c.what;
  }
}

class TempDir {
 public:
  TempDir() : path_(std::filesystem::path(::testing::TempDir()) / "catalogue_test_templates") {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  void Write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name) << text;
  }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

TEST(CatalogueTest, UserFolderAddsAndReplacesTemplates) {
  TempDir dir;
  std::string hooks = MiniTemplate("hooks");
  const std::string mini_description = "A tiny template for tests.";
  hooks.replace(hooks.find(mini_description), mini_description.size(), "The creator's own hooks.");
  dir.Write("hooks.yaml", hooks);
  dir.Write("extra.yaml", MiniTemplate("extra"));
  dir.Write("notes.txt", "not a template");

  absl::StatusOr<std::unique_ptr<Catalogue>> catalogue = Catalogue::Load({dir.path()});
  ASSERT_TRUE(catalogue.ok()) << catalogue.status();
  EXPECT_EQ((*catalogue)->List().size(), Builtins().List().size() + 1);
  EXPECT_EQ((*catalogue)->Get("hooks")->description(), "The creator's own hooks.");
  EXPECT_TRUE((*catalogue)->Get("extra").ok());
  // The replacement is used for rendering too.
  EXPECT_THAT((*catalogue)->Render("hooks", Vars({{"topic", Str("tea")}}))->messages[0].content,
              HasSubstr("Write 2 lines about tea."));

  dir.Write("broken.yaml", "name: [");
  absl::StatusOr<std::unique_ptr<Catalogue>> broken = Catalogue::Load({dir.path()});
  ASSERT_FALSE(broken.ok());
  EXPECT_THAT(broken.status().message(), HasSubstr("broken.yaml"));

  absl::StatusOr<std::unique_ptr<Catalogue>> missing = Catalogue::Load({dir.path() + "/nope"});
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("nope"));
}

TEST(CatalogueTest, EmbeddedTemplatesMatchTheFilesOnDisk) {
  absl::StatusOr<std::unique_ptr<Catalogue>> from_disk = Catalogue::Load({MONTAGE_TEMPLATE_DIR});
  ASSERT_TRUE(from_disk.ok()) << from_disk.status();
  const std::vector<v1::Template> disk = (*from_disk)->List();
  const std::vector<v1::Template> embedded = Builtins().List();
  ASSERT_EQ(disk.size(), embedded.size());
  for (size_t i = 0; i < disk.size(); ++i) {
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(disk[i], embedded[i]))
        << disk[i].name();
  }
}

}  // namespace
}  // namespace montage::generation
