// The text-to-speech engine for OpenAI-compatible HTTP providers (OpenAI, LocalAI,
// openedai-speech, Kokoro servers): each segment is one POST {base_url}/audio/speech asking for
// raw PCM (24 kHz, signed 16-bit little-endian, mono), sent through the shared asynchronous HTTP
// client, so a segment in flight holds no thread.
#ifndef MONTAGE_SERVICES_SPEECH_HTTP_ENGINE_H_
#define MONTAGE_SERVICES_SPEECH_HTTP_ENGINE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/http/http_client.h"
#include "montage/config/v1/config.pb.h"
#include "services/speech/tts_engine.h"

namespace montage::speech {

// google.rpc.ErrorInfo domain of the upstream errors this engine reports. The reasons are the
// generation service's: PROVIDER_AUTH_FAILED and PROVIDER_QUOTA_EXHAUSTED (FAILED_PRECONDITION:
// the operator must act), PROVIDER_MODEL_NOT_FOUND (FAILED_PRECONDITION), PROVIDER_RATE_LIMITED
// (RESOURCE_EXHAUSTED), PROVIDER_REJECTED_REQUEST (INVALID_ARGUMENT), PROVIDER_UNAVAILABLE,
// PROVIDER_UNREACHABLE and PROVIDER_BAD_ANSWER (UNAVAILABLE). Metadata: {"engine": "openai"}.
inline constexpr char kSpeechErrorDomain[] = "speech.montage.dev";

// An engine for `config` (kind OPENAI) that calls out through `client`.
//
// What it does with the config: the API key (resolved once, here) goes out as
// `Authorization: Bearer`, never into a message; `headers` are added to every request; `voices`
// (OpenAI's ten when empty) are what Validate accepts, and an empty VoiceParams::voice means
// `default_voice` (else "alloy" when offered, else the first voice); `max_input_chars` (default
// 4096, counted in Unicode code points) is max_segment_chars(); `max_concurrency` defaults to 8;
// `segment_timeout` (default 120 s) bounds each segment, retries included, together with the
// caller's deadline; `retry` drives the client's retries (5xx and 429 unless the quota is used
// up); `http2_prior_knowledge` speaks h2c to a cleartext base_url.
//
// VoiceParams: `rate` is OpenAI's speed factor (0.25..4.0, default 1.0); `pitch` and `volume` are
// not supported and Validate rejects them. Segments must be plain text (supports_ssml() is
// false); text of only whitespace gives empty PCM without a request.
//
// Errors of the constructor: INVALID_ARGUMENT naming the config field (relative to the
// SpeechEngineConfig: "base_url", "model", "default_voice", ...); FAILED_PRECONDITION when the
// key cannot be read or `client` is null.
//
// Thread-safety: every method may be called from any thread, except that Shutdown (and so the
// destructor, which calls it) must not run on `client`'s loop thread, that is from inside a
// Synthesize callback: it waits for those callbacks to finish and would wait for itself. The
// SynthesisHandles it returns stay safe to use after the engine is gone.
absl::StatusOr<std::unique_ptr<TtsEngine>> NewOpenAiSpeechEngine(
    const config::v1::SpeechEngineConfig& config, std::shared_ptr<http::HttpClient> client);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_HTTP_ENGINE_H_
