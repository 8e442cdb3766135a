// Encoding of the PCM that engines produce (signed 16-bit little-endian mono) into the formats the
// speech service answers with: WAV, raw PCM, MP3, Ogg/Opus and AAC in an m4a container. FFmpeg's
// libraries (libavcodec, libavformat, libswresample) do the work; nothing of FFmpeg shows here.
//
// Streamable formats (PCM, MP3, Ogg/Opus) hand out bytes while encoding goes on, so a stream can
// be sent before the text is fully spoken. WAV and m4a write sizes (and, for m4a, the index) at
// the end, so their bytes come out whole at Finish.
#ifndef MONTAGE_SERVICES_SPEECH_AUDIO_ENCODER_H_
#define MONTAGE_SERVICES_SPEECH_AUDIO_ENCODER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace montage::speech {

enum class AudioFormat {
  // RIFF WAVE holding 16-bit PCM.
  kWav,
  // Raw signed 16-bit little-endian mono samples, no header.
  kPcm,
  // MPEG-1/2 Layer III (libmp3lame), 64 kb/s.
  kMp3,
  // Opus in Ogg (libopus), 32 kb/s.
  kOggOpus,
  // AAC-LC in an MP4 (m4a) container (FFmpeg's native encoder), 64 kb/s.
  kAac,
};

struct EncoderOptions {
  AudioFormat format = AudioFormat::kWav;
  // Rate of the PCM passed to Write (signed 16-bit little-endian mono); 8000..192000 Hz.
  uint32_t input_rate = 22050;
  // Rate of the encoded audio; 0 means DefaultSampleRate(format, input_rate). Audio is
  // resampled when it differs from input_rate.
  uint32_t output_rate = 0;
};

// Turns one stream of PCM into one encoded file or stream. Create, any number of Write and Take
// calls, then Finish and a last Take. Output is deterministic: the same options and samples give
// the same bytes (no timestamps, random serial numbers or version strings are written).
//
// Once an FFmpeg call fails the encoder stays failed: Write and Finish return that error again.
//
// Not thread-safe; use from one thread at a time.
class AudioEncoder {
 public:
  // INVALID_ARGUMENT naming "input_rate" or "output_rate" when a rate cannot be used with the
  // format; UNIMPLEMENTED when this FFmpeg build lacks the encoder (libmp3lame, libopus);
  // INTERNAL when FFmpeg fails to set up.
  static absl::StatusOr<std::unique_ptr<AudioEncoder>> Create(const EncoderOptions& options);

  virtual ~AudioEncoder() = default;

  // Feeds samples: signed 16-bit little-endian mono at input_rate, any length, any number of
  // calls. A chunk may end in the middle of a sample: an odd last byte is kept and joined with
  // the first byte of the next Write (a half sample still pending at Finish is dropped).
  // FAILED_PRECONDITION after Finish; INTERNAL when FFmpeg fails.
  virtual absl::Status Write(absl::string_view pcm) = 0;

  // Encodes what is still buffered, flushes the codec and writes the container's trailer; Take
  // then returns the rest of the output. FAILED_PRECONDITION when called twice.
  virtual absl::Status Finish() = 0;

  // The encoded bytes produced since the last Take; the encoder keeps no copy. For streamable
  // formats these come out as encoding goes on (codecs and containers hold back a little: a few
  // frames for MP3, up to two 200 ms pages for Ogg/Opus); for WAV and m4a this is empty until
  // Finish and then the whole file.
  virtual std::string Take() = 0;

  // As given to Create.
  virtual AudioFormat format() const = 0;
  // The rate of the encoded audio (for Ogg/Opus the rate Opus encoded at; decoders always
  // produce 48000 Hz from Opus).
  virtual uint32_t output_rate() const = 0;
  // Always 1: engines speak mono.
  virtual uint32_t channels() const = 0;
  // Length of the audio written so far: whole input samples / input_rate.
  virtual absl::Duration duration() const = 0;
};

// MIME type of the format: "audio/wav", "audio/pcm; rate=<sample_rate>; channels=1", "audio/mpeg",
// "audio/ogg", "audio/mp4". PCM is not "audio/L16", which RFC 2586 defines as big-endian.
std::string ContentType(AudioFormat format, uint32_t sample_rate);

// True for formats whose bytes can be sent before encoding ends: PCM, MP3, Ogg/Opus.
bool IsStreamable(AudioFormat format);

// File name extension without the dot: "wav", "pcm", "mp3", "opus" (RFC 7845's choice for Ogg
// Opus files), "m4a".
absl::string_view FileExtension(AudioFormat format);

// The output rate used when none is asked for: the lowest rate the format supports at or above
// `input_rate` (so no bandwidth is lost), else the format's highest. WAV and PCM keep any rate
// within 8000..192000; MP3 and AAC keep the common speech rates (16000, 22050, 24000, ...);
// Opus turns 22050 into 24000 and 44100 into 48000.
uint32_t DefaultSampleRate(AudioFormat format, uint32_t input_rate);

// INVALID_ARGUMENT with a google.rpc.BadRequest naming `field` when `format` cannot be encoded at
// `rate`, e.g. "sample_rate: 44000 Hz is not supported for MP3; use one of 8000, 11025, ...".
// WAV and PCM take any rate in 8000..192000; MP3 takes 8000, 11025, 12000, 16000, 22050, 24000,
// 32000, 44100, 48000; Ogg/Opus 8000, 12000, 16000, 24000, 48000; AAC those of MP3 plus 7350,
// 64000, 88200, 96000.
absl::Status CheckSampleRate(AudioFormat format, uint32_t rate, absl::string_view field);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_AUDIO_ENCODER_H_
