// The embedded engine: libespeak-ng in this process, no server and no key.
//
// libespeak-ng keeps global state (one voice, one set of parameters, one output callback), so a
// process can synthesise one text at a time. The engine therefore owns one dedicated thread that
// runs every synthesis in arrival order; callers queue work and get their PCM through a callback,
// so no gRPC thread ever waits on espeak. Only one EspeakEngine may exist per process.
#ifndef MONTAGE_SERVICES_SPEECH_ESPEAK_ENGINE_H_
#define MONTAGE_SERVICES_SPEECH_ESPEAK_ENGINE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "services/speech/tts_engine.h"

namespace montage::speech {

struct EspeakOptions {
  // The folder holding espeak-ng-data; empty: the library's compiled-in default.
  std::string data_path;
  // Segments waiting for the synthesis thread; more are RESOURCE_EXHAUSTED.
  size_t max_queue = 100000;
};

// FAILED_PRECONDITION when espeak-ng cannot start (no voice data) or another EspeakEngine
// exists in the process.
absl::StatusOr<std::unique_ptr<TtsEngine>> NewEspeakEngine(const EspeakOptions& options);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_ESPEAK_ENGINE_H_
