// The canonical 44-byte RIFF/WAVE header for 16-bit little-endian PCM, mono: what the speech
// service writes in front of its samples, and what the montage CLI writes when it receives them
// as a PCM stream.
#ifndef MONTAGE_COMMON_WAV_H_
#define MONTAGE_COMMON_WAV_H_

#include <algorithm>
#include <cstdint>
#include <string>

namespace montage {

inline constexpr size_t kWavHeaderBytes = 44;

// RIFF sizes are 32-bit: a larger `data_bytes` is saturated (readers then take the data to the
// end of the file).
inline std::string WavHeader(uint32_t sample_rate, uint64_t data_bytes) {
  const uint32_t data = static_cast<uint32_t>(std::min<uint64_t>(data_bytes, 0xFFFFFFFFu - 36));
  std::string h;
  h.reserve(kWavHeaderBytes);
  auto put32 = [&h](uint32_t v) {
    for (int i = 0; i < 4; ++i) h.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  auto put16 = [&h](uint16_t v) {
    h.push_back(static_cast<char>(v & 0xff));
    h.push_back(static_cast<char>(v >> 8));
  };
  h += "RIFF";
  put32(36 + data);
  h += "WAVEfmt ";
  put32(16);               // fmt chunk size
  put16(1);                // PCM
  put16(1);                // mono
  put32(sample_rate);      // samples per second
  put32(sample_rate * 2);  // bytes per second
  put16(2);                // block align
  put16(16);               // bits per sample
  h += "data";
  put32(data);
  return h;
}

}  // namespace montage

#endif  // MONTAGE_COMMON_WAV_H_
