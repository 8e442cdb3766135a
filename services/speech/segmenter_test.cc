#include "services/speech/segmenter.h"

#include <cstddef>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "google/rpc/error_details.pb.h"
#include "gtest/gtest.h"

namespace montage::speech {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;

constexpr absl::string_view kBadRequestUrl = "type.googleapis.com/google.rpc.BadRequest";
constexpr absl::string_view kSsmlNs = "http://www.w3.org/2001/10/synthesis";

SegmenterOptions Options(size_t max_chars, size_t min_chars = 0) {
  SegmenterOptions options;
  options.max_chars = max_chars;
  options.min_chars = min_chars;
  return options;
}

std::vector<std::string> Texts(const std::vector<SegmentText>& segments) {
  std::vector<std::string> texts;
  for (const SegmentText& segment : segments) texts.push_back(segment.text);
  return texts;
}

std::vector<bool> ParagraphEnds(const std::vector<SegmentText>& segments) {
  std::vector<bool> ends;
  for (const SegmentText& segment : segments) ends.push_back(segment.paragraph_end);
  return ends;
}

// Written independently of the implementation: strict RFC 3629.
bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xE  ? 3
                 : (c >> 3) == 0x1E ? 4
                                    : 0;
    if (len == 0 || i + len > s.size()) return false;
    char32_t cp = len == 1 ? c : c & (0xFF >> (len + 1));
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    const char32_t min_for_len[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_for_len[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

size_t CodePoints(absl::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// The text an SSML segment speaks: tags removed, the writer's escapes undone.
std::string SsmlTextContent(absl::string_view doc) {
  std::string out;
  bool in_tag = false;
  for (size_t i = 0; i < doc.size(); ++i) {
    const char c = doc[i];
    if (in_tag) {
      in_tag = c != '>';
      continue;
    }
    if (c == '<') {
      in_tag = true;
      continue;
    }
    if (c == '&') {
      for (const auto& [escape, raw] :
           {std::pair<absl::string_view, char>{"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}}) {
        if (doc.substr(i, escape.size()) == escape) {
          out += raw;
          i += escape.size() - 1;
          break;
        }
      }
      continue;
    }
    out += c;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Plain text

struct SplitCase {
  std::string name;
  std::string input;
  std::vector<std::string> expected;
};

void PrintTo(const SplitCase& c, std::ostream* os) { *os << c.name; }

class SentenceSplitTest : public ::testing::TestWithParam<SplitCase> {};

TEST_P(SentenceSplitTest, SplitsIntoSentences) {
  const SplitCase& c = GetParam();
  absl::StatusOr<std::vector<SegmentText>> segments = SplitPlainText(c.input, SegmenterOptions());
  ASSERT_TRUE(segments.ok()) << segments.status();
  EXPECT_THAT(Texts(*segments), ElementsAreArray(c.expected));
}

INSTANTIATE_TEST_SUITE_P(
    Sentences, SentenceSplitTest,
    ::testing::ValuesIn(std::vector<SplitCase>{
        {"Basic",
         "Hello world. How are you? I am fine!",
         {"Hello world.", "How are you?", "I am fine!"}},
        {"Titles",
         "Mr. Smith met Dr. Jones and Mrs. Brown at St. Mary's. They talked.",
         {"Mr. Smith met Dr. Jones and Mrs. Brown at St. Mary's.", "They talked."}},
        {"LatinAbbreviations",
         "Use a tool, e.g. a hammer. Or i.e. not. Pears etc. are fruit.",
         {"Use a tool, e.g. a hammer.", "Or i.e. not.", "Pears etc. are fruit."}},
        {"Versus",
         "It was Kramer vs. Kramer. Good film.",
         {"It was Kramer vs. Kramer.", "Good film."}},
        {"NumberAbbreviation",
         "No. 5 is here. No. I refuse.",
         {"No. 5 is here.", "No.", "I refuse."}},
        {"AbbreviationsAreCaseSensitive", "I met mr. Smith.", {"I met mr.", "Smith."}},
        {"Decimal", "Pi is 3.14 or so. Next.", {"Pi is 3.14 or so.", "Next."}},
        {"NumberEndsSentence", "It costs 3. Then more.", {"It costs 3.", "Then more."}},
        {"Initials", "J. R. R. Tolkien wrote it. Yes.", {"J. R. R. Tolkien wrote it.", "Yes."}},
        {"QuoteAfterPeriod",
         "He said \"stop.\" Then he left.",
         {"He said \"stop.\"", "Then he left."}},
        {"CurlyQuoteAfterPeriod",
         "She said \u201Cno.\u201D Then she left.",
         {"She said \u201Cno.\u201D", "Then she left."}},
        {"QuotationGoesOn",
         "\"Stop!\" he said. Then silence.",
         {"\"Stop!\" he said.", "Then silence."}},
        {"BracketAfterPeriod", "(See above.) Next one.", {"(See above.)", "Next one."}},
        {"Ellipsis",
         "Wait\u2026 what? Well... Fine. So\u2026",
         {"Wait\u2026 what?", "Well...", "Fine.", "So\u2026"}},
        {"MixedMarks", "Really?! Yes!!! OK.", {"Really?!", "Yes!!!", "OK."}},
        {"DottedAbbreviation",
         "The U.S.A. is big. I left the U.S.A. Then I came back.",
         {"The U.S.A. is big.", "I left the U.S.A.", "Then I came back."}},
        {"PeriodInsideWord",
         "See example.com for more. Bye.",
         {"See example.com for more.", "Bye."}},
        {"Whitespace", "  One.   Two.\tThree.\nFour.  \r\n", {"One.", "Two.", "Three.", "Four."}},
        {"NoTerminator", "just some words", {"just some words"}},
        {"Cjk",
         "\u4ECA\u65E5\u306F\u6674\u308C\u3002\u660E\u65E5\u306F\u96E8\uFF01\u672C\u5F53\uFF1F"
         "\u306F\u3044\u3002",
         {"\u4ECA\u65E5\u306F\u6674\u308C\u3002", "\u660E\u65E5\u306F\u96E8\uFF01",
          "\u672C\u5F53\uFF1F", "\u306F\u3044\u3002"}},
        {"CjkClosingBracket",
         "\u300C\u306F\u3044\u3002\u300D\u305D\u3046\u3002",
         {"\u300C\u306F\u3044\u3002\u300D", "\u305D\u3046\u3002"}},
        {"CjkThenLatin",
         "\u3053\u3093\u306B\u3061\u306F\u3002 Hello there.",
         {"\u3053\u3093\u306B\u3061\u306F\u3002", "Hello there."}},
    }),
    [](const ::testing::TestParamInfo<SplitCase>& info) { return info.param.name; });

TEST(SplitPlainTextTest, BlankLinesEndParagraphs) {
  absl::StatusOr<std::vector<SegmentText>> segments = SplitPlainText(
      "First para. Still first.\nSame para.\n\nSecond para.\n \t\r\n\n\nThird.\r\n\r\nFourth.\n",
      SegmenterOptions());
  ASSERT_TRUE(segments.ok()) << segments.status();
  EXPECT_THAT(Texts(*segments), ElementsAre("First para.", "Still first.", "Same para.",
                                            "Second para.", "Third.", "Fourth."));
  // The last segment never ends a paragraph: nothing follows it.
  EXPECT_THAT(ParagraphEnds(*segments), ElementsAre(false, false, true, true, true, false));
}

TEST(SplitPlainTextTest, EmptyAndWhitespaceOnlyGiveNoSegments) {
  for (absl::string_view text : {"", " ", "\n\n\n", " \t\r\n \n"}) {
    absl::StatusOr<std::vector<SegmentText>> segments = SplitPlainText(text, SegmenterOptions());
    ASSERT_TRUE(segments.ok()) << segments.status();
    EXPECT_THAT(*segments, IsEmpty());
  }
}

struct InvalidUtf8Case {
  std::string input;
  size_t byte;
};

TEST(SplitPlainTextTest, InvalidUtf8IsInvalidArgument) {
  const std::vector<InvalidUtf8Case> cases = {
      {"abc\xFF", 3},             // never valid
      {"\xC0\xAF", 0},            // overlong '/'
      {"ok \xED\xA0\x80", 3},     // surrogate
      {"ab\xE2\x82", 2},          // truncated '€'
      {"\xF4\x90\x80\x80", 0},    // above U+10FFFF
      {"caf\xC3\xA9 \x80 x", 6},  // stray continuation byte after a valid 'é'
  };
  for (const InvalidUtf8Case& c : cases) {
    absl::StatusOr<std::vector<SegmentText>> segments = SplitPlainText(c.input, SegmenterOptions());
    ASSERT_FALSE(segments.ok());
    EXPECT_EQ(segments.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(segments.status().message(), absl::StrCat("text: not valid UTF-8 at byte ", c.byte));
    google::rpc::BadRequest bad_request;
    auto payload = segments.status().GetPayload(kBadRequestUrl);
    ASSERT_TRUE(payload.has_value());
    ASSERT_TRUE(bad_request.ParseFromString(std::string(*payload)));
    ASSERT_EQ(bad_request.field_violations_size(), 1);
    EXPECT_EQ(bad_request.field_violations(0).field(), "text");
  }
}

struct LengthCase {
  std::string name;
  std::string input;
  SegmenterOptions options;
  std::vector<std::string> expected;
};

void PrintTo(const LengthCase& c, std::ostream* os) { *os << c.name; }

class LengthTest : public ::testing::TestWithParam<LengthCase> {};

TEST_P(LengthTest, Splits) {
  const LengthCase& c = GetParam();
  absl::StatusOr<std::vector<SegmentText>> segments = SplitPlainText(c.input, c.options);
  ASSERT_TRUE(segments.ok()) << segments.status();
  EXPECT_THAT(Texts(*segments), ElementsAreArray(c.expected));
  for (const SegmentText& segment : *segments) {
    EXPECT_TRUE(IsValidUtf8(segment.text)) << segment.text;
    EXPECT_FALSE(segment.text.empty());
    if (c.options.max_chars > 0) {
      EXPECT_LE(CodePoints(segment.text), c.options.max_chars);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    MaxAndMinChars, LengthTest,
    ::testing::ValuesIn(std::vector<LengthCase>{
        {"CutAtLastWordBreak",
         "The quick brown fox jumps over the lazy dog.",
         Options(20),
         {"The quick brown fox", "jumps over the lazy", "dog."}},
        {"CutAtSpaceRightAfterLimit", "aaaa bbbb", Options(4), {"aaaa", "bbbb"}},
        {"LimitCountsCodePointsNotBytes",
         "\u00E9\u00E9\u00E9\u00E9\u00E9 \u00E9\u00E9\u00E9\u00E9",
         Options(5),
         {"\u00E9\u00E9\u00E9\u00E9\u00E9", "\u00E9\u00E9\u00E9\u00E9"}},
        {"HugeWordCutAtCodePoint",
         std::string(25, 'x'),
         Options(10),
         {std::string(10, 'x'), std::string(10, 'x'), std::string(5, 'x')}},
        {"HugeWordOfTwoByteCharacters",
         "\u00E9\u00E9\u00E9\u00E9\u00E9\u00E9\u00E9",
         Options(3),
         {"\u00E9\u00E9\u00E9", "\u00E9\u00E9\u00E9", "\u00E9"}},
        {"HugeWordOfFourByteCharacters",
         "\U0001F600\U0001F601\U0001F602\U0001F603\U0001F604",
         Options(2),
         {"\U0001F600\U0001F601", "\U0001F602\U0001F603", "\U0001F604"}},
        {"CutThenWordBreakAgain",
         "ab " + std::string(12, 'y') + " cd",
         Options(5),
         {"ab", "yyyyy", "yyyyy", "yy cd"}},
        {"ZeroMeansNoLimit", std::string(1000, 'z'), Options(0), {std::string(1000, 'z')}},
        {"JoinWhileShort",
         "Yes. No. Maybe. This is a much longer sentence here. OK.",
         Options(400, 20),
         {"Yes. No. Maybe. This is a much longer sentence here.", "OK."}},
        {"JoinNotBeyondMax", "Yes. No. Maybe.", Options(12, 100), {"Yes. No.", "Maybe."}},
        {"JoinNotAcrossParagraphs", "Yes.\n\nNo.", Options(400, 100), {"Yes.", "No."}},
        {"LongSentencesStayAlone",
         "This one is long enough. So is this one here.",
         Options(400, 10),
         {"This one is long enough.", "So is this one here."}},
    }),
    [](const ::testing::TestParamInfo<LengthCase>& info) { return info.param.name; });

// Editing one sentence changes only the segments up to the next long sentence.
TEST(SplitPlainTextTest, JoiningIsLocal) {
  std::vector<std::string> sentences;
  for (int i = 0; i < 30; ++i) {
    sentences.push_back(i % 4 == 3 ? absl::StrCat("Sentence ", i, " is long enough to stand alone.")
                                   : absl::StrCat("Short ", i, "."));
  }
  const SegmenterOptions options = Options(400, 30);
  absl::StatusOr<std::vector<SegmentText>> before =
      SplitPlainText(absl::StrJoin(sentences, " "), options);
  sentences[13] = "Short 13, now edited and a little longer.";
  absl::StatusOr<std::vector<SegmentText>> after =
      SplitPlainText(absl::StrJoin(sentences, " "), options);
  ASSERT_TRUE(before.ok() && after.ok());
  // Groups of three short sentences and a long one; the edit splits the fourth group in two.
  ASSERT_EQ(before->size(), 8u);
  ASSERT_EQ(after->size(), 9u);
  size_t same_prefix = 0;
  while ((*before)[same_prefix].text == (*after)[same_prefix].text) ++same_prefix;
  size_t same_suffix = 0;
  while ((*before)[before->size() - 1 - same_suffix].text ==
         (*after)[after->size() - 1 - same_suffix].text) {
    ++same_suffix;
  }
  EXPECT_EQ(same_prefix, 3u);
  EXPECT_EQ(same_suffix, 4u);
  EXPECT_EQ((*after)[3].text, "Short 12. Short 13, now edited and a little longer.");
  EXPECT_EQ((*after)[4].text, "Short 14. Sentence 15 is long enough to stand alone.");
}

// A 780-word script in paragraphs: a sane number of segments that reassemble into the input.
TEST(SplitPlainTextTest, LongTextReassembles) {
  const std::vector<std::string> words = {"the",   "speech", "service", "splits", "long",
                                          "texts", "into",   "small",   "pieces", "which",
                                          "are",   "spoken", "quickly", "and",    "cached"};
  std::string text;
  size_t word_count = 0;
  size_t sentence_count = 0;
  std::mt19937 rng(7);
  while (word_count < 780) {
    const size_t length = std::min<size_t>(5 + rng() % 20, 780 - word_count);
    std::string sentence = "Now";
    for (size_t k = 1; k < length; ++k)
      absl::StrAppend(&sentence, " ", words[rng() % words.size()]);
    word_count += length;
    absl::StrAppend(&text, sentence, rng() % 3 == 0 ? "?" : ".");
    ++sentence_count;
    text += sentence_count % 6 == 0 ? "\n\n" : rng() % 4 == 0 ? "\n" : "  ";
  }
  ASSERT_EQ(CountWords(text), 780u);

  absl::StatusOr<std::vector<SegmentText>> one_each = SplitPlainText(text, SegmenterOptions());
  ASSERT_TRUE(one_each.ok()) << one_each.status();
  EXPECT_EQ(one_each->size(), sentence_count);
  EXPECT_EQ(absl::StrJoin(Texts(*one_each), " "), NormalizeWhitespace(text));

  absl::StatusOr<std::vector<SegmentText>> joined = SplitPlainText(text, Options(400, 150));
  ASSERT_TRUE(joined.ok()) << joined.status();
  EXPECT_GE(joined->size(), 780u / 60);
  EXPECT_LT(joined->size(), sentence_count);
  EXPECT_EQ(absl::StrJoin(Texts(*joined), " "), NormalizeWhitespace(text));
  size_t words_in_segments = 0;
  for (const SegmentText& segment : *joined) {
    EXPECT_LE(CodePoints(segment.text), 400u);
    words_in_segments += CountWords(segment.text);
  }
  EXPECT_EQ(words_in_segments, 780u);
}

// Random texts from a small alphabet: splitting never fails and loses or adds nothing.
TEST(SplitPlainTextTest, RandomTextsReassemble) {
  const std::vector<std::string> tokens = {"Hello",
                                           "world",
                                           "Mr.",
                                           "Dr.",
                                           "e.g.",
                                           "No.",
                                           "3.14",
                                           "J.",
                                           "stop.\"",
                                           "Why?",
                                           "Wow!",
                                           "Yes?!",
                                           "\u2026",
                                           "...",
                                           "na\u00EFve",
                                           "\u65E5\u672C\u3002",
                                           "(see",
                                           "it.)",
                                           "end.",
                                           "a",
                                           "\u00C9t\u00E9.",
                                           "x",
                                           "\U0001F600.",
                                           "what",
                                           ",",
                                           ";",
                                           "\u201Cquote.\u201D",
                                           "etc.",
                                           "i.e.",
                                           "mr.",
                                           "ok"};
  const std::vector<std::string> separators = {" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n \n "};
  std::mt19937 rng(20240611);
  for (int iteration = 0; iteration < 400; ++iteration) {
    std::string text = rng() % 2 == 0 ? "" : " \n";
    const size_t count = rng() % 60;
    for (size_t k = 0; k < count; ++k) {
      if (k > 0) text += separators[rng() % separators.size()];
      text += tokens[rng() % tokens.size()];
    }
    if (rng() % 2 == 0) text += "\n\n ";
    const SegmenterOptions options = Options(20 + rng() % 60, rng() % 3 == 0 ? 0 : rng() % 50);
    SCOPED_TRACE(
        absl::StrCat("text: [", text, "] max ", options.max_chars, " min ", options.min_chars));

    absl::StatusOr<std::vector<SegmentText>> segments = SplitPlainText(text, options);
    ASSERT_TRUE(segments.ok()) << segments.status();
    for (const SegmentText& segment : *segments) {
      EXPECT_FALSE(segment.text.empty());
      EXPECT_TRUE(IsValidUtf8(segment.text));
      EXPECT_LE(CodePoints(segment.text), options.max_chars);
      EXPECT_EQ(segment.text, NormalizeWhitespace(segment.text));
    }
    if (!segments->empty()) {
      EXPECT_FALSE(segments->back().paragraph_end);
    }
    EXPECT_EQ(absl::StrJoin(Texts(*segments), " "), NormalizeWhitespace(text));
  }
}

TEST(NormalizeWhitespaceTest, CollapsesAndTrims) {
  EXPECT_EQ(NormalizeWhitespace(""), "");
  EXPECT_EQ(NormalizeWhitespace(" \t\n "), "");
  EXPECT_EQ(NormalizeWhitespace("  a \t b\r\n\nc  "), "a b c");
  EXPECT_EQ(NormalizeWhitespace("caf\u00E9\u00A0ok"), "caf\u00E9\u00A0ok");  // NBSP is not a break
}

TEST(CountWordsTest, CountsRunsOfNonSpace) {
  EXPECT_EQ(CountWords(""), 0u);
  EXPECT_EQ(CountWords("   "), 0u);
  EXPECT_EQ(CountWords("one"), 1u);
  EXPECT_EQ(CountWords("  one two\n\nthree\tfour "), 4u);
  EXPECT_EQ(CountWords("Hello, world! \u65E5\u672C"), 3u);
}

// ---------------------------------------------------------------------------------------------
// SSML

struct SsmlCase {
  std::string name;
  std::string input;
  SegmenterOptions options;
  std::vector<std::string> expected;
  std::vector<bool> paragraph_ends;  // empty: all false
};

SsmlCase Ssml(std::string name, std::string input, SegmenterOptions options,
              std::vector<std::string> expected, std::vector<bool> paragraph_ends = {}) {
  return {std::move(name), std::move(input), options, std::move(expected),
          std::move(paragraph_ends)};
}

void PrintTo(const SsmlCase& c, std::ostream* os) { *os << c.name; }

class SsmlSplitTest : public ::testing::TestWithParam<SsmlCase> {};

TEST_P(SsmlSplitTest, Splits) {
  const SsmlCase& c = GetParam();
  absl::StatusOr<std::vector<SegmentText>> segments = SplitSsml(c.input, c.options);
  ASSERT_TRUE(segments.ok()) << segments.status();
  EXPECT_THAT(Texts(*segments), ElementsAreArray(c.expected));
  std::vector<bool> paragraph_ends = c.paragraph_ends;
  if (paragraph_ends.empty()) paragraph_ends.assign(c.expected.size(), false);
  EXPECT_THAT(ParagraphEnds(*segments), ElementsAreArray(paragraph_ends));
  // Every segment is a well-formed <speak> document (libxml2 parses it again) and a fixed point.
  for (const SegmentText& segment : *segments) {
    absl::StatusOr<std::vector<SegmentText>> again =
        SplitSsml(segment.text, Options(/*max_chars=*/0, /*min_chars=*/1000000));
    ASSERT_TRUE(again.ok()) << again.status() << "\n" << segment.text;
    EXPECT_THAT(Texts(*again), ElementsAre(segment.text));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Ssml, SsmlSplitTest,
    ::testing::ValuesIn(std::vector<SsmlCase>{
        Ssml("ProsodyReopened", "<speak><prosody rate=\"slow\">First. Second.</prosody></speak>",
             SegmenterOptions(),
             {"<speak><prosody rate=\"slow\">First.</prosody></speak>",
              "<speak><prosody rate=\"slow\">Second.</prosody></speak>"}),
        Ssml("NestedElementsAndRootAttributes",
             absl::StrCat("<speak version=\"1.0\" xmlns=\"", kSsmlNs,
                          "\" xml:lang=\"en-US\"><voice name=\"en\"><prosody rate=\"slow\">One. "
                          "<emphasis level=\"strong\">Two. Three.</emphasis> Four.</prosody>"
                          "</voice></speak>"),
             SegmenterOptions(),
             {absl::StrCat("<speak xmlns=\"", kSsmlNs,
                           "\" version=\"1.0\" xml:lang=\"en-US\"><voice name=\"en\"><prosody "
                           "rate=\"slow\">One.</prosody></voice></speak>"),
              absl::StrCat("<speak xmlns=\"", kSsmlNs,
                           "\" version=\"1.0\" xml:lang=\"en-US\"><voice name=\"en\"><prosody "
                           "rate=\"slow\"><emphasis level=\"strong\">Two.</emphasis></prosody>"
                           "</voice></speak>"),
              absl::StrCat("<speak xmlns=\"", kSsmlNs,
                           "\" version=\"1.0\" xml:lang=\"en-US\"><voice name=\"en\"><prosody "
                           "rate=\"slow\"><emphasis level=\"strong\">Three.</emphasis></prosody>"
                           "</voice></speak>"),
              absl::StrCat("<speak xmlns=\"", kSsmlNs,
                           "\" version=\"1.0\" xml:lang=\"en-US\"><voice name=\"en\"><prosody "
                           "rate=\"slow\">Four.</prosody></voice></speak>")}),
        Ssml("PrefixedRoot",
             absl::StrCat("<ssml:speak xmlns:ssml=\"", kSsmlNs,
                          "\">One. <ssml:emphasis>Two.</ssml:emphasis></ssml:speak>"),
             SegmenterOptions(),
             {absl::StrCat("<ssml:speak xmlns:ssml=\"", kSsmlNs, "\">One.</ssml:speak>"),
              absl::StrCat("<ssml:speak xmlns:ssml=\"", kSsmlNs,
                           "\"><ssml:emphasis>Two.</ssml:emphasis></ssml:speak>")}),
        Ssml("BreakStaysWithTheSentenceBefore",
             "<speak>Hello there. <break time=\"500ms\"/>How are you?</speak>", SegmenterOptions(),
             {"<speak>Hello there.<break time=\"500ms\"/></speak>", "<speak>How are you?</speak>"}),
        Ssml("BreakPlacementIgnoresWhitespace",
             "<speak>Hello there.<break time=\"500ms\"/> How are you?</speak>", SegmenterOptions(),
             {"<speak>Hello there.<break time=\"500ms\"/></speak>", "<speak>How are you?</speak>"}),
        Ssml("BreakInsideSentence",
             "<speak>Hello <break time=\"500ms\"/>world. <mark name=\"m\"/></speak>",
             SegmenterOptions(),
             {"<speak>Hello <break time=\"500ms\"/>world.<mark name=\"m\"/></speak>"}),
        Ssml("StartTagGoesWithTheSentenceAfter",
             "<speak><emphasis>One. </emphasis><break/><prosody "
             "pitch=\"high\">Two.</prosody></speak>",
             SegmenterOptions(),
             {"<speak><emphasis>One.</emphasis><break/></speak>",
              "<speak><prosody pitch=\"high\">Two.</prosody></speak>"}),
        Ssml("ParagraphsAndSentences",
             "<speak><p><s>Short one</s><s>Another one</s></p>\n<p>Second paragraph. Two sentences."
             "</p><p>Last.</p></speak>",
             SegmenterOptions(),
             {"<speak><p><s>Short one</s></p></speak>", "<speak><p><s>Another one</s></p></speak>",
              "<speak><p>Second paragraph.</p></speak>", "<speak><p>Two sentences.</p></speak>",
              "<speak><p>Last.</p></speak>"},
             {false, true, false, true, false}),
        Ssml("SentenceElementsAreNeverJoined",
             "<speak><p><s>Short one</s><s>Another one</s></p><p>Second paragraph. Two "
             "sentences.</p></speak>",
             Options(400, 1000),
             {"<speak><p><s>Short one</s></p></speak>", "<speak><p><s>Another one</s></p></speak>",
              "<speak><p>Second paragraph. Two sentences.</p></speak>"},
             {false, true, false}),
        Ssml("TextBeforeParagraph", "<speak>Intro <p>Para.</p> Outro</speak>", SegmenterOptions(),
             {"<speak>Intro</speak>", "<speak><p>Para.</p></speak>", "<speak>Outro</speak>"},
             {false, true, false}),
        Ssml("PauseBetweenParagraphs", "<speak><p>A.</p><break time=\"2s\"/><p>B.</p></speak>",
             SegmenterOptions(),
             {"<speak><p>A.</p><break time=\"2s\"/></speak>", "<speak><p>B.</p></speak>"},
             {true, false}),
        Ssml("EscapesText",
             "<speak>Tom &amp; Jerry &lt;3 it. Next &gt; prev &#233;t&#xE9;.</speak>",
             SegmenterOptions(),
             {"<speak>Tom &amp; Jerry &lt;3 it.</speak>",
              "<speak>Next &gt; prev \u00E9t\u00E9.</speak>"}),
        Ssml("EscapesAttributes",
             "<speak><sub alias='A &amp; B \"x\" &lt;y&gt;'>AB</sub> rocks.</speak>",
             SegmenterOptions(),
             {"<speak><sub alias=\"A &amp; B &quot;x&quot; &lt;y&gt;\">AB</sub> rocks.</speak>"}),
        Ssml("Cdata", "<speak><![CDATA[a < b. Yes & no.]]></speak>", SegmenterOptions(),
             {"<speak>a &lt; b.</speak>", "<speak>Yes &amp; no.</speak>"}),
        Ssml("CommentsAndWhitespaceNormalised",
             "<speak>\n  Hello<!-- note -->\n   <emphasis> big </emphasis>  world.\n  <?pi "
             "x?></speak>",
             SegmenterOptions(), {"<speak>Hello <emphasis>big </emphasis>world.</speak>"}),
        Ssml("ElementWithOnlyACommentIsEmpty",
             "<speak>Hi <emphasis><!-- x --></emphasis>there.</speak>", SegmenterOptions(),
             {"<speak>Hi <emphasis/>there.</speak>"}),
        Ssml("SentenceAcrossElements",
             "<speak>He met <emphasis>Mr.</emphasis> Smith. Then <prosody volume=\"loud\">left."
             "</prosody></speak>",
             SegmenterOptions(),
             {"<speak>He met <emphasis>Mr.</emphasis> Smith.</speak>",
              "<speak>Then <prosody volume=\"loud\">left.</prosody></speak>"}),
        Ssml("SayAsIsNeverCut",
             "<speak><say-as interpret-as=\"date\">Jan. 5. 2020</say-as> was fine. Next.</speak>",
             SegmenterOptions(),
             {"<speak><say-as interpret-as=\"date\">Jan. 5. 2020</say-as> was fine.</speak>",
              "<speak>Next.</speak>"}),
        Ssml("UnbreakableLongerThanMax",
             "<speak><audio src=\"x.wav\">Fallback text here.</audio> After.</speak>", Options(10),
             {"<speak><audio src=\"x.wav\">Fallback text here.</audio></speak>",
              "<speak>After.</speak>"}),
        Ssml(
            "MaxCharsCountsTextNotMarkup",
            "<speak><prosody rate=\"x-slow\">aaaa <emphasis>bbbb</emphasis> cccc</prosody></speak>",
            Options(9),
            {"<speak><prosody rate=\"x-slow\">aaaa <emphasis>bbbb</emphasis></prosody></speak>",
             "<speak><prosody rate=\"x-slow\">cccc</prosody></speak>"}),
        Ssml("HugeWordInSsml", "<speak><emphasis>\u00E9\u00E9\u00E9\u00E9\u00E9</emphasis></speak>",
             Options(2),
             {"<speak><emphasis>\u00E9\u00E9</emphasis></speak>",
              "<speak><emphasis>\u00E9\u00E9</emphasis></speak>",
              "<speak><emphasis>\u00E9</emphasis></speak>"}),
        Ssml("JoinShortSentences",
             "<speak><prosody rate=\"slow\">Yes. No.</prosody> Maybe so. A long sentence "
             "here.</speak>",
             Options(400, 15),
             {"<speak><prosody rate=\"slow\">Yes. No.</prosody> Maybe so.</speak>",
              "<speak>A long sentence here.</speak>"}),
        Ssml("EncodingDeclarationIgnored",
             "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><speak>Caf\u00E9.</speak>",
             SegmenterOptions(), {"<speak>Caf\u00E9.</speak>"}),
        Ssml("OnlyAPause", "<speak><break time=\"1s\"/></speak>", SegmenterOptions(),
             {"<speak><break time=\"1s\"/></speak>"}),
    }),
    [](const ::testing::TestParamInfo<SsmlCase>& info) { return info.param.name; });

TEST(SplitSsmlTest, NothingToSayGivesNoSegments) {
  for (absl::string_view ssml : {"", "  \n", "<speak/>", "<speak> \n </speak>",
                                 "<speak><prosody rate=\"slow\"> </prosody><!-- x --></speak>"}) {
    absl::StatusOr<std::vector<SegmentText>> segments = SplitSsml(ssml, SegmenterOptions());
    ASSERT_TRUE(segments.ok()) << segments.status();
    EXPECT_THAT(*segments, IsEmpty()) << ssml;
  }
}

TEST(SplitSsmlTest, MalformedXmlNamesTheLine) {
  absl::StatusOr<std::vector<SegmentText>> segments =
      SplitSsml("<speak>\nFine.\n<prosody>Oops.</speak>", SegmenterOptions());
  ASSERT_FALSE(segments.ok());
  EXPECT_EQ(segments.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(segments.status().message()),
              StartsWith("text: malformed SSML at line 3: "));
  EXPECT_THAT(std::string(segments.status().message()), HasSubstr("mismatch"));

  for (absl::string_view ssml : {"<speak>unclosed", "plain text", "<speak>&undefined;</speak>",
                                 "<speak a=\"1\" a=\"2\">x</speak>", "<speak>x</speak><speak/>"}) {
    segments = SplitSsml(ssml, SegmenterOptions());
    ASSERT_FALSE(segments.ok()) << ssml;
    EXPECT_EQ(segments.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(segments.status().message()),
                StartsWith("text: malformed SSML at line 1: "));
  }
}

TEST(SplitSsmlTest, DoctypeIsRejected) {
  const std::string billion_laughs =
      "<?xml version=\"1.0\"?>\n<!DOCTYPE speak [\n"
      "<!ENTITY a \"lol\">\n"
      "<!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\">\n"
      "<!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;\">\n"
      "<!ENTITY d \"&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;\">\n"
      "<!ENTITY e \"&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;\">\n"
      "]>\n<speak>&e;</speak>";
  for (const std::string& ssml :
       {billion_laughs, std::string("<!DOCTYPE speak><speak>Hi.</speak>"),
        std::string("<!DOCTYPE speak [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>"
                    "<speak>&x;</speak>"),
        std::string(
            "<!DOCTYPE speak SYSTEM \"http://example.invalid/ssml.dtd\"><speak>Hi.</speak>")}) {
    absl::StatusOr<std::vector<SegmentText>> segments = SplitSsml(ssml, SegmenterOptions());
    ASSERT_FALSE(segments.ok()) << ssml;
    EXPECT_EQ(segments.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(segments.status().message(), "text: SSML must not have a DOCTYPE");
  }
}

TEST(SplitSsmlTest, RootMustBeSpeak) {
  for (absl::string_view ssml :
       {"<foo>Hi.</foo>", "<speak xmlns=\"urn:other\">Hi.</speak>", "<p><speak>Hi.</speak></p>"}) {
    absl::StatusOr<std::vector<SegmentText>> segments = SplitSsml(ssml, SegmenterOptions());
    ASSERT_FALSE(segments.ok()) << ssml;
    EXPECT_EQ(segments.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(segments.status().message(), "text: SSML must have <speak> as its root element");
  }
}

TEST(SplitSsmlTest, InvalidUtf8IsInvalidArgument) {
  absl::StatusOr<std::vector<SegmentText>> segments =
      SplitSsml("<speak>ab\xC3</speak>", SegmenterOptions());
  ASSERT_FALSE(segments.ok());
  EXPECT_EQ(segments.status().message(), "text: not valid UTF-8 at byte 9");
}

// Random documents from a small alphabet of words, punctuation and elements: splitting never
// fails, every segment is a well-formed fixed point within max_chars, and the spoken text
// reassembles into the input's.
TEST(SplitSsmlTest, RandomDocumentsReassemble) {
  const std::vector<std::string> words = {
      "Hello", "world", "Mr.",   "e.g.",       "3.14",   "Why?",    "Wow!", "end.",
      "a",     "&amp;", "&lt;b", "caf\u00E9.", "\u2026", "\"hi.\"", "J.",   "no"};
  std::mt19937 rng(99);
  for (int iteration = 0; iteration < 300; ++iteration) {
    std::string ssml = "<speak xml:lang=\"en\">";
    std::string spoken;  // the same text without markup, spaces around blocks
    std::vector<std::string> open;
    const size_t count = rng() % 50;
    for (size_t k = 0; k < count; ++k) {
      const unsigned choice = rng() % 12;
      if (choice < 7) {
        const std::string& word = words[rng() % words.size()];
        ssml += " " + word;
        spoken += " " + SsmlTextContent(word);
      } else if (choice == 7) {
        ssml += rng() % 2 == 0 ? "<break time=\"200ms\"/>" : " <mark name=\"m\"/> ";
      } else if (choice == 8 && open.size() < 4) {
        const std::string name = rng() % 2 == 0 ? "prosody" : "emphasis";
        ssml += name == "prosody" ? " <prosody rate=\"slow\">" : "<emphasis>";
        open.push_back(name);
      } else if (choice == 9 && !open.empty()) {
        ssml += "</" + open.back() + ">";
        open.pop_back();
      } else if (choice == 10) {
        const std::string element = rng() % 2 == 0 ? "p" : "s";
        const std::string word = words[rng() % words.size()];
        ssml += " <" + element + ">" + word + " " + word + "</" + element + "> ";
        spoken += " " + SsmlTextContent(word) + " " + SsmlTextContent(word) + " ";
      } else {
        ssml += " <sub alias=\"x\">W. W. W.</sub>";
        spoken += " W. W. W.";
      }
    }
    while (!open.empty()) {
      ssml += "</" + open.back() + ">";
      open.pop_back();
    }
    ssml += "</speak>";
    const SegmenterOptions options = Options(15 + rng() % 40, rng() % 2 == 0 ? 0 : rng() % 30);
    SCOPED_TRACE(
        absl::StrCat("ssml: ", ssml, " max ", options.max_chars, " min ", options.min_chars));

    absl::StatusOr<std::vector<SegmentText>> segments = SplitSsml(ssml, options);
    ASSERT_TRUE(segments.ok()) << segments.status();
    std::vector<std::string> contents;
    for (const SegmentText& segment : *segments) {
      EXPECT_THAT(segment.text, StartsWith("<speak xml:lang=\"en\">"));
      const std::string content = SsmlTextContent(segment.text);
      EXPECT_LE(CodePoints(content), options.max_chars) << segment.text;
      if (!content.empty()) contents.push_back(content);
      absl::StatusOr<std::vector<SegmentText>> again = SplitSsml(segment.text, Options(0, 1000000));
      ASSERT_TRUE(again.ok()) << again.status() << "\n" << segment.text;
      EXPECT_THAT(Texts(*again), ElementsAre(segment.text));
    }
    EXPECT_EQ(absl::StrJoin(contents, " "), NormalizeWhitespace(spoken));
  }
}

// libxml2 is initialised once and errors are collected per parser context, so concurrent calls
// neither race nor see each other's errors.
TEST(SplitSsmlTest, ConcurrentCallsAreIndependent) {
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &failures] {
      for (int i = 0; i < 100; ++i) {
        const bool bad = (i + t) % 3 == 0;
        absl::StatusOr<std::vector<SegmentText>> segments = SplitSsml(
            bad ? "<speak>\n<b>x</speak>" : "<speak>One. Two.</speak>", SegmenterOptions());
        const bool as_expected =
            bad ? !segments.ok() && absl::StartsWith(segments.status().message(),
                                                     "text: malformed SSML at line 2")
                : segments.ok() && segments->size() == 2;
        failures[t] += !as_expected;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(failures, ElementsAre(0, 0, 0, 0));
}

}  // namespace
}  // namespace montage::speech
