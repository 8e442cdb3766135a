#include "tests/fake_llm/fake_llm_server.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace montage::testing {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

// A bound for waits that only fail when something is broken; never a timing assertion.
constexpr absl::Duration kPatience = absl::Seconds(10);

struct HttpResult {
  CURLcode code = CURLE_OK;
  long status = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
};

size_t AppendBody(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

size_t AppendHeader(char* data, size_t size, size_t n, void* out) {
  absl::string_view line(data, size * n);
  const size_t colon = line.find(':');
  if (colon != absl::string_view::npos) {
    (*static_cast<std::map<std::string, std::string>*>(
        out))[absl::AsciiStrToLower(line.substr(0, colon))] =
        std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  }
  return size * n;
}

// Blocking libcurl easy calls: fine here, the server runs on its own thread.
class Client {
 public:
  Client() : curl_(curl_easy_init()) {}
  ~Client() { curl_easy_cleanup(curl_); }

  HttpResult Request(const std::string& method, const std::string& url,
                     const std::vector<std::string>& headers = {}, const std::string& body = "") {
    HttpResult result;
    curl_easy_reset(curl_);
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    if (h2c_) {
      curl_easy_setopt(curl_, CURLOPT_HTTP_VERSION, long{CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE});
      // Debian's libcurl 7.88 fails when it reuses an idle h2c connection (curl issue #10634).
      curl_easy_setopt(curl_, CURLOPT_FRESH_CONNECT, 1L);
      curl_easy_setopt(curl_, CURLOPT_FORBID_REUSE, 1L);
    }
    curl_easy_setopt(curl_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl_, CURLOPT_TIMEOUT_MS, 30000L);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, &AppendBody);
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &result.body);
    curl_easy_setopt(curl_, CURLOPT_HEADERFUNCTION, &AppendHeader);
    curl_easy_setopt(curl_, CURLOPT_HEADERDATA, &result.headers);
    if (method == "POST") {
      curl_easy_setopt(curl_, CURLOPT_POST, 1L);
      curl_easy_setopt(curl_, CURLOPT_POSTFIELDS, body.c_str());
      curl_easy_setopt(curl_, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
    } else if (method != "GET") {
      curl_easy_setopt(curl_, CURLOPT_CUSTOMREQUEST, method.c_str());
    }
    curl_slist* list = curl_slist_append(nullptr, "Content-Type: application/json");
    for (const std::string& h : headers) list = curl_slist_append(list, h.c_str());
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, list);
    result.code = curl_easy_perform(curl_);
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &result.status);
    curl_slist_free_all(list);
    return result;
  }

  long new_connections() {
    long n = -1;
    curl_easy_getinfo(curl_, CURLINFO_NUM_CONNECTS, &n);
    return n;
  }
  // The HTTP version of the last answer (CURL_HTTP_VERSION_1_1, CURL_HTTP_VERSION_2_0).
  long http_version() {
    long version = 0;
    curl_easy_getinfo(curl_, CURLINFO_HTTP_VERSION, &version);
    return version;
  }
  // Speak HTTP/2 with prior knowledge (h2c) from the next request on.
  void set_h2c(bool h2c) { h2c_ = h2c; }

 private:
  CURL* curl_;
  bool h2c_ = false;
};

struct Sse {
  std::string event;
  std::string data;
};

// Enough of the event-stream format for the fake's own output (LF line ends, one data line).
std::vector<Sse> ParseSse(const std::string& body) {
  std::vector<Sse> events;
  for (absl::string_view block : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    Sse sse;
    for (absl::string_view line : absl::StrSplit(block, '\n')) {
      if (absl::ConsumePrefix(&line, "event: ")) sse.event = std::string(line);
      if (absl::ConsumePrefix(&line, "data: ")) sse.data = std::string(line);
    }
    events.push_back(sse);
  }
  return events;
}

std::string OpenAiBody(const std::string& user, bool stream, const std::string& extra = "") {
  json body = {
      {"model", "gpt-4o-mini"},
      {"messages",
       {{{"role", "system"}, {"content", "be brief"}}, {{"role", "user"}, {"content", user}}}},
      {"stream", stream},
      {"max_tokens", 500},
      {"temperature", 0.2}};
  if (stream) body["stream_options"] = {{"include_usage", true}};
  if (!extra.empty()) body.update(json::parse(extra));
  return body.dump();
}

std::string GeminiBody(const std::string& user) {
  return json({{"contents", {{{"role", "user"}, {"parts", {{{"text", user}}}}}}}}).dump();
}

std::string AnthropicBody(const std::string& user, bool stream) {
  return json({{"model", "claude-3-5-haiku"},
               {"max_tokens", 500},
               {"system", "be brief"},
               {"messages", {{{"role", "user"}, {"content", user}}}},
               {"stream", stream}})
      .dump();
}

std::string SpeechBody(const std::string& input, const std::string& extra = "") {
  json body = {
      {"model", "tts-1"}, {"input", input}, {"voice", "alloy"}, {"response_format", "pcm"}};
  if (!extra.empty()) body.update(json::parse(extra));
  return body.dump();
}

// The largest absolute sample of s16le `pcm`.
int PeakSample(const std::string& pcm) {
  int peak = 0;
  for (size_t i = 0; i + 1 < pcm.size(); i += 2) {
    const auto sample = static_cast<int16_t>(static_cast<uint16_t>(
        static_cast<unsigned char>(pcm[i]) | (static_cast<unsigned char>(pcm[i + 1]) << 8)));
    peak = std::max(peak, std::abs(static_cast<int>(sample)));
  }
  return peak;
}

const std::vector<std::string> kAnthropicHeaders = {"x-api-key: sk-ant-test",
                                                    "anthropic-version: 2023-06-01"};

// A raw HTTP/1.1 client socket: sends one request and can close without reading, which is how a
// cancelled call looks to the provider.
class RawConnection {
 public:
  explicit RawConnection(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~RawConnection() { Close(); }

  bool Send(const std::string& path, const std::string& body,
            const std::vector<std::string>& headers = {}) {
    std::string request = absl::StrCat("POST ", path,
                                       " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       "Content-Type: application/json\r\nContent-Length: ",
                                       body.size(), "\r\n");
    for (const std::string& h : headers) absl::StrAppend(&request, h, "\r\n");
    absl::StrAppend(&request, "\r\n", body);
    return connected_ &&
           write(fd_, request.data(), request.size()) == static_cast<ssize_t>(request.size());
  }
  // Reads until `needle` has arrived (or the peer closes). Everything read so far.
  std::string ReadUntil(absl::string_view needle) {
    char buffer[4096];
    while (!absl::StrContains(received_, needle)) {
      const ssize_t n = read(fd_, buffer, sizeof(buffer));
      if (n <= 0) break;
      received_.append(buffer, static_cast<size_t>(n));
    }
    return received_;
  }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string received_;
};

class FakeLlmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { curl_global_init(CURL_GLOBAL_DEFAULT); }

  void SetUp() override {
    auto started = FakeLlmServer::Start();
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = std::move(*started);
  }

  std::string Url(const std::string& path) const { return server_->base_url() + path; }

  std::unique_ptr<FakeLlmServer> server_;
  Client client_;
};

TEST_F(FakeLlmTest, OpenAiAnswersInTheChatCompletionShape) {
  HttpResult r =
      client_.Request("POST", Url("/v1/chat/completions"), {"Authorization: Bearer sk-test"},
                      OpenAiBody("hello there", false));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "application/json");
  const json body = json::parse(r.body);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["model"], "gpt-4o-mini");
  EXPECT_TRUE(body["id"].is_string());
  EXPECT_TRUE(body["created"].is_number_integer());
  EXPECT_EQ(body["choices"][0]["index"], 0);
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "fake answer to: hello there");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  // Prompt: "be brief" + "hello there" = 19 bytes -> 5 tokens; answer 27 bytes -> 7 tokens.
  EXPECT_EQ(body["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(body["usage"]["completion_tokens"], 7);
  EXPECT_EQ(body["usage"]["total_tokens"], 12);
}

TEST_F(FakeLlmTest, OpenAiStreamsChunksThenUsageThenDone) {
  HttpResult r =
      client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("tell me a story", true));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "text/event-stream");
  const std::vector<Sse> events = ParseSse(r.body);
  ASSERT_GE(events.size(), 4u);
  EXPECT_EQ(events.back().data, "[DONE]");
  const json first = json::parse(events[0].data);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 1; i + 3 < events.size(); ++i) {
    const json chunk = json::parse(events[i].data);
    EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
    text += chunk["choices"][0]["delta"]["content"].get<std::string>();
  }
  EXPECT_EQ(text, "fake answer to: tell me a story");
  const json last = json::parse(events[events.size() - 3].data);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  const json usage = json::parse(events[events.size() - 2].data);
  EXPECT_TRUE(usage["choices"].empty());
  // Same counts as the non-streamed answer to the same request.
  HttpResult whole = client_.Request("POST", Url("/v1/chat/completions"), {},
                                     OpenAiBody("tell me a story", false));
  EXPECT_EQ(usage["usage"], json::parse(whole.body)["usage"]);
}

TEST_F(FakeLlmTest, GeminiAnswersWholeAndAsServerSentEvents) {
  HttpResult r = client_.Request("POST", Url("/v1beta/models/gemini-2.0-flash:generateContent"),
                                 {"x-goog-api-key: AIza-test"}, GeminiBody("hi gemini"));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(r.status, 200);
  const json body = json::parse(r.body);
  EXPECT_EQ(body["candidates"][0]["content"]["role"], "model");
  EXPECT_EQ(body["candidates"][0]["content"]["parts"][0]["text"], "fake answer to: hi gemini");
  EXPECT_EQ(body["candidates"][0]["finishReason"], "STOP");
  EXPECT_EQ(body["usageMetadata"]["promptTokenCount"], 3);
  EXPECT_EQ(body["usageMetadata"]["candidatesTokenCount"], 7);
  EXPECT_EQ(body["usageMetadata"]["totalTokenCount"], 10);

  HttpResult s =
      client_.Request("POST", Url("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"),
                      {"x-goog-api-key: AIza-test"}, GeminiBody("hi gemini"));
  ASSERT_EQ(s.code, CURLE_OK);
  EXPECT_EQ(s.headers["content-type"], "text/event-stream");
  const std::vector<Sse> events = ParseSse(s.body);
  ASSERT_GE(events.size(), 2u);
  std::string text;
  for (size_t i = 0; i < events.size(); ++i) {
    const json chunk = json::parse(events[i].data);
    text += chunk["candidates"][0]["content"]["parts"][0]["text"].get<std::string>();
    const bool last = i + 1 == events.size();
    EXPECT_EQ(chunk.contains("usageMetadata"), last);
    if (last) {
      EXPECT_EQ(chunk["candidates"][0]["finishReason"], "STOP");
      EXPECT_EQ(chunk["usageMetadata"], body["usageMetadata"]);
    }
  }
  EXPECT_EQ(text, "fake answer to: hi gemini");
}

TEST_F(FakeLlmTest, AnthropicAnswersWholeAndAsNamedEvents) {
  HttpResult r = client_.Request("POST", Url("/v1/messages"), kAnthropicHeaders,
                                 AnthropicBody("hi claude", false));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(r.status, 200);
  const json body = json::parse(r.body);
  EXPECT_EQ(body["type"], "message");
  EXPECT_EQ(body["role"], "assistant");
  EXPECT_EQ(body["content"][0]["type"], "text");
  EXPECT_EQ(body["content"][0]["text"], "fake answer to: hi claude");
  EXPECT_EQ(body["stop_reason"], "end_turn");
  EXPECT_EQ(body["usage"]["input_tokens"], 5);
  EXPECT_EQ(body["usage"]["output_tokens"], 7);

  HttpResult s = client_.Request("POST", Url("/v1/messages"), kAnthropicHeaders,
                                 AnthropicBody("hi claude", true));
  ASSERT_EQ(s.code, CURLE_OK);
  const std::vector<Sse> events = ParseSse(s.body);
  std::vector<std::string> names;
  std::string text;
  for (const Sse& e : events) {
    const json data = json::parse(e.data);
    EXPECT_EQ(data["type"], e.event);
    if (names.empty() || names.back() != e.event) names.push_back(e.event);
    if (e.event == "content_block_delta") {
      EXPECT_EQ(data["delta"]["type"], "text_delta");
      text += data["delta"]["text"].get<std::string>();
    }
    if (e.event == "message_delta") {
      EXPECT_EQ(data["delta"]["stop_reason"], "end_turn");
      EXPECT_EQ(data["usage"]["output_tokens"], 7);
    }
  }
  EXPECT_EQ(names, (std::vector<std::string>{"message_start", "content_block_start", "ping",
                                             "content_block_delta", "content_block_stop",
                                             "message_delta", "message_stop"}));
  EXPECT_EQ(text, "fake answer to: hi claude");
}

TEST_F(FakeLlmTest, AnthropicRequiresItsHeadersAndMaxTokens) {
  HttpResult r = client_.Request("POST", Url("/v1/messages"), {"x-api-key: sk-ant-test"},
                                 AnthropicBody("hi", false));
  EXPECT_EQ(r.status, 400);
  const json body = json::parse(r.body);
  EXPECT_EQ(body["type"], "error");
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_THAT(body["error"]["message"].get<std::string>(), HasSubstr("anthropic-version"));

  json no_max = json::parse(AnthropicBody("hi", false));
  no_max.erase("max_tokens");
  r = client_.Request("POST", Url("/v1/messages"), kAnthropicHeaders, no_max.dump());
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("max_tokens"));
}

TEST_F(FakeLlmTest, MalformedBodiesAreAnswered400InTheProviderShape) {
  HttpResult r = client_.Request("POST", Url("/v1/chat/completions"), {}, "{not json");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "invalid_request_error");
  r = client_.Request("POST", Url("/v1beta/models/g:generateContent"), {}, R"({"contents": []})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["status"], "INVALID_ARGUMENT");
  r = client_.Request("POST", Url("/v2/unknown"), {}, "{}");
  EXPECT_EQ(r.status, 404);
}

TEST_F(FakeLlmTest, JsonRequestsGetTheScriptedJsonAnswer) {
  HttpResult r = client_.Request(
      "POST", Url("/v1/chat/completions"), {},
      OpenAiBody("give json", false, R"({"response_format": {"type": "json_object"}})"));
  EXPECT_EQ(json::parse(r.body)["choices"][0]["message"]["content"], R"({"ok":true})");

  server_->set_json_answer(R"({"title":"Scripted"})");
  r = client_.Request("POST", Url("/v1/chat/completions"), {},
                      OpenAiBody("schema please", false,
                                 R"({"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "t", "schema": {}}}})"));
  EXPECT_EQ(json::parse(r.body)["choices"][0]["message"]["content"], R"({"title":"Scripted"})");

  json gemini = json::parse(GeminiBody("json please"));
  gemini["generationConfig"] = {{"responseMimeType", "application/json"}};
  r = client_.Request("POST", Url("/v1beta/models/g:generateContent"), {}, gemini.dump());
  EXPECT_EQ(json::parse(r.body)["candidates"][0]["content"]["parts"][0]["text"],
            R"({"title":"Scripted"})");

  r = client_.Request("POST", Url("/v1/messages"), kAnthropicHeaders,
                      AnthropicBody("answer in [[json]] please", false));
  EXPECT_EQ(json::parse(r.body)["content"][0]["text"], R"({"title":"Scripted"})");
}

TEST_F(FakeLlmTest, LongPromptsAreEchoedTruncatedTo200Characters) {
  const std::string long_text(500, 'x');
  HttpResult r =
      client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody(long_text, false));
  EXPECT_EQ(json::parse(r.body)["choices"][0]["message"]["content"],
            "fake answer to: " + std::string(200, 'x'));
}

TEST_F(FakeLlmTest, WrongKeysAreRejectedInEachShapeWithoutEchoingThem) {
  server_->set_expected_key("right-key");
  HttpResult r = client_.Request("POST", Url("/v1/chat/completions"),
                                 {"Authorization: Bearer wrong-key"}, OpenAiBody("hi", false));
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "invalid_api_key");
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "invalid_request_error");
  EXPECT_THAT(r.body, Not(HasSubstr("wrong-key")));

  r = client_.Request("POST", Url("/v1beta/models/g:generateContent"), {}, GeminiBody("hi"));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["status"], "INVALID_ARGUMENT");
  EXPECT_THAT(json::parse(r.body)["error"]["message"].get<std::string>(),
              HasSubstr("API key not valid"));

  r = client_.Request("POST", Url("/v1/messages"),
                      {"x-api-key: wrong-key", "anthropic-version: 2023-06-01"},
                      AnthropicBody("hi", false));
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "authentication_error");
  EXPECT_THAT(r.body, Not(HasSubstr("wrong-key")));

  r = client_.Request("POST", Url("/v1/chat/completions"), {"Authorization: Bearer right-key"},
                      OpenAiBody("hi", false));
  EXPECT_EQ(r.status, 200);
  r = client_.Request("POST", Url("/v1beta/models/g:generateContent"),
                      {"x-goog-api-key: right-key"}, GeminiBody("hi"));
  EXPECT_EQ(r.status, 200);
}

TEST_F(FakeLlmTest, ScriptedErrorsAreConsumedInOrderThenAnswersAreNormal) {
  ASSERT_TRUE(server_
                  ->EnqueueJson(R"([{"status": 429, "headers": {"retry-after": "0"}},
                                    {"status": 429, "kind": "insufficient_quota"},
                                    {"status": 500},
                                    {"status": 503, "body": "upstream sad"}])")
                  .ok());
  const std::string url = Url("/v1/chat/completions");
  HttpResult r = client_.Request("POST", url, {}, OpenAiBody("a", false));
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.headers["retry-after"], "0");
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "rate_limit_exceeded");
  r = client_.Request("POST", url, {}, OpenAiBody("b", false));
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "insufficient_quota");
  r = client_.Request("POST", url, {}, OpenAiBody("c", false));
  EXPECT_EQ(r.status, 500);
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "server_error");
  r = client_.Request("POST", url, {}, OpenAiBody("d", false));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.body, "upstream sad");
  r = client_.Request("POST", url, {}, OpenAiBody("e", false));
  EXPECT_EQ(r.status, 200);
}

TEST_F(FakeLlmTest, ProviderSpecificErrorShapes) {
  Behaviour overloaded;
  overloaded.status = 529;
  server_->Enqueue(overloaded);
  HttpResult r =
      client_.Request("POST", Url("/v1/messages"), kAnthropicHeaders, AnthropicBody("hi", false));
  EXPECT_EQ(r.status, 529);
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "overloaded_error");

  ASSERT_TRUE(server_->EnqueueJson(R"({"status": 429, "headers": {"retry-after": "7"}})").ok());
  r = client_.Request("POST", Url("/v1beta/models/g:generateContent"), {}, GeminiBody("hi"));
  EXPECT_EQ(r.status, 429);
  const json error = json::parse(r.body)["error"];
  EXPECT_EQ(error["status"], "RESOURCE_EXHAUSTED");
  EXPECT_EQ(error["code"], 429);
  // Gemini gives the delay only inside the message text.
  EXPECT_THAT(error["message"].get<std::string>(), HasSubstr("Please retry in 7s."));
  EXPECT_EQ(r.headers.count("retry-after"), 0u);
}

TEST_F(FakeLlmTest, InvalidJsonAnswersAre200WithGarbage) {
  ASSERT_TRUE(server_->EnqueueJson(R"([{"invalid_json": true}, {"invalid_json": true}])").ok());
  HttpResult r = client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("hi", false));
  EXPECT_EQ(r.status, 200);
  EXPECT_TRUE(json::parse(r.body, nullptr, false).is_discarded());
  r = client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("hi", true));
  EXPECT_EQ(r.status, 200);
  const std::vector<Sse> events = ParseSse(r.body);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(json::parse(events[0].data, nullptr, false).is_discarded());
}

TEST_F(FakeLlmTest, StreamFailAfterCutsTheConnectionAfterThatManyPieces) {
  ASSERT_TRUE(server_->EnqueueJson(R"({"stream_fail_after": 2})").ok());
  HttpResult r = client_.Request("POST", Url("/v1/chat/completions"), {},
                                 OpenAiBody("one two three four five", true));
  EXPECT_NE(r.code, CURLE_OK);  // the chunked body never ended
  EXPECT_EQ(r.status, 200);
  const std::vector<Sse> events = ParseSse(r.body);
  // The opening chunk (role) and two pieces of text, nothing more.
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(json::parse(events[1].data)["choices"][0]["delta"]["content"], "fake");
  EXPECT_EQ(json::parse(events[2].data)["choices"][0]["delta"]["content"], " answer");
  EXPECT_THAT(r.body, Not(HasSubstr("[DONE]")));
  EXPECT_EQ(server_->stats().disconnects, 0u);
}

TEST_F(FakeLlmTest, StatsCountRequestsAndRecordBodiesWithoutCredentials) {
  client_.Request("POST", Url("/v1/chat/completions"), {"Authorization: Bearer sk-secret"},
                  OpenAiBody("first", false));
  client_.Request("POST", Url("/v1beta/models/g:streamGenerateContent?alt=sse"),
                  {"x-goog-api-key: AIza-secret"}, GeminiBody("second"));
  client_.Request("POST", Url("/v1/messages"), kAnthropicHeaders, AnthropicBody("third", true));
  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.total_requests, 3u);
  EXPECT_EQ(stats.openai_requests, 1u);
  EXPECT_EQ(stats.gemini_requests, 1u);
  EXPECT_EQ(stats.anthropic_requests, 1u);
  EXPECT_EQ(stats.completed, 3u);
  EXPECT_EQ(stats.in_flight, 0u);
  EXPECT_EQ(stats.peak_in_flight, 1u);
  ASSERT_EQ(stats.recent.size(), 3u);
  EXPECT_EQ(stats.recent[0].provider, "openai");
  EXPECT_FALSE(stats.recent[0].stream);
  EXPECT_EQ(json::parse(stats.recent[0].body)["messages"][1]["content"], "first");
  EXPECT_EQ(stats.recent[0].header("authorization"), "<redacted>");
  EXPECT_EQ(stats.recent[1].provider, "gemini");
  EXPECT_TRUE(stats.recent[1].stream);
  EXPECT_EQ(stats.recent[1].path, "/v1beta/models/g:streamGenerateContent");
  EXPECT_EQ(stats.recent[1].header("x-goog-api-key"), "<redacted>");
  EXPECT_EQ(stats.recent[2].header("anthropic-version"), "2023-06-01");
  EXPECT_EQ(stats.recent[2].header("x-api-key"), "<redacted>");
  const std::string as_json = StatsToJson(stats);
  EXPECT_THAT(as_json, Not(HasSubstr("secret")));
  EXPECT_THAT(as_json, Not(HasSubstr("sk-ant-test")));
}

TEST_F(FakeLlmTest, KeepAliveReusesTheConnection) {
  client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("a", false));
  EXPECT_EQ(client_.new_connections(), 1);
  client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("b", true));
  EXPECT_EQ(client_.new_connections(), 0);
  client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("c", false));
  EXPECT_EQ(client_.new_connections(), 0);
}

TEST_F(FakeLlmTest, ConcurrentDelayedRequestsAreAllInFlightThenAbandonedOnesCountAsDisconnects) {
  server_->set_default_delay(absl::Hours(1));
  std::vector<std::unique_ptr<RawConnection>> connections;
  for (int i = 0; i < 5; ++i) {
    connections.push_back(std::make_unique<RawConnection>(server_->port()));
    ASSERT_TRUE(connections.back()->Send("/v1/chat/completions", OpenAiBody("wait", false)));
  }
  ASSERT_TRUE(server_->WaitForInFlight(5, kPatience));
  EXPECT_EQ(server_->stats().peak_in_flight, 5u);
  for (auto& c : connections) c->Close();
  ASSERT_TRUE(server_->WaitForDisconnects(5, kPatience));
  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.in_flight, 0u);
  EXPECT_EQ(stats.completed, 0u);
  EXPECT_EQ(stats.disconnects, 5u);
}

TEST_F(FakeLlmTest, HangingRequestEndsOnlyWhenTheClientLeaves) {
  ASSERT_TRUE(server_->EnqueueJson(R"({"hang": true})").ok());
  RawConnection connection(server_->port());
  ASSERT_TRUE(connection.Send("/v1/messages", AnthropicBody("hi", false), kAnthropicHeaders));
  ASSERT_TRUE(server_->WaitForInFlight(1, kPatience));
  connection.Close();
  ASSERT_TRUE(server_->WaitForDisconnects(1, kPatience));
  EXPECT_EQ(server_->stats().in_flight, 0u);
}

TEST_F(FakeLlmTest, LeavingInTheMiddleOfAStreamCountsAsADisconnect) {
  server_->set_chunk_interval(absl::Hours(1));
  RawConnection connection(server_->port());
  ASSERT_TRUE(connection.Send("/v1/chat/completions", OpenAiBody("stream it", true)));
  // The first event is sent at once; the next one would be an hour later.
  EXPECT_THAT(connection.ReadUntil("chat.completion.chunk"), HasSubstr("200 OK"));
  EXPECT_EQ(server_->stats().in_flight, 1u);
  connection.Close();
  ASSERT_TRUE(server_->WaitForDisconnects(1, kPatience));
  EXPECT_EQ(server_->stats().completed, 0u);
}

TEST_F(FakeLlmTest, ScriptedDelayHoldsOnlyItsOwnRequest) {
  ASSERT_TRUE(server_->EnqueueJson(R"({"delay_ms": 3600000})").ok());
  RawConnection held(server_->port());
  ASSERT_TRUE(held.Send("/v1/chat/completions", OpenAiBody("slow", false)));
  ASSERT_TRUE(server_->WaitForInFlight(1, kPatience));
  HttpResult r =
      client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("fast", false));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(server_->stats().in_flight, 1u);
}

TEST_F(FakeLlmTest, StopWithPendingRequestsDropsThemQuietly) {
  server_->set_default_delay(absl::Hours(1));
  RawConnection a(server_->port());
  RawConnection b(server_->port());
  ASSERT_TRUE(a.Send("/v1/chat/completions", OpenAiBody("x", false)));
  ASSERT_TRUE(b.Send("/v1/chat/completions", OpenAiBody("y", true)));
  ASSERT_TRUE(server_->WaitForInFlight(2, kPatience));
  server_->Stop();
  server_->Stop();
  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.disconnects, 0u);
  EXPECT_EQ(stats.in_flight, 0u);
  // The clients see the connection closed without an answer.
  EXPECT_THAT(a.ReadUntil("never"), Not(HasSubstr("HTTP/1.1")));
}

TEST_F(FakeLlmTest, ControlPagesScriptReportAndReset) {
  HttpResult r =
      client_.Request("POST", Url("/_fake/script"), {}, R"([{"status": 500}, {"delay_ms": 1}])");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["queued"], 2);
  r = client_.Request("POST", Url("/_fake/script"), {}, R"({"stauts": 500})");
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("stauts"));

  r = client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("a", false));
  EXPECT_EQ(r.status, 500);
  r = client_.Request("GET", Url("/_fake/stats"));
  json stats = json::parse(r.body);
  EXPECT_EQ(stats["total_requests"], 1);
  EXPECT_EQ(stats["openai_requests"], 1);
  EXPECT_EQ(stats["queued_behaviours"], 1);
  EXPECT_EQ(stats["recent"].size(), 1u);

  r = client_.Request("POST", Url("/_fake/config"), {},
                      R"({"json_answer": "{\"x\":1}", "default_delay_ms": 0})");
  EXPECT_EQ(r.status, 200);
  r = client_.Request("POST", Url("/_fake/config"), {}, R"({"delay": 1})");
  EXPECT_EQ(r.status, 400);

  r = client_.Request("POST", Url("/_fake/reset"));
  EXPECT_EQ(r.status, 200);
  stats = json::parse(client_.Request("GET", Url("/_fake/stats")).body);
  EXPECT_EQ(stats["total_requests"], 0);
  EXPECT_EQ(stats["queued_behaviours"], 0);
  EXPECT_TRUE(stats["recent"].empty());
}

// 60 ms of 24 kHz s16le mono per character: 2880 bytes.
constexpr size_t kSpeechBytesPerChar = 2880;

TEST_F(FakeLlmTest, SpeechAnswersPcmProportionalToTheInput) {
  HttpResult one = client_.Request("POST", Url("/v1/audio/speech"),
                                   {"Authorization: Bearer sk-test"}, SpeechBody("Hello."));
  ASSERT_EQ(one.code, CURLE_OK);
  EXPECT_EQ(one.status, 200);
  EXPECT_EQ(one.headers["content-type"], "audio/pcm");
  EXPECT_EQ(one.body.size(), 6 * kSpeechBytesPerChar);
  EXPECT_GT(PeakSample(one.body), 1000) << "the audio is silent";

  HttpResult two =
      client_.Request("POST", Url("/v1/audio/speech"), {}, SpeechBody("Hello. Hello. Hello."));
  EXPECT_EQ(two.body.size(), 20 * kSpeechBytesPerChar);
  // Characters, not bytes: "é" is one.
  HttpResult accented = client_.Request("POST", Url("/v1/audio/speech"), {}, SpeechBody("café"));
  EXPECT_EQ(accented.body.size(), 4 * kSpeechBytesPerChar);

  // Deterministic; the voice changes the sound, the speed the length.
  HttpResult again = client_.Request("POST", Url("/v1/audio/speech"), {}, SpeechBody("Hello."));
  EXPECT_EQ(again.body, one.body);
  HttpResult nova = client_.Request("POST", Url("/v1/audio/speech"), {},
                                    SpeechBody("Hello.", R"({"voice": "nova"})"));
  EXPECT_EQ(nova.body.size(), one.body.size());
  EXPECT_NE(nova.body, one.body);
  HttpResult fast = client_.Request("POST", Url("/v1/audio/speech"), {},
                                    SpeechBody("Hello.", R"({"speed": 2.0})"));
  EXPECT_EQ(fast.body.size(), 3 * kSpeechBytesPerChar);

  HttpResult wav = client_.Request("POST", Url("/v1/audio/speech"), {},
                                   SpeechBody("Hello.", R"({"response_format": "wav"})"));
  EXPECT_EQ(wav.headers["content-type"], "audio/wav");
  ASSERT_EQ(wav.body.size(), 44 + one.body.size());
  EXPECT_EQ(wav.body.substr(0, 4), "RIFF");
  EXPECT_EQ(wav.body.substr(8, 8), "WAVEfmt ");
  EXPECT_EQ(wav.body.substr(44), one.body);

  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.tts_requests, 7u);
  EXPECT_EQ(stats.openai_requests, 0u);
  EXPECT_EQ(stats.completed, 7u);
  ASSERT_FALSE(stats.recent.empty());
  EXPECT_EQ(stats.recent[0].provider, "openai_tts");
  EXPECT_EQ(stats.recent[0].path, "/v1/audio/speech");
  EXPECT_EQ(stats.recent[0].header("authorization"), "<redacted>");
  EXPECT_EQ(json::parse(stats.recent[0].body)["input"], "Hello.");
  EXPECT_EQ(json::parse(StatsToJson(stats))["tts_requests"], 7);
}

TEST_F(FakeLlmTest, SpeechRequestsAreValidatedLikeOpenAi) {
  const std::string url = Url("/v1/audio/speech");
  json no_input = json::parse(SpeechBody("x"));
  no_input.erase("input");
  HttpResult r = client_.Request("POST", url, {}, no_input.dump());
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.headers["content-type"], "application/json");
  const json error = json::parse(r.body)["error"];
  EXPECT_EQ(error["type"], "invalid_request_error");
  EXPECT_THAT(error["message"].get<std::string>(), HasSubstr("input"));

  json no_model = json::parse(SpeechBody("x"));
  no_model.erase("model");
  r = client_.Request("POST", url, {}, no_model.dump());
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("model"));

  r = client_.Request("POST", url, {}, SpeechBody(std::string(4097, 'a')));
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("too long"));
  r = client_.Request("POST", url, {}, SpeechBody(std::string(4096, 'a')));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body.size(), 4096 * kSpeechBytesPerChar);

  r = client_.Request("POST", url, {}, SpeechBody("x", R"({"response_format": "mp3"})"));
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("unsupported by the fake"));
  json default_format = json::parse(SpeechBody("x"));
  default_format.erase("response_format");  // OpenAI's default is mp3
  r = client_.Request("POST", url, {}, default_format.dump());
  EXPECT_EQ(r.status, 400);
  r = client_.Request("POST", url, {}, SpeechBody("x", R"({"response_format": "ogg"})"));
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("mp3, opus, aac, flac, wav, pcm"));

  for (const char* speed : {R"({"speed": 0.2})", R"({"speed": 4.5})", R"({"speed": "fast"})"}) {
    r = client_.Request("POST", url, {}, SpeechBody("x", speed));
    EXPECT_EQ(r.status, 400) << speed;
    EXPECT_THAT(r.body, HasSubstr("speed")) << speed;
  }
  r = client_.Request("POST", url, {}, SpeechBody("x", R"({"pitch": 3})"));
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.body, HasSubstr("pitch"));
  r = client_.Request("POST", url, {}, "not json");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(server_->stats().tts_requests, 12u);
  EXPECT_EQ(server_->stats().completed, 12u);
}

TEST_F(FakeLlmTest, SpeechFollowsTheScriptAndTheKey) {
  server_->set_expected_key("sk-right");
  const std::string url = Url("/v1/audio/speech");
  HttpResult r = client_.Request("POST", url, {"Authorization: Bearer sk-wrong"}, SpeechBody("x"));
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "invalid_api_key");
  EXPECT_THAT(r.body, Not(HasSubstr("sk-wrong")));

  const std::vector<std::string> key = {"Authorization: Bearer sk-right"};
  ASSERT_TRUE(server_
                  ->EnqueueJson(R"([{"status": 429, "kind": "insufficient_quota"},
                                    {"status": 200, "body": "{\"error\": \"not audio\"}"},
                                    {"invalid_json": true}])")
                  .ok());
  r = client_.Request("POST", url, key, SpeechBody("x"));
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "insufficient_quota");
  r = client_.Request("POST", url, key, SpeechBody("x"));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "application/json");
  r = client_.Request("POST", url, key, SpeechBody("x"));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "audio/pcm");
  EXPECT_EQ(r.body.size() % 2, 1u);
  r = client_.Request("POST", url, key, SpeechBody("x"));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body.size(), kSpeechBytesPerChar);

  // A hanging speech request is in flight until its client leaves.
  ASSERT_TRUE(server_->EnqueueJson(R"({"hang": true})").ok());
  RawConnection connection(server_->port());
  ASSERT_TRUE(connection.Send("/v1/audio/speech", SpeechBody("x"), key));
  ASSERT_TRUE(server_->WaitForInFlight(1, kPatience));
  connection.Close();
  ASSERT_TRUE(server_->WaitForDisconnects(1, kPatience));
  EXPECT_EQ(server_->stats().tts_requests, 6u);
}

TEST(ParseBehavioursTest, ReadsEveryFieldAndRejectsUnknownOnes) {
  auto parsed = ParseBehaviours(
      R"({"status": 429, "kind": "insufficient_quota", "headers": {"retry-after": "1"},
          "body": "b", "delay_ms": 5, "invalid_json": false, "hang": false,
          "stream_fail_after": 3, "stream_fail_no_error": true})");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->size(), 1u);
  const Behaviour& b = (*parsed)[0];
  EXPECT_EQ(b.status, 429);
  EXPECT_EQ(b.kind, "insufficient_quota");
  ASSERT_EQ(b.headers.size(), 1u);
  EXPECT_EQ(b.headers[0].first, "retry-after");
  EXPECT_EQ(b.body, "b");
  EXPECT_EQ(b.delay, absl::Milliseconds(5));
  EXPECT_EQ(b.stream_fail_after, 3);
  EXPECT_TRUE(b.stream_fail_no_error);
  EXPECT_FALSE(b.invalid_json);
  EXPECT_FALSE(ParseBehaviours(R"({"stream_fail_no_error": 1})").ok());
  EXPECT_FALSE(ParseBehaviours(R"({"sttus": 1})").ok());
  EXPECT_FALSE(ParseBehaviours(R"({"status": "429"})").ok());
  EXPECT_FALSE(ParseBehaviours("[1]").ok());
  EXPECT_FALSE(ParseBehaviours("nope").ok());
}

// Requests over h2c (HTTP/2 with prior knowledge) to the fake's second port.
class FakeLlmH2cTest : public FakeLlmTest {
 protected:
  void SetUp() override {
    FakeLlmOptions options;
    options.h2c_port = 0;
    auto started = FakeLlmServer::Start(options);
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = std::move(*started);
    client_.set_h2c(true);
  }

  std::string H2cUrl(const std::string& path) const { return server_->h2c_base_url() + path; }
};

// One transfer through a curl multi handle, which can be removed in the middle as a cancelled
// call is. (Debian's libcurl 7.88.1 fails every transfer but the first on an h2c connection,
// "Error in the HTTP2 framing layer", so multiplexing is tested with H2cConnection below.)
class H2cMulti {
 public:
  H2cMulti() : multi_(curl_multi_init()) {}
  ~H2cMulti() {
    if (easy_ != nullptr) Remove();
    curl_multi_cleanup(multi_);  // closes the connection
  }

  void Add(const std::string& url, const std::string& body) {
    body_ = body;
    easy_ = curl_easy_init();
    curl_easy_setopt(easy_, CURLOPT_URL, url.c_str());
    curl_easy_setopt(easy_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy_, CURLOPT_HTTP_VERSION, long{CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE});
    curl_easy_setopt(easy_, CURLOPT_POSTFIELDS, body_.c_str());
    curl_easy_setopt(easy_, CURLOPT_WRITEFUNCTION, &AppendBody);
    curl_easy_setopt(easy_, CURLOPT_WRITEDATA, &sink_);
    curl_multi_add_handle(multi_, easy_);
  }
  void Remove() {
    curl_multi_remove_handle(multi_, easy_);
    curl_easy_cleanup(easy_);
    easy_ = nullptr;
  }
  // Drives the transfer until `done` holds or kPatience passes. True when it held.
  template <typename Done>
  bool PumpUntil(Done done) {
    const absl::Time deadline = absl::Now() + kPatience;
    while (!done()) {
      if (absl::Now() > deadline) return false;
      int running = 0;
      curl_multi_perform(multi_, &running);
      curl_multi_poll(multi_, nullptr, 0, 20, nullptr);
    }
    return true;
  }

 private:
  CURLM* multi_;
  CURL* easy_ = nullptr;
  std::string body_;
  std::string sink_;
};

// A minimal h2c client on nghttp2's client session over a blocking socket: many streams on one
// connection, which can be reset one by one or closed together.
class H2cConnection {
 public:
  explicit H2cConnection(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    nghttp2_session_callbacks* callbacks = nullptr;
    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_send_callback(
        callbacks,
        [](nghttp2_session*, const uint8_t* data, size_t length, int, void* self) -> ssize_t {
          const ssize_t n = write(static_cast<H2cConnection*>(self)->fd_, data, length);
          return n < 0 ? ssize_t{NGHTTP2_ERR_CALLBACK_FAILURE} : n;
        });
    nghttp2_session_callbacks_set_on_stream_close_callback(
        callbacks, [](nghttp2_session*, int32_t, uint32_t, void* self) {
          ++static_cast<H2cConnection*>(self)->closed_streams_;
          return 0;
        });
    nghttp2_session_client_new(&session_, callbacks, this);
    nghttp2_session_callbacks_del(callbacks);
    nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, nullptr, 0);
  }
  ~H2cConnection() {
    nghttp2_session_del(session_);
    Close();
  }

  // Starts a POST of `body` to `path`; the stream id.
  int32_t Post(const std::string& path, const std::string& body) {
    bodies_.push_back(std::make_unique<std::string>(body));
    const std::string length = std::to_string(body.size());
    const std::string authority = "127.0.0.1";
    const std::pair<std::string, std::string> fields[] = {{":method", "POST"},
                                                          {":scheme", "http"},
                                                          {":authority", authority},
                                                          {":path", path},
                                                          {"content-type", "application/json"},
                                                          {"content-length", length}};
    std::vector<nghttp2_nv> nva;
    for (const auto& [name, value] : fields) {
      nva.push_back({const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(name.data())),
                     const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(value.data())),
                     name.size(), value.size(), NGHTTP2_NV_FLAG_NONE});
    }
    nghttp2_data_provider provider;
    provider.source.ptr = bodies_.back().get();
    provider.read_callback = [](nghttp2_session*, int32_t, uint8_t* buf, size_t length,
                                uint32_t* flags, nghttp2_data_source* source, void*) -> ssize_t {
      auto* rest = static_cast<std::string*>(source->ptr);
      const size_t n = std::min(length, rest->size());
      std::memcpy(buf, rest->data(), n);
      rest->erase(0, n);
      if (rest->empty()) *flags |= NGHTTP2_DATA_FLAG_EOF;
      return static_cast<ssize_t>(n);
    };
    const int32_t id =
        nghttp2_submit_request(session_, nullptr, nva.data(), nva.size(), &provider, nullptr);
    nghttp2_session_send(session_);
    return id;
  }
  void Reset(int32_t id) {
    nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
    nghttp2_session_send(session_);
  }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  // Reads and answers frames until `done` holds or kPatience passes. True when it held.
  template <typename Done>
  bool PumpUntil(Done done) {
    const absl::Time deadline = absl::Now() + kPatience;
    while (!done()) {
      if (!connected_ || absl::Now() > deadline) return false;
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 20) > 0) {
        uint8_t buffer[16384];
        const ssize_t n = read(fd_, buffer, sizeof(buffer));
        if (n <= 0) return false;
        if (nghttp2_session_mem_recv(session_, buffer, static_cast<size_t>(n)) < 0) return false;
      }
      nghttp2_session_send(session_);
    }
    return true;
  }
  int closed_streams() const { return closed_streams_; }

 private:
  int fd_ = -1;
  bool connected_ = false;
  nghttp2_session* session_ = nullptr;
  std::vector<std::unique_ptr<std::string>> bodies_;
  int closed_streams_ = 0;
};

TEST_F(FakeLlmH2cTest, OpenAiAnswersWholeAndStreamedOverH2c) {
  ASSERT_GT(server_->h2c_port(), 0);
  EXPECT_NE(server_->h2c_port(), server_->port());
  HttpResult r =
      client_.Request("POST", H2cUrl("/v1/chat/completions"), {"Authorization: Bearer sk-test"},
                      OpenAiBody("hello there", false));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(client_.http_version(), CURL_HTTP_VERSION_2_0);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "application/json");
  const json body = json::parse(r.body);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "fake answer to: hello there");

  r = client_.Request("POST", H2cUrl("/v1/chat/completions"), {}, OpenAiBody("stream me", true));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "text/event-stream");
  const std::vector<Sse> events = ParseSse(r.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(json::parse(events[1].data)["choices"][0]["delta"]["content"], "fake");
  EXPECT_EQ(events.back().data, "[DONE]");

  // The HTTP/1.1 port still answers, and the request logic (stats, records) is shared.
  client_.set_h2c(false);
  r = client_.Request("POST", Url("/v1/chat/completions"), {}, OpenAiBody("h1", false));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(client_.http_version(), CURL_HTTP_VERSION_1_1);
  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.openai_requests, 3u);
  EXPECT_EQ(stats.completed, 3u);
  EXPECT_GE(stats.h2c_connections, 1u);
  ASSERT_EQ(stats.recent.size(), 3u);
  EXPECT_EQ(stats.recent[0].path, "/v1/chat/completions");
  EXPECT_EQ(stats.recent[0].header("authorization"), "<redacted>");
  EXPECT_TRUE(stats.recent[1].stream);
}

TEST_F(FakeLlmH2cTest, ScriptedErrorsAndCutStreamsOverH2c) {
  ASSERT_TRUE(server_
                  ->EnqueueJson(R"([{"status": 429, "headers": {"Retry-After": "3"}},
                                    {"stream_fail_after": 2}])")
                  .ok());
  HttpResult r =
      client_.Request("POST", H2cUrl("/v1/chat/completions"), {}, OpenAiBody("a", false));
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.headers["retry-after"], "3");
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "rate_limit_exceeded");

  // stream_fail_after resets the stream after the promised pieces.
  r = client_.Request("POST", H2cUrl("/v1/chat/completions"), {},
                      OpenAiBody("one two three four five", true));
  EXPECT_NE(r.code, CURLE_OK);
  EXPECT_EQ(r.status, 200);
  const std::vector<Sse> events = ParseSse(r.body);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(json::parse(events[2].data)["choices"][0]["delta"]["content"], " answer");
  EXPECT_THAT(r.body, Not(HasSubstr("[DONE]")));
  EXPECT_EQ(server_->stats().disconnects, 0u);
  EXPECT_EQ(server_->stats().completed, 2u);
}

TEST_F(FakeLlmH2cTest, ConcurrentStreamsShareOneConnectionAndResetStreamsAreDisconnects) {
  constexpr int kRequests = 50;
  server_->set_default_delay(absl::Hours(1));
  H2cConnection connection(server_->h2c_port());
  std::vector<int32_t> streams;
  for (int i = 0; i < kRequests; ++i) {
    streams.push_back(
        connection.Post("/v1/chat/completions", OpenAiBody(absl::StrCat("q", i), false)));
  }
  ASSERT_TRUE(connection.PumpUntil([&] { return server_->stats().in_flight == kRequests; }));
  FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.peak_in_flight, static_cast<uint64_t>(kRequests));
  EXPECT_EQ(stats.h2c_connections, 1u);
  EXPECT_EQ(stats.openai_requests, static_cast<uint64_t>(kRequests));

  // A reset stream is a disconnect; the others stay in flight.
  connection.Reset(streams[0]);
  ASSERT_TRUE(server_->WaitForDisconnects(1, kPatience));
  stats = server_->stats();
  EXPECT_EQ(stats.in_flight, static_cast<uint64_t>(kRequests - 1));
  EXPECT_EQ(stats.completed, 0u);

  // Closing the connection disconnects every stream still open.
  connection.Close();
  ASSERT_TRUE(server_->WaitForDisconnects(kRequests, kPatience));
  EXPECT_EQ(server_->stats().in_flight, 0u);
}

TEST_F(FakeLlmH2cTest, StreamsOfOneConnectionAreAnsweredIndependently) {
  ASSERT_TRUE(server_->EnqueueJson(R"([{"delay_ms": 3600000}, {"status": 500}])").ok());
  H2cConnection connection(server_->h2c_port());
  connection.Post("/v1/chat/completions", OpenAiBody("slow", false));
  ASSERT_TRUE(connection.PumpUntil([&] { return server_->stats().in_flight == 1; }));
  connection.Post("/v1/chat/completions", OpenAiBody("error", false));
  connection.Post("/v1/chat/completions", OpenAiBody("fine", true));
  ASSERT_TRUE(connection.PumpUntil([&] { return connection.closed_streams() == 2; }));
  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.completed, 2u);
  EXPECT_EQ(stats.in_flight, 1u);
}

TEST_F(FakeLlmH2cTest, HangingRequestEndsWhenItsTransferIsRemoved) {
  ASSERT_TRUE(server_->EnqueueJson(R"({"hang": true})").ok());
  {
    H2cMulti multi;
    multi.Add(H2cUrl("/v1/chat/completions"), OpenAiBody("hang", false));
    ASSERT_TRUE(multi.PumpUntil([&] { return server_->stats().in_flight == 1; }));
    multi.Remove();
  }  // libcurl resets the stream or closes the connection; either is a departure
  ASSERT_TRUE(server_->WaitForDisconnects(1, kPatience));
  EXPECT_EQ(server_->stats().in_flight, 0u);
  EXPECT_EQ(server_->stats().completed, 0u);
}

TEST_F(FakeLlmH2cTest, StopWithPendingStreamsDropsThemQuietly) {
  server_->set_default_delay(absl::Hours(1));
  H2cConnection connection(server_->h2c_port());
  connection.Post("/v1/chat/completions", OpenAiBody("x", false));
  connection.Post("/v1/chat/completions", OpenAiBody("y", true));
  ASSERT_TRUE(connection.PumpUntil([&] { return server_->stats().in_flight == 2; }));
  server_->Stop();
  const FakeLlmStats stats = server_->stats();
  EXPECT_EQ(stats.disconnects, 0u);
  EXPECT_EQ(stats.in_flight, 0u);
}

TEST_F(FakeLlmH2cTest, SpeechOverH2c) {
  HttpResult r = client_.Request("POST", H2cUrl("/v1/audio/speech"), {}, SpeechBody("Hi there."));
  ASSERT_EQ(r.code, CURLE_OK);
  EXPECT_EQ(client_.http_version(), CURL_HTTP_VERSION_2_0);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["content-type"], "audio/pcm");
  EXPECT_EQ(r.body.size(), 9 * kSpeechBytesPerChar);
  EXPECT_EQ(server_->stats().tts_requests, 1u);
}

}  // namespace
}  // namespace montage::testing
