// The OpenAI-compatible speech engine against the fake provider on loopback: the audio and the
// request that asked for it, keys, retries, how each failure is classified, cancellation,
// deadlines and shutdown.
#include "services/speech/http_engine.h"

#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/status.h"
#include "gmock/gmock.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/fake_llm/fake_llm_server.h"

namespace montage::speech {
namespace {

using config::v1::SpeechEngineConfig;
using nlohmann::json;
using testing::Behaviour;
using testing::FakeLlmServer;
using ::testing::HasSubstr;
using ::testing::Not;

// A bound for waits that only fail when something is broken; never a timing assertion.
constexpr absl::Duration kWait = absl::Seconds(20);
// The fake's audio: 60 ms of 24 kHz s16le mono per character.
constexpr size_t kBytesPerChar = 2880;
constexpr char kKeyVariable[] = "MONTAGE_TEST_TTS_KEY";
// 44 characters.
constexpr char kSentence[] = "The quick brown fox jumps over the lazy dog.";

struct Outcome {
  absl::Notification done;
  absl::StatusOr<std::string> pcm = absl::UnknownError("not run");

  TtsEngine::Done Callback() {
    return [this](absl::StatusOr<std::string> result) {
      pcm = std::move(result);
      done.Notify();
    };
  }
  bool Wait() { return done.WaitForNotificationWithTimeout(kWait); }
};

google::rpc::ErrorInfo ErrorInfoOf(const absl::Status& s) {
  google::rpc::ErrorInfo info;
  const google::rpc::Status rpc = ToRpcStatus(s);
  for (const auto& any : rpc.details()) {
    if (any.UnpackTo(&info)) return info;
  }
  return google::rpc::ErrorInfo();
}

std::string BadRequestField(const absl::Status& s) {
  google::rpc::BadRequest bad;
  const google::rpc::Status rpc = ToRpcStatus(s);
  for (const auto& any : rpc.details()) {
    if (any.UnpackTo(&bad) && bad.field_violations_size() > 0) {
      return bad.field_violations(0).field();
    }
  }
  return "";
}

int PeakSample(const std::string& pcm) {
  int peak = 0;
  for (size_t i = 0; i + 1 < pcm.size(); i += 2) {
    const auto sample = static_cast<int16_t>(static_cast<uint16_t>(
        static_cast<unsigned char>(pcm[i]) | (static_cast<unsigned char>(pcm[i + 1]) << 8)));
    peak = std::max(peak, std::abs(static_cast<int>(sample)));
  }
  return peak;
}

Segment Text(std::string text, VoiceParams voice = {}) {
  Segment segment;
  segment.text = std::move(text);
  segment.voice = std::move(voice);
  return segment;
}

absl::Time Later() { return absl::Now() + absl::Seconds(60); }

class HttpEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv(kKeyVariable, "sk-tts-test", 1);
    StartFake(testing::FakeLlmOptions());
    auto http = http::HttpClient::Create();
    ASSERT_TRUE(http.ok()) << http.status();
    http_ = std::shared_ptr<http::HttpClient>(*std::move(http));
  }

  void StartFake(testing::FakeLlmOptions options) {
    auto fake = FakeLlmServer::Start(options);
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
  }

  SpeechEngineConfig Config(uint32_t attempts = 1) const {
    SpeechEngineConfig c;
    c.set_kind(SpeechEngineConfig::OPENAI);
    c.set_base_url(fake_->base_url() + "/v1");
    c.set_model("tts-1");
    c.mutable_api_key()->set_env(kKeyVariable);
    c.mutable_retry()->set_max_attempts(attempts);
    c.mutable_retry()->mutable_initial_backoff()->set_nanos(1'000'000);
    c.mutable_retry()->mutable_max_backoff()->set_nanos(5'000'000);
    return c;
  }

  std::unique_ptr<TtsEngine> Make(const SpeechEngineConfig& c) {
    auto engine = NewOpenAiSpeechEngine(c, http_);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? *std::move(engine) : nullptr;
  }

  // Synthesizes and waits; the result. Gives up (cancelling) only when something is broken.
  absl::StatusOr<std::string> Speak(TtsEngine& engine, Segment segment,
                                    absl::Time deadline = Later()) {
    // Shared with the callback, which may still come after the test gave up.
    auto out = std::make_shared<Outcome>();
    std::shared_ptr<SynthesisHandle> handle =
        engine.Synthesize(std::move(segment), deadline, [out](absl::StatusOr<std::string> pcm) {
          out->pcm = std::move(pcm);
          out->done.Notify();
        });
    if (!out->Wait()) {
      handle->Cancel();
      return absl::DeadlineExceededError("the test gave up waiting");
    }
    return std::move(out->pcm);
  }

  json LastBody() const {
    const auto recent = fake_->stats().recent;
    return recent.empty() ? json() : json::parse(recent.back().body, nullptr, false);
  }

  std::unique_ptr<FakeLlmServer> fake_;
  std::shared_ptr<http::HttpClient> http_;
};

TEST_F(HttpEngineTest, SynthesizesNonSilentPcmOfTheExpectedLength) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->sample_rate(), 24000u);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text(kSentence));
  ASSERT_TRUE(pcm.ok()) << pcm.status();
  EXPECT_EQ(pcm->size(), 44 * kBytesPerChar);
  EXPECT_GT(PeakSample(*pcm), 1000) << "the audio is silent";

  const auto stats = fake_->stats();
  EXPECT_EQ(stats.tts_requests, 1u);
  ASSERT_EQ(stats.recent.size(), 1u);
  const testing::RecordedRequest& request = stats.recent[0];
  EXPECT_EQ(request.method, "POST");
  EXPECT_EQ(request.path, "/v1/audio/speech");
  EXPECT_EQ(request.header("content-type"), "application/json");
  EXPECT_EQ(request.header("authorization"), "<redacted>");
  const json body = json::parse(request.body);
  EXPECT_EQ(body, json({{"model", "tts-1"},
                        {"input", kSentence},
                        {"voice", "alloy"},
                        {"response_format", "pcm"},
                        {"speed", 1.0}}));
}

TEST_F(HttpEngineTest, VoiceSpeedAndHeadersReachTheProvider) {
  SpeechEngineConfig c = Config();
  (*c.mutable_headers())["X-Team"] = "video";
  auto engine = Make(c);
  ASSERT_NE(engine, nullptr);
  VoiceParams voice;
  voice.voice = "nova";
  voice.rate = 2.0;
  absl::StatusOr<std::string> fast = Speak(*engine, Text(kSentence, voice));
  ASSERT_TRUE(fast.ok()) << fast.status();
  EXPECT_EQ(fast->size(), 22 * kBytesPerChar);
  const json body = LastBody();
  EXPECT_EQ(body["voice"], "nova");
  EXPECT_EQ(body["speed"], 2.0);
  EXPECT_EQ(fake_->stats().recent.back().header("x-team"), "video");

  // Another voice sounds different at the same length.
  voice.voice = "onyx";
  voice.rate.reset();
  absl::StatusOr<std::string> onyx = Speak(*engine, Text(kSentence, voice));
  absl::StatusOr<std::string> alloy = Speak(*engine, Text(kSentence));
  ASSERT_TRUE(onyx.ok() && alloy.ok());
  EXPECT_EQ(onyx->size(), alloy->size());
  EXPECT_NE(*onyx, *alloy);
}

TEST_F(HttpEngineTest, ConcurrentSegmentsAllComplete) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  fake_->set_default_delay(absl::Milliseconds(20));
  constexpr size_t kCalls = 8;
  std::vector<std::unique_ptr<Outcome>> outs;
  for (size_t i = 0; i < kCalls; ++i) {
    outs.push_back(std::make_unique<Outcome>());
    engine->Synthesize(Text(std::string(i + 1, 'a')), Later(), outs.back()->Callback());
  }
  for (size_t i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(outs[i]->Wait());
    ASSERT_TRUE(outs[i]->pcm.ok()) << outs[i]->pcm.status();
    EXPECT_EQ(outs[i]->pcm->size(), (i + 1) * kBytesPerChar);
  }
  EXPECT_EQ(fake_->stats().tts_requests, kCalls);
}

TEST_F(HttpEngineTest, ACallbackMayStartTheNextSegment) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  Outcome second;
  Outcome first;
  TtsEngine* raw = engine.get();
  raw->Synthesize(Text("one"), Later(), [&](absl::StatusOr<std::string> pcm) {
    first.pcm = std::move(pcm);
    raw->Synthesize(Text("two two"), Later(), second.Callback());
    first.done.Notify();
  });
  ASSERT_TRUE(first.Wait());
  ASSERT_TRUE(second.Wait());
  ASSERT_TRUE(first.pcm.ok()) << first.pcm.status();
  ASSERT_TRUE(second.pcm.ok()) << second.pcm.status();
  EXPECT_EQ(second.pcm->size(), 7 * kBytesPerChar);
}

TEST_F(HttpEngineTest, SendsTheKeyAsABearerToken) {
  fake_->set_expected_key("sk-right");
  setenv(kKeyVariable, "sk-right", 1);
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hi"));
  EXPECT_TRUE(pcm.ok()) << pcm.status();
}

TEST_F(HttpEngineTest, RejectedKeyIsFailedPreconditionNeverEchoedNorRetried) {
  const std::string wrong = "sk-wrong-secret-5678";
  fake_->set_expected_key("sk-right");
  setenv(kKeyVariable, wrong.c_str(), 1);
  auto engine = Make(Config(/*attempts=*/3));
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hi"));
  ASSERT_EQ(pcm.status().code(), absl::StatusCode::kFailedPrecondition) << pcm.status();
  const google::rpc::ErrorInfo info = ErrorInfoOf(pcm.status());
  EXPECT_EQ(info.reason(), "PROVIDER_AUTH_FAILED");
  EXPECT_EQ(info.domain(), kSpeechErrorDomain);
  EXPECT_THAT(std::string(pcm.status().message()), Not(HasSubstr(wrong)));
  EXPECT_EQ(fake_->stats().tts_requests, 1u);

  // Real providers quote part of the key back; none of it reaches the message.
  Behaviour quoting;
  quoting.status = 401;
  quoting.body = R"({"error":{"message":"Incorrect API key provided: sk-wro***5678.",)"
                 R"("type":"invalid_request_error","code":"invalid_api_key"}})";
  fake_->Enqueue(quoting);
  pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(pcm.status().message()), Not(HasSubstr("sk-")));
  EXPECT_THAT(pcm.status().ToString(), Not(HasSubstr("5678")));
}

TEST_F(HttpEngineTest, ServerErrorThenSuccessIsRetried) {
  auto engine = Make(Config(/*attempts=*/3));
  ASSERT_NE(engine, nullptr);
  Behaviour failure;
  failure.status = 500;
  fake_->Enqueue(failure);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("retry me"));
  ASSERT_TRUE(pcm.ok()) << pcm.status();
  EXPECT_EQ(pcm->size(), 8 * kBytesPerChar);
  EXPECT_EQ(fake_->stats().tts_requests, 2u);
}

TEST_F(HttpEngineTest, QuotaExhaustedIsNotRetried) {
  auto engine = Make(Config(/*attempts=*/3));
  ASSERT_NE(engine, nullptr);
  Behaviour quota;
  quota.status = 429;
  quota.kind = "insufficient_quota";
  fake_->Enqueue(quota);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kFailedPrecondition) << pcm.status();
  EXPECT_EQ(ErrorInfoOf(pcm.status()).reason(), "PROVIDER_QUOTA_EXHAUSTED");
  EXPECT_EQ(fake_->stats().tts_requests, 1u);
}

TEST_F(HttpEngineTest, FailuresAfterTheLastAttemptAreClassified) {
  auto engine = Make(Config(/*attempts=*/2));
  ASSERT_NE(engine, nullptr);
  ASSERT_TRUE(fake_
                  ->EnqueueJson(R"([{"status": 429, "headers": {"retry-after": "0"}},
                                    {"status": 429, "headers": {"retry-after": "0"}},
                                    {"status": 503}, {"status": 502},
                                    {"status": 400, "body": "{\"error\": {\"message\": \"bad\"}}"},
                                    {"status": 404}])")
                  .ok());
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kResourceExhausted) << pcm.status();
  EXPECT_EQ(ErrorInfoOf(pcm.status()).reason(), "PROVIDER_RATE_LIMITED");
  pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kUnavailable) << pcm.status();
  EXPECT_EQ(ErrorInfoOf(pcm.status()).reason(), "PROVIDER_UNAVAILABLE");
  pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kInvalidArgument) << pcm.status();
  EXPECT_EQ(ErrorInfoOf(pcm.status()).reason(), "PROVIDER_REJECTED_REQUEST");
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("bad"));
  pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kFailedPrecondition) << pcm.status();
  EXPECT_EQ(ErrorInfoOf(pcm.status()).reason(), "PROVIDER_MODEL_NOT_FOUND");
  EXPECT_EQ(fake_->stats().tts_requests, 6u) << "400 and 404 are not retried";
}

TEST_F(HttpEngineTest, AnswersThatAreNotPcmAreUnavailable) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  Behaviour json_error;
  json_error.status = 200;
  json_error.body = R"({"error": {"message": "voice model not loaded"}})";
  fake_->Enqueue(json_error);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kUnavailable) << pcm.status();
  EXPECT_EQ(ErrorInfoOf(pcm.status()).reason(), "PROVIDER_BAD_ANSWER");
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("application/json"));
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("voice model not loaded"));

  Behaviour odd;
  odd.invalid_json = true;  // the fake's speech answer then has half a sample too many
  fake_->Enqueue(odd);
  pcm = Speak(*engine, Text("hi"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kUnavailable) << pcm.status();
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("odd number of bytes"));
}

TEST_F(HttpEngineTest, CancelAbortsTheUpstreamTransfer) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  Outcome out;
  std::shared_ptr<SynthesisHandle> handle =
      engine->Synthesize(Text("hello"), Later(), out.Callback());
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  handle->Cancel();
  handle->Cancel();
  ASSERT_TRUE(out.Wait());
  EXPECT_EQ(out.pcm.status().code(), absl::StatusCode::kCancelled) << out.pcm.status();
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait)) << "the fake never saw the connection close";
}

TEST_F(HttpEngineTest, DeadlineEndsAHangingCall) {
  auto engine = Make(Config(/*attempts=*/3));
  ASSERT_NE(engine, nullptr);
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  absl::StatusOr<std::string> pcm =
      Speak(*engine, Text("hello"), absl::Now() + absl::Milliseconds(100));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kDeadlineExceeded) << pcm.status();
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait));

  // A deadline already gone costs no request.
  const uint64_t requests = fake_->stats().tts_requests;
  pcm = Speak(*engine, Text("hello"), absl::Now() - absl::Seconds(1));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kDeadlineExceeded) << pcm.status();
  EXPECT_EQ(fake_->stats().tts_requests, requests);
}

TEST_F(HttpEngineTest, SegmentTimeoutBoundsACallWithoutDeadline) {
  SpeechEngineConfig c = Config();
  c.mutable_segment_timeout()->set_nanos(100'000'000);
  auto engine = Make(c);
  ASSERT_NE(engine, nullptr);
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hello"), absl::InfiniteFuture());
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kDeadlineExceeded) << pcm.status();
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("segment_timeout"));
}

TEST_F(HttpEngineTest, ValidateNamesTheField) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  VoiceParams v;
  EXPECT_TRUE(engine->Validate(v).ok());
  v.voice = "shimmer";
  v.rate = 0.25;
  EXPECT_TRUE(engine->Validate(v).ok());

  v = VoiceParams();
  v.voice = "x";
  absl::Status s = engine->Validate(v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("voice.voice: unknown voice \"x\""));
  EXPECT_THAT(std::string(s.message()), HasSubstr("ListVoices"));
  EXPECT_EQ(BadRequestField(s), "voice.voice");

  for (double rate : {0.2, 4.5, -1.0}) {
    v = VoiceParams();
    v.rate = rate;
    s = engine->Validate(v);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << rate;
    EXPECT_EQ(BadRequestField(s), "voice.rate") << rate;
    EXPECT_THAT(std::string(s.message()), HasSubstr("voice.rate: ")) << rate;
  }
  v = VoiceParams();
  v.pitch = 50;
  s = engine->Validate(v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("voice.pitch"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("does not support"));
  v = VoiceParams();
  v.volume = 100;
  s = engine->Validate(v);
  EXPECT_EQ(BadRequestField(s), "voice.volume");
  EXPECT_THAT(std::string(s.message()), HasSubstr("does not support"));

  // Synthesize checks the same, before any request.
  v = VoiceParams();
  v.voice = "nobody";
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("hi", v));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BadRequestField(pcm.status()), "voice.voice");
  EXPECT_EQ(fake_->stats().total_requests, 0u);
}

TEST_F(HttpEngineTest, RejectsSsmlAndOverlongTextAndSkipsBlankText) {
  SpeechEngineConfig c = Config();
  c.set_max_input_chars(10);
  auto engine = Make(c);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->max_segment_chars(), 10u);
  EXPECT_FALSE(engine->supports_ssml());

  absl::StatusOr<std::string> pcm = Speak(*engine, Text("eleven char"));
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("max_segment_chars"));
  // Characters, not bytes: ten accented letters fit.
  pcm = Speak(*engine, Text("éééééééééé"));
  ASSERT_TRUE(pcm.ok()) << pcm.status();
  EXPECT_EQ(pcm->size(), 10 * kBytesPerChar);

  Segment ssml = Text("<speak>hi</speak>");
  ssml.ssml = true;
  pcm = Speak(*engine, ssml);
  EXPECT_EQ(pcm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(pcm.status().message()), HasSubstr("SSML"));

  pcm = Speak(*engine, Text(" \n\t "));
  ASSERT_TRUE(pcm.ok()) << pcm.status();
  EXPECT_TRUE(pcm->empty());
  EXPECT_EQ(fake_->stats().tts_requests, 1u);
}

TEST_F(HttpEngineTest, VoicesLimitsAndDefaultsFollowTheConfig) {
  auto openai = Make(Config());
  ASSERT_NE(openai, nullptr);
  EXPECT_EQ(openai->kind(), "openai");
  EXPECT_EQ(openai->max_segment_chars(), 4096u);
  EXPECT_EQ(openai->max_concurrency(), 8u);
  std::vector<std::string> names;
  for (const VoiceInfo& v : openai->Voices()) {
    names.push_back(v.name);
    EXPECT_EQ(v.gender, "");
  }
  EXPECT_EQ(names, (std::vector<std::string>{"alloy", "ash", "ballad", "coral", "echo", "fable",
                                             "nova", "onyx", "sage", "shimmer"}));

  SpeechEngineConfig c = Config();
  c.add_voices("af_bella");
  c.add_voices("am_adam");
  c.set_default_voice("am_adam");
  c.set_max_concurrency(3);
  auto kokoro = Make(c);
  ASSERT_NE(kokoro, nullptr);
  EXPECT_EQ(kokoro->max_concurrency(), 3u);
  ASSERT_EQ(kokoro->Voices().size(), 2u);
  EXPECT_EQ(kokoro->Voices()[0].name, "af_bella");
  VoiceParams alloy;
  alloy.voice = "alloy";
  EXPECT_EQ(kokoro->Validate(alloy).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(Speak(*kokoro, Text("hi")).ok());
  EXPECT_EQ(LastBody()["voice"], "am_adam");

  // Without default_voice: alloy when offered, else the first voice.
  c.clear_default_voice();
  auto first = Make(c);
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(Speak(*first, Text("hi")).ok());
  EXPECT_EQ(LastBody()["voice"], "af_bella");
}

TEST_F(HttpEngineTest, ShutdownCancelsCallsInFlightAndRefusesNewOnes) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  fake_->set_default_delay(absl::Hours(1));
  constexpr int kCalls = 3;
  Outcome outs[kCalls];
  for (Outcome& out : outs) engine->Synthesize(Text("wait for it"), Later(), out.Callback());
  ASSERT_TRUE(fake_->WaitForInFlight(kCalls, kWait));

  engine->Shutdown();
  // Shutdown returned, so every callback has run already.
  for (Outcome& out : outs) {
    ASSERT_TRUE(out.done.HasBeenNotified());
    EXPECT_EQ(out.pcm.status().code(), absl::StatusCode::kCancelled) << out.pcm.status();
  }
  EXPECT_TRUE(fake_->WaitForDisconnects(kCalls, kWait));

  Outcome late;
  engine->Synthesize(Text("too late"), Later(), late.Callback());
  ASSERT_TRUE(late.done.HasBeenNotified()) << "a call after Shutdown must end at once";
  EXPECT_EQ(late.pcm.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(fake_->stats().tts_requests, static_cast<uint64_t>(kCalls));
  engine->Shutdown();  // idempotent
}

TEST_F(HttpEngineTest, DestroyingTheEngineEndsItsCalls) {
  auto engine = Make(Config());
  ASSERT_NE(engine, nullptr);
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  Outcome out;
  std::shared_ptr<SynthesisHandle> handle = engine->Synthesize(Text("hi"), Later(), out.Callback());
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  engine.reset();
  ASSERT_TRUE(out.done.HasBeenNotified());
  EXPECT_EQ(out.pcm.status().code(), absl::StatusCode::kCancelled);
  handle->Cancel();  // still safe
}

// With Debian's libcurl 7.88 the shared HTTP client stalls an HTTP/2 answer whose last DATA frame
// is larger than its 8 KiB receive buffer until the deadline (common/http, not this engine). The
// texts here are short enough to stay clear of it; the disabled test below shows it.
TEST_F(HttpEngineTest, SpeaksH2cWithPriorKnowledge) {
  testing::FakeLlmOptions options;
  options.h2c_port = 0;
  StartFake(options);
  SpeechEngineConfig c = Config();
  c.set_base_url(fake_->h2c_base_url() + "/v1");
  c.set_http2_prior_knowledge(true);
  auto engine = Make(c);
  ASSERT_NE(engine, nullptr);
  // 5760 bytes: one DATA frame under 8 KiB.
  absl::StatusOr<std::string> pcm = Speak(*engine, Text("Hi"));
  ASSERT_TRUE(pcm.ok()) << pcm.status();
  EXPECT_EQ(pcm->size(), 2 * kBytesPerChar);
  EXPECT_GE(fake_->stats().h2c_connections, 1u) << "the call did not arrive over h2c";
}

// Enable once common/http receives HTTP/2 answers of any size (see above).
TEST_F(HttpEngineTest, SpeaksH2cAnswersOfAnySize) {
  testing::FakeLlmOptions options;
  options.h2c_port = 0;
  StartFake(options);
  SpeechEngineConfig c = Config();
  c.set_base_url(fake_->h2c_base_url() + "/v1");
  c.set_http2_prior_knowledge(true);
  c.mutable_segment_timeout()->set_seconds(5);
  auto engine = Make(c);
  ASSERT_NE(engine, nullptr);
  for (size_t chars = 1; chars <= 12; ++chars) {
    absl::StatusOr<std::string> pcm = Speak(*engine, Text(std::string(chars, 'a')));
    ASSERT_TRUE(pcm.ok()) << chars << " characters: " << pcm.status();
    EXPECT_EQ(pcm->size(), chars * kBytesPerChar);
  }
}

TEST_F(HttpEngineTest, BadConfigNamesTheField) {
  SpeechEngineConfig c = Config();
  c.set_kind(SpeechEngineConfig::ESPEAK);
  EXPECT_EQ(BadRequestField(NewOpenAiSpeechEngine(c, http_).status()), "kind");
  c = Config();
  c.set_base_url("ftp://example");
  EXPECT_EQ(BadRequestField(NewOpenAiSpeechEngine(c, http_).status()), "base_url");
  c = Config();
  c.clear_model();
  EXPECT_EQ(BadRequestField(NewOpenAiSpeechEngine(c, http_).status()), "model");
  c = Config();
  c.set_default_voice("zelda");
  EXPECT_EQ(BadRequestField(NewOpenAiSpeechEngine(c, http_).status()), "default_voice");
  c = Config();
  EXPECT_EQ(NewOpenAiSpeechEngine(c, nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);
  c.mutable_api_key()->set_env("MONTAGE_TEST_SURELY_UNSET_VARIABLE");
  absl::Status s = NewOpenAiSpeechEngine(c, http_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("MONTAGE_TEST_SURELY_UNSET_VARIABLE"));
}

}  // namespace
}  // namespace montage::speech
