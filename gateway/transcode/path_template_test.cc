#include "gateway/transcode/path_template.h"

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::gateway::transcode {
namespace {

using ::testing::HasSubstr;

// "v1 * **": the segments, literals as stored.
std::string DescribeSegments(const PathTemplate& t) {
  std::vector<std::string> parts;
  for (const PathTemplate::Segment& s : t.segments()) {
    switch (s.kind) {
      case PathTemplate::SegmentKind::kLiteral:
        parts.push_back(s.literal);
        break;
      case PathTemplate::SegmentKind::kSingleWildcard:
        parts.push_back("*");
        break;
      case PathTemplate::SegmentKind::kMultiWildcard:
        parts.push_back("**");
        break;
    }
  }
  return absl::StrJoin(parts, " ");
}

// "shelf.theme[1,2) name[2,4)": each variable's field path and segment range.
std::string DescribeVariables(const PathTemplate& t) {
  std::vector<std::string> parts;
  for (const PathTemplate::Variable& v : t.variables()) {
    parts.push_back(absl::StrCat(absl::StrJoin(v.field_path, "."), "[", v.start_segment, ",",
                                 v.end_segment, ")"));
  }
  return absl::StrJoin(parts, " ");
}

constexpr char kNoMatch[] = "<no match>";

// "a=1, b.c=x" or kNoMatch.
std::string DescribeBindings(const std::optional<std::vector<VariableBinding>>& bindings) {
  if (!bindings) return kNoMatch;
  std::vector<std::string> parts;
  for (const VariableBinding& b : *bindings) {
    parts.push_back(absl::StrCat(absl::StrJoin(b.field_path, "."), "=", b.value));
  }
  return absl::StrJoin(parts, ", ");
}

PathTemplate MustParse(absl::string_view pattern) {
  absl::StatusOr<PathTemplate> t = PathTemplate::Parse(pattern);
  EXPECT_TRUE(t.ok()) << pattern << ": " << t.status();
  return t.ok() ? *std::move(t) : PathTemplate();
}

struct ValidCase {
  const char* pattern;
  const char* to_string;
  const char* segments;
  const char* variables;
  const char* verb;
};

TEST(PathTemplateParseTest, ValidTemplates) {
  const ValidCase kCases[] = {
      {"/", "/", "", "", ""},
      {"/v1", "/v1", "v1", "", ""},
      {"/v1/shelves", "/v1/shelves", "v1 shelves", "", ""},
      {"/v1/*", "/v1/*", "v1 *", "", ""},
      {"/v1/**", "/v1/**", "v1 **", "", ""},
      {"/**", "/**", "**", "", ""},
      {"/v1/*/books/**", "/v1/*/books/**", "v1 * books **", "", ""},
      {"/v1/{name}", "/v1/{name=*}", "v1 *", "name[1,2)", ""},
      {"/v1/{name=*}", "/v1/{name=*}", "v1 *", "name[1,2)", ""},
      {"/v1/{name=**}", "/v1/{name=**}", "v1 **", "name[1,2)", ""},
      {"/v1/{name=shelves/*/books/*}:publish", "/v1/{name=shelves/*/books/*}:publish",
       "v1 shelves * books *", "name[1,5)", "publish"},
      {"/v1/{shelf.theme}/books", "/v1/{shelf.theme=*}/books", "v1 * books", "shelf.theme[1,2)",
       ""},
      {"/v1/{name=operations/**}:cancel", "/v1/{name=operations/**}:cancel", "v1 operations **",
       "name[1,3)", "cancel"},
      {"/{a}/{b.c_d=x/**}", "/{a=*}/{b.c_d=x/**}", "* x **", "a[0,1) b.c_d[1,3)", ""},
      {"/v1/{_x9.Y_}/{x9}", "/v1/{_x9.Y_=*}/{x9=*}", "v1 * *", "_x9.Y_[1,2) x9[2,3)", ""},
      {"/v1/{x=a}", "/v1/{x=a}", "v1 a", "x[1,2)", ""},
      {"/v1/{x=a=b}", "/v1/{x=a=b}", "v1 a=b", "x[1,2)", ""},
      {"/v1/tasks:batchGet", "/v1/tasks:batchGet", "v1 tasks", "", "batchGet"},
      {"/v1/*:run", "/v1/*:run", "v1 *", "", "run"},
      {"/v1/**:run", "/v1/**:run", "v1 **", "", "run"},
      {"/montage.cache.v1.CacheService/Get", "/montage.cache.v1.CacheService/Get",
       "montage.cache.v1.CacheService Get", "", ""},
      {"/v1/!$&'()+,;=-._~", "/v1/!$&'()+,;=-._~", "v1 !$&'()+,;=-._~", "", ""},
      // Escapes are normalised: a literal character is written as itself, anything else as an
      // upper-case escape.
      {"/v1/a%7eb", "/v1/a~b", "v1 a~b", "", ""},
      {"/v1/%61%62", "/v1/ab", "v1 ab", "", ""},
      {"/v1/a%2fb", "/v1/a%2Fb", "v1 a%2Fb", "", ""},
      {"/v1/%2a", "/v1/%2A", "v1 %2A", "", ""},
      {"/v1/%3A%40%25%20", "/v1/%3A%40%25%20", "v1 %3A%40%25%20", "", ""},
      {"/v1/%e2%82%ac", "/v1/%E2%82%AC", "v1 %E2%82%AC", "", ""},
      {"/v1/x:do%2dit", "/v1/x:do-it", "v1 x", "", "do-it"},
  };
  for (const ValidCase& c : kCases) {
    SCOPED_TRACE(c.pattern);
    absl::StatusOr<PathTemplate> t = PathTemplate::Parse(c.pattern);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->ToString(), c.to_string);
    EXPECT_EQ(DescribeSegments(*t), c.segments);
    EXPECT_EQ(DescribeVariables(*t), c.variables);
    EXPECT_EQ(t->verb(), c.verb);

    // The normalised form parses back to itself and to the same structure.
    absl::StatusOr<PathTemplate> again = PathTemplate::Parse(t->ToString());
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->ToString(), c.to_string);
    EXPECT_EQ(DescribeSegments(*again), c.segments);
    EXPECT_EQ(DescribeVariables(*again), c.variables);
    EXPECT_EQ(again->verb(), c.verb);
  }
}

struct InvalidCase {
  const char* pattern;
  const char* message;
  size_t offset;
};

TEST(PathTemplateParseTest, InvalidTemplatesNameWhatAndWhere) {
  const InvalidCase kCases[] = {
      {"", "must start with '/'", 0},
      {"v1/x", "must start with '/'", 0},
      {"//", "empty segment", 1},
      {"/v1/", "empty segment", 4},
      {"/v1//x", "empty segment", 4},
      {"/:verb", "empty segment", 1},
      {"/v1/**/x", "'**' must be the last segment", 4},
      {"/**/**", "'**' must be the last segment", 1},
      {"/v1/{a=**}/x", "'**' must be the last segment", 7},
      {"/v1/{a=x/**/y}", "'**' must be the last segment", 9},
      {"/v1/{a={b}}", "nested variable", 7},
      {"/v1/{a=x/{b}}", "nested variable", 9},
      {"/v1/{}", "empty field path", 5},
      {"/v1/{=*}", "empty field path", 5},
      {"/v1/{", "empty field path", 5},
      {"/v1/{a..b}", "identifiers separated by '.'", 7},
      {"/v1/{a.}", "identifiers separated by '.'", 7},
      {"/v1/{1a}", "identifiers separated by '.'", 5},
      {"/v1/{a-b}", "expected '}' or '=' after the field path", 6},
      {"/v1/{a}/{a}", "variable 'a' bound twice", 8},
      {"/v1/{a.b}/{a.b=x/*}", "variable 'a.b' bound twice", 10},
      {"/v1/{a", "unterminated variable", 4},
      {"/v1/{a=x", "unterminated variable", 4},
      {"/v1/{a=x/", "empty segment", 9},
      {"/v1/{a=}", "empty segment", 7},
      {"/v1/{a=x:y}", "a verb cannot be inside a variable", 8},
      {"/v1/{a}x", "a variable must be a whole segment", 7},
      {"/v1/x{a}", "a variable must be a whole segment", 5},
      {"/v1/{a}{b}", "a variable must be a whole segment", 7},
      {"/v1/*x", "'*' and '**' must be whole segments", 4},
      {"/v1/x*", "'*' and '**' must be whole segments", 5},
      {"/v1/***", "'*' and '**' must be whole segments", 4},
      {"/v1/a b", "character ' ' must be %-escaped in a literal", 5},
      {"/v1/a@b", "character '@' must be %-escaped in a literal", 5},
      {"/v1/a?b", "character '?' must be %-escaped in a literal", 5},
      {"/v1/a\xC3\xA9", "character '\\xc3' must be %-escaped in a literal", 5},
      {"/v1/a%2", "'%' must be followed by two hex digits", 5},
      {"/v1/a%zz", "'%' must be followed by two hex digits", 5},
      {"/v1/x:", "empty verb after ':'", 5},
      {"/v1/x:a/b", "the verb must end the template", 7},
      {"/v1/x:a:b", "the verb must end the template", 7},
      {"/v1/x:a%g0", "'%' must be followed by two hex digits", 7},
      {"/v1/x}", "'}' without '{'", 5},
  };
  for (const InvalidCase& c : kCases) {
    SCOPED_TRACE(c.pattern);
    absl::StatusOr<PathTemplate> t = PathTemplate::Parse(c.pattern);
    ASSERT_FALSE(t.ok()) << t->ToString();
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(t.status().message(), HasSubstr(c.message));
    EXPECT_THAT(t.status().message(), HasSubstr(absl::StrCat("(at offset ", c.offset, ")")));
  }
}

struct MatchCase {
  const char* pattern;
  const char* path;
  const char* bindings;  // DescribeBindings(), kNoMatch when the path must not match
};

void RunMatchCases(const std::vector<MatchCase>& cases) {
  for (const MatchCase& c : cases) {
    SCOPED_TRACE(absl::StrCat(c.pattern, " ← ", c.path));
    const PathTemplate t = MustParse(c.pattern);
    EXPECT_EQ(DescribeBindings(t.Match(c.path)), c.bindings);
  }
}

TEST(PathTemplateMatchTest, LiteralsAndTrailingSlash) {
  RunMatchCases({
      {"/v1/shelves", "/v1/shelves", ""},
      {"/v1/shelves", "/v1/shelves/", ""},  // one trailing slash is ignored
      {"/v1/shelves", "/v1/shelves//", kNoMatch},
      {"/v1/shelves", "/v1/Shelves", kNoMatch},
      {"/v1/shelves", "/v1", kNoMatch},
      {"/v1/shelves", "/v1/shelves/x", kNoMatch},
      {"/v1/shelves", "v1/shelves", kNoMatch},
      {"/v1/shelves", "", kNoMatch},
      {"/v1/shelves", "/v1//shelves", kNoMatch},
      {"/v1/shelves", "/v1/shelv%65s", ""},  // literals compare decoded
      {"/v1/a%7eb", "/v1/a~b", ""},
      {"/v1/a~b", "/v1/a%7Eb", ""},
      {"/v1/a%2Fb", "/v1/a%2fb", ""},
      {"/v1/a%2Fb", "/v1/a/b", kNoMatch},  // an escaped slash is not a separator
      {"/v1/a%40b", "/v1/a@b", ""},
      {"/v1/shelves", "/v1/shelves%zz", kNoMatch},
      {"/", "/", ""},
      {"/", "//", kNoMatch},
      {"/", "/x", kNoMatch},
      {"/", "", kNoMatch},
  });
}

TEST(PathTemplateMatchTest, SingleSegmentVariablesDecodeEverything) {
  RunMatchCases({
      {"/v1/{name}", "/v1/abc", "name=abc"},
      {"/v1/{name}", "/v1/abc/", "name=abc"},
      {"/v1/{name}", "/v1/", kNoMatch},
      {"/v1/{name}", "/v1//", kNoMatch},  // '*' never matches an empty segment
      {"/v1/{name}", "/v1/a/b", kNoMatch},
      {"/v1/{name}", "/v1/a%2Fb", "name=a/b"},
      {"/v1/{name}", "/v1/a%2fb", "name=a/b"},
      {"/v1/{name}", "/v1/a%20b%3F%25", "name=a b?%"},
      {"/v1/{name}", "/v1/a+b", "name=a+b"},  // '+' is only a space in query strings
      {"/v1/{name}", "/v1/%E2%82%AC", "name=\xE2\x82\xAC"},
      {"/v1/{name}", "/v1/%e2%82%ac", "name=\xE2\x82\xAC"},
      {"/v1/{name}", "/v1/a%zzb", kNoMatch},
      {"/v1/{name}", "/v1/a%2", kNoMatch},
      {"/v1/{name}", "/v1/a%", kNoMatch},
      {"/v1/{name}", "/v1/a:cancel", "name=a:cancel"},  // no verb in the template
      {"/v1/{x=a}", "/v1/%61", "x=a"},
      {"/v1/{shelf.theme}/books/{book.id}", "/v1/fiction/books/42",
       "shelf.theme=fiction, book.id=42"},
      {"/v1/{shelf.theme}/books/{book.id}", "/v1/fiction/books", kNoMatch},
      {"/v1/{shelf.theme}/books/{book.id}", "/v1/fiction/films/42", kNoMatch},
      {"/v1/*/{b}", "/v1/x/y", "b=y"},
  });
}

TEST(PathTemplateMatchTest, MultiSegmentVariablesKeepEscapedSlashes) {
  RunMatchCases({
      {"/v1/{name=shelves/*}", "/v1/shelves/1", "name=shelves/1"},
      {"/v1/{name=shelves/*}", "/v1/shelves/a%2Fb", "name=shelves/a%2Fb"},
      {"/v1/{name=shelves/*}", "/v1/shelves/a%2fb%20c", "name=shelves/a%2fb c"},
      {"/v1/{name=shelves/*}", "/v1/shelv%65s/%41", "name=shelves/A"},
      {"/v1/{name=shelves/*}", "/v1/books/1", kNoMatch},
      {"/v1/{name=shelves/*}", "/v1/shelves", kNoMatch},
      {"/v1/{x=a/b}", "/v1/a/b", "x=a/b"},
      {"/v1/{name=**}", "/v1/a/b/c", "name=a/b/c"},
      {"/v1/{name=**}", "/v1/a/b/c/", "name=a/b/c"},
      {"/v1/{name=**}", "/v1", "name="},
      {"/v1/{name=**}", "/v1/", "name="},
      {"/v1/{name=**}", "/v1/a//b", "name=a//b"},  // '**' takes the rest, empty segments too
      {"/v1/{name=**}", "/v1/a%2Fb/%41%2f", "name=a%2Fb/A%2f"},
      {"/v1/{name=**}", "/v1/a:b", "name=a:b"},
      {"/v1/{name=**}", "/v2/a", kNoMatch},
      {"/v1/{name=**}", "/v1/a/%zz", kNoMatch},
      {"/v1/**", "/v1/x/y", ""},
      {"/v1/*", "/v1/x/y", kNoMatch},
      {"/**", "/", ""},
      {"/{all=**}", "/a/b", "all=a/b"},
      {"/v1/{a}/{b=x/**}", "/v1/1/x/2/3", "a=1, b=x/2/3"},
      {"/v1/{a}/{b=x/**}", "/v1/1/x", "a=1, b=x"},
      {"/v1/{a}/{b=x/**}", "/v1/1/y/2", kNoMatch},
  });
}

TEST(PathTemplateMatchTest, Verbs) {
  RunMatchCases({
      {"/v1/{name=operations/**}:cancel", "/v1/operations/a/b:cancel", "name=operations/a/b"},
      {"/v1/{name=operations/**}:cancel", "/v1/operations:cancel", "name=operations"},
      {"/v1/{name=operations/**}:cancel", "/v1/operations/a/b", kNoMatch},
      {"/v1/{name=operations/**}:cancel", "/v1/operations/a:list", kNoMatch},
      {"/v1/{name=operations/**}:cancel", "/v1/operations/a:cancel/", "name=operations/a"},
      // The last ':' of the last segment starts the verb; earlier ones belong to the value.
      {"/v1/{name=operations/**}:cancel", "/v1/operations/a:b:cancel", "name=operations/a:b"},
      {"/v1/{name=operations/**}:cancel", "/v1/op:x/a:cancel", kNoMatch},
      {"/v1/{name=**}:cancel", "/v1/op:x/a:cancel", "name=op:x/a"},
      // An escaped ':' is data, never the verb separator.
      {"/v1/{name=operations/**}:cancel", "/v1/operations/a%3Acancel", kNoMatch},
      {"/v1/{name=operations/**}:cancel", "/v1/operations:cancel/x", kNoMatch},
      {"/v1/{name}:cancel", "/v1/a:cancel", "name=a"},
      {"/v1/{name}:cancel", "/v1/:cancel", kNoMatch},
      {"/v1/{name}:cancel", "/v1/a:can%63el", "name=a"},
      {"/v1/{name}:cancel", "/v1/x%3Ay:cancel", "name=x:y"},
      {"/v1/{name}:cancel", "/v1/a:CANCEL", kNoMatch},
      {"/v1/{name}:cancel", "/v1/a:", kNoMatch},
      {"/v1/{x}/tasks:run", "/v1/a:b/tasks:run", "x=a:b"},
      {"/v1/tasks:batchGet", "/v1/tasks:batchGet", ""},
      {"/v1/tasks:batchGet", "/v1/tasks", kNoMatch},
      {"/v1/tasks:batchGet", "/v1/tasks:batchget", kNoMatch},
      {"/v1/**:run", "/v1:run", ""},
      {"/v1/**:run", "/v1/a/b:run", ""},
  });
}

// A small fixture: a matcher, and Lookup rendered as "id: bindings" or kNoMatch.
class PathMatcherTest : public ::testing::Test {
 protected:
  void Add(absl::string_view method, absl::string_view pattern, int id) {
    ASSERT_TRUE(matcher_.Add(method, MustParse(pattern), id).ok()) << method << " " << pattern;
  }
  std::string Lookup(absl::string_view method, absl::string_view path) const {
    std::optional<PathMatcher::Match> m = matcher_.Lookup(method, path);
    if (!m) return kNoMatch;
    return absl::StrCat(m->id, ": ", DescribeBindings(m->bindings));
  }

  PathMatcher matcher_;
};

TEST_F(PathMatcherTest, MostSpecificWinsWhateverTheOrderOfAdding) {
  const std::vector<std::pair<const char*, int>> kTemplates = {
      {"/v1/{rest=**}", 1},
      {"/v1/{name}", 2},
      {"/v1/shelves", 3},
      {"/v1/shelves/{shelf}", 4},
      {"/v1/{a}/books", 5},
      {"/v1/shelves/{shelf}/{rest=**}", 6},
      {"/v1/shelves/*/books/{book}", 7},
  };
  for (bool reverse : {false, true}) {
    SCOPED_TRACE(reverse ? "added last to first" : "added first to last");
    matcher_ = PathMatcher();
    std::vector<std::pair<const char*, int>> order = kTemplates;
    if (reverse) std::reverse(order.begin(), order.end());
    for (const auto& [pattern, id] : order) Add("GET", pattern, id);
    EXPECT_EQ(matcher_.size(), kTemplates.size());

    EXPECT_EQ(Lookup("GET", "/v1/shelves"), "3: ");           // literal over * and **
    EXPECT_EQ(Lookup("GET", "/v1/x"), "2: name=x");           // * over **
    EXPECT_EQ(Lookup("GET", "/v1/x/y/z"), "1: rest=x/y/z");   // only ** fits
    EXPECT_EQ(Lookup("GET", "/v1"), "1: rest=");              // ** matching nothing
    EXPECT_EQ(Lookup("GET", "/v1/shelves/7"), "4: shelf=7");  // exact over a trailing **
    EXPECT_EQ(Lookup("GET", "/v1/shelves/7/a"), "6: shelf=7, rest=a");
    EXPECT_EQ(Lookup("GET", "/v1/shelves/books"), "4: shelf=books");  // left to right
    EXPECT_EQ(Lookup("GET", "/v1/x/books"), "5: a=x");
    EXPECT_EQ(Lookup("GET", "/v1/shelves/7/books/9"), "7: book=9");
    EXPECT_EQ(Lookup("GET", "/v2/x"), kNoMatch);
    EXPECT_EQ(Lookup("GET", "/v1/%zz"), kNoMatch);
  }
}

TEST_F(PathMatcherTest, AVerbBeatsNoVerbWhenTheRequestHasIt) {
  Add("POST", "/v1/{name=**}", 1);
  Add("POST", "/v1/{name=**}:cancel", 2);
  Add("POST", "/v1/ops/{id}", 3);
  Add("POST", "/v1/ops/{id}:cancel", 4);
  Add("POST", "/v1/{name=*}:cancel", 5);

  EXPECT_EQ(Lookup("POST", "/v1/ops/x:cancel"), "4: id=x");
  EXPECT_EQ(Lookup("POST", "/v1/x:cancel"), "5: name=x");
  EXPECT_EQ(Lookup("POST", "/v1/a/b/c:cancel"), "2: name=a/b/c");
  EXPECT_EQ(Lookup("POST", "/v1/ops/x"), "3: id=x");
  EXPECT_EQ(Lookup("POST", "/v1/ops/x:other"), "3: id=x:other");
  EXPECT_EQ(Lookup("POST", "/v1/a/b:other"), "1: name=a/b:other");
}

TEST_F(PathMatcherTest, MethodsAreSeparateAndCaseSensitive) {
  Add("GET", "/v1/books/{id}", 1);
  Add("POST", "/v1/books/{id}", 2);
  Add("LIST", "/v1/books", 3);  // a custom method, as given

  EXPECT_EQ(Lookup("GET", "/v1/books/9"), "1: id=9");
  EXPECT_EQ(Lookup("POST", "/v1/books/9"), "2: id=9");
  EXPECT_EQ(Lookup("LIST", "/v1/books"), "3: ");
  EXPECT_EQ(Lookup("get", "/v1/books/9"), kNoMatch);
  EXPECT_EQ(Lookup("DELETE", "/v1/books/9"), kNoMatch);
  EXPECT_EQ(Lookup("GET", "/v1/books"), kNoMatch);

  EXPECT_TRUE(matcher_.MatchesAnyMethod("/v1/books/9"));
  EXPECT_TRUE(matcher_.MatchesAnyMethod("/v1/books"));
  EXPECT_FALSE(matcher_.MatchesAnyMethod("/v1/films/9"));
  EXPECT_FALSE(matcher_.MatchesAnyMethod("/v1/books/%"));
  EXPECT_FALSE(matcher_.MatchesAnyMethod("v1/books"));
}

TEST_F(PathMatcherTest, DuplicatesAreRejected) {
  Add("GET", "/v1/{a}", 1);
  Add("POST", "/v1/{a}", 2);     // another method
  Add("GET", "/v1/{a}:run", 3);  // another verb
  Add("GET", "/v1/~", 4);
  const char* kDuplicates[] = {
      "/v1/{a=*}",  // the same template, normalised
      "/v1/{b}",    // only the variable differs: it could never be chosen
      "/v1/*",
      "/v1/%7E",  // the same literal, escaped
      "/v1/{a}:run",
  };
  for (const char* pattern : kDuplicates) {
    SCOPED_TRACE(pattern);
    absl::Status s = matcher_.Add("GET", MustParse(pattern), 9);
    EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  }
  absl::Status s = matcher_.Add("GET", MustParse("/v1/{b}"), 9);
  EXPECT_THAT(s.message(), HasSubstr("GET /v1/{b=*}"));
  EXPECT_THAT(s.message(), HasSubstr("GET /v1/{a=*} (id 1)"));
  EXPECT_EQ(matcher_.size(), 4u);
  EXPECT_EQ(Lookup("GET", "/v1/x"), "1: a=x");
}

TEST_F(PathMatcherTest, HundredsOfTemplates) {
  for (int i = 0; i < 300; ++i) {
    Add("GET", absl::StrCat("/v1/res", i, "/{id}"), i);
    Add("DELETE", absl::StrCat("/v1/res", i, "/{id}"), 1000 + i);
    Add("POST", absl::StrCat("/v1/res", i, "/{id}:run"), 2000 + i);
  }
  Add("GET", "/v1/{kind}/{id}", 5000);
  EXPECT_EQ(matcher_.size(), 901u);
  EXPECT_EQ(Lookup("GET", "/v1/res123/x"), "123: id=x");
  EXPECT_EQ(Lookup("DELETE", "/v1/res299/y"), "1299: id=y");
  EXPECT_EQ(Lookup("POST", "/v1/res0/z:run"), "2000: id=z");
  EXPECT_EQ(Lookup("GET", "/v1/res300/x"), "5000: kind=res300, id=x");
  EXPECT_EQ(Lookup("POST", "/v1/res0/z"), kNoMatch);
}

TEST(PathMatcherEmptyTest, MatchesNothing) {
  PathMatcher matcher;
  EXPECT_EQ(matcher.size(), 0u);
  EXPECT_FALSE(matcher.Lookup("GET", "/").has_value());
  EXPECT_FALSE(matcher.MatchesAnyMethod("/"));
}

using Params = std::vector<std::pair<std::string, std::string>>;

TEST(ParseQueryStringTest, DecodesInOrder) {
  const std::pair<const char*, Params> kCases[] = {
      {"", {}},
      {"a=1", {{"a", "1"}}},
      {"a=1&b=2&a=3", {{"a", "1"}, {"b", "2"}, {"a", "3"}}},  // repeated keys stay, in order
      {"a", {{"a", ""}}},
      {"a=", {{"a", ""}}},
      {"=x", {{"", "x"}}},
      {"=", {{"", ""}}},
      {"a=1&&b=2", {{"a", "1"}, {"b", "2"}}},  // empty parts are skipped
      {"&a=1&", {{"a", "1"}}},
      {"&&&", {}},
      {"a=b=c", {{"a", "b=c"}}},
      {"q=x+y", {{"q", "x y"}}},
      {"a+b=1", {{"a b", "1"}}},
      {"q=x%2By", {{"q", "x+y"}}},
      {"q=a%26b&r=%3D", {{"q", "a&b"}, {"r", "="}}},
      {"q=%41%42%63", {{"q", "ABc"}}},
      {"q=%E2%82%AC", {{"q", "\xE2\x82\xAC"}}},
      {"q=%e2%82%ac", {{"q", "\xE2\x82\xAC"}}},
      {"%F0%9F%98%80=1", {{"\xF0\x9F\x98\x80", "1"}}},
      {"q=%00", {{"q", std::string("\0", 1)}}},
      {"q=a/b?c", {{"q", "a/b?c"}}},
      {"shelf.theme=x&page_size=10", {{"shelf.theme", "x"}, {"page_size", "10"}}},
  };
  for (const auto& [query, expected] : kCases) {
    SCOPED_TRACE(query);
    absl::StatusOr<Params> params = ParseQueryString(query);
    ASSERT_TRUE(params.ok()) << params.status();
    EXPECT_EQ(*params, expected);
  }
}

TEST(ParseQueryStringTest, RejectsBadEscapesAndBadUtf8) {
  const std::pair<const char*, const char*> kCases[] = {
      {"q=%", "'%' must be followed by two hex digits (at offset 2)"},
      {"q=%4", "'%' must be followed by two hex digits (at offset 2)"},
      {"q=%zz", "'%' must be followed by two hex digits (at offset 2)"},
      {"q=ab%4g", "'%' must be followed by two hex digits (at offset 4)"},
      {"%=1", "'%' must be followed by two hex digits (at offset 0)"},
      {"a=1&b=%G0", "'%' must be followed by two hex digits (at offset 6)"},
      {"a=1&&x%2", "'%' must be followed by two hex digits (at offset 6)"},
      {"q=%FF", "the value of 'q' at offset 2 is not valid UTF-8"},
      {"q=%C3", "the value of 'q' at offset 2 is not valid UTF-8"},           // cut sequence
      {"q=%ED%A0%80", "the value of 'q' at offset 2 is not valid UTF-8"},     // a surrogate
      {"q=%F4%90%80%80", "the value of 'q' at offset 2 is not valid UTF-8"},  // > U+10FFFF
      {"a=1&%C0%AF=1", "the name at offset 4 is not valid UTF-8"},            // overlong '/'
      {"%E0%80%80", "the name at offset 0 is not valid UTF-8"},               // overlong NUL
  };
  for (const auto& [query, message] : kCases) {
    SCOPED_TRACE(query);
    absl::StatusOr<Params> params = ParseQueryString(query);
    ASSERT_FALSE(params.ok());
    EXPECT_EQ(params.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(params.status().message(), HasSubstr(message));
  }
}

}  // namespace
}  // namespace montage::gateway::transcode
