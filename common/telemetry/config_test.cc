#include "common/telemetry/config.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage::telemetry {
namespace {

using config::v1::TracingConfig;

TEST(TracerOptionsFromConfigTest, UnsetFieldsTakeDefaults) {
  TracingConfig config;
  config.set_sample_ratio(0.25);
  const auto options = TracerOptionsFromConfig(config, "cache");
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->service_name, "cache");
  EXPECT_EQ(options->exporter, ExporterKind::kNone);
  EXPECT_EQ(options->sample_ratio, 0.25);
  EXPECT_EQ(options->ring_buffer_spans, TracerOptions{}.ring_buffer_spans);
  EXPECT_EQ(options->export_interval, TracerOptions{}.export_interval);
  EXPECT_EQ(options->max_export_batch, TracerOptions{}.max_export_batch);
  EXPECT_EQ(options->max_export_queue, TracerOptions{}.max_export_queue);
}

TEST(TracerOptionsFromConfigTest, CopiesEveryField) {
  TracingConfig config;
  config.set_exporter(TracingConfig::OTLP);
  config.set_endpoint("http://127.0.0.1:4318/v1/traces");
  config.set_sample_ratio(1);
  config.set_ring_buffer_spans(10);
  config.mutable_export_interval()->set_seconds(2);
  config.mutable_export_interval()->set_nanos(500'000'000);
  config.set_max_export_batch(7);
  config.set_max_export_queue(70);
  const auto options = TracerOptionsFromConfig(config, "gateway");
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->exporter, ExporterKind::kOtlp);
  EXPECT_EQ(options->endpoint, "http://127.0.0.1:4318/v1/traces");
  EXPECT_EQ(options->ring_buffer_spans, 10u);
  EXPECT_EQ(options->export_interval, absl::Milliseconds(2500));
  EXPECT_EQ(options->max_export_batch, 7u);
  EXPECT_EQ(options->max_export_queue, 70u);
  config.set_exporter(TracingConfig::ZIPKIN);
  EXPECT_EQ(TracerOptionsFromConfig(config, "gateway")->exporter, ExporterKind::kZipkin);
}

TEST(TracerOptionsFromConfigTest, RejectsInvalidValues) {
  TracingConfig config;
  config.set_sample_ratio(3);
  EXPECT_EQ(TracerOptionsFromConfig(config, "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  config.set_sample_ratio(1);
  config.set_exporter(TracingConfig::ZIPKIN);
  EXPECT_THAT(std::string(TracerOptionsFromConfig(config, "x").status().message()),
              ::testing::HasSubstr("tracing.endpoint"));
  config.set_endpoint("not a url");
  EXPECT_FALSE(TracerOptionsFromConfig(config, "x").ok());
}

}  // namespace
}  // namespace montage::telemetry
