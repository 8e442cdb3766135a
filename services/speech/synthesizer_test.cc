#include "services/speech/synthesizer.h"

#include <atomic>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/executor.h"
#include "common/http/http_client.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/metrics_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/speech/espeak_engine.h"
#include "services/speech/http_engine.h"
#include "services/speech/testing/audio_probe.h"
#include "tests/fake_llm/fake_llm_server.h"
#include "tests/testing/unused_port.h"

namespace montage::speech {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr absl::Duration kWait = absl::Seconds(60);

// Passes every call to a real engine and counts them.
class CountingEngine final : public TtsEngine {
 public:
  explicit CountingEngine(std::unique_ptr<TtsEngine> inner) : inner_(std::move(inner)) {}
  absl::string_view kind() const override { return inner_->kind(); }
  uint32_t sample_rate() const override { return inner_->sample_rate(); }
  bool supports_ssml() const override { return inner_->supports_ssml(); }
  size_t max_segment_chars() const override { return inner_->max_segment_chars(); }
  size_t max_concurrency() const override { return inner_->max_concurrency(); }
  std::vector<VoiceInfo> Voices() const override { return inner_->Voices(); }
  absl::Status Validate(const VoiceParams& voice) const override { return inner_->Validate(voice); }
  std::shared_ptr<SynthesisHandle> Synthesize(Segment segment, absl::Time deadline,
                                              Done done) override {
    started_.fetch_add(1);
    return inner_->Synthesize(
        std::move(segment), deadline,
        [this, done = std::move(done)](absl::StatusOr<std::string> pcm) mutable {
          std::move(done)(std::move(pcm));
          finished_.fetch_add(1);
        });
  }
  void Shutdown() override { inner_->Shutdown(); }

  int started() const { return started_.load(); }
  int finished() const { return finished_.load(); }

 private:
  std::unique_ptr<TtsEngine> inner_;
  std::atomic<int> started_{0};
  std::atomic<int> finished_{0};
};

// Collects a job's output; pauses after every chunk while `pause` is set.
class CollectingSink final : public SynthesisSink {
 public:
  Action OnAudio(std::string bytes) override {
    absl::MutexLock lock(&mu_);
    audio_ += bytes;
    ++chunks_;
    return pause_ ? Action::kPause : Action::kContinue;
  }
  void OnDone(absl::StatusOr<Summary> result) override {
    absl::MutexLock lock(&mu_);
    result_ = std::move(result);
    done_ = true;
  }
  absl::StatusOr<Summary> Wait() {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithTimeout(absl::Condition(&done_), kWait)) {
      return absl::DeadlineExceededError("the test gave up waiting");
    }
    return result_;
  }
  bool WaitForChunks(int n) {
    absl::MutexLock lock(&mu_);
    auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return chunks_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), kWait);
  }
  void set_pause(bool pause) {
    absl::MutexLock lock(&mu_);
    pause_ = pause;
  }
  std::string audio() {
    absl::MutexLock lock(&mu_);
    return audio_;
  }
  int chunks() {
    absl::MutexLock lock(&mu_);
    return chunks_;
  }
  bool done() {
    absl::MutexLock lock(&mu_);
    return done_;
  }

 private:
  absl::Mutex mu_;
  std::string audio_;
  int chunks_ = 0;
  bool pause_ = false;
  bool done_ = false;
  absl::StatusOr<Summary> result_ = absl::UnknownError("not done");
};

std::string Sentences(int n, absl::string_view prefix = "Sentence") {
  std::string text;
  for (int i = 0; i < n; ++i) {
    absl::StrAppend(&text, prefix, " number ", i + 1, " is short and clear. ");
  }
  return text;
}

class SynthesizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = config::DefaultConfig().speech();
    executor_ = std::make_unique<ThreadPool>(2, 10000, "speech-test");
  }

  // Builds a synthesizer with espeak (counted) and, when `fake` runs, an "api" engine on it.
  void Build(montage::testing::FakeLlmServer* fake = nullptr) {
    absl::flat_hash_map<std::string, std::unique_ptr<TtsEngine>> engines;
    auto espeak = NewEspeakEngine({});
    ASSERT_TRUE(espeak.ok()) << espeak.status();
    auto counting = std::make_unique<CountingEngine>(*std::move(espeak));
    espeak_ = counting.get();
    engines["espeak"] = std::move(counting);
    if (fake != nullptr) {
      auto client = http::HttpClient::Create();
      ASSERT_TRUE(client.ok());
      http_ = std::shared_ptr<http::HttpClient>(*std::move(client));
      config::v1::SpeechEngineConfig api;
      api.set_kind(config::v1::SpeechEngineConfig::OPENAI);
      api.set_base_url(absl::StrCat("http://127.0.0.1:", fake->port(), "/v1"));
      api.set_model("tts-1");
      (*config_.mutable_engines())["api"] = api;
      auto engine = NewOpenAiSpeechEngine(api, http_);
      ASSERT_TRUE(engine.ok()) << engine.status();
      engines["api"] = *std::move(engine);
    }
    auto cache = cache::MakeCacheClient(config_.cache(), "speech", clock_);
    ASSERT_TRUE(cache.ok()) << cache.status();
    auto synthesizer =
        Synthesizer::Create(config_, std::move(engines), *std::move(cache), *executor_);
    ASSERT_TRUE(synthesizer.ok()) << synthesizer.status();
    synthesizer_ = *std::move(synthesizer);
  }

  void TearDown() override {
    if (synthesizer_) synthesizer_->Shutdown();
    synthesizer_.reset();
    http_.reset();
    executor_.reset();
  }

  // Synthesises `request` as a unary call would: everything, then the summary.
  absl::StatusOr<SynthesisSink::Summary> Run(const v1::SynthesizeRequest& request,
                                             std::string* audio = nullptr) {
    absl::StatusOr<Plan> plan = synthesizer_->PlanText(request, absl::Now() + kWait, false);
    if (!plan.ok()) return plan.status();
    auto sink = std::make_shared<CollectingSink>();
    synthesizer_->Start(*std::move(plan), sink);
    absl::StatusOr<SynthesisSink::Summary> result = sink->Wait();
    if (audio != nullptr) *audio = sink->audio();
    return result;
  }

  config::v1::SpeechConfig config_;
  Clock& clock_ = RealClock();
  std::unique_ptr<ThreadPool> executor_;
  std::shared_ptr<http::HttpClient> http_;
  CountingEngine* espeak_ = nullptr;
  std::unique_ptr<Synthesizer> synthesizer_;
};

TEST_F(SynthesizerTest, EveryFormatDecodesToSpeechOfTheTextsLength) {
  Build();
  struct Case {
    v1::AudioFormat format;
    uint32_t rate;
    std::string container;
    uint32_t decoded_rate;
  };
  const std::vector<Case> cases = {
      {v1::WAV, 0, "wav", 22050},      {v1::WAV, 16000, "wav", 16000},
      {v1::MP3, 0, "mp3", 22050},      {v1::MP3, 44100, "mp3", 44100},
      {v1::OGG_OPUS, 0, "ogg", 48000}, {v1::AAC, 24000, "mov,mp4,m4a,3gp,3g2,mj2", 24000},
  };
  // 24 words at 175 words per minute: about 8 s with sentence pauses.
  const std::string text = Sentences(4);
  for (const Case& c : cases) {
    v1::SynthesizeRequest request;
    request.set_text(text);
    request.set_format(c.format);
    request.set_sample_rate(c.rate);
    std::string audio;
    absl::StatusOr<SynthesisSink::Summary> summary = Run(request, &audio);
    ASSERT_TRUE(summary.ok()) << summary.status();
    EXPECT_EQ(summary->segments, 4u);
    absl::StatusOr<testing::AudioInfo> info = testing::ProbeAudio(audio);
    ASSERT_TRUE(info.ok()) << info.status() << " format " << c.format;
    EXPECT_EQ(info->container, c.container);
    EXPECT_EQ(info->sample_rate, c.decoded_rate) << c.format;
    EXPECT_EQ(info->channels, 1u);
    EXPECT_NEAR(info->duration_seconds, absl::ToDoubleSeconds(summary->duration), 0.2) << c.format;
    EXPECT_GT(info->duration_seconds, 5.0);
    EXPECT_LT(info->duration_seconds, 14.0);
    EXPECT_GT(info->rms, 0.02) << c.format;
  }
  v1::SynthesizeRequest pcm;
  pcm.set_text(text);
  pcm.set_format(v1::PCM);
  std::string audio;
  ASSERT_TRUE(Run(pcm, &audio).ok());
  testing::AudioInfo info = testing::ProbePcm(audio, 22050);
  EXPECT_GT(info.duration_seconds, 5.0);
  EXPECT_GT(info.rms, 0.02);
}

TEST_F(SynthesizerTest, ResynthesisUsesTheCacheAndAnEditRedoesOnlyThatLine) {
  Build();
  v1::SynthesizeRequest request;
  request.set_text(Sentences(12));
  request.set_format(v1::PCM);
  std::string first_audio;
  absl::StatusOr<SynthesisSink::Summary> first = Run(request, &first_audio);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->segments, 12u);
  EXPECT_EQ(first->segments_from_cache, 0u);
  EXPECT_EQ(synthesizer_->engine_calls(), 12u);

  std::string again_audio;
  absl::StatusOr<SynthesisSink::Summary> again = Run(request, &again_audio);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->segments_from_cache, 12u);
  EXPECT_EQ(synthesizer_->engine_calls(), 12u);
  EXPECT_EQ(again_audio, first_audio);

  // Whitespace changes nothing; a changed sentence is the only new engine call.
  std::string edited = "  " + Sentences(12);
  edited.replace(edited.find("number 7 is short"), 17, "number 7 is rather long");
  request.set_text(edited);
  absl::StatusOr<SynthesisSink::Summary> third = Run(request);
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(third->segments_from_cache, 11u);
  EXPECT_EQ(synthesizer_->engine_calls(), 13u);
  EXPECT_EQ(espeak_->started(), 13);
}

TEST_F(SynthesizerTest, ConcurrentIdenticalJobsSynthesiseEachSegmentOnce) {
  Build();
  v1::SynthesizeRequest request;
  request.set_text(Sentences(10, "Shared"));
  request.set_format(v1::MP3);
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<Plan> plan = synthesizer_->PlanText(request, absl::Now() + kWait, false);
    ASSERT_TRUE(plan.ok());
    sinks.push_back(std::make_shared<CollectingSink>());
    synthesizer_->Start(*std::move(plan), sinks.back());
  }
  std::string audio;
  for (auto& sink : sinks) {
    ASSERT_TRUE(sink->Wait().ok());
    if (audio.empty()) audio = sink->audio();
    EXPECT_EQ(sink->audio(), audio);
  }
  EXPECT_EQ(espeak_->started(), 10);
}

TEST_F(SynthesizerTest, ASlowReaderStopsSynthesisAtTheWindow) {
  config_.set_stream_window_segments(4);
  Build();
  v1::SynthesizeRequest request;
  request.set_text(Sentences(40, "Window"));
  request.set_format(v1::PCM);
  absl::StatusOr<Plan> plan = synthesizer_->PlanText(request, absl::Now() + kWait, true);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto sink = std::make_shared<CollectingSink>();
  sink->set_pause(true);
  std::shared_ptr<SynthesisJob> job = synthesizer_->Start(*std::move(plan), sink);
  ASSERT_TRUE(sink->WaitForChunks(1));
  // Wait until every started call finished: nothing else can start while the reader pauses.
  for (int i = 0; i < 6000 && espeak_->finished() < espeak_->started(); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(espeak_->finished(), espeak_->started());
  // One segment went out; at most a window beyond it was synthesised, plus the one an encoding
  // step may already have taken off the window when it found the reader paused (seen under load
  // in a full parallel ctest run: 6 of 40). Without backpressure all 40 would have started.
  EXPECT_EQ(sink->chunks(), 1);
  EXPECT_LE(espeak_->started(), 6);
  EXPECT_FALSE(sink->done());
  sink->set_pause(false);
  job->Resume();
  absl::StatusOr<SynthesisSink::Summary> summary = sink->Wait();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->segments, 40u);
  EXPECT_EQ(espeak_->started(), 40);
}

TEST_F(SynthesizerTest, DialogueGivesEachSpeakerAVoiceAndPausesBetweenTurns) {
  Build();
  v1::SynthesizeDialogueRequest request;
  const std::vector<std::pair<std::string, std::string>> lines = {
      {"host", "Welcome to the show."},
      {"guest", "Thanks for having me."},
      {"host", "Let us begin."},
  };
  for (const auto& [speaker, text] : lines) {
    v1::DialogueLine* line = request.add_lines();
    line->set_speaker(speaker);
    line->set_text(text);
  }
  (*request.mutable_voices())["host"].set_voice("en-us+m3");
  request.set_format(v1::WAV);
  request.mutable_pause()->set_seconds(1);
  absl::StatusOr<Plan> plan = synthesizer_->PlanDialogue(request, absl::Now() + kWait);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->segments.size(), 3u);
  EXPECT_EQ(plan->segments[0].segment.voice.voice, "en-us+m3");
  EXPECT_FALSE(plan->segments[1].segment.voice.voice.empty());  // a default voice for the guest
  EXPECT_NE(plan->segments[1].segment.voice.voice, plan->segments[0].segment.voice.voice);
  EXPECT_EQ(plan->segments[0].pause_after, absl::Seconds(1));
  EXPECT_EQ(plan->segments[2].pause_after, absl::ZeroDuration());
  auto sink = std::make_shared<CollectingSink>();
  synthesizer_->Start(*std::move(plan), sink);
  absl::StatusOr<SynthesisSink::Summary> summary = sink->Wait();
  ASSERT_TRUE(summary.ok()) << summary.status();
  absl::StatusOr<testing::AudioInfo> info = testing::ProbeAudio(sink->audio());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_GT(info->duration_seconds, 4.0);  // speech plus two one-second pauses
  EXPECT_GT(info->rms, 0.02);
}

TEST_F(SynthesizerTest, BadInputNamesTheField) {
  config_.set_max_text_bytes(2000);
  Build();
  auto text = [](std::string t) {
    v1::SynthesizeRequest r;
    r.set_text(std::move(t));
    return r;
  };
  struct Case {
    v1::SynthesizeRequest request;
    bool streaming;
    std::string field;
  };
  std::vector<Case> cases;
  cases.push_back({text(""), false, "text"});
  cases.push_back({text("   \n "), false, "text"});
  cases.push_back({text(std::string(2001, 'a')), false, "text"});
  cases.push_back({text("\xff\xfe bad bytes"), false, "text"});
  {
    v1::SynthesizeRequest r = text("<speak>Hello <break></speak>");
    r.set_ssml(true);
    cases.push_back({r, false, "text"});
  }
  {
    v1::SynthesizeRequest r = text("Hello.");
    r.set_engine("nope");
    cases.push_back({r, false, "engine"});
  }
  {
    v1::SynthesizeRequest r = text("Hello.");
    r.mutable_voice()->set_voice("klingon");
    cases.push_back({r, false, "voice.voice"});
  }
  {
    v1::SynthesizeRequest r = text("Hello.");
    r.mutable_voice()->set_rate(1000);
    cases.push_back({r, false, "voice.rate"});
  }
  {
    v1::SynthesizeRequest r = text("Hello.");
    r.set_format(static_cast<v1::AudioFormat>(42));
    cases.push_back({r, false, "format"});
  }
  {
    v1::SynthesizeRequest r = text("Hello.");
    r.set_format(v1::MP3);
    r.set_sample_rate(44000);
    cases.push_back({r, false, "sample_rate"});
  }
  {
    v1::SynthesizeRequest r = text("Hello.");
    r.set_format(v1::WAV);
    cases.push_back({r, true, "format"});
  }
  for (const Case& c : cases) {
    absl::StatusOr<Plan> plan =
        synthesizer_->PlanText(c.request, absl::InfiniteFuture(), c.streaming);
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(plan.status().message()), StartsWith(c.field + ":")) << plan.status();
  }

  v1::SynthesizeDialogueRequest empty;
  EXPECT_THAT(
      std::string(synthesizer_->PlanDialogue(empty, absl::InfiniteFuture()).status().message()),
      StartsWith("lines:"));
  v1::SynthesizeDialogueRequest dialogue;
  dialogue.add_lines()->set_text("No speaker.");
  EXPECT_THAT(
      std::string(synthesizer_->PlanDialogue(dialogue, absl::InfiniteFuture()).status().message()),
      StartsWith("lines[0].speaker:"));
  dialogue.mutable_lines(0)->set_speaker("host");
  (*dialogue.mutable_voices())["host"].set_pitch(300);
  EXPECT_THAT(
      std::string(synthesizer_->PlanDialogue(dialogue, absl::InfiniteFuture()).status().message()),
      StartsWith("voices[host].pitch:"));
  (*dialogue.mutable_voices())["host"].clear_pitch();
  dialogue.mutable_pause()->set_seconds(60);
  EXPECT_THAT(
      std::string(synthesizer_->PlanDialogue(dialogue, absl::InfiniteFuture()).status().message()),
      StartsWith("pause:"));
}

TEST_F(SynthesizerTest, AnUnreachableCacheServiceIsSkipped) {
  config_.mutable_cache()->set_address(
      absl::StrCat("127.0.0.1:", montage::testing::UnusedLoopbackPort()));
  config_.mutable_cache()->mutable_timeout()->set_nanos(100'000'000);
  Build();
  const std::string before = telemetry::RenderPrometheusText();
  const double unavailable_before =
      telemetry::testing::SampleValue(before, "montage_speech_cache_requests_total",
                                      {{"result", "unavailable"}})
          .value_or(0);
  v1::SynthesizeRequest request;
  request.set_text(Sentences(3));
  request.set_format(v1::WAV);
  std::string audio;
  absl::StatusOr<SynthesisSink::Summary> summary = Run(request, &audio);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->segments_from_cache, 0u);
  EXPECT_TRUE(testing::ProbeAudio(audio).ok());
  const double unavailable_after =
      telemetry::testing::SampleValue(telemetry::RenderPrometheusText(),
                                      "montage_speech_cache_requests_total",
                                      {{"result", "unavailable"}})
          .value_or(0);
  EXPECT_EQ(unavailable_after - unavailable_before, 3);
}

TEST_F(SynthesizerTest, HttpEngineSegmentsAndCancellationReachTheProvider) {
  auto fake = montage::testing::FakeLlmServer::Start();
  ASSERT_TRUE(fake.ok()) << fake.status();
  Build(fake->get());
  v1::SynthesizeRequest request;
  request.set_engine("api");
  request.set_text(Sentences(3, "Remote"));
  request.mutable_voice()->set_voice("nova");
  request.set_format(v1::WAV);
  std::string audio;
  absl::StatusOr<SynthesisSink::Summary> summary = Run(request, &audio);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->segments, 3u);
  absl::StatusOr<testing::AudioInfo> info = testing::ProbeAudio(audio);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->sample_rate, 24000u);
  EXPECT_GT(info->rms, 0.02);

  // A provider that never answers: cancelling the job aborts its transfers.
  montage::testing::Behaviour hang;
  hang.hang = true;
  (*fake)->Enqueue(hang);
  (*fake)->Enqueue(hang);
  request.set_text(Sentences(2, "Hanging"));
  absl::StatusOr<Plan> plan = synthesizer_->PlanText(request, absl::Now() + kWait, false);
  ASSERT_TRUE(plan.ok());
  auto sink = std::make_shared<CollectingSink>();
  std::shared_ptr<SynthesisJob> job = synthesizer_->Start(*std::move(plan), sink);
  ASSERT_TRUE((*fake)->WaitForInFlight(2, kWait));
  job->Cancel();
  EXPECT_EQ(sink->Wait().status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE((*fake)->WaitForDisconnects(2, kWait));

  request.set_ssml(true);
  EXPECT_THAT(
      std::string(
          synthesizer_->PlanText(request, absl::InfiniteFuture(), false).status().message()),
      StartsWith("ssml:"));
}

}  // namespace
}  // namespace montage::speech
