// The speech engine room (no gRPC in here): validates a request, splits its text into segments,
// fetches each segment's PCM from the segment cache or synthesises it (identical segments in
// flight at once are synthesised once), and encodes the segments in order into one gap-free
// file of the chosen format.
//
// A job keeps at most `window` segments ahead of what its sink has taken: synthesis stops while
// a slow stream reader catches up, so memory per job stays bounded whatever the text's length.
// Encoding runs on the CPU executor, one task at a time per job; engines report on their own
// threads. No caller thread ever waits.
#ifndef MONTAGE_SERVICES_SPEECH_SYNTHESIZER_H_
#define MONTAGE_SERVICES_SPEECH_SYNTHESIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/executor.h"
#include "montage/config/v1/config.pb.h"
#include "montage/speech/v1/speech.pb.h"
#include "services/cache/cache_client.h"
#include "services/speech/audio_encoder.h"
#include "services/speech/tts_engine.h"

namespace montage::speech {

struct SynthesizerMetrics;
struct SegmentFlight;
class Job;

// One segment of the output and the silence after it.
struct PlannedSegment {
  Segment segment;
  absl::Duration pause_after;
  std::string cache_key;  // filled by the synthesizer
};

// What a request asks for, validated: the engine, the segments in order, the encoding.
struct Plan {
  std::string engine_name;
  TtsEngine* engine = nullptr;
  std::vector<PlannedSegment> segments;
  AudioFormat format = AudioFormat::kMp3;
  uint32_t sample_rate = 0;  // output rate
  absl::Time deadline = absl::InfiniteFuture();
};

// How a job's output leaves it. Calls come one at a time (never concurrently), on executor or
// engine threads.
class SynthesisSink {
 public:
  virtual ~SynthesisSink() = default;
  enum class Action {
    kContinue,  // send more at once
    kPause,     // a slow reader: no more until SynthesisJob::Resume
    kStop,      // give up: the job ends (OnDone with CANCELLED) and its synthesis is aborted
  };
  // The next encoded bytes, in order.
  virtual Action OnAudio(std::string bytes) = 0;
  struct Summary {
    absl::Duration duration;
    uint32_t segments = 0;
    uint32_t segments_from_cache = 0;
  };
  // Exactly once, last: the job's outcome.
  virtual void OnDone(absl::StatusOr<Summary> result) = 0;
};

// A running job. Thread-safe.
class SynthesisJob {
 public:
  virtual ~SynthesisJob() = default;
  // The caller went away: synthesis in flight that no other job shares is aborted, and OnDone
  // runs with CANCELLED (unless it already ran). Idempotent.
  virtual void Cancel() = 0;
  // After OnAudio returned kPause: the sink can take more.
  virtual void Resume() = 0;
};

class Synthesizer {
 public:
  // `engines` by name (config.engines' keys); `executor` (not owned) runs encoding and must
  // outlive the synthesizer.
  static absl::StatusOr<std::unique_ptr<Synthesizer>> Create(
      const config::v1::SpeechConfig& config,
      absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines,
      std::unique_ptr<cache::CacheClient> cache, Executor& executor);
  // Calls Shutdown().
  ~Synthesizer();

  // Jobs still running end with CANCELLED, engines stop, the cache's calls are cancelled and
  // waited for. Idempotent.
  void Shutdown();

  // INVALID_ARGUMENT with a BadRequest naming the field for bad input (empty or too long text,
  // malformed SSML, unknown engine or voice, unsupported format or sample rate). `streaming`
  // rejects formats that can only be sent whole (WAV, AAC).
  absl::StatusOr<Plan> PlanText(const v1::SynthesizeRequest& request, absl::Time deadline,
                                bool streaming) const;
  absl::StatusOr<Plan> PlanDialogue(const v1::SynthesizeDialogueRequest& request,
                                    absl::Time deadline) const;

  // Starts a job; the sink (shared with the job) hears everything. `window` is how many segments
  // may be ahead of the sink (0: the configured stream window).
  std::shared_ptr<SynthesisJob> Start(Plan plan, std::shared_ptr<SynthesisSink> sink,
                                      size_t window = 0);

  // Voices of one engine (empty name: every engine), filtered by language prefix.
  absl::StatusOr<std::vector<v1::Voice>> ListVoices(absl::string_view engine,
                                                    absl::string_view language) const;

  // Segments the engines were asked to synthesise (not served by the cache or a shared flight).
  uint64_t engine_calls() const;

  // A segment's PCM (never null; shared with the in-process cache and every job that waited for
  // the same segment), and whether it came from the cache.
  using SegmentDone = absl::AnyInvocable<void(absl::StatusOr<cache::Value> pcm, bool cached) &&>;
  // Where CPU work runs (planning, encoding): the service's bounded executor.
  Executor& executor() const { return executor_; }
  const config::v1::SpeechConfig& config() const { return config_; }

 private:
  friend class Job;
  Synthesizer(const config::v1::SpeechConfig& config,
              absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines,
              std::unique_ptr<cache::CacheClient> cache, Executor& executor);

  absl::StatusOr<std::pair<std::string, TtsEngine*>> FindEngine(absl::string_view name) const;
  absl::Status AddText(const std::string& text, bool ssml, const VoiceParams& voice,
                       TtsEngine& engine, absl::string_view field,
                       std::vector<PlannedSegment>& out) const;
  absl::Status PlanOutput(AudioFormat format, uint32_t sample_rate, TtsEngine& engine,
                          bool streaming, Plan& plan) const;
  void FillKeys(Plan& plan) const;

  // Gets one segment's PCM: from the cache, a flight already running, or the engine. `done`
  // runs once on any thread, unless the returned function (leave) ran first.
  absl::AnyInvocable<void()> FetchSegment(const std::string& engine_name, TtsEngine& engine,
                                          const PlannedSegment& segment, absl::Time deadline,
                                          SegmentDone done);
  void FinishFlight(const std::shared_ptr<SegmentFlight>& flight, const std::string& key,
                    absl::StatusOr<std::string> synthesized);
  void Unregister(Job* job);

  const config::v1::SpeechConfig config_;
  absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines_;
  std::shared_ptr<cache::CacheClient> cache_;
  Executor& executor_;
  std::unique_ptr<SynthesizerMetrics> metrics_;

  mutable absl::Mutex mu_;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_waiter_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t engine_calls_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, std::shared_ptr<SegmentFlight>> flights_ ABSL_GUARDED_BY(mu_);
  // Running jobs, kept alive here until they end (callers may drop their handle).
  absl::flat_hash_map<Job*, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_SYNTHESIZER_H_
