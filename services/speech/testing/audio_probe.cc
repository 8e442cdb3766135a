#include "services/speech/testing/audio_probe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/error.h>
#include <libavutil/log.h>
#include <libavutil/mem.h>
#include <libavutil/samplefmt.h>
}

namespace montage::speech::testing {
namespace {

constexpr int kIoBufferSize = 32768;

absl::Status AvError(int error, absl::string_view what) {
  char text[AV_ERROR_MAX_STRING_SIZE] = {};
  av_strerror(error, text, sizeof(text));
  return absl::InvalidArgumentError(absl::StrCat("FFmpeg ", what, ": ", text));
}

struct InputFormatDeleter {
  void operator()(AVFormatContext* context) const { avformat_close_input(&context); }
};
struct IoContextDeleter {
  void operator()(AVIOContext* io) const {
    av_freep(&io->buffer);
    avio_context_free(&io);
  }
};
struct CodecContextDeleter {
  void operator()(AVCodecContext* context) const { avcodec_free_context(&context); }
};
struct FrameDeleter {
  void operator()(AVFrame* frame) const { av_frame_free(&frame); }
};
struct PacketDeleter {
  void operator()(AVPacket* packet) const { av_packet_free(&packet); }
};

// The file being probed, read by libavformat through callbacks.
struct MemoryInput {
  absl::string_view data;
  size_t position = 0;

  static int Read(void* opaque, uint8_t* buffer, int size) {
    auto* input = static_cast<MemoryInput*>(opaque);
    const size_t left = input->data.size() - std::min(input->position, input->data.size());
    if (left == 0) return AVERROR_EOF;
    const size_t count = std::min(left, static_cast<size_t>(std::max(size, 0)));
    std::memcpy(buffer, input->data.data() + input->position, count);
    input->position += count;
    return static_cast<int>(count);
  }

  static int64_t Seek(void* opaque, int64_t offset, int whence) {
    auto* input = static_cast<MemoryInput*>(opaque);
    const auto size = static_cast<int64_t>(input->data.size());
    whence &= ~AVSEEK_FORCE;
    int64_t target;
    switch (whence) {
      case AVSEEK_SIZE:
        return size;
      case SEEK_SET:
        target = offset;
        break;
      case SEEK_CUR:
        target = static_cast<int64_t>(input->position) + offset;
        break;
      case SEEK_END:
        target = size + offset;
        break;
      default:
        return AVERROR(EINVAL);
    }
    if (target < 0) return AVERROR(EINVAL);
    input->position = static_cast<size_t>(target);
    return target;
  }
};

// Sample `index` of `channel` as a double, full scale 1.0.
double SampleAt(const AVFrame& frame, int channel, int index) {
  const auto format = static_cast<AVSampleFormat>(frame.format);
  const int channels = frame.ch_layout.nb_channels;
  const bool planar = av_sample_fmt_is_planar(format);
  const uint8_t* plane = frame.extended_data[planar ? channel : 0];
  const int position = planar ? index : index * channels + channel;
  switch (av_get_packed_sample_fmt(format)) {
    case AV_SAMPLE_FMT_U8:
      return (plane[position] - 128) / 128.0;
    case AV_SAMPLE_FMT_S16: {
      int16_t value;
      std::memcpy(&value, plane + position * sizeof(value), sizeof(value));
      return value / 32768.0;
    }
    case AV_SAMPLE_FMT_S32: {
      int32_t value;
      std::memcpy(&value, plane + position * sizeof(value), sizeof(value));
      return value / 2147483648.0;
    }
    case AV_SAMPLE_FMT_FLT: {
      float value;
      std::memcpy(&value, plane + position * sizeof(value), sizeof(value));
      return value;
    }
    case AV_SAMPLE_FMT_DBL: {
      double value;
      std::memcpy(&value, plane + position * sizeof(value), sizeof(value));
      return value;
    }
    default:
      return 0;
  }
}

// The input rate field of an OpusHead (RFC 7845 section 5.1), 0 when absent.
uint32_t OpusInputRate(const AVCodecParameters& parameters) {
  if (parameters.extradata == nullptr || parameters.extradata_size < 16 ||
      std::memcmp(parameters.extradata, "OpusHead", 8) != 0) {
    return 0;
  }
  const uint8_t* field = parameters.extradata + 12;
  return static_cast<uint32_t>(field[0]) | static_cast<uint32_t>(field[1]) << 8 |
         static_cast<uint32_t>(field[2]) << 16 | static_cast<uint32_t>(field[3]) << 24;
}

// Adds every sample of `frame` to the running totals.
void Accumulate(const AVFrame& frame, int64_t* samples, double* sum_of_squares) {
  for (int channel = 0; channel < frame.ch_layout.nb_channels; ++channel) {
    for (int i = 0; i < frame.nb_samples; ++i) {
      const double value = SampleAt(frame, channel, i);
      *sum_of_squares += value * value;
    }
  }
  *samples += frame.nb_samples;
}

}  // namespace

absl::StatusOr<AudioInfo> ProbeAudio(absl::string_view bytes) {
  if (bytes.empty()) return absl::InvalidArgumentError("ProbeAudio: no bytes");
  av_log_set_level(AV_LOG_ERROR);

  MemoryInput input{bytes};
  auto* buffer = static_cast<unsigned char*>(av_malloc(kIoBufferSize));
  if (buffer == nullptr) return absl::ResourceExhaustedError("av_malloc");
  std::unique_ptr<AVIOContext, IoContextDeleter> io(
      avio_alloc_context(buffer, kIoBufferSize, /*write_flag=*/0, &input, &MemoryInput::Read,
                         nullptr, &MemoryInput::Seek));
  if (io == nullptr) {
    av_free(buffer);
    return absl::ResourceExhaustedError("avio_alloc_context");
  }

  AVFormatContext* raw = avformat_alloc_context();
  if (raw == nullptr) return absl::ResourceExhaustedError("avformat_alloc_context");
  raw->pb = io.get();
  raw->flags |= AVFMT_FLAG_CUSTOM_IO;
  // On failure avformat_open_input frees the context itself.
  int error = avformat_open_input(&raw, nullptr, nullptr, nullptr);
  if (error < 0) return AvError(error, "avformat_open_input");
  std::unique_ptr<AVFormatContext, InputFormatDeleter> demuxer(raw);

  error = avformat_find_stream_info(demuxer.get(), nullptr);
  if (error < 0) return AvError(error, "avformat_find_stream_info");
  const int stream_index =
      av_find_best_stream(demuxer.get(), AVMEDIA_TYPE_AUDIO, -1, -1, nullptr, 0);
  if (stream_index < 0) return AvError(stream_index, "finding an audio stream");
  const AVStream& stream = *demuxer->streams[stream_index];

  const AVCodec* codec = avcodec_find_decoder(stream.codecpar->codec_id);
  if (codec == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("no decoder for ", avcodec_get_name(stream.codecpar->codec_id)));
  }
  std::unique_ptr<AVCodecContext, CodecContextDeleter> decoder(avcodec_alloc_context3(codec));
  if (decoder == nullptr) return absl::ResourceExhaustedError("avcodec_alloc_context3");
  error = avcodec_parameters_to_context(decoder.get(), stream.codecpar);
  if (error < 0) return AvError(error, "avcodec_parameters_to_context");
  decoder->pkt_timebase = stream.time_base;
  error = avcodec_open2(decoder.get(), codec, nullptr);
  if (error < 0) return AvError(error, "avcodec_open2");

  std::unique_ptr<AVPacket, PacketDeleter> packet(av_packet_alloc());
  std::unique_ptr<AVFrame, FrameDeleter> frame(av_frame_alloc());
  if (packet == nullptr || frame == nullptr) return absl::ResourceExhaustedError("av_*_alloc");

  AudioInfo info;
  int64_t samples = 0;
  double sum_of_squares = 0;
  auto receive_frames = [&]() -> absl::Status {
    while (true) {
      const int status = avcodec_receive_frame(decoder.get(), frame.get());
      if (status == AVERROR(EAGAIN) || status == AVERROR_EOF) return absl::OkStatus();
      if (status < 0) return AvError(status, "avcodec_receive_frame");
      info.sample_rate = static_cast<uint32_t>(frame->sample_rate);
      info.channels = static_cast<uint32_t>(frame->ch_layout.nb_channels);
      Accumulate(*frame, &samples, &sum_of_squares);
      av_frame_unref(frame.get());
    }
  };
  while ((error = av_read_frame(demuxer.get(), packet.get())) >= 0) {
    if (packet->stream_index == stream_index) {
      error = avcodec_send_packet(decoder.get(), packet.get());
      av_packet_unref(packet.get());
      if (error < 0) return AvError(error, "avcodec_send_packet");
      if (absl::Status status = receive_frames(); !status.ok()) return status;
    } else {
      av_packet_unref(packet.get());
    }
  }
  if (error != AVERROR_EOF) return AvError(error, "av_read_frame");
  error = avcodec_send_packet(decoder.get(), nullptr);
  if (error < 0) return AvError(error, "flushing the decoder");
  if (absl::Status status = receive_frames(); !status.ok()) return status;

  info.container = demuxer->iformat->name;
  info.codec = avcodec_get_name(stream.codecpar->codec_id);
  if (info.sample_rate == 0) info.sample_rate = static_cast<uint32_t>(decoder->sample_rate);
  if (info.channels == 0) info.channels = static_cast<uint32_t>(decoder->ch_layout.nb_channels);
  info.encoded_sample_rate = info.sample_rate;
  if (stream.codecpar->codec_id == AV_CODEC_ID_OPUS) {
    if (const uint32_t rate = OpusInputRate(*stream.codecpar); rate != 0) {
      info.encoded_sample_rate = rate;
    }
  }
  if (info.sample_rate > 0) info.duration_seconds = static_cast<double>(samples) / info.sample_rate;
  if (samples > 0 && info.channels > 0) {
    info.rms = std::sqrt(sum_of_squares / (static_cast<double>(samples) * info.channels));
  }
  return info;
}

AudioInfo ProbePcm(absl::string_view pcm, uint32_t sample_rate) {
  AudioInfo info;
  info.container = "s16le";
  info.codec = "pcm_s16le";
  info.sample_rate = sample_rate;
  info.encoded_sample_rate = sample_rate;
  info.channels = 1;
  const size_t samples = pcm.size() / 2;
  double sum_of_squares = 0;
  for (size_t i = 0; i < samples; ++i) {
    const auto low = static_cast<uint8_t>(pcm[2 * i]);
    const auto high = static_cast<uint8_t>(pcm[2 * i + 1]);
    const double sample = static_cast<int16_t>(low | high << 8) / 32768.0;
    sum_of_squares += sample * sample;
  }
  if (sample_rate > 0) info.duration_seconds = static_cast<double>(samples) / sample_rate;
  if (samples > 0) info.rms = std::sqrt(sum_of_squares / static_cast<double>(samples));
  return info;
}

}  // namespace montage::speech::testing
