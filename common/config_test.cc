#include "common/config.h"

#include <cstdlib>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::config {
namespace {

using ::testing::HasSubstr;

TEST(ConfigTest, DefaultsAreValid) {
  Config c = DefaultConfig();
  EXPECT_TRUE(Validate(c).ok());
  EXPECT_EQ(c.server().listen(), "127.0.0.1:50051");
  EXPECT_EQ(c.cache().max_bytes(), 100ull << 20);
}

TEST(ConfigTest, YamlMergesOverDefaults) {
  Config c = DefaultConfig();
  ASSERT_TRUE(MergeYaml(R"(
server:
  listen: 0.0.0.0:7000
  drain_timeout: 2500ms
logging:
  level: debug
  format: json
cache:
  max_bytes: 64MiB
  namespaces:
    audio:
      max_bytes: 1GiB
      default_ttl: 24h
    llm:
      max_bytes: 10MB
)",
                        "test.yaml", c)
                  .ok());
  EXPECT_EQ(c.server().listen(), "0.0.0.0:7000");
  EXPECT_EQ(c.server().drain_timeout().seconds(), 2);
  EXPECT_EQ(c.server().drain_timeout().nanos(), 500'000'000);
  EXPECT_EQ(c.server().admin_listen(), "127.0.0.1:9901");  // untouched default
  EXPECT_EQ(c.logging().level(), v1::LoggingConfig::DEBUG);
  EXPECT_EQ(c.logging().format(), v1::LoggingConfig::JSON);
  EXPECT_EQ(c.cache().max_bytes(), 64ull << 20);
  ASSERT_EQ(c.cache().namespaces().size(), 2u);
  EXPECT_EQ(c.cache().namespaces().at("audio").max_bytes(), 1ull << 30);
  EXPECT_EQ(c.cache().namespaces().at("audio").default_ttl().seconds(), 86400);
  EXPECT_EQ(c.cache().namespaces().at("llm").max_bytes(), 10'000'000u);
}

TEST(ConfigTest, UnknownKeyNamesFileLineAndKnownKeys) {
  Config c = DefaultConfig();
  absl::Status s = MergeYaml("server:\n  listen: 127.0.0.1:1\n  lisen: x\n", "montage.yaml", c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("montage.yaml:3:3"));
  EXPECT_THAT(s.message(), HasSubstr("unknown key 'lisen'"));
  EXPECT_THAT(s.message(), HasSubstr("listen"));
}

TEST(ConfigTest, BadValuesAreRejectedWithLine) {
  struct Case {
    const char* yaml;
    const char* expect;
  };
  for (const Case& c : {
           Case{"cache:\n  shards: many\n", "montage.yaml:2:11"},
           Case{"cache:\n  default_ttl: soon\n", "not a duration"},
           Case{"cache:\n  max_bytes: lots\n", "is not a size"},
           Case{"logging:\n  level: loud\n", "one of: debug, info, warning, error"},
           Case{"server: [1, 2]\n", "must be a mapping"},
           Case{"server:\n  listen: [a]\n", "must be a single value"},
           Case{"server: {listen: \"x\"\n", "not valid YAML"},
       }) {
    Config config = DefaultConfig();
    absl::Status s = MergeYaml(c.yaml, "montage.yaml", config);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.yaml;
    EXPECT_THAT(s.message(), HasSubstr(c.expect)) << c.yaml;
  }
}

TEST(ConfigTest, EnvironmentAndOverridesApplyInOrder) {
  const std::string path = ::testing::TempDir() + "/config_test.yaml";
  {
    std::ofstream out(path);
    out << "cache:\n  max_bytes: 1MiB\n  shards: 4\n";
  }
  LoadOptions options;
  options.path = path;
  options.environment = {
      {"MONTAGE__CACHE__SHARDS", "8"}, {"MONTAGE__CACHE__MAX_BYTES", "2MiB"}, {"HOME", "/root"}};
  options.overrides = {"cache.max_bytes=3MiB", "cache.namespaces.audio.max_bytes=5MiB"};
  absl::StatusOr<Config> c = LoadConfig(options);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->cache().shards(), 8u);
  EXPECT_EQ(c->cache().max_bytes(), 3ull << 20);
  EXPECT_EQ(c->cache().namespaces().at("audio").max_bytes(), 5ull << 20);
}

TEST(ConfigTest, BadOverridesAndEnvironmentNameTheirSource) {
  LoadOptions options;
  options.environment = {{"MONTAGE__CACHE__NOPE", "1"}};
  absl::StatusOr<Config> c = LoadConfig(options);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("MONTAGE__CACHE__NOPE"));

  options.environment.clear();
  options.overrides = {"cache.max_bytes"};
  EXPECT_THAT(LoadConfig(options).status().message(), HasSubstr("expected key.path=value"));
  options.overrides = {"server.listen.port=1"};
  EXPECT_THAT(LoadConfig(options).status().message(), HasSubstr("not a section"));
}

TEST(ConfigTest, MissingFileIsNotFound) {
  LoadOptions options;
  options.path = "/nonexistent/montage.yaml";
  EXPECT_EQ(LoadConfig(options).status().code(), absl::StatusCode::kNotFound);
}

TEST(ConfigTest, ValidationCatchesInconsistentValues) {
  Config c = DefaultConfig();
  c.mutable_server()->set_listen("localhost");
  EXPECT_THAT(Validate(c).message(), HasSubstr("server.listen"));
  c = DefaultConfig();
  c.mutable_tracing()->set_exporter(v1::TracingConfig::ZIPKIN);
  EXPECT_THAT(Validate(c).message(), HasSubstr("tracing.endpoint"));
  c = DefaultConfig();
  c.mutable_cache()->set_max_value_bytes(1ull << 30);
  EXPECT_THAT(Validate(c).message(), HasSubstr("cache.max_value_bytes"));
  c = DefaultConfig();
  c.mutable_tracing()->set_sample_ratio(1.5);
  EXPECT_THAT(Validate(c).message(), HasSubstr("sample_ratio"));
}

TEST(ConfigTest, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("4096"), 4096u);
  EXPECT_EQ(*ParseByteSize("512KiB"), 512u * 1024);
  EXPECT_EQ(*ParseByteSize("1.5GiB"), 3ull << 29);
  EXPECT_EQ(*ParseByteSize("10MB"), 10'000'000u);
  EXPECT_FALSE(ParseByteSize("MiB").ok());
  EXPECT_FALSE(ParseByteSize("12 parsecs").ok());
  EXPECT_FALSE(ParseByteSize("99999999999GiB").ok());
}

TEST(ConfigTest, SecretsComeFromEnvOrFileAndAreNeverEchoed) {
  v1::SecretRef ref;
  ref.set_env("MONTAGE_TEST_SECRET_XYZ");
  ::setenv("MONTAGE_TEST_SECRET_XYZ", "s3cret", 1);
  EXPECT_EQ(*ResolveSecret(ref), "s3cret");
  ::unsetenv("MONTAGE_TEST_SECRET_XYZ");
  absl::StatusOr<std::string> missing = ResolveSecret(ref);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(missing.status().message(), HasSubstr("MONTAGE_TEST_SECRET_XYZ"));

  const std::string path = ::testing::TempDir() + "/secret.txt";
  {
    std::ofstream out(path);
    out << "file-secret\n";
  }
  v1::SecretRef file_ref;
  file_ref.set_file(path);
  EXPECT_EQ(*ResolveSecret(file_ref), "file-secret");
  file_ref.set_file(path + ".missing");
  EXPECT_THAT(ResolveSecret(file_ref).status().message(), ::testing::Not(HasSubstr("file-secret")));
}

TEST(ConfigTest, JsonDumpHasFieldNames) {
  const std::string json = ConfigToJson(DefaultConfig());
  EXPECT_THAT(json, HasSubstr("\"admin_listen\""));
  EXPECT_THAT(json, HasSubstr("\"max_bytes\""));
}

}  // namespace
}  // namespace montage::config
