// REST/JSON ⇄ gRPC transcoding by the google.api.http rules, generic over proto descriptors
// (a descriptor set file or backends' reflection), as Envoy's grpc_json_transcoder does.
//
//   TranscodingTable  every HTTP binding of the services' methods (rules, additional_bindings,
//                     optionally auto_mapping POST /pkg.Service/Method), matched by method+path.
//   Transcoder        request (body JSON + path variables + query parameters) → request proto
//                     bytes; response proto bytes → JSON (print options), raw google.api.HttpBody
//                     or a response_body field; google.rpc.Status → JSON; stream framing.
//
// Both are immutable after construction and thread-safe. The DescriptorPool must outlive them.
#ifndef MONTAGE_GATEWAY_TRANSCODE_TRANSCODER_H_
#define MONTAGE_GATEWAY_TRANSCODE_TRANSCODER_H_

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "gateway/transcode/path_template.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/dynamic_message.h"
#include "google/protobuf/type.pb.h"
#include "google/protobuf/util/type_resolver.h"

namespace montage::gateway::transcode {

// One HTTP binding of a method.
struct HttpBinding {
  const google::protobuf::MethodDescriptor* method = nullptr;
  std::string grpc_path;      // "/montage.cache.v1.CacheService/Get"
  std::string http_method;    // "GET", "POST", ..., or a custom verb's method name
  std::string path;           // the template as written
  std::string body;           // "" (no body), "*" (whole message) or a top-level field name
  std::string response_body;  // "" or a top-level field name
};

struct RouteMatch {
  const HttpBinding* binding = nullptr;
  std::vector<VariableBinding> variables;
};

class TranscodingTable {
 public:
  // `services`: full service names to include; empty means every service in the pool that has
  // at least one google.api.http rule. With `auto_mapping`, every method of those services is
  // also reachable as POST /<package>.<Service>/<Method> with the whole message as the body.
  // INVALID_ARGUMENT for a bad template, a body/response_body naming no field, a path variable
  // bound to a repeated or message field (wrappers, Timestamp, Duration and FieldMask are written
  // as one string, so they count as scalars), two bindings of one HTTP method whose templates
  // match the same paths, or a listed service missing from the pool.
  //
  // A DescriptorPool cannot list its own files, so "every service in the pool" needs the second
  // form, which searches `files` (names as in the descriptor set: "pkg/api.proto") when
  // `services` is empty; the first form answers INVALID_ARGUMENT for an empty `services`.
  static absl::StatusOr<std::unique_ptr<TranscodingTable>> Build(
      const google::protobuf::DescriptorPool& pool, const std::vector<std::string>& services,
      bool auto_mapping);
  static absl::StatusOr<std::unique_ptr<TranscodingTable>> Build(
      const google::protobuf::DescriptorPool& pool, const std::vector<std::string>& services,
      bool auto_mapping, const std::vector<std::string>& files);

  std::optional<RouteMatch> Match(absl::string_view http_method, absl::string_view path) const;
  bool PathMatchesAnyMethod(absl::string_view path) const;
  // By gRPC path "/pkg.Service/Method" (for native gRPC and gRPC-Web), among the table's
  // services; nullptr when unknown.
  const google::protobuf::MethodDescriptor* FindMethod(absl::string_view grpc_path) const;
  const std::vector<std::unique_ptr<HttpBinding>>& bindings() const { return bindings_; }

 private:
  std::vector<std::unique_ptr<HttpBinding>> bindings_;
  PathMatcher matcher_;
  std::vector<const google::protobuf::MethodDescriptor*> methods_;
};

// grpc_json_transcoder's print options.
struct PrintOptions {
  bool add_whitespace = false;
  bool always_print_primitive_fields = false;
  bool always_print_enums_as_ints = false;
  bool preserve_proto_field_names = false;
};

struct RequestOptions {
  // montage's option (off by default, as in Envoy): a JSON body field unknown to the message is
  // INVALID_ARGUMENT instead of being dropped.
  bool reject_unknown_fields = false;
  // Envoy's request_validation_options.reject_unknown_query_parameters, and
  // ignore_unknown_query_parameters / ignored_query_parameters (which win over it, as in Envoy).
  // A query parameter naming no field is INVALID_ARGUMENT unless ignored: Envoy's default
  // passes such a request upstream untranscoded, which montage cannot do for a REST call, so
  // the default and reject_unknown_query_parameters answer alike.
  bool reject_unknown_query_parameters = false;
  bool ignore_unknown_query_parameters = false;
  std::vector<std::string> ignored_query_parameters;
  bool case_insensitive_enum_parsing = false;
  // Path variables and query parameters are applied on top of the body, so they win over it
  // (Envoy lets the body win). With this, a binding whose value differs from what the body set
  // for the same field is INVALID_ARGUMENT instead, as in Envoy.
  bool reject_binding_body_field_collisions = false;
};

struct HttpRequestParts {
  absl::string_view body;          // the raw HTTP request body (may be empty)
  absl::string_view content_type;  // for a google.api.HttpBody body field
  std::vector<VariableBinding> variables;
  std::vector<std::pair<std::string, std::string>> query;  // decoded, in order
};

struct HttpResponseParts {
  std::string content_type;  // "application/json" unless HttpBody says otherwise
  std::string body;
};

class Transcoder {
 public:
  explicit Transcoder(const google::protobuf::DescriptorPool& pool);
  ~Transcoder();

  // The serialized request message. INVALID_ARGUMENT with a message that says what to fix
  // (bad JSON and where, an unknown field when rejected, a query parameter naming no field, a
  // value that does not fit the field's type, a field bound twice).
  absl::StatusOr<std::string> RequestToProto(const HttpBinding& binding,
                                             const HttpRequestParts& request,
                                             const RequestOptions& options) const;
  // A whole JSON request body for `method`'s input (auto_mapping, batch items, gRPC-Web JSON):
  // same errors as above.
  absl::StatusOr<std::string> JsonToProto(const google::protobuf::Descriptor& type,
                                          absl::string_view json,
                                          const RequestOptions& options) const;

  // One response message as HTTP: JSON of the message (or of its response_body field), or the
  // raw data and content type of a google.api.HttpBody. `binding` may be null (auto mapping).
  // INTERNAL when the bytes do not parse as the method's output type.
  absl::StatusOr<HttpResponseParts> ResponseToHttp(const google::protobuf::MethodDescriptor& method,
                                                   const HttpBinding* binding,
                                                   absl::string_view proto_bytes,
                                                   const PrintOptions& options) const;
  // Message bytes of `type` as JSON text.
  absl::StatusOr<std::string> ProtoToJson(const google::protobuf::Descriptor& type,
                                          absl::string_view proto_bytes,
                                          const PrintOptions& options) const;

  // A google.rpc.Status as JSON ({"code":3,"message":"...","details":[{"@type":...}]}), from
  // the serialized status in grpc-status-details-bin when present (details whose types are not
  // in the pool are dropped), else from code and message alone.
  std::string StatusToJson(int code, absl::string_view message,
                           absl::string_view status_details_bin) const;

  // True when `method`'s output type (or its response_body field) is google.api.HttpBody.
  static bool ReturnsHttpBody(const google::protobuf::MethodDescriptor& method,
                              const HttpBinding* binding);

 private:
  const google::protobuf::DescriptorPool& pool_;
  // Builds the messages of pool_'s types; its GetPrototype() is thread-safe.
  std::unique_ptr<google::protobuf::DynamicMessageFactory> factory_;
  // pool_'s types as protobuf's JSON converter wants them, each converted once (protobuf's
  // JsonStringToMessage builds a resolver, and converts every type it meets, on every call).
  // Thread-safe.
  std::unique_ptr<google::protobuf::util::TypeResolver> resolver_;
};

// A TypeResolver that remembers what it resolved (google.protobuf.Type and Enum by type URL).
// Thread-safe.
class CachingTypeResolver final : public google::protobuf::util::TypeResolver {
 public:
  explicit CachingTypeResolver(const google::protobuf::DescriptorPool& pool);
  ~CachingTypeResolver() override;
  google::protobuf::util::Status ResolveMessageType(const std::string& type_url,
                                                    google::protobuf::Type* message_type) override;
  google::protobuf::util::Status ResolveEnumType(const std::string& type_url,
                                                 google::protobuf::Enum* enum_type) override;

 private:
  std::unique_ptr<google::protobuf::util::TypeResolver> inner_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, google::protobuf::Type> types_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, google::protobuf::Enum> enums_ ABSL_GUARDED_BY(mu_);
};

// Framing of a server stream as one HTTP body.
enum class StreamFraming {
  kJsonArray,  // "[" m1 "," m2 "]" (Envoy's default)
  kNdjson,     // m1 "\n" m2 "\n"
  kSse,        // "data: " m1 "\n\n" ...; an error is "event: error\ndata: {...}\n\n"
};
// kNdjson and kSse need each message on one line: print stream messages without
// add_whitespace. (StreamClose takes the line breaks out of the error itself.)
// What to send before message `index` (0-based) in the stream's body.
std::string StreamMessagePrefix(StreamFraming framing, size_t index);
// What to send after the message.
std::string StreamMessageSuffix(StreamFraming framing);
// What closes the body: `messages_sent` messages were sent; `error_json`, when not empty, is a
// google.rpc.Status JSON that arrives as the last element/line/event {"error": <status>}.
std::string StreamClose(StreamFraming framing, size_t messages_sent, absl::string_view error_json);

}  // namespace montage::gateway::transcode

#endif  // MONTAGE_GATEWAY_TRANSCODE_TRANSCODER_H_
