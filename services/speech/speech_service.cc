// The gRPC adapter of the speech service: callback reactors over the Synthesizer. No reactor holds
// a thread while audio is made: jobs report through sinks, on executor or engine threads.
#include "services/speech/speech_service.h"

#include <algorithm>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/http/config.h"
#include "common/http/http_client.h"
#include "common/logging.h"
#include "common/proto_time.h"
#include "common/status.h"
#include "montage/speech/v1/speech.grpc.pb.h"
#include "services/speech/espeak_engine.h"
#include "services/speech/espeak_pool.h"
#include "services/speech/http_engine.h"
#include "services/speech/synthesizer.h"

namespace montage::speech {
namespace {

absl::Time DeadlineOf(grpc::CallbackServerContext* context, const config::v1::SpeechConfig& c) {
  const auto deadline = context->deadline();
  absl::Time fallback = absl::Now() + FromProtoDuration(c.default_timeout());
  if (deadline == std::chrono::system_clock::time_point::max()) return fallback;
  return absl::FromChrono(deadline);
}

v1::AudioFormat ToProto(AudioFormat format) {
  switch (format) {
    case AudioFormat::kWav:
      return v1::WAV;
    case AudioFormat::kPcm:
      return v1::PCM;
    case AudioFormat::kMp3:
      return v1::MP3;
    case AudioFormat::kOggOpus:
      return v1::OGG_OPUS;
    case AudioFormat::kAac:
      return v1::AAC;
  }
  return v1::AUDIO_FORMAT_UNSPECIFIED;
}

// Planning (SSML parsing, segmentation, a hash per segment) grows with the text, up to
// speech.max_text_bytes: it runs on the executor, not on the gRPC thread that took the call.
// `begin` gets the plan there, or at once RESOURCE_EXHAUSTED when the executor is full.
void PlanOffTheCallThread(Executor& executor, absl::AnyInvocable<absl::StatusOr<Plan>() &&> plan,
                          absl::AnyInvocable<void(absl::StatusOr<Plan>) &&> begin) {
  struct Task {
    absl::AnyInvocable<absl::StatusOr<Plan>() &&> plan;
    absl::AnyInvocable<void(absl::StatusOr<Plan>) &&> begin;
  };
  auto task = std::make_shared<Task>(Task{std::move(plan), std::move(begin)});
  const absl::Status scheduled =
      executor.Schedule([task]() { std::move(task->begin)(std::move(task->plan)()); });
  if (!scheduled.ok()) {
    std::move(task->begin)(absl::ResourceExhaustedError(
        absl::StrCat("the speech service is overloaded: ", scheduled.message())));
  }
}

// Returns `reactor` after asking for its plan off the call thread; its Begin gets the plan.
template <typename Reactor>
Reactor* BeginWhenPlanned(Executor& executor, Reactor* reactor,
                          absl::AnyInvocable<absl::StatusOr<Plan>() &&> plan) {
  PlanOffTheCallThread(executor, std::move(plan),
                       [reactor](absl::StatusOr<Plan> made) { reactor->Begin(std::move(made)); });
  return reactor;
}

// A call's job, and whether the call was cancelled before it had one. Shared by the reactor and
// its Begin, which may still hold it after the reactor is gone: a job can end, and the call with
// it, inside Synthesizer::Start (a synthesizer shutting down refuses it there).
class JobSlot {
 public:
  bool cancelled() {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }
  // Keeps the job, or cancels it when the call was cancelled meanwhile.
  void Set(std::shared_ptr<SynthesisJob> job) {
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      job_ = job;
      cancelled = cancelled_;
    }
    if (cancelled) job->Cancel();
  }
  std::shared_ptr<SynthesisJob> job() {
    absl::MutexLock lock(&mu_);
    return job_;
  }
  void Cancel() {
    std::shared_ptr<SynthesisJob> job;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      job = job_;
    }
    if (job != nullptr) job->Cancel();
  }

 private:
  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<SynthesisJob> job_ ABSL_GUARDED_BY(mu_);
};

// Synthesize and SynthesizeDialogue: the whole file in one answer, up to
// speech.max_unary_audio_bytes. Begin runs once the plan is made (see PlanOffTheCallThread).
class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  UnaryReactor(Synthesizer& synthesizer, v1::SynthesizeResponse* response)
      : synthesizer_(synthesizer),
        response_(response),
        limit_(synthesizer.config().max_unary_audio_bytes()) {}

  void Begin(absl::StatusOr<Plan> plan) {
    if (plan.ok() && slot_->cancelled()) plan = absl::CancelledError("the call was cancelled");
    if (!plan.ok()) {
      Finish(ToGrpcStatus(plan.status()));
      return;
    }
    response_->set_format(ToProto(plan->format));
    response_->set_sample_rate(plan->sample_rate);
    response_->set_channels(1);
    response_->mutable_audio()->set_content_type(ContentType(plan->format, plan->sample_rate));
    auto sink = std::make_shared<Sink>(this);
    std::shared_ptr<JobSlot> slot = slot_;  // `this` may be gone once Start returns
    slot->Set(synthesizer_.Start(*std::move(plan), sink, /*window=*/0));
  }
  void OnCancel() override { slot_->Cancel(); }
  void OnDone() override { delete this; }

 private:
  class Sink final : public SynthesisSink {
   public:
    explicit Sink(UnaryReactor* reactor) : reactor_(reactor) {}
    Action OnAudio(std::string bytes) override {
      std::string* data = reactor_->response_->mutable_audio()->mutable_data();
      if (data->size() + bytes.size() > reactor_->limit_) {
        too_big_ = true;
        data->clear();
        return Action::kStop;
      }
      if (data->empty()) {
        *data = std::move(bytes);  // WAV and m4a arrive in one piece: no copy
      } else {
        data->append(bytes);
      }
      return Action::kContinue;
    }
    void OnDone(absl::StatusOr<Summary> result) override {
      if (too_big_) {
        result = absl::ResourceExhaustedError(absl::StrCat(
            "the audio is larger than ", reactor_->limit_,
            " bytes (speech.max_unary_audio_bytes): use StreamSynthesize, the REST download, or a "
            "compressed format (MP3, OGG_OPUS)"));
      }
      if (result.ok()) {
        *reactor_->response_->mutable_duration() = ToProtoDuration(result->duration);
        reactor_->response_->set_segments(result->segments);
        reactor_->response_->set_segments_from_cache(result->segments_from_cache);
      }
      reactor_->Finish(ToGrpcStatus(result.status()));
    }

   private:
    UnaryReactor* reactor_;
    bool too_big_ = false;
  };

  Synthesizer& synthesizer_;
  v1::SynthesizeResponse* response_;
  const uint64_t limit_;
  const std::shared_ptr<JobSlot> slot_ = std::make_shared<JobSlot>();
};

// StreamSynthesize: one write in flight, at most kMaxQueued chunks behind it; beyond that the
// job pauses (no further synthesis past its window) until the reader catches up.
class StreamReactor final : public grpc::ServerWriteReactor<v1::AudioChunk> {
 public:
  static constexpr size_t kMaxQueued = 2;

  explicit StreamReactor(Synthesizer& synthesizer) : synthesizer_(synthesizer) {}

  // Once the plan is made (see PlanOffTheCallThread).
  void Begin(absl::StatusOr<Plan> plan) {
    if (plan.ok() && slot_->cancelled()) plan = absl::CancelledError("the call was cancelled");
    if (!plan.ok()) {
      Finish(ToGrpcStatus(plan.status()));
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      content_type_ = ContentType(plan->format, plan->sample_rate);
      sample_rate_ = plan->sample_rate;
    }
    auto sink = std::make_shared<Sink>(this);
    std::shared_ptr<JobSlot> slot = slot_;  // `this` may be gone once Start returns
    slot->Set(synthesizer_.Start(*std::move(plan), sink, 0));
  }

  void OnWriteDone(bool ok) override {
    std::optional<grpc::Status> finish;
    bool resume = false;
    std::shared_ptr<SynthesisJob> job;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        broken_ = true;
        queue_.clear();
        if (status_.ok()) status_ = grpc::Status(grpc::StatusCode::CANCELLED, "a write failed");
      }
      finish = PumpLocked();
      if (paused_ && queue_.size() < kMaxQueued) {
        paused_ = false;
        resume = true;
      }
    }
    job = slot_->job();
    if (!ok && job) job->Cancel();
    if (resume && job) job->Resume();
    if (finish) Finish(*finish);
  }
  void OnCancel() override { slot_->Cancel(); }
  void OnDone() override { delete this; }

 private:
  class Sink final : public SynthesisSink {
   public:
    explicit Sink(StreamReactor* reactor) : reactor_(reactor) {}
    Action OnAudio(std::string bytes) override { return reactor_->Push(std::move(bytes)); }
    void OnDone(absl::StatusOr<Summary> result) override { reactor_->End(std::move(result)); }

   private:
    StreamReactor* reactor_;
  };

  SynthesisSink::Action Push(std::string bytes) {
    std::optional<grpc::Status> finish;
    bool more;
    {
      absl::MutexLock lock(&mu_);
      if (broken_ || ending_) return SynthesisSink::Action::kStop;
      v1::AudioChunk chunk;
      *chunk.mutable_data() = std::move(bytes);
      if (first_) {
        first_ = false;
        chunk.set_content_type(content_type_);
        chunk.set_sample_rate(sample_rate_);
      }
      queue_.push_back(std::move(chunk));
      finish = PumpLocked();
      more = queue_.size() < kMaxQueued;
      if (!more) paused_ = true;
    }
    if (finish) Finish(*finish);
    return more ? SynthesisSink::Action::kContinue : SynthesisSink::Action::kPause;
  }

  void End(absl::StatusOr<SynthesisSink::Summary> result) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      ending_ = true;
      if (!result.ok()) {
        queue_.clear();
        status_ = ToGrpcStatus(result.status());
      } else {
        v1::AudioChunk last;
        if (first_) {
          last.set_content_type(content_type_);
          last.set_sample_rate(sample_rate_);
        }
        *last.mutable_duration() = ToProtoDuration(result->duration);
        last.set_segments(result->segments);
        last.set_segments_from_cache(result->segments_from_cache);
        last.set_last(true);
        if (!broken_) queue_.push_back(std::move(last));
      }
      finish = PumpLocked();
    }
    if (finish) Finish(*finish);
  }

  // Starts the next write, or says how to finish once everything is written.
  std::optional<grpc::Status> PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return std::nullopt;
    if (!queue_.empty() && !broken_) {
      writing_ = true;
      current_ = std::move(queue_.front());
      queue_.pop_front();
      StartWrite(&current_);
      return std::nullopt;
    }
    if (!ending_ && !broken_) return std::nullopt;
    if (!ending_) return std::nullopt;  // broken: the job's OnDone ends the call
    finished_ = true;
    return status_;
  }

  Synthesizer& synthesizer_;
  absl::Mutex mu_;
  std::string content_type_ ABSL_GUARDED_BY(mu_);
  uint32_t sample_rate_ ABSL_GUARDED_BY(mu_) = 0;
  const std::shared_ptr<JobSlot> slot_ = std::make_shared<JobSlot>();
  std::deque<v1::AudioChunk> queue_ ABSL_GUARDED_BY(mu_);
  v1::AudioChunk current_ ABSL_GUARDED_BY(mu_);
  bool first_ ABSL_GUARDED_BY(mu_) = true;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool ending_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

class SpeechServiceImpl final : public v1::SpeechService::CallbackService {
 public:
  explicit SpeechServiceImpl(Synthesizer& synthesizer) : synthesizer_(synthesizer) {}

  // The request stays valid until the call is finished, which happens only after planning.
  grpc::ServerUnaryReactor* Synthesize(grpc::CallbackServerContext* context,
                                       const v1::SynthesizeRequest* request,
                                       v1::SynthesizeResponse* response) override {
    const absl::Time deadline = DeadlineOf(context, synthesizer_.config());
    return BeginWhenPlanned(
        synthesizer_.executor(), new UnaryReactor(synthesizer_, response),
        [this, request, deadline] { return synthesizer_.PlanText(*request, deadline, false); });
  }
  grpc::ServerWriteReactor<v1::AudioChunk>* StreamSynthesize(
      grpc::CallbackServerContext* context, const v1::SynthesizeRequest* request) override {
    const absl::Time deadline = DeadlineOf(context, synthesizer_.config());
    return BeginWhenPlanned(
        synthesizer_.executor(), new StreamReactor(synthesizer_),
        [this, request, deadline] { return synthesizer_.PlanText(*request, deadline, true); });
  }
  grpc::ServerUnaryReactor* SynthesizeDialogue(grpc::CallbackServerContext* context,
                                               const v1::SynthesizeDialogueRequest* request,
                                               v1::SynthesizeResponse* response) override {
    const absl::Time deadline = DeadlineOf(context, synthesizer_.config());
    return BeginWhenPlanned(
        synthesizer_.executor(), new UnaryReactor(synthesizer_, response),
        [this, request, deadline] { return synthesizer_.PlanDialogue(*request, deadline); });
  }
  grpc::ServerUnaryReactor* ListVoices(grpc::CallbackServerContext* context,
                                       const v1::ListVoicesRequest* request,
                                       v1::ListVoicesResponse* response) override {
    absl::StatusOr<std::vector<v1::Voice>> voices =
        synthesizer_.ListVoices(request->engine(), request->language());
    if (voices.ok()) {
      for (v1::Voice& v : *voices) *response->add_voices() = std::move(v);
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(voices.status()));
    return reactor;
  }

 private:
  Synthesizer& synthesizer_;
};

class SpeechModule final : public ServiceModule {
 public:
  SpeechModule(std::shared_ptr<http::HttpClient> http, std::unique_ptr<Synthesizer> synthesizer)
      : http_(std::move(http)), synthesizer_(std::move(synthesizer)), service_(*synthesizer_) {}

  std::vector<grpc::Service*> GrpcServices() override { return {&service_}; }
  std::vector<std::string> HealthNames() const override {
    return {std::string(v1::SpeechService::service_full_name())};
  }
  // The gRPC server has stopped: jobs still running end, engines stop.
  void Stop() override { synthesizer_->Shutdown(); }

 private:
  // Destroyed in reverse: the synthesizer (and its engines) before the HTTP client they use.
  std::shared_ptr<http::HttpClient> http_;
  std::unique_ptr<Synthesizer> synthesizer_;
  SpeechServiceImpl service_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewSpeechModule(ServiceContext& context) {
  const config::v1::SpeechConfig& c = context.config.speech();
  ASSIGN_OR_RETURN(std::unique_ptr<http::HttpClient> client,
                   http::HttpClient::Create(http::HttpClientOptionsFromConfig(c.http(), "speech")));
  std::shared_ptr<http::HttpClient> http(std::move(client));
  absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines;
  for (const auto& [name, engine] : c.engines()) {
    absl::StatusOr<std::unique_ptr<TtsEngine>> made;
    if (engine.kind() == config::v1::SpeechEngineConfig::ESPEAK) {
      EspeakPoolOptions options;
      options.espeak.data_path = engine.data_path();
      options.worker_command = EspeakWorkerCommand();
      options.lanes = engine.max_concurrency() != 0
                          ? engine.max_concurrency()
                          : std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 4);
      made = NewEspeakEngine(options.espeak);
      if (made.ok()) made = NewEspeakPool(*std::move(made), options);
    } else {
      made = NewOpenAiSpeechEngine(engine, http);
    }
    if (!made.ok()) {
      return absl::Status(made.status().code(),
                          absl::StrCat("speech.engines.", name, ": ", made.status().message()));
    }
    engines[name] = *std::move(made);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<cache::CacheClient> cache,
                   cache::MakeCacheClient(c.cache(), "speech", context.clock));
  ASSIGN_OR_RETURN(std::unique_ptr<Synthesizer> synthesizer,
                   Synthesizer::Create(c, std::move(engines), std::move(cache), context.executor));
  LogInfo("speech service ready",
          {{"engines", static_cast<int64_t>(c.engines_size())},
           {"default_engine", c.default_engine()},
           {"cache", c.cache().address().empty() ? "in-process" : c.cache().address()}});
  return std::make_unique<SpeechModule>(std::move(http), std::move(synthesizer));
}

}  // namespace montage::speech
