#include "services/speech/audio_encoder.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "common/status.h"
#include "common/wav.h"

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/audio_fifo.h>
#include <libavutil/channel_layout.h>
#include <libavutil/dict.h>
#include <libavutil/error.h>
#include <libavutil/log.h>
#include <libavutil/mem.h>
#include <libavutil/samplefmt.h>
#include <libswresample/swresample.h>
}

namespace montage::speech {
namespace {

// The input is read as native-endian int16_t; every platform Debian builds montage for is
// little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "PCM input is read as native int16_t");

constexpr uint32_t kMinPcmRate = 8000;
constexpr uint32_t kMaxPcmRate = 192000;
// Input samples converted per step, so a long Write never needs a buffer of its own size.
constexpr int kBlockSamples = 4096;
// Samples per frame for codecs that take any frame size (pcm_s16le).
constexpr int kVariableFrameSamples = 1024;
constexpr int kIoBufferSize = 32768;

// Ascending, as quoted in error messages.
constexpr uint32_t kMp3Rates[] = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000};
constexpr uint32_t kOpusRates[] = {8000, 12000, 16000, 24000, 48000};
constexpr uint32_t kAacRates[] = {7350,  8000,  11025, 12000, 16000, 22050, 24000,
                                  32000, 44100, 48000, 64000, 88200, 96000};

// Everything that differs between formats; the encoding pipeline itself is shared.
struct FormatSpec {
  // For messages.
  const char* name;
  // libavformat muxer and libavcodec encoder.
  const char* muxer;
  const char* encoder;
  int64_t bit_rate;
  bool streamable;
  // Empty: any rate in kMinPcmRate..kMaxPcmRate.
  absl::Span<const uint32_t> rates;
  const char* content_type;
  const char* extension;
};

// name, muxer, encoder, bit rate, streamable, rates, MIME type, extension. "ipod" is the mp4
// muxer with the M4A brand.
// clang-format off
constexpr FormatSpec kWav{"WAV", "wav", "pcm_s16le", 0, false, {}, "audio/wav", "wav"};
constexpr FormatSpec kPcm{"PCM", "s16le", "pcm_s16le", 0, true, {}, "audio/pcm", "pcm"};
constexpr FormatSpec kMp3{"MP3", "mp3", "libmp3lame", 64000, true, kMp3Rates, "audio/mpeg", "mp3"};
constexpr FormatSpec kOpus{"Opus", "ogg", "libopus", 32000, true, kOpusRates, "audio/ogg", "opus"};
constexpr FormatSpec kAac{"AAC", "ipod", "aac", 64000, false, kAacRates, "audio/mp4", "m4a"};
// clang-format on

// nullptr for a value outside the enum.
const FormatSpec* FindSpec(AudioFormat format) {
  switch (format) {
    case AudioFormat::kWav:
      return &kWav;
    case AudioFormat::kPcm:
      return &kPcm;
    case AudioFormat::kMp3:
      return &kMp3;
    case AudioFormat::kOggOpus:
      return &kOpus;
    case AudioFormat::kAac:
      return &kAac;
  }
  return nullptr;
}

absl::Status UnknownFormatError(AudioFormat format) {
  return InvalidFieldError("format",
                           absl::StrCat("unknown audio format ", static_cast<int>(format)));
}

// The one place FFmpeg error codes become absl::Status.
absl::Status AvError(int error, absl::string_view what) {
  char text[AV_ERROR_MAX_STRING_SIZE] = {};
  av_strerror(error, text, sizeof(text));
  return absl::InternalError(absl::StrCat("FFmpeg ", what, ": ", text));
}

void QuietFfmpegLogs() {
  // FFmpeg logs to stderr from any thread; warnings about clamped bit rates and the like are
  // noise for a service. Errors still show.
  static const bool once = [] {
    av_log_set_level(AV_LOG_ERROR);
    return true;
  }();
  (void)once;
}

struct CodecContextDeleter {
  void operator()(AVCodecContext* context) const { avcodec_free_context(&context); }
};
// Output contexts only (input contexts are closed with avformat_close_input). With
// AVFMT_FLAG_CUSTOM_IO this leaves the AVIOContext alone.
struct OutputFormatDeleter {
  void operator()(AVFormatContext* context) const { avformat_free_context(context); }
};
struct IoContextDeleter {
  void operator()(AVIOContext* io) const {
    // The buffer may have been replaced by libavformat, so free the current one.
    av_freep(&io->buffer);
    avio_context_free(&io);
  }
};
struct SwrDeleter {
  void operator()(SwrContext* swr) const { swr_free(&swr); }
};
struct FifoDeleter {
  void operator()(AVAudioFifo* fifo) const { av_audio_fifo_free(fifo); }
};
struct FrameDeleter {
  void operator()(AVFrame* frame) const { av_frame_free(&frame); }
};
struct PacketDeleter {
  void operator()(AVPacket* packet) const { av_packet_free(&packet); }
};

// Where the muxer writes: a growing string. Seekable for WAV and m4a, whose muxers go back to
// fill in sizes and offsets when they write the trailer.
class MemoryOutput {
 public:
  explicit MemoryOutput(bool seekable) : seekable_(seekable) {}

  bool seekable() const { return seekable_; }

  // What was written since the last call.
  std::string TakeData() {
    position_ = 0;
    return std::exchange(data_, std::string());
  }

  // libavformat's write_packet; FFmpeg 7 made the buffer const.
#if LIBAVFORMAT_VERSION_MAJOR >= 61
  static int WritePacket(void* opaque, const uint8_t* buffer, int size) {
#else
  static int WritePacket(void* opaque, uint8_t* buffer, int size) {
#endif
    return static_cast<MemoryOutput*>(opaque)->Write(buffer, size);
  }

  static int64_t SeekPacket(void* opaque, int64_t offset, int whence) {
    return static_cast<MemoryOutput*>(opaque)->Seek(offset, whence);
  }

 private:
  int Write(const uint8_t* buffer, int size) {
    if (size < 0) return AVERROR(EINVAL);
    const auto bytes = static_cast<size_t>(size);
    if (!seekable_) {
      data_.append(reinterpret_cast<const char*>(buffer), bytes);
      return size;
    }
    if (position_ + bytes > data_.size()) data_.resize(position_ + bytes);
    std::memcpy(data_.data() + position_, buffer, bytes);
    position_ += bytes;
    return size;
  }

  int64_t Seek(int64_t offset, int whence) {
    whence &= ~AVSEEK_FORCE;
    if (whence == AVSEEK_SIZE) return static_cast<int64_t>(data_.size());
    int64_t base;
    switch (whence) {
      case SEEK_SET:
        base = 0;
        break;
      case SEEK_CUR:
        base = static_cast<int64_t>(position_);
        break;
      case SEEK_END:
        base = static_cast<int64_t>(data_.size());
        break;
      default:
        return AVERROR(EINVAL);
    }
    const int64_t target = base + offset;
    if (target < 0) return AVERROR(EINVAL);
    // Seeking past the end is allowed; the gap is zero-filled by the next Write.
    position_ = static_cast<size_t>(target);
    return target;
  }

  const bool seekable_;
  std::string data_;
  size_t position_ = 0;
};

// The codec's sample format closest to our int16 input: exact s16 where the encoder takes it,
// else float.
AVSampleFormat ChooseSampleFormat(const AVCodec& codec) {
  if (codec.sample_fmts == nullptr) return AV_SAMPLE_FMT_S16;
  for (AVSampleFormat wanted :
       {AV_SAMPLE_FMT_S16, AV_SAMPLE_FMT_S16P, AV_SAMPLE_FMT_FLT, AV_SAMPLE_FMT_FLTP}) {
    for (const AVSampleFormat* format = codec.sample_fmts; *format != AV_SAMPLE_FMT_NONE;
         ++format) {
      if (*format == wanted) return wanted;
    }
  }
  return codec.sample_fmts[0];
}

// One pipeline for every format: int16 input → libswresample (rate and sample format) →
// AVAudioFifo (whole codec frames) → encoder → muxer → MemoryOutput.
class FfmpegAudioEncoder final : public AudioEncoder {
 public:
  FfmpegAudioEncoder(AudioFormat format, const FormatSpec& spec, uint32_t input_rate,
                     uint32_t output_rate)
      : format_(format),
        spec_(spec),
        input_rate_(input_rate),
        output_rate_(output_rate),
        output_(/*seekable=*/!spec.streamable) {}

  absl::Status Init();

  absl::Status Write(absl::string_view pcm) override;
  absl::Status Finish() override;
  std::string Take() override;

  AudioFormat format() const override { return format_; }
  uint32_t output_rate() const override { return output_rate_; }
  uint32_t channels() const override { return 1; }
  absl::Duration duration() const override {
    return absl::Seconds(1) * samples_written_ / input_rate_;
  }

 private:
  enum class State { kOpen, kFinished, kFailed };

  // Input samples through the resampler into the FIFO; `samples` nullptr drains the resampler.
  // Sets `*produced` to the number of output samples.
  absl::Status Convert(const int16_t* samples, int count, int* produced);
  // Sends the FIFO to the encoder in frames; `last` also sends a final short frame.
  absl::Status EncodeFifo(bool last);
  absl::Status SendFrame(int samples, bool pad);
  // Moves finished packets from the encoder to the muxer.
  absl::Status WritePackets();
  absl::Status Fail(absl::Status status) {
    state_ = State::kFailed;
    failure_ = status;
    return status;
  }

  const AudioFormat format_;
  const FormatSpec& spec_;
  const uint32_t input_rate_;
  const uint32_t output_rate_;

  // Destroyed bottom-up: the muxer before the AVIOContext it writes through, that before output_.
  MemoryOutput output_;
  std::unique_ptr<AVIOContext, IoContextDeleter> io_;
  std::unique_ptr<AVFormatContext, OutputFormatDeleter> muxer_;
  std::unique_ptr<AVCodecContext, CodecContextDeleter> codec_;
  std::unique_ptr<SwrContext, SwrDeleter> resampler_;
  std::unique_ptr<AVAudioFifo, FifoDeleter> fifo_;
  std::unique_ptr<AVFrame, FrameDeleter> frame_;
  std::unique_ptr<AVPacket, PacketDeleter> packet_;
  AVStream* stream_ = nullptr;  // Owned by muxer_.

  // Samples per codec frame; 0 when the codec takes any count.
  int frame_samples_ = 0;
  // Output of the resampler before it enters the FIFO.
  std::vector<uint8_t> converted_;
  std::vector<int16_t> block_;

  State state_ = State::kOpen;
  absl::Status failure_;
  // The first byte of a sample split across two Writes.
  bool has_odd_byte_ = false;
  char odd_byte_ = 0;
  int64_t samples_written_ = 0;
  // Next frame's pts in 1/output_rate units.
  int64_t next_pts_ = 0;
};

absl::Status FfmpegAudioEncoder::Init() {
  const AVCodec* codec = avcodec_find_encoder_by_name(spec_.encoder);
  if (codec == nullptr) {
    return absl::UnimplementedError(absl::StrCat(spec_.name, " needs FFmpeg's ", spec_.encoder,
                                                 " encoder, which this FFmpeg build lacks"));
  }

  AVFormatContext* muxer = nullptr;
  int error = avformat_alloc_output_context2(&muxer, nullptr, spec_.muxer, nullptr);
  if (error < 0 || muxer == nullptr) {
    return AvError(error < 0 ? error : AVERROR_MUXER_NOT_FOUND,
                   absl::StrCat("muxer ", spec_.muxer));
  }
  muxer_.reset(muxer);
  // Bit-exact: no "Lavf" version tags, and a fixed Ogg serial number instead of a random one.
  muxer_->flags |= AVFMT_FLAG_BITEXACT;

  codec_.reset(avcodec_alloc_context3(codec));
  if (codec_ == nullptr) return AvError(AVERROR(ENOMEM), "avcodec_alloc_context3");
  codec_->sample_fmt = ChooseSampleFormat(*codec);
  codec_->sample_rate = static_cast<int>(output_rate_);
  av_channel_layout_default(&codec_->ch_layout, 1);
  codec_->time_base = AVRational{1, codec_->sample_rate};
  codec_->bit_rate = spec_.bit_rate;
  codec_->flags |= AV_CODEC_FLAG_BITEXACT;
  if (muxer_->oformat->flags & AVFMT_GLOBALHEADER) codec_->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
  AVDictionary* codec_options = nullptr;
  if (std::string_view(spec_.encoder) == "libopus") {
    // libopus defaults to complexity 10 for music, about 50x real time on one core here; speech
    // at complexity 5 in VoIP mode encodes about twice as fast and sounds the same.
    codec_->compression_level = 5;
    av_dict_set(&codec_options, "application", "voip", 0);
  }
  error = avcodec_open2(codec_.get(), codec, &codec_options);
  av_dict_free(&codec_options);
  if (error < 0) return AvError(error, absl::StrCat("opening encoder ", spec_.encoder));
  if (codec_->frame_size > 0 && !(codec->capabilities & AV_CODEC_CAP_VARIABLE_FRAME_SIZE)) {
    frame_samples_ = codec_->frame_size;
  }

  stream_ = avformat_new_stream(muxer_.get(), nullptr);
  if (stream_ == nullptr) return AvError(AVERROR(ENOMEM), "avformat_new_stream");
  error = avcodec_parameters_from_context(stream_->codecpar, codec_.get());
  if (error < 0) return AvError(error, "avcodec_parameters_from_context");
  stream_->time_base = codec_->time_base;

  auto* buffer = static_cast<unsigned char*>(av_malloc(kIoBufferSize));
  if (buffer == nullptr) return AvError(AVERROR(ENOMEM), "av_malloc");
  io_.reset(avio_alloc_context(buffer, kIoBufferSize, /*write_flag=*/1, &output_,
                               /*read_packet=*/nullptr, &MemoryOutput::WritePacket,
                               output_.seekable() ? &MemoryOutput::SeekPacket : nullptr));
  if (io_ == nullptr) {
    av_free(buffer);
    return AvError(AVERROR(ENOMEM), "avio_alloc_context");
  }
  muxer_->pb = io_.get();
  muxer_->flags |= AVFMT_FLAG_CUSTOM_IO;

  AVDictionary* options = nullptr;
  // An empty ID3v2 tag is all the mp3 muxer would write in bit-exact mode; a bare MPEG stream is
  // what streaming clients expect.
  if (format_ == AudioFormat::kMp3) av_dict_set(&options, "id3v2_version", "0", 0);
  // The Ogg muxer holds back up to two pages; at its default of one second per page a stream's
  // listener would wait over a second for audio already encoded. 200 ms pages cost about 2%.
  if (format_ == AudioFormat::kOggOpus) av_dict_set(&options, "page_duration", "200000", 0);
  error = avformat_write_header(muxer_.get(), &options);
  av_dict_free(&options);  // Holds only the options the muxer did not know.
  if (error < 0) return AvError(error, absl::StrCat("writing the ", spec_.muxer, " header"));

  SwrContext* resampler = nullptr;
  AVChannelLayout mono;
  av_channel_layout_default(&mono, 1);
  error = swr_alloc_set_opts2(&resampler, &mono, codec_->sample_fmt, codec_->sample_rate, &mono,
                              AV_SAMPLE_FMT_S16, static_cast<int>(input_rate_), 0, nullptr);
  resampler_.reset(resampler);
  if (error < 0) return AvError(error, "swr_alloc_set_opts2");
  error = swr_init(resampler_.get());
  if (error < 0) return AvError(error, "swr_init");

  fifo_.reset(av_audio_fifo_alloc(codec_->sample_fmt, 1,
                                  std::max(frame_samples_, kVariableFrameSamples) * 2));
  frame_.reset(av_frame_alloc());
  packet_.reset(av_packet_alloc());
  if (fifo_ == nullptr || frame_ == nullptr || packet_ == nullptr) {
    return AvError(AVERROR(ENOMEM), "allocating buffers");
  }
  return absl::OkStatus();
}

absl::Status FfmpegAudioEncoder::Write(absl::string_view pcm) {
  if (state_ == State::kFinished) {
    return absl::FailedPreconditionError("AudioEncoder::Write after Finish");
  }
  if (state_ == State::kFailed) return failure_;
  if (pcm.empty()) return absl::OkStatus();

  if (has_odd_byte_) {
    const char joined[2] = {odd_byte_, pcm[0]};
    int16_t sample;
    std::memcpy(&sample, joined, sizeof(sample));
    int produced;
    if (absl::Status status = Convert(&sample, 1, &produced); !status.ok()) return Fail(status);
    ++samples_written_;
    has_odd_byte_ = false;
    pcm.remove_prefix(1);
  }
  if (pcm.size() % 2 != 0) {
    has_odd_byte_ = true;
    odd_byte_ = pcm.back();
    pcm.remove_suffix(1);
  }

  block_.resize(kBlockSamples);
  while (!pcm.empty()) {
    const size_t count = std::min(pcm.size() / 2, static_cast<size_t>(kBlockSamples));
    // Copied because string data need not be aligned for int16_t.
    std::memcpy(block_.data(), pcm.data(), count * 2);
    pcm.remove_prefix(count * 2);
    int produced;
    absl::Status status = Convert(block_.data(), static_cast<int>(count), &produced);
    if (status.ok()) status = EncodeFifo(/*last=*/false);
    if (!status.ok()) return Fail(status);
    samples_written_ += static_cast<int64_t>(count);
  }
  return absl::OkStatus();
}

absl::Status FfmpegAudioEncoder::Finish() {
  if (state_ == State::kFinished) {
    return absl::FailedPreconditionError("AudioEncoder::Finish called twice");
  }
  if (state_ == State::kFailed) return failure_;
  // A pending odd byte is half a sample; there is nothing to encode it as.
  has_odd_byte_ = false;

  for (int produced = 1; produced > 0;) {
    if (absl::Status status = Convert(nullptr, 0, &produced); !status.ok()) return Fail(status);
  }
  if (absl::Status status = EncodeFifo(/*last=*/true); !status.ok()) return Fail(status);
  // A null frame makes the encoder emit what it holds back (MP3's and AAC's look-ahead).
  int error = avcodec_send_frame(codec_.get(), nullptr);
  if (error < 0) return Fail(AvError(error, "flushing the encoder"));
  if (absl::Status status = WritePackets(); !status.ok()) return Fail(status);
  error = av_write_trailer(muxer_.get());
  if (error < 0) return Fail(AvError(error, absl::StrCat("writing the ", spec_.muxer, " trailer")));
  state_ = State::kFinished;
  return absl::OkStatus();
}

std::string FfmpegAudioEncoder::Take() {
  if (output_.seekable()) {
    // The muxer may still rewrite any byte until the trailer is written.
    return state_ == State::kFinished ? output_.TakeData() : std::string();
  }
  // Whatever libavformat holds in its I/O buffer is complete output already.
  if (io_ != nullptr) avio_flush(io_.get());
  return output_.TakeData();
}

absl::Status FfmpegAudioEncoder::Convert(const int16_t* samples, int count, int* produced) {
  *produced = 0;
  const int capacity = swr_get_out_samples(resampler_.get(), count);
  if (capacity < 0) return AvError(capacity, "swr_get_out_samples");
  if (capacity == 0) return absl::OkStatus();
  const int bytes_per_sample = av_get_bytes_per_sample(codec_->sample_fmt);
  converted_.resize(static_cast<size_t>(capacity) * bytes_per_sample);
  uint8_t* out = converted_.data();
  const auto* in = reinterpret_cast<const uint8_t*>(samples);
  const int converted =
      swr_convert(resampler_.get(), &out, capacity, samples != nullptr ? &in : nullptr, count);
  if (converted < 0) return AvError(converted, "swr_convert");
  if (converted == 0) return absl::OkStatus();
  void* planes[1] = {out};
  const int written = av_audio_fifo_write(fifo_.get(), planes, converted);
  if (written < 0) return AvError(written, "av_audio_fifo_write");
  if (written != converted) return absl::InternalError("av_audio_fifo_write: short write");
  *produced = converted;
  return absl::OkStatus();
}

absl::Status FfmpegAudioEncoder::EncodeFifo(bool last) {
  while (true) {
    const int available = av_audio_fifo_size(fifo_.get());
    if (available == 0) return absl::OkStatus();
    if (frame_samples_ == 0) {
      RETURN_IF_ERROR(SendFrame(std::min(available, kVariableFrameSamples), /*pad=*/false));
    } else if (available >= frame_samples_) {
      RETURN_IF_ERROR(SendFrame(frame_samples_, /*pad=*/false));
    } else if (last) {
      // Every encoder used here takes a short last frame; others get it padded with silence.
      const bool pad = !(codec_->codec->capabilities & AV_CODEC_CAP_SMALL_LAST_FRAME);
      return SendFrame(available, pad);
    } else {
      return absl::OkStatus();  // Wait for a whole frame.
    }
  }
}

absl::Status FfmpegAudioEncoder::SendFrame(int samples, bool pad) {
  AVFrame* frame = frame_.get();
  // The encoder may still hold a reference to the previous buffers; get new ones.
  av_frame_unref(frame);
  frame->nb_samples = pad ? frame_samples_ : samples;
  frame->format = codec_->sample_fmt;
  frame->sample_rate = codec_->sample_rate;
  int error = av_channel_layout_copy(&frame->ch_layout, &codec_->ch_layout);
  if (error < 0) return AvError(error, "av_channel_layout_copy");
  error = av_frame_get_buffer(frame, 0);
  if (error < 0) return AvError(error, "av_frame_get_buffer");
  if (pad) {
    av_samples_set_silence(frame->extended_data, 0, frame->nb_samples, 1, codec_->sample_fmt);
  }
  const int read = av_audio_fifo_read(fifo_.get(), reinterpret_cast<void**>(frame->data), samples);
  if (read != samples) return AvError(read < 0 ? read : AVERROR_BUG, "av_audio_fifo_read");
  frame->pts = next_pts_;
  next_pts_ += frame->nb_samples;
  error = avcodec_send_frame(codec_.get(), frame);
  if (error < 0) return AvError(error, "avcodec_send_frame");
  return WritePackets();
}

absl::Status FfmpegAudioEncoder::WritePackets() {
  while (true) {
    int error = avcodec_receive_packet(codec_.get(), packet_.get());
    if (error == AVERROR(EAGAIN) || error == AVERROR_EOF) return absl::OkStatus();
    if (error < 0) return AvError(error, "avcodec_receive_packet");
    packet_->stream_index = stream_->index;
    av_packet_rescale_ts(packet_.get(), codec_->time_base, stream_->time_base);
    // Takes ownership of the packet's data and leaves it blank.
    error = av_interleaved_write_frame(muxer_.get(), packet_.get());
    if (error < 0) return AvError(error, "writing a packet");
  }
}

}  // namespace

// WAV and raw PCM at the engine's own rate need no codec, resampler or muxer: the samples are the
// output. WAV is a 44-byte RIFF header (PCM, 16-bit, mono) in front of them, written when the
// sizes are known; the header's room is kept at the start of the buffer so the samples are
// copied once, as they arrive. (FFmpeg's muxer produced the same header, 64 samples per frame
// through the encoder and a growing buffer: most of a cached request's time.)
class PassThroughEncoder final : public AudioEncoder {
 public:
  PassThroughEncoder(AudioFormat format, uint32_t rate) : format_(format), rate_(rate) {
    if (format_ == AudioFormat::kWav) out_.assign(kWavHeaderBytes, '\0');
  }

  absl::Status Write(absl::string_view pcm) override {
    if (finished_) return absl::FailedPreconditionError("Write after Finish");
    if (pcm.empty()) return absl::OkStatus();
    if (has_odd_byte_) {
      out_.push_back(odd_byte_);
      out_.push_back(pcm.front());
      pcm.remove_prefix(1);
      has_odd_byte_ = false;
      ++samples_;
    }
    if (pcm.size() % 2 == 1) {
      odd_byte_ = pcm.back();
      has_odd_byte_ = true;
      pcm.remove_suffix(1);
    }
    out_.append(pcm.data(), pcm.size());
    samples_ += static_cast<int64_t>(pcm.size() / 2);
    return absl::OkStatus();
  }

  absl::Status Finish() override {
    if (finished_) return absl::FailedPreconditionError("Finish called twice");
    finished_ = true;
    if (format_ != AudioFormat::kWav) return absl::OkStatus();
    const std::string header = WavHeader(rate_, static_cast<uint64_t>(samples_) * 2);
    std::memcpy(out_.data(), header.data(), header.size());
    return absl::OkStatus();
  }

  std::string Take() override {
    // WAV comes out whole at Finish (its header needs the sizes); PCM as it arrives.
    if (format_ == AudioFormat::kWav && !finished_) return std::string();
    std::string taken = std::move(out_);
    out_.clear();
    return taken;
  }

  AudioFormat format() const override { return format_; }
  uint32_t output_rate() const override { return rate_; }
  uint32_t channels() const override { return 1; }
  absl::Duration duration() const override { return absl::Seconds(1) * samples_ / rate_; }

 private:
  const AudioFormat format_;
  const uint32_t rate_;
  std::string out_;
  bool finished_ = false;
  bool has_odd_byte_ = false;
  char odd_byte_ = 0;
  int64_t samples_ = 0;
};

absl::StatusOr<std::unique_ptr<AudioEncoder>> AudioEncoder::Create(const EncoderOptions& options) {
  const FormatSpec* spec = FindSpec(options.format);
  if (spec == nullptr) return UnknownFormatError(options.format);
  if (options.input_rate < kMinPcmRate || options.input_rate > kMaxPcmRate) {
    return InvalidFieldError("input_rate", absl::StrCat(options.input_rate, " Hz is outside ",
                                                        kMinPcmRate, "..", kMaxPcmRate));
  }
  const uint32_t output_rate = options.output_rate != 0
                                   ? options.output_rate
                                   : DefaultSampleRate(options.format, options.input_rate);
  RETURN_IF_ERROR(CheckSampleRate(options.format, output_rate, "output_rate"));

  if ((options.format == AudioFormat::kWav || options.format == AudioFormat::kPcm) &&
      output_rate == options.input_rate) {
    return std::make_unique<PassThroughEncoder>(options.format, output_rate);
  }
  QuietFfmpegLogs();
  auto encoder =
      std::make_unique<FfmpegAudioEncoder>(options.format, *spec, options.input_rate, output_rate);
  RETURN_IF_ERROR(encoder->Init());
  return encoder;
}

std::string ContentType(AudioFormat format, uint32_t sample_rate) {
  const FormatSpec* spec = FindSpec(format);
  if (spec == nullptr) return "application/octet-stream";
  if (format == AudioFormat::kPcm) {
    return absl::StrCat(spec->content_type, "; rate=", sample_rate, "; channels=1");
  }
  return spec->content_type;
}

bool IsStreamable(AudioFormat format) {
  const FormatSpec* spec = FindSpec(format);
  return spec != nullptr && spec->streamable;
}

absl::string_view FileExtension(AudioFormat format) {
  const FormatSpec* spec = FindSpec(format);
  return spec == nullptr ? "bin" : spec->extension;
}

uint32_t DefaultSampleRate(AudioFormat format, uint32_t input_rate) {
  const FormatSpec* spec = FindSpec(format);
  if (spec == nullptr) return input_rate;
  if (spec->rates.empty()) return std::clamp(input_rate, kMinPcmRate, kMaxPcmRate);
  for (uint32_t rate : spec->rates) {
    if (rate >= input_rate) return rate;
  }
  return spec->rates.back();
}

absl::Status CheckSampleRate(AudioFormat format, uint32_t rate, absl::string_view field) {
  const FormatSpec* spec = FindSpec(format);
  if (spec == nullptr) return UnknownFormatError(format);
  if (spec->rates.empty()) {
    if (rate >= kMinPcmRate && rate <= kMaxPcmRate) return absl::OkStatus();
    return InvalidFieldError(field, absl::StrCat(rate, " Hz is not supported for ", spec->name,
                                                 "; use ", kMinPcmRate, "..", kMaxPcmRate));
  }
  if (std::find(spec->rates.begin(), spec->rates.end(), rate) != spec->rates.end()) {
    return absl::OkStatus();
  }
  return InvalidFieldError(field, absl::StrCat(rate, " Hz is not supported for ", spec->name,
                                               "; use one of ", absl::StrJoin(spec->rates, ", ")));
}

}  // namespace montage::speech
