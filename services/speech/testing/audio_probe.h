// Test helper: decodes audio with libavformat/libavcodec so unit and integration tests check
// what a player would really get (container, codec, rate, length, loudness), not what the
// encoder meant to write.
#ifndef MONTAGE_SERVICES_SPEECH_TESTING_AUDIO_PROBE_H_
#define MONTAGE_SERVICES_SPEECH_TESTING_AUDIO_PROBE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::speech::testing {

struct AudioInfo {
  // libavformat's demuxer name: "wav", "mp3", "ogg", "mov,mp4,m4a,3gp,3g2,mj2"; "s16le" for
  // ProbePcm.
  std::string container;
  // The codec's name (not the decoder's): "pcm_s16le", "mp3", "opus", "aac".
  std::string codec;
  // Rate of the decoded samples. Opus always decodes at 48000.
  uint32_t sample_rate = 0;
  // Rate the audio was encoded at: for Opus the input rate recorded in the OpusHead header,
  // otherwise sample_rate.
  uint32_t encoded_sample_rate = 0;
  uint32_t channels = 0;
  // Decoded samples per channel / sample_rate, after the decoder dropped priming and padding
  // the container declares (Opus pre-skip, MP4 edit lists); a raw MP3 stream declares none.
  double duration_seconds = 0;
  // Root mean square of all decoded samples, full scale = 1.0 (a full-scale sine: 0.707).
  double rms = 0;
};

// Demuxes and decodes the whole file in `bytes` (read in place, with seeking, so m4a with its
// index at the end works). INVALID_ARGUMENT when FFmpeg cannot read it as audio.
absl::StatusOr<AudioInfo> ProbeAudio(absl::string_view bytes);

// The same for raw signed 16-bit little-endian mono PCM (no container). A trailing odd byte is
// ignored.
AudioInfo ProbePcm(absl::string_view pcm, uint32_t sample_rate);

}  // namespace montage::speech::testing

#endif  // MONTAGE_SERVICES_SPEECH_TESTING_AUDIO_PROBE_H_
