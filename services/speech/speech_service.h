// The speech service's registration entry point. Until the real service is built, every method
// answers UNIMPLEMENTED naming what is missing (the speech service (espeak-ng, OpenAI-compatible
// TTS, segment cache) arrives with issue #5), while health and reflection already report the
// service so clients and the gateway can be written against its API.
#ifndef MONTAGE_SERVICES_SPEECH_SPEECH_SERVICE_H_
#define MONTAGE_SERVICES_SPEECH_SPEECH_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/server/service_module.h"

namespace montage::speech {

absl::StatusOr<std::unique_ptr<ServiceModule>> NewSpeechModule(ServiceContext& context);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_SPEECH_SERVICE_H_
