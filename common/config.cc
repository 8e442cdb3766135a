#include "common/config.h"

#include <unistd.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "common/status.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "yaml-cpp/yaml.h"

extern char** environ;

namespace montage::config {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

constexpr absl::string_view kEnvPrefix = "MONTAGE__";

std::string Where(absl::string_view source, const YAML::Mark& mark) {
  if (mark.line < 0) return std::string(source);
  return absl::StrCat(source, ":", mark.line + 1, ":", mark.column + 1);
}

std::string KnownFields(const Descriptor& d) {
  std::vector<std::string> names;
  for (int i = 0; i < d.field_count(); ++i) names.push_back(d.field(i)->name());
  return absl::StrJoin(names, ", ");
}

bool IsDuration(const FieldDescriptor& f) {
  return f.cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE &&
         f.message_type()->full_name() == "google.protobuf.Duration";
}

absl::StatusOr<google::protobuf::Duration> ParseDurationText(absl::string_view text) {
  absl::Duration d;
  if (!absl::ParseDuration(text, &d)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "' is not a duration (use e.g. \"250ms\", \"10s\", \"5m\")"));
  }
  if (d < absl::ZeroDuration()) return absl::InvalidArgumentError("durations must not be negative");
  google::protobuf::Duration out;
  const int64_t nanos = absl::ToInt64Nanoseconds(d);
  out.set_seconds(nanos / 1'000'000'000);
  out.set_nanos(static_cast<int32_t>(nanos % 1'000'000'000));
  return out;
}

// Sets a non-repeated scalar (or Duration) field, or appends to a repeated one, from text.
absl::Status SetScalar(Message& msg, const FieldDescriptor& f, absl::string_view text) {
  const Reflection& r = *msg.GetReflection();
  const bool rep = f.is_repeated();
  const std::string field = f.name();
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", field, "': '", text, "' is not ", what));
  };
  switch (f.cpp_type()) {
    case FieldDescriptor::CPPTYPE_STRING: {
      std::string v(text);
      rep ? r.AddString(&msg, &f, v) : r.SetString(&msg, &f, v);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_BOOL: {
      bool v;
      if (!absl::SimpleAtob(text, &v)) return bad("a boolean (true or false)");
      rep ? r.AddBool(&msg, &f, v) : r.SetBool(&msg, &f, v);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_INT32: {
      int32_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("a 32-bit integer");
      rep ? r.AddInt32(&msg, &f, v) : r.SetInt32(&msg, &f, v);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_INT64: {
      int64_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("an integer");
      rep ? r.AddInt64(&msg, &f, v) : r.SetInt64(&msg, &f, v);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_UINT32: {
      uint32_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("a non-negative 32-bit integer");
      rep ? r.AddUInt32(&msg, &f, v) : r.SetUInt32(&msg, &f, v);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_UINT64: {
      uint64_t v;
      if (absl::EndsWith(f.name(), "_bytes")) {
        auto size = ParseByteSize(text);
        if (!size.ok()) return bad("a size (e.g. 4096, \"512KiB\", \"100MiB\")");
        v = *size;
      } else if (!absl::SimpleAtoi(text, &v)) {
        return bad("a non-negative integer");
      }
      rep ? r.AddUInt64(&msg, &f, v) : r.SetUInt64(&msg, &f, v);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_DOUBLE:
    case FieldDescriptor::CPPTYPE_FLOAT: {
      double v;
      if (!absl::SimpleAtod(text, &v) || !std::isfinite(v)) return bad("a number");
      if (f.cpp_type() == FieldDescriptor::CPPTYPE_FLOAT) {
        rep ? r.AddFloat(&msg, &f, static_cast<float>(v))
            : r.SetFloat(&msg, &f, static_cast<float>(v));
      } else {
        rep ? r.AddDouble(&msg, &f, v) : r.SetDouble(&msg, &f, v);
      }
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_ENUM: {
      const auto* e = f.enum_type();
      const auto* value = e->FindValueByName(absl::AsciiStrToUpper(text));
      if (value == nullptr || value->number() == 0) {
        std::vector<std::string> names;
        for (int i = 1; i < e->value_count(); ++i) {
          names.push_back(absl::AsciiStrToLower(e->value(i)->name()));
        }
        return bad(absl::StrCat("one of: ", absl::StrJoin(names, ", ")));
      }
      rep ? r.AddEnum(&msg, &f, value) : r.SetEnum(&msg, &f, value);
      return absl::OkStatus();
    }
    case FieldDescriptor::CPPTYPE_MESSAGE: {
      if (!IsDuration(f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("field '", field, "' is a section, not a value"));
      }
      auto d = ParseDurationText(text);
      if (!d.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("field '", field, "': ", d.status().message()));
      }
      Message* target = rep ? r.AddMessage(&msg, &f) : r.MutableMessage(&msg, &f);
      target->CopyFrom(*d);
      return absl::OkStatus();
    }
  }
  return absl::InternalError("unhandled field type");
}

absl::Status MergeNode(const YAML::Node& node, absl::string_view source, Message& msg);

// A map<string, V> field from a YAML mapping.
absl::Status MergeMapField(const YAML::Node& node, absl::string_view source, Message& msg,
                           const FieldDescriptor& f) {
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(source, node.Mark()), ": '", f.name(), "' must be a mapping"));
  }
  const Reflection& r = *msg.GetReflection();
  const Descriptor* entry_type = f.message_type();
  const FieldDescriptor* key_field = entry_type->map_key();
  const FieldDescriptor* value_field = entry_type->map_value();
  for (const auto& kv : node) {
    const std::string key = kv.first.as<std::string>();
    // Merge into an existing entry with the same key, so overrides compose.
    Message* entry = nullptr;
    for (int i = 0; i < r.FieldSize(msg, &f); ++i) {
      Message* e = r.MutableRepeatedMessage(&msg, &f, i);
      if (e->GetReflection()->GetString(*e, key_field) == key) entry = e;
    }
    if (entry == nullptr) {
      entry = r.AddMessage(&msg, &f);
      entry->GetReflection()->SetString(entry, key_field, key);
    }
    const Reflection& er = *entry->GetReflection();
    if (value_field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !IsDuration(*value_field)) {
      RETURN_IF_ERROR(MergeNode(kv.second, source, *er.MutableMessage(entry, value_field)));
    } else {
      if (!kv.second.IsScalar()) {
        return absl::InvalidArgumentError(absl::StrCat(Where(source, kv.second.Mark()), ": '",
                                                       f.name(), ".", key, "' must be a value"));
      }
      absl::Status s = SetScalar(*entry, *value_field, kv.second.Scalar());
      if (!s.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(source, kv.second.Mark()), ": ", s.message()));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status MergeNode(const YAML::Node& node, absl::string_view source, Message& msg) {
  const Descriptor& d = *msg.GetDescriptor();
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(absl::StrCat(Where(source, node.Mark()), ": section '",
                                                   d.name(), "' must be a mapping of keys"));
  }
  const Reflection& r = *msg.GetReflection();
  for (const auto& kv : node) {
    if (!kv.first.IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, kv.first.Mark()), ": keys must be plain names"));
    }
    const std::string key = kv.first.Scalar();
    const FieldDescriptor* f = d.FindFieldByName(key);
    if (f == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(Where(source, kv.first.Mark()),
                                                     ": unknown key '", key,
                                                     "' (known here: ", KnownFields(d), ")"));
    }
    const YAML::Node& value = kv.second;
    if (value.IsNull()) continue;
    if (f->is_map()) {
      RETURN_IF_ERROR(MergeMapField(value, source, msg, *f));
      continue;
    }
    const bool is_section = f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !IsDuration(*f);
    if (f->is_repeated()) {
      if (!value.IsSequence()) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(source, value.Mark()), ": '", key, "' must be a list"));
      }
      r.ClearField(&msg, f);
      for (const auto& item : value) {
        if (is_section) {
          RETURN_IF_ERROR(MergeNode(item, source, *r.AddMessage(&msg, f)));
        } else {
          if (!item.IsScalar()) {
            return absl::InvalidArgumentError(
                absl::StrCat(Where(source, item.Mark()), ": items of '", key, "' must be values"));
          }
          absl::Status s = SetScalar(msg, *f, item.Scalar());
          if (!s.ok()) {
            return absl::InvalidArgumentError(
                absl::StrCat(Where(source, item.Mark()), ": ", s.message()));
          }
        }
      }
      continue;
    }
    if (is_section) {
      RETURN_IF_ERROR(MergeNode(value, source, *r.MutableMessage(&msg, f)));
      continue;
    }
    if (!value.IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, value.Mark()), ": '", key, "' must be a single value"));
    }
    absl::Status s = SetScalar(msg, *f, value.Scalar());
    if (!s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(source, value.Mark()), ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

// {keys[i]: {keys[i+1]: ... value}} built inside-out (no node is ever re-assigned).
YAML::Node Nest(const std::vector<std::string>& keys, size_t i, const std::string& value) {
  if (i == keys.size()) return YAML::Node(value);
  YAML::Node node(YAML::NodeType::Map);
  node[keys[i]] = Nest(keys, i + 1, value);
  return node;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return buffer.str();
}

absl::Status CheckAddress(absl::string_view field, absl::string_view address) {
  const size_t colon = address.rfind(':');
  uint32_t port;
  if (colon == absl::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", address, "' is not host:port (e.g. 127.0.0.1:50051)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateGateway(const Config& c) {
  const auto& gateway = c.gateway();
  const size_t colon = gateway.listen().rfind(':');
  int port = -1;
  if (gateway.envoy_bootstrap().empty() &&
      (colon == std::string::npos || colon == 0 ||
       !absl::SimpleAtoi(gateway.listen().substr(colon + 1), &port) || port < 0 || port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("gateway.listen: '", gateway.listen(), "' is not host:port"));
  }
  if (gateway.worker_threads() == 0 || gateway.worker_threads() > 64) {
    return absl::InvalidArgumentError("gateway.worker_threads: must be 1..64");
  }
  if (gateway.max_request_message_bytes() == 0 ||
      gateway.max_request_message_bytes() > (1ull << 30)) {
    return absl::InvalidArgumentError("gateway.max_request_message_bytes: must be 1 B..1 GiB");
  }
  if (gateway.batch_max_concurrency() == 0 || gateway.batch_max_items() == 0 ||
      gateway.batch_max_items() > 100000) {
    return absl::InvalidArgumentError(
        "gateway.batch_max_concurrency and gateway.batch_max_items: must be positive "
        "(batch_max_items at most 100000)");
  }
  for (int i = 0; i < gateway.reflection_size(); ++i) {
    if (gateway.reflection(i).cluster().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("gateway.reflection[", i, "].cluster: name a cluster of the bootstrap"));
    }
  }
  if (gateway.reflection_refresh_interval().seconds() < 1) {
    return absl::InvalidArgumentError("gateway.reflection_refresh_interval: at least 1s");
  }
  return absl::OkStatus();
}

absl::Status ValidateSpeech(const Config& c) {
  const auto& speech = c.speech();
  if (speech.max_text_bytes() == 0 || speech.max_dialogue_lines() == 0 ||
      speech.stream_window_segments() == 0) {
    return absl::InvalidArgumentError(
        "speech: max_text_bytes, max_dialogue_lines and stream_window_segments must be positive");
  }
  if (speech.max_segment_chars() < 40 || speech.max_segment_chars() > 4096) {
    return absl::InvalidArgumentError("speech.max_segment_chars: must be 40..4096");
  }
  if (speech.max_unary_audio_bytes() == 0 ||
      speech.max_unary_audio_bytes() + 4096 > c.server().max_send_message_bytes()) {
    return absl::InvalidArgumentError(
        "speech.max_unary_audio_bytes: must be positive and fit in server.max_send_message_bytes "
        "(less 4KiB for the rest of the answer)");
  }
  if (!speech.engines().contains(speech.default_engine())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "speech.default_engine: '", speech.default_engine(), "' is not a key of speech.engines"));
  }
  for (const auto& [name, engine] : speech.engines()) {
    const std::string field = absl::StrCat("speech.engines.", name);
    switch (engine.kind()) {
      case v1::SpeechEngineConfig::ESPEAK:
        break;
      case v1::SpeechEngineConfig::OPENAI:
        if (engine.base_url().empty() || engine.model().empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat(field, ": an OPENAI engine needs base_url and model"));
        }
        if (engine.max_input_chars() > 100000) {
          return absl::InvalidArgumentError(
              absl::StrCat(field, ".max_input_chars: at most 100000"));
        }
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(field, ".kind: must be ESPEAK or OPENAI"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

Config DefaultConfig() {
  Config c;
  auto* server = c.mutable_server();
  server->set_listen("127.0.0.1:50051");
  server->set_admin_listen("127.0.0.1:9901");
  server->mutable_drain_timeout()->set_seconds(10);
  server->set_max_receive_message_bytes(16ull << 20);
  // Speech answers whole audio files in one message (speech.max_unary_audio_bytes).
  server->set_max_send_message_bytes(40ull << 20);
  server->set_executor_threads(0);

  auto* logging = c.mutable_logging();
  logging->set_level(v1::LoggingConfig::INFO);
  logging->set_format(v1::LoggingConfig::TEXT);

  auto* tracing = c.mutable_tracing();
  tracing->set_exporter(v1::TracingConfig::NONE);
  tracing->set_sample_ratio(1.0);
  tracing->set_ring_buffer_spans(4096);
  tracing->mutable_export_interval()->set_seconds(1);
  tracing->set_max_export_batch(512);
  tracing->set_max_export_queue(8192);

  auto* cache = c.mutable_cache();
  cache->set_max_bytes(100ull << 20);
  cache->mutable_default_ttl()->set_seconds(3600);
  cache->set_shards(16);
  cache->set_max_key_bytes(1024);
  cache->set_max_value_bytes(4ull << 20);
  cache->set_max_batch_items(1000);
  cache->mutable_persist_interval()->set_seconds(300);
  cache->mutable_lease_ttl()->set_seconds(10);
  cache->mutable_max_wait()->set_seconds(30);
  cache->mutable_lease_sweep_interval()->set_nanos(50'000'000);
  cache->mutable_cleanup_interval()->set_seconds(10);
  cache->set_max_namespaces(256);

  // Generation runs anywhere by default: the offline provider (templates, no network, not an
  // LLM) behind the alias "default". Providers, deployments and models in the file add to these.
  auto* gen = c.mutable_generation();
  (*gen->mutable_providers())["offline"].set_kind(v1::ProviderConfig::OFFLINE);
  auto& offline = (*gen->mutable_deployments())["offline"];
  offline.set_provider("offline");
  offline.set_model("montage-offline-templates");
  auto& model = (*gen->mutable_models())["default"];
  model.add_deployments("offline");
  model.set_description("montage's offline template provider (deterministic, not an LLM)");
  gen->set_default_model("default");
  gen->mutable_default_timeout()->set_seconds(300);
  gen->mutable_max_timeout()->set_seconds(3600);
  gen->set_max_prompt_bytes(256u << 10);
  gen->set_max_campaign_posts(50);
  gen->set_max_messages(256);
  auto* gen_cache = gen->mutable_cache();
  gen_cache->set_namespace_("generation");
  gen_cache->mutable_default_ttl()->set_seconds(24 * 3600);
  gen_cache->set_max_bytes(64ull << 20);
  gen_cache->mutable_timeout()->set_nanos(250'000'000);
  auto* gen_http = gen->mutable_http();
  gen_http->set_max_connections_per_host(256);
  gen_http->mutable_idle_connection_timeout()->set_seconds(60);
  gen_http->set_max_concurrent_streams(100);

  // The gateway listens on loopback only unless configured otherwise.
  auto* gateway = c.mutable_gateway();
  gateway->set_listen("127.0.0.1:8080");
  gateway->set_worker_threads(2);
  gateway->set_max_request_message_bytes(64ull << 20);
  gateway->mutable_reflection_refresh_interval()->set_seconds(60);
  gateway->set_batch_max_concurrency(100);
  gateway->set_batch_max_items(1000);
  // Speech runs anywhere by default: espeak-ng in process. Engines in the file add to it.
  auto* speech = c.mutable_speech();
  (*speech->mutable_engines())["espeak"].set_kind(v1::SpeechEngineConfig::ESPEAK);
  speech->set_default_engine("espeak");
  speech->set_max_text_bytes(1ull << 20);
  speech->set_max_segment_chars(400);
  speech->mutable_default_pause()->set_nanos(400'000'000);
  speech->set_max_dialogue_lines(5000);
  // A whole WAV of about 12 minutes; above it, StreamSynthesize or a compressed format.
  speech->set_max_unary_audio_bytes(32ull << 20);
  speech->set_stream_window_segments(8);
  speech->mutable_default_timeout()->set_seconds(600);
  auto* speech_cache = speech->mutable_cache();
  speech_cache->set_namespace_("speech");
  speech_cache->mutable_default_ttl()->set_seconds(7 * 24 * 3600);
  speech_cache->set_max_bytes(64ull << 20);
  speech_cache->mutable_timeout()->set_nanos(250'000'000);
  auto* speech_http = speech->mutable_http();
  speech_http->set_max_connections_per_host(64);
  speech_http->mutable_idle_connection_timeout()->set_seconds(60);
  speech_http->set_max_concurrent_streams(100);
  return c;
}

absl::Status MergeYaml(absl::string_view yaml, absl::string_view source, Message& message) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(source, e.mark), ": not valid YAML: ", e.msg));
  }
  try {
    return MergeNode(root, source, message);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(Where(source, e.mark), ": ", e.msg));
  }
}

absl::Status SetFieldFromText(Message& message, absl::string_view path, absl::string_view value,
                              absl::string_view source) {
  std::vector<std::string> parts = absl::StrSplit(path, '.');
  Message* msg = &message;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Descriptor& d = *msg->GetDescriptor();
    const FieldDescriptor* f = d.FindFieldByName(parts[i]);
    if (f == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": unknown key '", parts[i], "' in '",
                                                     path, "' (known here: ", KnownFields(d), ")"));
    }
    const bool last = i + 1 == parts.size();
    if (f->is_map()) {
      if (i + 1 >= parts.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": '", path, "' needs a map key after '", parts[i], "'"));
      }
      // Build a nested YAML mapping for the rest of the path and merge it.
      std::vector<std::string> keys(parts.begin() + static_cast<long>(i), parts.end());
      YAML::Node top = Nest(keys, 0, std::string(value));
      absl::Status s = MergeNode(top, source, *msg);
      if (!s.ok())
        return absl::InvalidArgumentError(absl::StrCat(s.message(), " (in '", path, "')"));
      return absl::OkStatus();
    }
    if (last) {
      if (f->is_repeated()) {
        msg->GetReflection()->ClearField(msg, f);
        for (absl::string_view item : absl::StrSplit(value, ',', absl::SkipEmpty())) {
          absl::Status s = SetScalar(*msg, *f, absl::StripAsciiWhitespace(item));
          if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", s.message()));
        }
        return absl::OkStatus();
      }
      absl::Status s = SetScalar(*msg, *f, value);
      if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", s.message()));
      return absl::OkStatus();
    }
    if (f->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE || f->is_repeated() || IsDuration(*f)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": '", parts[i], "' in '", path, "' is not a section"));
    }
    msg = msg->GetReflection()->MutableMessage(msg, f);
  }
  return absl::InvalidArgumentError(absl::StrCat(source, ": empty key"));
}

absl::StatusOr<Config> LoadConfig(const LoadOptions& options) {
  Config config = DefaultConfig();
  if (!options.path.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(options.path));
    RETURN_IF_ERROR(MergeYaml(text, options.path, config));
  }
  for (const auto& [name, value] : options.environment) {
    if (!absl::StartsWith(name, kEnvPrefix)) continue;
    std::vector<std::string> parts = absl::StrSplit(name.substr(kEnvPrefix.size()), "__");
    for (auto& p : parts) absl::AsciiStrToLower(&p);
    RETURN_IF_ERROR(SetFieldFromText(config, absl::StrJoin(parts, "."), value,
                                     absl::StrCat("environment variable ", name)));
  }
  for (const std::string& override_text : options.overrides) {
    const size_t eq = override_text.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--set '", override_text, "': expected key.path=value"));
    }
    RETURN_IF_ERROR(SetFieldFromText(config, override_text.substr(0, eq),
                                     override_text.substr(eq + 1), "--set"));
  }
  RETURN_IF_ERROR(Validate(config));
  return config;
}

std::vector<std::pair<std::string, std::string>> ProcessEnvironment() {
  std::vector<std::pair<std::string, std::string>> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    absl::string_view entry(*e);
    const size_t eq = entry.find('=');
    if (eq == absl::string_view::npos) continue;
    out.emplace_back(std::string(entry.substr(0, eq)), std::string(entry.substr(eq + 1)));
  }
  return out;
}

absl::Status Validate(const Config& c) {
  RETURN_IF_ERROR(CheckAddress("server.listen", c.server().listen()));
  RETURN_IF_ERROR(CheckAddress("server.admin_listen", c.server().admin_listen()));
  if (c.server().max_receive_message_bytes() < 1024 ||
      c.server().max_receive_message_bytes() > (1ull << 31) - 1) {
    return absl::InvalidArgumentError("server.max_receive_message_bytes: must be 1KiB..2GiB");
  }
  if (c.server().max_send_message_bytes() < 1024 ||
      c.server().max_send_message_bytes() > (1ull << 31) - 1) {
    return absl::InvalidArgumentError("server.max_send_message_bytes: must be 1KiB..2GiB");
  }
  if (c.server().executor_threads() > 1024) {
    return absl::InvalidArgumentError("server.executor_threads: at most 1024");
  }
  const auto& t = c.tracing();
  if (t.sample_ratio() < 0 || t.sample_ratio() > 1) {
    return absl::InvalidArgumentError("tracing.sample_ratio: must be between 0 and 1");
  }
  if ((t.exporter() == v1::TracingConfig::ZIPKIN || t.exporter() == v1::TracingConfig::OTLP) &&
      !(absl::StartsWith(t.endpoint(), "http://") || absl::StartsWith(t.endpoint(), "https://"))) {
    return absl::InvalidArgumentError(
        "tracing.endpoint: an http(s) URL is required when an exporter is set");
  }
  if (t.ring_buffer_spans() == 0 || t.max_export_batch() == 0 || t.max_export_queue() == 0) {
    return absl::InvalidArgumentError(
        "tracing: ring_buffer_spans, max_export_batch and max_export_queue must be positive");
  }
  const auto& cache = c.cache();
  if (cache.shards() == 0 || cache.shards() > 1024) {
    return absl::InvalidArgumentError("cache.shards: must be 1..1024");
  }
  if (cache.max_bytes() == 0)
    return absl::InvalidArgumentError("cache.max_bytes: must be positive");
  if (cache.max_key_bytes() == 0 || cache.max_key_bytes() > (64u << 10)) {
    return absl::InvalidArgumentError("cache.max_key_bytes: must be 1..64KiB");
  }
  if (cache.max_value_bytes() == 0 || cache.max_value_bytes() + cache.max_key_bytes() + 1024 >
                                          c.server().max_receive_message_bytes()) {
    return absl::InvalidArgumentError(
        "cache.max_value_bytes: must be positive and fit in server.max_receive_message_bytes");
  }
  if (cache.max_batch_items() == 0) {
    return absl::InvalidArgumentError("cache.max_batch_items: must be positive");
  }
  for (const auto& [name, ns] : cache.namespaces()) {
    if (ns.max_bytes() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cache.namespaces.", name, ".max_bytes: must be positive"));
    }
  }
  if (google::protobuf::util::TimeUtil::DurationToNanoseconds(cache.lease_ttl()) <= 0 ||
      google::protobuf::util::TimeUtil::DurationToNanoseconds(cache.lease_sweep_interval()) <= 0 ||
      google::protobuf::util::TimeUtil::DurationToNanoseconds(cache.cleanup_interval()) <= 0) {
    return absl::InvalidArgumentError(
        "cache: lease_ttl, lease_sweep_interval and cleanup_interval must be positive");
  }
  if (!cache.persist_path().empty() &&
      google::protobuf::util::TimeUtil::DurationToNanoseconds(cache.persist_interval()) <= 0) {
    return absl::InvalidArgumentError("cache.persist_interval: must be positive");
  }
  const auto& gen = c.generation();
  if (gen.max_prompt_bytes() == 0 || gen.max_campaign_posts() == 0 || gen.max_messages() == 0) {
    return absl::InvalidArgumentError(
        "generation: max_prompt_bytes, max_campaign_posts and max_messages must be positive");
  }
  for (const auto& [name, p] : gen.providers()) {
    if (p.kind() == v1::ProviderConfig::KIND_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat(
          "generation.providers.", name, ".kind: must be OFFLINE, OPENAI, GEMINI or ANTHROPIC"));
    }
  }
  RETURN_IF_ERROR(ValidateSpeech(c));
  RETURN_IF_ERROR(ValidateGateway(c));
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  size_t digits = 0;
  while (digits < text.size() &&
         (absl::ascii_isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.')) {
    ++digits;
  }
  double number;
  if (digits == 0 || !absl::SimpleAtod(text.substr(0, digits), &number)) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a size"));
  }
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text.substr(digits)));
  double factor;
  if (unit.empty() || unit == "b") {
    factor = 1;
  } else if (unit == "kib" || unit == "ki" || unit == "k") {
    factor = 1024.0;
  } else if (unit == "mib" || unit == "mi" || unit == "m") {
    factor = 1024.0 * 1024;
  } else if (unit == "gib" || unit == "gi" || unit == "g") {
    factor = 1024.0 * 1024 * 1024;
  } else if (unit == "kb") {
    factor = 1e3;
  } else if (unit == "mb") {
    factor = 1e6;
  } else if (unit == "gb") {
    factor = 1e9;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' has an unknown unit"));
  }
  const double bytes = number * factor;
  if (bytes > 1e18) return absl::InvalidArgumentError(absl::StrCat("'", text, "' is too large"));
  return static_cast<uint64_t>(bytes);
}

absl::StatusOr<std::string> ResolveSecret(const v1::SecretRef& ref) {
  if (!ref.env().empty() && !ref.file().empty()) {
    return absl::InvalidArgumentError("a secret names either an environment variable or a file");
  }
  if (!ref.env().empty()) {
    const char* value = std::getenv(ref.env().c_str());
    if (value == nullptr || *value == '\0') {
      return absl::FailedPreconditionError(
          absl::StrCat("environment variable ", ref.env(), " is not set"));
    }
    return std::string(value);
  }
  if (!ref.file().empty()) {
    auto text = ReadFile(ref.file());
    if (!text.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("cannot read secret file ", ref.file()));
    }
    std::string secret = *std::move(text);
    while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
    if (secret.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("secret file ", ref.file(), " is empty"));
    }
    return secret;
  }
  return absl::FailedPreconditionError("no secret configured (set env or file)");
}

std::string ConfigToJson(const Config& config) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(config, &out, options);
  return out;
}

}  // namespace montage::config
