// fake_llm_server: the fake LLM provider (OpenAI, Gemini, Anthropic wire formats, and OpenAI's
// text-to-speech) as a process, for benchmarks and checks by hand. Loopback only.
//
//   fake_llm_server --port 0 --port_file /tmp/fake_llm.json --delay 2s
//
// The port file gets {"port": N, "pid": P} once the server listens (and "h2c_port" with --h2c_port,
// which also serves h2c: HTTP/2 with prior knowledge, for clients that multiplex). Scripting, stats
// and reset are HTTP pages of the server itself (/_fake/..., see fake_llm_server.h). Nothing is
// printed per request. SIGTERM or SIGINT stop it cleanly.
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "tests/fake_llm/fake_llm_server.h"

ABSL_FLAG(int, port, 0, "port to listen on at 127.0.0.1; 0 picks a free one");
ABSL_FLAG(int, h2c_port, -1,
          "also serve h2c (HTTP/2 with prior knowledge) on this port at 127.0.0.1; 0 picks a free "
          "one, -1 is off");
ABSL_FLAG(std::string, port_file, "",
          "write {\"port\": N, \"pid\": P} (and \"h2c_port\") here once listening");
ABSL_FLAG(absl::Duration, delay, absl::ZeroDuration(), "default delay before every answer");
ABSL_FLAG(absl::Duration, chunk_interval, absl::Milliseconds(1),
          "pause between two events of a streamed answer");
ABSL_FLAG(std::string, api_key, "", "the only key accepted; empty accepts any");

namespace {

// The benchmark holds ten thousand connections: allow as many descriptors as the hard limit does.
void RaiseDescriptorLimit() {
  rlimit limit;
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == limit.rlim_max) return;
  limit.rlim_cur = limit.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &limit) != 0) {
    std::perror("fake_llm_server: setrlimit(RLIMIT_NOFILE)");
  }
}

// Written to a temporary name and renamed, so a reader never sees half a file.
absl::Status WritePortFile(const std::string& path, int port, int h2c_port) {
  const std::string temporary = absl::StrCat(path, ".tmp");
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << "{\"port\": " << port;
    if (h2c_port >= 0) out << ", \"h2c_port\": " << h2c_port;
    out << ", \"pid\": " << getpid() << "}\n";
    if (!out.good()) return absl::UnavailableError(absl::StrCat("cannot write ", temporary));
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot rename ", temporary, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "fake_llm_server [--port=N] [--h2c_port=N] [--port_file=FILE] [--delay=2s] "
      "[--chunk_interval=1ms] "
      "[--api_key=KEY]");
  absl::ParseCommandLine(argc, argv);
  RaiseDescriptorLimit();

  // Block the stop signals before the server thread starts, so it inherits the mask and only
  // sigwait below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  montage::testing::FakeLlmOptions options;
  options.port = absl::GetFlag(FLAGS_port);
  options.h2c_port = absl::GetFlag(FLAGS_h2c_port);
  options.default_delay = absl::GetFlag(FLAGS_delay);
  options.chunk_interval = absl::GetFlag(FLAGS_chunk_interval);
  options.expected_key = absl::GetFlag(FLAGS_api_key);
  auto server = montage::testing::FakeLlmServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "fake_llm_server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    absl::Status written = WritePortFile(port_file, (*server)->port(), (*server)->h2c_port());
    if (!written.ok()) {
      std::fprintf(stderr, "fake_llm_server: %s\n", written.ToString().c_str());
      return 1;
    }
  }

  int received = 0;
  sigwait(&stop_signals, &received);
  (*server)->Stop();
  return 0;
}
