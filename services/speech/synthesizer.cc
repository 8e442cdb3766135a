#include "services/speech/synthesizer.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/proto_time.h"
#include "common/sha256.h"
#include "common/status.h"
#include "common/telemetry/metrics.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "services/speech/segmenter.h"

namespace montage::speech {

struct SynthesizerMetrics {
  explicit SynthesizerMetrics(prometheus::Registry& r)
      : segments(prometheus::BuildCounter()
                     .Name("montage_speech_segments_total")
                     .Help("Segments by engine and where their audio came from (engine, cache, "
                           "shared: joined an identical synthesis in flight)")
                     .Register(r)),
        cache(prometheus::BuildCounter()
                  .Name("montage_speech_cache_requests_total")
                  .Help("Segment cache lookups by result (hit, miss, unavailable)")
                  .Register(r)),
        engine_seconds(prometheus::BuildHistogram()
                           .Name("montage_speech_engine_duration_seconds")
                           .Help("Time an engine took for one segment, queueing included")
                           .Register(r)),
        engine_errors(prometheus::BuildCounter()
                          .Name("montage_speech_engine_errors_total")
                          .Help("Engine calls that failed, by engine and code")
                          .Register(r)),
        audio_seconds(prometheus::BuildCounter()
                          .Name("montage_speech_audio_seconds_total")
                          .Help("Seconds of audio produced, by engine")
                          .Register(r)) {}

  static const prometheus::Histogram::BucketBoundaries& Buckets() {
    static const auto* b = new prometheus::Histogram::BucketBoundaries{
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    return *b;
  }

  prometheus::Family<prometheus::Counter>& segments;
  prometheus::Family<prometheus::Counter>& cache;
  prometheus::Family<prometheus::Histogram>& engine_seconds;
  prometheus::Family<prometheus::Counter>& engine_errors;
  prometheus::Family<prometheus::Counter>& audio_seconds;
};

// One engine call shared by every job that wants the same segment.
struct SegmentFlight {
  std::string engine;
  std::shared_ptr<SynthesisHandle> handle;
  absl::flat_hash_map<uint64_t, Synthesizer::SegmentDone> waiters;
  // Every waiter left: the call is (being) cancelled and the flight is out of the table.
  bool abandoned = false;
  absl::Time started;
};

namespace {

constexpr absl::Duration kMaxPause = absl::Seconds(10);

// An engine's Validate answers "field: what is wrong"; turn it into a BadRequest naming the field
// under `prefix` (e.g. "voices[host]").
absl::Status AsFieldError(const absl::Status& status, absl::string_view prefix) {
  if (status.ok() || status.code() != absl::StatusCode::kInvalidArgument) return status;
  absl::string_view message = status.message();
  const size_t colon = message.find(": ");
  if (colon == absl::string_view::npos) return InvalidFieldError(prefix, message);
  absl::string_view field = message.substr(0, colon);
  if (!prefix.empty()) {
    // "voice.rate" under "voices[host]" reads "voices[host].rate".
    absl::ConsumePrefix(&field, "voice.");
    return InvalidFieldError(absl::StrCat(prefix, ".", field), message.substr(colon + 2));
  }
  return InvalidFieldError(field, message.substr(colon + 2));
}

VoiceParams ToVoiceParams(const v1::VoiceSettings& settings) {
  VoiceParams voice;
  voice.voice = settings.voice();
  if (settings.has_rate()) voice.rate = settings.rate();
  if (settings.has_pitch()) voice.pitch = settings.pitch();
  if (settings.has_volume()) voice.volume = settings.volume();
  return voice;
}

absl::StatusOr<AudioFormat> ToFormat(v1::AudioFormat format) {
  switch (format) {
    case v1::AUDIO_FORMAT_UNSPECIFIED:
    case v1::MP3:
      return AudioFormat::kMp3;
    case v1::WAV:
      return AudioFormat::kWav;
    case v1::PCM:
      return AudioFormat::kPcm;
    case v1::OGG_OPUS:
      return AudioFormat::kOggOpus;
    case v1::AAC:
      return AudioFormat::kAac;
    default:
      return InvalidFieldError("format",
                               absl::StrCat("unknown audio format ", static_cast<int>(format),
                                            "; use WAV, PCM, MP3, OGG_OPUS or AAC"));
  }
}

// Voices given to dialogue speakers the request leaves without one, in order of appearance.
std::vector<std::string> DefaultDialogueVoices(absl::string_view engine_kind) {
  if (engine_kind == "espeak") return {"en-us+m3", "en-us+f3", "en-gb-x-rp+m1", "en-gb-x-rp+f2"};
  return {"onyx", "nova", "echo", "shimmer"};
}

std::string FormatOptional(const std::optional<double>& v) {
  return v.has_value() ? absl::StrCat(*v) : "";
}
std::string FormatOptional(const std::optional<uint32_t>& v) {
  return v.has_value() ? absl::StrCat(*v) : "";
}

}  // namespace

// A running job: see SynthesisJob. Slots hold each segment's state; `next_encode_` is the first
// segment the encoder has not taken, and fetches run at most `window_` segments beyond it. Every
// call into the sink happens inside a "step" on the executor, and at most one step runs at a time
// (`stepping_`), which keeps the sink's calls ordered and never concurrent.
class Job final : public SynthesisJob, public std::enable_shared_from_this<Job> {
 public:
  Job(Synthesizer& synthesizer, Plan plan, std::shared_ptr<SynthesisSink> sink, size_t window)
      : synthesizer_(synthesizer),
        plan_(std::move(plan)),
        sink_(std::move(sink)),
        window_(std::max<size_t>(window, 1)),
        slots_(plan_.segments.size()) {}

  void Begin() {
    EncoderOptions options;
    options.format = plan_.format;
    options.input_rate = plan_.engine->sample_rate();
    options.output_rate = plan_.sample_rate;
    absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder = AudioEncoder::Create(options);
    if (!encoder.ok()) {
      Fail(encoder.status());
      return;
    }
    encoder_ = *std::move(encoder);
    Advance();
  }

  void Cancel() override { Fail(absl::CancelledError("the synthesis was cancelled")); }

  void Resume() override {
    {
      absl::MutexLock lock(&mu_);
      paused_ = false;
      ++resumes_;
    }
    Advance();
  }

 private:
  struct Slot {
    bool started = false;
    bool ready = false;
    bool cached = false;
    cache::Value pcm;
    absl::AnyInvocable<void()> leave;  // leaves the segment's fetch while it runs
  };

  // Starts what may start: fetches inside the window, and a step when there is work for it.
  void Advance() {
    std::vector<size_t> to_fetch;
    bool step = false;
    {
      absl::MutexLock lock(&mu_);
      if (!failure_.ok() && !stepping_ && !done_) {
        stepping_ = step = true;
      } else if (failure_.ok()) {
        const size_t limit = std::min(slots_.size(), next_encode_ + window_);
        for (; next_fetch_ < limit; ++next_fetch_) {
          slots_[next_fetch_].started = true;
          to_fetch.push_back(next_fetch_);
        }
        const bool ready = next_encode_ < slots_.size() && slots_[next_encode_].ready;
        const bool finishing = next_encode_ == slots_.size();
        if (!stepping_ && !done_ && !paused_ && (ready || finishing)) stepping_ = step = true;
      }
    }
    for (size_t i : to_fetch) Fetch(i);
    if (step) ScheduleStep();
  }

  void Fetch(size_t i) {
    std::weak_ptr<Job> weak = weak_from_this();
    absl::AnyInvocable<void()> leave = synthesizer_.FetchSegment(
        plan_.engine_name, *plan_.engine, plan_.segments[i], plan_.deadline,
        [weak, i](absl::StatusOr<cache::Value> pcm, bool cached) {
          if (std::shared_ptr<Job> job = weak.lock()) job->OnSegment(i, std::move(pcm), cached);
        });
    {
      absl::MutexLock lock(&mu_);
      if (slots_[i].ready) return;  // answered already (a cache hit)
      if (failure_.ok()) {
        slots_[i].leave = std::move(leave);
        return;
      }
    }
    leave();  // the job failed meanwhile
  }

  void OnSegment(size_t i, absl::StatusOr<cache::Value> pcm, bool cached) {
    if (!pcm.ok()) {
      Fail(pcm.status());
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      Slot& slot = slots_[i];
      slot.ready = true;
      slot.cached = cached;
      slot.pcm = *std::move(pcm);
      slot.leave = nullptr;
    }
    Advance();
  }

  void Fail(absl::Status status) {
    {
      absl::MutexLock lock(&mu_);
      if (!failure_.ok() || done_) return;
      failure_ = std::move(status);
    }
    LeaveFetches();
    Advance();
  }

  // After a failure: the fetches still running are left (a flight nobody else waits for is
  // cancelled) and the PCM kept so far is dropped.
  void LeaveFetches() {
    std::vector<absl::AnyInvocable<void()>> leaves;
    {
      absl::MutexLock lock(&mu_);
      for (Slot& slot : slots_) {
        if (slot.leave) leaves.push_back(std::move(slot.leave));
        slot.leave = nullptr;
        slot.pcm.reset();
      }
    }
    for (auto& leave : leaves) leave();
  }

 public:
  // Start on a synthesizer that shut down: the job ends before it begins.
  void Refuse(absl::Status status) {
    {
      absl::MutexLock lock(&mu_);
      failure_ = status;
      done_ = true;
    }
    sink_->OnDone(std::move(status));
  }

 private:
  void ScheduleStep() {
    std::shared_ptr<Job> self = shared_from_this();
    absl::Status scheduled = synthesizer_.executor_.Schedule([self]() { self->Step(); });
    if (!scheduled.ok()) {
      // The executor is saturated or stopping: end here, on this thread (no step is running).
      {
        absl::MutexLock lock(&mu_);
        if (failure_.ok()) {
          failure_ = absl::UnavailableError(
              absl::StrCat("the speech service is overloaded: ", scheduled.message()));
        }
      }
      LeaveFetches();
      Step();
    }
  }

  // One step: encode the ready segments in order (about kStepBytes of PCM at most, so that the
  // first bytes go out while later ones are encoded: a script whose segments all come from the
  // cache would otherwise be one 11 MB write after one 11 MB copy), hand the bytes to the sink,
  // finish when all are encoded, or report the failure.
  static constexpr size_t kStepBytes = 512 << 10;
  void Step() {
    std::vector<std::pair<cache::Value, absl::Duration>> batch;
    absl::Status failure;
    bool finishing = false;
    uint64_t resumes = 0;
    {
      absl::MutexLock lock(&mu_);
      failure = failure_;
      resumes = resumes_;
      if (failure.ok()) {
        size_t batch_bytes = 0;
        while (next_encode_ < slots_.size() && slots_[next_encode_].ready &&
               (batch.empty() || batch_bytes < kStepBytes)) {
          Slot& slot = slots_[next_encode_];
          batch_bytes += slot.pcm->size() + SilenceBytes(plan_.segments[next_encode_].pause_after);
          batch.emplace_back(std::move(slot.pcm), plan_.segments[next_encode_].pause_after);
          ++summary_.segments;
          if (slot.cached) ++summary_.segments_from_cache;
          ++next_encode_;
        }
        finishing = next_encode_ == slots_.size();
      }
    }
    SynthesisSink::Action action = SynthesisSink::Action::kContinue;
    if (failure.ok()) {
      absl::Status encoded = Encode(batch, finishing);
      if (!encoded.ok()) {
        failure = encoded;
      } else {
        std::string bytes = encoder_->Take();
        if (!bytes.empty()) action = sink_->OnAudio(std::move(bytes));
        if (action == SynthesisSink::Action::kStop) {
          failure = absl::CancelledError("the synthesis was stopped by its reader");
        }
      }
    }
    if (!failure.ok() || finishing) {
      {
        absl::MutexLock lock(&mu_);
        done_ = true;
        stepping_ = false;
        if (failure.ok()) failure = failure_;  // cancelled while the last bytes went out
      }
      if (failure.ok()) {
        summary_.duration = encoder_->duration();
        synthesizer_.metrics_->audio_seconds.Add({{"engine", plan_.engine_name}})
            .Increment(absl::ToDoubleSeconds(summary_.duration));
        sink_->OnDone(summary_);
      } else {
        sink_->OnDone(failure);
      }
      synthesizer_.Unregister(this);
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      stepping_ = false;
      // A Resume that came while the sink was being called wins over its kPause.
      if (action == SynthesisSink::Action::kPause && resumes_ == resumes) paused_ = true;
    }
    Advance();
  }

  // 16-bit mono PCM of `pause` at the engine's rate.
  size_t SilenceBytes(absl::Duration pause) const {
    if (pause <= absl::ZeroDuration()) return 0;
    return 2 * static_cast<size_t>(
                   std::llround(absl::ToDoubleSeconds(pause) * plan_.engine->sample_rate()));
  }

  absl::Status Encode(std::vector<std::pair<cache::Value, absl::Duration>>& batch, bool finishing) {
    for (auto& [pcm, pause] : batch) {
      RETURN_IF_ERROR(encoder_->Write(*pcm));
      pcm.reset();
      if (pause > absl::ZeroDuration()) {
        RETURN_IF_ERROR(encoder_->Write(std::string(SilenceBytes(pause), '\0')));
      }
    }
    if (finishing) RETURN_IF_ERROR(encoder_->Finish());
    return absl::OkStatus();
  }

  Synthesizer& synthesizer_;
  const Plan plan_;
  const std::shared_ptr<SynthesisSink> sink_;
  const size_t window_;
  std::unique_ptr<AudioEncoder> encoder_;  // steps only
  SynthesisSink::Summary summary_;         // steps only

  absl::Mutex mu_;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  size_t next_fetch_ ABSL_GUARDED_BY(mu_) = 0;
  size_t next_encode_ ABSL_GUARDED_BY(mu_) = 0;
  bool stepping_ ABSL_GUARDED_BY(mu_) = false;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t resumes_ ABSL_GUARDED_BY(mu_) = 0;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

Synthesizer::Synthesizer(const config::v1::SpeechConfig& config,
                         absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines,
                         std::unique_ptr<cache::CacheClient> cache, Executor& executor)
    : config_(config),
      engines_(std::move(engines)),
      cache_(std::move(cache)),
      executor_(executor),
      metrics_(std::make_unique<SynthesizerMetrics>(telemetry::MetricsRegistry())) {}

absl::StatusOr<std::unique_ptr<Synthesizer>> Synthesizer::Create(
    const config::v1::SpeechConfig& config,
    absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines,
    std::unique_ptr<cache::CacheClient> cache, Executor& executor) {
  if (engines.empty()) return absl::InvalidArgumentError("speech.engines: none configured");
  if (!engines.contains(config.default_engine())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "speech.default_engine: '", config.default_engine(), "' is not a configured engine"));
  }
  if (cache == nullptr) return absl::InvalidArgumentError("speech: a segment cache is required");
  return std::unique_ptr<Synthesizer>(
      new Synthesizer(config, std::move(engines), std::move(cache), executor));
}

Synthesizer::~Synthesizer() { Shutdown(); }

void Synthesizer::Shutdown() {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    for (auto& [raw, job] : jobs_) jobs.push_back(job);
  }
  for (auto& job : jobs) job->Cancel();
  jobs.clear();
  for (auto& [name, engine] : engines_) engine->Shutdown();
  cache_->Close();
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return jobs_.empty(); };
  mu_.Await(absl::Condition(&idle));
}

void Synthesizer::Unregister(Job* job) {
  std::shared_ptr<Job> last;  // released outside the lock
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job);
  if (it == jobs_.end()) return;
  last = std::move(it->second);
  jobs_.erase(it);
}

absl::StatusOr<std::pair<std::string, TtsEngine*>> Synthesizer::FindEngine(
    absl::string_view name) const {
  const std::string wanted = name.empty() ? config_.default_engine() : std::string(name);
  auto it = engines_.find(wanted);
  if (it == engines_.end()) {
    std::vector<std::string> names;
    for (const auto& [n, e] : engines_) names.push_back(n);
    std::sort(names.begin(), names.end());
    return InvalidFieldError("engine", absl::StrCat("unknown engine '", name,
                                                    "'; configured: ", absl::StrJoin(names, ", ")));
  }
  return std::make_pair(it->first, it->second.get());
}

absl::Status Synthesizer::AddText(const std::string& text, bool ssml, const VoiceParams& voice,
                                  TtsEngine& engine, absl::string_view field,
                                  std::vector<PlannedSegment>& out) const {
  SegmenterOptions options;
  options.max_chars = config_.max_segment_chars();
  if (engine.max_segment_chars() > 0) {
    options.max_chars = std::min<size_t>(options.max_chars, engine.max_segment_chars());
  }
  absl::StatusOr<std::vector<SegmentText>> pieces =
      ssml ? SplitSsml(text, options) : SplitPlainText(text, options);
  if (!pieces.ok()) {
    absl::string_view message = pieces.status().message();
    absl::ConsumePrefix(&message, "text: ");
    return InvalidFieldError(field, message);
  }
  if (pieces->empty()) return InvalidFieldError(field, "has nothing to say");
  for (SegmentText& piece : *pieces) {
    PlannedSegment segment;
    segment.segment.text = std::move(piece.text);
    segment.segment.ssml = ssml;
    segment.segment.voice = voice;
    // espeak ends every segment with a sentence pause; a paragraph gets a little more.
    segment.pause_after = piece.paragraph_end ? absl::Milliseconds(250) : absl::ZeroDuration();
    out.push_back(std::move(segment));
  }
  return absl::OkStatus();
}

absl::Status Synthesizer::PlanOutput(AudioFormat format, uint32_t sample_rate, TtsEngine& engine,
                                     bool streaming, Plan& plan) const {
  if (streaming && !IsStreamable(format)) {
    return InvalidFieldError("format",
                             "WAV and AAC can only be sent whole: use Synthesize, or stream PCM, "
                             "MP3 or OGG_OPUS");
  }
  const uint32_t rate =
      sample_rate == 0 ? DefaultSampleRate(format, engine.sample_rate()) : sample_rate;
  RETURN_IF_ERROR(CheckSampleRate(format, rate, "sample_rate"));
  plan.format = format;
  plan.sample_rate = rate;
  return absl::OkStatus();
}

void Synthesizer::FillKeys(Plan& plan) const {
  for (PlannedSegment& s : plan.segments) {
    const VoiceParams& v = s.segment.voice;
    const std::string keyed =
        absl::StrJoin({plan.engine_name, std::string(plan.engine->kind()),
                       absl::StrCat(plan.engine->sample_rate()), v.voice, FormatOptional(v.rate),
                       FormatOptional(v.pitch), FormatOptional(v.volume),
                       std::string(s.segment.ssml ? "ssml" : "text"), s.segment.text},
                      absl::string_view("\0", 1));
    s.cache_key = absl::StrCat("seg1:", Sha256Hex(keyed));
  }
}

absl::StatusOr<Plan> Synthesizer::PlanText(const v1::SynthesizeRequest& request,
                                           absl::Time deadline, bool streaming) const {
  if (absl::StripAsciiWhitespace(request.text()).empty()) {
    return InvalidFieldError("text", "must not be empty");
  }
  if (request.text().size() > config_.max_text_bytes()) {
    return InvalidFieldError("text",
                             absl::StrCat("is ", request.text().size(), " bytes; the limit is ",
                                          config_.max_text_bytes(), " (speech.max_text_bytes)"));
  }
  Plan plan;
  ASSIGN_OR_RETURN(auto engine, FindEngine(request.engine()));
  plan.engine_name = engine.first;
  plan.engine = engine.second;
  plan.deadline = deadline;
  if (request.ssml() && !plan.engine->supports_ssml()) {
    return InvalidFieldError("ssml",
                             absl::StrCat("engine '", plan.engine_name, "' takes plain text only"));
  }
  const VoiceParams voice = ToVoiceParams(request.voice());
  RETURN_IF_ERROR(AsFieldError(plan.engine->Validate(voice), ""));
  ASSIGN_OR_RETURN(AudioFormat format, ToFormat(request.format()));
  RETURN_IF_ERROR(PlanOutput(format, request.sample_rate(), *plan.engine, streaming, plan));
  RETURN_IF_ERROR(
      AddText(request.text(), request.ssml(), voice, *plan.engine, "text", plan.segments));
  FillKeys(plan);
  return plan;
}

absl::StatusOr<Plan> Synthesizer::PlanDialogue(const v1::SynthesizeDialogueRequest& request,
                                               absl::Time deadline) const {
  if (request.lines().empty()) return InvalidFieldError("lines", "must not be empty");
  if (static_cast<uint32_t>(request.lines_size()) > config_.max_dialogue_lines()) {
    return InvalidFieldError(
        "lines", absl::StrCat(request.lines_size(), " lines; the limit is ",
                              config_.max_dialogue_lines(), " (speech.max_dialogue_lines)"));
  }
  size_t total = 0;
  for (const v1::DialogueLine& line : request.lines()) total += line.text().size();
  if (total > config_.max_text_bytes()) {
    return InvalidFieldError("lines",
                             absl::StrCat("hold ", total, " bytes of text; the limit is ",
                                          config_.max_text_bytes(), " (speech.max_text_bytes)"));
  }
  Plan plan;
  ASSIGN_OR_RETURN(auto engine, FindEngine(request.engine()));
  plan.engine_name = engine.first;
  plan.engine = engine.second;
  plan.deadline = deadline;
  ASSIGN_OR_RETURN(AudioFormat format, ToFormat(request.format()));
  RETURN_IF_ERROR(PlanOutput(format, request.sample_rate(), *plan.engine, false, plan));

  absl::Duration pause = absl::Milliseconds(400);
  if (config_.has_default_pause()) pause = FromProtoDuration(config_.default_pause());
  if (request.has_pause()) {
    pause = FromProtoDuration(request.pause());
    if (pause < absl::ZeroDuration() || pause > kMaxPause) {
      return InvalidFieldError("pause", "must be 0..10s");
    }
  }

  absl::flat_hash_map<std::string, VoiceParams> voices;
  for (const auto& [speaker, settings] : request.voices()) {
    VoiceParams voice = ToVoiceParams(settings);
    RETURN_IF_ERROR(
        AsFieldError(plan.engine->Validate(voice), absl::StrCat("voices[", speaker, "]")));
    voices[speaker] = std::move(voice);
  }
  // Defaults skip the voices the request gave, so every speaker sounds different.
  std::vector<std::string> defaults;
  for (std::string& v : DefaultDialogueVoices(plan.engine->kind())) {
    bool taken = false;
    for (const auto& [speaker, given] : voices) taken = taken || given.voice == v;
    if (!taken) defaults.push_back(std::move(v));
  }
  if (defaults.empty()) defaults = DefaultDialogueVoices(plan.engine->kind());
  size_t next_default = 0;
  for (int i = 0; i < request.lines_size(); ++i) {
    const v1::DialogueLine& line = request.lines(i);
    const std::string field = absl::StrCat("lines[", i, "]");
    if (absl::StripAsciiWhitespace(line.speaker()).empty()) {
      return InvalidFieldError(absl::StrCat(field, ".speaker"), "must not be empty");
    }
    if (absl::StripAsciiWhitespace(line.text()).empty()) {
      return InvalidFieldError(absl::StrCat(field, ".text"), "must not be empty");
    }
    auto it = voices.find(line.speaker());
    if (it == voices.end()) {
      VoiceParams voice;
      voice.voice = defaults[next_default++ % defaults.size()];
      RETURN_IF_ERROR(
          AsFieldError(plan.engine->Validate(voice), absl::StrCat("voices[", line.speaker(), "]")));
      it = voices.emplace(line.speaker(), std::move(voice)).first;
    }
    const size_t first = plan.segments.size();
    RETURN_IF_ERROR(AddText(line.text(), false, it->second, *plan.engine,
                            absl::StrCat(field, ".text"), plan.segments));
    for (size_t s = first; s + 1 < plan.segments.size(); ++s) {
      plan.segments[s].pause_after = absl::ZeroDuration();
    }
    if (i + 1 < request.lines_size()) plan.segments.back().pause_after = pause;
  }
  plan.segments.back().pause_after = absl::ZeroDuration();
  FillKeys(plan);
  return plan;
}

std::shared_ptr<SynthesisJob> Synthesizer::Start(Plan plan, std::shared_ptr<SynthesisSink> sink,
                                                 size_t window) {
  if (window == 0) window = config_.stream_window_segments();
  window = std::max(window, plan.engine->max_concurrency());
  auto job = std::make_shared<Job>(*this, std::move(plan), sink, window);
  bool refused = false;
  {
    absl::MutexLock lock(&mu_);
    refused = shut_down_;
    if (!refused) jobs_[job.get()] = job;
  }
  if (refused) {
    job->Refuse(absl::UnavailableError("the speech service is shutting down"));
    return job;
  }
  job->Begin();
  return job;
}

absl::StatusOr<std::vector<v1::Voice>> Synthesizer::ListVoices(absl::string_view engine,
                                                               absl::string_view language) const {
  std::vector<std::string> names;
  if (engine.empty()) {
    for (const auto& [n, e] : engines_) names.push_back(n);
    std::sort(names.begin(), names.end());
  } else {
    ASSIGN_OR_RETURN(auto found, FindEngine(engine));
    names.push_back(found.first);
  }
  const std::string prefix = absl::AsciiStrToLower(language);
  std::vector<v1::Voice> out;
  for (const std::string& name : names) {
    for (const VoiceInfo& info : engines_.at(name)->Voices()) {
      if (!absl::StartsWith(absl::AsciiStrToLower(info.language), prefix)) continue;
      v1::Voice& voice = out.emplace_back();
      voice.set_name(info.name);
      voice.set_language(info.language);
      voice.set_gender(info.gender);
      voice.set_engine(name);
    }
  }
  return out;
}

uint64_t Synthesizer::engine_calls() const {
  absl::MutexLock lock(&mu_);
  return engine_calls_;
}

absl::AnyInvocable<void()> Synthesizer::FetchSegment(const std::string& engine_name,
                                                     TtsEngine& engine,
                                                     const PlannedSegment& segment,
                                                     absl::Time deadline, SegmentDone done) {
  // Shared by the cache callback and the returned leave function.
  struct Fetch {
    SegmentDone done;
    bool left = false;    // guarded by the synthesizer's mu_
    uint64_t waiter = 0;  // guarded by mu_; 0 until the fetch joined a flight
  };
  auto fetch = std::make_shared<Fetch>();
  fetch->done = std::move(done);
  const std::string key = segment.cache_key;
  auto leave = [this, fetch, key]() {
    std::shared_ptr<SynthesisHandle> cancel;
    {
      absl::MutexLock lock(&mu_);
      if (fetch->left) return;
      fetch->left = true;
      fetch->done = nullptr;
      if (fetch->waiter == 0) return;
      auto it = flights_.find(key);
      if (it == flights_.end()) return;
      std::shared_ptr<SegmentFlight> flight = it->second;
      flight->waiters.erase(fetch->waiter);
      if (!flight->waiters.empty()) return;
      flight->abandoned = true;
      flights_.erase(it);
      cancel = flight->handle;
    }
    if (cancel != nullptr) cancel->Cancel();
  };

  cache_->Get(key, [this, fetch, key, engine_name, &engine, segment,
                    deadline](absl::StatusOr<cache::Value> cached) mutable {
    if (cached.ok() && *cached != nullptr) {
      metrics_->cache.Add({{"result", "hit"}}).Increment();
      SegmentDone done;
      {
        absl::MutexLock lock(&mu_);
        if (fetch->left) return;
        done = std::move(fetch->done);
        fetch->left = true;
      }
      metrics_->segments.Add({{"engine", engine_name}, {"source", "cache"}}).Increment();
      std::move(done)(*std::move(cached), true);
      return;
    }
    metrics_->cache.Add({{"result", cached.ok() ? "miss" : "unavailable"}}).Increment();
    bool start = false;
    std::shared_ptr<SegmentFlight> flight;
    SegmentDone refused;
    {
      absl::MutexLock lock(&mu_);
      if (fetch->left) return;
      if (shut_down_) {
        fetch->left = true;
        refused = std::move(fetch->done);
      }
    }
    if (refused) {
      std::move(refused)(absl::UnavailableError("the speech service is shutting down"), false);
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      if (fetch->left) return;
      auto [it, inserted] = flights_.try_emplace(key);
      if (inserted) {
        it->second = std::make_shared<SegmentFlight>();
        it->second->engine = engine_name;
        it->second->started = absl::Now();
        ++engine_calls_;
        start = true;
      }
      flight = it->second;
      fetch->waiter = ++next_waiter_;
      flight->waiters[fetch->waiter] = std::move(fetch->done);
    }
    metrics_->segments.Add({{"engine", engine_name}, {"source", start ? "engine" : "shared"}})
        .Increment();
    if (!start) return;
    std::shared_ptr<SynthesisHandle> handle = engine.Synthesize(
        segment.segment, deadline, [this, flight, key](absl::StatusOr<std::string> pcm) {
          FinishFlight(flight, key, std::move(pcm));
        });
    bool cancel = false;
    {
      absl::MutexLock lock(&mu_);
      flight->handle = handle;
      cancel = flight->abandoned;
    }
    if (cancel) handle->Cancel();
  });
  return leave;
}

void Synthesizer::FinishFlight(const std::shared_ptr<SegmentFlight>& flight, const std::string& key,
                               absl::StatusOr<std::string> synthesized) {
  metrics_->engine_seconds.Add({{"engine", flight->engine}}, SynthesizerMetrics::Buckets())
      .Observe(absl::ToDoubleSeconds(absl::Now() - flight->started));
  absl::StatusOr<cache::Value> pcm(cache::Value{});
  if (!synthesized.ok()) {
    pcm = synthesized.status();
    metrics_->engine_errors
        .Add({{"engine", flight->engine},
              {"code", std::string(absl::StatusCodeToString(synthesized.status().code()))}})
        .Increment();
  } else {
    pcm = std::make_shared<const std::string>(*std::move(synthesized));
    // Stored before the flight leaves the table, so a caller that arrives in between finds the
    // segment in the (in-process) cache instead of starting a second synthesis. The cache and
    // the waiting jobs share the one buffer.
    if (!(*pcm)->empty()) cache_->Set(key, *pcm, absl::ZeroDuration());
  }
  absl::flat_hash_map<uint64_t, SegmentDone> waiters;
  {
    absl::MutexLock lock(&mu_);
    auto it = flights_.find(key);
    if (it != flights_.end() && it->second == flight) flights_.erase(it);
    waiters = std::move(flight->waiters);
    flight->waiters.clear();
  }
  for (auto& [id, done] : waiters) std::move(done)(pcm, false);
}

}  // namespace montage::speech
