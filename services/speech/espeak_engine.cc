#include "services/speech/espeak_engine.h"

#include <espeak-ng/espeak_ng.h>
#include <espeak-ng/speak_lib.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/executor.h"

namespace montage::speech {
namespace {

// Only one engine may drive the library's global state.
std::atomic<bool> g_engine_exists{false};
// Set by Shutdown: the synthesis running now stops at its next block of samples.
std::atomic<bool> g_abort{false};

constexpr double kMinRate = 80;
constexpr double kMaxRate = 450;
constexpr int kDefaultRate = 175;
constexpr int kDefaultPitch = 50;
constexpr int kDefaultVolume = 100;

std::string StatusText(espeak_ng_STATUS status) {
  char buffer[256];
  espeak_ng_GetStatusCodeMessage(status, buffer, sizeof(buffer));
  return buffer;
}

// One queued segment. Whoever moves `state` away from kQueued owns `done`: the synthesis thread
// (kQueued → kRunning → kFinished) or Cancel (kQueued → kFinished).
struct Job {
  enum State { kQueued, kRunning, kFinished };
  Segment segment;
  absl::Time deadline;
  TtsEngine::Done done;
  std::atomic<int> state{kQueued};
  std::atomic<bool> cancelled{false};
  bool timed_out = false;  // synthesis thread only
  std::string pcm;         // synthesis thread only
};

// The job being synthesised; read by the library's callback, which runs on the synthesis thread
// inside espeak_Synth.
thread_local Job* t_current = nullptr;

int OnSamples(short* samples, int count, espeak_EVENT*) {
  Job* job = t_current;
  if (job == nullptr) return 1;
  if (samples != nullptr && count > 0) {
    // x86 and arm64 are little-endian, the order the PCM contract asks for.
    job->pcm.append(reinterpret_cast<const char*>(samples), static_cast<size_t>(count) * 2);
  }
  if (job->cancelled.load(std::memory_order_relaxed) || g_abort.load(std::memory_order_relaxed)) {
    return 1;
  }
  if (absl::Now() > job->deadline) {
    job->timed_out = true;
    return 1;
  }
  return 0;
}

class EspeakHandle final : public SynthesisHandle {
 public:
  explicit EspeakHandle(std::shared_ptr<Job> job) : job_(std::move(job)) {}
  void Cancel() override {
    std::shared_ptr<Job> job = job_.lock();
    if (job == nullptr) return;
    job->cancelled.store(true);
    int expected = Job::kQueued;
    if (job->state.compare_exchange_strong(expected, Job::kFinished)) {
      std::move(job->done)(absl::CancelledError("synthesis cancelled"));
    }
  }

 private:
  std::weak_ptr<Job> job_;
};

class EspeakEngine final : public TtsEngine {
 public:
  EspeakEngine(int sample_rate, std::vector<VoiceInfo> voices,
               absl::flat_hash_set<std::string> variants, size_t max_queue)
      : sample_rate_(static_cast<uint32_t>(sample_rate)),
        voices_(std::move(voices)),
        variants_(std::move(variants)),
        thread_(1, max_queue, "espeak") {
    for (const VoiceInfo& v : voices_) names_.insert(v.name);
  }

  // The library stays initialised for the next engine: espeak_ng_Terminate of Debian's 1.51
  // waits forever on its (unused) playback thread.
  ~EspeakEngine() override {
    Shutdown();
    g_engine_exists.store(false);
  }

  absl::string_view kind() const override { return "espeak"; }
  uint32_t sample_rate() const override { return sample_rate_; }
  bool supports_ssml() const override { return true; }
  size_t max_segment_chars() const override { return 0; }
  size_t max_concurrency() const override { return 1; }
  std::vector<VoiceInfo> Voices() const override { return voices_; }

  absl::Status Validate(const VoiceParams& voice) const override {
    if (!voice.voice.empty()) {
      const std::string lower = absl::AsciiStrToLower(voice.voice);
      const size_t plus = lower.find('+');
      const std::string base = lower.substr(0, plus);
      if (!names_.contains(base)) {
        return absl::InvalidArgumentError(
            absl::StrCat("voice.voice: espeak has no voice '", voice.voice,
                         "'; ListVoices names them (e.g. en-us, en, en-gb-x-rp, de, fr)"));
      }
      if (plus != std::string::npos && !variants_.contains(lower.substr(plus + 1))) {
        return absl::InvalidArgumentError(
            absl::StrCat("voice.voice: espeak has no variant '", voice.voice.substr(plus + 1),
                         "' (variants are m1..m7, f1..f5, croak, whisper, klatt and others)"));
      }
    }
    if (voice.rate.has_value() &&
        !(std::isfinite(*voice.rate) && *voice.rate >= kMinRate && *voice.rate <= kMaxRate)) {
      return absl::InvalidArgumentError(
          "voice.rate: espeak speaks 80..450 words per minute (175 by default)");
    }
    if (voice.pitch.has_value() && *voice.pitch > 100) {
      return absl::InvalidArgumentError("voice.pitch: must be 0..100 (50 by default)");
    }
    if (voice.volume.has_value() && *voice.volume > 200) {
      return absl::InvalidArgumentError("voice.volume: must be 0..200 percent (100 by default)");
    }
    return absl::OkStatus();
  }

  std::shared_ptr<SynthesisHandle> Synthesize(Segment segment, absl::Time deadline,
                                              Done done) override {
    auto job = std::make_shared<Job>();
    job->segment = std::move(segment);
    job->deadline = deadline;
    job->done = std::move(done);
    auto handle = std::make_shared<EspeakHandle>(job);
    if (stopping_.load()) {
      std::move(job->done)(absl::CancelledError("the espeak engine is shutting down"));
      return handle;
    }
    absl::Status scheduled = thread_.Schedule([this, job]() mutable { Run(*job); });
    if (!scheduled.ok()) {
      int expected = Job::kQueued;
      if (job->state.compare_exchange_strong(expected, Job::kFinished)) {
        if (stopping_.load() || scheduled.code() == absl::StatusCode::kFailedPrecondition) {
          std::move(job->done)(absl::CancelledError("the espeak engine is shutting down"));
        } else {
          std::move(job->done)(absl::ResourceExhaustedError(
              absl::StrCat("the espeak engine's queue is full: ", scheduled.message())));
        }
      }
    }
    return handle;
  }

  void Shutdown() override {
    stopping_.store(true);
    g_abort.store(true);
    thread_.Shutdown();
  }

 private:
  // On the synthesis thread.
  void Run(Job& job) {
    int expected = Job::kQueued;
    if (!job.state.compare_exchange_strong(expected, Job::kRunning)) return;  // cancelled
    absl::Status status = absl::OkStatus();
    if (stopping_.load()) {
      status = absl::CancelledError("the espeak engine is shutting down");
    } else if (absl::Now() > job.deadline) {
      status = absl::DeadlineExceededError("the deadline passed before synthesis started");
    } else {
      status = SynthesizeNow(job);
    }
    job.state.store(Job::kFinished);
    if (status.ok()) {
      std::move(job.done)(std::move(job.pcm));
    } else {
      std::move(job.done)(std::move(status));
    }
  }

  absl::Status SynthesizeNow(Job& job) {
    const VoiceParams& voice = job.segment.voice;
    const std::string name = voice.voice.empty() ? std::string("en-us") : voice.voice;
    if (name != current_voice_) {
      espeak_ng_STATUS s = espeak_ng_SetVoiceByName(name.c_str());
      if (s != ENS_OK) {
        current_voice_.clear();
        return absl::InvalidArgumentError(
            absl::StrCat("voice.voice: espeak cannot load '", name, "': ", StatusText(s)));
      }
      current_voice_ = name;
    }
    // The library keeps parameters between calls: set every one, defaults included.
    espeak_SetParameter(
        espeakRATE,
        voice.rate.has_value() ? static_cast<int>(std::lround(*voice.rate)) : kDefaultRate, 0);
    espeak_SetParameter(
        espeakPITCH, voice.pitch.has_value() ? static_cast<int>(*voice.pitch) : kDefaultPitch, 0);
    espeak_SetParameter(espeakVOLUME,
                        voice.volume.has_value() ? static_cast<int>(*voice.volume) : kDefaultVolume,
                        0);
    unsigned int flags = espeakCHARS_UTF8 | espeakENDPAUSE;
    if (job.segment.ssml) flags |= espeakSSML;
    // About 57 ms of audio per character on average; reserving for 73 ms spares most segments a
    // reallocation (and a copy of what they have so far) halfway through.
    job.pcm.reserve(job.segment.text.size() * 3200);
    t_current = &job;
    espeak_ERROR err = espeak_Synth(job.segment.text.c_str(), job.segment.text.size() + 1, 0,
                                    POS_CHARACTER, 0, flags, nullptr, nullptr);
    t_current = nullptr;
    if (job.cancelled.load()) return absl::CancelledError("synthesis cancelled");
    if (g_abort.load()) return absl::CancelledError("the espeak engine is shutting down");
    if (job.timed_out) return absl::DeadlineExceededError("the deadline passed during synthesis");
    if (err != EE_OK) {
      return absl::InternalError(absl::StrCat("espeak-ng failed to synthesise (error ", err, ")"));
    }
    return absl::OkStatus();
  }

  const uint32_t sample_rate_;
  const std::vector<VoiceInfo> voices_;
  const absl::flat_hash_set<std::string> variants_;
  absl::flat_hash_set<std::string> names_;
  std::atomic<bool> stopping_{false};
  std::string current_voice_;  // synthesis thread only
  ThreadPool thread_;          // last: joined first
};

std::string Gender(unsigned char gender) {
  switch (gender) {
    case ENGENDER_MALE:
      return "male";
    case ENGENDER_FEMALE:
      return "female";
    default:
      return "";
  }
}

// The first language of a voice: `languages` is a list of (priority byte, name, NUL), ended by
// an empty name.
std::string FirstLanguage(const char* languages) {
  if (languages == nullptr || languages[0] == '\0') return "";
  return absl::AsciiStrToLower(languages + 1);
}

// The last component of a voice file's path, lower case ("gmw/en-US" → "en-us").
std::string FileName(const char* identifier) {
  if (identifier == nullptr) return "";
  absl::string_view id(identifier);
  const size_t slash = id.rfind('/');
  if (slash != absl::string_view::npos) id.remove_prefix(slash + 1);
  return absl::AsciiStrToLower(id);
}

}  // namespace

absl::StatusOr<std::unique_ptr<TtsEngine>> NewEspeakEngine(const EspeakOptions& options) {
  bool expected = false;
  if (!g_engine_exists.compare_exchange_strong(expected, true)) {
    return absl::FailedPreconditionError(
        "an espeak engine already exists in this process (libespeak-ng is global)");
  }
  // Initialised once per process (see ~EspeakEngine); a later engine keeps the first data path.
  static espeak_ng_STATUS init_status = [&options]() {
    espeak_ng_InitializePath(options.data_path.empty() ? nullptr : options.data_path.c_str());
    espeak_ng_ERROR_CONTEXT context = nullptr;
    espeak_ng_STATUS status = espeak_ng_Initialize(&context);
    espeak_ng_ClearErrorContext(&context);
    if (status == ENS_OK) {
      status = espeak_ng_InitializeOutput(ENOUTPUT_MODE_SYNCHRONOUS, 0, nullptr);
    }
    return status;
  }();
  if (init_status != ENS_OK) {
    g_engine_exists.store(false);
    return absl::FailedPreconditionError(absl::StrCat(
        "espeak-ng cannot start (", StatusText(init_status),
        "); is espeak-ng-data installed? speech.engines.<name>.data_path names its folder"));
  }
  espeak_SetSynthCallback(&OnSamples);
  g_abort.store(false);

  // A voice is named by its file (espeak_ng_SetVoiceByName matches names and files, not
  // languages: "en-gb" is not a name, "en" is the voice for en-gb).
  std::vector<VoiceInfo> voices;
  absl::flat_hash_set<std::string> seen;
  for (const espeak_VOICE** v = espeak_ListVoices(nullptr); v != nullptr && *v != nullptr; ++v) {
    std::string name = FileName((*v)->identifier);
    if (name.empty() || !seen.insert(name).second) continue;
    voices.push_back(VoiceInfo{name, FirstLanguage((*v)->languages), Gender((*v)->gender)});
  }
  absl::flat_hash_set<std::string> variants;
  espeak_VOICE variant_spec{};
  variant_spec.languages = "variant";
  for (const espeak_VOICE** v = espeak_ListVoices(&variant_spec); v != nullptr && *v != nullptr;
       ++v) {
    std::string name = FileName((*v)->identifier);
    if (!name.empty()) variants.insert(std::move(name));
  }
  return std::make_unique<EspeakEngine>(espeak_ng_GetSampleRate(), std::move(voices),
                                        std::move(variants), options.max_queue);
}

}  // namespace montage::speech
