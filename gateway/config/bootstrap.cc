// Strict reader of Envoy's v3 bootstrap subset (see bootstrap.h and docs/gateway-config.md).
//
// The YAML is walked once, field by field: every object is first checked against the list of
// fields the subset accepts (so an unknown or misspelt field is an error, never ignored), then its
// fields are read with the proto3-JSON rules Envoy applies (durations "1.5s", integers as numbers
// or strings, wrapper types as plain values). The first error wins and carries the source line and
// the field's path; cross-references (a route's cluster) are checked once everything is read.
#include "gateway/config/bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/utf8.h"
#include "yaml-cpp/yaml.h"

namespace montage::gateway::config {
namespace {

constexpr absl::string_view kHcmFilterName = "envoy.filters.network.http_connection_manager";
constexpr absl::string_view kHcmType =
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
constexpr absl::string_view kTranscoderFilterName = "envoy.filters.http.grpc_json_transcoder";
constexpr absl::string_view kTranscoderType =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder";
constexpr absl::string_view kGrpcWebFilterName = "envoy.filters.http.grpc_web";
constexpr absl::string_view kGrpcWebType =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb";
constexpr absl::string_view kRouterFilterName = "envoy.filters.http.router";
constexpr absl::string_view kRouterType =
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
constexpr absl::string_view kHttpProtocolOptionsKey =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
constexpr absl::string_view kHttpProtocolOptionsType =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
constexpr absl::string_view kTlsSocketName = "envoy.transport_sockets.tls";
constexpr absl::string_view kDownstreamTlsType =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

// retry_on values the gateway implements (HTTP and gRPC conditions of Envoy's router).
constexpr absl::string_view kRetryOn[] = {"5xx",
                                          "gateway-error",
                                          "reset",
                                          "connect-failure",
                                          "retriable-4xx",
                                          "refused-stream",
                                          "retriable-status-codes",
                                          "cancelled",
                                          "deadline-exceeded",
                                          "internal",
                                          "resource-exhausted",
                                          "unavailable"};

// proto3 JSON's largest Duration (10,000 years).
constexpr int64_t kMaxDurationSeconds = 315576000000;

// A YAML value and where it sits: its field path for messages and a position for the line.
struct Value {
  YAML::Node node;
  std::string path;  // "static_resources.clusters[1].name"; empty for the document itself
  YAML::Mark mark;   // of the value, or of its key when the value has no position of its own
};

// "12:7": yaml-cpp counts from 0, editors from 1.
std::string MarkText(const YAML::Mark& mark) {
  if (mark.is_null()) return "1:1";
  return absl::StrCat(mark.line + 1, ":", mark.column + 1);
}

std::string ChildPath(absl::string_view parent, absl::string_view key) {
  return parent.empty() ? std::string(key) : absl::StrCat(parent, ".", key);
}

// "a list", "'abc'" — what was found, for "expected X, got Y".
std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Scalar: {
      const std::string& text = node.Scalar();
      if (text.size() > 60) return absl::StrCat("'", Utf8Prefix(text, 57), "...'");
      return absl::StrCat("'", text, "'");
    }
    default:
      return "nothing";
  }
}

bool IsIpLiteral(const std::string& address) {
  in_addr v4;
  in6_addr v6;
  return inet_pton(AF_INET, address.c_str(), &v4) == 1 ||
         inet_pton(AF_INET6, address.c_str(), &v6) == 1;
}

// A DNS name as container runtimes hand them out: letters, digits, '-', '_' and dots.
bool IsHostName(absl::string_view name) {
  if (name.empty() || name.size() > 253 || name.front() == '.' || name.front() == '-') {
    return false;
  }
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return true;
}

template <typename E>
struct EnumName {
  absl::string_view name;
  E value;
};

enum class DurationRule { kNonNegative, kPositive };

// Where a port may be 0 (listeners and admin bind any free port) and whether names may be DNS.
enum class AddressUse { kBind, kStaticEndpoint, kDnsEndpoint };

// A route's cluster, checked against the clusters once all are read.
struct ClusterRef {
  std::string name;
  Value at;
};

// Reads one document. Not thread-safe; one per parse.
class Parser {
 public:
  explicit Parser(absl::string_view source) : source_(source) {}

  absl::StatusOr<Bootstrap> Parse(const YAML::Node& root) {
    Bootstrap bootstrap;
    Value top{root, "", root.Mark()};
    if (top.mark.is_null()) top.mark = YAML::Mark();
    if (!ReadBootstrap(top, &bootstrap)) return status_;
    return bootstrap;
  }

  const absl::Status& status() const { return status_; }

  bool FailAt(const YAML::Mark& mark, absl::string_view path, absl::string_view message) {
    if (status_.ok()) {
      status_ = absl::InvalidArgumentError(absl::StrCat(
          source_, ":", MarkText(mark), ": ", path.empty() ? "bootstrap" : path, ": ", message));
    }
    return false;
  }
  bool Fail(const Value& at, absl::string_view message) {
    return FailAt(at.mark, at.path, message);
  }

 private:
  // ---- objects -------------------------------------------------------------------------------

  // Checks that `v` is a map whose keys are all in `accepted`, each given once and with a value.
  // `refused` gives a reason for fields Envoy has but the subset leaves out on purpose.
  bool CheckObject(
      const Value& v, std::initializer_list<absl::string_view> accepted,
      std::initializer_list<std::pair<absl::string_view, absl::string_view>> refused = {}) {
    if (!v.node.IsMap()) return Fail(v, absl::StrCat("expected a map, got ", Describe(v.node)));
    const std::string accepted_list =
        accepted.size() == 0
            ? std::string("no fields; write {}")
            : absl::StrCat("montage's gateway accepts: ", absl::StrJoin(accepted, ", "));
    std::set<std::string> seen;
    for (const auto& kv : v.node) {
      YAML::Mark key_mark = kv.first.Mark();
      if (!kv.first.IsScalar()) {
        return FailAt(key_mark, v.path, "field names must be plain strings");
      }
      const std::string& key = kv.first.Scalar();
      bool known = false;
      for (absl::string_view a : accepted) known = known || a == key;
      if (!known) {
        for (const auto& [name, reason] : refused) {
          if (name == key) {
            return FailAt(key_mark, v.path,
                          absl::StrCat("field '", key, "' is not supported: ", reason, " (",
                                       accepted_list, ")"));
          }
        }
        return FailAt(key_mark, v.path,
                      absl::StrCat("unknown field '", key, "' (", accepted_list, ")"));
      }
      if (!seen.insert(key).second) {
        return FailAt(key_mark, ChildPath(v.path, key), "field given twice");
      }
      if (kv.second.IsNull()) {
        // proto3 JSON would read null as "unset", which silently drops e.g. an intended
        // `http2_protocol_options:`; an explicit {} says what is meant.
        return FailAt(key_mark, ChildPath(v.path, key),
                      "has no value (write {} for an empty object, or remove the field)");
      }
    }
    return true;
  }

  // The field `key` of a checked map, if present.
  std::optional<Value> Field(const Value& obj, absl::string_view key) {
    for (const auto& kv : obj.node) {
      if (kv.first.IsScalar() && kv.first.Scalar() == key) {
        YAML::Mark mark = kv.second.Mark();
        if (mark.is_null()) mark = kv.first.Mark();
        return Value{kv.second, ChildPath(obj.path, key), mark};
      }
    }
    return std::nullopt;
  }

  bool Required(const Value& obj, absl::string_view key, Value* out) {
    std::optional<Value> v = Field(obj, key);
    if (!v) return FailAt(obj.mark, ChildPath(obj.path, key), "required field is missing");
    *out = *std::move(v);
    return true;
  }

  // At most one of `keys` may be present; `*which` is the one found (empty when none).
  bool OneOf(const Value& obj, std::initializer_list<absl::string_view> keys, std::string* which) {
    which->clear();
    for (absl::string_view key : keys) {
      std::optional<Value> v = Field(obj, key);
      if (!v) continue;
      if (!which->empty()) {
        return Fail(*v, absl::StrCat("only one of ", absl::StrJoin(keys, ", "),
                                     " may be given (found '", *which, "' and '", key, "')"));
      }
      *which = std::string(key);
    }
    return true;
  }

  template <typename Fn>
  bool ForEach(const Value& list, Fn&& fn) {
    if (!list.node.IsSequence()) {
      return Fail(list, absl::StrCat("expected a list, got ", Describe(list.node)));
    }
    for (std::size_t i = 0; i < list.node.size(); ++i) {
      YAML::Node item = list.node[i];
      Value v{item, absl::StrCat(list.path, "[", i, "]"), item.Mark()};
      if (v.mark.is_null()) v.mark = list.mark;
      if (!fn(v, i)) return false;
    }
    return true;
  }

  // Checks typed_config["@type"] is `expected`; `what` names the extension in the message.
  bool CheckTypeUrl(const Value& typed_config, absl::string_view expected, absl::string_view what) {
    if (!typed_config.node.IsMap()) {
      return Fail(typed_config, absl::StrCat("expected a map, got ", Describe(typed_config.node)));
    }
    std::optional<Value> type = Field(typed_config, "@type");
    if (!type) {
      return Fail(typed_config,
                  absl::StrCat("\"@type\" is missing; ", what, " needs \"@type\": ", expected));
    }
    std::string url;
    if (!ReadString(*type, &url)) return false;
    if (url != expected) {
      return Fail(*type, absl::StrCat(what, " needs \"@type\": ", expected, ", got '", url, "'"));
    }
    return true;
  }

  // ---- scalars -------------------------------------------------------------------------------

  bool ReadString(const Value& v, std::string* out) {
    if (!v.node.IsScalar()) {
      return Fail(v, absl::StrCat("expected a string, got ", Describe(v.node)));
    }
    *out = v.node.Scalar();
    return true;
  }

  bool ReadNonEmptyString(const Value& v, std::string* out) {
    if (!ReadString(v, out)) return false;
    if (out->empty()) return Fail(v, "must not be empty");
    return true;
  }

  // proto3 JSON booleans are true and false only (no "yes", no quoted strings).
  bool ReadBool(const Value& v, bool* out) {
    if (v.node.IsScalar() && v.node.Tag() != "!") {
      if (v.node.Scalar() == "true") {
        *out = true;
        return true;
      }
      if (v.node.Scalar() == "false") {
        *out = false;
        return true;
      }
    }
    return Fail(v, absl::StrCat("expected true or false, got ", Describe(v.node)));
  }

  // uint32 and UInt32Value: a number or a string of decimal digits, as proto3 JSON allows.
  bool ReadUint32(const Value& v, uint32_t* out, uint32_t min = 0,
                  uint32_t max = std::numeric_limits<uint32_t>::max()) {
    const std::string text = v.node.IsScalar() ? v.node.Scalar() : std::string();
    uint64_t value = 0;
    const bool digits = !text.empty() && text.size() <= 19 &&
                        text.find_first_not_of("0123456789") == std::string::npos &&
                        absl::SimpleAtoi(text, &value);
    if (!digits) {
      return Fail(v, absl::StrCat("expected an unsigned integer, got ", Describe(v.node)));
    }
    if (value < min || value > max) {
      return Fail(v, absl::StrCat("must be between ", min, " and ", max, ", got ", value));
    }
    *out = static_cast<uint32_t>(value);
    return true;
  }

  bool ReadDouble(const Value& v, double* out, double min, double max) {
    double value = 0;
    if (!v.node.IsScalar() || !absl::SimpleAtod(v.node.Scalar(), &value) ||
        v.node.Scalar().find_first_not_of("0123456789.+-eE") != std::string::npos) {
      return Fail(v, absl::StrCat("expected a number, got ", Describe(v.node)));
    }
    if (!(value >= min && value <= max)) {
      return Fail(v,
                  absl::StrCat("must be between ", min, " and ", max, ", got ", v.node.Scalar()));
    }
    *out = value;
    return true;
  }

  // google.protobuf.Duration in proto3 JSON: seconds with up to nine decimals and an "s".
  bool ReadDuration(const Value& v, absl::Duration* out, DurationRule rule) {
    const std::string text = v.node.IsScalar() ? v.node.Scalar() : std::string();
    const auto bad = [&] {
      return Fail(v, absl::StrCat("expected a duration in seconds with an 's' suffix, as proto3 "
                                  "JSON writes it (\"15s\", \"0.25s\", \"0s\"), got ",
                                  Describe(v.node)));
    };
    absl::string_view rest = text;
    if (absl::ConsumePrefix(&rest, "-")) {
      if (!rest.empty() && absl::EndsWith(rest, "s")) return Fail(v, "must not be negative");
      return bad();
    }
    if (!absl::ConsumeSuffix(&rest, "s") || rest.empty()) return bad();
    const std::size_t dot = rest.find('.');
    absl::string_view whole = rest.substr(0, dot);
    absl::string_view fraction =
        dot == absl::string_view::npos ? absl::string_view() : rest.substr(dot + 1);
    const auto all_digits = [](absl::string_view s) {
      return !s.empty() && s.find_first_not_of("0123456789") == absl::string_view::npos;
    };
    if (!all_digits(whole) || (dot != absl::string_view::npos && !all_digits(fraction)) ||
        fraction.size() > 9 || whole.size() > 12) {
      return bad();
    }
    int64_t seconds = 0;
    if (!absl::SimpleAtoi(whole, &seconds) || seconds > kMaxDurationSeconds) {
      return Fail(
          v, absl::StrCat("is longer than proto3's largest duration (", kMaxDurationSeconds, "s)"));
    }
    int64_t nanos = 0;
    if (!fraction.empty()) {
      std::string padded(fraction);
      padded.resize(9, '0');
      absl::SimpleAtoi(padded, &nanos);
    }
    const absl::Duration d = absl::Seconds(seconds) + absl::Nanoseconds(nanos);
    if (rule == DurationRule::kPositive && d <= absl::ZeroDuration()) {
      return Fail(v, "must be greater than 0s");
    }
    *out = d;
    return true;
  }

  template <typename E>
  bool ReadEnum(const Value& v, std::initializer_list<EnumName<E>> supported,
                std::initializer_list<absl::string_view> envoy_only, E* out) {
    std::string name;
    if (!v.node.IsScalar()) {
      return Fail(v, absl::StrCat("expected an enum name, got ", Describe(v.node)));
    }
    name = v.node.Scalar();
    std::vector<absl::string_view> names;
    for (const EnumName<E>& e : supported) {
      if (e.name == name) {
        *out = e.value;
        return true;
      }
      names.push_back(e.name);
    }
    const std::string list = absl::StrJoin(names, ", ");
    for (absl::string_view other : envoy_only) {
      if (other == name) {
        return Fail(v, absl::StrCat(
                           name, " is not supported by montage's gateway (supported: ", list, ")"));
      }
    }
    return Fail(v, absl::StrCat("unknown value '", name, "' (supported: ", list, ")"));
  }

  bool ReadStringList(const Value& v, std::vector<std::string>* out) {
    out->clear();
    return ForEach(v, [&](const Value& item, std::size_t) {
      std::string s;
      if (!ReadString(item, &s)) return false;
      out->push_back(std::move(s));
      return true;
    });
  }

  // ---- optional fields: absent leaves `*out` (the default) alone ----------------------------

  bool OptString(const Value& obj, absl::string_view key, std::string* out) {
    std::optional<Value> v = Field(obj, key);
    return !v || ReadString(*v, out);
  }
  bool OptBool(const Value& obj, absl::string_view key, bool* out) {
    std::optional<Value> v = Field(obj, key);
    return !v || ReadBool(*v, out);
  }
  bool OptUint32(const Value& obj, absl::string_view key, uint32_t* out, uint32_t min = 0,
                 uint32_t max = std::numeric_limits<uint32_t>::max()) {
    std::optional<Value> v = Field(obj, key);
    return !v || ReadUint32(*v, out, min, max);
  }
  bool OptUint32(const Value& obj, absl::string_view key, std::optional<uint32_t>* out,
                 uint32_t min = 0, uint32_t max = std::numeric_limits<uint32_t>::max()) {
    std::optional<Value> v = Field(obj, key);
    if (!v) return true;
    uint32_t value = 0;
    if (!ReadUint32(*v, &value, min, max)) return false;
    *out = value;
    return true;
  }
  bool OptDuration(const Value& obj, absl::string_view key, absl::Duration* out,
                   DurationRule rule) {
    std::optional<Value> v = Field(obj, key);
    return !v || ReadDuration(*v, out, rule);
  }
  bool OptDuration(const Value& obj, absl::string_view key, std::optional<absl::Duration>* out,
                   DurationRule rule) {
    std::optional<Value> v = Field(obj, key);
    if (!v) return true;
    absl::Duration d;
    if (!ReadDuration(*v, &d, rule)) return false;
    *out = d;
    return true;
  }
  bool OptStringList(const Value& obj, absl::string_view key, std::vector<std::string>* out) {
    std::optional<Value> v = Field(obj, key);
    return !v || ReadStringList(*v, out);
  }

  // ---- bootstrap -----------------------------------------------------------------------------

  bool ReadBootstrap(const Value& root, Bootstrap* out) {
    if (!CheckObject(
            root, {"node", "admin", "static_resources"},
            {{"dynamic_resources", "montage's gateway reads static_resources only (no xDS)"},
             {"layered_runtime", "runtime overrides are not supported"}})) {
      return false;
    }
    if (std::optional<Value> node = Field(root, "node")) {
      if (!CheckObject(*node, {"id", "cluster"}) || !OptString(*node, "id", &out->node_id) ||
          !OptString(*node, "cluster", &out->node_cluster)) {
        return false;
      }
    }
    if (std::optional<Value> admin = Field(root, "admin")) {
      static constexpr absl::string_view kAdminLog =
          "montage's gateway logs admin requests through its own logging";
      if (!CheckObject(*admin, {"address"},
                       {{"access_log", kAdminLog}, {"access_log_path", kAdminLog}})) {
        return false;
      }
      Value address;
      Admin parsed;
      if (!Required(*admin, "address", &address) ||
          !ReadAddress(address, AddressUse::kBind, &parsed.address)) {
        return false;
      }
      out->admin = std::move(parsed);
    }
    if (std::optional<Value> resources = Field(root, "static_resources")) {
      if (!CheckObject(
              *resources, {"listeners", "clusters"},
              {{"secrets", "name certificate files in the listener's DownstreamTlsContext"}})) {
        return false;
      }
      if (std::optional<Value> listeners = Field(*resources, "listeners")) {
        std::map<std::string, int> names;
        std::map<std::pair<std::string, uint32_t>, std::string> addresses;
        if (!ForEach(*listeners, [&](const Value& v, std::size_t) {
              Listener listener;
              if (!ReadListener(v, &listener)) return false;
              auto [it, fresh] = names.emplace(listener.name, listener.location.line);
              if (!fresh) {
                return Fail(*Field(v, "name"),
                            absl::StrCat("duplicate listener name '", listener.name,
                                         "' (first at line ", it->second, ")"));
              }
              if (listener.address.port_value != 0) {
                auto [at, unused] = addresses.emplace(
                    std::make_pair(listener.address.address, listener.address.port_value),
                    listener.name);
                if (at->second != listener.name) {
                  return Fail(
                      *Field(v, "address"),
                      absl::StrCat("listener '", listener.name, "' binds ",
                                   listener.address.address, ":", listener.address.port_value,
                                   " like listener '", at->second, "'"));
                }
              }
              out->listeners.push_back(std::move(listener));
              return true;
            })) {
          return false;
        }
      }
      if (std::optional<Value> clusters = Field(*resources, "clusters")) {
        std::map<std::string, int> names;
        if (!ForEach(*clusters, [&](const Value& v, std::size_t) {
              Cluster cluster;
              if (!ReadCluster(v, &cluster)) return false;
              auto [it, fresh] = names.emplace(cluster.name, cluster.location.line);
              if (!fresh) {
                return Fail(*Field(v, "name"),
                            absl::StrCat("duplicate cluster name '", cluster.name,
                                         "' (first at line ", it->second, ")"));
              }
              out->clusters.push_back(std::move(cluster));
              return true;
            })) {
          return false;
        }
      }
    }
    // Routes may name clusters defined after them, so they are resolved last.
    std::set<std::string> cluster_names;
    for (const Cluster& c : out->clusters) cluster_names.insert(c.name);
    for (const ClusterRef& ref : cluster_refs_) {
      if (cluster_names.count(ref.name) == 0) {
        std::vector<std::string> known(cluster_names.begin(), cluster_names.end());
        return Fail(ref.at, absl::StrCat("unknown cluster '", ref.name, "' (defined clusters: ",
                                         known.empty() ? "none" : absl::StrJoin(known, ", "), ")"));
      }
    }
    return true;
  }

  SourceLocation LocationOf(const Value& v) {
    if (v.mark.is_null()) return SourceLocation{};
    return SourceLocation{v.mark.line + 1, v.mark.column + 1};
  }

  // config.core.v3.Address with a socket_address.
  bool ReadAddress(const Value& v, AddressUse use, SocketAddress* out) {
    if (!CheckObject(v, {"socket_address"},
                     {{"pipe", "Unix domain sockets are not supported"},
                      {"envoy_internal_address", "internal listeners are not supported"}})) {
      return false;
    }
    Value socket;
    if (!Required(v, "socket_address", &socket)) return false;
    if (!CheckObject(socket, {"address", "port_value", "protocol"},
                     {{"named_port", "give the port as port_value"}})) {
      return false;
    }
    Value address;
    Value port;
    if (!Required(socket, "address", &address) || !ReadNonEmptyString(address, &out->address) ||
        !Required(socket, "port_value", &port) ||
        !ReadUint32(port, &out->port_value, use == AddressUse::kBind ? 0 : 1, 65535)) {
      return false;
    }
    if (std::optional<Value> protocol = Field(socket, "protocol")) {
      int tcp = 0;
      if (!ReadEnum<int>(*protocol, {{"TCP", 0}}, {"UDP"}, &tcp)) return false;
    }
    switch (use) {
      case AddressUse::kBind:
        if (!IsIpLiteral(out->address)) {
          return Fail(address, absl::StrCat("a listening address must be an IP literal such as "
                                            "0.0.0.0 or ::, got '",
                                            out->address, "'"));
        }
        break;
      case AddressUse::kStaticEndpoint:
        if (!IsIpLiteral(out->address)) {
          return Fail(address, absl::StrCat("a STATIC cluster needs IP literals; '", out->address,
                                            "' is a host name (use type: STRICT_DNS)"));
        }
        break;
      case AddressUse::kDnsEndpoint:
        if (!IsIpLiteral(out->address) && !IsHostName(out->address)) {
          return Fail(address,
                      absl::StrCat("'", out->address, "' is neither an IP nor a host name"));
        }
        break;
    }
    return true;
  }

  // ---- listeners -----------------------------------------------------------------------------

  bool ReadListener(const Value& v, Listener* out) {
    if (!CheckObject(v, {"name", "address", "filter_chains"},
                     {{"listener_filters", "listener filters are not supported"},
                      {"default_filter_chain", "give the one filter chain in filter_chains"}})) {
      return false;
    }
    out->location = LocationOf(v);
    Value name;
    Value address;
    Value chains;
    if (!Required(v, "name", &name) || !ReadNonEmptyString(name, &out->name) ||
        !Required(v, "address", &address) ||
        !ReadAddress(address, AddressUse::kBind, &out->address) ||
        !Required(v, "filter_chains", &chains)) {
      return false;
    }
    if (!chains.node.IsSequence()) {
      return Fail(chains, absl::StrCat("expected a list, got ", Describe(chains.node)));
    }
    if (chains.node.size() == 0) return Fail(chains, "a listener needs one filter chain");
    if (chains.node.size() > 1) {
      Value second{chains.node[1], chains.path + "[1]", chains.node[1].Mark()};
      return Fail(second,
                  absl::StrCat("montage's gateway supports exactly one filter chain per listener "
                               "(found ",
                               chains.node.size(), "); use one listener per chain"));
    }
    return ForEach(chains,
                   [&](const Value& chain, std::size_t) { return ReadFilterChain(chain, out); });
  }

  bool ReadFilterChain(const Value& v, Listener* out) {
    if (!CheckObject(v, {"filters", "transport_socket"},
                     {{"filter_chain_match",
                       "there is one filter chain per listener, so nothing "
                       "to match"}})) {
      return false;
    }
    Value filters;
    if (!Required(v, "filters", &filters)) return false;
    if (!filters.node.IsSequence()) {
      return Fail(filters, absl::StrCat("expected a list, got ", Describe(filters.node)));
    }
    if (filters.node.size() != 1) {
      return Fail(filters,
                  absl::StrCat("montage's gateway supports exactly one network filter, the ",
                               kHcmFilterName, " (found ", filters.node.size(), ")"));
    }
    if (!ForEach(filters, [&](const Value& filter, std::size_t) {
          if (!CheckObject(filter, {"name", "typed_config"})) return false;
          Value name;
          Value typed_config;
          std::string filter_name;
          if (!Required(filter, "name", &name) || !ReadNonEmptyString(name, &filter_name) ||
              !Required(filter, "typed_config", &typed_config) ||
              !CheckTypeUrl(
                  typed_config, kHcmType,
                  absl::StrCat("network filter '", filter_name,
                               "' (montage's gateway supports only ", kHcmFilterName, ")"))) {
            return false;
          }
          return ReadHttpConnectionManager(typed_config, &out->http);
        })) {
      return false;
    }
    if (std::optional<Value> socket = Field(v, "transport_socket")) {
      DownstreamTls tls;
      if (!ReadDownstreamTls(*socket, &tls)) return false;
      out->tls = std::move(tls);
    }
    return true;
  }

  bool ReadDownstreamTls(const Value& socket, DownstreamTls* out) {
    if (!CheckObject(socket, {"name", "typed_config"})) return false;
    Value name;
    Value typed_config;
    std::string socket_name;
    if (!Required(socket, "name", &name) || !ReadString(name, &socket_name)) return false;
    if (socket_name != kTlsSocketName) {
      return Fail(name, absl::StrCat("transport socket '", socket_name,
                                     "' is not supported (montage's gateway supports ",
                                     kTlsSocketName, ")"));
    }
    if (!Required(socket, "typed_config", &typed_config) ||
        !CheckTypeUrl(typed_config, kDownstreamTlsType, kTlsSocketName) ||
        !CheckObject(typed_config, {"@type", "common_tls_context"},
                     {{"require_client_certificate", "client certificates are not supported"}})) {
      return false;
    }
    Value common;
    if (!Required(typed_config, "common_tls_context", &common) ||
        !CheckObject(common, {"tls_certificates", "alpn_protocols"},
                     {{"tls_certificate_sds_secret_configs", "SDS is not supported"},
                      {"validation_context", "client certificates are not supported"}}) ||
        !OptStringList(common, "alpn_protocols", &out->alpn_protocols)) {
      return false;
    }
    Value certificates;
    if (!Required(common, "tls_certificates", &certificates)) return false;
    if (!certificates.node.IsSequence() || certificates.node.size() != 1) {
      return Fail(certificates, "montage's gateway takes exactly one certificate (a list of one)");
    }
    return ForEach(certificates, [&](const Value& cert, std::size_t) {
      if (!CheckObject(cert, {"certificate_chain", "private_key"})) return false;
      Value chain;
      Value key;
      return Required(cert, "certificate_chain", &chain) &&
             ReadDataSourceFile(chain, &out->certificate_chain_file) &&
             Required(cert, "private_key", &key) && ReadDataSourceFile(key, &out->private_key_file);
    });
  }

  // config.core.v3.DataSource, files only: keys never sit inline in the config.
  bool ReadDataSourceFile(const Value& v, std::string* out) {
    static constexpr absl::string_view kFilesOnly =
        "montage's gateway reads files only; use filename";
    if (!CheckObject(v, {"filename"},
                     {{"inline_string", kFilesOnly},
                      {"inline_bytes", kFilesOnly},
                      {"environment_variable", kFilesOnly}})) {
      return false;
    }
    Value filename;
    return Required(v, "filename", &filename) && ReadNonEmptyString(filename, out);
  }

  // ---- http_connection_manager ---------------------------------------------------------------

  bool ReadHttpConnectionManager(const Value& v, HttpConnectionManager* out) {
    if (!CheckObject(
            v,
            {"@type", "stat_prefix", "codec_type", "route_config", "http_filters",
             "stream_idle_timeout", "request_timeout", "common_http_protocol_options",
             "max_request_headers_kb", "use_remote_address", "xff_num_trusted_hops",
             "generate_request_id", "preserve_external_request_id", "http2_protocol_options"},
            {{"rds", "give the routes inline in route_config (no RDS)"},
             {"scoped_routes", "give the routes inline in route_config"}})) {
      return false;
    }
    Value stat_prefix;
    if (!Required(v, "stat_prefix", &stat_prefix) ||
        !ReadNonEmptyString(stat_prefix, &out->stat_prefix)) {
      return false;
    }
    if (std::optional<Value> codec = Field(v, "codec_type")) {
      using C = HttpConnectionManager::CodecType;
      if (!ReadEnum<C>(*codec, {{"AUTO", C::kAuto}, {"HTTP1", C::kHttp1}, {"HTTP2", C::kHttp2}},
                       {"HTTP3"}, &out->codec_type)) {
        return false;
      }
    }
    if (!OptDuration(v, "stream_idle_timeout", &out->stream_idle_timeout,
                     DurationRule::kNonNegative) ||
        !OptDuration(v, "request_timeout", &out->request_timeout, DurationRule::kNonNegative) ||
        !OptUint32(v, "max_request_headers_kb", &out->max_request_headers_kb, 1, 8192) ||
        !OptBool(v, "use_remote_address", &out->use_remote_address) ||
        !OptUint32(v, "xff_num_trusted_hops", &out->xff_num_trusted_hops) ||
        !OptBool(v, "generate_request_id", &out->generate_request_id) ||
        !OptBool(v, "preserve_external_request_id", &out->preserve_external_request_id)) {
      return false;
    }
    if (std::optional<Value> common = Field(v, "common_http_protocol_options")) {
      if (!CheckObject(*common, {"idle_timeout"}) ||
          !OptDuration(*common, "idle_timeout", &out->idle_timeout, DurationRule::kNonNegative)) {
        return false;
      }
    }
    if (std::optional<Value> h2 = Field(v, "http2_protocol_options")) {
      if (!ReadHttp2Options(*h2, &out->http2_protocol_options)) return false;
    }
    Value route_config;
    if (!Required(v, "route_config", &route_config) ||
        !ReadRouteConfiguration(route_config, &out->route_config)) {
      return false;
    }
    Value filters;
    if (!Required(v, "http_filters", &filters)) return false;
    if (!ForEach(filters, [&](const Value& f, std::size_t) {
          HttpFilter filter;
          if (!ReadHttpFilter(f, &filter)) return false;
          if (!out->http_filters.empty() &&
              out->http_filters.back().type == HttpFilter::Type::kRouter) {
            return Fail(f, absl::StrCat(kRouterFilterName,
                                        " must be the last HTTP filter (Envoy requires the "
                                        "terminal filter last), but '",
                                        filter.name, "' follows it"));
          }
          for (const HttpFilter& earlier : out->http_filters) {
            if (earlier.type == filter.type) {
              return Fail(f, absl::StrCat("a second ", filter.name,
                                          " filter (each filter may appear once)"));
            }
          }
          out->http_filters.push_back(std::move(filter));
          return true;
        })) {
      return false;
    }
    if (out->http_filters.empty()) {
      return Fail(filters, absl::StrCat("needs at least the ", kRouterFilterName,
                                        " filter (Envoy requires a terminal filter)"));
    }
    if (out->http_filters.back().type != HttpFilter::Type::kRouter) {
      const std::size_t last = out->http_filters.size() - 1;
      Value at{filters.node[last], absl::StrCat(filters.path, "[", last, "]"),
               filters.node[last].Mark()};
      return Fail(at, absl::StrCat("the last HTTP filter must be ", kRouterFilterName,
                                   " (Envoy requires a terminal filter), not '",
                                   out->http_filters.back().name, "'"));
    }
    return true;
  }

  // config.core.v3.Http2ProtocolOptions, the fields montage uses (both directions).
  bool ReadHttp2Options(const Value& v, Http2Options* out) {
    if (!CheckObject(v, {"max_concurrent_streams", "initial_stream_window_size",
                         "initial_connection_window_size", "connection_keepalive"})) {
      return false;
    }
    // Ranges from Envoy's validation rules (the window sizes are HTTP/2's own limits).
    if (!OptUint32(v, "max_concurrent_streams", &out->max_concurrent_streams, 1, 2147483647) ||
        !OptUint32(v, "initial_stream_window_size", &out->initial_stream_window_size, 65535,
                   2147483647) ||
        !OptUint32(v, "initial_connection_window_size", &out->initial_connection_window_size, 65535,
                   2147483647)) {
      return false;
    }
    if (std::optional<Value> keepalive = Field(v, "connection_keepalive")) {
      Value timeout;
      absl::Duration d;
      if (!CheckObject(*keepalive, {"interval", "timeout"}) ||
          !OptDuration(*keepalive, "interval", &out->keepalive_interval, DurationRule::kPositive) ||
          !Required(*keepalive, "timeout", &timeout) ||
          !ReadDuration(timeout, &d, DurationRule::kPositive)) {
        return false;
      }
      out->keepalive_timeout = d;
    }
    return true;
  }

  bool ReadRouteConfiguration(const Value& v, RouteConfiguration* out) {
    if (!CheckObject(v, {"name", "virtual_hosts"}) || !OptString(v, "name", &out->name)) {
      return false;
    }
    std::optional<Value> hosts = Field(v, "virtual_hosts");
    if (!hosts) return true;
    std::map<std::string, std::string> domains;  // domain -> virtual host
    std::set<std::string> names;
    return ForEach(*hosts, [&](const Value& h, std::size_t) {
      VirtualHost host;
      if (!ReadVirtualHost(h, &host)) return false;
      if (!names.insert(host.name).second) {
        return Fail(*Field(h, "name"),
                    absl::StrCat("duplicate virtual host name '", host.name, "'"));
      }
      for (const std::string& domain : host.domains) {
        auto [it, fresh] = domains.emplace(absl::AsciiStrToLower(domain), host.name);
        if (!fresh) {
          return Fail(*Field(h, "domains"),
                      absl::StrCat("domain '", domain, "' is already served by virtual host '",
                                   it->second, "'"));
        }
      }
      out->virtual_hosts.push_back(std::move(host));
      return true;
    });
  }

  bool ReadVirtualHost(const Value& v, VirtualHost* out) {
    if (!CheckObject(v, {"name", "domains", "routes"})) return false;
    Value name;
    Value domains;
    if (!Required(v, "name", &name) || !ReadNonEmptyString(name, &out->name) ||
        !Required(v, "domains", &domains) || !ReadStringList(domains, &out->domains)) {
      return false;
    }
    if (out->domains.empty()) return Fail(domains, "a virtual host needs at least one domain");
    std::optional<Value> routes = Field(v, "routes");
    if (!routes) return true;
    return ForEach(*routes, [&](const Value& r, std::size_t) {
      Route route;
      if (!ReadRoute(r, &route)) return false;
      out->routes.push_back(std::move(route));
      return true;
    });
  }

  bool ReadRoute(const Value& v, Route* out) {
    static constexpr absl::string_view kOnlyRoute =
        "montage's gateway routes to clusters only (a route: action)";
    if (!CheckObject(v, {"name", "match", "route"},
                     {{"direct_response", kOnlyRoute}, {"redirect", kOnlyRoute}})) {
      return false;
    }
    out->location = LocationOf(v);
    Value match;
    Value action;
    return OptString(v, "name", &out->name) && Required(v, "match", &match) &&
           ReadRouteMatch(match, &out->match) && Required(v, "route", &action) &&
           ReadRouteAction(action, &out->route);
  }

  bool ReadRouteMatch(const Value& v, RouteMatch* out) {
    if (!CheckObject(v, {"prefix", "path", "safe_regex", "headers", "grpc"})) return false;
    std::string which;
    if (!OneOf(v, {"prefix", "path", "safe_regex"}, &which)) return false;
    if (which.empty()) {
      return Fail(v, "a route match needs exactly one of prefix, path, safe_regex");
    }
    Value spec = *Field(v, which);
    if (which == "prefix") {
      out->kind = RouteMatch::Kind::kPrefix;
      if (!ReadString(spec, &out->value)) return false;
    } else if (which == "path") {
      out->kind = RouteMatch::Kind::kPath;
      if (!ReadNonEmptyString(spec, &out->value)) return false;
    } else {
      out->kind = RouteMatch::Kind::kSafeRegex;
      if (!ReadRegexMatcher(spec, &out->value)) return false;
    }
    if (std::optional<Value> grpc = Field(v, "grpc")) {
      // GrpcRouteMatchOptions has no fields.
      if (!CheckObject(*grpc, {})) return false;
      out->grpc = true;
    }
    if (std::optional<Value> headers = Field(v, "headers")) {
      return ForEach(*headers, [&](const Value& h, std::size_t) {
        HeaderMatcher matcher;
        if (!ReadHeaderMatcher(h, &matcher)) return false;
        out->headers.push_back(std::move(matcher));
        return true;
      });
    }
    return true;
  }

  // type.matcher.v3.RegexMatcher; RE2 is the only engine, so google_re2 may only be {}.
  bool ReadRegexMatcher(const Value& v, std::string* out) {
    if (!CheckObject(v, {"regex", "google_re2"})) return false;
    if (std::optional<Value> engine = Field(v, "google_re2")) {
      if (!CheckObject(*engine, {})) return false;
    }
    Value regex;
    return Required(v, "regex", &regex) && ReadNonEmptyString(regex, out);
  }

  bool ReadHeaderMatcher(const Value& v, HeaderMatcher* out) {
    if (!CheckObject(v,
                     {"name", "exact_match", "string_match", "present_match", "prefix_match",
                      "suffix_match", "contains_match", "safe_regex_match", "invert_match"},
                     {{"range_match", "match a number with safe_regex_match instead"}})) {
      return false;
    }
    Value name;
    if (!Required(v, "name", &name) || !ReadNonEmptyString(name, &out->name) ||
        !OptBool(v, "invert_match", &out->invert_match)) {
      return false;
    }
    out->name = absl::AsciiStrToLower(out->name);
    std::string which;
    if (!OneOf(v,
               {"exact_match", "string_match", "present_match", "prefix_match", "suffix_match",
                "contains_match", "safe_regex_match"},
               &which)) {
      return false;
    }
    using K = HeaderMatcher::Kind;
    if (which.empty()) {
      out->kind = K::kPresent;  // Envoy: no match kind means "the header is present"
      return true;
    }
    Value spec = *Field(v, which);
    if (which == "present_match") {
      out->kind = K::kPresent;
      return ReadBool(spec, &out->present_match);
    }
    if (which == "safe_regex_match") {
      out->kind = K::kSafeRegex;
      return ReadRegexMatcher(spec, &out->value);
    }
    if (which == "string_match") return ReadStringMatcher(spec, out);
    out->kind = which == "exact_match"    ? K::kExact
                : which == "prefix_match" ? K::kPrefix
                : which == "suffix_match" ? K::kSuffix
                                          : K::kContains;
    // Envoy requires a non-empty value for the deprecated prefix/suffix/contains forms.
    return which == "exact_match" ? ReadString(spec, &out->value)
                                  : ReadNonEmptyString(spec, &out->value);
  }

  // type.matcher.v3.StringMatcher.
  bool ReadStringMatcher(const Value& v, HeaderMatcher* out) {
    if (!CheckObject(v, {"exact", "prefix", "suffix", "contains", "safe_regex"})) return false;
    std::string which;
    if (!OneOf(v, {"exact", "prefix", "suffix", "contains", "safe_regex"}, &which)) return false;
    if (which.empty()) {
      return Fail(v, "a string_match needs one of exact, prefix, suffix, contains, safe_regex");
    }
    Value spec = *Field(v, which);
    using K = HeaderMatcher::Kind;
    if (which == "safe_regex") {
      out->kind = K::kSafeRegex;
      return ReadRegexMatcher(spec, &out->value);
    }
    out->kind = which == "exact"    ? K::kExact
                : which == "prefix" ? K::kPrefix
                : which == "suffix" ? K::kSuffix
                                    : K::kContains;
    return which == "exact" ? ReadString(spec, &out->value) : ReadNonEmptyString(spec, &out->value);
  }

  bool ReadRouteAction(const Value& v, RouteAction* out) {
    static constexpr absl::string_view kOneCluster =
        "montage's gateway routes each route to one named cluster";
    if (!CheckObject(v, {"cluster", "timeout", "retry_policy", "max_stream_duration"},
                     {{"weighted_clusters", kOneCluster}, {"cluster_header", kOneCluster}})) {
      return false;
    }
    Value cluster;
    if (!Required(v, "cluster", &cluster) || !ReadNonEmptyString(cluster, &out->cluster) ||
        !OptDuration(v, "timeout", &out->timeout, DurationRule::kNonNegative)) {
      return false;
    }
    cluster_refs_.push_back(ClusterRef{out->cluster, cluster});
    if (std::optional<Value> retry = Field(v, "retry_policy")) {
      RetryPolicy policy;
      if (!ReadRetryPolicy(*retry, &policy)) return false;
      out->retry_policy = std::move(policy);
    }
    if (std::optional<Value> max = Field(v, "max_stream_duration")) {
      static constexpr absl::string_view kOnlyHeaderMax =
          "only grpc_timeout_header_max is supported";
      if (!CheckObject(*max, {"grpc_timeout_header_max"},
                       {{"max_stream_duration", kOnlyHeaderMax},
                        {"grpc_timeout_header_offset", kOnlyHeaderMax}}) ||
          !OptDuration(*max, "grpc_timeout_header_max", &out->grpc_timeout_header_max,
                       DurationRule::kNonNegative)) {
        return false;
      }
    }
    return true;
  }

  bool ReadRetryPolicy(const Value& v, RetryPolicy* out) {
    if (!CheckObject(v, {"retry_on", "num_retries", "per_try_timeout", "retriable_status_codes",
                         "retry_back_off"})) {
      return false;
    }
    if (std::optional<Value> retry_on = Field(v, "retry_on")) {
      std::string text;
      if (!ReadString(*retry_on, &text)) return false;
      for (absl::string_view part : absl::StrSplit(text, ',')) {
        part = absl::StripAsciiWhitespace(part);
        bool known = false;
        for (absl::string_view k : kRetryOn) known = known || k == part;
        if (!known) {
          return Fail(*retry_on,
                      absl::StrCat("retry condition '", part, "' is not supported (supported: ",
                                   absl::StrJoin(kRetryOn, ", "), ")"));
        }
        out->retry_on.emplace_back(part);
      }
    }
    if (!OptUint32(v, "num_retries", &out->num_retries) ||
        !OptDuration(v, "per_try_timeout", &out->per_try_timeout, DurationRule::kNonNegative)) {
      return false;
    }
    if (std::optional<Value> codes = Field(v, "retriable_status_codes")) {
      if (!ForEach(*codes, [&](const Value& c, std::size_t) {
            uint32_t code = 0;
            if (!ReadUint32(c, &code, 100, 599)) return false;
            out->retriable_status_codes.push_back(code);
            return true;
          })) {
        return false;
      }
    }
    if (std::optional<Value> back_off = Field(v, "retry_back_off")) {
      Value base;
      if (!CheckObject(*back_off, {"base_interval", "max_interval"}) ||
          !Required(*back_off, "base_interval", &base) ||
          !ReadDuration(base, &out->base_interval, DurationRule::kPositive)) {
        return false;
      }
      out->max_interval = 10 * out->base_interval;  // Envoy's default
      if (std::optional<Value> max = Field(*back_off, "max_interval")) {
        if (!ReadDuration(*max, &out->max_interval, DurationRule::kPositive)) return false;
        if (out->max_interval < out->base_interval) {
          return Fail(*max, "must not be less than base_interval");
        }
      }
    }
    return true;
  }

  // ---- HTTP filters --------------------------------------------------------------------------

  bool ReadHttpFilter(const Value& v, HttpFilter* out) {
    static constexpr absl::string_view kNeedsTypedConfig =
        "give the filter's typed_config (Envoy v3 has no untyped config)";
    if (!CheckObject(v, {"name", "typed_config"}, {{"config", kNeedsTypedConfig}})) return false;
    Value name;
    Value typed_config;
    if (!Required(v, "name", &name) || !ReadNonEmptyString(name, &out->name) ||
        !Required(v, "typed_config", &typed_config)) {
      return false;
    }
    struct Known {
      absl::string_view name;
      absl::string_view type_url;
      HttpFilter::Type type;
    };
    static constexpr Known kKnown[] = {
        {kTranscoderFilterName, kTranscoderType, HttpFilter::Type::kGrpcJsonTranscoder},
        {kGrpcWebFilterName, kGrpcWebType, HttpFilter::Type::kGrpcWeb},
        {kRouterFilterName, kRouterType, HttpFilter::Type::kRouter},
    };
    // Envoy picks the extension by the @type; a well-known name must agree with it.
    for (const Known& k : kKnown) {
      if (out->name == k.name) {
        if (!CheckTypeUrl(typed_config, k.type_url, absl::StrCat("HTTP filter '", k.name, "'"))) {
          return false;
        }
      }
    }
    if (!typed_config.node.IsMap()) {
      return Fail(typed_config, absl::StrCat("expected a map, got ", Describe(typed_config.node)));
    }
    std::optional<Value> type = Field(typed_config, "@type");
    if (!type) return Fail(typed_config, "\"@type\" is missing");
    std::string url;
    if (!ReadString(*type, &url)) return false;
    const Known* found = nullptr;
    for (const Known& k : kKnown) {
      if (url == k.type_url) found = &k;
    }
    if (found == nullptr) {
      std::vector<std::string> supported;
      for (const Known& k : kKnown)
        supported.push_back(absl::StrCat(k.name, " (", k.type_url, ")"));
      return Fail(*type, absl::StrCat("HTTP filter type '", url,
                                      "' is not supported (montage's gateway supports: ",
                                      absl::StrJoin(supported, ", "), ")"));
    }
    out->type = found->type;
    switch (out->type) {
      case HttpFilter::Type::kGrpcJsonTranscoder:
        return ReadTranscoder(typed_config, &out->transcoder);
      case HttpFilter::Type::kGrpcWeb:
      case HttpFilter::Type::kRouter:
        return CheckObject(typed_config, {"@type"});
    }
    return true;
  }

  bool ReadTranscoder(const Value& v, GrpcJsonTranscoder* out) {
    if (!CheckObject(
            v,
            {"@type", "proto_descriptor", "services", "print_options", "auto_mapping",
             "match_incoming_request_route", "ignored_query_parameters",
             "ignore_unknown_query_parameters", "convert_grpc_status", "request_validation_options",
             "case_insensitive_enum_parsing", "max_request_body_size", "max_response_body_size"},
            {{"proto_descriptor_bin",
              "write the descriptor set to a file and name it in proto_descriptor"}})) {
      return false;
    }
    Value descriptor;
    if (!Required(v, "proto_descriptor", &descriptor) ||
        !ReadNonEmptyString(descriptor, &out->proto_descriptor) ||
        !OptStringList(v, "services", &out->services) ||
        !OptBool(v, "auto_mapping", &out->auto_mapping) ||
        !OptBool(v, "match_incoming_request_route", &out->match_incoming_request_route) ||
        !OptStringList(v, "ignored_query_parameters", &out->ignored_query_parameters) ||
        !OptBool(v, "ignore_unknown_query_parameters", &out->ignore_unknown_query_parameters) ||
        !OptBool(v, "convert_grpc_status", &out->convert_grpc_status) ||
        !OptBool(v, "case_insensitive_enum_parsing", &out->case_insensitive_enum_parsing) ||
        !OptUint32(v, "max_request_body_size", &out->max_request_body_size, 1) ||
        !OptUint32(v, "max_response_body_size", &out->max_response_body_size, 1)) {
      return false;
    }
    if (std::optional<Value> print = Field(v, "print_options")) {
      GrpcJsonTranscoder::PrintOptions& p = out->print_options;
      if (!CheckObject(*print, {"add_whitespace", "always_print_primitive_fields",
                                "always_print_enums_as_ints", "preserve_proto_field_names",
                                "stream_newline_delimited", "stream_sse_style_delimited"}) ||
          !OptBool(*print, "add_whitespace", &p.add_whitespace) ||
          !OptBool(*print, "always_print_primitive_fields", &p.always_print_primitive_fields) ||
          !OptBool(*print, "always_print_enums_as_ints", &p.always_print_enums_as_ints) ||
          !OptBool(*print, "preserve_proto_field_names", &p.preserve_proto_field_names) ||
          !OptBool(*print, "stream_newline_delimited", &p.stream_newline_delimited) ||
          !OptBool(*print, "stream_sse_style_delimited", &p.stream_sse_style_delimited)) {
        return false;
      }
      if (p.stream_newline_delimited && p.stream_sse_style_delimited) {
        return Fail(*Field(*print, "stream_sse_style_delimited"),
                    "stream_newline_delimited and stream_sse_style_delimited exclude each other");
      }
    }
    if (std::optional<Value> validation = Field(v, "request_validation_options")) {
      GrpcJsonTranscoder::RequestValidationOptions& r = out->request_validation_options;
      if (!CheckObject(*validation, {"reject_unknown_method", "reject_unknown_query_parameters",
                                     "reject_binding_body_field_collisions"}) ||
          !OptBool(*validation, "reject_unknown_method", &r.reject_unknown_method) ||
          !OptBool(*validation, "reject_unknown_query_parameters",
                   &r.reject_unknown_query_parameters) ||
          !OptBool(*validation, "reject_binding_body_field_collisions",
                   &r.reject_binding_body_field_collisions)) {
        return false;
      }
    }
    return true;
  }

  // ---- clusters ------------------------------------------------------------------------------

  bool ReadCluster(const Value& v, Cluster* out) {
    if (!CheckObject(
            v,
            {"name", "type", "lb_policy", "connect_timeout", "dns_refresh_rate",
             "dns_lookup_family", "typed_extension_protocol_options", "http2_protocol_options",
             "load_assignment", "health_checks", "circuit_breakers", "outlier_detection"},
            {{"hosts", "use load_assignment (cluster.hosts is not in the v3 API)"},
             {"transport_socket", "TLS to upstream services is not supported"},
             {"cluster_type", "custom cluster types are not supported"}})) {
      return false;
    }
    out->location = LocationOf(v);
    Value name;
    if (!Required(v, "name", &name) || !ReadNonEmptyString(name, &out->name)) return false;
    if (std::optional<Value> type = Field(v, "type")) {
      using T = Cluster::Type;
      if (!ReadEnum<T>(*type, {{"STATIC", T::kStatic}, {"STRICT_DNS", T::kStrictDns}},
                       {"LOGICAL_DNS", "EDS", "ORIGINAL_DST"}, &out->type)) {
        return false;
      }
    }
    if (std::optional<Value> lb = Field(v, "lb_policy")) {
      using L = Cluster::LbPolicy;
      if (!ReadEnum<L>(
              *lb, {{"ROUND_ROBIN", L::kRoundRobin}, {"LEAST_REQUEST", L::kLeastRequest}},
              {"RING_HASH", "RANDOM", "MAGLEV", "CLUSTER_PROVIDED", "LOAD_BALANCING_POLICY_CONFIG"},
              &out->lb_policy)) {
        return false;
      }
    }
    if (std::optional<Value> family = Field(v, "dns_lookup_family")) {
      using F = Cluster::DnsLookupFamily;
      if (!ReadEnum<F>(*family,
                       {{"AUTO", F::kAuto},
                        {"V4_ONLY", F::kV4Only},
                        {"V6_ONLY", F::kV6Only},
                        {"V4_PREFERRED", F::kV4Preferred},
                        {"ALL", F::kAll}},
                       {}, &out->dns_lookup_family)) {
        return false;
      }
    }
    if (!OptDuration(v, "connect_timeout", &out->connect_timeout, DurationRule::kPositive) ||
        !OptDuration(v, "dns_refresh_rate", &out->dns_refresh_rate, DurationRule::kPositive)) {
      return false;
    }
    if (out->dns_refresh_rate <= absl::Milliseconds(1)) {
      return Fail(*Field(v, "dns_refresh_rate"), "must be greater than 1ms");
    }
    std::optional<Value> typed_options = Field(v, "typed_extension_protocol_options");
    std::optional<Value> legacy_h2 = Field(v, "http2_protocol_options");
    if (typed_options && legacy_h2) {
      return Fail(*legacy_h2, absl::StrCat("give HTTP/2 either here (deprecated) or in "
                                           "typed_extension_protocol_options, not both"));
    }
    if (typed_options && !ReadProtocolOptions(*typed_options, out)) return false;
    if (legacy_h2) {
      out->http2 = true;
      if (!ReadHttp2Options(*legacy_h2, &out->http2_options)) return false;
    }
    if (std::optional<Value> assignment = Field(v, "load_assignment")) {
      if (!ReadLoadAssignment(*assignment, out)) return false;
    }
    if (std::optional<Value> checks = Field(v, "health_checks")) {
      if (!ForEach(*checks, [&](const Value& c, std::size_t) {
            HealthCheck check;
            if (!ReadHealthCheck(c, out->name, &check)) return false;
            if (!out->http2) {
              // As in Envoy: the gRPC health protocol needs an HTTP/2 connection.
              return Fail(*Field(c, "grpc_health_check"),
                          "gRPC health checks need HTTP/2 to the cluster (set "
                          "explicit_http_config.http2_protocol_options in "
                          "typed_extension_protocol_options)");
            }
            out->health_checks.push_back(std::move(check));
            return true;
          })) {
        return false;
      }
    }
    if (std::optional<Value> breakers = Field(v, "circuit_breakers")) {
      if (!ReadCircuitBreakers(*breakers, &out->circuit_breakers)) return false;
    }
    if (std::optional<Value> outlier = Field(v, "outlier_detection")) {
      OutlierDetection detection;
      if (!ReadOutlierDetection(*outlier, &detection)) return false;
      out->outlier_detection = detection;
    }
    return true;
  }

  bool ReadProtocolOptions(const Value& v, Cluster* out) {
    if (!v.node.IsMap()) return Fail(v, absl::StrCat("expected a map, got ", Describe(v.node)));
    for (const auto& kv : v.node) {
      const std::string key = kv.first.IsScalar() ? kv.first.Scalar() : std::string();
      if (key != kHttpProtocolOptionsKey) {
        return FailAt(kv.first.Mark(), v.path,
                      absl::StrCat("unknown protocol options '", key,
                                   "' (montage's gateway accepts: ", kHttpProtocolOptionsKey, ")"));
      }
    }
    if (v.node.size() != 1) {
      return Fail(v, absl::StrCat("expected one entry, ", kHttpProtocolOptionsKey));
    }
    auto entry = v.node.begin();
    Value options{entry->second, absl::StrCat(v.path, "['", kHttpProtocolOptionsKey, "']"),
                  entry->second.Mark()};
    if (options.mark.is_null()) options.mark = entry->first.Mark();
    static constexpr absl::string_view kExplicitOnly =
        "montage's gateway needs the upstream protocol spelled out in explicit_http_config";
    if (!CheckTypeUrl(options, kHttpProtocolOptionsType, kHttpProtocolOptionsKey) ||
        !CheckObject(
            options, {"@type", "explicit_http_config"},
            {{"auto_config", kExplicitOnly}, {"use_downstream_protocol_config", kExplicitOnly}})) {
      return false;
    }
    Value config;
    if (!Required(options, "explicit_http_config", &config) ||
        !CheckObject(config, {"http_protocol_options", "http2_protocol_options"},
                     {{"http3_protocol_options", "HTTP/3 is not supported"}})) {
      return false;
    }
    std::string which;
    if (!OneOf(config, {"http_protocol_options", "http2_protocol_options"}, &which)) return false;
    if (which.empty()) {
      return Fail(config, "needs http_protocol_options or http2_protocol_options");
    }
    Value protocol = *Field(config, which);
    if (which == "http_protocol_options") {
      out->http2 = false;
      return CheckObject(protocol, {});
    }
    out->http2 = true;
    return ReadHttp2Options(protocol, &out->http2_options);
  }

  bool ReadLoadAssignment(const Value& v, Cluster* out) {
    Value cluster_name;
    std::string ignored;
    if (!CheckObject(v, {"cluster_name", "endpoints"},
                     {{"policy", "load balancing policy overrides are not supported"}}) ||
        !Required(v, "cluster_name", &cluster_name) ||
        !ReadNonEmptyString(cluster_name, &ignored)) {
      return false;
    }
    std::optional<Value> endpoints = Field(v, "endpoints");
    if (!endpoints) return true;
    const AddressUse use = out->type == Cluster::Type::kStatic ? AddressUse::kStaticEndpoint
                                                               : AddressUse::kDnsEndpoint;
    return ForEach(*endpoints, [&](const Value& locality, std::size_t) {
      Value lb_endpoints;
      if (!CheckObject(locality, {"lb_endpoints"},
                       {{"locality", "localities are not supported"},
                        {"priority", "priorities are not supported"},
                        {"load_balancing_weight", "weights are not supported"}}) ||
          !Required(locality, "lb_endpoints", &lb_endpoints)) {
        return false;
      }
      return ForEach(lb_endpoints, [&](const Value& lb_endpoint, std::size_t) {
        Value endpoint;
        Value address;
        SocketAddress parsed;
        if (!CheckObject(lb_endpoint, {"endpoint"},
                         {{"load_balancing_weight", "weights are not supported"},
                          {"health_status", "health comes from health_checks"}}) ||
            !Required(lb_endpoint, "endpoint", &endpoint) ||
            !CheckObject(endpoint, {"address"},
                         {{"health_check_config", "health checks use the endpoint's address"},
                          {"hostname", "the address names the host"}}) ||
            !Required(endpoint, "address", &address) || !ReadAddress(address, use, &parsed)) {
          return false;
        }
        out->endpoints.push_back(std::move(parsed));
        return true;
      });
    });
  }

  bool ReadHealthCheck(const Value& v, absl::string_view cluster_name, HealthCheck* out) {
    static constexpr absl::string_view kGrpcOnly =
        "montage's gateway checks health with the gRPC health protocol only (grpc_health_check)";
    if (!CheckObject(v,
                     {"timeout", "interval", "no_traffic_interval", "unhealthy_interval",
                      "healthy_edge_interval", "unhealthy_edge_interval", "unhealthy_threshold",
                      "healthy_threshold", "grpc_health_check"},
                     {{"http_health_check", kGrpcOnly},
                      {"tcp_health_check", kGrpcOnly},
                      {"custom_health_check", kGrpcOnly}})) {
      return false;
    }
    Value timeout;
    Value interval;
    Value unhealthy;
    Value healthy;
    Value grpc;
    if (!Required(v, "timeout", &timeout) ||
        !ReadDuration(timeout, &out->timeout, DurationRule::kPositive) ||
        !Required(v, "interval", &interval) ||
        !ReadDuration(interval, &out->interval, DurationRule::kPositive) ||
        !Required(v, "unhealthy_threshold", &unhealthy) ||
        !ReadUint32(unhealthy, &out->unhealthy_threshold) ||
        !Required(v, "healthy_threshold", &healthy) ||
        !ReadUint32(healthy, &out->healthy_threshold) ||
        !OptDuration(v, "no_traffic_interval", &out->no_traffic_interval,
                     DurationRule::kPositive) ||
        !OptDuration(v, "unhealthy_interval", &out->unhealthy_interval, DurationRule::kPositive) ||
        !OptDuration(v, "healthy_edge_interval", &out->healthy_edge_interval,
                     DurationRule::kPositive) ||
        !OptDuration(v, "unhealthy_edge_interval", &out->unhealthy_edge_interval,
                     DurationRule::kPositive) ||
        !Required(v, "grpc_health_check", &grpc) ||
        !CheckObject(grpc, {"service_name", "authority"}) ||
        !OptString(grpc, "service_name", &out->grpc_service_name) ||
        !OptString(grpc, "authority", &out->grpc_authority)) {
      return false;
    }
    if (out->grpc_authority.empty()) out->grpc_authority = std::string(cluster_name);
    return true;
  }

  bool ReadCircuitBreakers(const Value& v, CircuitBreakerThresholds* out) {
    if (!CheckObject(v, {"thresholds"},
                     {{"per_host_thresholds", "per-host limits are not supported"}})) {
      return false;
    }
    std::optional<Value> thresholds = Field(v, "thresholds");
    if (!thresholds) return true;
    bool have_default = false;
    return ForEach(*thresholds, [&](const Value& t, std::size_t) {
      CircuitBreakerThresholds parsed;
      if (!ReadThresholds(t, &parsed)) return false;
      // As in Envoy, the first entry for a priority wins. The gateway routes everything at the
      // DEFAULT priority, so a HIGH entry is checked but has no effect.
      if (parsed.priority == CircuitBreakerThresholds::Priority::kDefault && !have_default) {
        *out = parsed;
        have_default = true;
      }
      return true;
    });
  }

  bool ReadThresholds(const Value& v, CircuitBreakerThresholds* out) {
    if (!CheckObject(v,
                     {"priority", "max_connections", "max_pending_requests", "max_requests",
                      "max_retries", "retry_budget"},
                     {{"track_remaining", "remaining-capacity stats are not supported"},
                      {"max_connection_pools", "connection pool limits are not supported"}})) {
      return false;
    }
    if (std::optional<Value> priority = Field(v, "priority")) {
      using P = CircuitBreakerThresholds::Priority;
      if (!ReadEnum<P>(*priority, {{"DEFAULT", P::kDefault}, {"HIGH", P::kHigh}}, {},
                       &out->priority)) {
        return false;
      }
    }
    if (!OptUint32(v, "max_connections", &out->max_connections) ||
        !OptUint32(v, "max_pending_requests", &out->max_pending_requests) ||
        !OptUint32(v, "max_requests", &out->max_requests) ||
        !OptUint32(v, "max_retries", &out->max_retries)) {
      return false;
    }
    if (std::optional<Value> budget = Field(v, "retry_budget")) {
      CircuitBreakerThresholds::RetryBudget parsed;
      if (!CheckObject(*budget, {"budget_percent", "min_retry_concurrency"}) ||
          !OptUint32(*budget, "min_retry_concurrency", &parsed.min_retry_concurrency)) {
        return false;
      }
      if (std::optional<Value> percent = Field(*budget, "budget_percent")) {
        // type.v3.Percent is a message: {value: 25.0}.
        Value value;
        if (!CheckObject(*percent, {"value"}) || !Required(*percent, "value", &value) ||
            !ReadDouble(value, &parsed.budget_percent, 0, 100)) {
          return false;
        }
      }
      out->retry_budget = parsed;
    }
    return true;
  }

  bool ReadOutlierDetection(const Value& v, OutlierDetection* out) {
    if (!CheckObject(v, {"consecutive_5xx", "consecutive_gateway_failure", "interval",
                         "base_ejection_time", "max_ejection_time", "max_ejection_percent",
                         "enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure"})) {
      return false;
    }
    if (!OptUint32(v, "consecutive_5xx", &out->consecutive_5xx) ||
        !OptUint32(v, "consecutive_gateway_failure", &out->consecutive_gateway_failure) ||
        !OptDuration(v, "interval", &out->interval, DurationRule::kPositive) ||
        !OptDuration(v, "base_ejection_time", &out->base_ejection_time, DurationRule::kPositive) ||
        !OptDuration(v, "max_ejection_time", &out->max_ejection_time, DurationRule::kPositive) ||
        !OptUint32(v, "max_ejection_percent", &out->max_ejection_percent, 0, 100) ||
        !OptUint32(v, "enforcing_consecutive_5xx", &out->enforcing_consecutive_5xx, 0, 100) ||
        !OptUint32(v, "enforcing_consecutive_gateway_failure",
                   &out->enforcing_consecutive_gateway_failure, 0, 100)) {
      return false;
    }
    if (out->max_ejection_time < out->base_ejection_time) {
      std::optional<Value> at = Field(v, "max_ejection_time");
      return Fail(at ? *at : *Field(v, "base_ejection_time"),
                  "max_ejection_time must not be less than base_ejection_time");
    }
    return true;
  }

  std::string source_;
  absl::Status status_;
  std::vector<ClusterRef> cluster_refs_;
};

}  // namespace

absl::StatusOr<Bootstrap> ParseBootstrap(absl::string_view yaml, absl::string_view source_name) {
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(std::string(yaml));
  } catch (const YAML::Exception& e) {
    // yaml-cpp reports syntax errors by exception; they stop here.
    return absl::InvalidArgumentError(
        absl::StrCat(source_name, ":", MarkText(e.mark), ": invalid YAML: ", e.msg));
  }
  Parser parser(source_name);
  if (documents.empty() || documents[0].IsNull()) {
    parser.FailAt(YAML::Mark(), "", "the document is empty (expected the bootstrap map)");
    return parser.status();
  }
  if (documents.size() > 1) {
    parser.FailAt(documents[1].Mark(), "", "expected one YAML document, found more");
    return parser.status();
  }
  try {
    return parser.Parse(documents[0]);
  } catch (const YAML::Exception& e) {
    // Reading a well-formed tree should not throw; if yaml-cpp does, it is still the input's
    // fault as far as the caller can tell.
    return absl::InvalidArgumentError(
        absl::StrCat(source_name, ":", MarkText(e.mark), ": ", e.msg));
  }
}

absl::StatusOr<Bootstrap> LoadBootstrapFile(const std::string& path) {
  const auto error = [&path](int code, absl::string_view what) {
    const std::string message = absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(code));
    if (code == ENOENT || code == ENOTDIR) return absl::NotFoundError(message);
    if (code == EACCES || code == EPERM) return absl::PermissionDeniedError(message);
    return absl::FailedPreconditionError(message);  // e.g. EISDIR
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return error(errno, "open");
  std::string text;
  char buffer[16384];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int code = errno;
      ::close(fd);
      return error(code, "read");
    }
    if (n == 0) break;
    text.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return ParseBootstrap(text, path);
}

}  // namespace montage::gateway::config
