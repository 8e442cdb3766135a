// The gRPC adapter of the generation service: callback reactors over the Generator. No reactor
// holds a thread while a provider answers: each call's completion arrives as a callback.
//
// Lock order: a flight's lock may be held while a reactor's lock is taken (deltas are pushed
// into reactors under the flight's lock), never the reverse: reactors release their own lock
// before they cancel a generation.
#include "services/generation/generation_service.h"

#include <atomic>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/http/config.h"
#include "common/http/http_client.h"
#include "common/logging.h"
#include "common/proto_time.h"
#include "common/status.h"
#include "common/telemetry/grpc_interceptors.h"
#include "montage/generation/v1/generation.grpc.pb.h"
#include "services/generation/generator.h"

namespace montage::generation {
namespace {

CallOptions OptionsFor(grpc::CallbackServerContext* context) {
  CallOptions options;
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    options.deadline = absl::FromChrono(deadline);
  }
  options.parent_span = telemetry::ServerSpanContext(context);
  return options;
}

// Remembers the handles of a call's generations so OnCancel can cancel them, including those
// that start after the cancellation arrived.
class CancelSet {
 public:
  void Add(std::shared_ptr<GenerationCall> call) {
    bool cancelled = false;
    {
      absl::MutexLock lock(&mu_);
      cancelled = cancelled_;
      if (!cancelled) calls_.push_back(call);
    }
    if (cancelled) call->Cancel();
  }
  void CancelAll() {
    std::vector<std::shared_ptr<GenerationCall>> calls;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      calls.swap(calls_);
    }
    for (auto& c : calls) c->Cancel();
  }
  bool cancelled() const {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }

 private:
  mutable absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::shared_ptr<GenerationCall>> calls_ ABSL_GUARDED_BY(mu_);
};

// A unary Generate. Most answers arrive later (from a provider) and this reactor finishes the call
// then. An answer ready before the handler returns (an in-process cache hit, a request refused at
// once) is finished on the context's default reactor instead, whose end gRPC runs inline: the end
// of a reactor of ours runs on gRPC's executor threads, a thread hop per call that took a sixth
// of the CPU of a cached answer.
class GenerateReactor final : public grpc::ServerUnaryReactor {
 public:
  // Starts the generation and returns the call's reactor: a GenerateReactor, or the context's
  // default reactor already finished.
  static grpc::ServerUnaryReactor* Start(Generator& generator, grpc::CallbackServerContext* context,
                                         const v1::GenerateRequest& request,
                                         v1::GenerateResponse* response) {
    auto* reactor = new GenerateReactor();
    auto cancels = reactor->cancels_;  // `reactor` may be gone once the callback finished the call
    cancels->Add(generator.Generate(
        request, OptionsFor(context), nullptr,
        [reactor, response](absl::StatusOr<v1::GenerateResponse> result) {
          // The status is read by Start only after the exchange, and only when this one won it.
          reactor->status_ = ToGrpcStatus(result.status());
          if (result.ok()) *response = *std::move(result);
          int expected = kStarting;
          if (reactor->state_.compare_exchange_strong(expected, kAnsweredEarly,
                                                      std::memory_order_acq_rel)) {
            return;  // Start finishes the call; `reactor` is not touched again here
          }
          reactor->Finish(std::move(reactor->status_));
        }));
    int expected = kStarting;
    if (reactor->state_.compare_exchange_strong(expected, kBound, std::memory_order_acq_rel)) {
      return reactor;
    }
    grpc::Status status = std::move(reactor->status_);
    delete reactor;  // never handed to gRPC
    grpc::ServerUnaryReactor* done = context->DefaultReactor();
    done->Finish(std::move(status));
    return done;
  }

  void OnCancel() override { cancels_->CancelAll(); }
  void OnDone() override { delete this; }

 private:
  enum : int { kStarting, kAnsweredEarly, kBound };

  GenerateReactor() : cancels_(std::make_shared<CancelSet>()) {}

  std::shared_ptr<CancelSet> cancels_;
  std::atomic<int> state_{kStarting};
  grpc::Status status_;
};

// A server stream with one write in flight at a time and a queue behind it. Text deltas that
// arrive while a write is in flight are merged into the last queued delta, so a slow reader
// costs at most the answer's own size.
template <typename Event>
class QueuedWriter : public grpc::ServerWriteReactor<Event> {
 public:
  QueuedWriter() : cancels_(std::make_shared<CancelSet>()) {}

  void OnWriteDone(bool ok) override {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        broken_ = true;
        queue_.clear();
      }
      finish = PumpLocked();
    }
    if (finish) this->Finish(*finish);
  }
  void OnCancel() override { cancels_->CancelAll(); }
  void OnDone() override { delete this; }

 protected:
  // `merge` is called with the last queued event; returning true means it absorbed the new one.
  template <typename Merge>
  void Push(Event event, Merge merge) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (broken_ || finishing_) return;
      if (!queue_.empty() && merge(queue_.back())) return;
      queue_.push_back(std::move(event));
      finish = PumpLocked();
    }
    if (finish) this->Finish(*finish);
  }
  void Push(Event event) {
    Push(std::move(event), [](Event&) { return false; });
  }
  // No Push may follow (the generator's callbacks end with this one).
  void FinishWhenWritten(absl::Status status) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (finishing_) return;
      finishing_ = true;
      final_ = ToGrpcStatus(status);
      finish = PumpLocked();
    }
    if (finish) this->Finish(*finish);
  }
  std::shared_ptr<CancelSet> cancels_;

 private:
  // Starts the next write, or says the stream is to finish with the returned status. The state
  // change and this decision happen in one critical section, and the caller calls Finish after
  // unlocking and touches nothing after it: OnDone (which deletes this reactor) may run at once.
  std::optional<grpc::Status> PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return std::nullopt;
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      // OnWriteDone cannot run before this returns: it waits for mu_.
      this->StartWrite(&current_);
      return std::nullopt;
    }
    if (!finishing_) return std::nullopt;
    finished_ = true;
    return final_;
  }

  absl::Mutex mu_;
  std::deque<Event> queue_ ABSL_GUARDED_BY(mu_);
  Event current_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_;
};

class StreamGenerateReactor final : public QueuedWriter<v1::GenerateEvent> {
 public:
  StreamGenerateReactor(Generator& generator, grpc::CallbackServerContext* context,
                        const v1::GenerateRequest& request) {
    auto cancels = cancels_;
    cancels->Add(generator.Generate(
        request, OptionsFor(context),
        [this](absl::string_view delta) {
          v1::GenerateEvent event;
          event.mutable_delta()->set_text(std::string(delta));
          Push(std::move(event), [delta](v1::GenerateEvent& last) {
            if (!last.has_delta()) return false;
            last.mutable_delta()->mutable_text()->append(delta.data(), delta.size());
            return true;
          });
        },
        [this](absl::StatusOr<v1::GenerateResponse> result) {
          if (result.ok()) {
            v1::GenerateEvent event;
            *event.mutable_done() = *std::move(result);
            Push(std::move(event));
          }
          FinishWhenWritten(result.status());
        }));
  }
};

// A campaign: the brief first, then every post at once; each post is written as it finishes.
class CampaignReactor final : public QueuedWriter<v1::CampaignEvent> {
 public:
  CampaignReactor(Generator& generator, grpc::CallbackServerContext* context,
                  const v1::GenerateCampaignRequest& request)
      : generator_(generator), request_(request), options_(OptionsFor(context)) {
    if (absl::Status s = Validate(); !s.ok()) {
      FinishWhenWritten(s);
      return;
    }
    if (request_.has_timeout()) {
      options_.deadline =
          std::min(options_.deadline, absl::Now() + FromProtoDuration(request_.timeout()));
    }
    v1::GenerateRequest brief = Base("campaign_brief");
    Put(brief, "brief", request_.brief());
    auto* platforms =
        (*brief.mutable_variables()->mutable_fields())["platforms"].mutable_list_value();
    for (const auto& p : request_.platforms()) platforms->add_values()->set_string_value(p);
    auto cancels = cancels_;
    cancels->Add(generator_.Generate(
        std::move(brief), options_, nullptr,
        [this](absl::StatusOr<v1::GenerateResponse> result) { OnBrief(std::move(result)); }));
  }

 private:
  absl::Status Validate() const {
    if (request_.brief().empty()) return InvalidFieldError("brief", "must describe the campaign");
    if (request_.has_timeout()) {
      const absl::Duration t = FromProtoDuration(request_.timeout());
      const absl::Duration limit = generator_.config().has_max_timeout()
                                       ? FromProtoDuration(generator_.config().max_timeout())
                                       : absl::Hours(1);
      if (t <= absl::ZeroDuration() || t > limit) {
        return InvalidFieldError(
            "timeout", absl::StrCat("must be positive and at most ", absl::FormatDuration(limit)));
      }
    }
    if (request_.platforms().empty()) {
      return InvalidFieldError("platforms",
                               "name at least one platform (x, linkedin, instagram, "
                               "tiktok)");
    }
    for (int i = 0; i < request_.platforms_size(); ++i) {
      const std::string& p = request_.platforms(i);
      if (p != "x" && p != "linkedin" && p != "instagram" && p != "tiktok") {
        return InvalidFieldError(absl::StrCat("platforms[", i, "]"),
                                 "must be one of x, linkedin, instagram, tiktok");
      }
    }
    const uint32_t per = request_.posts_per_platform() == 0 ? 1 : request_.posts_per_platform();
    const uint32_t max = generator_.config().max_campaign_posts() > 0
                             ? generator_.config().max_campaign_posts()
                             : 50;
    // The caller's variables go to the two templates that declare them (audience, tone); one
    // that neither declares, or that the campaign fills in itself, is refused rather than
    // dropped.
    for (const auto& [name, value] : request_.variables().fields()) {
      const std::string field = absl::StrCat("variables.", name);
      if (name == "brief" || name == "platforms" || name == "platform" || name == "plan" ||
          name == "index") {
        return InvalidFieldError(field, "is filled in by the campaign itself");
      }
      bool declared = false;
      for (const char* template_name : {"campaign_brief", "platform_post"}) {
        absl::StatusOr<v1::Template> t = generator_.catalogue().Get(template_name);
        if (!t.ok()) continue;
        for (const auto& var : t->variables()) declared = declared || var.name() == name;
      }
      if (!declared) {
        return InvalidFieldError(
            field, "is not a variable of the campaign_brief or platform_post template");
      }
    }
    if (per > 20) return InvalidFieldError("posts_per_platform", "at most 20 per platform");
    if (static_cast<uint64_t>(per) * request_.platforms_size() > max) {
      return InvalidFieldError(
          "posts_per_platform",
          absl::StrCat("platforms x posts_per_platform must be at most ", max));
    }
    return absl::OkStatus();
  }

  // A request for `template_name` carrying the caller's model, sampling, cache policy and those
  // of the caller's variables the template declares.
  v1::GenerateRequest Base(const std::string& template_name) const {
    v1::GenerateRequest r;
    r.set_model(request_.model());
    r.set_template_(template_name);
    *r.mutable_sampling() = request_.sampling();
    *r.mutable_cache() = request_.cache();
    absl::StatusOr<v1::Template> t = generator_.catalogue().Get(template_name);
    if (t.ok()) {
      for (const auto& var : t->variables()) {
        auto it = request_.variables().fields().find(var.name());
        if (it != request_.variables().fields().end()) {
          (*r.mutable_variables()->mutable_fields())[var.name()] = it->second;
        }
      }
    }
    return r;
  }
  static void Put(v1::GenerateRequest& r, const std::string& name, const std::string& value) {
    (*r.mutable_variables()->mutable_fields())[name].set_string_value(value);
  }

  void OnBrief(absl::StatusOr<v1::GenerateResponse> result) {
    if (!result.ok()) {
      FinishWhenWritten(result.status());
      return;
    }
    AddUsage(result->usage());
    const std::string plan = result->text();
    v1::CampaignEvent event;
    *event.mutable_brief() = *std::move(result);
    Push(std::move(event));

    const uint32_t per = request_.posts_per_platform() == 0 ? 1 : request_.posts_per_platform();
    {
      absl::MutexLock lock(&state_mu_);
      pending_ = per * static_cast<uint32_t>(request_.platforms_size());
    }
    auto cancels = cancels_;
    // Every post starts now; none waits for another.
    for (const std::string& platform : request_.platforms()) {
      for (uint32_t i = 0; i < per; ++i) {
        v1::GenerateRequest post = Base("platform_post");
        Put(post, "platform", platform);
        Put(post, "brief", request_.brief());
        Put(post, "plan", plan);
        (*post.mutable_variables()->mutable_fields())["index"].set_number_value(i + 1);
        cancels->Add(
            generator_.Generate(std::move(post), options_, nullptr,
                                [this, platform, i](absl::StatusOr<v1::GenerateResponse> r) {
                                  OnPost(platform, i, std::move(r));
                                }));
      }
    }
  }

  void OnPost(const std::string& platform, uint32_t index,
              absl::StatusOr<v1::GenerateResponse> result) {
    v1::CampaignEvent event;
    if (result.ok()) {
      AddUsage(result->usage());
      auto* post = event.mutable_post();
      post->set_platform(platform);
      post->set_index(index);
      *post->mutable_result() = *std::move(result);
    } else {
      auto* failed = event.mutable_post_failed();
      failed->set_platform(platform);
      failed->set_index(index);
      failed->set_error(std::string(result.status().message()));
    }
    Push(std::move(event));
    bool last = false;
    v1::Usage total;
    {
      absl::MutexLock lock(&state_mu_);
      last = --pending_ == 0;
      total = usage_;
    }
    if (!last) return;
    if (cancels_->cancelled()) {
      FinishWhenWritten(absl::CancelledError("the caller cancelled the campaign"));
      return;
    }
    v1::CampaignEvent done;
    *done.mutable_total_usage() = total;
    Push(std::move(done));
    FinishWhenWritten(absl::OkStatus());
  }

  void AddUsage(const v1::Usage& u) {
    absl::MutexLock lock(&state_mu_);
    usage_.set_prompt_tokens(usage_.prompt_tokens() + u.prompt_tokens());
    usage_.set_completion_tokens(usage_.completion_tokens() + u.completion_tokens());
    usage_.set_total_tokens(usage_.total_tokens() + u.total_tokens());
  }

  Generator& generator_;
  const v1::GenerateCampaignRequest request_;
  CallOptions options_;
  absl::Mutex state_mu_;
  uint32_t pending_ ABSL_GUARDED_BY(state_mu_) = 0;
  v1::Usage usage_ ABSL_GUARDED_BY(state_mu_);
};

class GenerationServiceImpl final : public v1::GenerationService::CallbackService {
 public:
  explicit GenerationServiceImpl(Generator& generator) : generator_(generator) {}

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override {
    return GenerateReactor::Start(generator_, context, *request, response);
  }
  grpc::ServerWriteReactor<v1::GenerateEvent>* StreamGenerate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override {
    return new StreamGenerateReactor(generator_, context, *request);
  }
  grpc::ServerWriteReactor<v1::CampaignEvent>* GenerateCampaign(
      grpc::CallbackServerContext* context, const v1::GenerateCampaignRequest* request) override {
    return new CampaignReactor(generator_, context, *request);
  }
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest*,
                                       v1::ListModelsResponse* response) override {
    *response = generator_.ListModels();
    return Done(context, absl::OkStatus());
  }
  grpc::ServerUnaryReactor* ListTemplates(grpc::CallbackServerContext* context,
                                          const v1::ListTemplatesRequest*,
                                          v1::ListTemplatesResponse* response) override {
    for (auto& t : generator_.catalogue().List()) *response->add_templates() = std::move(t);
    return Done(context, absl::OkStatus());
  }
  grpc::ServerUnaryReactor* GetTemplate(grpc::CallbackServerContext* context,
                                        const v1::GetTemplateRequest* request,
                                        v1::Template* response) override {
    if (request->name().empty()) return Done(context, InvalidFieldError("name", "is required"));
    absl::StatusOr<v1::Template> t = generator_.catalogue().Get(request->name());
    if (t.ok()) *response = *std::move(t);
    return Done(context, t.status());
  }

 private:
  static grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context,
                                        const absl::Status& status) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(status));
    return reactor;
  }

  Generator& generator_;
};

class GenerationModule final : public ServiceModule {
 public:
  GenerationModule(std::unique_ptr<http::HttpClient> http, std::unique_ptr<Generator> generator)
      : generator_(std::move(generator)), http_(std::move(http)), service_(*generator_) {}
  // Also when Stop never ran (start-up failed after the module was built): the completions pool
  // drains while the HTTP client is still alive, since a completion may call it (a fallback).
  ~GenerationModule() override { generator_->Shutdown(); }

  std::vector<grpc::Service*> GrpcServices() override { return {&service_}; }
  std::vector<std::string> HealthNames() const override {
    return {std::string(v1::GenerationService::service_full_name())};
  }
  // The gRPC server has stopped; flights still waiting end now, before the HTTP client goes.
  void Stop() override { generator_->Shutdown(); }

 private:
  // Destroyed in reverse: the HTTP client first (its last callbacks still find the generator).
  std::unique_ptr<Generator> generator_;
  std::unique_ptr<http::HttpClient> http_;
  GenerationServiceImpl service_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServiceModule>> NewGenerationModule(ServiceContext& context) {
  const config::v1::GenerationConfig& c = context.config.generation();
  ASSIGN_OR_RETURN(
      std::unique_ptr<http::HttpClient> http,
      http::HttpClient::Create(http::HttpClientOptionsFromConfig(c.http(), "generation")));
  std::vector<std::string> dirs(c.template_dirs().begin(), c.template_dirs().end());
  ASSIGN_OR_RETURN(std::unique_ptr<Catalogue> catalogue, Catalogue::Load(dirs));
  ASSIGN_OR_RETURN(std::unique_ptr<cache::CacheClient> cache,
                   cache::MakeCacheClient(c.cache(), "generation", context.clock));
  ASSIGN_OR_RETURN(
      std::unique_ptr<Generator> generator,
      Generator::Create(c, context.clock, http.get(), std::move(catalogue), std::move(cache)));
  LogInfo("generation service ready",
          {{"models", static_cast<int64_t>(c.models_size())},
           {"default_model", c.default_model()},
           {"cache", c.cache().address().empty() ? "in-process" : c.cache().address()}});
  return std::make_unique<GenerationModule>(std::move(http), std::move(generator));
}

}  // namespace montage::generation
