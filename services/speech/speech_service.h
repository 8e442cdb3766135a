// The speech service's registration entry point: the engines of `speech.engines` (espeak-ng in
// process by default, OpenAI-compatible providers over the shared HTTP client), the segment cache
// (the cache service, or in-process) and the gRPC methods of montage.speech.v1.SpeechService.
#ifndef MONTAGE_SERVICES_SPEECH_SPEECH_SERVICE_H_
#define MONTAGE_SERVICES_SPEECH_SPEECH_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::speech {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewSpeechModule(ServiceContext& context);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_SPEECH_SERVICE_H_
