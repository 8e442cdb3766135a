#include "tests/fake_llm/provider_wire.h"

#include <cmath>
#include <cstdint>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/wav.h"
#include "nlohmann/json.hpp"

namespace montage::testing {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr size_t kEchoedCodePoints = 200;
constexpr absl::string_view kJsonMarker = "[[json]]";
constexpr absl::string_view kDefaultJsonAnswer = R"({"ok":true})";

// Thrown inside ParseProviderRequest only, and turned into INVALID_ARGUMENT there.
struct BadRequest {
  std::string message;
};

std::string Dump(const ordered_json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

// The first `max_code_points` code points of UTF-8 `text`.
std::string Utf8Prefix(absl::string_view text, size_t max_code_points) {
  size_t seen = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const bool starts_code_point = (static_cast<unsigned char>(text[i]) & 0xC0) != 0x80;
    if (starts_code_point && seen++ == max_code_points) return std::string(text.substr(0, i));
  }
  return std::string(text);
}

// At most `max_bytes` of UTF-8 `text`, never ending inside a code point.
std::string Utf8Truncate(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return std::string(text.substr(0, end));
}

const json* Field(const json& object, const char* name) {
  auto it = object.find(name);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

// The first of `names` present (Gemini accepts camelCase and snake_case field names).
const json* FieldEither(const json& object, const char* camel, const char* snake) {
  const json* value = Field(object, camel);
  return value != nullptr ? value : Field(object, snake);
}

std::string StringField(const json& object, const char* name, bool required) {
  const json* value = Field(object, name);
  if (value == nullptr) {
    if (required) throw BadRequest{absl::StrCat(name, ": field required")};
    return "";
  }
  if (!value->is_string()) throw BadRequest{absl::StrCat(name, ": must be a string")};
  return value->get<std::string>();
}

bool BoolField(const json& object, const char* name) {
  const json* value = Field(object, name);
  if (value == nullptr) return false;
  if (!value->is_boolean()) throw BadRequest{absl::StrCat(name, ": must be a boolean")};
  return value->get<bool>();
}

int64_t TokenLimit(const json* value, const char* name) {
  if (value == nullptr) return 0;
  if (!value->is_number_integer() || value->get<int64_t>() < 1) {
    throw BadRequest{absl::StrCat(name, ": must be a positive integer")};
  }
  return value->get<int64_t>();
}

void CheckTemperature(const json* value, double max) {
  if (value == nullptr) return;
  if (!value->is_number() || value->get<double>() < 0 || value->get<double>() > max) {
    throw BadRequest{absl::StrCat("temperature: must be a number between 0 and ", max)};
  }
}

// Text of a message's content: a string, or a list of parts/blocks whose `text` fields count.
std::string ContentText(const json& content, const char* what) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) throw BadRequest{absl::StrCat(what, ": must be a string or a list")};
  std::string text;
  for (const json& part : content) {
    if (!part.is_object()) throw BadRequest{absl::StrCat(what, ": parts must be objects")};
    const json* part_text = Field(part, "text");
    if (part_text == nullptr) continue;  // images, tool calls: no text to echo
    if (!part_text->is_string()) throw BadRequest{absl::StrCat(what, ".text: must be a string")};
    if (!text.empty()) text += "\n";
    text += part_text->get<std::string>();
  }
  return text;
}

const json& ArrayField(const json& object, const char* name) {
  const json* value = Field(object, name);
  if (value == nullptr) throw BadRequest{absl::StrCat(name, ": field required")};
  if (!value->is_array() || value->empty()) {
    throw BadRequest{absl::StrCat(name, ": must be a non-empty list")};
  }
  return *value;
}

void ParseOpenAi(const json& body, ProviderRequest& out) {
  out.model = StringField(body, "model", true);
  for (const json& message : ArrayField(body, "messages")) {
    if (!message.is_object()) throw BadRequest{"messages: each message must be an object"};
    const std::string role = StringField(message, "role", true);
    const json* content = Field(message, "content");
    const std::string text = content == nullptr ? "" : ContentText(*content, "messages.content");
    out.prompt_chars += text.size();
    if (role == "user") out.last_user_text = text;
  }
  out.stream = BoolField(body, "stream");
  if (const json* options = Field(body, "stream_options")) {
    if (!options->is_object()) throw BadRequest{"stream_options: must be an object"};
    out.include_usage = BoolField(*options, "include_usage");
  }
  if (const json* format = Field(body, "response_format")) {
    if (!format->is_object()) throw BadRequest{"response_format: must be an object"};
    const std::string type = StringField(*format, "type", true);
    if (type != "text" && type != "json_object" && type != "json_schema") {
      throw BadRequest{absl::StrCat("response_format.type: unknown type '", type, "'")};
    }
    out.wants_json = type != "text";
  }
  out.max_tokens = TokenLimit(Field(body, "max_tokens"), "max_tokens");
  if (out.max_tokens == 0) {
    out.max_tokens = TokenLimit(Field(body, "max_completion_tokens"), "max_completion_tokens");
  }
  CheckTemperature(Field(body, "temperature"), 2.0);
}

void ParseGemini(const json& body, ProviderRequest& out) {
  for (const json& content : ArrayField(body, "contents")) {
    if (!content.is_object()) throw BadRequest{"contents: each content must be an object"};
    const std::string role = StringField(content, "role", false);
    const json* parts = Field(content, "parts");
    const std::string text = parts == nullptr ? "" : ContentText(*parts, "contents.parts");
    out.prompt_chars += text.size();
    if (role.empty() || role == "user") out.last_user_text = text;
  }
  if (const json* system = FieldEither(body, "systemInstruction", "system_instruction")) {
    if (!system->is_object()) throw BadRequest{"systemInstruction: must be an object"};
    if (const json* parts = Field(*system, "parts")) {
      out.prompt_chars += ContentText(*parts, "systemInstruction.parts").size();
    }
  }
  if (const json* config = FieldEither(body, "generationConfig", "generation_config")) {
    if (!config->is_object()) throw BadRequest{"generationConfig: must be an object"};
    if (const json* mime = FieldEither(*config, "responseMimeType", "response_mime_type")) {
      if (!mime->is_string()) throw BadRequest{"responseMimeType: must be a string"};
      out.wants_json = mime->get<std::string>() == "application/json";
    }
    out.max_tokens =
        TokenLimit(FieldEither(*config, "maxOutputTokens", "max_output_tokens"), "maxOutputTokens");
    CheckTemperature(Field(*config, "temperature"), 2.0);
  }
}

void ParseAnthropic(const json& body, ProviderRequest& out) {
  out.model = StringField(body, "model", true);
  const json* max_tokens = Field(body, "max_tokens");
  if (max_tokens == nullptr) throw BadRequest{"max_tokens: Field required"};
  out.max_tokens = TokenLimit(max_tokens, "max_tokens");
  if (const json* system = Field(body, "system")) {
    out.prompt_chars += ContentText(*system, "system").size();
  }
  for (const json& message : ArrayField(body, "messages")) {
    if (!message.is_object()) throw BadRequest{"messages: each message must be an object"};
    const std::string role = StringField(message, "role", true);
    if (role != "user" && role != "assistant") {
      throw BadRequest{absl::StrCat("messages.role: unexpected role '", role, "'")};
    }
    const json* content = Field(message, "content");
    if (content == nullptr) throw BadRequest{"messages.content: field required"};
    const std::string text = ContentText(*content, "messages.content");
    out.prompt_chars += text.size();
    if (role == "user") out.last_user_text = text;
  }
  out.stream = BoolField(body, "stream");
  CheckTemperature(Field(body, "temperature"), 1.0);
}

ordered_json OpenAiUsage(const Completion& completion) {
  return {{"prompt_tokens", completion.prompt_tokens},
          {"completion_tokens", completion.completion_tokens},
          {"total_tokens", completion.prompt_tokens + completion.completion_tokens}};
}

ordered_json GeminiUsage(const Completion& completion) {
  return {{"promptTokenCount", completion.prompt_tokens},
          {"candidatesTokenCount", completion.completion_tokens},
          {"totalTokenCount", completion.prompt_tokens + completion.completion_tokens}};
}

ordered_json OpenAiChunk(const ProviderRequest& request, const AnswerIds& ids,
                         ordered_json choices) {
  return {{"id", ids.id},
          {"object", "chat.completion.chunk"},
          {"created", ids.created},
          {"model", request.model},
          {"choices", std::move(choices)}};
}

ordered_json OpenAiChoice(ordered_json delta, const char* finish_reason) {
  ordered_json choice = {{"index", 0}, {"delta", std::move(delta)}, {"finish_reason", nullptr}};
  if (finish_reason != nullptr) choice["finish_reason"] = finish_reason;
  return choice;
}

// One Gemini chunk with `text`; the last one also says why it ended and carries the usage.
ordered_json GeminiChunk(const ProviderRequest& request, const Completion& completion,
                         const std::string& text, bool last) {
  ordered_json candidate = {
      {"content", {{"role", "model"}, {"parts", ordered_json::array({{{"text", text}}})}}}};
  if (last) candidate["finishReason"] = completion.truncated ? "MAX_TOKENS" : "STOP";
  candidate["index"] = 0;
  ordered_json chunk = {{"candidates", ordered_json::array({candidate})}};
  if (last) chunk["usageMetadata"] = GeminiUsage(completion);
  chunk["modelVersion"] = request.model;
  return chunk;
}

std::string DataEvent(const ordered_json& data) {
  return absl::StrCat("data: ", Dump(data), "\n\n");
}

std::string NamedEvent(absl::string_view name, const ordered_json& data) {
  return absl::StrCat("event: ", name, "\ndata: ", Dump(data), "\n\n");
}

absl::string_view GeminiStatus(int status) {
  switch (status) {
    case 400:
      return "INVALID_ARGUMENT";
    case 401:
      return "UNAUTHENTICATED";
    case 403:
      return "PERMISSION_DENIED";
    case 404:
      return "NOT_FOUND";
    case 409:
      return "ABORTED";
    case 429:
      return "RESOURCE_EXHAUSTED";
    case 499:
      return "CANCELLED";
    case 500:
      return "INTERNAL";
    case 501:
      return "UNIMPLEMENTED";
    case 503:
      return "UNAVAILABLE";
    case 504:
      return "DEADLINE_EXCEEDED";
    default:
      return status >= 500 ? "INTERNAL" : "FAILED_PRECONDITION";
  }
}

std::string OpenAiError(int status, absl::string_view kind, absl::string_view message) {
  std::string text;
  const char* type = status >= 500 ? "server_error" : "invalid_request_error";
  ordered_json code;
  if (status == 401) {
    text = "Incorrect API key provided.";
    code = "invalid_api_key";
  } else if (status == 429 && kind == "insufficient_quota") {
    text = "You exceeded your current quota, please check your plan and billing details.";
    type = "insufficient_quota";
    code = "insufficient_quota";
  } else if (status == 429) {
    text = "Rate limit reached for requests. Please try again in a moment.";
    type = "requests";
    code = "rate_limit_exceeded";
  } else if (status == 503) {
    text = "The engine is currently overloaded, please try again later.";
  } else if (status >= 500) {
    text = "The server had an error while processing your request.";
  } else {
    text = absl::StrCat("The request was rejected with status ", status, ".");
  }
  if (!message.empty()) text = std::string(message);
  return Dump({{"error", {{"message", text}, {"type", type}, {"param", nullptr}, {"code", code}}}});
}

std::string GeminiError(int status, absl::string_view kind, absl::string_view message,
                        absl::string_view retry_after) {
  std::string text;
  if (status == 400) {
    text = "Request contains an invalid argument.";
  } else if (status == 429 && kind == "insufficient_quota") {
    text = "You exceeded your current quota, please check your plan and billing details.";
  } else if (status == 429) {
    text = "Resource has been exhausted (e.g. check quota).";
  } else if (status == 503) {
    text = "The model is overloaded. Please try again later.";
  } else if (status >= 500) {
    text = "An internal error has occurred.";
  } else {
    text = absl::StrCat("The request was rejected with status ", status, ".");
  }
  if (!message.empty()) text = std::string(message);
  if (!retry_after.empty()) absl::StrAppend(&text, " Please retry in ", retry_after, "s.");
  return Dump(
      {{"error",
        {{"code", status}, {"message", text}, {"status", std::string(GeminiStatus(status))}}}});
}

std::string AnthropicError(int status, absl::string_view message) {
  const char* type;
  const char* text;
  switch (status) {
    case 400:
      type = "invalid_request_error";
      text = "invalid request";
      break;
    case 401:
      type = "authentication_error";
      text = "invalid x-api-key";
      break;
    case 403:
      type = "permission_error";
      text = "Your API key does not have permission to use the specified resource.";
      break;
    case 404:
      type = "not_found_error";
      text = "The requested resource could not be found.";
      break;
    case 413:
      type = "request_too_large";
      text = "Request exceeds the maximum allowed number of bytes.";
      break;
    case 429:
      type = "rate_limit_error";
      text = "Number of requests has exceeded your rate limit.";
      break;
    case 529:
      type = "overloaded_error";
      text = "Overloaded";
      break;
    default:
      type = status >= 500 ? "api_error" : "invalid_request_error";
      text = status >= 500 ? "Internal server error" : "invalid request";
  }
  return Dump({{"type", "error"},
               {"error",
                {{"type", type},
                 {"message", message.empty() ? std::string(text) : std::string(message)}}}});
}

}  // namespace

absl::string_view ProviderName(Provider provider) {
  switch (provider) {
    case Provider::kOpenAi:
      return "openai";
    case Provider::kGemini:
      return "gemini";
    case Provider::kAnthropic:
      return "anthropic";
    case Provider::kOpenAiSpeech:
      return "openai_tts";
  }
  return "unknown";
}

absl::StatusOr<ProviderRequest> ParseProviderRequest(Provider provider, absl::string_view model,
                                                     absl::string_view body) {
  const json parsed = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return absl::InvalidArgumentError("the body is not valid JSON");
  if (!parsed.is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  ProviderRequest request;
  request.provider = provider;
  request.model = std::string(model);
  try {
    switch (provider) {
      case Provider::kOpenAi:
        ParseOpenAi(parsed, request);
        break;
      case Provider::kGemini:
        ParseGemini(parsed, request);
        break;
      case Provider::kAnthropic:
        ParseAnthropic(parsed, request);
        break;
      case Provider::kOpenAiSpeech:
        return absl::InvalidArgumentError("not a chat endpoint: see ParseSpeechRequest");
    }
  } catch (const BadRequest& bad) {
    return absl::InvalidArgumentError(bad.message);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(e.what());
  }
  if (absl::StrContains(request.last_user_text, kJsonMarker)) request.wants_json = true;
  return request;
}

int64_t EstimateTokens(size_t chars) { return static_cast<int64_t>((chars + 3) / 4); }

Completion MakeCompletion(const ProviderRequest& request, const std::string& json_answer) {
  Completion completion;
  if (request.wants_json) {
    completion.text = json_answer.empty() ? std::string(kDefaultJsonAnswer) : json_answer;
  } else {
    completion.text =
        absl::StrCat("fake answer to: ", Utf8Prefix(request.last_user_text, kEchoedCodePoints));
  }
  if (request.max_tokens > 0 && EstimateTokens(completion.text.size()) > request.max_tokens) {
    completion.text = Utf8Truncate(completion.text, static_cast<size_t>(request.max_tokens) * 4);
    completion.truncated = true;
  }
  completion.prompt_tokens = EstimateTokens(request.prompt_chars);
  completion.completion_tokens = EstimateTokens(completion.text.size());
  return completion;
}

std::vector<std::string> SplitIntoPieces(absl::string_view text) {
  std::vector<std::string> pieces;
  size_t start = 0;
  for (size_t i = 1; i < text.size(); ++i) {
    if (text[i] == ' ') {
      pieces.emplace_back(text.substr(start, i - start));
      start = i;
    }
  }
  if (start < text.size()) pieces.emplace_back(text.substr(start));
  return pieces;
}

std::string CompletionBody(const ProviderRequest& request, const Completion& completion,
                           const AnswerIds& ids) {
  switch (request.provider) {
    case Provider::kOpenAi: {
      ordered_json message = {{"role", "assistant"}, {"content", completion.text}};
      ordered_json choice = {{"index", 0},
                             {"message", std::move(message)},
                             {"finish_reason", completion.truncated ? "length" : "stop"}};
      return Dump({{"id", ids.id},
                   {"object", "chat.completion"},
                   {"created", ids.created},
                   {"model", request.model},
                   {"choices", ordered_json::array({std::move(choice)})},
                   {"usage", OpenAiUsage(completion)}});
    }
    case Provider::kGemini:
      return Dump(GeminiChunk(request, completion, completion.text, /*last=*/true));
    case Provider::kAnthropic:
      return Dump(
          {{"id", ids.id},
           {"type", "message"},
           {"role", "assistant"},
           {"model", request.model},
           {"content", ordered_json::array({{{"type", "text"}, {"text", completion.text}}})},
           {"stop_reason", completion.truncated ? "max_tokens" : "end_turn"},
           {"stop_sequence", nullptr},
           {"usage",
            {{"input_tokens", completion.prompt_tokens},
             {"output_tokens", completion.completion_tokens}}}});
    case Provider::kOpenAiSpeech:
      break;
  }
  return "";
}

std::vector<StreamEvent> StreamEvents(const ProviderRequest& request, const Completion& completion,
                                      const AnswerIds& ids) {
  const std::vector<std::string> pieces = SplitIntoPieces(completion.text);
  std::vector<StreamEvent> events;
  switch (request.provider) {
    case Provider::kOpenAi: {
      const ordered_json opening = {{"role", "assistant"}, {"content", ""}};
      events.push_back({DataEvent(OpenAiChunk(
                            request, ids, ordered_json::array({OpenAiChoice(opening, nullptr)}))),
                        false});
      for (const std::string& piece : pieces) {
        const ordered_json delta = {{"content", piece}};
        events.push_back({DataEvent(OpenAiChunk(
                              request, ids, ordered_json::array({OpenAiChoice(delta, nullptr)}))),
                          true});
      }
      const char* finish = completion.truncated ? "length" : "stop";
      events.push_back(
          {DataEvent(OpenAiChunk(
               request, ids, ordered_json::array({OpenAiChoice(ordered_json::object(), finish)}))),
           false});
      if (request.include_usage) {
        ordered_json usage_chunk = OpenAiChunk(request, ids, ordered_json::array());
        usage_chunk["usage"] = OpenAiUsage(completion);
        events.push_back({DataEvent(usage_chunk), false});
      }
      events.push_back({"data: [DONE]\n\n", false});
      break;
    }
    case Provider::kGemini: {
      if (pieces.empty()) {
        events.push_back({DataEvent(GeminiChunk(request, completion, "", true)), false});
      }
      for (size_t i = 0; i < pieces.size(); ++i) {
        events.push_back(
            {DataEvent(GeminiChunk(request, completion, pieces[i], i + 1 == pieces.size())), true});
      }
      break;
    }
    case Provider::kAnthropic: {
      const ordered_json message = {
          {"id", ids.id},
          {"type", "message"},
          {"role", "assistant"},
          {"model", request.model},
          {"content", ordered_json::array()},
          {"stop_reason", nullptr},
          {"stop_sequence", nullptr},
          {"usage", {{"input_tokens", completion.prompt_tokens}, {"output_tokens", 1}}}};
      events.push_back(
          {NamedEvent("message_start", {{"type", "message_start"}, {"message", message}}), false});
      events.push_back(
          {NamedEvent("content_block_start", {{"type", "content_block_start"},
                                              {"index", 0},
                                              {"content_block", {{"type", "text"}, {"text", ""}}}}),
           false});
      events.push_back({NamedEvent("ping", {{"type", "ping"}}), false});
      for (const std::string& piece : pieces) {
        events.push_back({NamedEvent("content_block_delta",
                                     {{"type", "content_block_delta"},
                                      {"index", 0},
                                      {"delta", {{"type", "text_delta"}, {"text", piece}}}}),
                          true});
      }
      events.push_back(
          {NamedEvent("content_block_stop", {{"type", "content_block_stop"}, {"index", 0}}),
           false});
      events.push_back(
          {NamedEvent("message_delta",
                      {{"type", "message_delta"},
                       {"delta",
                        {{"stop_reason", completion.truncated ? "max_tokens" : "end_turn"},
                         {"stop_sequence", nullptr}}},
                       {"usage", {{"output_tokens", completion.completion_tokens}}}}),
           false});
      events.push_back({NamedEvent("message_stop", {{"type", "message_stop"}}), false});
      break;
    }
    case Provider::kOpenAiSpeech:
      break;
  }
  return events;
}

std::string GeminiChunkArray(const ProviderRequest& request, const Completion& completion) {
  const std::vector<std::string> pieces = SplitIntoPieces(completion.text);
  ordered_json chunks = ordered_json::array();
  if (pieces.empty()) chunks.push_back(GeminiChunk(request, completion, "", true));
  for (size_t i = 0; i < pieces.size(); ++i) {
    chunks.push_back(GeminiChunk(request, completion, pieces[i], i + 1 == pieces.size()));
  }
  return Dump(chunks);
}

std::string InvalidJsonEvent(Provider provider) {
  if (provider == Provider::kAnthropic) return "event: content_block_delta\ndata: not json {\n\n";
  return "data: not json {\n\n";
}

std::string ErrorBody(Provider provider, int status, absl::string_view kind,
                      absl::string_view message, absl::string_view retry_after) {
  switch (provider) {
    case Provider::kOpenAi:
    case Provider::kOpenAiSpeech:
      return OpenAiError(status, kind, message);
    case Provider::kGemini:
      return GeminiError(status, kind, message, retry_after);
    case Provider::kAnthropic:
      return AnthropicError(status, message);
  }
  return "";
}

size_t CountCodePoints(absl::string_view text) {
  size_t n = 0;
  for (const char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++n;
  }
  return n;
}

absl::StatusOr<SpeechRequest> ParseSpeechRequest(absl::string_view body) {
  const json parsed = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return absl::InvalidArgumentError("the body is not valid JSON");
  if (!parsed.is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  SpeechRequest request;
  try {
    for (const auto& [key, value] : parsed.items()) {
      if (key != "model" && key != "input" && key != "voice" && key != "response_format" &&
          key != "speed" && key != "instructions" && key != "stream_format") {
        throw BadRequest{absl::StrCat("Unrecognized request argument supplied: ", key)};
      }
    }
    request.model = StringField(parsed, "model", true);
    request.input = StringField(parsed, "input", true);
    request.voice = StringField(parsed, "voice", true);
    if (request.model.empty()) throw BadRequest{"model: must not be empty"};
    if (request.voice.empty()) throw BadRequest{"voice: must not be empty"};
    const size_t chars = CountCodePoints(request.input);
    if (chars == 0) throw BadRequest{"input: must not be empty"};
    if (chars > kSpeechMaxInputChars) {
      throw BadRequest{absl::StrCat("input: string too long, ", chars, " characters; at most ",
                                    kSpeechMaxInputChars, " are allowed")};
    }
    request.response_format = StringField(parsed, "response_format", false);
    if (request.response_format.empty()) request.response_format = "mp3";
    const std::string& format = request.response_format;
    if (format != "mp3" && format != "opus" && format != "aac" && format != "flac" &&
        format != "wav" && format != "pcm") {
      throw BadRequest{absl::StrCat("response_format: '", format,
                                    "' is not one of mp3, opus, aac, flac, wav, pcm")};
    }
    if (format != "wav" && format != "pcm") {
      throw BadRequest{absl::StrCat("response_format: '", format,
                                    "' is unsupported by the fake provider, which makes only pcm "
                                    "and wav")};
    }
    if (const json* speed = Field(parsed, "speed")) {
      if (!speed->is_number() || !(speed->get<double>() >= 0.25 && speed->get<double>() <= 4.0)) {
        throw BadRequest{"speed: must be a number between 0.25 and 4.0"};
      }
      request.speed = speed->get<double>();
    }
    StringField(parsed, "instructions", false);
    StringField(parsed, "stream_format", false);
  } catch (const BadRequest& bad) {
    return absl::InvalidArgumentError(bad.message);
  }
  return request;
}

size_t SpeechSamples(const SpeechRequest& request) {
  constexpr double kSamplesPerChar = kSpeechSampleRate * kSpeechMillisPerChar / 1000.0;
  return static_cast<size_t>(
      std::llround(CountCodePoints(request.input) * kSamplesPerChar / request.speed));
}

std::string SpeechPcm(const SpeechRequest& request) {
  // FNV-1a of the voice name picks a base between 110 and 440 Hz.
  uint32_t hash = 2166136261u;
  for (const char c : request.voice) {
    hash = (hash ^ static_cast<unsigned char>(c)) * 16777619u;
  }
  const double base = 110.0 + static_cast<double>(hash % 331);
  // The code points of the input, each of which gets a pitch up to an octave above the base.
  std::vector<uint32_t> chars;
  for (size_t i = 0; i < request.input.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(request.input[i]);
    if ((c & 0xC0) != 0x80) {
      chars.push_back(c);
    } else if (!chars.empty()) {
      chars.back() = chars.back() * 64 + (c & 0x3F);
    }
  }
  const size_t samples = SpeechSamples(request);
  std::string pcm(samples * 2, '\0');
  constexpr double kTwoPi = 6.283185307179586;
  double phase = 0;
  for (size_t n = 0; n < samples; ++n) {
    const uint32_t ch = chars.empty() ? 0 : chars[n * chars.size() / samples];
    const double frequency = base * (1.0 + static_cast<double>(ch % 12) / 12.0);
    phase = std::fmod(phase + kTwoPi * frequency / kSpeechSampleRate, kTwoPi);
    const auto sample = static_cast<int16_t>(std::lround(8000.0 * std::sin(phase)));
    const auto bits = static_cast<uint16_t>(sample);
    pcm[2 * n] = static_cast<char>(bits & 0xFF);
    pcm[2 * n + 1] = static_cast<char>(bits >> 8);
  }
  return pcm;
}

std::string SpeechBody(const SpeechRequest& request, std::string* content_type) {
  std::string pcm = SpeechPcm(request);
  if (request.response_format != "wav") {
    *content_type = "audio/pcm";
    return pcm;
  }
  *content_type = "audio/wav";
  std::string wav = WavHeader(kSpeechSampleRate, pcm.size());
  wav += pcm;
  return wav;
}

const char* ReasonPhrase(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 413:
      return "Payload Too Large";
    case 429:
      return "Too Many Requests";
    case 500:
      return "Internal Server Error";
    case 502:
      return "Bad Gateway";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    case 529:
      return "Overloaded";
    default:
      return status >= 500 ? "Server Error" : "Client Error";
  }
}

}  // namespace montage::testing
