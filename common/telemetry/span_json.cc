#include "common/telemetry/span_json.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "nlohmann/json.hpp"

namespace montage::telemetry {
namespace {

using Json = nlohmann::json;

// Attribute values and names come from requests and may hold invalid UTF-8: replace, never throw.
std::string Dump(const Json& json) {
  return json.dump(/*indent=*/-1, /*indent_char=*/' ', /*ensure_ascii=*/false,
                   Json::error_handler_t::replace);
}

std::vector<const SpanData*> Pointers(absl::Span<const SpanData> spans) {
  std::vector<const SpanData*> out;
  out.reserve(spans.size());
  for (const SpanData& span : spans) out.push_back(&span);
  return out;
}

int64_t DurationMicros(const SpanData& span) {
  return absl::ToInt64Microseconds(span.end - span.start);
}

// Zipkin tags are strings only.
std::string AttributeString(const AttributeValue& value) {
  struct Visitor {
    std::string operator()(const std::string& v) const { return v; }
    std::string operator()(int64_t v) const { return std::to_string(v); }
    std::string operator()(double v) const { return Json(v).dump(); }
    std::string operator()(bool v) const { return v ? "true" : "false"; }
  };
  return std::visit(Visitor{}, value);
}

Json AttributeJson(const AttributeValue& value) {
  return std::visit([](const auto& v) { return Json(v); }, value);
}

Json OtlpAnyValue(const AttributeValue& value) {
  struct Visitor {
    Json operator()(const std::string& v) const { return {{"stringValue", v}}; }
    // int64 is a string in the protobuf JSON mapping.
    Json operator()(int64_t v) const { return {{"intValue", std::to_string(v)}}; }
    Json operator()(double v) const { return {{"doubleValue", v}}; }
    Json operator()(bool v) const { return {{"boolValue", v}}; }
  };
  return std::visit(Visitor{}, value);
}

int OtlpKind(SpanKind kind) {
  switch (kind) {
    case SpanKind::kInternal:
      return 1;
    case SpanKind::kServer:
      return 2;
    case SpanKind::kClient:
      return 3;
  }
  return 0;
}

int OtlpStatusCode(SpanStatusCode code) {
  switch (code) {
    case SpanStatusCode::kUnset:
      return 0;
    case SpanStatusCode::kOk:
      return 1;
    case SpanStatusCode::kError:
      return 2;
  }
  return 0;
}

std::string UnixNanos(absl::Time t) { return std::to_string(absl::ToUnixNanos(t)); }

}  // namespace

absl::string_view SpanKindName(SpanKind kind) {
  switch (kind) {
    case SpanKind::kInternal:
      return "INTERNAL";
    case SpanKind::kServer:
      return "SERVER";
    case SpanKind::kClient:
      return "CLIENT";
  }
  return "INTERNAL";
}

absl::string_view SpanStatusCodeName(SpanStatusCode code) {
  switch (code) {
    case SpanStatusCode::kUnset:
      return "UNSET";
    case SpanStatusCode::kOk:
      return "OK";
    case SpanStatusCode::kError:
      return "ERROR";
  }
  return "UNSET";
}

const AttributeValue* SpanData::FindAttribute(absl::string_view key) const {
  for (const auto& [k, v] : attributes) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string ZipkinJson(absl::Span<const SpanData* const> spans) {
  Json out = Json::array();
  for (const SpanData* span : spans) {
    Json z = {
        {"traceId", ToHex(span->trace_id)},
        {"id", ToHex(span->span_id)},
        {"name", span->name},
        {"timestamp", absl::ToUnixMicros(span->start)},
        // Zipkin rounds sub-microsecond durations up to 1.
        {"duration", std::max<int64_t>(1, DurationMicros(*span))},
        {"localEndpoint", {{"serviceName", span->service_name}}},
    };
    if (!span->IsRoot()) z["parentId"] = ToHex(span->parent_span_id);
    // Zipkin has no INTERNAL kind: such spans go without one.
    if (span->kind != SpanKind::kInternal) z["kind"] = std::string(SpanKindName(span->kind));
    Json tags = Json::object();
    for (const auto& [key, value] : span->attributes) tags[key] = AttributeString(value);
    if (span->status_code != SpanStatusCode::kUnset) {
      tags["otel.status_code"] = std::string(SpanStatusCodeName(span->status_code));
    }
    if (span->status_code == SpanStatusCode::kError) {
      tags["error"] = span->status_message.empty() ? "true" : span->status_message;
    }
    if (!tags.empty()) z["tags"] = std::move(tags);
    if (!span->events.empty()) {
      Json annotations = Json::array();
      for (const SpanEvent& event : span->events) {
        annotations.push_back(
            {{"timestamp", absl::ToUnixMicros(event.time)}, {"value", event.name}});
      }
      z["annotations"] = std::move(annotations);
    }
    out.push_back(std::move(z));
  }
  return Dump(out);
}

std::string ZipkinJson(absl::Span<const SpanData> spans) { return ZipkinJson(Pointers(spans)); }

std::string OtlpJson(absl::Span<const SpanData* const> spans) {
  // One resource per service, in order of first appearance.
  std::vector<std::string> services;
  absl::flat_hash_map<std::string, Json> spans_by_service;
  for (const SpanData* span : spans) {
    Json s = {
        {"traceId", ToHex(span->trace_id)},
        {"spanId", ToHex(span->span_id)},
        {"name", span->name},
        {"kind", OtlpKind(span->kind)},
        {"startTimeUnixNano", UnixNanos(span->start)},
        {"endTimeUnixNano", UnixNanos(span->end)},
    };
    if (!span->IsRoot()) s["parentSpanId"] = ToHex(span->parent_span_id);
    Json attributes = Json::array();
    for (const auto& [key, value] : span->attributes) {
      attributes.push_back({{"key", key}, {"value", OtlpAnyValue(value)}});
    }
    s["attributes"] = std::move(attributes);
    Json status = {{"code", OtlpStatusCode(span->status_code)}};
    if (!span->status_message.empty()) status["message"] = span->status_message;
    s["status"] = std::move(status);
    if (!span->events.empty()) {
      Json events = Json::array();
      for (const SpanEvent& event : span->events) {
        events.push_back({{"timeUnixNano", UnixNanos(event.time)}, {"name", event.name}});
      }
      s["events"] = std::move(events);
    }
    auto [it, inserted] = spans_by_service.try_emplace(span->service_name, Json::array());
    if (inserted) services.push_back(span->service_name);
    it->second.push_back(std::move(s));
  }
  Json resource_spans = Json::array();
  for (const std::string& service : services) {
    resource_spans.push_back({
        {"resource",
         {{"attributes",
           Json::array({{{"key", "service.name"}, {"value", {{"stringValue", service}}}}})}}},
        {"scopeSpans", Json::array({{{"scope", {{"name", "montage"}}},
                                     {"spans", std::move(spans_by_service[service])}}})},
    });
  }
  return Dump(Json{{"resourceSpans", std::move(resource_spans)}});
}

std::string OtlpJson(absl::Span<const SpanData> spans) { return OtlpJson(Pointers(spans)); }

std::string TracesWaterfallJson(absl::Span<const SpanData> spans) {
  std::map<TraceId, std::vector<const SpanData*>> by_trace;
  for (const SpanData& span : spans) by_trace[span.trace_id].push_back(&span);

  struct Trace {
    absl::Time start;
    Json json;
  };
  std::vector<Trace> traces;
  traces.reserve(by_trace.size());
  for (auto& [trace_id, members] : by_trace) {
    std::sort(members.begin(), members.end(),
              [](const SpanData* a, const SpanData* b) { return a->start < b->start; });
    absl::flat_hash_map<SpanId, const SpanData*> by_id;
    for (const SpanData* span : members) by_id[span->span_id] = span;
    const absl::Time start = members.front()->start;
    absl::Time end = start;
    const SpanData* root = nullptr;
    Json list = Json::array();
    for (const SpanData* span : members) {
      end = std::max(end, span->end);
      const bool parent_known = !span->IsRoot() && by_id.contains(span->parent_span_id);
      if (!parent_known && root == nullptr) root = span;
      Json attributes = Json::object();
      for (const auto& [key, value] : span->attributes) attributes[key] = AttributeJson(value);
      Json events = Json::array();
      for (const SpanEvent& event : span->events) {
        events.push_back({{"name", event.name},
                          {"offsetMicros", absl::ToInt64Microseconds(event.time - start)}});
      }
      list.push_back({
          {"spanId", ToHex(span->span_id)},
          {"parentSpanId", parent_known ? ToHex(span->parent_span_id) : ""},
          {"remoteParentSpanId", span->IsRoot() || parent_known ? "" : ToHex(span->parent_span_id)},
          {"name", span->name},
          {"kind", std::string(SpanKindName(span->kind))},
          {"service", span->service_name},
          {"startUnixMicros", absl::ToUnixMicros(span->start)},
          {"offsetMicros", absl::ToInt64Microseconds(span->start - start)},
          {"durationMicros", DurationMicros(*span)},
          {"attributes", std::move(attributes)},
          {"status",
           {{"code", std::string(SpanStatusCodeName(span->status_code))},
            {"message", span->status_message}}},
          {"events", std::move(events)},
      });
    }
    traces.push_back({start,
                      {
                          {"traceId", ToHex(trace_id)},
                          {"rootName", root != nullptr ? root->name : ""},
                          {"startUnixMicros", absl::ToUnixMicros(start)},
                          {"durationMicros", absl::ToInt64Microseconds(end - start)},
                          {"spanCount", members.size()},
                          {"spans", std::move(list)},
                      }});
  }
  std::stable_sort(traces.begin(), traces.end(),
                   [](const Trace& a, const Trace& b) { return a.start > b.start; });
  Json out = Json::array();
  for (Trace& trace : traces) out.push_back(std::move(trace.json));
  return Dump(Json{{"traces", std::move(out)}});
}

}  // namespace montage::telemetry
