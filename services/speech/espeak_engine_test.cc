#include "services/speech/espeak_engine.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/speech/testing/audio_probe.h"

namespace montage::speech {
namespace {

using ::testing::HasSubstr;

// Waits (bounded) for one synthesis and returns its result.
class Result {
 public:
  TtsEngine::Done Callback() {
    return [this](absl::StatusOr<std::string> pcm) {
      absl::MutexLock lock(&mu_);
      result_ = std::move(pcm);
      done_ = true;
    };
  }
  absl::StatusOr<std::string> Wait() {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithTimeout(absl::Condition(&done_), absl::Seconds(60))) {
      return absl::DeadlineExceededError("the test gave up waiting");
    }
    return result_;
  }

 private:
  absl::Mutex mu_;
  bool done_ = false;
  absl::StatusOr<std::string> result_ = absl::UnknownError("not run");
};

std::unique_ptr<TtsEngine> Engine() {
  absl::StatusOr<std::unique_ptr<TtsEngine>> engine = NewEspeakEngine({});
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

absl::StatusOr<std::string> Speak(TtsEngine& engine, Segment segment) {
  Result result;
  engine.Synthesize(std::move(segment), absl::InfiniteFuture(), result.Callback());
  return result.Wait();
}

Segment Text(std::string text, std::string voice = "") {
  Segment s;
  s.text = std::move(text);
  s.voice.voice = std::move(voice);
  return s;
}

TEST(EspeakEngineTest, SpeaksAudibleMonoPcmOfAPlausibleLength) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->sample_rate(), 22050u);
  absl::StatusOr<std::string> pcm =
      Speak(*engine, Text("The quick brown fox jumps over the lazy dog, twice."));
  ASSERT_TRUE(pcm.ok()) << pcm.status();
  ASSERT_EQ(pcm->size() % 2, 0u);
  testing::AudioInfo info = testing::ProbePcm(*pcm, 22050);
  // Ten words at espeak's default 175 words per minute: about 3.4 s, plus a sentence pause.
  EXPECT_GT(info.duration_seconds, 2.0);
  EXPECT_LT(info.duration_seconds, 6.0);
  EXPECT_GT(info.rms, 0.02);
}

TEST(EspeakEngineTest, RateAndSsmlBreaksChangeTheAudio) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  const std::string text = "Reading this sentence takes a little while at any speed.";
  Segment slow = Text(text);
  slow.voice.rate = 100;
  Segment fast = Text(text);
  fast.voice.rate = 400;
  absl::StatusOr<std::string> a = Speak(*engine, slow);
  absl::StatusOr<std::string> b = Speak(*engine, fast);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_GT(a->size(), b->size() * 2);

  Segment plain = Text("<speak>Hello world.</speak>");
  plain.ssml = true;
  Segment paused = Text("<speak>Hello <break time=\"2s\"/> world.</speak>");
  paused.ssml = true;
  absl::StatusOr<std::string> c = Speak(*engine, plain);
  absl::StatusOr<std::string> d = Speak(*engine, paused);
  ASSERT_TRUE(c.ok() && d.ok());
  const double extra =
      testing::ProbePcm(*d, 22050).duration_seconds - testing::ProbePcm(*c, 22050).duration_seconds;
  EXPECT_GT(extra, 1.5);
  // SSML markup is not read out: the plain document is about as long as the bare text.
  absl::StatusOr<std::string> e = Speak(*engine, Text("Hello world."));
  ASSERT_TRUE(e.ok());
  EXPECT_NEAR(testing::ProbePcm(*c, 22050).duration_seconds,
              testing::ProbePcm(*e, 22050).duration_seconds, 0.3);
}

TEST(EspeakEngineTest, VoicesDiffer) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<std::string> male = Speak(*engine, Text("Good morning.", "en-us+m3"));
  absl::StatusOr<std::string> female = Speak(*engine, Text("Good morning.", "en-us+f3"));
  absl::StatusOr<std::string> german = Speak(*engine, Text("Guten Morgen.", "de"));
  ASSERT_TRUE(male.ok() && female.ok() && german.ok());
  EXPECT_NE(*male, *female);
  EXPECT_GT(testing::ProbePcm(*german, 22050).rms, 0.02);
}

TEST(EspeakEngineTest, ListsVoicesByFileNameWithLanguageAndGender) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  std::vector<VoiceInfo> voices = engine->Voices();
  EXPECT_GT(voices.size(), 50u);
  bool us = false, gb = false;
  for (const VoiceInfo& v : voices) {
    if (v.name == "en-us") us = v.language == "en-us";
    if (v.name == "en") gb = v.language == "en-gb";
  }
  EXPECT_TRUE(us);
  EXPECT_TRUE(gb);
}

TEST(EspeakEngineTest, ValidateNamesTheField) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  VoiceParams ok;
  ok.voice = "en-us+f3";
  ok.rate = 200;
  ok.pitch = 60;
  ok.volume = 150;
  EXPECT_TRUE(engine->Validate(ok).ok());
  struct Case {
    VoiceParams voice;
    std::string field;
  };
  std::vector<Case> cases(5);
  cases[0].voice.voice = "klingon";
  cases[0].field = "voice.voice";
  cases[1].voice.voice = "en-us+nosuchvariant";
  cases[1].field = "voice.voice";
  cases[2].voice.rate = 20;
  cases[2].field = "voice.rate";
  cases[3].voice.pitch = 101;
  cases[3].field = "voice.pitch";
  cases[4].voice.volume = 201;
  cases[4].field = "voice.volume";
  for (const Case& c : cases) {
    absl::Status status = engine->Validate(c.voice);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(status.message()), ::testing::StartsWith(c.field + ":"));
  }
}

TEST(EspeakEngineTest, OnlyOneEnginePerProcess) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<std::unique_ptr<TtsEngine>> second = NewEspeakEngine({});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  engine.reset();
  EXPECT_TRUE(NewEspeakEngine({}).ok());
}

TEST(EspeakEngineTest, CancelDropsQueuedWorkAndShutdownEndsTheRest) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  std::string long_text;
  for (int i = 0; i < 40; ++i) long_text += "This sentence keeps the synthesis thread busy. ";
  Result first, second, third;
  engine->Synthesize(Text(long_text), absl::InfiniteFuture(), first.Callback());
  auto handle = engine->Synthesize(Text(long_text), absl::InfiniteFuture(), second.Callback());
  engine->Synthesize(Text(long_text), absl::InfiniteFuture(), third.Callback());
  handle->Cancel();
  EXPECT_EQ(second.Wait().status().code(), absl::StatusCode::kCancelled);
  engine->Shutdown();
  // The first may have finished before Shutdown; the third was still queued or running.
  absl::StatusOr<std::string> a = first.Wait();
  EXPECT_TRUE(a.ok() || a.status().code() == absl::StatusCode::kCancelled) << a.status();
  EXPECT_EQ(third.Wait().status().code(), absl::StatusCode::kCancelled);
  Result late;
  engine->Synthesize(Text("Too late."), absl::InfiniteFuture(), late.Callback());
  EXPECT_EQ(late.Wait().status().code(), absl::StatusCode::kCancelled);
}

TEST(EspeakEngineTest, APassedDeadlineEndsTheCall) {
  auto engine = Engine();
  ASSERT_NE(engine, nullptr);
  Result result;
  engine->Synthesize(Text("Never spoken."), absl::Now() - absl::Seconds(1), result.Callback());
  absl::StatusOr<std::string> pcm = result.Wait();
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("deadline"));
}

}  // namespace
}  // namespace montage::speech
