// The three wire formats against the fake provider on loopback: answers, streams, usage, and
// how each kind of failure is classified.
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/status.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/generation/provider.h"
#include "tests/fake_llm/fake_llm_server.h"

namespace montage::generation {
namespace {

using config::v1::ProviderConfig;
using testing::Behaviour;
using testing::FakeLlmServer;

constexpr absl::Duration kWait = absl::Seconds(20);

struct Outcome {
  absl::Notification done;
  absl::StatusOr<ProviderResult> result = absl::UnknownError("not run");
  std::vector<std::string> deltas;
  absl::Mutex mu;
};

std::string ErrorReason(const absl::Status& s) {
  google::rpc::Status rpc = ToRpcStatus(s);
  for (const auto& any : rpc.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) return info.reason();
  }
  return "";
}

class ProvidersTest : public ::testing::TestWithParam<ProviderConfig::Kind> {
 protected:
  void SetUp() override {
    auto fake = FakeLlmServer::Start();
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    auto http = http::HttpClient::Create();
    ASSERT_TRUE(http.ok()) << http.status();
    http_ = *std::move(http);
  }

  ProviderConfig Config(uint32_t attempts = 1) const {
    ProviderConfig c;
    c.set_kind(GetParam());
    c.set_base_url(fake_->base_url() + (GetParam() == ProviderConfig::GEMINI ? "/v1beta" : "/v1"));
    c.mutable_retry()->set_max_attempts(attempts);
    // Anthropic's API (and the fake) require a key header.
    setenv("MONTAGE_TEST_PROVIDER_KEY", "sk-test", 1);
    c.mutable_api_key()->set_env("MONTAGE_TEST_PROVIDER_KEY");
    c.mutable_retry()->mutable_initial_backoff()->set_nanos(1'000'000);
    c.mutable_retry()->mutable_max_backoff()->set_nanos(5'000'000);
    return c;
  }

  std::unique_ptr<Provider> Make(const ProviderConfig& c) {
    auto p = MakeProvider("fake", c, http_.get(), nullptr);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *std::move(p) : nullptr;
  }

  static ProviderRequest Request(const std::string& text) {
    ProviderRequest r;
    r.model = "fake-model";
    r.messages.push_back({PromptMessage::Role::kSystem, "You are terse."});
    r.messages.push_back({PromptMessage::Role::kUser, text});
    r.deadline = absl::Now() + absl::Seconds(30);
    return r;
  }

  std::shared_ptr<ProviderCall> Run(Provider& p, ProviderRequest r, Outcome& out, bool stream) {
    DeltaCallback on_delta;
    if (stream) {
      on_delta = [&out](absl::string_view d) {
        absl::MutexLock lock(&out.mu);
        out.deltas.emplace_back(d);
      };
    }
    return p.Generate(std::move(r), std::move(on_delta),
                      [&out](absl::StatusOr<ProviderResult> result) {
                        out.result = std::move(result);
                        out.done.Notify();
                      });
  }

  std::unique_ptr<FakeLlmServer> fake_;
  std::unique_ptr<http::HttpClient> http_;
};

TEST_P(ProvidersTest, AnswersWithTextAndUsage) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  Outcome out;
  Run(*p, Request("write a hook about sourdough"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(out.result.ok()) << out.result.status();
  EXPECT_NE(out.result->text.find("sourdough"), std::string::npos) << out.result->text;
  EXPECT_GT(out.result->usage.prompt_tokens(), 0u);
  EXPECT_GT(out.result->usage.completion_tokens(), 0u);
  EXPECT_EQ(out.result->usage.total_tokens(),
            out.result->usage.prompt_tokens() + out.result->usage.completion_tokens());
  EXPECT_EQ(out.result->finish_reason, v1::STOP);
  ASSERT_EQ(fake_->stats().total_requests, 1u);
  const auto recorded = fake_->stats().recent.back();
  EXPECT_NE(recorded.body.find("You are terse."), std::string::npos);
  // Gemini names the model in the path, the others in the body.
  EXPECT_NE((recorded.path + recorded.body).find("fake-model"), std::string::npos);
}

TEST_P(ProvidersTest, StreamsDeltasThatAddUpToTheAnswer) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  Outcome plain;
  Run(*p, Request("three tips for better thumbnails"), plain, false);
  ASSERT_TRUE(plain.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(plain.result.ok()) << plain.result.status();

  Outcome streamed;
  Run(*p, Request("three tips for better thumbnails"), streamed, true);
  ASSERT_TRUE(streamed.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(streamed.result.ok()) << streamed.result.status();
  std::string joined;
  for (const auto& d : streamed.deltas) joined += d;
  EXPECT_GT(streamed.deltas.size(), 1u);
  EXPECT_EQ(joined, plain.result->text);
  EXPECT_EQ(streamed.result->text, plain.result->text);
  EXPECT_EQ(streamed.result->usage.completion_tokens(), plain.result->usage.completion_tokens());
  EXPECT_TRUE(fake_->stats().recent.back().stream);
}

TEST_P(ProvidersTest, RetriesRateLimitsAndServerErrors) {
  auto p = Make(Config(/*attempts=*/3));
  ASSERT_NE(p, nullptr);
  Behaviour limited;
  limited.status = 429;
  limited.headers = {{"retry-after", "0"}};
  Behaviour broken;
  broken.status = GetParam() == ProviderConfig::ANTHROPIC ? 529 : 500;
  fake_->Enqueue(limited);
  fake_->Enqueue(broken);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(out.result.ok()) << out.result.status();
  EXPECT_EQ(out.result->attempts, 3u);
  EXPECT_EQ(fake_->stats().total_requests, 3u);
}

TEST_P(ProvidersTest, AServerDelayLongerThanAllowedIsNotWaitedFor) {
  // Gemini gives the delay only in the error body ("Please retry in 5s."); the others send a
  // Retry-After header. Either way a delay above max_server_delay ends the call at once.
  ProviderConfig c = Config(/*attempts=*/3);
  c.mutable_retry()->mutable_max_server_delay()->set_seconds(1);
  auto p = Make(c);
  ASSERT_NE(p, nullptr);
  Behaviour limited;
  limited.status = 429;
  limited.headers = {{"retry-after", "5"}};
  fake_->Enqueue(limited);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kResourceExhausted)
      << out.result.status();
  EXPECT_EQ(fake_->stats().total_requests, 1u);
}

TEST_P(ProvidersTest, ServerErrorsAfterTheLastAttemptAreUnavailable) {
  auto p = Make(Config(/*attempts=*/2));
  ASSERT_NE(p, nullptr);
  Behaviour broken;
  broken.status = 503;
  fake_->Enqueue(broken);
  fake_->Enqueue(broken);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ErrorReason(out.result.status()), "PROVIDER_UNAVAILABLE");
  EXPECT_EQ(fake_->stats().total_requests, 2u);
}

// insufficient_quota is OpenAI's; the other two have no such answer.
class OpenAiProviderTest : public ProvidersTest {};

TEST_P(OpenAiProviderTest, QuotaExhaustedIsNotRetriedAndIsTheOperatorsProblem) {
  auto p = Make(Config(/*attempts=*/3));
  ASSERT_NE(p, nullptr);
  Behaviour quota;
  quota.status = 429;
  quota.kind = "insufficient_quota";
  fake_->Enqueue(quota);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorReason(out.result.status()), "PROVIDER_QUOTA_EXHAUSTED");
  EXPECT_EQ(fake_->stats().total_requests, 1u);
}

TEST_P(ProvidersTest, RejectedKeyIsFailedPreconditionAndNeverEchoed) {
  const std::string key = "sk-test-secret-value-1234";
  fake_->set_expected_key(key);
  ProviderConfig c = Config(/*attempts=*/3);
  setenv("MONTAGE_TEST_PROVIDER_KEY", "sk-wrong-key-5678", 1);
  auto p = Make(c);
  ASSERT_NE(p, nullptr);
  // Real providers quote part of the key back ("Incorrect API key provided: sk-wro***5678").
  Behaviour quoting;
  quoting.status = 401;
  quoting.body = R"({"error":{"message":"Incorrect API key provided: sk-wro***5678.",)"
                 R"("type":"invalid_request_error","code":"invalid_api_key"}})";
  fake_->Enqueue(quoting);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kFailedPrecondition)
      << out.result.status();
  EXPECT_EQ(ErrorReason(out.result.status()), "PROVIDER_AUTH_FAILED");
  EXPECT_EQ(out.result.status().message().find("sk-"), std::string::npos) << out.result.status();
  EXPECT_EQ(fake_->stats().total_requests, 1u) << "a rejected key is not retried";
}

TEST_P(ProvidersTest, SendsTheKeyInTheProvidersHeader) {
  fake_->set_expected_key("sk-right");
  ProviderConfig c = Config();
  setenv("MONTAGE_TEST_PROVIDER_KEY", "sk-right", 1);
  auto p = Make(c);
  ASSERT_NE(p, nullptr);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_TRUE(out.result.ok()) << out.result.status();
}

TEST_P(ProvidersTest, UnreadableAnswerIsUnavailable) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  Behaviour garbage;
  garbage.invalid_json = true;
  fake_->Enqueue(garbage);
  Outcome out;
  Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ErrorReason(out.result.status()), "PROVIDER_BAD_ANSWER");
}

TEST_P(ProvidersTest, StreamCutShortIsAnError) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  Behaviour cut;
  cut.stream_fail_after = 2;
  fake_->Enqueue(cut);
  Outcome out;
  Run(*p, Request("a long answer please"), out, true);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kUnavailable) << out.result.status();
}

TEST_P(ProvidersTest, CancelAbortsTheUpstreamTransfer) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  Outcome out;
  auto call = Run(*p, Request("hello"), out, false);
  ASSERT_TRUE(fake_->WaitForInFlight(1, kWait));
  call->Cancel();
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait)) << "the fake never saw the connection close";
}

TEST_P(ProvidersTest, DeadlineEndsAHangingCall) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  Outcome out;
  ProviderRequest r = Request("hello");
  r.deadline = absl::Now() + absl::Milliseconds(100);
  Run(*p, std::move(r), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(out.result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(fake_->WaitForDisconnects(1, kWait));
}

TEST_P(ProvidersTest, AsksForJsonWhenASchemaIsGiven) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  fake_->set_json_answer(R"({"titles":["a","b"]})");
  ProviderRequest r = Request("titles please");
  r.output_schema_json = R"({"type":"object","required":["titles"]})";
  Outcome out;
  Run(*p, std::move(r), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(out.result.ok()) << out.result.status();
  if (GetParam() != ProviderConfig::ANTHROPIC) {
    // Anthropic has no JSON mode; the template's prompt asks for JSON instead.
    EXPECT_EQ(out.result->text, R"({"titles":["a","b"]})");
  }
}

// With json_schema on, the schema itself goes to providers that take one: OpenAI as
// response_format json_schema (whole), Gemini as generationConfig.responseSchema (its OpenAPI
// subset: upper-case types, "null" as nullable, unknown keywords left out). Anthropic has neither.
TEST_P(ProvidersTest, SendsTheSchemaItselfWhereTheProviderTakesOne) {
  auto p = Make(Config());
  ASSERT_NE(p, nullptr);
  fake_->set_json_answer(R"({"titles":["a","b"]})");
  ProviderRequest r = Request("titles please");
  r.output_schema_json = R"({"type":"object","required":["titles"],"additionalProperties":false,
      "properties":{"titles":{"type":"array","maxItems":5,"items":{"type":"string","minLength":1}},
                    "note":{"type":["string","null"],"description":"optional"}}})";
  r.use_json_schema = true;
  Outcome out;
  Run(*p, std::move(r), out, false);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(out.result.ok()) << out.result.status();
  const nlohmann::json body = nlohmann::json::parse(fake_->stats().recent.back().body);
  switch (GetParam()) {
    case ProviderConfig::OPENAI:
      EXPECT_EQ(body["response_format"]["type"], "json_schema");
      EXPECT_EQ(body["response_format"]["json_schema"]["schema"]["additionalProperties"], false);
      EXPECT_EQ(body["response_format"]["json_schema"]["schema"]["properties"]["titles"]["items"]
                    ["minLength"],
                1);
      break;
    case ProviderConfig::GEMINI: {
      const nlohmann::json& config = body["generationConfig"];
      EXPECT_EQ(config["responseMimeType"], "application/json");
      const nlohmann::json expected = nlohmann::json::parse(R"({"type":"OBJECT",
          "required":["titles"],
          "properties":{"titles":{"type":"ARRAY","maxItems":5,"items":{"type":"STRING"}},
                        "note":{"type":"STRING","nullable":true,"description":"optional"}}})");
      EXPECT_EQ(config["responseSchema"], expected) << config.dump();
      break;
    }
    default:
      EXPECT_FALSE(body.contains("response_format"));
      EXPECT_FALSE(body.contains("responseSchema"));
  }
}

INSTANTIATE_TEST_SUITE_P(Wire, ProvidersTest,
                         ::testing::Values(ProviderConfig::OPENAI, ProviderConfig::GEMINI,
                                           ProviderConfig::ANTHROPIC),
                         [](const auto& info) { return ProviderConfig::Kind_Name(info.param); });

INSTANTIATE_TEST_SUITE_P(Wire, OpenAiProviderTest, ::testing::Values(ProviderConfig::OPENAI),
                         [](const auto& info) { return ProviderConfig::Kind_Name(info.param); });

// http2_prior_knowledge: every call arrives over HTTP/2 (h2c), concurrent calls included. (With
// Debian's libcurl 7.88 each call gets its own connection: see common/http.)
TEST(H2cProviderTest, ConcurrentCallsOverH2cAllSucceed) {
  testing::FakeLlmOptions options;
  options.h2c_port = 0;
  options.default_delay = absl::Milliseconds(50);
  auto fake = FakeLlmServer::Start(options);
  ASSERT_TRUE(fake.ok()) << fake.status();
  auto http = http::HttpClient::Create();
  ASSERT_TRUE(http.ok());
  ProviderConfig c;
  c.set_kind(ProviderConfig::OPENAI);
  c.set_base_url((*fake)->h2c_base_url() + "/v1");
  c.set_http2_prior_knowledge(true);
  auto p = MakeProvider("h2c", c, http->get(), nullptr);
  ASSERT_TRUE(p.ok()) << p.status();
  constexpr int kCalls = 20;
  std::vector<std::unique_ptr<Outcome>> outs;
  for (int i = 0; i < kCalls; ++i) {
    outs.push_back(std::make_unique<Outcome>());
    ProviderRequest r;
    r.model = "m";
    r.messages.push_back({PromptMessage::Role::kUser, "call " + std::to_string(i)});
    Outcome* out = outs.back().get();
    (*p)->Generate(std::move(r), nullptr, [out](absl::StatusOr<ProviderResult> result) {
      out->result = std::move(result);
      out->done.Notify();
    });
  }
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(outs[i]->done.WaitForNotificationWithTimeout(kWait));
    ASSERT_TRUE(outs[i]->result.ok()) << outs[i]->result.status();
    EXPECT_NE(outs[i]->result->text.find("call " + std::to_string(i)), std::string::npos);
  }
  const auto stats = (*fake)->stats();
  EXPECT_EQ(stats.openai_requests, static_cast<uint64_t>(kCalls));
  EXPECT_GE(stats.h2c_connections, 1u) << "the calls did not arrive over h2c";
}

TEST(ProviderConfigTest, BadConfigNamesTheField) {
  ProviderConfig c;
  c.set_kind(ProviderConfig::OPENAI);
  c.set_base_url("ftp://example");
  auto http = http::HttpClient::Create();
  ASSERT_TRUE(http.ok());
  auto p = MakeProvider("x", c, http->get(), nullptr);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("generation.providers.x.base_url"), std::string::npos);

  c.set_base_url("http://127.0.0.1:1/v1");
  c.mutable_api_key()->set_env("MONTAGE_TEST_SURELY_UNSET_VARIABLE");
  p = MakeProvider("x", c, http->get(), nullptr);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(p.status().message().find("MONTAGE_TEST_SURELY_UNSET_VARIABLE"), std::string::npos);
}

}  // namespace
}  // namespace montage::generation
