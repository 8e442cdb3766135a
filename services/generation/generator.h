// The generation engine (no gRPC in here): validates a request, renders its template, serves it
// from the cache or joins an identical request already in flight (single-flight), and otherwise
// calls the model's deployments in fallback order under their rate limits, validating structured
// answers against the template's schema. Everything is asynchronous: callbacks run on the HTTP
// client's loop thread (or the caller's thread when the answer is immediate).
//
// Single-flight: identical cacheable requests share one upstream call (a "flight"). Every caller
// is a waiter of the flight; streaming waiters get the deltas (a late joiner first gets the text
// so far in one piece). A waiter that cancels leaves; when the last one leaves, the upstream call
// is aborted.
#ifndef MONTAGE_SERVICES_GENERATION_GENERATOR_H_
#define MONTAGE_SERVICES_GENERATION_GENERATOR_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/executor.h"
#include "common/http/http_client.h"
#include "common/telemetry/trace_context.h"
#include "common/token_bucket.h"
#include "montage/config/v1/config.pb.h"
#include "montage/generation/v1/generation.pb.h"
#include "services/cache/cache_client.h"
#include "services/generation/catalogue/catalogue.h"
#include "services/generation/provider.h"

namespace montage::generation {

struct GeneratorMetrics;
struct Flight;

// Cancels one caller's interest in a generation (idempotent, thread-safe). Its done callback then
// runs with CANCELLED unless it already ran.
class GenerationCall {
 public:
  virtual ~GenerationCall() = default;
  virtual void Cancel() = 0;
};

struct CallOptions {
  // The caller's deadline (the gRPC deadline); the request's own timeout may shorten it.
  absl::Time deadline = absl::InfiniteFuture();
  std::optional<telemetry::SpanContext> parent_span;
};

using GenerateDone = absl::AnyInvocable<void(absl::StatusOr<v1::GenerateResponse>) &&>;

class Generator {
 public:
  // `clock` drives rate-limit buckets and the in-process cache's TTLs (tests use a fake one);
  // deadlines and latencies are real time, as the gRPC deadline and the HTTP client's timers are.
  // `http` (not owned) is destroyed before the generator (after Shutdown): the client's last
  // callbacks, for the calls it cancels as it goes, reach the providers. Config errors are
  // INVALID_ARGUMENT naming the config field (unknown provider of a deployment, unknown
  // deployment of a model, …).
  static absl::StatusOr<std::unique_ptr<Generator>> Create(
      const config::v1::GenerationConfig& config, Clock& clock, http::HttpClient* http,
      std::unique_ptr<Catalogue> catalogue, std::unique_ptr<cache::CacheClient> cache);
  // Calls Shutdown().
  ~Generator();

  // Before the HTTP client goes away: flights still waiting (on the cache, or between attempts)
  // end with CANCELLED instead of starting provider calls, and the cache's own calls are
  // cancelled and waited for. Idempotent.
  void Shutdown();

  // Streams deltas when `on_delta` is set. `done` runs exactly once. Bad input is reported
  // through `done` as INVALID_ARGUMENT naming the field (before any upstream work).
  std::shared_ptr<GenerationCall> Generate(v1::GenerateRequest request, CallOptions options,
                                           DeltaCallback on_delta, GenerateDone done);

  v1::ListModelsResponse ListModels() const;
  const Catalogue& catalogue() const { return *catalogue_; }
  const config::v1::GenerationConfig& config() const { return config_; }

  struct Stats {
    uint64_t upstream_calls = 0;  // provider calls started (each deployment attempt)
    uint64_t coalesced = 0;       // callers that joined a flight in progress
    uint64_t cache_hits = 0;
    uint64_t cache_misses = 0;
    uint64_t cache_errors = 0;  // cache unreachable or failing: generation went on uncached
    uint64_t fallbacks = 0;
    uint64_t rate_limited = 0;  // deployments skipped because their bucket was empty
  };
  Stats stats() const;
  // Flights currently running (tests wait for it to reach 0 after cancellations).
  size_t flights_in_flight() const;

 private:
  friend struct Flight;
  struct Deployment {
    std::string name;
    config::v1::DeploymentConfig config;
    Provider* provider = nullptr;
    std::unique_ptr<TokenBucket> requests;
    std::unique_ptr<TokenBucket> tokens;
  };
  struct Model {
    std::string alias;
    std::string description;
    std::vector<Deployment*> deployments;
  };

  Generator(const config::v1::GenerationConfig& config, Clock& clock,
            std::unique_ptr<Catalogue> catalogue, std::unique_ptr<cache::CacheClient> cache);
  absl::Status Validate(const v1::GenerateRequest& request) const;
  void StartFlight(std::shared_ptr<Flight> flight, bool read_cache);
  void TryDeployment(std::shared_ptr<Flight> flight, size_t index, bool json_retry);
  void FinishFlight(const std::shared_ptr<Flight>& flight,
                    absl::StatusOr<v1::GenerateResponse> result);
  void Leave(const std::shared_ptr<Flight>& flight, uint64_t waiter_id);

  const config::v1::GenerationConfig config_;
  Clock& clock_;
  std::unique_ptr<Catalogue> catalogue_;
  const bool has_cache_;  // constructed with a cache (it may be gone after Shutdown)
  std::shared_ptr<cache::CacheClient> cache_ ABSL_GUARDED_BY(mu_);  // null after Shutdown
  std::vector<std::unique_ptr<Provider>> providers_;
  absl::flat_hash_map<std::string, std::unique_ptr<Deployment>> deployments_;
  absl::flat_hash_map<std::string, Model> models_;
  std::unique_ptr<GeneratorMetrics> metrics_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(mu_);
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_waiter_id_ ABSL_GUARDED_BY(mu_) = 1;
  Stats stats_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Where unary provider answers are parsed and reported (see MakeProvider). Last, so that it is
  // gone before what its work touches; Shutdown drains it.
  std::unique_ptr<ThreadPool> completions_;

  bool stopping() const {
    absl::MutexLock lock(&mu_);
    return stopping_;
  }
};

}  // namespace montage::generation

#endif  // MONTAGE_SERVICES_GENERATION_GENERATOR_H_
