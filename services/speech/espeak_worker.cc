#include "services/speech/espeak_worker.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <future>
#include <limits>
#include <utility>

#include "absl/time/clock.h"
#include "services/speech/espeak_engine.h"

namespace montage::speech {
namespace {

constexpr uint32_t kNoTimeout = std::numeric_limits<uint32_t>::max();
enum : uint8_t { kSsml = 1, kHasRate = 2, kHasPitch = 4, kHasVolume = 8 };

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
}  // namespace

uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

std::string EncodeWorkerRequest(const Segment& segment, absl::Time deadline) {
  std::string payload;
  uint8_t flags = 0;
  if (segment.ssml) flags |= kSsml;
  if (segment.voice.rate.has_value()) flags |= kHasRate;
  if (segment.voice.pitch.has_value()) flags |= kHasPitch;
  if (segment.voice.volume.has_value()) flags |= kHasVolume;
  payload.push_back(static_cast<char>(flags));
  const double rate = segment.voice.rate.value_or(0);
  char rate_bytes[sizeof(double)];
  std::memcpy(rate_bytes, &rate, sizeof(double));
  payload.append(rate_bytes, sizeof(double));
  PutU32(payload, segment.voice.pitch.value_or(0));
  PutU32(payload, segment.voice.volume.value_or(0));
  uint32_t timeout_ms = kNoTimeout;
  if (deadline != absl::InfiniteFuture()) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    timeout_ms = static_cast<uint32_t>(std::clamp<int64_t>(ms, 0, kNoTimeout - 1));
  }
  PutU32(payload, timeout_ms);
  PutU32(payload, static_cast<uint32_t>(segment.voice.voice.size()));
  payload += segment.voice.voice;
  payload += segment.text;
  std::string frame;
  frame.reserve(4 + payload.size());
  PutU32(frame, static_cast<uint32_t>(payload.size()));
  frame += payload;
  return frame;
}

namespace {

absl::StatusOr<std::pair<Segment, absl::Time>> DecodeRequest(const std::string& payload) {
  constexpr size_t kFixed = 1 + sizeof(double) + 4 * 4;
  if (payload.size() < kFixed) return absl::InvalidArgumentError("short request frame");
  const char* p = payload.data();
  const uint8_t flags = static_cast<uint8_t>(p[0]);
  double rate;
  std::memcpy(&rate, p + 1, sizeof(double));
  const char* q = p + 1 + sizeof(double);
  const uint32_t pitch = GetU32(q);
  const uint32_t volume = GetU32(q + 4);
  const uint32_t timeout_ms = GetU32(q + 8);
  const uint32_t voice_len = GetU32(q + 12);
  if (payload.size() - kFixed < voice_len) return absl::InvalidArgumentError("bad voice length");
  Segment segment;
  segment.ssml = (flags & kSsml) != 0;
  if (flags & kHasRate) segment.voice.rate = rate;
  if (flags & kHasPitch) segment.voice.pitch = pitch;
  if (flags & kHasVolume) segment.voice.volume = volume;
  segment.voice.voice = payload.substr(kFixed, voice_len);
  segment.text = payload.substr(kFixed + voice_len);
  const absl::Time deadline = timeout_ms == kNoTimeout
                                  ? absl::InfiniteFuture()
                                  : absl::Now() + absl::Milliseconds(timeout_ms);
  return std::make_pair(std::move(segment), deadline);
}

std::string ResponseHeader(absl::StatusCode code, size_t body_size) {
  std::string header;
  PutU32(header, static_cast<uint32_t>(4 + body_size));
  PutU32(header, static_cast<uint32_t>(code));
  return header;
}

// Reads or writes (`io`) all `size` bytes, blocking (the worker has nothing else to do); false
// at EOF or on an error.
template <typename Io, typename Byte>
bool Whole(Io io, int fd, Byte* data, size_t size) {
  while (size > 0) {
    const ssize_t n = io(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}
bool ReadFull(int fd, char* data, size_t size) { return Whole(read, fd, data, size); }
bool WriteFull(int fd, const char* data, size_t size) { return Whole(write, fd, data, size); }

bool WriteResponse(int fd, const absl::StatusOr<std::string>& result) {
  const absl::string_view body =
      result.ok() ? absl::string_view(*result) : result.status().message();
  const std::string header = ResponseHeader(result.status().code(), body.size());
  return WriteFull(fd, header.data(), header.size()) && WriteFull(fd, body.data(), body.size());
}

}  // namespace

int RunEspeakWorker(const std::string& data_path) {
  // The parent's end of the socket closes when the parent exits, however it exits: the next read
  // sees EOF and the worker ends. (PR_SET_PDEATHSIG would follow the thread that spawned the
  // worker, not the process.)
  signal(SIGPIPE, SIG_IGN);
  EspeakOptions options;
  options.data_path = data_path;
  absl::StatusOr<std::unique_ptr<TtsEngine>> engine = NewEspeakEngine(options);
  if (!engine.ok()) {
    // Answer the first request with the failure, so the parent reports why.
    char head[4];
    if (ReadFull(0, head, 4)) WriteResponse(1, engine.status());
    return 1;
  }
  {
    // Load the default voice now, not on the first segment a request waits for.
    Segment warm_up;
    warm_up.text = "Ready.";
    std::promise<void> spoken;
    (*engine)->Synthesize(std::move(warm_up), absl::Now() + absl::Seconds(10),
                          [&spoken](absl::StatusOr<std::string>) { spoken.set_value(); });
    spoken.get_future().wait();
  }
  for (;;) {
    char head[4];
    if (!ReadFull(0, head, 4)) return 0;  // the parent closed the socket
    const uint32_t length = GetU32(head);
    if (length > kMaxWorkerFrame) return 2;
    std::string payload(length, '\0');
    if (!ReadFull(0, payload.data(), length)) return 0;
    absl::StatusOr<std::pair<Segment, absl::Time>> request = DecodeRequest(payload);
    absl::StatusOr<std::string> result;
    if (!request.ok()) {
      result = request.status();
    } else {
      std::promise<absl::StatusOr<std::string>> answer;
      (*engine)->Synthesize(
          std::move(request->first), request->second,
          [&answer](absl::StatusOr<std::string> pcm) { answer.set_value(std::move(pcm)); });
      result = answer.get_future().get();
    }
    if (!WriteResponse(1, result)) return 0;
  }
}

}  // namespace montage::speech
