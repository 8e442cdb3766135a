// LLM providers: one interface over the offline template engine and the three wire formats
// (OpenAI Chat Completions and compatibles, Gemini generateContent, Anthropic Messages). A provider
// turns a prompt into one HTTP call through the shared async client and its answer (or stream)
// back into text, usage and a finish reason. It knows nothing of gRPC, models, fallbacks or the
// cache: the Generator does that.
//
// Errors a provider returns (absl::Status), which decide what the Generator does next:
//   UNAVAILABLE          5xx, 529 overloaded, transport failures, an unparsable answer (fall back)
//   RESOURCE_EXHAUSTED   429 rate limit still failing after the client's retries (fall back)
//   DEADLINE_EXCEEDED    the attempt's timeout or the call's deadline
//   FAILED_PRECONDITION  the operator's problem: key rejected, quota exhausted, model unknown;
//                        with a google.rpc.ErrorInfo naming the provider (fall back)
//   INVALID_ARGUMENT     the provider rejected the request itself (e.g. prompt too long)
//   CANCELLED            the caller went away
// Provider error texts are summarised, never echoed whole: some quote part of the key.
#ifndef MONTAGE_SERVICES_GENERATION_PROVIDER_H_
#define MONTAGE_SERVICES_GENERATION_PROVIDER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/http/http_client.h"
#include "common/telemetry/trace_context.h"
#include "montage/config/v1/config.pb.h"
#include "montage/generation/v1/generation.pb.h"
#include "services/generation/catalogue/catalogue.h"

namespace montage {
class Executor;
}  // namespace montage

namespace montage::generation {

inline constexpr char kErrorDomain[] = "generation.montage.dev";

struct ProviderRequest {
  // The provider's model id (the deployment's `model`).
  std::string model;
  std::vector<PromptMessage> messages;
  v1::SamplingParams sampling;
  // max_tokens when sampling has none; 0: the provider's default (Anthropic gets 1024).
  uint32_t default_max_tokens = 0;
  // JSON Schema text the answer must satisfy; empty for free text.
  std::string output_schema_json;
  // Ask with response_format json_schema (else json_object plus the prompt's instruction).
  bool use_json_schema = false;
  // For the offline provider: the rendered template (null for raw messages).
  std::shared_ptr<const RenderedPrompt> prompt;
  absl::Time deadline = absl::InfiniteFuture();
  std::optional<telemetry::SpanContext> parent_span;
};

struct ProviderResult {
  std::string text;
  v1::Usage usage;
  v1::FinishReason finish_reason = v1::FINISH_REASON_UNSPECIFIED;
  // HTTP attempts (retries included); 1 for the offline provider.
  uint32_t attempts = 1;
};

// Called with each piece of text as it arrives (streaming only). Runs on the HTTP loop thread.
using DeltaCallback = absl::AnyInvocable<void(absl::string_view delta)>;
using ProviderDone = absl::AnyInvocable<void(absl::StatusOr<ProviderResult>) &&>;

// Cancels the call in flight (idempotent); the done callback then gets CANCELLED.
class ProviderCall {
 public:
  virtual ~ProviderCall() = default;
  virtual void Cancel() = 0;
};

class Provider {
 public:
  virtual ~Provider() = default;
  // The config key ("openai-main") and kind ("openai") for metrics, errors and responses.
  virtual const std::string& name() const = 0;
  virtual absl::string_view kind() const = 0;
  // Streams when `on_delta` is set. `done` runs exactly once, possibly before this returns.
  virtual std::shared_ptr<ProviderCall> Generate(ProviderRequest request, DeltaCallback on_delta,
                                                 ProviderDone done) = 0;
};

// Builds the provider `name` from its config. `http` (not owned) must outlive it; `catalogue` is
// used by the offline provider. The API key is resolved from the environment or a file now, so a
// missing key is an error at start, not on the first call. `completions` (not owned; may be null),
// when given, parses unary answers and runs their ProviderDone instead of the HTTP client's loop
// thread; it must outlive the provider's calls.
absl::StatusOr<std::unique_ptr<Provider>> MakeProvider(const std::string& name,
                                                       const config::v1::ProviderConfig& config,
                                                       http::HttpClient* http,
                                                       const Catalogue* catalogue,
                                                       Executor* completions = nullptr);

// Rough token count for rate limits before the provider reports the real one (≈ 4 chars/token).
uint32_t EstimateTokens(absl::string_view text);

}  // namespace montage::generation

#endif  // MONTAGE_SERVICES_GENERATION_PROVIDER_H_
