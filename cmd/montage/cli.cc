#include "cmd/montage/cli.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "cmd/montage/raw_audio_chunk.h"
#include "common/status.h"
#include "common/wav.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "montage/cache/v1/cache.grpc.pb.h"
#include "montage/generation/v1/generation.grpc.pb.h"
#include "montage/speech/v1/speech.grpc.pb.h"

namespace montage::cli {
namespace {

namespace cachepb = ::montage::cache::v1;
namespace genpb = ::montage::generation::v1;
namespace speechpb = ::montage::speech::v1;
using google::protobuf::util::TimeUtil;

constexpr char kUsage[] =
    R"(usage: montage [--addr=HOST:PORT] [--json] [--timeout=DURATION] <command>

commands:
  cache get KEY [--namespace=NS]          print the value (raw bytes; exit 1 on a miss)
  cache set KEY VALUE|- [--ttl=DURATION] [--namespace=NS]
                                          store VALUE (or standard input with -)
  cache delete KEY [--namespace=NS]
  cache invalidate [--prefix=P] [--all] [KEY...] [--namespace=NS]
  cache stats [--namespace=NS]            entries, bytes, hit rate per namespace
  cache snapshot                          write the persistence file now
  health                                  grpc.health.v1 status of every service
  generate [PROMPT...] [--template=T] [--var NAME=VALUE]... [--model=M]
           [--temperature=X] [--seed=N] [--no-stream]
                                          write with a model (streams the text as it comes)
  campaign --brief=TEXT --platform=P... [--posts=N] [--var NAME=VALUE]... [--model=M]
                                          a brief, then posts for each platform at once
  models                                  model aliases and their deployments
  templates [NAME]                        the prompt catalogue (or one template's variables)
  speak TEXT...|- --out=FILE [--format=F] [--voice=V] [--engine=E] [--rate=WPM]
        [--sample-rate=HZ] [--ssml] [--stream]
                                          narrate text (or standard input) into an audio file
  voices [--engine=E] [--language=L]      the voices each speech engine offers
  podcast TOPIC... [--out=FILE] [--turns=N] [--host-voice=V] [--guest-voice=V] [--format=F]
                                          write a two-voice episode: a script from the
                                          podcast_script template, narrated (out/<topic>.mp3)

Formats: mp3 (default), wav, pcm, ogg (Opus), aac (m4a). --addr defaults to $MONTAGE_ADDR or
127.0.0.1:50051; --timeout to 30s (10m for generate, campaign, speak and podcast: a model may
take minutes).
)";

struct Options {
  std::string addr;
  bool json = false;
  absl::Duration timeout = absl::Seconds(30);
  bool timeout_set = false;
  std::string ns;
  std::optional<absl::Duration> ttl;
  std::string prefix;
  bool all = false;
  std::vector<std::string> positional;
  // generation
  std::string model;
  std::string template_name;
  std::vector<std::pair<std::string, std::string>> vars;
  std::optional<double> temperature;
  std::optional<int64_t> seed;
  bool no_stream = false;
  std::string brief;
  std::vector<std::string> platforms;
  uint32_t posts = 1;
  // speech
  std::string out_path;
  std::string format;
  std::string voice;
  std::string engine;
  std::optional<double> rate;
  uint32_t sample_rate = 0;
  bool ssml = false;
  bool stream = false;
  std::string language;
  std::string host_voice;
  std::string guest_voice;
  uint32_t turns = 0;
};

// Parses --flag=value / --flag value anywhere on the line. Returns an error message or "".
std::string Parse(const std::vector<std::string>& args, Options& o) {
  const char* env = std::getenv("MONTAGE_ADDR");
  o.addr = env != nullptr && *env != '\0' ? env : "127.0.0.1:50051";
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (!absl::StartsWith(a, "--") || a == "--" || a == "-") {
      o.positional.push_back(a);
      continue;
    }
    std::string name = a.substr(2);
    std::string value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    auto take = [&]() -> bool {
      if (has_value) return true;
      if (i + 1 >= args.size()) return false;
      value = args[++i];
      return true;
    };
    if (name == "json") {
      o.json = true;
    } else if (name == "all") {
      o.all = true;
    } else if (name == "addr" || name == "namespace" || name == "prefix" || name == "ttl" ||
               name == "timeout") {
      if (!take()) return absl::StrCat("--", name, " needs a value");
      if (name == "addr") o.addr = value;
      if (name == "namespace") o.ns = value;
      if (name == "prefix") o.prefix = value;
      if (name == "ttl" || name == "timeout") {
        absl::Duration d;
        if (!absl::ParseDuration(value, &d) || d < absl::ZeroDuration()) {
          return absl::StrCat("--", name, ": '", value, "' is not a duration (e.g. 90s, 1h)");
        }
        if (name == "ttl") o.ttl = d;
        if (name == "timeout") {
          o.timeout = d;
          o.timeout_set = true;
        }
      }
    } else if (name == "no-stream") {
      o.no_stream = true;
    } else if (name == "ssml" || name == "stream") {
      (name == "ssml" ? o.ssml : o.stream) = true;
    } else if (name == "out" || name == "format" || name == "voice" || name == "engine" ||
               name == "rate" || name == "sample-rate" || name == "language" ||
               name == "host-voice" || name == "guest-voice" || name == "turns") {
      if (!take()) return absl::StrCat("--", name, " needs a value");
      if (name == "out") o.out_path = value;
      if (name == "format") o.format = absl::AsciiStrToLower(value);
      if (name == "voice") o.voice = value;
      if (name == "engine") o.engine = value;
      if (name == "language") o.language = value;
      if (name == "host-voice") o.host_voice = value;
      if (name == "guest-voice") o.guest_voice = value;
      if (name == "rate") {
        double r = 0;
        if (!absl::SimpleAtod(value, &r)) return "--rate needs a number";
        o.rate = r;
      }
      if (name == "sample-rate" && !absl::SimpleAtoi(value, &o.sample_rate)) {
        return "--sample-rate needs a number of Hz";
      }
      if (name == "turns" && !absl::SimpleAtoi(value, &o.turns)) return "--turns needs a number";
    } else if (name == "model" || name == "template" || name == "var" || name == "temperature" ||
               name == "seed" || name == "brief" || name == "platform" || name == "posts") {
      if (!take()) return absl::StrCat("--", name, " needs a value");
      if (name == "model") o.model = value;
      if (name == "template") o.template_name = value;
      if (name == "brief") o.brief = value;
      if (name == "platform") o.platforms.push_back(value);
      if (name == "var") {
        const size_t eq = value.find('=');
        if (eq == std::string::npos || eq == 0) return "--var needs NAME=VALUE";
        o.vars.emplace_back(value.substr(0, eq), value.substr(eq + 1));
      }
      if (name == "temperature") {
        double t = 0;
        if (!absl::SimpleAtod(value, &t)) return "--temperature needs a number";
        o.temperature = t;
      }
      if (name == "seed") {
        int64_t seed = 0;
        if (!absl::SimpleAtoi(value, &seed)) return "--seed needs an integer";
        o.seed = seed;
      }
      if (name == "posts" && !absl::SimpleAtoi(value, &o.posts)) return "--posts needs a number";
    } else if (name == "help") {
      o.positional = {"help"};
      return "";
    } else {
      return absl::StrCat("unknown option --", name);
    }
  }
  return "";
}

std::string HumanBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", v, units[u]);
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

int Fail(std::ostream& err, const grpc::Status& status, bool json) {
  if (json) {
    google::rpc::Status rpc;
    if (status.error_details().empty() || !rpc.ParseFromString(status.error_details())) {
      rpc.set_code(status.error_code());
      rpc.set_message(status.error_message());
    }
    err << ToJson(rpc);
    return 3;
  }
  err << "montage: " << GrpcCodeName(status.error_code()) << ": " << status.error_message() << "\n";
  google::rpc::Status rpc;
  if (!status.error_details().empty() && rpc.ParseFromString(status.error_details())) {
    for (const auto& any : rpc.details()) {
      google::rpc::BadRequest bad;
      if (any.UnpackTo(&bad)) {
        for (const auto& v : bad.field_violations()) {
          err << "  field " << v.field() << ": " << v.description() << "\n";
        }
      }
    }
  }
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    err << "  is montaged running? start it with: montaged all\n";
  }
  return 3;
}

class Client {
 public:
  explicit Client(const Options& o) : options_(o) {
    // Whole audio files arrive in one message (the speech service answers up to 32 MiB).
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // ...and arrive at once: an 8 MiB receive window and 1 MiB frames, where gRPC's default 64 KiB
    // window (grown by its bandwidth probe) and 16 KiB frames made an 11 MB WAV over loopback take
    // about 100 ms of window updates.
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 1 << 20);
    // Socket reads of up to 4 MiB instead of 8 KiB ones (hundreds of recvmsg per file).
    args.SetInt(GRPC_ARG_TCP_READ_CHUNK_SIZE, 1 << 20);
    args.SetInt(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10);
    args.SetInt(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 4 << 20);
    channel_ = grpc::CreateCustomChannel(o.addr, grpc::InsecureChannelCredentials(), args);
  }

  void Prepare(grpc::ClientContext& ctx) const {
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

 private:
  const Options& options_;
  std::shared_ptr<grpc::Channel> channel_;
};

int CacheGet(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  if (o.positional.size() != 3) {
    err << "usage: montage cache get KEY [--namespace=NS]\n";
    return 2;
  }
  auto stub = cachepb::CacheService::NewStub(client.channel());
  cachepb::GetRequest req;
  req.set_namespace_(o.ns);
  req.set_key(o.positional[2]);
  cachepb::GetResponse resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->Get(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
    return resp.found() ? 0 : 1;
  }
  if (!resp.found()) {
    err << "not found: " << req.key() << "\n";
    return 1;
  }
  out << resp.entry().value();
  return 0;
}

int CacheSet(const Options& o, Client& client, std::istream& in, std::ostream& out,
             std::ostream& err) {
  if (o.positional.size() != 4) {
    err << "usage: montage cache set KEY VALUE|- [--ttl=DURATION] [--namespace=NS]\n";
    return 2;
  }
  cachepb::SetRequest req;
  req.set_namespace_(o.ns);
  req.set_key(o.positional[2]);
  if (o.positional[3] == "-") {
    req.set_value(std::string(std::istreambuf_iterator<char>(in), {}));
  } else {
    req.set_value(o.positional[3]);
  }
  if (o.ttl.has_value()) {
    *req.mutable_ttl() = TimeUtil::NanosecondsToDuration(absl::ToInt64Nanoseconds(*o.ttl));
  }
  auto stub = cachepb::CacheService::NewStub(client.channel());
  cachepb::Entry resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->Set(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
    return 0;
  }
  out << "stored " << resp.key() << " in " << resp.namespace_() << " ("
      << HumanBytes(req.value().size()) << ", ";
  if (resp.has_expire_time()) {
    const absl::Time expire =
        absl::FromUnixNanos(TimeUtil::TimestampToNanoseconds(resp.expire_time()));
    out << "expires " << absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", expire, absl::UTCTimeZone());
  } else {
    out << "never expires";
  }
  out << ")\n";
  return 0;
}

int CacheDelete(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  if (o.positional.size() != 3) {
    err << "usage: montage cache delete KEY [--namespace=NS]\n";
    return 2;
  }
  auto stub = cachepb::CacheService::NewStub(client.channel());
  cachepb::DeleteRequest req;
  req.set_namespace_(o.ns);
  req.set_key(o.positional[2]);
  cachepb::DeleteResponse resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->Delete(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
  } else {
    out << (resp.deleted() ? "deleted " : "was not there: ") << req.key() << "\n";
  }
  return 0;
}

int CacheInvalidate(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  cachepb::InvalidateRequest req;
  req.set_namespace_(o.ns);
  req.set_prefix(o.prefix);
  req.set_all(o.all);
  for (size_t i = 2; i < o.positional.size(); ++i) req.add_keys(o.positional[i]);
  auto stub = cachepb::CacheService::NewStub(client.channel());
  cachepb::InvalidateResponse resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->Invalidate(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
  } else {
    out << "removed " << resp.removed() << " entries\n";
  }
  return 0;
}

int CacheStats(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  auto stub = cachepb::CacheService::NewStub(client.channel());
  cachepb::GetStatsRequest req;
  req.set_namespace_(o.ns);
  cachepb::CacheStats resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->GetStats(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
    return 0;
  }
  out << absl::StrFormat("%-16s %9s %12s %12s %9s %9s %8s %10s %11s\n", "NAMESPACE", "ENTRIES",
                         "BYTES", "BUDGET", "HITS", "MISSES", "HIT%", "EVICTIONS", "EXPIRATIONS");
  auto row = [&out](const cachepb::NamespaceStats& n, const std::string& name) {
    out << absl::StrFormat("%-16s %9d %12s %12s %9d %9d %7.1f%% %10d %11d\n", name, n.entries(),
                           HumanBytes(n.bytes()), HumanBytes(n.max_bytes()), n.hits(), n.misses(),
                           100.0 * n.hit_rate(), n.evictions(), n.expirations());
  };
  for (const auto& n : resp.namespaces()) row(n, n.namespace_());
  if (resp.namespaces_size() != 1) row(resp.total(), "(total)");
  return 0;
}

int CacheSnapshot(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  auto stub = cachepb::CacheService::NewStub(client.channel());
  cachepb::SnapshotResponse resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->Snapshot(&ctx, cachepb::SnapshotRequest(), &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
  } else {
    out << "saved " << resp.entries() << " entries (" << HumanBytes(resp.bytes()) << ") to "
        << resp.path() << "\n";
  }
  return 0;
}

int Health(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  auto stub = grpc::health::v1::Health::NewStub(client.channel());
  const std::vector<std::string> services = {"",
                                             "montage.cache.v1.CacheService",
                                             "montage.generation.v1.GenerationService",
                                             "montage.speech.v1.SpeechService",
                                             "montage.analytics.v1.AnalyticsService",
                                             "montage.render.v1.RenderService",
                                             "montage.gateway.v1.BatchService"};
  int serving = 0;
  for (const std::string& name : services) {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(name);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::ClientContext ctx;
    client.Prepare(ctx);
    grpc::Status s = stub->Check(&ctx, req, &resp);
    std::string state;
    if (s.ok()) {
      state = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
      serving += resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    } else if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
      state = "not running here";
    } else {
      return Fail(err, s, o.json);
    }
    out << absl::StrFormat("%-42s %s\n", name.empty() ? "(server)" : name, state);
  }
  return serving > 0 ? 0 : 3;
}

// --var values become typed JSON values by the template's declared variable types, so
// `--var count=5` is a number for an integer variable and a string for a string one.
grpc::Status FillVariables(const Options& o, Client& client, const std::string& template_name,
                           google::protobuf::Struct& vars) {
  std::map<std::string, std::string> types;
  if (!template_name.empty()) {
    auto stub = genpb::GenerationService::NewStub(client.channel());
    genpb::GetTemplateRequest req;
    req.set_name(template_name);
    genpb::Template t;
    grpc::ClientContext ctx;
    client.Prepare(ctx);
    grpc::Status s = stub->GetTemplate(&ctx, req, &t);
    if (!s.ok()) return s;
    for (const auto& v : t.variables()) types[v.name()] = v.type();
  }
  for (const auto& [name, text] : o.vars) {
    google::protobuf::Value& v = (*vars.mutable_fields())[name];
    const std::string type = types.count(name) ? types[name] : "string";
    double number = 0;
    if ((type == "integer" || type == "number") && absl::SimpleAtod(text, &number)) {
      v.set_number_value(number);
    } else if (type == "boolean" && (text == "true" || text == "false")) {
      v.set_bool_value(text == "true");
    } else if (type == "array") {
      auto* list = v.mutable_list_value();
      for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
        list->add_values()->set_string_value(std::string(absl::StripAsciiWhitespace(item)));
      }
    } else {
      v.set_string_value(text);  // the service reports a type mismatch by field name
    }
  }
  return grpc::Status::OK;
}

void PrintFooter(const genpb::GenerateResponse& r, std::ostream& out) {
  out << absl::StrFormat("\n-- %s via %s/%s: %u+%u tokens%s\n", r.model(), r.provider(),
                         r.deployment(), r.usage().prompt_tokens(), r.usage().completion_tokens(),
                         r.cached() ? ", from the cache" : "");
}

int Generate(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  genpb::GenerateRequest req;
  req.set_model(o.model);
  req.set_template_(o.template_name);
  if (grpc::Status s = FillVariables(o, client, o.template_name, *req.mutable_variables());
      !s.ok()) {
    return Fail(err, s, o.json);
  }
  std::vector<std::string> words(o.positional.begin() + 1, o.positional.end());
  if (!words.empty()) {
    auto* m = req.add_messages();
    m->set_role(genpb::Message::USER);
    m->set_content(absl::StrJoin(words, " "));
  }
  if (o.temperature) req.mutable_sampling()->set_temperature(*o.temperature);
  if (o.seed) req.mutable_sampling()->set_seed(*o.seed);
  auto stub = genpb::GenerationService::NewStub(client.channel());
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  if (o.json || o.no_stream) {
    genpb::GenerateResponse resp;
    grpc::Status s = stub->Generate(&ctx, req, &resp);
    if (!s.ok()) return Fail(err, s, o.json);
    if (o.json) {
      out << ToJson(resp);
    } else {
      out << resp.text();
      PrintFooter(resp, out);
    }
    return 0;
  }
  auto reader = stub->StreamGenerate(&ctx, req);
  genpb::GenerateEvent event;
  while (reader->Read(&event)) {
    if (event.has_delta()) {
      out << event.delta().text() << std::flush;
    } else if (event.has_done()) {
      PrintFooter(event.done(), out);
    }
  }
  grpc::Status s = reader->Finish();
  return s.ok() ? 0 : Fail(err, s, o.json);
}

int Campaign(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  genpb::GenerateCampaignRequest req;
  req.set_model(o.model);
  req.set_brief(o.brief);
  for (const auto& p : o.platforms) req.add_platforms(p);
  req.set_posts_per_platform(o.posts);
  if (grpc::Status s = FillVariables(o, client, "", *req.mutable_variables()); !s.ok()) {
    return Fail(err, s, o.json);
  }
  if (o.temperature) req.mutable_sampling()->set_temperature(*o.temperature);
  if (o.seed) req.mutable_sampling()->set_seed(*o.seed);
  auto stub = genpb::GenerationService::NewStub(client.channel());
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  auto reader = stub->GenerateCampaign(&ctx, req);
  genpb::CampaignEvent event;
  while (reader->Read(&event)) {
    if (o.json) {
      out << ToJson(event) << "\n";
    } else if (event.has_brief()) {
      out << "== campaign plan\n" << event.brief().text() << "\n";
    } else if (event.has_post()) {
      out << "\n== " << event.post().platform() << " post " << event.post().index() + 1 << "\n"
          << event.post().result().text() << "\n";
    } else if (event.has_post_failed()) {
      out << "\n== " << event.post_failed().platform() << " post "
          << event.post_failed().index() + 1 << " failed: " << event.post_failed().error() << "\n";
    } else if (event.has_total_usage()) {
      out << absl::StrFormat("\n-- %u tokens in all\n", event.total_usage().total_tokens());
    }
  }
  grpc::Status s = reader->Finish();
  return s.ok() ? 0 : Fail(err, s, o.json);
}

int Models(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  auto stub = genpb::GenerationService::NewStub(client.channel());
  genpb::ListModelsResponse resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->ListModels(&ctx, genpb::ListModelsRequest(), &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
    return 0;
  }
  for (const auto& m : resp.models()) {
    out << m.alias() << (m.alias() == resp.default_model() ? " (default)" : "") << "\n";
    for (const auto& d : m.deployments()) {
      out << absl::StrFormat("  %-20s %-10s %s\n", d.name(), d.provider(), d.model());
    }
  }
  return 0;
}

int Templates(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  auto stub = genpb::GenerationService::NewStub(client.channel());
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  if (o.positional.size() >= 2) {
    genpb::GetTemplateRequest req;
    req.set_name(o.positional[1]);
    genpb::Template t;
    grpc::Status s = stub->GetTemplate(&ctx, req, &t);
    if (!s.ok()) return Fail(err, s, o.json);
    if (o.json) {
      out << ToJson(t);
      return 0;
    }
    out << t.name() << ": " << t.description() << "\n";
    for (const auto& v : t.variables()) {
      out << absl::StrFormat("  --var %s=<%s>%s  %s\n", v.name(), v.type(),
                             v.required() ? " (required)" : "", v.description());
    }
    return 0;
  }
  genpb::ListTemplatesResponse resp;
  grpc::Status s = stub->ListTemplates(&ctx, genpb::ListTemplatesRequest(), &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
    return 0;
  }
  for (const auto& t : resp.templates()) {
    out << absl::StrFormat("%-22s %s\n", t.name(), t.description());
  }
  return 0;
}

std::optional<speechpb::AudioFormat> ParseFormat(const std::string& name) {
  if (name.empty() || name == "mp3") return speechpb::MP3;
  if (name == "wav") return speechpb::WAV;
  if (name == "pcm") return speechpb::PCM;
  if (name == "ogg" || name == "opus") return speechpb::OGG_OPUS;
  if (name == "aac" || name == "m4a") return speechpb::AAC;
  return std::nullopt;
}

bool WriteFile(const std::string& path, absl::string_view bytes, std::ostream& err) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) {
    err << "montage: cannot write " << path << "\n";
    return false;
  }
  return true;
}

std::string Seconds(absl::Duration d) {
  return absl::StrFormat("%.2f s", absl::ToDoubleSeconds(d));
}

std::string Clock(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

void PrintAudio(const std::string& path, uint64_t bytes, const speechpb::SynthesizeResponse& r,
                std::ostream& out) {
  const double seconds = TimeUtil::DurationToMilliseconds(r.duration()) / 1000.0;
  out << absl::StrFormat("%s: %s of audio, %s, %u Hz, %u segments (%u from the cache)\n", path,
                         Clock(seconds), HumanBytes(bytes), r.sample_rate(), r.segments(),
                         r.segments_from_cache());
}

// What StreamAudio wrote.
struct StreamedAudio {
  uint64_t bytes = 0;                    // audio bytes (a WAV header excluded)
  std::optional<absl::Duration> first;   // time to the first chunk
  speechpb::SynthesizeResponse summary;  // rate, duration and segments, as a unary answer says
};

// Streams `req` into o.out_path as the chunks come. With `wav`, the samples are asked for as PCM
// and the file gets a WAV header, written last since it needs their length: the file is the one
// the unary answer would be, but no whole copy of it is held and writing overlaps synthesis.
// A failed call leaves no file. Returns the exit code (errors already printed).
int StreamAudio(const Options& o, const std::shared_ptr<grpc::Channel>& channel,
                grpc::ClientContext& ctx, speechpb::SynthesizeRequest req, bool wav,
                StreamedAudio& got, std::ostream& err) {
  if (wav) req.set_format(speechpb::PCM);
  const absl::Time start = absl::Now();
  const int fd = open(o.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    err << "montage: cannot write " << o.out_path << ": " << strerror(errno) << "\n";
    return 1;
  }
  // Why the call was given up on our side (the file), if it was.
  std::string failure;
  const std::string placeholder(kWavHeaderBytes, '\0');  // the header, once the length is known
  if (wav && write(fd, placeholder.data(), placeholder.size()) != kWavHeaderBytes) {
    failure = absl::StrCat("cannot write ", o.out_path, ": ", strerror(errno));
  }

  // The call one step at a time on a completion queue of its own.
  grpc::GenericStub generic(channel);
  grpc::CompletionQueue cq;
  auto step = [&cq](intptr_t tag) {
    void* got_tag = nullptr;
    bool ok = false;
    return cq.Next(&got_tag, &ok) && ok && got_tag == reinterpret_cast<void*>(tag);
  };
  auto give_up = [&](std::string why) {
    if (failure.empty()) failure = std::move(why);
    ctx.TryCancel();
  };
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call = generic.PrepareCall(
      &ctx, absl::StrCat("/", speechpb::SpeechService::service_full_name(), "/StreamSynthesize"),
      &cq);
  call->StartCall(reinterpret_cast<void*>(1));
  grpc::ByteBuffer buffer;
  bool own = false;
  bool sent = false;
  if (!failure.empty()) {
    ctx.TryCancel();
  } else if (!grpc::SerializationTraits<speechpb::SynthesizeRequest>::Serialize(req, &buffer, &own)
                  .ok()) {
    give_up("cannot encode the request");
  } else if (step(1)) {
    call->WriteLast(buffer, grpc::WriteOptions(), reinterpret_cast<void*>(2));
    sent = step(2);
  }
  if (sent) {
    RawAudioChunk chunk;
    for (;;) {
      call->Read(&buffer, reinterpret_cast<void*>(3));
      if (!step(3)) break;
      if (!failure.empty()) continue;  // cancelled: the next Read ends the call
      if (!chunk.Parse(buffer)) {
        give_up("the speech service sent a malformed audio chunk");
        continue;
      }
      if (!got.first) got.first = absl::Now() - start;
      if (!chunk.WriteAudio(fd)) {
        give_up(absl::StrCat("cannot write ", o.out_path, ": ", strerror(errno)));
        continue;
      }
      got.bytes += chunk.audio_bytes();
      // gRPC's buffers go back to the allocator before the next read asks for new ones.
      chunk.Release();
      buffer.Clear();
      const speechpb::AudioChunk& meta = chunk.meta();
      if (meta.sample_rate() != 0) got.summary.set_sample_rate(meta.sample_rate());
      if (meta.last()) {
        *got.summary.mutable_duration() = meta.duration();
        got.summary.set_segments(meta.segments());
        got.summary.set_segments_from_cache(meta.segments_from_cache());
      }
    }
  }
  grpc::Status s;
  call->Finish(&s, reinterpret_cast<void*>(4));
  // Every tag (the start included, if it was never waited for) comes out of the drain below.
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
  if (s.ok() && failure.empty() && wav) {
    const std::string header = WavHeader(got.summary.sample_rate(), got.bytes);
    if (pwrite(fd, header.data(), header.size(), 0) != static_cast<ssize_t>(header.size())) {
      failure = absl::StrCat("cannot write ", o.out_path, ": ", strerror(errno));
    }
  }
  if (close(fd) != 0 && failure.empty()) {
    failure = absl::StrCat("cannot write ", o.out_path, ": ", strerror(errno));
  }
  if (!failure.empty() || !s.ok()) std::remove(o.out_path.c_str());
  if (!failure.empty()) {
    err << "montage: " << failure << "\n";
    return 1;
  }
  if (!s.ok()) return Fail(err, s, o.json);
  return 0;
}

int Speak(const Options& o, Client& client, std::istream& in, std::ostream& out,
          std::ostream& err) {
  std::vector<std::string> words(o.positional.begin() + 1, o.positional.end());
  if (words.empty() || o.out_path.empty()) {
    err << "usage: montage speak TEXT...|- --out=FILE [--format=F] [--voice=V] ...\n";
    return 2;
  }
  speechpb::SynthesizeRequest req;
  if (words.size() == 1 && words[0] == "-") {
    req.set_text(std::string(std::istreambuf_iterator<char>(in), {}));
  } else {
    req.set_text(absl::StrJoin(words, " "));
  }
  std::optional<speechpb::AudioFormat> format = ParseFormat(o.format);
  if (!format) {
    err << "montage: --format must be mp3, wav, pcm, ogg or aac\n";
    return 2;
  }
  req.set_format(*format);
  req.set_ssml(o.ssml);
  req.set_engine(o.engine);
  req.set_sample_rate(o.sample_rate);
  req.mutable_voice()->set_voice(o.voice);
  if (o.rate) req.mutable_voice()->set_rate(*o.rate);
  auto stub = speechpb::SpeechService::NewStub(client.channel());
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  const absl::Time start = absl::Now();
  if (o.stream || *format == speechpb::WAV) {
    StreamedAudio got;
    const bool wav = *format == speechpb::WAV && !o.stream;
    if (int code = StreamAudio(o, client.channel(), ctx, std::move(req), wav, got, err);
        code != 0) {
      return code;
    }
    if (wav) {
      PrintAudio(o.out_path, kWavHeaderBytes + got.bytes, got.summary, out);
      return 0;
    }
    const double seconds = TimeUtil::DurationToMilliseconds(got.summary.duration()) / 1000.0;
    out << absl::StrFormat("%s: %s of audio, %s; first audio after %s, all after %s\n", o.out_path,
                           Clock(seconds), HumanBytes(got.bytes),
                           Seconds(got.first.value_or(absl::ZeroDuration())),
                           Seconds(absl::Now() - start));
    return 0;
  }
  speechpb::SynthesizeResponse resp;
  grpc::Status s = stub->Synthesize(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (!WriteFile(o.out_path, resp.audio().data(), err)) return 1;
  PrintAudio(o.out_path, resp.audio().data().size(), resp, out);
  return 0;
}

int Voices(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  auto stub = speechpb::SpeechService::NewStub(client.channel());
  speechpb::ListVoicesRequest req;
  req.set_engine(o.engine);
  req.set_language(o.language);
  speechpb::ListVoicesResponse resp;
  grpc::ClientContext ctx;
  client.Prepare(ctx);
  grpc::Status s = stub->ListVoices(&ctx, req, &resp);
  if (!s.ok()) return Fail(err, s, o.json);
  if (o.json) {
    out << ToJson(resp);
    return 0;
  }
  for (const auto& v : resp.voices()) {
    out << absl::StrFormat("%-8s %-16s %-12s %s\n", v.engine(), v.name(), v.language(), v.gender());
  }
  return 0;
}

// "Editing videos faster!" → "editing-videos-faster".
std::string Slug(absl::string_view text) {
  std::string slug;
  for (char c : text) {
    if (absl::ascii_isalnum(static_cast<unsigned char>(c))) {
      slug += absl::ascii_tolower(static_cast<unsigned char>(c));
    } else if (!slug.empty() && slug.back() != '-') {
      slug += '-';
    }
    if (slug.size() >= 60) break;
  }
  while (!slug.empty() && slug.back() == '-') slug.pop_back();
  return slug.empty() ? "episode" : slug;
}

// The main job: a script from the generation service, narrated by the speech service.
int Podcast(const Options& o, Client& client, std::ostream& out, std::ostream& err) {
  std::vector<std::string> words(o.positional.begin() + 1, o.positional.end());
  if (words.empty()) {
    err << "usage: montage podcast TOPIC... [--out=FILE] [--turns=N] [--format=F]\n";
    return 2;
  }
  const std::string topic = absl::StrJoin(words, " ");
  std::optional<speechpb::AudioFormat> format = ParseFormat(o.format);
  if (!format) {
    err << "montage: --format must be mp3, wav, pcm, ogg or aac\n";
    return 2;
  }
  static const std::map<speechpb::AudioFormat, std::string> kExtensions = {
      {speechpb::MP3, "mp3"},
      {speechpb::WAV, "wav"},
      {speechpb::PCM, "pcm"},
      {speechpb::OGG_OPUS, "opus"},
      {speechpb::AAC, "m4a"}};
  const std::string path = o.out_path.empty()
                               ? absl::StrCat("out/", Slug(topic), ".", kExtensions.at(*format))
                               : o.out_path;
  const absl::Time start = absl::Now();

  genpb::GenerateRequest gen;
  gen.set_model(o.model);
  gen.set_template_("podcast_script");
  (*gen.mutable_variables()->mutable_fields())["topic"].set_string_value(topic);
  if (o.turns > 0) (*gen.mutable_variables()->mutable_fields())["turns"].set_number_value(o.turns);
  genpb::GenerateResponse script;
  {
    auto stub = genpb::GenerationService::NewStub(client.channel());
    grpc::ClientContext ctx;
    client.Prepare(ctx);
    grpc::Status s = stub->Generate(&ctx, gen, &script);
    if (!s.ok()) return Fail(err, s, o.json);
  }
  const absl::Duration scripted = absl::Now() - start;
  const auto& fields = script.json().struct_value().fields();
  auto turns_it = fields.find("turns");
  if (turns_it == fields.end() || !turns_it->second.has_list_value()) {
    err << "montage: the podcast_script answer has no turns\n";
    return 1;
  }
  auto title_it = fields.find("title");
  const std::string title =
      title_it != fields.end() ? title_it->second.string_value() : std::string(topic);
  speechpb::SynthesizeDialogueRequest req;
  size_t words_spoken = 0;
  for (const auto& turn : turns_it->second.list_value().values()) {
    const auto& t = turn.struct_value().fields();
    auto speaker = t.find("speaker");
    auto text = t.find("text");
    if (speaker == t.end() || text == t.end()) continue;
    speechpb::DialogueLine* line = req.add_lines();
    line->set_speaker(speaker->second.string_value());
    line->set_text(text->second.string_value());
    words_spoken +=
        std::vector<absl::string_view>(absl::StrSplit(line->text(), ' ', absl::SkipWhitespace()))
            .size();
  }
  out << absl::StrFormat("script: \"%s\", %d turns, %u words (%s via %s) in %s\n", title,
                         req.lines_size(), words_spoken, script.model(), script.provider(),
                         Seconds(scripted));
  if (!o.host_voice.empty()) (*req.mutable_voices())["host"].set_voice(o.host_voice);
  if (!o.guest_voice.empty()) (*req.mutable_voices())["guest"].set_voice(o.guest_voice);
  req.set_engine(o.engine);
  req.set_format(*format);
  speechpb::SynthesizeResponse audio;
  const absl::Time narrate_start = absl::Now();
  {
    auto stub = speechpb::SpeechService::NewStub(client.channel());
    grpc::ClientContext ctx;
    client.Prepare(ctx);
    grpc::Status s = stub->SynthesizeDialogue(&ctx, req, &audio);
    if (!s.ok()) return Fail(err, s, o.json);
  }
  const absl::Duration narrated = absl::Now() - narrate_start;
  out << absl::StrFormat("narration: two voices, %u segments (%u from the cache) in %s\n",
                         audio.segments(), audio.segments_from_cache(), Seconds(narrated));
  if (!WriteFile(path, audio.audio().data(), err)) return 1;
  PrintAudio(path, audio.audio().data().size(), audio, out);
  out << absl::StrFormat("episode written in %s\n", Seconds(absl::Now() - start));
  return 0;
}

}  // namespace

int Run(const std::vector<std::string>& args, std::istream& in, std::ostream& out,
        std::ostream& err) {
  Options o;
  if (std::string problem = Parse(args, o); !problem.empty()) {
    err << "montage: " << problem << "\n\n" << kUsage;
    return 2;
  }
  const auto& p = o.positional;
  if (p.empty() || p[0] == "help") {
    (p.empty() ? err : out) << kUsage;
    return p.empty() ? 2 : 0;
  }
  if ((p[0] == "generate" || p[0] == "campaign" || p[0] == "speak" || p[0] == "podcast") &&
      !o.timeout_set) {
    o.timeout = absl::Minutes(10);
  }
  Client client(o);
  if (p[0] == "health") return Health(o, client, out, err);
  if (p[0] == "generate") return Generate(o, client, out, err);
  if (p[0] == "campaign") return Campaign(o, client, out, err);
  if (p[0] == "models") return Models(o, client, out, err);
  if (p[0] == "templates") return Templates(o, client, out, err);
  if (p[0] == "speak") return Speak(o, client, in, out, err);
  if (p[0] == "voices") return Voices(o, client, out, err);
  if (p[0] == "podcast") return Podcast(o, client, out, err);
  if (p[0] == "cache" && p.size() >= 2) {
    if (p[1] == "get") return CacheGet(o, client, out, err);
    if (p[1] == "set") return CacheSet(o, client, in, out, err);
    if (p[1] == "delete") return CacheDelete(o, client, out, err);
    if (p[1] == "invalidate") return CacheInvalidate(o, client, out, err);
    if (p[1] == "stats") return CacheStats(o, client, out, err);
    if (p[1] == "snapshot") return CacheSnapshot(o, client, out, err);
  }
  err << "montage: unknown command '" << p[0] << (p.size() > 1 ? " " + p[1] : "") << "'\n\n"
      << kUsage;
  return 2;
}

}  // namespace montage::cli
