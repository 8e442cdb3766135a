#include "services/generation/generator.h"

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/proto_time.h"
#include "common/sha256.h"
#include "common/status.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/tracer.h"
#include "common/utf8.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"

namespace montage::generation {

using config::v1::GenerationConfig;

namespace {

constexpr absl::Duration kMaxCacheTtl = absl::Hours(24 * 365);

constexpr uint32_t kMaxStopSequences = 4;
constexpr size_t kMaxStopBytes = 256;
constexpr uint32_t kMaxTokensLimit = 1'000'000;
// Output tokens assumed for the tokens-per-minute bucket when the caller sets no max_tokens.
constexpr uint32_t kAssumedOutputTokens = 512;

std::string DeterministicBytes(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  m.SerializeToCodedStream(&coded);
  coded.Trim();
  return out;
}

PromptMessage::Role ToRole(v1::Message::Role role) {
  switch (role) {
    case v1::Message::SYSTEM:
      return PromptMessage::Role::kSystem;
    case v1::Message::ASSISTANT:
      return PromptMessage::Role::kAssistant;
    default:
      return PromptMessage::Role::kUser;
  }
}

// Errors after which the next deployment is tried (see provider.h).
bool FallsBack(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kInternal:
      return true;
    default:
      return false;
  }
}

std::string CodeLabel(const absl::Status& s) {
  return std::string(GrpcCodeName(static_cast<grpc::StatusCode>(s.code())));
}

}  // namespace

// Prometheus series of the service (families are created once; series on first use).
struct GeneratorMetrics {
  explicit GeneratorMetrics(prometheus::Registry& r)
      : requests(prometheus::BuildCounter()
                     .Name("montage_generation_requests_total")
                     .Help("Generate calls by model alias, where the answer came from and code")
                     .Register(r)),
        upstream(prometheus::BuildCounter()
                     .Name("montage_generation_upstream_requests_total")
                     .Help("Provider calls by provider, deployment and result code")
                     .Register(r)),
        latency(prometheus::BuildHistogram()
                    .Name("montage_generation_upstream_duration_seconds")
                    .Help("Provider call duration, retries included")
                    .Register(r)),
        ttft(prometheus::BuildHistogram()
                 .Name("montage_generation_time_to_first_token_seconds")
                 .Help("Time from the provider call to its first streamed text")
                 .Register(r)),
        tokens(prometheus::BuildCounter()
                   .Name("montage_generation_tokens_total")
                   .Help("Tokens reported by providers, by direction (in = prompt, out = answer)")
                   .Register(r)),
        retries(prometheus::BuildCounter()
                    .Name("montage_generation_upstream_retries_total")
                    .Help("HTTP retries inside provider calls (rate limits, 5xx)")
                    .Register(r)),
        fallbacks(prometheus::BuildCounter()
                      .Name("montage_generation_fallbacks_total")
                      .Help("Times a model moved on to its next deployment")
                      .Register(r)),
        cache(prometheus::BuildCounter()
                  .Name("montage_generation_cache_requests_total")
                  .Help("Cache lookups by model and result (hit, miss, unavailable)")
                  .Register(r)),
        coalesced(prometheus::BuildCounter()
                      .Name("montage_generation_coalesced_total")
                      .Help("Calls that joined an identical call already in flight")
                      .Register(r)),
        rate_limited(prometheus::BuildCounter()
                         .Name("montage_generation_rate_limited_total")
                         .Help("Deployments skipped because their rate-limit bucket was empty")
                         .Register(r)) {}

  static const prometheus::Histogram::BucketBoundaries& Buckets() {
    static const auto* b = new prometheus::Histogram::BucketBoundaries{
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
    return *b;
  }

  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Counter>& upstream;
  prometheus::Family<prometheus::Histogram>& latency;
  prometheus::Family<prometheus::Histogram>& ttft;
  prometheus::Family<prometheus::Counter>& tokens;
  prometheus::Family<prometheus::Counter>& retries;
  prometheus::Family<prometheus::Counter>& fallbacks;
  prometheus::Family<prometheus::Counter>& cache;
  prometheus::Family<prometheus::Counter>& coalesced;
  prometheus::Family<prometheus::Counter>& rate_limited;
};

// One upstream computation shared by every identical caller (see generator.h).
struct Flight {
  struct Waiter {
    uint64_t id = 0;
    DeltaCallback on_delta;  // null for unary callers
    GenerateDone done;
    size_t sent = 0;  // bytes of text delivered as deltas
  };

  std::string key;  // empty: not shared
  bool write_cache = false;
  absl::Duration ttl;
  std::string alias;
  const Generator::Model* model = nullptr;
  std::shared_ptr<const RenderedPrompt> prompt;
  std::vector<PromptMessage> messages;
  v1::SamplingParams sampling;
  absl::Time deadline;
  std::optional<telemetry::SpanContext> parent;
  bool stream = false;
  uint32_t attempts = 0;
  absl::Status last_error;
  std::string json_error;  // the schema violation a JSON retry corrects

  absl::Mutex mu;
  std::vector<Waiter> waiters ABSL_GUARDED_BY(mu);
  std::string text_so_far ABSL_GUARDED_BY(mu);
  bool cancelled ABSL_GUARDED_BY(mu) = false;
  bool finished ABSL_GUARDED_BY(mu) = false;
  std::shared_ptr<ProviderCall> upstream ABSL_GUARDED_BY(mu);
  uint64_t attempt_seq ABSL_GUARDED_BY(mu) = 0;

  bool Cancelled() {
    absl::MutexLock lock(&mu);
    return cancelled;
  }
  bool DeltasSent() {
    absl::MutexLock lock(&mu);
    return !text_so_far.empty();
  }
};

namespace {

class CallHandle final : public GenerationCall {
 public:
  CallHandle(std::function<void()> cancel) : cancel_(std::move(cancel)) {}
  void Cancel() override {
    std::function<void()> fn;
    {
      absl::MutexLock lock(&mu_);
      fn = std::move(cancel_);
      cancel_ = nullptr;
    }
    if (fn) fn();
  }

 private:
  absl::Mutex mu_;
  std::function<void()> cancel_ ABSL_GUARDED_BY(mu_);
};

class DoneHandle final : public GenerationCall {
 public:
  void Cancel() override {}
};

}  // namespace

Generator::Generator(const GenerationConfig& config, Clock& clock,
                     std::unique_ptr<Catalogue> catalogue,
                     std::unique_ptr<cache::CacheClient> cache)
    : config_(config),
      clock_(clock),
      catalogue_(std::move(catalogue)),
      has_cache_(cache != nullptr),
      cache_(std::move(cache)),
      metrics_(std::make_unique<GeneratorMetrics>(telemetry::MetricsRegistry())),
      completions_(std::make_unique<ThreadPool>(0, size_t{1} << 20, "gen-complete")) {}

Generator::~Generator() { Shutdown(); }

void Generator::Shutdown() {
  std::shared_ptr<cache::CacheClient> cache;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    cache = std::move(cache_);
  }
  // Its pending lookups complete now (cancelled), while every other member is still alive.
  if (cache != nullptr) cache->Close();
  // Answers already received are reported; providers and flights are still alive.
  completions_->Shutdown();
}

absl::StatusOr<std::unique_ptr<Generator>> Generator::Create(
    const GenerationConfig& config, Clock& clock, http::HttpClient* http,
    std::unique_ptr<Catalogue> catalogue, std::unique_ptr<cache::CacheClient> cache) {
  std::unique_ptr<Generator> g(
      new Generator(config, clock, std::move(catalogue), std::move(cache)));
  absl::flat_hash_map<std::string, Provider*> providers;
  for (const auto& [name, pc] : config.providers()) {
    ASSIGN_OR_RETURN(std::unique_ptr<Provider> p,
                     MakeProvider(name, pc, http, g->catalogue_.get(), g->completions_.get()));
    providers[name] = p.get();
    g->providers_.push_back(std::move(p));
  }
  for (const auto& [name, dc] : config.deployments()) {
    auto it = providers.find(dc.provider());
    if (it == providers.end()) {
      return InvalidFieldError(
          absl::StrCat("generation.deployments.", name, ".provider"),
          absl::StrCat("no provider named '", dc.provider(), "' in generation.providers"));
    }
    if (dc.model().empty()) {
      return InvalidFieldError(absl::StrCat("generation.deployments.", name, ".model"),
                               "must name the provider's model");
    }
    auto d = std::make_unique<Deployment>();
    d->name = name;
    d->config = dc;
    d->provider = it->second;
    d->requests = std::make_unique<TokenBucket>(dc.requests_per_minute(), absl::Minutes(1), clock);
    d->tokens = std::make_unique<TokenBucket>(dc.tokens_per_minute(), absl::Minutes(1), clock);
    g->deployments_[name] = std::move(d);
  }
  for (const auto& [alias, mc] : config.models()) {
    Model m;
    m.alias = alias;
    m.description = mc.description();
    for (const std::string& dname : mc.deployments()) {
      auto it = g->deployments_.find(dname);
      if (it == g->deployments_.end()) {
        return InvalidFieldError(
            absl::StrCat("generation.models.", alias, ".deployments"),
            absl::StrCat("no deployment named '", dname, "' in generation.deployments"));
      }
      m.deployments.push_back(it->second.get());
    }
    if (m.deployments.empty()) {
      return InvalidFieldError(absl::StrCat("generation.models.", alias, ".deployments"),
                               "must list at least one deployment");
    }
    g->models_[alias] = std::move(m);
  }
  if (!g->models_.contains(config.default_model())) {
    return InvalidFieldError(
        "generation.default_model",
        absl::StrCat("no model named '", config.default_model(), "' in generation.models"));
  }
  return g;
}

absl::Status Generator::Validate(const v1::GenerateRequest& req) const {
  if (!req.model().empty() && !models_.contains(req.model())) {
    std::vector<std::string> known;
    for (const auto& [alias, m] : models_) known.push_back(alias);
    std::sort(known.begin(), known.end());
    return InvalidFieldError("model", absl::StrCat("unknown model '", req.model(),
                                                   "' (known: ", absl::StrJoin(known, ", "), ")"));
  }
  if (req.template_().empty()) {
    if (req.messages().empty()) {
      return InvalidFieldError("template", "name a template (see ListTemplates) or give messages");
    }
    if (req.variables().fields_size() > 0) {
      return InvalidFieldError("variables", "variables are only used with a template");
    }
  }
  const uint32_t max_messages = config_.max_messages() > 0 ? config_.max_messages() : 256;
  if (static_cast<uint32_t>(req.messages_size()) > max_messages) {
    return InvalidFieldError("messages", absl::StrCat("at most ", max_messages, " messages"));
  }
  for (int i = 0; i < req.messages_size(); ++i) {
    const auto& m = req.messages(i);
    if (m.role() == v1::Message::ROLE_UNSPECIFIED || !v1::Message::Role_IsValid(m.role())) {
      return InvalidFieldError(absl::StrCat("messages[", i, "].role"),
                               "must be SYSTEM, USER or ASSISTANT");
    }
    if (m.content().empty()) {
      return InvalidFieldError(absl::StrCat("messages[", i, "].content"), "must not be empty");
    }
  }
  if (req.template_().empty() &&
      std::none_of(req.messages().begin(), req.messages().end(),
                   [](const v1::Message& m) { return m.role() == v1::Message::USER; })) {
    return InvalidFieldError("messages", "needs at least one USER message");
  }
  const auto& s = req.sampling();
  if (s.has_temperature() && !(s.temperature() >= 0 && s.temperature() <= 2)) {
    return InvalidFieldError("sampling.temperature", "must be between 0 and 2");
  }
  if (s.has_top_p() && !(s.top_p() > 0 && s.top_p() <= 1)) {
    return InvalidFieldError("sampling.top_p", "must be greater than 0 and at most 1");
  }
  if (s.has_max_tokens() && (s.max_tokens() == 0 || s.max_tokens() > kMaxTokensLimit)) {
    return InvalidFieldError("sampling.max_tokens",
                             absl::StrCat("must be between 1 and ", kMaxTokensLimit));
  }
  if (static_cast<uint32_t>(s.stop_size()) > kMaxStopSequences) {
    return InvalidFieldError("sampling.stop",
                             absl::StrCat("at most ", kMaxStopSequences, " stop sequences"));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    if (s.stop(i).empty() || s.stop(i).size() > kMaxStopBytes) {
      return InvalidFieldError(absl::StrCat("sampling.stop[", i, "]"),
                               absl::StrCat("must be 1 to ", kMaxStopBytes, " bytes"));
    }
  }
  if (req.has_timeout()) {
    const absl::Duration t = FromProtoDuration(req.timeout());
    const absl::Duration max =
        config_.has_max_timeout() ? FromProtoDuration(config_.max_timeout()) : absl::Hours(1);
    if (t <= absl::ZeroDuration() || t > max) {
      return InvalidFieldError(
          "timeout", absl::StrCat("must be positive and at most ", absl::FormatDuration(max)));
    }
  }
  if (!v1::CachePolicy::Mode_IsValid(req.cache().mode())) {
    return InvalidFieldError("cache.mode", "must be USE, REFRESH or BYPASS");
  }
  if (req.cache().has_ttl() && (FromProtoDuration(req.cache().ttl()) < absl::ZeroDuration() ||
                                FromProtoDuration(req.cache().ttl()) > kMaxCacheTtl)) {
    return InvalidFieldError("cache.ttl", "must be between 0 and 365 days");
  }
  return absl::OkStatus();
}

std::shared_ptr<GenerationCall> Generator::Generate(v1::GenerateRequest request,
                                                    CallOptions options, DeltaCallback on_delta,
                                                    GenerateDone done) {
  auto fail = [&](absl::Status s) -> std::shared_ptr<GenerationCall> {
    // Only configured aliases become label values (callers must not grow the series).
    const std::string label = models_.contains(request.model()) ? request.model() : "other";
    metrics_->requests.Add({{"model", label}, {"source", "none"}, {"code", CodeLabel(s)}})
        .Increment();
    std::move(done)(std::move(s));
    return std::make_shared<DoneHandle>();
  };
  if (absl::Status s = Validate(request); !s.ok()) return fail(std::move(s));
  if (stopping()) return fail(absl::UnavailableError("the generation service is stopping"));
  const std::string alias = request.model().empty() ? config_.default_model() : request.model();
  request.set_model(alias);
  const Model& model = models_.at(alias);

  auto flight = std::make_shared<Flight>();
  flight->alias = alias;
  flight->model = &model;
  flight->sampling = request.sampling();
  flight->parent = options.parent_span;
  flight->stream = on_delta != nullptr;
  size_t prompt_bytes = 0;
  if (!request.template_().empty()) {
    absl::StatusOr<RenderedPrompt> rendered =
        catalogue_->Render(request.template_(), request.variables());
    if (!rendered.ok()) return fail(rendered.status());
    flight->messages = rendered->messages;
    flight->prompt = std::make_shared<const RenderedPrompt>(*std::move(rendered));
  }
  for (const auto& m : request.messages()) {
    flight->messages.push_back({ToRole(m.role()), m.content()});
  }
  for (const auto& m : flight->messages) prompt_bytes += m.content.size();
  const uint64_t max_prompt =
      config_.max_prompt_bytes() > 0 ? config_.max_prompt_bytes() : 256 << 10;
  if (prompt_bytes > max_prompt) {
    return fail(InvalidFieldError(
        request.template_().empty() ? "messages" : "variables",
        absl::StrCat("the prompt is ", prompt_bytes, " bytes; the limit is ", max_prompt)));
  }

  const absl::Time now = absl::Now();
  const absl::Duration timeout = request.has_timeout() ? FromProtoDuration(request.timeout())
                                 : config_.has_default_timeout()
                                     ? FromProtoDuration(config_.default_timeout())
                                     : absl::Minutes(5);
  flight->deadline = std::min(options.deadline, now + timeout);
  // Whether only this call holds the caller to its deadline: the request's own timeout (or the
  // default one) ends before the caller's (gRPC's, which cancels the call itself when it passes).
  const bool deadline_is_ours = now + timeout < options.deadline;

  // Cacheable: deterministic requests (temperature 0 or a seed), unless configured otherwise.
  const auto mode = request.cache().mode() == v1::CachePolicy::MODE_UNSPECIFIED
                        ? v1::CachePolicy::USE
                        : request.cache().mode();
  const bool deterministic =
      (request.sampling().has_temperature() && request.sampling().temperature() == 0) ||
      request.sampling().has_seed();
  const bool cacheable = mode != v1::CachePolicy::BYPASS &&
                         (deterministic || config_.cache().cache_nondeterministic());
  flight->write_cache = cacheable && has_cache_;
  flight->ttl =
      request.cache().has_ttl() ? FromProtoDuration(request.cache().ttl()) : absl::ZeroDuration();
  if (cacheable) {
    // The rendered prompt, not the template's name: an edited template (or replicas with
    // different catalogues sharing one cache) must not be answered from the old one's entries.
    std::string keyed = absl::StrCat(alias, "\n", DeterministicBytes(request.sampling()), "\n");
    if (flight->prompt != nullptr) absl::StrAppend(&keyed, flight->prompt->output_schema_json);
    for (const auto& m : flight->messages) {
      absl::StrAppend(&keyed, "\n", static_cast<int>(m.role), ":", m.content.size(), ":",
                      m.content);
    }
    flight->key = absl::StrCat("v2:", Sha256Hex(keyed));
  }
  const bool read_cache = flight->write_cache && mode == v1::CachePolicy::USE;
  // Only USE calls share flights: REFRESH must ask the provider again.
  const bool shared = !flight->key.empty() && mode == v1::CachePolicy::USE;

  // Join an identical flight in progress when it will run about as long as this caller may wait;
  // otherwise start one. The map insert happens in the same critical section as the
  // lookup, so concurrent identical callers cannot both start a flight.
  uint64_t waiter_id = 0;
  std::shared_ptr<Flight> existing;
  std::shared_ptr<Flight> ended;
  bool started = false;
  {
    absl::MutexLock lock(&mu_);
    waiter_id = next_waiter_id_++;
    auto it = shared ? flights_.find(flight->key) : flights_.end();
    // "At least as long", give or take a tenth of this caller's time (at least a second):
    // identical callers arriving moments apart share, a patient caller does not inherit the
    // deadline of a hurried one. A hurried caller whose deadline only its own timeout enforces
    // does not join a longer flight either: nothing would end its wait in time.
    const absl::Duration slack = std::max(absl::Seconds(1), (flight->deadline - now) / 10);
    if (it != flights_.end() && it->second->deadline + slack >= flight->deadline &&
        (!deadline_is_ours || it->second->deadline <= flight->deadline)) {
      existing = it->second;
    } else {
      {
        absl::MutexLock flock(&flight->mu);
        flight->waiters.push_back({waiter_id, std::move(on_delta), std::move(done), 0});
      }
      // A flight with a shorter deadline stays in the map; this one runs unshared.
      if (shared && it == flights_.end()) flights_[flight->key] = flight;
      ++running_;
      started = true;
    }
  }
  if (existing != nullptr) {
    // Outside the generator's lock: the snapshot goes to the caller's callback under the
    // flight's lock only, ordered before the deltas that follow.
    absl::MutexLock flock(&existing->mu);
    if (!existing->cancelled && !existing->finished) {
      Flight::Waiter w{waiter_id, std::move(on_delta), std::move(done), 0};
      if (w.on_delta != nullptr && !existing->text_so_far.empty()) {
        w.on_delta(existing->text_so_far);
        w.sent = existing->text_so_far.size();
      }
      existing->waiters.push_back(std::move(w));
    } else {
      ended = std::move(existing);  // it ended meanwhile: start a new one below
      existing = nullptr;
    }
  }
  std::shared_ptr<Flight> target;
  if (existing != nullptr) {
    {
      absl::MutexLock lock(&mu_);
      ++stats_.coalesced;
    }
    metrics_->coalesced.Add({{"model", alias}}).Increment();
    target = existing;
  } else {
    if (!started) {
      absl::MutexLock lock(&mu_);
      {
        absl::MutexLock flock(&flight->mu);
        flight->waiters.push_back({waiter_id, std::move(on_delta), std::move(done), 0});
      }
      if (shared) {
        // Replace the flight that ended, but not a newer one another caller started meanwhile
        // (this one then runs unshared).
        auto& slot = flights_[flight->key];
        if (slot == nullptr || slot == ended) slot = flight;
      }
      ++running_;
    }
    target = flight;
    StartFlight(flight, read_cache);
  }
  return std::make_shared<CallHandle>([this, target, waiter_id] { Leave(target, waiter_id); });
}

void Generator::StartFlight(std::shared_ptr<Flight> flight, bool read_cache) {
  if (!read_cache) {
    TryDeployment(std::move(flight), 0, false);
    return;
  }
  std::shared_ptr<cache::CacheClient> cache;
  {
    absl::MutexLock lock(&mu_);
    cache = cache_;
  }
  if (cache == nullptr) {  // Shutdown took it
    FinishFlight(flight, absl::CancelledError("the generation service is stopping"));
    return;
  }
  cache->Get(flight->key, [this, flight](absl::StatusOr<cache::Value> got) {
    if (stopping()) {
      FinishFlight(flight, absl::CancelledError("the generation service is stopping"));
      return;
    }
    const char* result = "miss";
    if (!got.ok()) {
      result = "unavailable";
    } else if (*got != nullptr) {
      v1::GenerateResponse cached;
      if (cached.ParseFromString(**got)) {
        metrics_->cache.Add({{"model", flight->alias}, {"result", "hit"}}).Increment();
        {
          absl::MutexLock lock(&mu_);
          ++stats_.cache_hits;
        }
        cached.set_cached(true);
        cached.set_model(flight->alias);
        FinishFlight(flight, std::move(cached));
        return;
      }
      result = "unavailable";
    }
    metrics_->cache.Add({{"model", flight->alias}, {"result", result}}).Increment();
    {
      absl::MutexLock lock(&mu_);
      if (std::string_view(result) == "miss") {
        ++stats_.cache_misses;
      } else {
        ++stats_.cache_errors;
      }
    }
    TryDeployment(flight, 0, false);
  });
}

void Generator::TryDeployment(std::shared_ptr<Flight> flight, size_t index, bool json_retry) {
  const Model& model = *flight->model;
  if (flight->Cancelled()) {
    FinishFlight(flight, absl::CancelledError("every caller went away"));
    return;
  }
  if (stopping()) {
    FinishFlight(flight, absl::CancelledError("the generation service is stopping"));
    return;
  }
  if (index >= model.deployments.size()) {
    absl::Status last = flight->last_error;
    if (last.ok()) last = absl::UnavailableError("no deployment could answer");
    FinishFlight(flight, std::move(last));
    return;
  }
  const absl::Time now = absl::Now();
  if (now >= flight->deadline) {
    FinishFlight(flight, absl::DeadlineExceededError(absl::StrCat(
                             "model '", flight->alias, "': the call's deadline passed after ",
                             flight->attempts, " attempt(s)")));
    return;
  }
  Deployment& d = *model.deployments[index];
  auto next = [this, flight, index](absl::Status error) {
    flight->last_error = std::move(error);
    if (index + 1 < flight->model->deployments.size()) {
      metrics_->fallbacks.Add({{"model", flight->alias}}).Increment();
      absl::MutexLock lock(&mu_);
      ++stats_.fallbacks;
    }
    TryDeployment(flight, index + 1, false);
  };

  // Rate limits: one request and the estimated tokens (prompt + answer budget).
  uint32_t estimate = 0;
  for (const auto& m : flight->messages) estimate += EstimateTokens(m.content);
  const uint32_t out_budget = flight->sampling.has_max_tokens()   ? flight->sampling.max_tokens()
                              : d.config.default_max_tokens() > 0 ? d.config.default_max_tokens()
                                                                  : kAssumedOutputTokens;
  estimate += out_budget;
  if (!d.requests->TryTake(1)) {
    metrics_->rate_limited.Add({{"deployment", d.name}}).Increment();
    {
      absl::MutexLock lock(&mu_);
      ++stats_.rate_limited;
    }
    next(absl::ResourceExhaustedError(absl::StrCat(
        "deployment '", d.name, "' is at its requests_per_minute limit; retry in ",
        absl::FormatDuration(absl::Ceil(d.requests->TimeUntil(1), absl::Seconds(1))))));
    return;
  }
  if (!d.tokens->TryTake(estimate)) {
    d.requests->Adjust(-1);
    metrics_->rate_limited.Add({{"deployment", d.name}}).Increment();
    {
      absl::MutexLock lock(&mu_);
      ++stats_.rate_limited;
    }
    next(absl::ResourceExhaustedError(absl::StrCat(
        "deployment '", d.name, "' is at its tokens_per_minute limit (this call needs about ",
        estimate, " tokens)")));
    return;
  }

  ProviderRequest pr;
  pr.model = d.config.model();
  pr.messages = flight->messages;
  if (json_retry) {
    pr.messages.push_back(
        {PromptMessage::Role::kUser,
         absl::StrCat("Your previous answer was not valid JSON for the required schema (",
                      flight->json_error,
                      "). Answer again with only the JSON object, no other text.")});
  }
  pr.sampling = flight->sampling;
  pr.default_max_tokens = d.config.default_max_tokens();
  if (flight->prompt != nullptr) pr.output_schema_json = flight->prompt->output_schema_json;
  pr.use_json_schema = d.config.json_schema();
  pr.prompt = flight->prompt;
  pr.deadline = flight->deadline;
  if (d.config.has_timeout())
    pr.deadline = std::min(pr.deadline, now + FromProtoDuration(d.config.timeout()));

  telemetry::Span span = telemetry::GlobalTracer().StartSpan(
      "generation.upstream", telemetry::SpanKind::kInternal, flight->parent);
  span.SetAttribute("generation.deployment", d.name);
  span.SetAttribute("generation.provider", d.provider->kind());
  span.SetAttribute("generation.model", d.config.model());
  if (span.context().IsValid()) pr.parent_span = span.context();
  auto span_holder = std::make_shared<telemetry::Span>(std::move(span));

  {
    absl::MutexLock lock(&mu_);
    ++stats_.upstream_calls;
  }
  ++flight->attempts;
  const absl::Time started = absl::Now();
  auto first_token = std::make_shared<bool>(false);
  DeltaCallback on_delta;
  if (flight->stream) {
    on_delta = [this, flight, &d, started, first_token](absl::string_view delta) {
      if (!*first_token) {
        *first_token = true;
        metrics_->ttft
            .Add({{"provider", d.provider->name()}, {"deployment", d.name}},
                 GeneratorMetrics::Buckets())
            .Observe(absl::ToDoubleSeconds(absl::Now() - started));
      }
      absl::MutexLock lock(&flight->mu);
      flight->text_so_far.append(delta.data(), delta.size());
      for (auto& w : flight->waiters) {
        if (w.on_delta != nullptr) {
          w.on_delta(delta);
          w.sent += delta.size();
        }
      }
    };
  }
  const std::string schema = pr.output_schema_json;
  auto done = [this, flight, index, json_retry, &d, started, estimate, schema, span_holder,
               next](absl::StatusOr<ProviderResult> result) mutable {
    const std::string code = result.ok() ? "OK" : CodeLabel(result.status());
    const prometheus::Labels labels{{"provider", d.provider->name()}, {"deployment", d.name}};
    metrics_->upstream
        .Add({{"provider", d.provider->name()}, {"deployment", d.name}, {"code", code}})
        .Increment();
    metrics_->latency.Add(labels, GeneratorMetrics::Buckets())
        .Observe(absl::ToDoubleSeconds(absl::Now() - started));
    if (!result.ok()) {
      if (const uint32_t attempts = http::FailedAttempts(result.status()); attempts > 1) {
        metrics_->retries.Add(labels).Increment(attempts - 1);
      }
      span_holder->SetStatus(telemetry::SpanStatusCode::kError, result.status().message());
      span_holder->End();
      d.tokens->Adjust(-static_cast<double>(estimate));  // nothing was spent
      if (result.status().code() == absl::StatusCode::kCancelled || flight->Cancelled()) {
        FinishFlight(flight, result.status());
        return;
      }
      const bool past_deadline = absl::Now() >= flight->deadline;
      if (FallsBack(result.status().code()) && !flight->DeltasSent() && !past_deadline) {
        next(result.status());
      } else {
        FinishFlight(flight, result.status());
      }
      return;
    }
    if (result->attempts > 1) metrics_->retries.Add(labels).Increment(result->attempts - 1);
    // Usage on every answer: when the provider reported none, an estimate, marked as one.
    if (result->usage.prompt_tokens() == 0 && result->usage.completion_tokens() == 0) {
      uint32_t prompt = 0;
      for (const auto& m : flight->messages) prompt += EstimateTokens(m.content);
      result->usage.set_prompt_tokens(prompt);
      result->usage.set_completion_tokens(EstimateTokens(result->text));
      result->usage.set_total_tokens(prompt + result->usage.completion_tokens());
      result->usage.set_estimated(true);
    }
    metrics_->tokens
        .Add({{"provider", d.provider->name()}, {"deployment", d.name}, {"direction", "in"}})
        .Increment(result->usage.prompt_tokens());
    metrics_->tokens
        .Add({{"provider", d.provider->name()}, {"deployment", d.name}, {"direction", "out"}})
        .Increment(result->usage.completion_tokens());
    if (result->usage.total_tokens() > 0) {
      d.tokens->Adjust(static_cast<double>(result->usage.total_tokens()) - estimate);
    }
    span_holder->SetAttribute("generation.prompt_tokens", result->usage.prompt_tokens());
    span_holder->SetAttribute("generation.completion_tokens", result->usage.completion_tokens());
    v1::GenerateResponse response;
    if (!schema.empty()) {
      absl::Status valid = Catalogue::ValidateOutput(schema, result->text, response.mutable_json());
      if (!valid.ok()) {
        span_holder->SetStatus(telemetry::SpanStatusCode::kError, valid.message());
        span_holder->End();
        if (!json_retry && !flight->DeltasSent()) {
          flight->json_error = std::string(Utf8Prefix(valid.message(), 300));
          TryDeployment(flight, index, true);
          return;
        }
        absl::Status bad = absl::InternalError(absl::StrCat(
            "deployment '", d.name, "' answered twice with JSON that does not match the ",
            "template's schema: ", valid.message()));
        AttachErrorInfo(bad, "INVALID_MODEL_OUTPUT", kErrorDomain,
                        {{"provider", d.provider->name()}, {"deployment", d.name}});
        if (!flight->DeltasSent()) {
          next(std::move(bad));
        } else {
          FinishFlight(flight, std::move(bad));
        }
        return;
      }
    }
    span_holder->End();
    response.set_text(std::move(result->text));
    *response.mutable_usage() = result->usage;
    response.set_model(flight->alias);
    response.set_deployment(d.name);
    response.set_provider(std::string(d.provider->kind()));
    response.set_finish_reason(result->finish_reason);
    response.set_attempts(flight->attempts + result->attempts - 1);
    std::shared_ptr<cache::CacheClient> cache;
    if (flight->write_cache) {
      absl::MutexLock lock(&mu_);
      cache = cache_;
    }
    if (cache != nullptr) {
      const absl::Duration ttl = flight->ttl > absl::ZeroDuration()
                                     ? flight->ttl
                                     : (config_.cache().has_default_ttl()
                                            ? FromProtoDuration(config_.cache().default_ttl())
                                            : absl::ZeroDuration());
      cache->Set(flight->key, std::make_shared<const std::string>(response.SerializeAsString()),
                 ttl);
    }
    FinishFlight(flight, std::move(response));
  };
  uint64_t attempt = 0;
  {
    absl::MutexLock lock(&flight->mu);
    attempt = ++flight->attempt_seq;
  }
  std::shared_ptr<ProviderCall> call =
      d.provider->Generate(std::move(pr), std::move(on_delta), std::move(done));
  bool cancel_now = false;
  {
    absl::MutexLock lock(&flight->mu);
    // A fast failure may already have started the next attempt: keep that one's handle.
    if (!flight->finished && flight->attempt_seq == attempt) flight->upstream = call;
    cancel_now = flight->cancelled;
  }
  if (cancel_now) call->Cancel();
}

void Generator::FinishFlight(const std::shared_ptr<Flight>& flight,
                             absl::StatusOr<v1::GenerateResponse> result) {
  std::vector<Flight::Waiter> waiters;
  {
    absl::MutexLock lock(&flight->mu);
    if (flight->finished) return;
    flight->finished = true;
    flight->upstream.reset();
    waiters = std::move(flight->waiters);
    flight->waiters.clear();
  }
  {
    absl::MutexLock lock(&mu_);
    if (!flight->key.empty()) {
      auto it = flights_.find(flight->key);
      if (it != flights_.end() && it->second == flight) flights_.erase(it);
    }
    --running_;
  }
  const std::string source = !result.ok() ? "none" : result->cached() ? "cache" : "upstream";
  for (auto& w : waiters) {
    metrics_->requests
        .Add({{"model", flight->alias},
              {"source", source},
              {"code", result.ok() ? "OK" : CodeLabel(result.status())}})
        .Increment();
    if (result.ok() && w.on_delta != nullptr && w.sent < result->text().size()) {
      w.on_delta(absl::string_view(result->text()).substr(w.sent));
    }
    std::move(w.done)(result);
  }
}

void Generator::Leave(const std::shared_ptr<Flight>& flight, uint64_t waiter_id) {
  GenerateDone done;
  std::shared_ptr<ProviderCall> upstream;
  {
    absl::MutexLock lock(&flight->mu);
    auto it = std::find_if(flight->waiters.begin(), flight->waiters.end(),
                           [&](const Flight::Waiter& w) { return w.id == waiter_id; });
    if (it == flight->waiters.end()) return;
    done = std::move(it->done);
    flight->waiters.erase(it);
    if (flight->waiters.empty() && !flight->finished) {
      flight->cancelled = true;
      upstream = flight->upstream;
    }
  }
  std::move(done)(absl::CancelledError("the caller cancelled the call"));
  // The provider's done callback (CANCELLED) then finishes the flight; a flight waiting on the
  // cache finishes when the lookup returns.
  if (upstream != nullptr) upstream->Cancel();
}

v1::ListModelsResponse Generator::ListModels() const {
  v1::ListModelsResponse out;
  std::vector<const Model*> sorted;
  for (const auto& [alias, m] : models_) sorted.push_back(&m);
  std::sort(sorted.begin(), sorted.end(),
            [](const Model* a, const Model* b) { return a->alias < b->alias; });
  for (const Model* m : sorted) {
    v1::Model* pm = out.add_models();
    pm->set_alias(m->alias);
    pm->set_description(m->description);
    for (const Deployment* d : m->deployments) {
      auto* pd = pm->add_deployments();
      pd->set_name(d->name);
      pd->set_provider(std::string(d->provider->kind()));
      pd->set_model(d->config.model());
    }
  }
  out.set_default_model(config_.default_model());
  return out;
}

Generator::Stats Generator::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

size_t Generator::flights_in_flight() const {
  absl::MutexLock lock(&mu_);
  return running_;
}

}  // namespace montage::generation
