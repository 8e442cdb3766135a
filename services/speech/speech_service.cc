#include "services/speech/speech_service.h"

#include "common/server/not_built.h"
#include "montage/speech/v1/speech.grpc.pb.h"

namespace montage::speech {
namespace {

constexpr absl::string_view kWhy =
    "the speech service (espeak-ng, OpenAI-compatible TTS, segment cache) arrives with issue #5";

class SpeechServiceStub final : public v1::SpeechService::CallbackService {
 public:
  grpc::ServerUnaryReactor* Synthesize(grpc::CallbackServerContext* context,
                                       const v1::SynthesizeRequest*,
                                       v1::SynthesizeResponse*) override {
    return NotBuiltUnary(context, "montage.speech.v1.SpeechService/Synthesize", kWhy);
  }
  grpc::ServerWriteReactor<v1::AudioChunk>* StreamSynthesize(
      grpc::CallbackServerContext*, const v1::SynthesizeRequest*) override {
    return NotBuiltStream<v1::AudioChunk>("montage.speech.v1.SpeechService/StreamSynthesize", kWhy);
  }
  grpc::ServerUnaryReactor* SynthesizeDialogue(grpc::CallbackServerContext* context,
                                               const v1::SynthesizeDialogueRequest*,
                                               v1::SynthesizeResponse*) override {
    return NotBuiltUnary(context, "montage.speech.v1.SpeechService/SynthesizeDialogue", kWhy);
  }
  grpc::ServerUnaryReactor* ListVoices(grpc::CallbackServerContext* context,
                                       const v1::ListVoicesRequest*,
                                       v1::ListVoicesResponse*) override {
    return NotBuiltUnary(context, "montage.speech.v1.SpeechService/ListVoices", kWhy);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewSpeechModule(ServiceContext&) {
  return MakeStubModule(std::make_unique<SpeechServiceStub>(),
                        std::string(v1::SpeechService::service_full_name()));
}

}  // namespace montage::speech
