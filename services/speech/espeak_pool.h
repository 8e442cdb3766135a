// espeak on more than one core. libespeak-ng keeps global state, so one process speaks one text at
// a time; the pool adds worker processes (`montage-espeak-worker`, each its own libespeak-ng) to
// the in-process engine, and hands each segment to whichever lane is free. A worker that dies
// fails only the segment it had (UNAVAILABLE) and is started again at once by the pool's poll
// thread (after respawn_delay when it could not start or ended before its first answer).
//
// The parent talks to each worker over a socketpair with length-prefixed frames; one thread
// polls every worker socket (it never waits on any single one), and the in-process lane keeps
// its own synthesis thread. Voices, validation and the sample rate come from the in-process
// engine: the workers load the same espeak-ng data.
#ifndef MONTAGE_SERVICES_SPEECH_ESPEAK_POOL_H_
#define MONTAGE_SERVICES_SPEECH_ESPEAK_POOL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/speech/espeak_engine.h"
#include "services/speech/tts_engine.h"

namespace montage::speech {

struct EspeakPoolOptions {
  EspeakOptions espeak;
  // Segments spoken at once: the in-process engine plus lanes - 1 worker processes.
  size_t lanes = 2;
  // argv of a worker, e.g. {"/usr/bin/montage-espeak-worker"} or {"/usr/bin/montaged",
  // "espeak-worker"}; the data path is appended when EspeakOptions::data_path is set. Empty: no
  // workers (one lane).
  std::vector<std::string> worker_command;
  // A worker that dies is started again at once by the pool's poll thread. If that start fails
  // (the program is gone), or the worker ends before its first answer (a missing library, a
  // crash at start-up), the lane waits this long before the next try, and segments go to the
  // other lanes meanwhile. At least 1 ms.
  absl::Duration respawn_delay = absl::Seconds(1);
};

// Wraps `local` (an espeak engine in this process) in a pool. FAILED_PRECONDITION when the first
// worker cannot start.
absl::StatusOr<std::unique_ptr<TtsEngine>> NewEspeakPool(std::unique_ptr<TtsEngine> local,
                                                         const EspeakPoolOptions& options);

// The command that starts a worker of this program, when the program has one (montaged sets it
// before starting services; test binaries do not). Empty: the speech service runs one lane.
void SetEspeakWorkerCommand(std::vector<std::string> argv);
std::vector<std::string> EspeakWorkerCommand();

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_ESPEAK_POOL_H_
