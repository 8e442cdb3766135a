// Integration tests: real montaged processes on free loopback ports, called with generated gRPC
// stubs, the admin HTTP port and the montage CLI.
#include <signal.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "montage/analytics/v1/analytics.grpc.pb.h"
#include "montage/cache/v1/cache.grpc.pb.h"
#include "montage/generation/v1/generation.grpc.pb.h"
#include "montage/render/v1/render.grpc.pb.h"
#include "tests/integration/montaged_process.h"
#include "tests/testing/unused_port.h"

namespace montage::testing {
namespace {

namespace cachepb = ::montage::cache::v1;
using ::testing::HasSubstr;

constexpr const char* kAllServices[] = {
    "montage.cache.v1.CacheService",   "montage.generation.v1.GenerationService",
    "montage.speech.v1.SpeechService", "montage.analytics.v1.AnalyticsService",
    "montage.render.v1.RenderService", "montage.gateway.v1.BatchService",
};

grpc::health::v1::HealthCheckResponse::ServingStatus Health(const MontagedProcess& p,
                                                            const std::string& service,
                                                            grpc::StatusCode* code) {
  auto stub = grpc::health::v1::Health::NewStub(p.channel());
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  grpc::Status s = stub->Check(&ctx, req, &resp);
  *code = s.error_code();
  return resp.status();
}

grpc::Status Set(cachepb::CacheService::Stub& stub, const std::string& ns, const std::string& key,
                 const std::string& value, std::string lease = "") {
  cachepb::SetRequest req;
  req.set_namespace_(ns);
  req.set_key(key);
  req.set_value(value);
  req.set_lease_token(lease);
  cachepb::Entry resp;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  return stub.Set(&ctx, req, &resp);
}

cachepb::GetResponse Get(cachepb::CacheService::Stub& stub, const std::string& ns,
                         const std::string& key, grpc::Status* status = nullptr) {
  cachepb::GetRequest req;
  req.set_namespace_(ns);
  req.set_key(key);
  cachepb::GetResponse resp;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  grpc::Status s = stub.Get(&ctx, req, &resp);
  if (status != nullptr) *status = s;
  return resp;
}

TEST(MontagedCacheTest, RoundTripsAndAnswersBadInputWithFieldViolations) {
  auto process = MontagedProcess::Start({"cache"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = cachepb::CacheService::NewStub((*process)->channel());

  ASSERT_TRUE(Set(*stub, "", "script:42", "a video script").ok());
  grpc::Status s;
  cachepb::GetResponse got = Get(*stub, "", "script:42", &s);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(got.found());
  EXPECT_EQ(got.entry().value(), "a video script");
  EXPECT_EQ(got.entry().namespace_(), "default");
  EXPECT_TRUE(got.entry().has_expire_time());  // the default TTL applies

  // Bulk and prefix invalidation.
  cachepb::BatchSetRequest batch;
  batch.set_namespace_("llm");
  for (int i = 0; i < 10; ++i) {
    auto* item = batch.add_items();
    item->set_key("title:" + std::to_string(i));
    item->set_value("t" + std::to_string(i));
  }
  cachepb::BatchSetResponse written;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub->BatchSet(&ctx, batch, &written).ok());
  }
  EXPECT_EQ(written.written(), 10u);
  cachepb::InvalidateRequest inv;
  inv.set_namespace_("llm");
  inv.set_prefix("title:1");
  cachepb::InvalidateResponse removed;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub->Invalidate(&ctx, inv, &removed).ok());
  }
  EXPECT_EQ(removed.removed(), 1u);
  cachepb::BatchGetRequest bget;
  bget.set_namespace_("llm");
  bget.add_keys("title:0");
  bget.add_keys("title:1");
  bget.add_keys("title:9");
  cachepb::BatchGetResponse bgot;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub->BatchGet(&ctx, bget, &bgot).ok());
  }
  ASSERT_EQ(bgot.results_size(), 3);
  EXPECT_TRUE(bgot.results(0).found());
  EXPECT_FALSE(bgot.results(1).found());
  EXPECT_EQ(bgot.results(2).entry().value(), "t9");

  // Stats see both namespaces.
  cachepb::CacheStats stats;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub->GetStats(&ctx, cachepb::GetStatsRequest(), &stats).ok());
  }
  EXPECT_EQ(stats.total().entries(), 10u);
  EXPECT_GE(stats.total().hits(), 3u);
  EXPECT_EQ(stats.namespaces_size(), 2);

  // Bad input: the right code and the field named.
  s = Set(*stub, "", "", "x");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "key");
  s = Set(*stub, "", std::string(5000, 'k'), "x");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "key");
  s = Set(*stub, "bad namespace!", "k", "x");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "namespace");
  s = Set(*stub, "", "big", std::string((4 << 20) + 1, 'v'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FieldViolation(s), "value");

  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

TEST(MontagedAllTest, EveryServiceServesHealthAndStubsSayWhatIsMissing) {
  auto process = MontagedProcess::Start({"all"});
  ASSERT_TRUE(process.ok()) << process.status();
  for (const char* name : kAllServices) {
    grpc::StatusCode code;
    EXPECT_EQ(Health(**process, name, &code), grpc::health::v1::HealthCheckResponse::SERVING)
        << name;
    EXPECT_EQ(code, grpc::StatusCode::OK) << name;
  }
  grpc::StatusCode code;
  EXPECT_EQ(Health(**process, "", &code), grpc::health::v1::HealthCheckResponse::SERVING);

  // A method whose service is not built yet says so.
  auto analytics = montage::analytics::v1::AnalyticsService::NewStub((*process)->channel());
  montage::analytics::v1::Channel channel;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  grpc::Status s =
      analytics->GetChannel(&ctx, montage::analytics::v1::GetChannelRequest(), &channel);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(s.error_message(), HasSubstr("AnalyticsService/GetChannel is not built yet"));
  EXPECT_THAT(s.error_message(), HasSubstr("roadmap"));

  // The generation service answers inside `all` on its offline default.
  auto gen = montage::generation::v1::GenerationService::NewStub((*process)->channel());
  montage::generation::v1::GenerateRequest greq;
  greq.set_template_("hooks");
  (*greq.mutable_variables()->mutable_fields())["topic"].set_string_value("houseplants");
  montage::generation::v1::GenerateResponse gresp;
  grpc::ClientContext gctx;
  WithDeadline(gctx);
  s = gen->Generate(&gctx, greq, &gresp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(gresp.provider(), "offline");
  EXPECT_THAT(gresp.text(), HasSubstr("houseplants"));

  // Streaming stubs too.
  auto render = montage::render::v1::RenderService::NewStub((*process)->channel());
  grpc::ClientContext wctx;
  WithDeadline(wctx);
  auto reader = render->WatchJob(&wctx, montage::render::v1::WatchJobRequest());
  montage::render::v1::Job job;
  EXPECT_FALSE(reader->Read(&job));
  s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(s.error_message(), HasSubstr("not built yet"));

  // The cache works inside `all` as well.
  auto cache = cachepb::CacheService::NewStub((*process)->channel());
  ASSERT_TRUE(Set(*cache, "", "k", "v").ok());
  EXPECT_EQ(Get(*cache, "", "k").entry().value(), "v");

  EXPECT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
}

TEST(MontagedAllTest, ServerReflectionListsEveryService) {
  auto process = MontagedProcess::Start({"all"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub((*process)->channel());
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  auto stream = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  grpc::reflection::v1alpha::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::vector<std::string> names;
  for (const auto& s : resp.list_services_response().service()) names.push_back(s.name());
  for (const char* name : kAllServices) EXPECT_THAT(names, ::testing::Contains(name));

  // The descriptors come with the file, so a client can build requests from them.
  grpc::reflection::v1alpha::ServerReflectionRequest file_req;
  file_req.set_file_containing_symbol("montage.cache.v1.CacheService");
  ASSERT_TRUE(stream->Write(file_req));
  grpc::reflection::v1alpha::ServerReflectionResponse file_resp;
  ASSERT_TRUE(stream->Read(&file_resp));
  EXPECT_GT(file_resp.file_descriptor_response().file_descriptor_proto_size(), 0);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(MontagedCacheTest, OneServiceProcessDoesNotClaimTheOthers) {
  auto process = MontagedProcess::Start({"cache"});
  ASSERT_TRUE(process.ok()) << process.status();
  grpc::StatusCode code;
  EXPECT_EQ(Health(**process, "montage.cache.v1.CacheService", &code),
            grpc::health::v1::HealthCheckResponse::SERVING);
  Health(**process, "montage.generation.v1.GenerationService", &code);
  EXPECT_EQ(code, grpc::StatusCode::NOT_FOUND);
}

TEST(MontagedAdminTest, ReadyHealthzAndMetrics) {
  auto process = MontagedProcess::Start({"cache"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto [ready_status, ready_body] = HttpGet((*process)->admin_address(), "/ready");
  EXPECT_EQ(ready_status, 200);
  EXPECT_EQ(ready_body, "LIVE\n");
  EXPECT_EQ(HttpGet((*process)->admin_address(), "/healthz").first, 200);

  auto stub = cachepb::CacheService::NewStub((*process)->channel());
  for (int i = 0; i < 3; ++i) Get(*stub, "", "absent");
  Set(*stub, "", "", "x");  // one INVALID_ARGUMENT
  auto [metrics_status, metrics] = HttpGet((*process)->admin_address(), "/metrics");
  EXPECT_EQ(metrics_status, 200);
  EXPECT_THAT(metrics, HasSubstr("montage_grpc_server_requests_total"));
  EXPECT_THAT(metrics, HasSubstr("/montage.cache.v1.CacheService/Get"));
  EXPECT_THAT(metrics, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(metrics, HasSubstr("montage_grpc_server_request_duration_seconds"));
  // The engine's own figures, exact at scrape time.
  EXPECT_EQ(MetricValue(metrics, "montage_cache_events_total", "event=\"miss\""), 3);
  EXPECT_EQ(MetricValue(metrics, "montage_cache_entries", "namespace=\"default\""), 0);

  auto [traces_status, traces] = HttpGet((*process)->admin_address(), "/debug/traces");
  EXPECT_EQ(traces_status, 200);
  EXPECT_THAT(traces, HasSubstr("CacheService/Get"));
}

TEST(MontagedCacheTest, SingleFlightAcrossClients) {
  auto process = MontagedProcess::Start({"cache"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = cachepb::CacheService::NewStub((*process)->channel());

  // The first caller takes the lease.
  cachepb::GetRequest req;
  req.set_key("expensive");
  req.set_lease_on_miss(true);
  req.mutable_max_wait()->set_seconds(30);
  cachepb::GetResponse first;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub->Get(&ctx, req, &first).ok());
  }
  ASSERT_FALSE(first.found());
  ASSERT_FALSE(first.lease().token().empty());

  // 20 more callers wait (asynchronously) for the leaseholder's value.
  constexpr int kWaiters = 20;
  struct Call {
    grpc::ClientContext ctx;
    cachepb::GetResponse resp;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Call>> calls;
  absl::Mutex mu;
  int done = 0;
  for (int i = 0; i < kWaiters; ++i) {
    calls.push_back(std::make_unique<Call>());
    Call* c = calls.back().get();
    WithDeadline(c->ctx);
    stub->async()->Get(&c->ctx, &req, &c->resp, [c, &mu, &done](grpc::Status s) {
      absl::MutexLock lock(&mu);
      c->status = s;
      ++done;
    });
  }
  // Bounded polling until the server holds all of them in flight (its own gauge says so).
  double in_flight = 0;
  for (int i = 0; i < 3000 && in_flight < kWaiters; ++i) {
    in_flight = MetricValue(HttpGet((*process)->admin_address(), "/metrics").second,
                            "montage_grpc_server_in_flight", "CacheService/Get");
    if (in_flight < kWaiters) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(in_flight, kWaiters);
  {
    absl::MutexLock lock(&mu);
    EXPECT_EQ(done, 0);
  }
  ASSERT_TRUE(Set(*stub, "", "expensive", "computed once", first.lease().token()).ok());
  {
    absl::MutexLock lock(&mu);
    mu.AwaitWithTimeout(absl::Condition(
                            +[](int* d) { return *d == kWaiters; }, &done),
                        absl::Seconds(30));
    ASSERT_EQ(done, kWaiters);
  }
  int coalesced = 0;
  for (auto& c : calls) {
    EXPECT_TRUE(c->status.ok()) << c->status.error_message();
    EXPECT_TRUE(c->resp.found());
    EXPECT_EQ(c->resp.entry().value(), "computed once");
    EXPECT_TRUE(c->resp.lease().token().empty());
    coalesced += c->resp.coalesced();
  }
  // Every waiter got the leaseholder's value; none computed it again.
  EXPECT_EQ(coalesced, kWaiters);
  cachepb::CacheStats stats;
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  ASSERT_TRUE(stub->GetStats(&ctx, cachepb::GetStatsRequest(), &stats).ok());
  EXPECT_EQ(stats.total().leases_granted(), 1u);
  EXPECT_EQ(stats.total().sets(), 1u);
}

TEST(MontagedLifecycleTest, SigtermDrainsInFlightCallsAndExitsCleanly) {
  auto process = MontagedProcess::Start({"cache", "--set=server.drain_timeout=30s"});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = cachepb::CacheService::NewStub((*process)->channel());
  cachepb::GetRequest req;
  req.set_key("slow");
  req.set_lease_on_miss(true);
  cachepb::GetResponse lease;
  {
    grpc::ClientContext ctx;
    WithDeadline(ctx);
    ASSERT_TRUE(stub->Get(&ctx, req, &lease).ok());
  }
  ASSERT_FALSE(lease.lease().token().empty());

  // A second caller waits on the lease (at most 2 s), and is in flight when SIGTERM arrives.
  req.mutable_max_wait()->set_seconds(2);
  grpc::ClientContext ctx;
  WithDeadline(ctx);
  cachepb::GetResponse waited;
  absl::Notification finished;
  grpc::Status waited_status;
  stub->async()->Get(&ctx, &req, &waited, [&](grpc::Status s) {
    waited_status = s;
    finished.Notify();
  });
  double in_flight = 0;
  for (int i = 0; i < 3000 && in_flight < 1; ++i) {
    in_flight = MetricValue(HttpGet((*process)->admin_address(), "/metrics").second,
                            "montage_grpc_server_in_flight", "CacheService/Get");
    if (in_flight < 1) absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(in_flight, 1);
  (*process)->Signal(SIGTERM);
  ASSERT_TRUE(finished.WaitForNotificationWithTimeout(absl::Seconds(30)));
  // The in-flight call was answered (a miss after its wait), not cut off.
  EXPECT_TRUE(waited_status.ok()) << waited_status.error_message();
  EXPECT_FALSE(waited.found());
  ProcessResult result = (*process)->Stop();
  EXPECT_TRUE(result.exited);
  EXPECT_EQ(result.exit_code, 0) << (*process)->log();
  EXPECT_THAT((*process)->log(), HasSubstr("draining"));
  EXPECT_THAT((*process)->log(), HasSubstr("stopped"));
}

TEST(MontagedLifecycleTest, PersistenceSurvivesRestartAndCorruptFilesAreSkipped) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/cache.snapshot";
  {
    auto process = MontagedProcess::Start({"cache", "--set=cache.persist_path=" + path});
    ASSERT_TRUE(process.ok()) << process.status();
    auto stub = cachepb::CacheService::NewStub((*process)->channel());
    ASSERT_TRUE(Set(*stub, "audio", "line:1", std::string(100000, 'a')).ok());
    ASSERT_TRUE(Set(*stub, "", "script", "hello").ok());
    ASSERT_EQ((*process)->Stop().exit_code, 0) << (*process)->log();
  }
  {
    auto process = MontagedProcess::Start({"cache", "--set=cache.persist_path=" + path});
    ASSERT_TRUE(process.ok()) << process.status();
    auto stub = cachepb::CacheService::NewStub((*process)->channel());
    EXPECT_EQ(Get(*stub, "", "script").entry().value(), "hello");
    EXPECT_EQ(Get(*stub, "audio", "line:1").entry().value().size(), 100000u);
    ASSERT_EQ((*process)->Stop().exit_code, 0);
  }
  // Corrupt the file: the service starts empty, says so, and keeps the bad file aside.
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.write("garbage!", 8);
  }
  auto process = MontagedProcess::Start({"cache", "--set=cache.persist_path=" + path});
  ASSERT_TRUE(process.ok()) << process.status();
  auto stub = cachepb::CacheService::NewStub((*process)->channel());
  EXPECT_FALSE(Get(*stub, "", "script").found());
  EXPECT_THAT((*process)->log(), HasSubstr("snapshot unreadable"));
  EXPECT_TRUE(std::ifstream(path + ".corrupt").good());
  EXPECT_EQ((*process)->Stop().exit_code, 0);
}

TEST(MontagedConfigTest, BadConfigFailsAtStartNamingFileAndLine) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/montage.yaml";
  std::ofstream(path) << "cache:\n  max_bytes: 1MiB\n  max_bytez: 2MiB\n";
  CommandResult r = RunCommand({MontagedPath(), "cache", "--config=" + path});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("montage.yaml:3:3"));
  EXPECT_THAT(r.err, HasSubstr("unknown key 'max_bytez'"));

  r = RunCommand({MontagedPath(), "nonsense"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown service"));
}

TEST(MontageCliTest, CacheCommandsAgainstARunningServer) {
  auto process = MontagedProcess::Start({"cache"});
  ASSERT_TRUE(process.ok()) << process.status();
  const std::string addr = "--addr=" + (*process)->grpc_address();
  const std::string cli = MontageCliPath();

  CommandResult set =
      RunCommand({cli, addr, "cache", "set", "greeting", "hello world", "--ttl=1h"});
  EXPECT_EQ(set.exit_code, 0) << set.err;
  EXPECT_THAT(set.out, HasSubstr("stored greeting"));

  CommandResult get = RunCommand({cli, addr, "cache", "get", "greeting"});
  EXPECT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, "hello world");

  CommandResult piped = RunCommand({cli, addr, "cache", "set", "piped", "-"}, "from stdin");
  EXPECT_EQ(piped.exit_code, 0) << piped.err;
  EXPECT_EQ(RunCommand({cli, addr, "cache", "get", "piped"}).out, "from stdin");

  CommandResult miss = RunCommand({cli, addr, "cache", "get", "nope"});
  EXPECT_EQ(miss.exit_code, 1);

  CommandResult stats = RunCommand({cli, addr, "cache", "stats"});
  EXPECT_EQ(stats.exit_code, 0);
  EXPECT_THAT(stats.out, HasSubstr("default"));
  EXPECT_THAT(stats.out, HasSubstr("HIT%"));

  CommandResult json = RunCommand({cli, addr, "--json", "cache", "stats"});
  EXPECT_THAT(json.out, HasSubstr("\"entries\": \"2\""));

  CommandResult bad = RunCommand({cli, addr, "cache", "set", "k", "v", "--ttl=soon"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("not a duration"));

  CommandResult invalid = RunCommand({cli, addr, "cache", "set", std::string(2000, 'k'), "v"});
  EXPECT_EQ(invalid.exit_code, 3);
  EXPECT_THAT(invalid.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(invalid.err, HasSubstr("field key"));

  CommandResult health = RunCommand({cli, addr, "health"});
  EXPECT_EQ(health.exit_code, 0);
  EXPECT_THAT(health.out, HasSubstr("montage.cache.v1.CacheService"));
  EXPECT_THAT(health.out, HasSubstr("SERVING"));
}

TEST(MontageCliTest, UnreachableServerIsAClearError) {
  // Port 1 on loopback is not listening.
  CommandResult r =
      RunCommand({MontageCliPath(), absl::StrCat("--addr=127.0.0.1:", UnusedLoopbackPort()),
                  "--timeout=2s", "cache", "get", "k"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.err, HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(r.err, HasSubstr("montaged all"));
}

}  // namespace
}  // namespace montage::testing
