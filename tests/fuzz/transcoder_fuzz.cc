// Fuzz target for gateway/transcode/transcoder.h over the test API
// (gateway/transcode/testdata/transcode_test.proto, read at run time from the descriptor set
// named by MONTAGE_TRANSCODE_TEST_DESCRIPTORS: the environment variable if set, else the
// compile-time definition). An input is a request line and a body separated by the first '\n':
//
//   POST /v1/shelves/3/books?request_id=r-1
//   {"title":"Dune"}
//
// The request line ("<method> <path>[?query]") is routed through a TranscodingTable (rules and
// auto_mapping); a match is transcoded with lenient and with strict RequestOptions. The whole
// input is also parsed as JSON for a few message types, used as a response message's bytes and
// as grpc-status-details-bin. Besides "never crashes", it checks what must hold for any input:
//  - request bytes the transcoder produced parse as the method's input type;
//  - JSON it accepted prints back (ProtoToJson) and the print parses again;
//  - StatusToJson always gives one JSON object in valid UTF-8, whatever the message and details;
//  - a JSON (not HttpBody) response is labelled application/json;
//  - a stream closed with an error is still one JSON array.
// A broken invariant aborts with a message (libFuzzer then saves the input).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "gateway/transcode/path_template.h"
#include "gateway/transcode/transcoder.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"

namespace montage::gateway::transcode {
namespace {

namespace pb = google::protobuf;

void Require(bool condition, const char* what, absl::string_view detail) {
  if (condition) return;
  std::fprintf(stderr, "transcoder_fuzz: invariant broken: %s [%.*s]\n", what,
               static_cast<int>(detail.size() > 400 ? 400 : detail.size()), detail.data());
  std::abort();
}

bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xE  ? 3
                 : (c >> 3) == 0x1E ? 4
                                    : 0;
    if (len == 0 || i + len > s.size()) return false;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

struct Env {
  pb::DescriptorPool pool;
  std::unique_ptr<pb::DynamicMessageFactory> factory;
  std::unique_ptr<TranscodingTable> table;
  std::unique_ptr<Transcoder> transcoder;
  std::vector<const pb::Descriptor*> json_types;
};

const Env& GetEnv() {
  static const Env* const env = [] {
    const char* path = std::getenv("MONTAGE_TRANSCODE_TEST_DESCRIPTORS");
#ifdef MONTAGE_TRANSCODE_TEST_DESCRIPTORS
    if (path == nullptr) path = MONTAGE_TRANSCODE_TEST_DESCRIPTORS;
#endif
    if (path == nullptr) {
      std::fprintf(stderr, "transcoder_fuzz: set MONTAGE_TRANSCODE_TEST_DESCRIPTORS\n");
      std::abort();
    }
    std::ifstream in(path, std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    pb::FileDescriptorSet set;
    if (!in || !set.ParseFromString(bytes.str())) {
      std::fprintf(stderr, "transcoder_fuzz: cannot read descriptor set %s\n", path);
      std::abort();
    }
    auto* out = new Env;
    for (const pb::FileDescriptorProto& file : set.file()) {
      if (out->pool.BuildFile(file) == nullptr) {
        std::fprintf(stderr, "transcoder_fuzz: cannot build %s\n", file.name().c_str());
        std::abort();
      }
    }
    out->factory = std::make_unique<pb::DynamicMessageFactory>(&out->pool);
    auto table = TranscodingTable::Build(
        out->pool, {"montage.transcode.test.Library", "montage.transcode.test.Admin"}, true);
    if (!table.ok()) {
      std::fprintf(stderr, "transcoder_fuzz: %s\n", table.status().ToString().c_str());
      std::abort();
    }
    out->table = *std::move(table);
    out->transcoder = std::make_unique<Transcoder>(out->pool);
    for (const char* name : {"montage.transcode.test.Book", "montage.transcode.test.GetBookRequest",
                             "montage.transcode.test.CreateBookRequest", "google.protobuf.Struct",
                             "google.protobuf.Value", "google.rpc.Status"}) {
      const pb::Descriptor* type = out->pool.FindMessageTypeByName(name);
      if (type == nullptr) {
        std::fprintf(stderr, "transcoder_fuzz: %s is not in the descriptor set\n", name);
        std::abort();
      }
      out->json_types.push_back(type);
    }
    return out;
  }();
  return *env;
}

bool ParsesAs(const Env& env, const pb::Descriptor& type, const std::string& bytes) {
  std::unique_ptr<pb::Message> message(env.factory->GetPrototype(&type)->New());
  return message->ParsePartialFromString(bytes);
}

// JSON accepted for `type` prints, and the print is accepted again.
void CheckJsonRoundTrip(const Env& env, const pb::Descriptor& type, const std::string& bytes,
                        const RequestOptions& options) {
  Require(ParsesAs(env, type, bytes), "transcoded bytes do not parse as their type",
          type.full_name());
  auto json = env.transcoder->ProtoToJson(type, bytes, PrintOptions{});
  if (!json.ok()) return;  // e.g. a FieldMask path protobuf reads but cannot print
  Require(IsValidUtf8(*json), "ProtoToJson wrote invalid UTF-8", *json);
  PrintOptions pretty;
  pretty.add_whitespace = true;
  pretty.preserve_proto_field_names = true;
  pretty.always_print_enums_as_ints = true;
  (void)env.transcoder->ProtoToJson(type, bytes, pretty);
  auto again = env.transcoder->JsonToProto(type, *json, options);
  Require(again.ok() || !absl::StrContains(again.status().message(), "not valid JSON"),
          "ProtoToJson wrote JSON that does not parse", *json);
}

void CheckStatusJson(const std::string& json) {
  Require(IsValidUtf8(json), "StatusToJson wrote invalid UTF-8", json);
  Require(absl::StartsWith(json, "{") && absl::EndsWith(json, "}"),
          "StatusToJson wrote something other than an object", json);
  const std::string array = StreamMessagePrefix(StreamFraming::kJsonArray, 0) + "{}" +
                            StreamClose(StreamFraming::kJsonArray, 1, json);
  Require(absl::StartsWith(array, "[{},{\"error\":") && absl::EndsWith(array, "}]"),
          "a stream closed with an error is not one JSON array", array);
  const std::string sse = StreamClose(StreamFraming::kSse, 1, json);
  Require(absl::StartsWith(sse, "event: error\ndata: ") && absl::EndsWith(sse, "\n\n") &&
              sse.find('\n', 19) == sse.size() - 2,
          "an SSE error event spans more than one data line", sse);
}

void TranscodeRequest(const Env& env, absl::string_view line, absl::string_view body) {
  const size_t space = line.find(' ');
  if (space == absl::string_view::npos) return;
  const absl::string_view method = line.substr(0, space);
  const absl::string_view target = line.substr(space + 1);
  const size_t q = target.find('?');
  const absl::string_view path = target.substr(0, q);
  (void)env.table->PathMatchesAnyMethod(path);
  auto match = env.table->Match(method, path);
  if (!match) return;
  Require(match->binding != nullptr && match->binding->method != nullptr,
          "a match without a binding", target);

  HttpRequestParts parts;
  parts.body = body;
  parts.content_type = "application/json";
  parts.variables = match->variables;
  if (q != absl::string_view::npos) {
    auto query = ParseQueryString(target.substr(q + 1));
    if (!query.ok()) return;
    parts.query = *std::move(query);
  }

  RequestOptions lenient;
  lenient.ignore_unknown_query_parameters = true;
  RequestOptions strict;
  strict.reject_unknown_fields = true;
  strict.reject_unknown_query_parameters = true;
  strict.reject_binding_body_field_collisions = true;
  strict.case_insensitive_enum_parsing = true;
  strict.ignored_query_parameters = {"api_key"};
  const pb::MethodDescriptor& rpc = *match->binding->method;
  for (const RequestOptions* options : {&lenient, &strict}) {
    auto request = env.transcoder->RequestToProto(*match->binding, parts, *options);
    if (request.ok()) {
      CheckJsonRoundTrip(env, *rpc.input_type(), *request, *options);
    } else {
      Require(request.status().code() == absl::StatusCode::kInvalidArgument,
              "a request was refused with a code other than INVALID_ARGUMENT",
              request.status().message());
    }
  }

  // The body as the method's response message.
  auto response =
      env.transcoder->ResponseToHttp(rpc, match->binding, std::string(body), PrintOptions{});
  if (response.ok() && !Transcoder::ReturnsHttpBody(rpc, match->binding)) {
    Require(response->content_type == "application/json", "a JSON response with another type",
            response->content_type);
  }
}

}  // namespace
}  // namespace montage::gateway::transcode

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace montage::gateway::transcode;
  if (size > 64 * 1024) return 0;
  const Env& env = GetEnv();
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t newline = input.find('\n');
  const absl::string_view line = newline == std::string::npos
                                     ? absl::string_view(input)
                                     : absl::string_view(input).substr(0, newline);
  const absl::string_view body = newline == std::string::npos
                                     ? absl::string_view()
                                     : absl::string_view(input).substr(newline + 1);
  TranscodeRequest(env, line, body);

  // The whole input, and the body alone, as JSON of a few types.
  RequestOptions options;
  for (const google::protobuf::Descriptor* type : env.json_types) {
    for (absl::string_view json : {absl::string_view(input), body}) {
      auto bytes = env.transcoder->JsonToProto(*type, json, options);
      if (bytes.ok()) CheckJsonRoundTrip(env, *type, *bytes, options);
    }
  }

  // The input as a google.rpc.Status's message and as grpc-status-details-bin.
  const int code = size > 0 ? data[0] % 17 : 2;
  CheckStatusJson(env.transcoder->StatusToJson(code, line, body));
  CheckStatusJson(env.transcoder->StatusToJson(code, "", input));
  return 0;
}
