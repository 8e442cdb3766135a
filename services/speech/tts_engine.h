// A text-to-speech engine: one segment of text (a sentence or a few) in, PCM out. The engines
// know nothing of gRPC, segmentation, caching or encoding; the synthesizer (synthesizer.h) does
// those. Engines are asynchronous: Synthesize returns at once and reports through a callback, so
// no gRPC thread waits on synthesis.
#ifndef MONTAGE_SERVICES_SPEECH_TTS_ENGINE_H_
#define MONTAGE_SERVICES_SPEECH_TTS_ENGINE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace montage::speech {

// How a voice should sound. Unset fields take the engine's defaults.
struct VoiceParams {
  // A name from Voices(); empty means the engine's default voice.
  std::string voice;
  // espeak: words per minute (80..450); HTTP providers: a speed factor (0.25..4.0).
  std::optional<double> rate;
  // 0..100 (espeak only).
  std::optional<uint32_t> pitch;
  // 0..200 percent (espeak only).
  std::optional<uint32_t> volume;
};

struct VoiceInfo {
  std::string name;
  std::string language;
  // "male", "female" or empty.
  std::string gender;
};

// One piece of text to speak: plain text, or a whole SSML document (<speak>…</speak>).
struct Segment {
  std::string text;
  bool ssml = false;
  VoiceParams voice;
};

// A synthesis in progress. Cancel is idempotent and thread-safe; the callback then runs with
// CANCELLED unless it already ran. Queued work is dropped, running HTTP transfers are aborted.
class SynthesisHandle {
 public:
  virtual ~SynthesisHandle() = default;
  virtual void Cancel() = 0;
};

class TtsEngine {
 public:
  // Signed 16-bit little-endian mono samples at sample_rate().
  using Done = absl::AnyInvocable<void(absl::StatusOr<std::string> pcm) &&>;

  virtual ~TtsEngine() = default;

  // "espeak" or "openai": the kind, for metrics and cache keys.
  virtual absl::string_view kind() const = 0;
  // The rate of the PCM this engine returns.
  virtual uint32_t sample_rate() const = 0;
  virtual bool supports_ssml() const = 0;
  // Longest segment text the engine takes in one call (characters); 0: no limit of its own.
  virtual size_t max_segment_chars() const = 0;
  // Segments worth running at once.
  virtual size_t max_concurrency() const = 0;
  virtual std::vector<VoiceInfo> Voices() const = 0;
  // INVALID_ARGUMENT naming the field ("voice.voice", "voice.rate", "voice.pitch",
  // "voice.volume") when this engine cannot honour `voice`.
  virtual absl::Status Validate(const VoiceParams& voice) const = 0;

  // Speaks one segment. `done` runs exactly once, on any thread (possibly before Synthesize
  // returns). Passing `deadline` ends the call with DEADLINE_EXCEEDED. Errors: INVALID_ARGUMENT
  // for text the engine rejects, UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED for an
  // upstream that failed, FAILED_PRECONDITION (with google.rpc.ErrorInfo) for a rejected key,
  // CANCELLED after Cancel or Shutdown.
  virtual std::shared_ptr<SynthesisHandle> Synthesize(Segment segment, absl::Time deadline,
                                                      Done done) = 0;

  // Queued and running work ends with CANCELLED; returns when no callback is running or will
  // run. Later calls fail at once with CANCELLED. Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_TTS_ENGINE_H_
