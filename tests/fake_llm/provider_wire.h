// The providers' wire formats as the fake server speaks them (OpenAI Chat Completions, Gemini
// generateContent, Anthropic Messages, and OpenAI's text-to-speech): reading a request body into
// what the answer depends on, and writing answers, stream events, audio and error bodies. Pure
// functions, no I/O, so the shapes can be checked without a socket; FakeLlmServer does the HTTP
// around them.
//
// Everything here is deterministic: the same request gives the same text and token counts, in a
// stream or not, and the same audio.
#ifndef MONTAGE_TESTS_FAKE_LLM_PROVIDER_WIRE_H_
#define MONTAGE_TESTS_FAKE_LLM_PROVIDER_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::testing {

// kOpenAiSpeech is OpenAI's POST /v1/audio/speech; the others are chat APIs.
enum class Provider { kOpenAi, kGemini, kAnthropic, kOpenAiSpeech };

// "openai", "gemini", "anthropic" or "openai_tts".
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

// Parses and validates a chat request body. INVALID_ARGUMENT with a message fit for the provider's
// 400 error when the body is not JSON or misses what the real API requires. `model` is the model
// named in the path (Gemini); empty for the others. kOpenAiSpeech is not a chat API: see
// ParseSpeechRequest.
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

// The non-streamed answer body (JSON); empty for kOpenAiSpeech.
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

// ---------------------------------------------------------------------------------------------
// OpenAI text-to-speech: POST /v1/audio/speech {model, input, voice, response_format, speed}.

// The audio the fake makes: signed 16-bit little-endian mono at this rate (OpenAI's "pcm").
inline constexpr int kSpeechSampleRate = 24000;
// Audio per character (code point) of input at speed 1.0: 1440 samples, 2880 bytes.
inline constexpr int kSpeechMillisPerChar = 60;
// OpenAI's limit on `input`, in characters (code points).
inline constexpr size_t kSpeechMaxInputChars = 4096;

struct SpeechRequest {
  std::string model;
  std::string input;
  // Any non-empty name; it picks the tone (so two voices never give the same audio).
  std::string voice;
  // "pcm" or "wav", the formats the fake makes.
  std::string response_format;
  double speed = 1.0;
};

// Parses and validates like OpenAI: model, input (1..4096 characters) and voice required;
// response_format one of mp3, opus, aac, flac, wav, pcm (default mp3, as OpenAI's), of which the
// fake makes only pcm and wav; speed 0.25..4.0 (default 1.0); `instructions` and `stream_format`
// accepted and ignored; any other field rejected. INVALID_ARGUMENT with a message for the 400.
absl::StatusOr<SpeechRequest> ParseSpeechRequest(absl::string_view body);

// Characters (code points) of UTF-8 `text`.
size_t CountCodePoints(absl::string_view text);

// Samples of the answer: 60 ms per character divided by the speed, rounded.
size_t SpeechSamples(const SpeechRequest& request);

// The raw PCM answer: SpeechSamples() samples of a tone. Each character gets its own pitch
// around a base frequency derived from the voice; the phase runs on, so there are no clicks and
// no silence.
std::string SpeechPcm(const SpeechRequest& request);

// The body in the requested format and its Content-Type: "audio/pcm" (the PCM as is) or
// "audio/wav" (the PCM after a 44-byte RIFF header).
std::string SpeechBody(const SpeechRequest& request, std::string* content_type);

// Reason phrase for a status line ("Too Many Requests"; "Overloaded" for 529).
const char* ReasonPhrase(int status);

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_FAKE_LLM_PROVIDER_WIRE_H_
