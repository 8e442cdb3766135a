// Load generator for the generation benchmark: gRPC Generate calls with the async callback API,
// spread over several channels (separate HTTP/2 connections). Prints one JSON object.
//
//   gen_load --addr=H:P --mode=burst --requests=10000 --channels=16 [--model=M]
//       every request at once, each distinct (so none is cached or coalesced)
//   gen_load --addr=H:P --mode=identical --requests=1000 [--model=M]
//       every request at once, all identical and deterministic (one upstream call expected)
//   gen_load --addr=H:P --mode=closed --requests=20000 --concurrency=50 [--model=M]
//       the same deterministic request with `concurrency` outstanding (a cached answer after the
//       first), for latency percentiles
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "montage/generation/v1/generation.grpc.pb.h"

namespace {

namespace genpb = ::montage::generation::v1;

struct Flags {
  std::string addr = "127.0.0.1:50051";
  std::string mode = "burst";
  std::string model;
  int requests = 1000;
  int channels = 8;
  int concurrency = 50;
  absl::Duration timeout = absl::Seconds(120);
};

bool ParseFlags(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const size_t eq = a.find('=');
    if (!absl::StartsWith(a, "--") || eq == std::string::npos) return false;
    const std::string name = a.substr(2, eq - 2);
    const std::string value = a.substr(eq + 1);
    if (name == "addr") {
      f.addr = value;
    } else if (name == "mode") {
      f.mode = value;
    } else if (name == "model") {
      f.model = value;
    } else if (name == "requests") {
      if (!absl::SimpleAtoi(value, &f.requests)) return false;
    } else if (name == "channels") {
      if (!absl::SimpleAtoi(value, &f.channels)) return false;
    } else if (name == "concurrency") {
      if (!absl::SimpleAtoi(value, &f.concurrency)) return false;
    } else if (name == "timeout") {
      if (!absl::ParseDuration(value, &f.timeout)) return false;
    } else {
      return false;
    }
  }
  return f.requests > 0 && f.channels > 0 && f.concurrency > 0;
}

genpb::GenerateRequest MakeRequest(const Flags& f, int i, bool distinct) {
  genpb::GenerateRequest r;
  r.set_model(f.model);
  auto* m = r.add_messages();
  m->set_role(genpb::Message::USER);
  if (distinct) {
    m->set_content(absl::StrCat("Write a hook for video number ", i, " about home espresso."));
    r.mutable_sampling()->set_temperature(0.7);
  } else {
    m->set_content("Write a hook for a video about home espresso.");
    r.mutable_sampling()->set_temperature(0);
  }
  return r;
}

class Runner {
 public:
  explicit Runner(const Flags& f) : flags_(f) {
    for (int c = 0; c < f.channels; ++c) {
      grpc::ChannelArguments args;
      // A separate connection per channel, not one shared subchannel.
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      args.SetInt("montage.bench.channel", c);
      stubs_.push_back(genpb::GenerationService::NewStub(
          grpc::CreateCustomChannel(f.addr, grpc::InsecureChannelCredentials(), args)));
    }
  }

  // Starts request `i`; `next` is called when it finishes (from a gRPC thread).
  void Start(int i, bool distinct) {
    auto* call = new Call;
    call->request = MakeRequest(flags_, i, distinct);
    call->context.set_deadline(absl::ToChronoTime(absl::Now() + flags_.timeout));
    call->start = absl::Now();
    auto& stub = stubs_[static_cast<size_t>(i) % stubs_.size()];
    stub->async()->Generate(&call->context, &call->request, &call->response,
                            [this, call, distinct](grpc::Status s) {
                              OnDone(call, s);
                              if (flags_.mode == "closed") MaybeStartNext(distinct);
                            });
  }

  void MaybeStartNext(bool distinct) {
    int i = started_.fetch_add(1);
    if (i < flags_.requests) Start(i, distinct);
  }

  void Run() {
    const bool distinct = flags_.mode == "burst";
    const absl::Time t0 = absl::Now();
    if (flags_.mode == "closed") {
      for (int i = 0; i < std::min(flags_.concurrency, flags_.requests); ++i) {
        MaybeStartNext(distinct);
      }
    } else {
      for (int i = 0; i < flags_.requests; ++i) Start(i, distinct);
    }
    {
      absl::MutexLock lock(&mu_);
      auto all_done = [this] { return done_ == flags_.requests; };
      mu_.Await(absl::Condition(&all_done));
    }
    const double wall = absl::ToDoubleSeconds(absl::Now() - t0);
    std::sort(latencies_.begin(), latencies_.end());
    auto pct = [&](double p) {
      if (latencies_.empty()) return 0.0;
      size_t k = static_cast<size_t>(p / 100.0 * static_cast<double>(latencies_.size() - 1) + 0.5);
      return latencies_[std::min(k, latencies_.size() - 1)];
    };
    std::printf(
        "{\"mode\":\"%s\",\"requests\":%d,\"ok\":%d,\"errors\":%d,\"cached\":%d,"
        "\"wall_s\":%.4f,\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"max_ms\":%.4f,"
        "\"first_error\":\"%s\"}\n",
        flags_.mode.c_str(), flags_.requests, ok_, errors_, cached_, wall, pct(50), pct(99),
        latencies_.empty() ? 0.0 : latencies_.back(), first_error_.c_str());
  }

 private:
  struct Call {
    grpc::ClientContext context;
    genpb::GenerateRequest request;
    genpb::GenerateResponse response;
    absl::Time start;
  };

  void OnDone(Call* call, const grpc::Status& s) {
    const double ms = absl::ToDoubleMilliseconds(absl::Now() - call->start);
    absl::MutexLock lock(&mu_);
    ++done_;
    latencies_.push_back(ms);
    if (s.ok()) {
      ++ok_;
      cached_ += call->response.cached() ? 1 : 0;
    } else {
      ++errors_;
      if (first_error_.empty()) {
        first_error_ = absl::StrCat(s.error_code(), " ", s.error_message().substr(0, 120));
        for (char& c : first_error_) {
          if (c == '"' || c == '\\') c = '\'';
        }
      }
    }
    delete call;
  }

  const Flags flags_;
  std::vector<std::unique_ptr<genpb::GenerationService::Stub>> stubs_;
  std::atomic<int> started_{0};
  absl::Mutex mu_;
  int done_ ABSL_GUARDED_BY(mu_) = 0;
  int ok_ ABSL_GUARDED_BY(mu_) = 0;
  int errors_ ABSL_GUARDED_BY(mu_) = 0;
  int cached_ ABSL_GUARDED_BY(mu_) = 0;
  std::string first_error_ ABSL_GUARDED_BY(mu_);
  std::vector<double> latencies_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, flags)) {
    std::fprintf(stderr,
                 "usage: gen_load --addr=H:P --mode=burst|identical|closed --requests=N "
                 "[--channels=N] [--concurrency=N] [--model=M] [--timeout=120s]\n");
    return 2;
  }
  Runner runner(flags);
  runner.Run();
  return 0;
}
