// The OpenAI-compatible speech engine. A shared Core holds what the completion callbacks need
// (settings, the registry of calls in flight), so a callback never touches the engine object
// itself and Shutdown can wait for the registry to empty.
#include "services/speech/http_engine.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "common/config.h"
#include "common/http/config.h"
#include "common/proto_time.h"
#include "common/status.h"
#include "common/utf8.h"
#include "nlohmann/json.hpp"

namespace montage::speech {
namespace {

using config::v1::SpeechEngineConfig;
using json = nlohmann::json;

constexpr absl::string_view kKind = "openai";
// OpenAI's "pcm": 24 kHz, signed 16-bit little-endian, mono.
constexpr uint32_t kSampleRate = 24000;
constexpr size_t kDefaultMaxInputChars = 4096;
constexpr size_t kDefaultMaxConcurrency = 8;
constexpr absl::Duration kDefaultSegmentTimeout = absl::Seconds(120);
constexpr double kMinSpeed = 0.25;
constexpr double kMaxSpeed = 4.0;
constexpr const char* kOpenAiVoices[] = {"alloy", "ash",  "ballad", "coral", "echo",
                                         "fable", "nova", "onyx",   "sage",  "shimmer"};

size_t CountCodePoints(absl::string_view text) {
  return static_cast<size_t>(std::count_if(text.begin(), text.end(), [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

// ---------------------------------------------------------------------------------------------
// Upstream errors. The same classification as the generation service's HTTP providers
// (services/generation/providers.cc), which keeps its copy private; these belong in common/http.

// What an OpenAI-style error document says: {"error": {"message", "type", "code"}}.
struct UpstreamError {
  std::string type;
  std::string message;
};

UpstreamError ReadUpstreamError(absl::string_view body) {
  UpstreamError out;
  const json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) return out;
  auto nested = doc.find("error");
  const json& error = nested != doc.end() && nested->is_object() ? *nested : doc;
  for (const char* key : {"code", "type", "status"}) {
    auto it = error.find(key);
    if (it == error.end() || !it->is_string()) continue;
    // insufficient_quota (in `code` or `type`) decides between a retry and the operator's problem.
    if (out.type.empty() || it->get<std::string>() == "insufficient_quota") {
      out.type = it->get<std::string>();
    }
  }
  auto message = error.find("message");
  if (message != error.end() && message->is_string()) out.message = message->get<std::string>();
  return out;
}

// One line of an upstream's message. Only ever used for answers that are not about keys:
// providers quote part of a rejected key back ("Incorrect API key provided: sk-ab***").
std::string OneLine(absl::string_view text) {
  std::string out(Utf8Prefix(text, 300));
  std::replace(out.begin(), out.end(), '\n', ' ');
  std::replace(out.begin(), out.end(), '\r', ' ');
  return out;
}

bool MentionsKey(absl::string_view message) {
  return absl::StrContains(absl::AsciiStrToLower(message), "api key");
}

absl::Status UpstreamStatus(absl::StatusCode code, absl::string_view reason, std::string message) {
  absl::Status status(code, std::move(message));
  AttachErrorInfo(status, reason, kSpeechErrorDomain, {{"engine", kKind}});
  return status;
}

constexpr absl::string_view kWho = "the TTS provider (speech engine \"openai\")";

// A non-2xx answer (after the client's retries) as the Status the synthesizer acts on.
absl::Status ClassifyHttpError(const http::HttpResponse& r) {
  const UpstreamError error = ReadUpstreamError(r.body);
  if (r.status == 401 || r.status == 403 || MentionsKey(error.message)) {
    return UpstreamStatus(absl::StatusCode::kFailedPrecondition, "PROVIDER_AUTH_FAILED",
                          absl::StrCat(kWho, " rejected the configured API key (HTTP ", r.status,
                                       "); the operator must fix the key"));
  }
  if (r.status == 429 &&
      (absl::StrContains(r.body, "insufficient_quota") || absl::StrContains(r.body, "billing"))) {
    return UpstreamStatus(absl::StatusCode::kFailedPrecondition, "PROVIDER_QUOTA_EXHAUSTED",
                          absl::StrCat(kWho, " says the account's quota is used up (HTTP 429)"));
  }
  if (r.status == 429) {
    return UpstreamStatus(
        absl::StatusCode::kResourceExhausted, "PROVIDER_RATE_LIMITED",
        absl::StrCat(kWho, " is rate limiting (HTTP 429) after ", r.attempts, " attempt(s)"));
  }
  if (r.status == 404) {
    return UpstreamStatus(
        absl::StatusCode::kFailedPrecondition, "PROVIDER_MODEL_NOT_FOUND",
        absl::StrCat(kWho, " knows no such model or has no /audio/speech endpoint (HTTP 404)",
                     error.message.empty() ? "" : ": ", OneLine(error.message)));
  }
  if (r.status >= 400 && r.status < 500) {
    return UpstreamStatus(absl::StatusCode::kInvalidArgument, "PROVIDER_REJECTED_REQUEST",
                          absl::StrCat(kWho, " rejected the request (HTTP ", r.status, ")",
                                       error.message.empty() ? "" : ": ", OneLine(error.message)));
  }
  return UpstreamStatus(absl::StatusCode::kUnavailable, "PROVIDER_UNAVAILABLE",
                        absl::StrCat(kWho, " failed (HTTP ", r.status, ") after ", r.attempts,
                                     " attempt(s)", error.type.empty() ? "" : ": ", error.type));
}

absl::Status BadAnswer(absl::string_view what) {
  return UpstreamStatus(absl::StatusCode::kUnavailable, "PROVIDER_BAD_ANSWER",
                        absl::StrCat(kWho, " sent an answer montage cannot use: ", what));
}

// Content types under which a server sends raw PCM (parameters and case ignored); none at all
// is taken as PCM too, since we asked for it.
bool IsRawPcmType(absl::string_view content_type) {
  const std::string type = absl::AsciiStrToLower(
      absl::StripAsciiWhitespace(content_type.substr(0, content_type.find(';'))));
  return type.empty() || type == "audio/pcm" || type == "audio/l16" || type == "audio/raw" ||
         type == "audio/x-raw" || type == "application/octet-stream";
}

// ---------------------------------------------------------------------------------------------
// Calls

// Handle of a synthesis that already ended (or never started).
class EndedSynthesis final : public SynthesisHandle {
 public:
  void Cancel() override {}
};

// Cancel may come before the HTTP call's handle is known (Synthesize has not returned yet, or
// Shutdown raced it): it is remembered and applied on Attach.
class HttpSynthesis final : public SynthesisHandle {
 public:
  void Cancel() override { call_.Cancel(); }
  void Attach(std::shared_ptr<http::CallHandle> handle) { call_.Attach(std::move(handle)); }

 private:
  http::PendingCall call_;
};

// Shared by the engine and the completion callbacks of its calls, which may outlive the engine
// object by the few instructions after they leave the registry.
struct Core {
  // Method, URL, headers (the key among them: never logged), timeouts, retries.
  http::HttpRequest base;
  std::string model;
  std::vector<std::string> voices;
  std::string default_voice;
  size_t max_input_chars = kDefaultMaxInputChars;
  size_t max_concurrency = kDefaultMaxConcurrency;
  absl::Duration segment_timeout = kDefaultSegmentTimeout;

  absl::Mutex mu;
  bool shut_down ABSL_GUARDED_BY(mu) = false;
  uint64_t next_id ABSL_GUARDED_BY(mu) = 0;
  absl::flat_hash_map<uint64_t, std::shared_ptr<HttpSynthesis>> calls ABSL_GUARDED_BY(mu);

  bool Offers(absl::string_view voice) const {
    return std::find(voices.begin(), voices.end(), voice) != voices.end();
  }

  // The HTTP result as the engine's answer. `by_segment_timeout`: the call's deadline was
  // segment_timeout, not the caller's.
  absl::StatusOr<std::string> Answer(absl::StatusOr<http::HttpResponse> response,
                                     bool by_segment_timeout) {
    if (!response.ok()) return TransportError(response.status(), by_segment_timeout);
    if (response->status < 200 || response->status >= 300) return ClassifyHttpError(*response);
    const absl::string_view content_type =
        http::FindHeader(response->headers, "Content-Type").value_or("");
    if (!IsRawPcmType(content_type)) {
      // Typically a JSON error document sent with 200 by a proxy or a half-compatible server.
      const UpstreamError error = ReadUpstreamError(response->body);
      const bool quote = !error.message.empty() && !MentionsKey(error.message);
      return BadAnswer(absl::StrCat("HTTP ", response->status, " with Content-Type \"",
                                    OneLine(content_type), "\" instead of raw PCM audio",
                                    quote ? ": " : "", quote ? OneLine(error.message) : ""));
    }
    if (response->body.size() % 2 != 0) {
      return BadAnswer(absl::StrCat("the PCM body has an odd number of bytes (",
                                    response->body.size(), "), not whole 16-bit samples"));
    }
    return std::move(response->body);
  }

  absl::Status TransportError(const absl::Status& s, bool by_segment_timeout) {
    switch (s.code()) {
      case absl::StatusCode::kCancelled: {
        absl::MutexLock lock(&mu);
        return absl::CancelledError(shut_down ? "the speech engine \"openai\" is shutting down"
                                              : "synthesis cancelled");
      }
      case absl::StatusCode::kDeadlineExceeded:
        if (by_segment_timeout) {
          return absl::DeadlineExceededError(
              absl::StrCat(kWho, " did not answer within the engine's segment_timeout (",
                           absl::FormatDuration(segment_timeout), ")"));
        }
        return absl::DeadlineExceededError(
            absl::StrCat("the deadline passed before ", kWho, " answered"));
      case absl::StatusCode::kResourceExhausted:
        return BadAnswer(
            absl::StrCat("the audio is larger than ", base.max_response_bytes, " bytes"));
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kPermissionDenied:
        // The request itself is malformed (a bad header in the config) or not allowed.
        return absl::FailedPreconditionError(
            absl::StrCat("speech engine \"openai\" cannot call ", kWho, ": ", s.message()));
      default:
        return UpstreamStatus(absl::StatusCode::kUnavailable, "PROVIDER_UNREACHABLE",
                              absl::StrCat(kWho, " is unreachable: ", s.message()));
    }
  }

  void Forget(uint64_t id) {
    absl::MutexLock lock(&mu);
    calls.erase(id);
  }
};

class OpenAiSpeechEngine final : public TtsEngine {
 public:
  OpenAiSpeechEngine(std::shared_ptr<Core> core, std::shared_ptr<http::HttpClient> client)
      : core_(std::move(core)), client_(std::move(client)) {}
  ~OpenAiSpeechEngine() override { Shutdown(); }

  absl::string_view kind() const override { return kKind; }
  uint32_t sample_rate() const override { return kSampleRate; }
  bool supports_ssml() const override { return false; }
  size_t max_segment_chars() const override { return core_->max_input_chars; }
  size_t max_concurrency() const override { return core_->max_concurrency; }

  std::vector<VoiceInfo> Voices() const override {
    std::vector<VoiceInfo> out;
    out.reserve(core_->voices.size());
    // The providers' voices speak whatever language the text is in: no language, no gender.
    for (const std::string& name : core_->voices) out.push_back(VoiceInfo{name, "", ""});
    return out;
  }

  absl::Status Validate(const VoiceParams& voice) const override {
    if (!voice.voice.empty() && !core_->Offers(voice.voice)) {
      return InvalidFieldError("voice.voice",
                               absl::StrCat("unknown voice \"", Utf8Prefix(voice.voice, 100),
                                            "\" for engine \"openai\"; ListVoices names them"));
    }
    if (voice.rate.has_value() && !(*voice.rate >= kMinSpeed && *voice.rate <= kMaxSpeed)) {
      return InvalidFieldError(
          "voice.rate", absl::StrCat("engine \"openai\" takes a speed factor between ", kMinSpeed,
                                     " and ", kMaxSpeed, ", not ", *voice.rate));
    }
    if (voice.pitch.has_value()) {
      return InvalidFieldError("voice.pitch",
                               "engine \"openai\" does not support pitch; leave it unset");
    }
    if (voice.volume.has_value()) {
      return InvalidFieldError("voice.volume",
                               "engine \"openai\" does not support volume; leave it unset");
    }
    return absl::OkStatus();
  }

  std::shared_ptr<SynthesisHandle> Synthesize(Segment segment, absl::Time deadline,
                                              Done done) override {
    auto end_now = [&done](absl::StatusOr<std::string> result) {
      std::move(done)(std::move(result));
      return std::make_shared<EndedSynthesis>();
    };
    if (ShutDown()) return end_now(ShutDownError());
    if (absl::Status valid = Check(segment); !valid.ok()) return end_now(valid);
    if (absl::StripAsciiWhitespace(segment.text).empty()) return end_now(std::string());
    const absl::Time now = absl::Now();
    if (deadline <= now) {
      return end_now(absl::DeadlineExceededError("the deadline passed before synthesis began"));
    }

    http::HttpRequest request = core_->base;
    const json body = {
        {"model", core_->model},
        {"input", segment.text},
        {"voice", segment.voice.voice.empty() ? core_->default_voice : segment.voice.voice},
        {"response_format", "pcm"},
        {"speed", segment.voice.rate.value_or(1.0)}};
    // Invalid UTF-8 in the text is replaced, never thrown on.
    request.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
    const absl::Time segment_end = now + core_->segment_timeout;
    const bool by_segment_timeout = segment_end < deadline;
    request.deadline = std::min(deadline, segment_end);

    auto call = std::make_shared<HttpSynthesis>();
    uint64_t id = 0;
    bool shut_down;
    {
      absl::MutexLock lock(&core_->mu);
      shut_down = core_->shut_down;
      if (!shut_down) {
        id = ++core_->next_id;
        core_->calls.emplace(id, call);
      }
    }
    if (shut_down) return end_now(ShutDownError());
    // Runs on the client's loop thread. The call leaves the registry only after `done` returned,
    // which is what Shutdown waits for.
    call->Attach(client_->Send(
        std::move(request), [core = core_, id, by_segment_timeout, done = std::move(done)](
                                absl::StatusOr<http::HttpResponse> response) mutable {
          std::move(done)(core->Answer(std::move(response), by_segment_timeout));
          core->Forget(id);
        }));
    return call;
  }

  void Shutdown() override {
    std::vector<std::shared_ptr<HttpSynthesis>> running;
    {
      absl::MutexLock lock(&core_->mu);
      core_->shut_down = true;
      for (const auto& [id, call] : core_->calls) running.push_back(call);
    }
    for (const auto& call : running) call->Cancel();
    running.clear();
    absl::MutexLock lock(&core_->mu);
    core_->mu.Await(absl::Condition(&NoCalls, core_.get()));
  }

 private:
  bool ShutDown() const {
    absl::MutexLock lock(&core_->mu);
    return core_->shut_down;
  }

  static bool NoCalls(Core* core) ABSL_EXCLUSIVE_LOCKS_REQUIRED(core->mu) {
    return core->calls.empty();
  }

  static absl::Status ShutDownError() {
    return absl::CancelledError("the speech engine \"openai\" is shut down");
  }

  absl::Status Check(const Segment& segment) const {
    if (segment.ssml) {
      return absl::InvalidArgumentError(
          "engine \"openai\" does not take SSML (supports_ssml is false); send plain text");
    }
    RETURN_IF_ERROR(Validate(segment.voice));
    const size_t chars = CountCodePoints(segment.text);
    if (chars > core_->max_input_chars) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a segment of ", chars, " characters is longer than engine \"openai\" takes (",
          core_->max_input_chars, ", its max_segment_chars); cut it first"));
    }
    return absl::OkStatus();
  }

  const std::shared_ptr<Core> core_;
  const std::shared_ptr<http::HttpClient> client_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TtsEngine>> NewOpenAiSpeechEngine(
    const SpeechEngineConfig& config, std::shared_ptr<http::HttpClient> client) {
  if (config.kind() != SpeechEngineConfig::OPENAI) {
    return InvalidFieldError("kind", "must be OPENAI for the HTTP speech engine");
  }
  if (!absl::StartsWith(config.base_url(), "http://") &&
      !absl::StartsWith(config.base_url(), "https://")) {
    return InvalidFieldError("base_url",
                             "must be an http:// or https:// URL, e.g. https://api.openai.com/v1");
  }
  if (config.model().empty()) {
    return InvalidFieldError("model", "must name the TTS model, e.g. tts-1");
  }
  if (client == nullptr) {
    return absl::FailedPreconditionError("the OpenAI speech engine needs an HTTP client");
  }

  auto core = std::make_shared<Core>();
  core->model = config.model();
  if (config.voices().empty()) {
    core->voices.assign(std::begin(kOpenAiVoices), std::end(kOpenAiVoices));
  } else {
    for (const std::string& voice : config.voices()) {
      if (voice.empty()) return InvalidFieldError("voices", "names must not be empty");
      if (!core->Offers(voice)) core->voices.push_back(voice);
    }
  }
  if (!config.default_voice().empty()) {
    if (!core->Offers(config.default_voice())) {
      return InvalidFieldError(
          "default_voice", absl::StrCat("\"", config.default_voice(), "\" is not among voices (",
                                        absl::StrJoin(core->voices, ", "), ")"));
    }
    core->default_voice = config.default_voice();
  } else {
    core->default_voice = core->Offers("alloy") ? "alloy" : core->voices.front();
  }
  if (config.max_input_chars() > 0) core->max_input_chars = config.max_input_chars();
  if (config.max_concurrency() > 0) core->max_concurrency = config.max_concurrency();
  if (config.has_segment_timeout()) {
    core->segment_timeout = FromProtoDuration(config.segment_timeout());
    if (core->segment_timeout <= absl::ZeroDuration()) {
      return InvalidFieldError("segment_timeout", "must be positive");
    }
  }

  http::HttpRequest& base = core->base;
  base.method = "POST";
  base.url = absl::StrCat(absl::StripSuffix(config.base_url(), "/"), "/audio/speech");
  base.headers.emplace_back("Content-Type", "application/json");
  for (const auto& [name, value] : config.headers()) base.headers.emplace_back(name, value);
  if (config.has_api_key()) {
    absl::StatusOr<std::string> key = config::ResolveSecret(config.api_key());
    if (!key.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("api_key: ", key.status().message()));
    }
    if (!key->empty()) base.headers.emplace_back("Authorization", absl::StrCat("Bearer ", *key));
  }
  base.version = config.http2_prior_knowledge() ? http::HttpVersion::kHttp2PriorKnowledge
                                                : http::HttpVersion::kDefault;
  if (config.has_connect_timeout()) {
    base.connect_timeout = FromProtoDuration(config.connect_timeout());
  }
  base.retry = http::RetryPolicyFromConfig(config.retry());
  base.peer_label = "speech_openai";
  return std::make_unique<OpenAiSpeechEngine>(std::move(core), std::move(client));
}

}  // namespace montage::speech
