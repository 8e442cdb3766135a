#include "common/telemetry/span_json.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace montage::telemetry {
namespace {

using Json = nlohmann::json;

const absl::Time kStart = absl::FromUnixMicros(1'700'000'000'123'456);

std::vector<SpanData> SampleSpans() {
  SpanData server;
  server.name = "/montage.cache.v1.CacheService/Get";
  server.service_name = "cache";
  server.trace_id = *TraceIdFromHex("4bf92f3577b34da6a3ce929d0e0e4736");
  server.span_id = *SpanIdFromHex("00f067aa0ba902b7");
  server.parent_span_id = *SpanIdFromHex("05e3ac9a4f6e3b90");
  server.kind = SpanKind::kServer;
  server.start = kStart;
  server.end = kStart + absl::Microseconds(1500);
  server.attributes = {{"rpc.method", std::string("Get")},
                       {"rpc.grpc.status_code", int64_t{13}},
                       {"ratio", 0.25},
                       {"hit", false}};
  server.status_code = SpanStatusCode::kError;
  server.status_message = "disk on fire";
  server.events = {{"miss", kStart + absl::Microseconds(10)}};

  SpanData root;
  root.name = "render";
  root.service_name = "gateway";
  root.trace_id = *TraceIdFromHex("11111111111111111111111111111111");
  root.span_id = *SpanIdFromHex("2222222222222222");
  root.kind = SpanKind::kInternal;
  root.start = kStart;
  root.end = kStart;  // zero duration
  return {server, root};
}

TEST(ZipkinJsonTest, HasTheV2Fields) {
  const Json json = Json::parse(ZipkinJson(SampleSpans()));
  ASSERT_TRUE(json.is_array());
  ASSERT_EQ(json.size(), 2u);
  const Json& server = json[0];
  EXPECT_EQ(server["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(server["id"], "00f067aa0ba902b7");
  EXPECT_EQ(server["parentId"], "05e3ac9a4f6e3b90");
  EXPECT_EQ(server["name"], "/montage.cache.v1.CacheService/Get");
  EXPECT_EQ(server["kind"], "SERVER");
  EXPECT_EQ(server["timestamp"], 1'700'000'000'123'456);
  EXPECT_EQ(server["duration"], 1500);
  EXPECT_EQ(server["localEndpoint"]["serviceName"], "cache");
  EXPECT_EQ(server["tags"]["rpc.method"], "Get");
  EXPECT_EQ(server["tags"]["rpc.grpc.status_code"], "13");
  EXPECT_EQ(server["tags"]["ratio"], "0.25");
  EXPECT_EQ(server["tags"]["hit"], "false");
  EXPECT_EQ(server["tags"]["error"], "disk on fire");
  EXPECT_EQ(server["annotations"][0]["value"], "miss");
  EXPECT_EQ(server["annotations"][0]["timestamp"], 1'700'000'000'123'466);

  const Json& root = json[1];
  EXPECT_FALSE(root.contains("parentId"));
  EXPECT_FALSE(root.contains("kind"));  // Zipkin has no INTERNAL
  EXPECT_EQ(root["duration"], 1);       // rounded up
  EXPECT_EQ(root["localEndpoint"]["serviceName"], "gateway");
}

TEST(OtlpJsonTest, HasTheExportTraceServiceRequestFields) {
  const Json json = Json::parse(OtlpJson(SampleSpans()));
  ASSERT_EQ(json["resourceSpans"].size(), 2u);  // one per service
  const Json& resource = json["resourceSpans"][0];
  EXPECT_EQ(resource["resource"]["attributes"][0]["key"], "service.name");
  EXPECT_EQ(resource["resource"]["attributes"][0]["value"]["stringValue"], "cache");
  ASSERT_EQ(resource["scopeSpans"].size(), 1u);
  EXPECT_EQ(resource["scopeSpans"][0]["scope"]["name"], "montage");
  ASSERT_EQ(resource["scopeSpans"][0]["spans"].size(), 1u);
  const Json& span = resource["scopeSpans"][0]["spans"][0];
  EXPECT_EQ(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(span["spanId"], "00f067aa0ba902b7");
  EXPECT_EQ(span["parentSpanId"], "05e3ac9a4f6e3b90");
  EXPECT_EQ(span["name"], "/montage.cache.v1.CacheService/Get");
  EXPECT_EQ(span["kind"], 2);
  EXPECT_EQ(span["startTimeUnixNano"], "1700000000123456000");
  EXPECT_EQ(span["endTimeUnixNano"], "1700000000124956000");
  const Json& attributes = span["attributes"];
  ASSERT_EQ(attributes.size(), 4u);
  EXPECT_EQ(attributes[0]["key"], "rpc.method");
  EXPECT_EQ(attributes[0]["value"]["stringValue"], "Get");
  EXPECT_EQ(attributes[1]["value"]["intValue"], "13");
  EXPECT_EQ(attributes[2]["value"]["doubleValue"], 0.25);
  EXPECT_EQ(attributes[3]["value"]["boolValue"], false);
  EXPECT_EQ(span["status"]["code"], 2);
  EXPECT_EQ(span["status"]["message"], "disk on fire");
  EXPECT_EQ(span["events"][0]["name"], "miss");
  EXPECT_EQ(span["events"][0]["timeUnixNano"], "1700000000123466000");

  const Json& gateway = json["resourceSpans"][1];
  EXPECT_EQ(gateway["resource"]["attributes"][0]["value"]["stringValue"], "gateway");
  const Json& root = gateway["scopeSpans"][0]["spans"][0];
  EXPECT_EQ(root["kind"], 1);
  EXPECT_FALSE(root.contains("parentSpanId"));
  EXPECT_EQ(root["status"]["code"], 0);
}

TEST(SpanJsonTest, InvalidUtf8IsReplacedNotFatal) {
  std::vector<SpanData> spans = SampleSpans();
  spans[0].name = "bad \xff\xfe name";
  spans[0].attributes.emplace_back("raw", std::string("\xc3"));
  for (const std::string& text : {ZipkinJson(spans), OtlpJson(spans), TracesWaterfallJson(spans)}) {
    EXPECT_NO_THROW(Json::parse(text)) << text;
  }
}

TEST(SpanJsonTest, EmptyInput) {
  EXPECT_EQ(Json::parse(ZipkinJson(std::vector<SpanData>{})), Json::array());
  EXPECT_EQ(Json::parse(OtlpJson(std::vector<SpanData>{}))["resourceSpans"], Json::array());
  EXPECT_EQ(Json::parse(TracesWaterfallJson({}))["traces"], Json::array());
}

}  // namespace
}  // namespace montage::telemetry
