#include "services/speech/audio_encoder.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/speech/testing/audio_probe.h"

namespace montage::speech {
namespace {

namespace probe = ::montage::speech::testing;
using ::testing::HasSubstr;

constexpr uint32_t kInputRate = 22050;
constexpr double kAmplitude = 0.3;
// RMS of a sine is its amplitude / sqrt(2).
constexpr double kSineRms = kAmplitude * 0.70710678118654752;
constexpr double kSeconds = 2.5;

// `seconds` of a 440 Hz sine (amplitude 0 gives silence) as s16le mono.
std::string Sine(uint32_t rate, double seconds, double amplitude) {
  const auto count = static_cast<size_t>(std::lround(rate * seconds));
  std::string pcm;
  pcm.reserve(count * 2);
  for (size_t i = 0; i < count; ++i) {
    const double value = amplitude * std::sin(2 * M_PI * 440.0 * static_cast<double>(i) / rate);
    const auto sample = static_cast<uint16_t>(static_cast<int16_t>(std::lround(value * 32767)));
    pcm.push_back(static_cast<char>(sample & 0xff));
    pcm.push_back(static_cast<char>(sample >> 8));
  }
  return pcm;
}

struct Encoded {
  // Everything Take returned, in order.
  std::string bytes;
  // How much of it came out before Finish.
  size_t bytes_before_finish = 0;
  uint32_t output_rate = 0;
  absl::Duration duration;
};

// Writes `pcm` in uneven chunks, some of odd length so samples are split across writes, and
// takes the output after every write.
absl::StatusOr<Encoded> Encode(const EncoderOptions& options, absl::string_view pcm) {
  constexpr size_t kChunks[] = {1, 4095, 333, 10000, 7, 2048, 65537, 2};
  ASSIGN_OR_RETURN(std::unique_ptr<AudioEncoder> encoder, AudioEncoder::Create(options));
  Encoded encoded;
  for (size_t i = 0; !pcm.empty(); ++i) {
    const size_t size = std::min(pcm.size(), kChunks[i % std::size(kChunks)]);
    RETURN_IF_ERROR(encoder->Write(pcm.substr(0, size)));
    pcm.remove_prefix(size);
    encoded.bytes += encoder->Take();
  }
  encoded.bytes_before_finish = encoded.bytes.size();
  RETURN_IF_ERROR(encoder->Finish());
  encoded.bytes += encoder->Take();
  encoded.output_rate = encoder->output_rate();
  encoded.duration = encoder->duration();
  return encoded;
}

absl::StatusOr<probe::AudioInfo> Decode(AudioFormat format, const Encoded& encoded) {
  if (format == AudioFormat::kPcm) return probe::ProbePcm(encoded.bytes, encoded.output_rate);
  return probe::ProbeAudio(encoded.bytes);
}

struct RoundTripCase {
  const char* name;
  AudioFormat format;
  // Asked for; 0 is the default.
  uint32_t output_rate;
  uint32_t expected_output_rate;
  const char* container;
  const char* codec;
  // Rate of the decoded samples (Opus always decodes at 48000).
  uint32_t decoded_rate;
  // Decoded length minus the input's: codec priming and padding that the container does not
  // declare (a raw MP3 stream has no LAME header to declare it in).
  double duration_tolerance_seconds;
  // Relative RMS error allowed: lossless formats are exact but for rounding and resampling.
  double rms_tolerance;
};

class RoundTripTest : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(RoundTripTest, SineSurvivesEncodingAndDecoding) {
  const RoundTripCase& c = GetParam();
  absl::StatusOr<Encoded> encoded =
      Encode({c.format, kInputRate, c.output_rate}, Sine(kInputRate, kSeconds, kAmplitude));
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->output_rate, c.expected_output_rate);
  EXPECT_EQ(encoded->duration, absl::Milliseconds(2500));

  absl::StatusOr<probe::AudioInfo> info = Decode(c.format, *encoded);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->container, c.container);
  EXPECT_EQ(info->codec, c.codec);
  EXPECT_EQ(info->sample_rate, c.decoded_rate);
  EXPECT_EQ(info->encoded_sample_rate, c.expected_output_rate);
  EXPECT_EQ(info->channels, 1u);
  EXPECT_NEAR(info->duration_seconds, kSeconds, c.duration_tolerance_seconds);
  EXPECT_NEAR(info->rms, kSineRms, kSineRms * c.rms_tolerance);
}

TEST_P(RoundTripTest, SilenceStaysSilent) {
  const RoundTripCase& c = GetParam();
  absl::StatusOr<Encoded> encoded =
      Encode({c.format, kInputRate, c.output_rate}, Sine(kInputRate, kSeconds, 0));
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  absl::StatusOr<probe::AudioInfo> info = Decode(c.format, *encoded);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_NEAR(info->duration_seconds, kSeconds, c.duration_tolerance_seconds);
  EXPECT_LT(info->rms, 0.005);
}

TEST_P(RoundTripTest, SameInputGivesSameBytes) {
  const RoundTripCase& c = GetParam();
  const std::string pcm = Sine(kInputRate, 1.0, kAmplitude);
  absl::StatusOr<Encoded> first = Encode({c.format, kInputRate, c.output_rate}, pcm);
  absl::StatusOr<Encoded> second = Encode({c.format, kInputRate, c.output_rate}, pcm);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_FALSE(first->bytes.empty());
  EXPECT_TRUE(first->bytes == second->bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, RoundTripTest,
    ::testing::Values(
        RoundTripCase{"Wav", AudioFormat::kWav, 0, 22050, "wav", "pcm_s16le", 22050, 0.001, 0.01},
        RoundTripCase{"Wav16k", AudioFormat::kWav, 16000, 16000, "wav", "pcm_s16le", 16000, 0.001,
                      0.02},
        RoundTripCase{"Pcm", AudioFormat::kPcm, 0, 22050, "s16le", "pcm_s16le", 22050, 0.001, 0.01},
        RoundTripCase{"Pcm16k", AudioFormat::kPcm, 16000, 16000, "s16le", "pcm_s16le", 16000, 0.001,
                      0.02},
        RoundTripCase{"Mp3", AudioFormat::kMp3, 0, 22050, "mp3", "mp3", 22050, 0.1, 0.15},
        RoundTripCase{"Mp3At44k", AudioFormat::kMp3, 44100, 44100, "mp3", "mp3", 44100, 0.1, 0.15},
        RoundTripCase{"OggOpus", AudioFormat::kOggOpus, 0, 24000, "ogg", "opus", 48000, 0.01, 0.15},
        RoundTripCase{"OggOpus48k", AudioFormat::kOggOpus, 48000, 48000, "ogg", "opus", 48000, 0.01,
                      0.15},
        RoundTripCase{"Aac", AudioFormat::kAac, 0, 22050, "mov,mp4,m4a,3gp,3g2,mj2", "aac", 22050,
                      0.1, 0.15},
        RoundTripCase{"Aac16k", AudioFormat::kAac, 16000, 16000, "mov,mp4,m4a,3gp,3g2,mj2", "aac",
                      16000, 0.1, 0.15}),
    [](const ::testing::TestParamInfo<RoundTripCase>& info) { return info.param.name; });

TEST(AudioEncoderTest, StreamableFormatsGiveBytesBeforeFinish) {
  for (AudioFormat format : {AudioFormat::kPcm, AudioFormat::kMp3, AudioFormat::kOggOpus}) {
    SCOPED_TRACE(FileExtension(format));
    absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder = AudioEncoder::Create({format});
    ASSERT_TRUE(encoder.ok()) << encoder.status();
    ASSERT_TRUE((*encoder)->Write(Sine(kInputRate, 2.0, kAmplitude)).ok());
    const std::string early = (*encoder)->Take();
    ASSERT_FALSE(early.empty());
    // Taken bytes are not kept: a second Take has only what came since.
    EXPECT_TRUE((*encoder)->Take().empty());
    ASSERT_TRUE((*encoder)->Finish().ok());
    const std::string rest = (*encoder)->Take();
    if (format == AudioFormat::kPcm) {
      EXPECT_EQ(early.size(), kInputRate * 2.0 * 2);
      continue;
    }
    // Little is held back: the early bytes alone play most of what was written.
    absl::StatusOr<probe::AudioInfo> early_info = probe::ProbeAudio(early);
    ASSERT_TRUE(early_info.ok()) << early_info.status();
    EXPECT_GT(early_info->duration_seconds, 1.5);
    // The stream goes on from the early bytes and decodes as a whole.
    EXPECT_FALSE(rest.empty());
    absl::StatusOr<probe::AudioInfo> info = probe::ProbeAudio(early + rest);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_NEAR(info->duration_seconds, 2.0, 0.1);
  }
}

TEST(AudioEncoderTest, WavAndM4aGiveNothingBeforeFinish) {
  for (AudioFormat format : {AudioFormat::kWav, AudioFormat::kAac}) {
    SCOPED_TRACE(FileExtension(format));
    absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder = AudioEncoder::Create({format});
    ASSERT_TRUE(encoder.ok()) << encoder.status();
    ASSERT_TRUE((*encoder)->Write(Sine(kInputRate, 2.0, kAmplitude)).ok());
    EXPECT_TRUE((*encoder)->Take().empty());
    ASSERT_TRUE((*encoder)->Finish().ok());
    EXPECT_FALSE((*encoder)->Take().empty());
    EXPECT_TRUE((*encoder)->Take().empty());
  }
}

uint32_t ReadLe32(absl::string_view bytes, size_t offset) {
  uint32_t value = 0;
  for (size_t i = 0; i < 4; ++i) {
    value |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[offset + i])) << (8 * i);
  }
  return value;
}

TEST(AudioEncoderTest, WavHeaderHasTheRightSizes) {
  const std::string pcm = Sine(kInputRate, 1.0, kAmplitude);
  absl::StatusOr<Encoded> encoded = Encode({AudioFormat::kWav}, pcm);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  const std::string& wav = encoded->bytes;
  // The canonical 44-byte header: no LIST/INFO chunk in bit-exact mode.
  ASSERT_EQ(wav.size(), 44 + pcm.size());
  EXPECT_EQ(wav.substr(0, 4), "RIFF");
  EXPECT_EQ(ReadLe32(wav, 4), wav.size() - 8);
  EXPECT_EQ(wav.substr(8, 4), "WAVE");
  EXPECT_EQ(ReadLe32(wav, 24), kInputRate);
  EXPECT_EQ(wav.substr(36, 4), "data");
  EXPECT_EQ(ReadLe32(wav, 40), pcm.size());
  EXPECT_TRUE(wav.substr(44) == pcm);
}

TEST(AudioEncoderTest, PcmAtTheInputRateIsTheInput) {
  const std::string pcm = Sine(kInputRate, 1.0, kAmplitude);
  absl::StatusOr<Encoded> encoded = Encode({AudioFormat::kPcm}, pcm);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_TRUE(encoded->bytes == pcm);
}

TEST(AudioEncoderTest, NothingWrittenGivesAValidEmptyFile) {
  absl::StatusOr<Encoded> wav = Encode({AudioFormat::kWav}, "");
  ASSERT_TRUE(wav.ok()) << wav.status();
  EXPECT_EQ(wav->bytes.size(), 44u);
  EXPECT_EQ(wav->duration, absl::ZeroDuration());
  for (AudioFormat format :
       {AudioFormat::kPcm, AudioFormat::kMp3, AudioFormat::kOggOpus, AudioFormat::kAac}) {
    SCOPED_TRACE(FileExtension(format));
    EXPECT_TRUE(Encode({format}, "").ok());
  }
}

TEST(AudioEncoderTest, HalfSampleWaitsForTheNextWrite) {
  absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder = AudioEncoder::Create({AudioFormat::kPcm});
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  ASSERT_TRUE((*encoder)->Write("\x01").ok());
  EXPECT_EQ((*encoder)->duration(), absl::ZeroDuration());
  ASSERT_TRUE((*encoder)->Write(absl::string_view("\x02\x03", 2)).ok());
  EXPECT_EQ((*encoder)->duration(), absl::Seconds(1) / kInputRate);
  ASSERT_TRUE((*encoder)->Finish().ok());
  EXPECT_EQ((*encoder)->Take(), "\x01\x02");
}

TEST(AudioEncoderTest, WriteAndFinishAfterFinishFail) {
  absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder = AudioEncoder::Create({AudioFormat::kMp3});
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  ASSERT_TRUE((*encoder)->Write(Sine(kInputRate, 0.1, kAmplitude)).ok());
  ASSERT_TRUE((*encoder)->Finish().ok());
  EXPECT_EQ((*encoder)->Write(Sine(kInputRate, 0.1, kAmplitude)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*encoder)->Finish().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(AudioEncoderTest, DestroyingWithoutFinishIsClean) {
  // Meaningful under valgrind or ASan: every FFmpeg object is freed mid-stream.
  for (AudioFormat format : {AudioFormat::kWav, AudioFormat::kPcm, AudioFormat::kMp3,
                             AudioFormat::kOggOpus, AudioFormat::kAac}) {
    absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder = AudioEncoder::Create({format});
    ASSERT_TRUE(encoder.ok()) << encoder.status();
    EXPECT_TRUE((*encoder)->Write(Sine(kInputRate, 0.5, kAmplitude)).ok());
  }
}

TEST(AudioEncoderTest, CreateRejectsUnusableRates) {
  absl::StatusOr<std::unique_ptr<AudioEncoder>> encoder =
      AudioEncoder::Create({AudioFormat::kMp3, 22050, 44000});
  EXPECT_EQ(encoder.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(encoder.status().message(), HasSubstr("output_rate"));

  encoder = AudioEncoder::Create({AudioFormat::kWav, 0, 0});
  EXPECT_EQ(encoder.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(encoder.status().message(), HasSubstr("input_rate"));

  encoder = AudioEncoder::Create({static_cast<AudioFormat>(42)});
  EXPECT_EQ(encoder.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SampleRateTest, CheckSampleRateNamesTheField) {
  absl::Status mp3 = CheckSampleRate(AudioFormat::kMp3, 44000, "sample_rate");
  EXPECT_EQ(mp3.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(mp3.message(), HasSubstr("sample_rate: 44000 Hz is not supported for MP3"));
  EXPECT_THAT(mp3.message(), HasSubstr("44100"));

  absl::Status opus = CheckSampleRate(AudioFormat::kOggOpus, 22050, "sample_rate");
  EXPECT_EQ(opus.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(opus.message(), HasSubstr("sample_rate"));
  EXPECT_THAT(opus.message(), HasSubstr("8000, 12000, 16000, 24000, 48000"));

  EXPECT_TRUE(CheckSampleRate(AudioFormat::kMp3, 22050, "sample_rate").ok());
  EXPECT_TRUE(CheckSampleRate(AudioFormat::kOggOpus, 24000, "sample_rate").ok());
  EXPECT_TRUE(CheckSampleRate(AudioFormat::kAac, 22050, "sample_rate").ok());
  EXPECT_TRUE(CheckSampleRate(AudioFormat::kWav, 8000, "sample_rate").ok());
  EXPECT_TRUE(CheckSampleRate(AudioFormat::kPcm, 192000, "sample_rate").ok());
  EXPECT_EQ(CheckSampleRate(AudioFormat::kWav, 7999, "sample_rate").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckSampleRate(AudioFormat::kPcm, 192001, "sample_rate").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SampleRateTest, DefaultKeepsTheInputRateWhereItCan) {
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kWav, 22050), 22050u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kPcm, 44000), 44000u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kWav, 4000), 8000u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kMp3, 22050), 22050u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kMp3, 44000), 44100u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kMp3, 96000), 48000u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kOggOpus, 22050), 24000u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kOggOpus, 44100), 48000u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kOggOpus, 16000), 16000u);
  EXPECT_EQ(DefaultSampleRate(AudioFormat::kAac, 22050), 22050u);
}

TEST(FormatInfoTest, ContentTypesExtensionsAndStreaming) {
  EXPECT_EQ(ContentType(AudioFormat::kWav, 22050), "audio/wav");
  EXPECT_EQ(ContentType(AudioFormat::kPcm, 22050), "audio/pcm; rate=22050; channels=1");
  EXPECT_EQ(ContentType(AudioFormat::kMp3, 22050), "audio/mpeg");
  EXPECT_EQ(ContentType(AudioFormat::kOggOpus, 24000), "audio/ogg");
  EXPECT_EQ(ContentType(AudioFormat::kAac, 22050), "audio/mp4");

  EXPECT_EQ(FileExtension(AudioFormat::kWav), "wav");
  EXPECT_EQ(FileExtension(AudioFormat::kPcm), "pcm");
  EXPECT_EQ(FileExtension(AudioFormat::kMp3), "mp3");
  EXPECT_EQ(FileExtension(AudioFormat::kOggOpus), "opus");
  EXPECT_EQ(FileExtension(AudioFormat::kAac), "m4a");

  EXPECT_FALSE(IsStreamable(AudioFormat::kWav));
  EXPECT_TRUE(IsStreamable(AudioFormat::kPcm));
  EXPECT_TRUE(IsStreamable(AudioFormat::kMp3));
  EXPECT_TRUE(IsStreamable(AudioFormat::kOggOpus));
  EXPECT_FALSE(IsStreamable(AudioFormat::kAac));
}

}  // namespace
}  // namespace montage::speech
