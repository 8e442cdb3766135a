// The three LLM providers' wire formats as the fake server speaks them (OpenAI Chat Completions,
// Gemini generateContent, Anthropic Messages): reading a request body into what the answer depends
// on, and writing answers, stream events and error bodies. Pure functions, no I/O, so the shapes
// can be checked without a socket; FakeLlmServer does the HTTP around them.
//
// Everything here is deterministic: the same request gives the same text and token counts, in a
// stream or not.
#ifndef MONTAGE_TESTS_FAKE_LLM_PROVIDER_WIRE_H_
#define MONTAGE_TESTS_FAKE_LLM_PROVIDER_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::testing {

enum class Provider { kOpenAi, kGemini, kAnthropic };

// "openai", "gemini" or "anthropic".
absl::string_view ProviderName(Provider provider);

// What an answer depends on, read from a provider request body.
struct ProviderRequest {
  Provider provider = Provider::kOpenAi;
  std::string model;
  bool stream = false;
  // OpenAI stream_options.include_usage: a last chunk with empty choices carries usage.
  bool include_usage = false;
  // The request asked for JSON (response_format, responseMimeType or the `[[json]]` marker).
  bool wants_json = false;
  // Content of the last user message (text parts joined).
  std::string last_user_text;
  // Characters of every prompt text (system and all messages): the prompt token estimate.
  size_t prompt_chars = 0;
  // max_tokens / maxOutputTokens; 0 when the request set none.
  int64_t max_tokens = 0;
};

// Parses and validates a request body. INVALID_ARGUMENT with a message fit for the provider's 400
// error when the body is not JSON or misses what the real API requires. `model` is the model
// named in the path (Gemini); empty for the others.
absl::StatusOr<ProviderRequest> ParseProviderRequest(Provider provider, absl::string_view model,
                                                     absl::string_view body);

// The answer text and why it ended.
struct Completion {
  std::string text;
  // True when max_tokens cut the text short.
  bool truncated = false;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

// "fake answer to: <last user text, at most 200 characters>", or for a JSON request
// `json_answer` (`{"ok":true}` when empty). Cut to max_tokens when the request set one.
Completion MakeCompletion(const ProviderRequest& request, const std::string& json_answer);

// Token estimate used on both sides: characters / 4, rounded up.
int64_t EstimateTokens(size_t chars);

// Pieces of `text` as a stream sends them: cut before each space, so joining them gives `text`.
std::vector<std::string> SplitIntoPieces(absl::string_view text);

// Identity of one answer: the id field and the unix time in `created`.
struct AnswerIds {
  std::string id;
  int64_t created = 0;
};

// The non-streamed answer body (JSON).
std::string CompletionBody(const ProviderRequest& request, const Completion& completion,
                           const AnswerIds& ids);

// One server-sent event, already framed (`event:` line when named, `data:` line, blank line).
struct StreamEvent {
  std::string bytes;
  // Carries a piece of the answer text (what `stream_fail_after` counts).
  bool carries_text = false;
};

// The whole stream for an answer, in order, including the provider's opening and closing events
// (OpenAI's `data: [DONE]`).
std::vector<StreamEvent> StreamEvents(const ProviderRequest& request, const Completion& completion,
                                      const AnswerIds& ids);

// Gemini's :streamGenerateContent without alt=sse: one JSON array of the chunks.
std::string GeminiChunkArray(const ProviderRequest& request, const Completion& completion);

// A stream event whose data is not JSON, in the provider's framing (for `invalid_json`).
std::string InvalidJsonEvent(Provider provider);

// The provider's error body for `status`. `kind` picks a flavour where one status has two
// ("insufficient_quota" for 429); `message` replaces the default text when not empty;
// `retry_after` (seconds, as text) goes into Gemini's message, the only place Gemini says it.
std::string ErrorBody(Provider provider, int status, absl::string_view kind,
                      absl::string_view message, absl::string_view retry_after);

// Reason phrase for a status line ("Too Many Requests"; "Overloaded" for 529).
const char* ReasonPhrase(int status);

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_FAKE_LLM_PROVIDER_WIRE_H_
