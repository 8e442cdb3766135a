// The speech service in a real montaged: audio decoded with libavformat, the segment cache across
// calls, streaming, dialogue, the unary size limit, the http engine against the fake provider,
// bad input, and the CLI's podcast command (the README's main job).

#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "montage/speech/v1/speech.grpc.pb.h"
#include "services/speech/testing/audio_probe.h"
#include "tests/fake_llm/fake_llm_server.h"
#include "tests/integration/montaged_process.h"
#include "tests/testing/child_processes.h"
#include "tests/testing/eventually.h"

namespace montage::testing {
namespace {

namespace speechpb = ::montage::speech::v1;
using ::testing::HasSubstr;
using ::testing::StartsWith;

std::unique_ptr<speechpb::SpeechService::Stub> Stub(const MontagedProcess& process) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  return speechpb::SpeechService::NewStub(
      grpc::CreateCustomChannel(process.grpc_address(), grpc::InsecureChannelCredentials(), args));
}

// The names (comm) of the processes whose parent is `parent`.
std::vector<std::string> ChildNames(pid_t parent) {
  std::vector<std::string> names;
  for (const ChildProcess& child : ChildProcesses(parent)) names.push_back(child.name);
  return names;
}

std::string Script(int sentences) {
  std::string text;
  for (int i = 0; i < sentences; ++i) {
    absl::StrAppend(&text, "Line ", i + 1, " of the script says something worth hearing. ");
  }
  return text;
}

grpc::Status Synthesize(speechpb::SpeechService::Stub& stub, const speechpb::SynthesizeRequest& r,
                        speechpb::SynthesizeResponse* response) {
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(60));
  return stub.Synthesize(&ctx, r, response);
}

TEST(SpeechIntegrationTest, SynthesizeCachesSegmentsAcrossCalls) {
  // Two lanes whatever the machine's cores, so that there is a worker process to look at.
  auto process =
      MontagedProcess::Start({"speech", "--set=speech.engines.espeak.max_concurrency=2"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = Stub(**process);
  // The espeak pool's second lane is the small worker program built beside montaged (the kernel
  // keeps 15 characters of a process name).
  EXPECT_THAT(ChildNames((*process)->pid()), ::testing::Contains("montage-espeak-"));

  speechpb::SynthesizeRequest request;
  request.set_text(Script(8));
  request.set_format(speechpb::WAV);
  speechpb::SynthesizeResponse first;
  grpc::Status s = Synthesize(*stub, request, &first);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(first.audio().content_type(), "audio/wav");
  EXPECT_EQ(first.format(), speechpb::WAV);
  EXPECT_EQ(first.sample_rate(), 22050u);
  EXPECT_EQ(first.channels(), 1u);
  EXPECT_EQ(first.segments(), 8u);
  EXPECT_EQ(first.segments_from_cache(), 0u);
  absl::StatusOr<speech::testing::AudioInfo> info =
      speech::testing::ProbeAudio(first.audio().data());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->container, "wav");
  EXPECT_EQ(info->sample_rate, 22050u);
  EXPECT_EQ(info->channels, 1u);
  // 72 words at 175 words per minute is about 25 s; sentence pauses add a little.
  EXPECT_GT(info->duration_seconds, 15);
  EXPECT_LT(info->duration_seconds, 45);
  EXPECT_NEAR(info->duration_seconds, first.duration().seconds() + first.duration().nanos() / 1e9,
              0.1);
  EXPECT_GT(info->rms, 0.02);

  speechpb::SynthesizeResponse again;
  ASSERT_TRUE(Synthesize(*stub, request, &again).ok());
  EXPECT_EQ(again.segments_from_cache(), 8u);
  EXPECT_EQ(again.audio().data(), first.audio().data());

  // One edited line is the only segment synthesised again.
  std::string edited = Script(8);
  edited.replace(edited.find("Line 3 of"), 9, "Line three of");
  request.set_text(edited);
  request.set_format(speechpb::MP3);
  speechpb::SynthesizeResponse third;
  ASSERT_TRUE(Synthesize(*stub, request, &third).ok());
  EXPECT_EQ(third.segments_from_cache(), 7u);
  EXPECT_EQ(third.audio().content_type(), "audio/mpeg");
  info = speech::testing::ProbeAudio(third.audio().data());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->container, "mp3");

  auto [status, metrics] = HttpGet((*process)->admin_address(), "/metrics");
  ASSERT_EQ(status, 200);
  EXPECT_EQ(MetricValue(metrics, "montage_speech_segments_total", "source=\"engine\""), 9);
  EXPECT_EQ(MetricValue(metrics, "montage_speech_segments_total", "source=\"cache\""), 15);
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

TEST(SpeechIntegrationTest, StreamSendsChunksThenALastOneWithTheDuration) {
  auto process = MontagedProcess::Start({"speech"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = Stub(**process);
  speechpb::SynthesizeRequest request;
  request.set_text(Script(20));
  request.set_format(speechpb::OGG_OPUS);
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(60));
  auto reader = stub->StreamSynthesize(&ctx, request);
  speechpb::AudioChunk chunk;
  std::string audio;
  int chunks = 0;
  bool last = false;
  std::string content_type;
  double seconds = 0;
  while (reader->Read(&chunk)) {
    if (chunks++ == 0) content_type = chunk.content_type();
    audio += chunk.data();
    last = chunk.last();
    if (last) seconds = chunk.duration().seconds() + chunk.duration().nanos() / 1e9;
  }
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(content_type, "audio/ogg");
  EXPECT_GT(chunks, 2);
  EXPECT_TRUE(last);
  absl::StatusOr<speech::testing::AudioInfo> info = speech::testing::ProbeAudio(audio);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->codec, "opus");
  EXPECT_NEAR(info->duration_seconds, seconds, 0.1);
  EXPECT_GT(info->rms, 0.02);

  // Formats that need their end first cannot stream.
  request.set_format(speechpb::AAC);
  grpc::ClientContext ctx2;
  WithDeadline(ctx2);
  auto refused = stub->StreamSynthesize(&ctx2, request);
  EXPECT_FALSE(refused->Read(&chunk));
  s = refused->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "format");
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

// Calls cancelled as they start: the cancel reaches the server while the call is planned (a text
// near speech.max_text_bytes takes a while to segment) or as its first segments start; no test
// can pin which. The server ends them as CANCELLED (its own metric says so for the streamed
// ones), nothing crashes, and it answers the next call.
TEST(SpeechIntegrationTest, CallsCancelledAsTheyStartEndQuietly) {
  auto process = MontagedProcess::Start({"speech"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = Stub(**process);
  speechpb::SynthesizeRequest big;
  while (big.text().size() < (900u << 10)) *big.mutable_text() += Script(50);
  big.set_format(speechpb::PCM);
  for (int i = 0; i < 10; ++i) {
    grpc::ClientContext stream_ctx;
    WithDeadline(stream_ctx, absl::Seconds(60));
    auto reader = stub->StreamSynthesize(&stream_ctx, big);
    stream_ctx.TryCancel();
    speechpb::AudioChunk chunk;
    while (reader->Read(&chunk)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);

    grpc::ClientContext unary_ctx;
    WithDeadline(unary_ctx, absl::Seconds(60));
    speechpb::SynthesizeResponse response;
    grpc::CompletionQueue cq;
    auto call = stub->AsyncSynthesize(&unary_ctx, big, &cq);
    grpc::Status status;
    call->Finish(&response, &status, reinterpret_cast<void*>(1));
    unary_ctx.TryCancel();
    void* tag = nullptr;
    bool ok = false;
    ASSERT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  }
  // The streamed calls reached the server before their cancel (the synchronous stub returns once
  // the request is sent), so the server counts them. A unary call cancelled at once may be
  // dropped by gRPC before any handler runs, so it is not counted here.
  EXPECT_TRUE(Eventually([&] {
    return MetricValue(HttpGet((*process)->admin_address(), "/metrics").second,
                       "montage_grpc_server_requests_total",
                       "code=\"CANCELLED\",method=\"/montage.speech.v1.SpeechService/"
                       "StreamSynthesize\"") > 0;
  }));
  speechpb::SynthesizeRequest small;
  small.set_text(Script(2));
  small.set_format(speechpb::WAV);
  speechpb::SynthesizeResponse answer;
  grpc::Status s = Synthesize(*stub, small, &answer);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(answer.segments(), 2u);
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

TEST(SpeechIntegrationTest, DialogueVoicesAndLimits) {
  auto process = MontagedProcess::Start(
      {"speech", "--set=speech.max_unary_audio_bytes=200KiB", "--set=speech.max_text_bytes=4KiB"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = Stub(**process);

  speechpb::SynthesizeDialogueRequest dialogue;
  for (int i = 0; i < 4; ++i) {
    speechpb::DialogueLine* line = dialogue.add_lines();
    line->set_speaker(i % 2 == 0 ? "host" : "guest");
    line->set_text(i % 2 == 0 ? "So, what did you learn?"
                              : "That short takes keep people watching.");
  }
  (*dialogue.mutable_voices())["guest"].set_voice("en-gb-x-rp+f2");
  dialogue.set_format(speechpb::AAC);
  speechpb::SynthesizeResponse audio;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx, absl::Seconds(60));
    grpc::Status s = stub->SynthesizeDialogue(&ctx, dialogue, &audio);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(audio.audio().content_type(), "audio/mp4");
  absl::StatusOr<speech::testing::AudioInfo> info =
      speech::testing::ProbeAudio(audio.audio().data());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->codec, "aac");
  EXPECT_GT(info->duration_seconds, 6);  // four turns and three pauses
  EXPECT_GT(info->rms, 0.02);

  // Over the unary limit: a clear error pointing at streaming.
  speechpb::SynthesizeRequest big;
  big.set_text(Script(20));
  big.set_format(speechpb::WAV);
  speechpb::SynthesizeResponse response;
  grpc::Status s = Synthesize(*stub, big, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("StreamSynthesize"));

  speechpb::ListVoicesRequest voices_request;
  voices_request.set_language("en");
  speechpb::ListVoicesResponse voices;
  grpc::ClientContext vctx;
  WithDeadline(vctx);
  ASSERT_TRUE(stub->ListVoices(&vctx, voices_request, &voices).ok());
  EXPECT_GT(voices.voices_size(), 3);
  for (const auto& v : voices.voices()) {
    EXPECT_THAT(v.language(), StartsWith("en"));
    EXPECT_EQ(v.engine(), "espeak");
  }

  struct Case {
    speechpb::SynthesizeRequest request;
    std::string field;
  };
  std::vector<Case> cases;
  auto with = [](std::string text) {
    speechpb::SynthesizeRequest r;
    r.set_text(std::move(text));
    return r;
  };
  cases.push_back({with(""), "text"});
  cases.push_back({with(std::string(5000, 'x')), "text"});
  {
    auto r = with("<speak><p>unclosed</speak>");
    r.set_ssml(true);
    cases.push_back({r, "text"});
  }
  {
    auto r = with("Hello.");
    r.mutable_voice()->set_voice("nobody");
    cases.push_back({r, "voice.voice"});
  }
  {
    auto r = with("Hello.");
    r.set_format(static_cast<speechpb::AudioFormat>(9));
    cases.push_back({r, "format"});
  }
  {
    auto r = with("Hello.");
    r.set_format(speechpb::OGG_OPUS);
    r.set_sample_rate(44100);
    cases.push_back({r, "sample_rate"});
  }
  {
    auto r = with("Hello.");
    r.set_engine("missing");
    cases.push_back({r, "engine"});
  }
  for (const Case& c : cases) {
    speechpb::SynthesizeResponse ignored;
    grpc::Status bad = Synthesize(*stub, c.request, &ignored);
    EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_EQ(FieldViolation(bad), c.field) << bad.error_message();
  }
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

TEST(SpeechIntegrationTest, AnOpenAiCompatibleEngineFromConfig) {
  auto fake = FakeLlmServer::Start();
  ASSERT_TRUE(fake.ok()) << fake.status();
  const std::string dir = MakeTempDir();
  const std::string config = absl::StrCat(dir, "/montage.yaml");
  {
    FILE* f = std::fopen(config.c_str(), "w");
    ASSERT_NE(f, nullptr);
    const std::string yaml = absl::StrCat(
        "speech:\n"
        "  engines:\n"
        "    cloud:\n"
        "      kind: OPENAI\n"
        "      base_url: http://127.0.0.1:",
        (*fake)->port(),
        "/v1\n"
        "      model: tts-1\n"
        "      api_key: {env: MONTAGE_TEST_TTS_KEY}\n");
    std::fputs(yaml.c_str(), f);
    std::fclose(f);
  }
  setenv("MONTAGE_TEST_TTS_KEY", "sk-test-speech-key", 1);
  auto process = MontagedProcess::Start({"speech", "--config", config});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = Stub(**process);
  speechpb::SynthesizeRequest request;
  request.set_engine("cloud");
  request.set_text("Hello from a provider. Two segments here.");
  request.mutable_voice()->set_voice("shimmer");
  request.set_format(speechpb::MP3);
  speechpb::SynthesizeResponse response;
  grpc::Status s = Synthesize(*stub, request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.segments(), 2u);
  absl::StatusOr<speech::testing::AudioInfo> info =
      speech::testing::ProbeAudio(response.audio().data());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->sample_rate, 24000u);
  EXPECT_GT(info->rms, 0.02);
  FakeLlmStats stats = (*fake)->stats();
  EXPECT_EQ(stats.tts_requests, 2u);
  ASSERT_FALSE(stats.recent.empty());
  EXPECT_EQ(stats.recent.back().header("authorization"), "<redacted>");
  EXPECT_THAT(stats.recent.back().body, HasSubstr("\"shimmer\""));
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
  EXPECT_THAT((*process)->log(), ::testing::Not(HasSubstr("sk-test-speech-key")));
}

// `montage speak --format=wav` streams PCM and writes the WAV itself: the file must be what the
// unary Synthesize answers, byte for byte.
TEST(SpeechIntegrationTest, TheSpeakCommandWritesTheSameWavAsTheUnaryAnswer) {
  auto process = MontagedProcess::Start({"speech"});
  ASSERT_TRUE(process.ok()) << process.status();
  const std::string text = "The first sentence is here. And a second one follows it.";
  const std::string out = absl::StrCat(MakeTempDir(), "/speech.wav");
  const auto speak = [&] {
    return RunCommand({MontageCliPath(), absl::StrCat("--addr=", (*process)->grpc_address()),
                       "speak", text, "--format=wav", "--voice=en-us", absl::StrCat("--out=", out)},
                      "", 60);
  };
  CommandResult first = speak();
  ASSERT_EQ(first.exit_code, 0) << first.out << first.err;
  EXPECT_THAT(first.out, HasSubstr("22050 Hz, 2 segments (0 from the cache)"));
  CommandResult again = speak();
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  EXPECT_THAT(again.out, HasSubstr("2 segments (2 from the cache)"));
  std::ifstream file(out, std::ios::binary);
  const std::string written((std::istreambuf_iterator<char>(file)), {});

  auto stub = speech::v1::SpeechService::NewStub((*process)->channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  speech::v1::SynthesizeRequest req;
  req.set_text(text);
  req.set_format(speech::v1::WAV);
  req.mutable_voice()->set_voice("en-us");
  speech::v1::SynthesizeResponse resp;
  ASSERT_TRUE(stub->Synthesize(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.segments_from_cache(), 2u);  // the same segments, so the same samples
  EXPECT_TRUE(written == resp.audio().data())
      << written.size() << " vs " << resp.audio().data().size();
  absl::StatusOr<speech::testing::AudioInfo> info = speech::testing::ProbeAudio(written);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->container, "wav");
  EXPECT_EQ(info->sample_rate, 22050u);
  EXPECT_GT(info->duration_seconds, 2.0);
  EXPECT_GT(info->rms, 0.02);
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

TEST(SpeechIntegrationTest, ThePodcastCommandWritesAPlayableEpisode) {
  auto process = MontagedProcess::Start({"all"});
  ASSERT_TRUE(process.ok()) << process.status();
  const std::string out = absl::StrCat(MakeTempDir(), "/episode.mp3");
  CommandResult r =
      RunCommand({MontageCliPath(), absl::StrCat("--addr=", (*process)->grpc_address()), "podcast",
                  "indoor", "herb", "gardens", "--turns=4", absl::StrCat("--out=", out)},
                 "", 120);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, HasSubstr("script:"));
  EXPECT_THAT(r.out, HasSubstr("narration: two voices"));
  EXPECT_THAT(r.out, HasSubstr(out));
  FILE* f = std::fopen(out.c_str(), "rb");
  ASSERT_NE(f, nullptr);
  std::string bytes;
  char buffer[65536];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), f)) > 0) bytes.append(buffer, n);
  std::fclose(f);
  absl::StatusOr<speech::testing::AudioInfo> info = speech::testing::ProbeAudio(bytes);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->container, "mp3");
  EXPECT_GT(info->duration_seconds, 20);
  EXPECT_GT(info->rms, 0.02);
  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

}  // namespace
}  // namespace montage::testing
