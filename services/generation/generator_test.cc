// The engine against the fake provider: fallbacks, deadlines, cancellation reaching the
// upstream, rate limits on a fake clock, single-flight, the cache and its policies, schema
// validation with one retry, and bad input. No test asserts a duration.
#include "services/generation/generator.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/status.h"
#include "common/telemetry/metrics.h"
#include "common/telemetry/metrics_test_util.h"
#include "common/telemetry/tracer.h"
#include "google/protobuf/util/time_util.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"
#include "tests/fake_llm/fake_llm_server.h"
#include "tests/testing/unused_port.h"

namespace montage::generation {
namespace {

using config::v1::GenerationConfig;
using config::v1::ProviderConfig;
using testing::Behaviour;
using testing::FakeLlmServer;

constexpr absl::Duration kWait = absl::Seconds(30);

struct Result {
  absl::Notification done;
  absl::StatusOr<v1::GenerateResponse> response = absl::UnknownError("not run");
  absl::Mutex mu;
  std::string streamed;
};

std::string BadField(const absl::Status& s) {
  google::rpc::Status rpc = ToRpcStatus(s);
  for (const auto& any : rpc.details()) {
    google::rpc::BadRequest br;
    if (any.UnpackTo(&br) && br.field_violations_size() > 0) {
      return br.field_violations(0).field();
    }
  }
  return "";
}

class GeneratorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fake = FakeLlmServer::Start();
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    auto http = http::HttpClient::Create();
    ASSERT_TRUE(http.ok()) << http.status();
    http_ = *std::move(http);
    config_ = config::DefaultConfig().generation();
    AddProvider("fake-openai", ProviderConfig::OPENAI, "/v1");
    AddProvider("fake-gemini", ProviderConfig::GEMINI, "/v1beta");
    AddProvider("fake-anthropic", ProviderConfig::ANTHROPIC, "/v1");
    AddDeployment("primary", "fake-openai", "gpt-fake");
    AddDeployment("secondary", "fake-gemini", "gemini-fake");
    AddDeployment("tertiary", "fake-anthropic", "claude-fake");
    auto& chain = (*config_.mutable_models())["chain"];
    chain.set_description("primary, then gemini, then claude");
    chain.add_deployments("primary");
    chain.add_deployments("secondary");
    chain.add_deployments("tertiary");
    (*config_.mutable_models())["solo"].add_deployments("primary");
  }

  void AddProvider(const std::string& name, ProviderConfig::Kind kind, const std::string& path) {
    ProviderConfig& p = (*config_.mutable_providers())[name];
    p.set_kind(kind);
    p.set_base_url(fake_->base_url() + path);
    p.mutable_retry()->set_max_attempts(1);
    setenv("MONTAGE_TEST_PROVIDER_KEY", "sk-right", 1);
    p.mutable_api_key()->set_env("MONTAGE_TEST_PROVIDER_KEY");
  }
  void AddDeployment(const std::string& name, const std::string& provider,
                     const std::string& model) {
    auto& d = (*config_.mutable_deployments())[name];
    d.set_provider(provider);
    d.set_model(model);
  }

  void Build() {
    auto catalogue = Catalogue::Load({});
    ASSERT_TRUE(catalogue.ok()) << catalogue.status();
    auto cache = cache::MakeCacheClient(config_.cache(), "generation", clock_);
    ASSERT_TRUE(cache.ok()) << cache.status();
    auto g =
        Generator::Create(config_, clock_, http_.get(), *std::move(catalogue), *std::move(cache));
    ASSERT_TRUE(g.ok()) << g.status();
    generator_ = *std::move(g);
  }

  static v1::GenerateRequest Ask(const std::string& model, const std::string& text,
                                 double temperature = 0) {
    v1::GenerateRequest r;
    r.set_model(model);
    auto* m = r.add_messages();
    m->set_role(v1::Message::USER);
    m->set_content(text);
    r.mutable_sampling()->set_temperature(temperature);
    return r;
  }

  std::shared_ptr<GenerationCall> Start(v1::GenerateRequest r, Result& out, bool stream = false,
                                        CallOptions options = {}) {
    DeltaCallback on_delta;
    if (stream) {
      on_delta = [&out](absl::string_view d) {
        absl::MutexLock lock(&out.mu);
        out.streamed.append(d.data(), d.size());
      };
    }
    return generator_->Generate(std::move(r), options, std::move(on_delta),
                                [&out](absl::StatusOr<v1::GenerateResponse> response) {
                                  out.response = std::move(response);
                                  out.done.Notify();
                                });
  }

  absl::StatusOr<v1::GenerateResponse> Call(v1::GenerateRequest r) {
    // Shared, so a callback arriving after a timed-out wait writes into live memory.
    auto out = std::make_shared<Result>();
    generator_->Generate(std::move(r), {}, nullptr,
                         [out](absl::StatusOr<v1::GenerateResponse> response) {
                           out->response = std::move(response);
                           out->done.Notify();
                         });
    if (!out->done.WaitForNotificationWithTimeout(kWait)) {
      return absl::DeadlineExceededError("hung");
    }
    return out->response;
  }

  FakeClock clock_;
  std::unique_ptr<FakeLlmServer> fake_;
  GenerationConfig config_;
  // Destroyed after the HTTP client, as in montaged: the client's last callbacks (calls it
  // cancels, cancellations still queued on its loop) reach the providers.
  std::unique_ptr<Generator> generator_;
  std::unique_ptr<http::HttpClient> http_;
};

TEST_F(GeneratorTest, FallsBackToTheNextDeploymentOnErrors) {
  Build();
  Behaviour down;
  down.status = 500;
  Behaviour limited;
  limited.status = 429;
  fake_->Enqueue(down);     // primary (openai)
  fake_->Enqueue(limited);  // secondary (gemini)
  auto r = Call(Ask("chain", "fall back please", 0.7));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->deployment(), "tertiary");
  EXPECT_EQ(r->provider(), "anthropic");
  EXPECT_EQ(r->model(), "chain");
  EXPECT_EQ(r->attempts(), 3u);
  EXPECT_EQ(generator_->stats().fallbacks, 2u);
  const auto stats = fake_->stats();
  ASSERT_EQ(stats.total_requests, 3u);
  EXPECT_EQ(stats.openai_requests, 1u);
  EXPECT_EQ(stats.gemini_requests, 1u);
  EXPECT_EQ(stats.anthropic_requests, 1u);
}

TEST_F(GeneratorTest, TheLastErrorIsReportedWhenEveryDeploymentFails) {
  Build();
  Behaviour down;
  down.status = 500;
  for (int i = 0; i < 3; ++i) fake_->Enqueue(down);
  auto r = Call(Ask("chain", "no luck", 0.7));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
}

TEST_F(GeneratorTest, FallsBackWhenADeploymentTimesOut) {
  (*config_.mutable_deployments())["primary"].mutable_timeout()->set_nanos(100'000'000);
  Build();
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  auto r = Call(Ask("chain", "slow primary", 0.7));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->deployment(), "secondary");
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait)) << "the timed-out transfer was left running";
}

TEST_F(GeneratorTest, AuthFailureEverywhereIsFailedPreconditionNamingTheProvider) {
  fake_->set_expected_key("sk-the-operator-forgot-to-update");
  Build();
  auto r = Call(Ask("solo", "hello", 0.7));
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  google::rpc::Status rpc = ToRpcStatus(r.status());
  bool found = false;
  for (const auto& any : rpc.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) {
      found = true;
      EXPECT_EQ(info.reason(), "PROVIDER_AUTH_FAILED");
      EXPECT_EQ(info.metadata().at("provider"), "fake-openai");
    }
  }
  EXPECT_TRUE(found);
}

TEST_F(GeneratorTest, TheCallersDeadlineEndsTheCallAndTheUpstreamTransfer) {
  Build();
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  v1::GenerateRequest req = Ask("solo", "never answered", 0.7);
  req.mutable_timeout()->set_nanos(100'000'000);
  // The fake clock does not move, so the deadline comes from the transfer's own timer.
  auto r = Call(req);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait));
}

TEST_F(GeneratorTest, CancellingTheOnlyCallerAbortsTheUpstream) {
  Build();
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  Result out;
  auto call = Start(Ask("solo", "cancel me", 0.7), out);
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  call->Cancel();
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.response.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait));
  for (int i = 0; i < 2000 && generator_->flights_in_flight() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(generator_->flights_in_flight(), 0u);
}

TEST_F(GeneratorTest, RateLimitsMoveToTheNextDeploymentAndRefillWithTime) {
  (*config_.mutable_deployments())["primary"].set_requests_per_minute(2);
  auto& pair = (*config_.mutable_models())["pair"];
  pair.add_deployments("primary");
  pair.add_deployments("secondary");
  Build();
  for (int i = 0; i < 2; ++i) {
    auto r = Call(Ask("pair", "call " + std::to_string(i), 0.7));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->deployment(), "primary");
  }
  auto third = Call(Ask("pair", "call 3", 0.7));
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->deployment(), "secondary");
  EXPECT_EQ(generator_->stats().rate_limited, 1u);

  auto solo = Call(Ask("solo", "call 4", 0.7));
  EXPECT_EQ(solo.status().code(), absl::StatusCode::kResourceExhausted) << solo.status();
  EXPECT_NE(solo.status().message().find("requests_per_minute"), std::string::npos);

  clock_.Advance(absl::Seconds(30));  // one request's worth of refill
  auto later = Call(Ask("solo", "call 5", 0.7));
  ASSERT_TRUE(later.ok()) << later.status();
  EXPECT_EQ(later->deployment(), "primary");
}

TEST_F(GeneratorTest, TokensPerMinuteLimitCountsThePromptAndTheAnswerBudget) {
  (*config_.mutable_deployments())["primary"].set_tokens_per_minute(100);
  Build();
  v1::GenerateRequest big = Ask("solo", std::string(1000, 'x'), 0.7);  // ≈ 250 tokens
  auto r = Call(big);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_EQ(fake_->stats().total_requests, 0u);
}

TEST_F(GeneratorTest, HundredIdenticalConcurrentRequestsMakeOneUpstreamCall) {
  Build();
  Behaviour slow;
  slow.delay = absl::Seconds(3);
  fake_->Enqueue(slow);
  std::vector<std::unique_ptr<Result>> results;
  std::vector<std::shared_ptr<GenerationCall>> calls;
  results.push_back(std::make_unique<Result>());
  calls.push_back(Start(Ask("solo", "the same question", 0), *results.back()));
  // The first call's request is at the provider (held there for 3 s): the other 99 start now.
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  for (int i = 1; i < 100; ++i) {
    results.push_back(std::make_unique<Result>());
    calls.push_back(Start(Ask("solo", "the same question", 0), *results.back()));
  }
  for (auto& r : results) {
    ASSERT_TRUE(r->done.WaitForNotificationWithTimeout(kWait));
    ASSERT_TRUE(r->response.ok()) << r->response.status();
    EXPECT_EQ(r->response->text(), results[0]->response->text());
  }
  EXPECT_EQ(fake_->stats().total_requests, 1u);
  EXPECT_EQ(generator_->stats().upstream_calls, 1u);
  EXPECT_EQ(generator_->stats().coalesced, 99u);
}

TEST_F(GeneratorTest, StreamingFollowersGetTheTextSoFarThenTheRest) {
  Build();
  fake_->set_chunk_interval(absl::Milliseconds(20));
  Result leader;
  Start(Ask("solo", "a streamed answer shared by two callers", 0), leader, /*stream=*/true);
  // Join once the leader has received part of the answer (the stream has many chunks, 20 ms
  // apart), so the follower gets the text so far and then the live deltas.
  for (int i = 0; i < 2000; ++i) {
    {
      absl::MutexLock lock(&leader.mu);
      if (!leader.streamed.empty()) break;
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  Result follower;
  Start(Ask("solo", "a streamed answer shared by two callers", 0), follower, /*stream=*/true);
  ASSERT_TRUE(leader.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(follower.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(leader.response.ok()) << leader.response.status();
  ASSERT_TRUE(follower.response.ok()) << follower.response.status();
  EXPECT_EQ(leader.streamed, leader.response->text());
  EXPECT_EQ(follower.streamed, leader.response->text());
  EXPECT_EQ(fake_->stats().total_requests, 1u);
  EXPECT_EQ(generator_->stats().coalesced, 1u) << "the follower did not join the live call";
}

TEST_F(GeneratorTest, ACallerWithALongerDeadlineDoesNotJoinAShorterCall) {
  Build();
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  v1::GenerateRequest hurried = Ask("solo", "same words", 0);
  hurried.mutable_timeout()->set_nanos(300'000'000);
  Result first;
  Start(hurried, first);
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  auto patient = Call(Ask("solo", "same words", 0));  // default timeout: minutes
  ASSERT_TRUE(patient.ok()) << patient.status();
  ASSERT_TRUE(first.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(first.response.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(generator_->stats().coalesced, 0u);
  EXPECT_EQ(fake_->stats().total_requests, 2u);
}

// The other way round: a caller whose own timeout is shorter than the call in flight starts its
// own call, held to that timeout (no gRPC deadline would end its wait as a waiter).
TEST_F(GeneratorTest, ACallerWithAShorterTimeoutDoesNotJoinALongerCall) {
  Build();
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  fake_->Enqueue(hang);
  Result patient;
  auto patient_call = Start(Ask("solo", "same words", 0), patient);  // default timeout: minutes
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  v1::GenerateRequest hurried = Ask("solo", "same words", 0);
  hurried.mutable_timeout()->set_nanos(300'000'000);
  Result second;
  Start(hurried, second);
  ASSERT_TRUE(second.done.WaitForNotificationWithTimeout(kWait))
      << "the hurried caller waited on the patient caller's call";
  EXPECT_EQ(second.response.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(generator_->stats().coalesced, 0u);
  EXPECT_EQ(fake_->stats().total_requests, 2u);
  EXPECT_FALSE(patient.done.HasBeenNotified());
  patient_call->Cancel();
  ASSERT_TRUE(patient.done.WaitForNotificationWithTimeout(kWait));
}

TEST_F(GeneratorTest, OneCancelledWaiterDoesNotStopTheOthers) {
  Build();
  Behaviour slow;
  slow.delay = absl::Milliseconds(500);
  fake_->Enqueue(slow);
  Result a, b;
  auto call_a = Start(Ask("solo", "shared", 0), a);
  Start(Ask("solo", "shared", 0), b);
  call_a->Cancel();
  ASSERT_TRUE(a.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(a.response.status().code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(b.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_TRUE(b.response.ok()) << b.response.status();
  EXPECT_EQ(fake_->stats().disconnects, 0u);
}

TEST_F(GeneratorTest, DeterministicAnswersComeFromTheCache) {
  Build();
  auto first = Call(Ask("solo", "cache me", 0));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->cached());
  auto second = Call(Ask("solo", "cache me", 0));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->cached());
  EXPECT_EQ(second->text(), first->text());
  EXPECT_EQ(fake_->stats().total_requests, 1u);
  EXPECT_EQ(generator_->stats().cache_hits, 1u);

  // A seed makes a request deterministic too; temperature > 0 without one is not cached.
  v1::GenerateRequest seeded = Ask("solo", "seeded", 0.9);
  seeded.mutable_sampling()->set_seed(7);
  ASSERT_TRUE(Call(seeded).ok());
  EXPECT_TRUE(Call(seeded)->cached());
  ASSERT_TRUE(Call(Ask("solo", "creative", 0.9)).ok());
  EXPECT_FALSE(Call(Ask("solo", "creative", 0.9))->cached());
  EXPECT_EQ(fake_->stats().total_requests, 4u);
}

TEST_F(GeneratorTest, CachePoliciesRefreshAndBypass) {
  Build();
  ASSERT_TRUE(Call(Ask("solo", "policy", 0)).ok());
  v1::GenerateRequest refresh = Ask("solo", "policy", 0);
  refresh.mutable_cache()->set_mode(v1::CachePolicy::REFRESH);
  auto refreshed = Call(refresh);
  ASSERT_TRUE(refreshed.ok());
  EXPECT_FALSE(refreshed->cached());
  v1::GenerateRequest bypass = Ask("solo", "policy", 0);
  bypass.mutable_cache()->set_mode(v1::CachePolicy::BYPASS);
  EXPECT_FALSE(Call(bypass)->cached());
  EXPECT_TRUE(Call(Ask("solo", "policy", 0))->cached());
  EXPECT_EQ(fake_->stats().total_requests, 3u);
}

TEST_F(GeneratorTest, CacheTtlFromThePolicyExpiresOnTheClock) {
  Build();
  v1::GenerateRequest r = Ask("solo", "short lived", 0);
  r.mutable_cache()->mutable_ttl()->set_seconds(10);
  ASSERT_TRUE(Call(r).ok());
  EXPECT_TRUE(Call(r)->cached());
  clock_.Advance(absl::Seconds(11));
  EXPECT_FALSE(Call(r)->cached());
}

TEST_F(GeneratorTest, AnUnreachableCacheServiceMeansUncachedNotFailed) {
  config_.mutable_cache()->set_address(absl::StrCat("127.0.0.1:", testing::UnusedLoopbackPort()));
  config_.mutable_cache()->mutable_timeout()->set_nanos(200'000'000);
  Build();
  auto r = Call(Ask("solo", "no cache today", 0));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->cached());
  EXPECT_EQ(generator_->stats().cache_errors, 1u);
}

TEST_F(GeneratorTest, InvalidJsonIsRetriedOnceThenReported) {
  Build();
  // The template asks for JSON: a valid answer passes first time; then an invalid one is asked
  // again once, and reported when the second answer is invalid too.
  fake_->set_json_answer(R"({"hooks": ["Stop scrolling: this changes everything"]})");
  v1::GenerateRequest r;
  r.set_model("solo");
  r.set_template_("hooks");
  (*r.mutable_variables()->mutable_fields())["topic"].set_string_value("cold brew");
  r.mutable_sampling()->set_temperature(0.5);
  auto ok = Call(r);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->has_json());
  EXPECT_EQ(ok->attempts(), 1u);

  fake_->set_json_answer("this is not json at all");
  auto bad = Call(r);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInternal) << bad.status();
  EXPECT_NE(bad.status().message().find("schema"), std::string::npos);
  EXPECT_EQ(fake_->stats().total_requests, 3u) << "one call, then one retry of the bad answer";
  const std::string retry_body = fake_->stats().recent.back().body;
  EXPECT_NE(retry_body.find("not valid JSON"), std::string::npos);
}

TEST_F(GeneratorTest, EveryTemplateAnswersOfflineWithSchemaValidOutput) {
  Build();
  for (const v1::Template& t : generator_->catalogue().List()) {
    v1::GenerateRequest r;
    r.set_template_(t.name());
    for (const auto& var : t.variables()) {
      if (!var.required()) continue;
      auto& v = (*r.mutable_variables()->mutable_fields())[var.name()];
      if (var.type() == "integer" || var.type() == "number") {
        v.set_number_value(3);
      } else if (var.type() == "boolean") {
        v.set_bool_value(true);
      } else if (var.type() == "array") {
        v.mutable_list_value()->add_values()->set_string_value("x");
      } else if (var.name() == "platform") {
        v.set_string_value("x");
      } else {
        v.set_string_value("home espresso for beginners");
      }
    }
    auto resp = Call(r);
    ASSERT_TRUE(resp.ok()) << t.name() << ": " << resp.status();
    EXPECT_FALSE(resp->text().empty()) << t.name();
    EXPECT_EQ(resp->provider(), "offline");
    if (t.has_output_schema()) {
      EXPECT_TRUE(resp->has_json()) << t.name();
    }
  }
  EXPECT_EQ(fake_->stats().total_requests, 0u);
}

TEST_F(GeneratorTest, BadInputNamesTheField) {
  Build();
  struct Case {
    std::string field;
    std::function<void(v1::GenerateRequest&)> mutate;
  };
  std::vector<Case> cases = {
      {"model", [](auto& r) { r.set_model("gpt-nonexistent"); }},
      {"template", [](auto& r) { r.clear_messages(); }},
      {"template", [](auto& r) { r.set_template_("no_such_template"); }},
      {"messages[0].role",
       [](auto& r) { r.mutable_messages(0)->set_role(v1::Message::ROLE_UNSPECIFIED); }},
      {"messages[0].content", [](auto& r) { r.mutable_messages(0)->clear_content(); }},
      {"sampling.temperature", [](auto& r) { r.mutable_sampling()->set_temperature(2.5); }},
      {"sampling.top_p", [](auto& r) { r.mutable_sampling()->set_top_p(0); }},
      {"sampling.max_tokens", [](auto& r) { r.mutable_sampling()->set_max_tokens(0); }},
      {"sampling.stop",
       [](auto& r) {
         for (int i = 0; i < 5; ++i) r.mutable_sampling()->add_stop("END");
       }},
      {"timeout", [](auto& r) { r.mutable_timeout()->set_seconds(-1); }},
      {"timeout", [](auto& r) { r.mutable_timeout()->set_seconds(100000); }},
      {"variables",
       [](auto& r) { (*r.mutable_variables()->mutable_fields())["x"].set_string_value("y"); }},
      {"messages",
       [](auto& r) { r.mutable_messages(0)->set_content(std::string(300 << 10, 'a')); }},
  };
  for (const auto& c : cases) {
    v1::GenerateRequest r = Ask("solo", "fine", 0);
    c.mutate(r);
    auto result = Call(r);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument)
        << c.field << ": " << result.status();
    EXPECT_EQ(BadField(result.status()), c.field) << result.status();
  }
  v1::GenerateRequest missing;
  missing.set_template_("hooks");
  auto r = Call(missing);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BadField(r.status()).rfind("variables.", 0), 0u) << r.status();
  EXPECT_EQ(fake_->stats().total_requests, 0u);
}

TEST_F(GeneratorTest, BadConfigIsReportedAtStart) {
  auto catalogue = Catalogue::Load({});
  ASSERT_TRUE(catalogue.ok());
  (*config_.mutable_models())["broken"].add_deployments("nowhere");
  auto g = Generator::Create(config_, clock_, http_.get(), *std::move(catalogue), nullptr);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("nowhere"), std::string::npos);
}

TEST_F(GeneratorTest, WithoutACacheDeterministicRequestsStillWork) {
  auto catalogue = Catalogue::Load({});
  ASSERT_TRUE(catalogue.ok());
  auto g = Generator::Create(config_, clock_, http_.get(), *std::move(catalogue), nullptr);
  ASSERT_TRUE(g.ok()) << g.status();
  generator_ = *std::move(g);
  for (int i = 0; i < 2; ++i) {
    auto r = Call(Ask("solo", "no cache configured", 0));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE(r->cached());
  }
  EXPECT_EQ(fake_->stats().total_requests, 2u);
}

// Usage on every answer: the provider's counts when it gives them, else an estimate marked as
// one (some OpenAI-compatible servers send no usage).
TEST_F(GeneratorTest, AnAnswerWithoutUsageGetsAnEstimateMarkedAsOne) {
  Build();
  auto reported = Call(Ask("solo", "count my tokens", 0.5));
  ASSERT_TRUE(reported.ok()) << reported.status();
  EXPECT_GT(reported->usage().total_tokens(), 0u);
  EXPECT_FALSE(reported->usage().estimated());

  Behaviour no_usage;
  no_usage.status = 200;
  no_usage.body = R"({"id":"chatcmpl-x","object":"chat.completion","model":"gpt-fake",)"
                  R"("choices":[{"index":0,"message":{"role":"assistant",)"
                  R"("content":"Twenty characters!!"},"finish_reason":"stop"}]})";
  fake_->Enqueue(no_usage);
  auto estimated = Call(Ask("solo", "sixteen bytes..", 0.5));
  ASSERT_TRUE(estimated.ok()) << estimated.status();
  EXPECT_EQ(estimated->text(), "Twenty characters!!");
  EXPECT_TRUE(estimated->usage().estimated());
  EXPECT_EQ(estimated->usage().completion_tokens(), 5u);  // 19 bytes, about 4 a token
  EXPECT_EQ(estimated->usage().prompt_tokens(), EstimateTokens("sixteen bytes.."));
  EXPECT_EQ(estimated->usage().total_tokens(),
            estimated->usage().prompt_tokens() + estimated->usage().completion_tokens());
}

// A counter of the process's registry (0 before its first increment).
double CounterValue(const std::string& name, const std::map<std::string, std::string>& labels) {
  return telemetry::testing::SampleValue(telemetry::RenderPrometheusText(), name, labels)
      .value_or(0);
}

// montage_generation_upstream_retries_total counts the HTTP retries of a provider call whether
// it then succeeded or failed.
TEST_F(GeneratorTest, RetriesAreCountedWhetherTheCallSucceedsOrNot) {
  auto* retry = (*config_.mutable_providers())["fake-openai"].mutable_retry();
  retry->set_max_attempts(3);
  retry->mutable_initial_backoff()->set_nanos(1'000'000);
  retry->mutable_max_backoff()->set_nanos(1'000'000);
  Build();
  const std::map<std::string, std::string> labels{{"provider", "fake-openai"},
                                                  {"deployment", "primary"}};
  const std::string name = "montage_generation_upstream_retries_total";
  Behaviour failing;
  failing.status = 500;
  for (int i = 0; i < 3; ++i) fake_->Enqueue(failing);
  const double before = CounterValue(name, labels);
  auto failed = Call(Ask("solo", "fails three times", 0.5));
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  EXPECT_EQ(CounterValue(name, labels) - before, 2);

  fake_->Enqueue(failing);
  auto recovered = Call(Ask("solo", "fails once", 0.5));
  ASSERT_TRUE(recovered.ok()) << recovered.status();
  EXPECT_EQ(recovered->attempts(), 2u);
  EXPECT_EQ(CounterValue(name, labels) - before, 3);
  EXPECT_EQ(fake_->stats().total_requests, 5u);
}

// The generation metrics move with what happened (fallbacks, cache misses and hits, coalesced
// calls, time to first token), and each deployment attempt is a span under the caller's.
TEST_F(GeneratorTest, MetricsAndSpansFollowWhatHappened) {
  Build();
  const double fallbacks0 =
      CounterValue("montage_generation_fallbacks_total", {{"model", "chain"}});
  const double miss0 = CounterValue("montage_generation_cache_requests_total",
                                    {{"model", "solo"}, {"result", "miss"}});
  const double hit0 = CounterValue("montage_generation_cache_requests_total",
                                   {{"model", "solo"}, {"result", "hit"}});
  const double coalesced0 = CounterValue("montage_generation_coalesced_total", {{"model", "solo"}});
  const double ttft0 = CounterValue("montage_generation_time_to_first_token_seconds_count",
                                    {{"deployment", "primary"}});

  // A fallback, under a parent span: one upstream span per deployment tried.
  telemetry::Span parent = telemetry::GlobalTracer().StartSpan("test parent");
  ASSERT_TRUE(parent.context().sampled);
  Behaviour down;
  down.status = 500;
  fake_->Enqueue(down);
  CallOptions traced;
  traced.parent_span = parent.context();
  Result fell_back;
  Start(Ask("chain", "fall back, traced", 0.7), fell_back, false, traced);
  ASSERT_TRUE(fell_back.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(fell_back.response.ok()) << fell_back.response.status();
  EXPECT_EQ(CounterValue("montage_generation_fallbacks_total", {{"model", "chain"}}) - fallbacks0,
            1);
  std::vector<std::string> deployments;
  for (const telemetry::SpanData& span : telemetry::GlobalTracer().RecentSpans(256)) {
    if (span.trace_id != parent.context().trace_id || span.name != "generation.upstream") continue;
    const telemetry::AttributeValue* d = span.FindAttribute("generation.deployment");
    ASSERT_NE(d, nullptr);
    deployments.push_back(std::get<std::string>(*d));
    EXPECT_EQ(span.status_code, deployments.back() == "primary"
                                    ? telemetry::SpanStatusCode::kError
                                    : telemetry::SpanStatusCode::kUnset);
  }
  std::sort(deployments.begin(), deployments.end());
  EXPECT_EQ(deployments, (std::vector<std::string>{"primary", "secondary"}));

  // A miss, then a hit.
  ASSERT_TRUE(Call(Ask("solo", "metrics, cached", 0)).ok());
  ASSERT_TRUE(Call(Ask("solo", "metrics, cached", 0)).ok());
  EXPECT_EQ(CounterValue("montage_generation_cache_requests_total",
                         {{"model", "solo"}, {"result", "miss"}}) -
                miss0,
            1);
  EXPECT_EQ(CounterValue("montage_generation_cache_requests_total",
                         {{"model", "solo"}, {"result", "hit"}}) -
                hit0,
            1);

  // Two identical calls at once: the second joins the first.
  Behaviour slow;
  slow.delay = absl::Milliseconds(300);
  fake_->Enqueue(slow);
  Result a, b;
  Start(Ask("solo", "metrics, shared", 0), a);
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  Start(Ask("solo", "metrics, shared", 0), b);
  ASSERT_TRUE(a.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(b.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(CounterValue("montage_generation_coalesced_total", {{"model", "solo"}}) - coalesced0,
            1);

  // A streamed answer: one time-to-first-token observation.
  Result streamed;
  Start(Ask("solo", "metrics, streamed", 0.7), streamed, /*stream=*/true);
  ASSERT_TRUE(streamed.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(streamed.response.ok()) << streamed.response.status();
  EXPECT_EQ(CounterValue("montage_generation_time_to_first_token_seconds_count",
                         {{"deployment", "primary"}}) -
                ttft0,
            1);
}

TEST_F(GeneratorTest, ListModelsShowsAliasesInFallbackOrder) {
  Build();
  v1::ListModelsResponse models = generator_->ListModels();
  EXPECT_EQ(models.default_model(), "default");
  bool found = false;
  for (const auto& m : models.models()) {
    if (m.alias() != "chain") continue;
    found = true;
    ASSERT_EQ(m.deployments_size(), 3);
    EXPECT_EQ(m.deployments(0).name(), "primary");
    EXPECT_EQ(m.deployments(1).provider(), "gemini");
    EXPECT_EQ(m.deployments(2).model(), "claude-fake");
    EXPECT_EQ(m.description(), "primary, then gemini, then claude");
  }
  EXPECT_TRUE(found);
}

TEST_F(GeneratorTest, AStreamThatFailsBeforeItsFirstTokenFallsBack) {
  Build();
  Behaviour cut;
  cut.stream_fail_after = 0;
  fake_->Enqueue(cut);
  Result out;
  Start(Ask("chain", "stream with a broken first provider", 0.7), out, /*stream=*/true);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(out.response.ok()) << out.response.status();
  EXPECT_EQ(out.response->deployment(), "secondary");
  EXPECT_EQ(out.streamed, out.response->text());
}

TEST_F(GeneratorTest, AStreamThatFailsAfterItsFirstTokenIsAnError) {
  Build();
  Behaviour cut;
  cut.stream_fail_after = 2;
  fake_->Enqueue(cut);
  Result out;
  Start(Ask("chain", "stream that breaks in the middle of its answer", 0.7), out, true);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.response.status().code(), absl::StatusCode::kUnavailable) << out.response.status();
  EXPECT_EQ(fake_->stats().total_requests, 1u);
}

}  // namespace
}  // namespace montage::generation
