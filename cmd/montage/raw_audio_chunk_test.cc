#include "cmd/montage/raw_audio_chunk.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace montage::cli {
namespace {

namespace speechpb = ::montage::speech::v1;

// `bytes` as gRPC might hold them: in slices of `size` bytes (the last one shorter).
grpc::ByteBuffer Sliced(const std::string& bytes, size_t size) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += size) {
    slices.emplace_back(bytes.data() + at, std::min(size, bytes.size() - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// What WriteAudio writes, read back from a temporary file.
std::string Written(const RawAudioChunk& chunk) {
  char path[] = "/tmp/raw_audio_chunk_testXXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  EXPECT_TRUE(chunk.WriteAudio(fd));
  std::string out(static_cast<size_t>(lseek(fd, 0, SEEK_END)), '\0');
  EXPECT_EQ(pread(fd, out.data(), out.size(), 0), static_cast<ssize_t>(out.size()));
  close(fd);
  unlink(path);
  return out;
}

speechpb::AudioChunk LastChunk(std::string audio) {
  speechpb::AudioChunk chunk;
  chunk.set_data(std::move(audio));
  chunk.set_content_type("audio/wav");
  chunk.set_sample_rate(22050);
  chunk.mutable_duration()->set_seconds(256);
  chunk.mutable_duration()->set_nanos(500'000'000);
  chunk.set_last(true);
  chunk.set_segments(61);
  chunk.set_segments_from_cache(60);
  return chunk;
}

TEST(RawAudioChunkTest, ReadsAudioAndFieldsAcrossAnySliceBoundaries) {
  std::string audio;
  for (int i = 0; i < 3000; ++i) audio.push_back(static_cast<char>(i * 7));
  const speechpb::AudioChunk sent = LastChunk(audio);
  const std::string wire = sent.SerializeAsString();
  for (size_t size : {size_t{1}, size_t{2}, size_t{3}, size_t{7}, size_t{64}, wire.size()}) {
    SCOPED_TRACE(size);
    grpc::ByteBuffer buffer = Sliced(wire, size);
    RawAudioChunk chunk;
    ASSERT_TRUE(chunk.Parse(buffer));
    EXPECT_EQ(chunk.audio_bytes(), audio.size());
    EXPECT_EQ(Written(chunk), audio);
    speechpb::AudioChunk expected = sent;
    expected.clear_data();
    EXPECT_EQ(chunk.meta().SerializeAsString(), expected.SerializeAsString());
    EXPECT_TRUE(chunk.meta().data().empty());
  }
}

TEST(RawAudioChunkTest, AChunkWithoutAudioAndAnEmptyOne) {
  speechpb::AudioChunk sent = LastChunk("");
  grpc::ByteBuffer buffer = Sliced(sent.SerializeAsString(), 5);
  RawAudioChunk chunk;
  ASSERT_TRUE(chunk.Parse(buffer));
  EXPECT_EQ(chunk.audio_bytes(), 0u);
  EXPECT_EQ(chunk.meta().segments(), 61u);
  EXPECT_EQ(Written(chunk), "");

  grpc::ByteBuffer empty = Sliced("", 8);  // a zero-length message, as gRPC delivers one
  ASSERT_TRUE(chunk.Parse(empty));
  EXPECT_EQ(chunk.audio_bytes(), 0u);
  EXPECT_FALSE(chunk.meta().last());  // nothing left from the chunk before
}

TEST(RawAudioChunkTest, AnAudioFieldThatComesTwiceIsTheLastOneAsProtobufReadsIt) {
  const std::string wire =
      LastChunk("first").SerializeAsString() + LastChunk("second").SerializeAsString();
  speechpb::AudioChunk parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  grpc::ByteBuffer buffer = Sliced(wire, 4);
  RawAudioChunk chunk;
  ASSERT_TRUE(chunk.Parse(buffer));
  EXPECT_EQ(Written(chunk), parsed.data());
  EXPECT_EQ(chunk.audio_bytes(), parsed.data().size());
}

TEST(RawAudioChunkTest, MalformedChunksAreRefused) {
  const std::string wire = LastChunk(std::string(100, 'a')).SerializeAsString();
  RawAudioChunk chunk;
  // Cut anywhere inside: a field's length or its bytes run past the end.
  for (size_t cut : {size_t{1}, size_t{2}, size_t{50}, wire.size() - 1}) {
    SCOPED_TRACE(cut);
    grpc::ByteBuffer truncated = Sliced(wire.substr(0, cut), 3);
    EXPECT_FALSE(chunk.Parse(truncated));
  }
  // Wire types 3 and 4 (groups) and 6 and 7 do not occur in this message.
  for (char tag : {'\x0b', '\x0c', '\x0e', '\x0f'}) {
    grpc::ByteBuffer bad = Sliced(std::string(1, tag) + "\x01", 8);
    EXPECT_FALSE(chunk.Parse(bad));
  }
  // A varint longer than ten bytes.
  grpc::ByteBuffer endless = Sliced("\x18" + std::string(11, '\xff'), 8);
  EXPECT_FALSE(chunk.Parse(endless));
  // A known small field with the wrong content: protobuf itself refuses it.
  grpc::ByteBuffer bad_duration = Sliced(std::string("\x22\x02\x08\xff", 4), 8);
  EXPECT_FALSE(chunk.Parse(bad_duration));
}

}  // namespace
}  // namespace montage::cli
