// One montage.speech.v1.AudioChunk as gRPC received it, read in place: the audio stays in gRPC's
// buffers, as spans written straight to a file, and only the small fields are parsed as a
// message. Read as a message, an 11 MB WAV is copied once more (from gRPC's buffers into the
// message's string) before it is written; in `montage speak` that copy and the memory it touches
// were a sixth of the command's time.
#ifndef MONTAGE_CMD_MONTAGE_RAW_AUDIO_CHUNK_H_
#define MONTAGE_CMD_MONTAGE_RAW_AUDIO_CHUNK_H_

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "montage/speech/v1/speech.pb.h"

namespace montage::cli {

class RawAudioChunk {
 public:
  RawAudioChunk() = default;
  // Not copyable: the audio spans point into slices_ (small slices keep their bytes inline).
  RawAudioChunk(const RawAudioChunk&) = delete;
  RawAudioChunk& operator=(const RawAudioChunk&) = delete;

  // Reads `buffer` (kept referenced until Release or the next Parse). False if the bytes are not
  // a well-formed AudioChunk.
  bool Parse(grpc::ByteBuffer& buffer);
  // Writes the audio to `fd`; false on a write error (errno says which).
  bool WriteAudio(int fd) const;
  // Lets go of gRPC's buffers (and the audio spans in them).
  void Release();

  // The chunk without its audio.
  const speech::v1::AudioChunk& meta() const { return meta_; }
  uint64_t audio_bytes() const { return audio_bytes_; }

 private:
  bool AtEnd();
  bool Byte(uint8_t& b, std::string* copy);
  bool Varint(uint64_t& value, std::string* copy);
  // The next `n` bytes: appended to `copy`, or kept as audio spans when it is null.
  bool Take(uint64_t n, std::string* copy);

  std::vector<grpc::Slice> slices_;
  size_t slice_ = 0;   // the read position: a slice,
  size_t offset_ = 0;  // and a byte in it
  std::vector<iovec> audio_;
  uint64_t audio_bytes_ = 0;
  speech::v1::AudioChunk meta_;
};

}  // namespace montage::cli

#endif  // MONTAGE_CMD_MONTAGE_RAW_AUDIO_CHUNK_H_
