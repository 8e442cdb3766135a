// The espeak pool's worker process and the frames it exchanges with the pool over a socketpair.
//
// A request frame is [u32 length][payload]: flags, rate, pitch, volume, the time left to the
// segment's deadline, the voice and the text. A response frame is [u32 length][u32 status code]
// [body], the length counting the code and the body; the body is the PCM (code 0) or the error
// message. The header goes out separately, so the PCM is written straight from the engine's
// buffer and read straight into the one the job gets. Integers are little-endian.
//
// This part is kept apart from the pool (and from gRPC, FFmpeg and the rest of montaged) so the
// worker can be its own small program, `montage-espeak-worker`, that starts in a few milliseconds;
// `montaged espeak-worker` runs the same loop.
#ifndef MONTAGE_SERVICES_SPEECH_ESPEAK_WORKER_H_
#define MONTAGE_SERVICES_SPEECH_ESPEAK_WORKER_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/time/time.h"
#include "services/speech/tts_engine.h"

namespace montage::speech {

inline constexpr uint32_t kMaxWorkerFrame = 512u << 20;
inline constexpr size_t kWorkerResponseHeader = 8;

// The whole request frame for `segment`.
std::string EncodeWorkerRequest(const Segment& segment, absl::Time deadline);
uint32_t GetU32(const char* p);

// A worker's life: frames in on fd 0, frames out on fd 1, until fd 0 closes. `data_path` as
// EspeakOptions::data_path. Returns the process exit code.
int RunEspeakWorker(const std::string& data_path);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_ESPEAK_WORKER_H_
