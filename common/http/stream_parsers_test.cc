#include "common/http/stream_parsers.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::http {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

struct Event {
  std::string event;
  std::string data;
  std::string id;
  friend bool operator==(const Event& a, const Event& b) {
    return a.event == b.event && a.data == b.data && a.id == b.id;
  }
  friend std::ostream& operator<<(std::ostream& os, const Event& e) {
    return os << "{" << e.event << ", \"" << e.data << "\", " << e.id << "}";
  }
};

// Feeds `chunks` in order, then Finish; collects the events.
std::vector<Event> ParseSse(const std::vector<std::string>& chunks, absl::Status* status = nullptr,
                            size_t max_line = size_t{1} << 20) {
  std::vector<Event> events;
  SseParser parser(
      [&](const SseEvent& e) {
        events.push_back({e.event, e.data, e.id});
        return absl::OkStatus();
      },
      max_line);
  absl::Status result;
  for (const std::string& chunk : chunks) {
    result = parser.Feed(chunk);
    if (!result.ok()) break;
  }
  if (result.ok()) result = parser.Finish();
  if (status != nullptr) *status = result;
  return events;
}

std::vector<Event> ParseSse(const std::string& text) {
  return ParseSse(std::vector<std::string>{text});
}

TEST(SseParserTest, DispatchesOnBlankLine) {
  EXPECT_THAT(ParseSse("data: hello\n\n"), ElementsAre(Event{"message", "hello", ""}));
}

TEST(SseParserTest, JoinsMultiLineData) {
  EXPECT_THAT(ParseSse("data: a\ndata: b\ndata:\ndata: c\n\n"),
              ElementsAre(Event{"message", "a\nb\n\nc", ""}));
}

TEST(SseParserTest, NamedEventsAndDefaultName) {
  EXPECT_THAT(ParseSse("event: delta\ndata: x\n\ndata: y\n\n"),
              ElementsAre(Event{"delta", "x", ""}, Event{"message", "y", ""}));
}

TEST(SseParserTest, IdPersistsUntilChanged) {
  EXPECT_THAT(ParseSse("id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"),
              ElementsAre(Event{"message", "a", "7"}, Event{"message", "b", "7"},
                          Event{"message", "c", ""}));
}

TEST(SseParserTest, IdWithNulIsIgnored) {
  EXPECT_THAT(ParseSse(std::string("id: 1\ndata: a\n\nid: x\0y\ndata: b\n\n", 32)),
              ElementsAre(Event{"message", "a", "1"}, Event{"message", "b", "1"}));
}

TEST(SseParserTest, CommentsAndUnknownFieldsAreIgnored) {
  EXPECT_THAT(ParseSse(": keep-alive\n\ndata: x\n: note\nretry: 100\nfoo: bar\n\n:\n\n"),
              ElementsAre(Event{"message", "x", ""}));
}

TEST(SseParserTest, ValueSpacing) {
  // One space after the colon is dropped, no more; a field without colon has an empty value.
  EXPECT_THAT(
      ParseSse("data:x\n\ndata:  y\n\ndata\n\n"),
      ElementsAre(Event{"message", "x", ""}, Event{"message", " y", ""}, Event{"message", "", ""}));
}

TEST(SseParserTest, EventWithoutDataIsNotDispatchedAndResetsName) {
  EXPECT_THAT(ParseSse("event: a\n\ndata: b\n\n"), ElementsAre(Event{"message", "b", ""}));
  EXPECT_THAT(ParseSse("\n\n\n"), IsEmpty());
}

TEST(SseParserTest, AllLineEndings) {
  const std::vector<Event> expected = {Event{"e", "a\nb", ""}, Event{"message", "c", ""}};
  EXPECT_EQ(ParseSse("event: e\ndata: a\ndata: b\n\ndata: c\n\n"), expected);
  EXPECT_EQ(ParseSse("event: e\r\ndata: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"), expected);
  EXPECT_EQ(ParseSse("event: e\rdata: a\rdata: b\r\rdata: c\r\r"), expected);
  EXPECT_EQ(ParseSse("event: e\r\ndata: a\rdata: b\n\r\ndata: c\n\r"), expected);
}

TEST(SseParserTest, MissingTrailingBlankLineDropsEvent) {
  EXPECT_THAT(ParseSse("data: a\n\ndata: b\n"), ElementsAre(Event{"message", "a", ""}));
  EXPECT_THAT(ParseSse("data: a\n\ndata: b"), ElementsAre(Event{"message", "a", ""}));
}

TEST(SseParserTest, SkipsByteOrderMark) {
  EXPECT_THAT(ParseSse("\xEF\xBB\xBF"
                       "data: a\n\n"),
              ElementsAre(Event{"message", "a", ""}));
  // Only at the very start.
  EXPECT_THAT(ParseSse("data: a\n\n\xEF\xBB\xBF"
                       "data: b\n\n"),
              ElementsAre(Event{"message", "a", ""}));
  // Something that starts like a BOM but is not one is data.
  EXPECT_THAT(ParseSse("\xEF"
                       "data: a\n\n"),
              IsEmpty());
}

// Every way of cutting a stream into two or three chunks gives the events of the whole.
TEST(SseParserTest, ChunkBoundariesAnywhere) {
  const std::string stream =
      "\xEF\xBB\xBF: hi\r\nevent: delta\r\ndata: hel\r\ndata: lo\r\n\r\nid: 9\rdata: x\r\r"
      "data:y\n\ndata: {\"k\": 1}\n\nevent: end\ndata\n\n";
  const std::vector<Event> expected = ParseSse(stream);
  ASSERT_THAT(expected, ElementsAre(Event{"delta", "hel\nlo", ""}, Event{"message", "x", "9"},
                                    Event{"message", "y", "9"}, Event{"message", "{\"k\": 1}", "9"},
                                    Event{"end", "", "9"}));
  for (size_t i = 0; i <= stream.size(); ++i) {
    EXPECT_EQ(ParseSse({stream.substr(0, i), stream.substr(i)}), expected) << "cut at " << i;
    for (size_t j = i; j <= stream.size(); j += 7) {
      EXPECT_EQ(ParseSse({stream.substr(0, i), stream.substr(i, j - i), stream.substr(j)}),
                expected)
          << "cut at " << i << " and " << j;
    }
  }
  std::vector<std::string> bytes;
  for (char c : stream) bytes.emplace_back(1, c);
  EXPECT_EQ(ParseSse(bytes), expected);
}

TEST(SseParserTest, CrLfSplitAcrossChunksIsOneLineEnd) {
  EXPECT_THAT(ParseSse({"data: a\r", "\ndata: b\r", "\n\r", "\n"}),
              ElementsAre(Event{"message", "a\nb", ""}));
}

TEST(SseParserTest, LineLimit) {
  absl::Status status;
  // Exactly at the limit is fine.
  EXPECT_THAT(ParseSse({"data: 0123456789\n\n"}, &status, 16),
              ElementsAre(Event{"message", "0123456789", ""}));
  EXPECT_TRUE(status.ok()) << status;

  EXPECT_THAT(ParseSse({"data: 0123456789a\n\n"}, &status, 16), IsEmpty());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);

  // A line that never ends is refused as soon as it is too long.
  SseParser parser([](const SseEvent&) { return absl::OkStatus(); }, 16);
  EXPECT_TRUE(parser.Feed("data: 0123").ok());
  EXPECT_EQ(parser.Feed("456789abc").code(), absl::StatusCode::kResourceExhausted);
  // The error sticks.
  EXPECT_EQ(parser.Feed("\n\n").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(parser.Finish().code(), absl::StatusCode::kResourceExhausted);
}

TEST(SseParserTest, EventDataLimit) {
  absl::Status status;
  std::string stream;
  for (int i = 0; i < 10; ++i) stream += "data: 0123456789\n";
  stream += "\n";
  EXPECT_THAT(ParseSse({stream}, &status, 32), IsEmpty());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
}

TEST(SseParserTest, CallbackErrorStopsParsing) {
  int calls = 0;
  SseParser parser([&](const SseEvent&) {
    ++calls;
    return absl::CancelledError("enough");
  });
  EXPECT_EQ(parser.Feed("data: a\n\ndata: b\n\n").code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(parser.Feed("data: c\n\n").code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(parser.Finish().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 1);
}

// NDJSON

std::vector<std::string> ParseNdjson(const std::vector<std::string>& chunks,
                                     absl::Status* status = nullptr,
                                     size_t max_line = size_t{1} << 20) {
  std::vector<std::string> lines;
  NdjsonParser parser(
      [&](absl::string_view line) {
        lines.emplace_back(line);
        return absl::OkStatus();
      },
      max_line);
  absl::Status result;
  for (const std::string& chunk : chunks) {
    result = parser.Feed(chunk);
    if (!result.ok()) break;
  }
  if (result.ok()) result = parser.Finish();
  if (status != nullptr) *status = result;
  return lines;
}

TEST(NdjsonParserTest, Lines) {
  EXPECT_THAT(ParseNdjson({"{\"a\":1}\n{\"b\":2}\n"}), ElementsAre("{\"a\":1}", "{\"b\":2}"));
}

TEST(NdjsonParserTest, CrLfBlankLinesAndLastLineWithoutNewline) {
  EXPECT_THAT(ParseNdjson({"{\"a\":1}\r\n\r\n  \n{\"b\":2}\n{\"c\":3}"}),
              ElementsAre("{\"a\":1}", "{\"b\":2}", "{\"c\":3}"));
}

TEST(NdjsonParserTest, ChunkBoundariesAnywhere) {
  const std::string stream = "{\"a\":1}\r\n\n{\"b\":\"x y\"}\n[1,2]\r\n{\"c\":3}";
  const std::vector<std::string> expected = ParseNdjson({stream});
  ASSERT_THAT(expected, ElementsAre("{\"a\":1}", "{\"b\":\"x y\"}", "[1,2]", "{\"c\":3}"));
  for (size_t i = 0; i <= stream.size(); ++i) {
    for (size_t j = i; j <= stream.size(); ++j) {
      EXPECT_EQ(ParseNdjson({stream.substr(0, i), stream.substr(i, j - i), stream.substr(j)}),
                expected)
          << "cut at " << i << " and " << j;
    }
  }
}

TEST(NdjsonParserTest, LineLimit) {
  absl::Status status;
  EXPECT_THAT(ParseNdjson({"0123456789\r\n"}, &status, 10), ElementsAre("0123456789"));
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_THAT(ParseNdjson({"0123456789"}, &status, 10), ElementsAre("0123456789"));
  EXPECT_TRUE(status.ok()) << status;

  EXPECT_THAT(ParseNdjson({"0123456789a\n"}, &status, 10), IsEmpty());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(ParseNdjson({"01234", "56789", "ab"}, &status, 10), IsEmpty());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(ParseNdjson({"01234", "56789a\n"}, &status, 10), IsEmpty());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
}

TEST(NdjsonParserTest, CallbackErrorStopsParsing) {
  int calls = 0;
  NdjsonParser parser([&](absl::string_view) {
    ++calls;
    return absl::InvalidArgumentError("bad json");
  });
  EXPECT_EQ(parser.Feed("{}\n{}\n").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(parser.Feed("{}\n").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(parser.Finish().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace montage::http
