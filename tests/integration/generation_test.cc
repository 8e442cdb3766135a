// The generation service in a real montaged process, talking to the fake provider on loopback
// through a config file: campaigns fan out (the fake sees every post in flight at once), a gRPC
// deadline reaches the provider's connection, streams arrive as deltas, bad input names its
// field, and the metrics page counts it all.
#include <unistd.h>

#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "montage/generation/v1/generation.grpc.pb.h"
#include "tests/fake_llm/fake_llm_server.h"
#include "tests/integration/montaged_process.h"

namespace montage::testing {
namespace {

namespace genpb = ::montage::generation::v1;
using ::testing::HasSubstr;

// A campaign brief that satisfies the campaign_brief template's schema.
constexpr char kBriefJson[] = R"({
  "summary": "Launch week for a budget espresso grinder",
  "audience": "home baristas on a budget",
  "tone": "warm and practical",
  "key_messages": ["Grind fresh for better shots", "Under 100 dollars"],
  "per_platform": {"x": "A one-line hot take on fresh grinding"}
})";

class GenerationProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fake = FakeLlmServer::Start();
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    config_path_ =
        absl::StrCat(::testing::TempDir(), "/generation-", getpid(), "-",
                     ::testing::UnitTest::GetInstance()->current_test_info()->name(), ".yaml");
    std::ofstream(config_path_) << "generation:\n"
                                   "  providers:\n"
                                   "    fake:\n"
                                   "      kind: OPENAI\n"
                                   "      base_url: "
                                << fake_->base_url() << "/v1\n"
                                << "      retry:\n"
                                   "        max_attempts: 1\n"
                                   "  deployments:\n"
                                   "    fake-gpt:\n"
                                   "      provider: fake\n"
                                   "      model: gpt-fake\n"
                                   "  models:\n"
                                   "    fake:\n"
                                   "      deployments: [fake-gpt]\n";
    auto process = MontagedProcess::Start({"generation", "--config", config_path_});
    ASSERT_TRUE(process.ok()) << process.status();
    process_ = *std::move(process);
    stub_ = genpb::GenerationService::NewStub(process_->channel());
  }
  void TearDown() override {
    if (process_ != nullptr) {
      EXPECT_EQ(process_->Stop().exit_code, 0) << process_->log();
    }
    unlink(config_path_.c_str());
  }

  std::unique_ptr<FakeLlmServer> fake_;
  std::string config_path_;
  std::unique_ptr<MontagedProcess> process_;
  std::unique_ptr<genpb::GenerationService::Stub> stub_;
};

TEST_F(GenerationProcessTest, CampaignPostsAreAllInFlightAtOnce) {
  fake_->set_json_answer(kBriefJson);
  Behaviour brief;  // the brief answers at once
  fake_->Enqueue(brief);
  for (int i = 0; i < 5; ++i) {
    Behaviour post;
    post.delay = absl::Seconds(2);
    fake_->Enqueue(post);
  }
  genpb::GenerateCampaignRequest req;
  req.set_model("fake");
  req.set_brief("Launch week for a budget espresso grinder");
  req.add_platforms("x");
  req.set_posts_per_platform(5);
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(60));
  auto reader = stub_->GenerateCampaign(&ctx, req);

  // The fake holds each post for 2 s; all five must be waiting there together.
  EXPECT_TRUE(fake_->WaitForInFlight(5, absl::Seconds(30)))
      << "peak in flight: " << fake_->stats().peak_in_flight;

  genpb::CampaignEvent event;
  ASSERT_TRUE(reader->Read(&event));
  ASSERT_TRUE(event.has_brief()) << event.DebugString();
  EXPECT_TRUE(event.brief().has_json());
  std::vector<uint32_t> indexes;
  bool total = false;
  while (reader->Read(&event)) {
    if (event.has_post()) {
      EXPECT_EQ(event.post().platform(), "x");
      EXPECT_FALSE(event.post().result().text().empty());
      indexes.push_back(event.post().index());
    } else if (event.has_total_usage()) {
      total = true;
      EXPECT_GT(event.total_usage().total_tokens(), 0u);
    } else {
      ADD_FAILURE() << "unexpected event " << event.DebugString();
    }
  }
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(total);
  EXPECT_THAT(indexes, ::testing::UnorderedElementsAre(0u, 1u, 2u, 3u, 4u));
  EXPECT_EQ(fake_->stats().peak_in_flight, 5u);
  // The plan from the brief reached every post's prompt.
  int posts = 0;
  for (const auto& r : fake_->stats().recent) {
    if (r.body.find("social media writer") != std::string::npos) {  // platform_post's prompt
      ++posts;
      EXPECT_THAT(r.body, HasSubstr("fresh grinding"));
    }
  }
  EXPECT_EQ(posts, 5);
}

TEST_F(GenerationProcessTest, TheCallersDeadlineClosesTheProviderConnection) {
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  genpb::GenerateRequest req;
  req.set_model("fake");
  auto* m = req.add_messages();
  m->set_role(genpb::Message::USER);
  m->set_content("this answer never comes");
  genpb::GenerateResponse resp;
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Milliseconds(300));
  grpc::Status s = stub_->Generate(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(fake_->WaitForDisconnects(1, absl::Seconds(20)))
      << "the provider transfer outlived the caller";
}

TEST_F(GenerationProcessTest, ClientCancellationClosesTheProviderConnection) {
  Behaviour hang;
  hang.hang = true;
  fake_->Enqueue(hang);
  genpb::GenerateRequest req;
  req.set_model("fake");
  auto* m = req.add_messages();
  m->set_role(genpb::Message::USER);
  m->set_content("stream that the caller abandons");
  grpc::ClientContext ctx;
  WithDeadline(ctx, absl::Seconds(30));
  auto reader = stub_->StreamGenerate(&ctx, req);
  ASSERT_TRUE(fake_->WaitForInFlight(1, absl::Seconds(20)));
  ctx.TryCancel();
  genpb::GenerateEvent event;
  while (reader->Read(&event)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(fake_->WaitForDisconnects(1, absl::Seconds(20)));
}

TEST_F(GenerationProcessTest, StreamGenerateSendsDeltasThenDone) {
  genpb::GenerateRequest req;
  req.set_model("fake");
  auto* m = req.add_messages();
  m->set_role(genpb::Message::USER);
  m->set_content("tell me about sourdough starters in a few words");
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  auto reader = stub_->StreamGenerate(&ctx, req);
  genpb::GenerateEvent event;
  std::string text;
  int deltas = 0;
  genpb::GenerateResponse done;
  while (reader->Read(&event)) {
    if (event.has_delta()) {
      ++deltas;
      text += event.delta().text();
    } else {
      done = event.done();
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_GE(deltas, 1);
  EXPECT_EQ(text, done.text());
  EXPECT_THAT(done.text(), HasSubstr("sourdough"));
  EXPECT_EQ(done.deployment(), "fake-gpt");
  EXPECT_GT(done.usage().completion_tokens(), 0u);
}

// A deterministic request asked again is answered from the cache: the handler has the answer
// before it returns and finishes the call on gRPC's default reactor. The answer must arrive
// whole (text, usage, model), flagged as cached, after one provider call.
TEST_F(GenerationProcessTest, ARepeatedDeterministicRequestIsAnsweredFromTheCache) {
  genpb::GenerateRequest req;
  req.set_model("fake");
  auto* m = req.add_messages();
  m->set_role(genpb::Message::USER);
  m->set_content("the same question twice");
  req.mutable_sampling()->set_temperature(0.0);
  std::vector<genpb::GenerateResponse> answers(3);
  for (auto& answer : answers) {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    grpc::Status s = stub_->Generate(&ctx, req, &answer);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_FALSE(answers[0].cached());
  EXPECT_FALSE(answers[0].text().empty());
  for (size_t i = 1; i < answers.size(); ++i) {
    EXPECT_TRUE(answers[i].cached()) << i;
    EXPECT_EQ(answers[i].text(), answers[0].text()) << i;
    EXPECT_EQ(answers[i].model(), "fake") << i;
    EXPECT_EQ(answers[i].deployment(), "fake-gpt") << i;
    EXPECT_EQ(answers[i].usage().completion_tokens(), answers[0].usage().completion_tokens()) << i;
  }
  EXPECT_EQ(fake_->stats().total_requests, 1u);
}

TEST_F(GenerationProcessTest, BadInputIsInvalidArgumentNamingTheField) {
  genpb::GenerateRequest req;
  req.set_model("no-such-model");
  req.set_template_("hooks");
  genpb::GenerateResponse resp;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  grpc::Status s = stub_->Generate(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "model");
  EXPECT_THAT(s.error_message(), HasSubstr("fake"));  // the known aliases are listed

  genpb::GenerateCampaignRequest campaign;
  campaign.set_brief("x");
  campaign.add_platforms("x");
  campaign.set_posts_per_platform(1000);
  grpc::ClientContext cctx;
  WithDeadline(cctx);
  auto reader = stub_->GenerateCampaign(&cctx, campaign);
  genpb::CampaignEvent event;
  EXPECT_FALSE(reader->Read(&event));
  s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "posts_per_platform");

  // A variable neither campaign template declares, or one the campaign fills in, is refused.
  for (const char* name : {"mood", "plan"}) {
    genpb::GenerateCampaignRequest bad = campaign;
    bad.set_posts_per_platform(1);
    (*bad.mutable_variables()->mutable_fields())["tone"].set_string_value("warm");
    (*bad.mutable_variables()->mutable_fields())[name].set_string_value("x");
    grpc::ClientContext vctx;
    WithDeadline(vctx);
    auto vreader = stub_->GenerateCampaign(&vctx, bad);
    EXPECT_FALSE(vreader->Read(&event));
    s = vreader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << name;
    EXPECT_EQ(FieldViolation(s), absl::StrCat("variables.", name));
  }
  EXPECT_EQ(fake_->stats().total_requests, 0u);
}

TEST_F(GenerationProcessTest, ModelsTemplatesAndMetrics) {
  genpb::ListModelsResponse models;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub_->ListModels(&ctx, genpb::ListModelsRequest(), &models).ok());
  }
  EXPECT_EQ(models.default_model(), "default");
  EXPECT_EQ(models.models_size(), 2);  // the built-in "default" and the file's "fake"

  genpb::ListTemplatesResponse templates;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub_->ListTemplates(&ctx, genpb::ListTemplatesRequest(), &templates).ok());
  }
  EXPECT_GE(templates.templates_size(), 11);
  genpb::Template podcast;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    genpb::GetTemplateRequest req;
    req.set_name("podcast_script");
    ASSERT_TRUE(stub_->GetTemplate(&ctx, req, &podcast).ok());
  }
  EXPECT_TRUE(podcast.has_output_schema());
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    genpb::GetTemplateRequest req;
    req.set_name("nope");
    genpb::Template t;
    EXPECT_EQ(stub_->GetTemplate(&ctx, req, &t).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  genpb::GenerateRequest req;
  req.set_model("fake");
  auto* m = req.add_messages();
  m->set_role(genpb::Message::USER);
  m->set_content("count me");
  genpb::GenerateResponse resp;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  ASSERT_TRUE(stub_->Generate(&ctx, req, &resp).ok());
  const std::string metrics = HttpGet(process_->admin_address(), "/metrics").second;
  EXPECT_EQ(
      MetricValue(metrics, "montage_generation_upstream_requests_total", "deployment=\"fake-gpt\""),
      1);
  EXPECT_GT(MetricValue(metrics, "montage_generation_tokens_total", "direction=\"out\""), 0);
  EXPECT_EQ(MetricValue(metrics, "montage_http_client_requests_total", "peer=\"fake\""), 1);
}

TEST_F(GenerationProcessTest, TheCliGeneratesTypedVariablesAndReportsBadOnes) {
  const std::string cli = MontageCliPath();
  const std::string addr = "--addr=" + process_->grpc_address();
  // count is an integer variable: the CLI sends it as a number because the template says so.
  CommandResult ok = RunCommand({cli, addr, "generate", "--template=hooks",
                                 "--var=topic=night photography", "--var=count=2", "--json"});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_THAT(ok.out, HasSubstr("night photography"));
  EXPECT_THAT(ok.out, HasSubstr("\"provider\": \"offline\""));

  CommandResult streamed = RunCommand({cli, addr, "generate", "--model=fake", "hello", "there"});
  ASSERT_EQ(streamed.exit_code, 0) << streamed.err;
  EXPECT_THAT(streamed.out, HasSubstr("fake answer to: hello there"));
  EXPECT_THAT(streamed.out, HasSubstr("via openai/fake-gpt"));

  CommandResult bad = RunCommand({cli, addr, "generate", "--template=hooks", "--var=count=2"});
  EXPECT_EQ(bad.exit_code, 3);
  EXPECT_THAT(bad.err, HasSubstr("field variables.topic"));

  CommandResult models = RunCommand({cli, addr, "models"});
  ASSERT_EQ(models.exit_code, 0) << models.err;
  EXPECT_THAT(models.out, HasSubstr("fake-gpt"));
}

}  // namespace
}  // namespace montage::testing
