// echo_backend: the gateway tests' EchoService backend as a process of its own, for the gateway
// benchmark (tests/bench/gateway) and checks by hand. Loopback only.
//
//   echo_backend --port 0 --port_file /tmp/echo.json --counters_file /tmp/echo-counters.json
//
// The port file gets {"port": N, "pid": P} once the server listens. The call counters (calls that
// reached a method, cancellations, calls running now) are written to --counters_file on SIGUSR1 as
// {"seq": S, "calls": C, "cancellations": X, "in_flight": F}, where S counts the SIGUSR1s received
// (1 for the first), so a reader that sent its n-th signal waits for seq >= n. Both files are
// written to a temporary name and renamed, so a reader never sees half a file. Nothing is printed
// except errors. SIGTERM or SIGINT stop it cleanly.
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tests/gateway/echo_backend.h"

ABSL_FLAG(int, port, 0, "port to listen on at 127.0.0.1; 0 picks a free one");
ABSL_FLAG(std::string, port_file, "", "write {\"port\": N, \"pid\": P} here once listening");
ABSL_FLAG(std::string, counters_file, "",
          "on SIGUSR1, write {\"seq\", \"calls\", \"cancellations\", \"in_flight\"} here");

namespace {

absl::Status WriteAtomically(const std::string& path, const std::string& contents) {
  const std::string temporary = absl::StrCat(path, ".tmp");
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << contents;
    if (!out.good()) return absl::UnavailableError(absl::StrCat("cannot write ", temporary));
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot rename ", temporary, " to ", path));
  }
  return absl::OkStatus();
}

void Report(const absl::Status& status) {
  std::fprintf(stderr, "echo_backend: %s\n", status.ToString().c_str());
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);

  // Block the signals before gRPC starts its threads, so they inherit the mask and only sigwait
  // below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto backend = montage::testing::EchoBackend::Start(absl::GetFlag(FLAGS_port));
  if (!backend.ok()) {
    Report(backend.status());
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    absl::Status written = WriteAtomically(
        port_file, absl::StrCat("{\"port\": ", (*backend)->port(), ", \"pid\": ", getpid(), "}\n"));
    if (!written.ok()) {
      Report(written);
      return 1;
    }
  }

  const std::string counters_file = absl::GetFlag(FLAGS_counters_file);
  int64_t seq = 0;
  for (;;) {
    int received = 0;
    if (sigwait(&signals, &received) != 0) continue;
    if (received != SIGUSR1) break;
    ++seq;
    if (counters_file.empty()) continue;
    absl::Status written = WriteAtomically(
        counters_file, absl::StrCat("{\"seq\": ", seq, ", \"calls\": ", (*backend)->calls(),
                                    ", \"cancellations\": ", (*backend)->cancellations(),
                                    ", \"in_flight\": ", (*backend)->in_flight(), "}\n"));
    if (!written.ok()) Report(written);  // the reader times out and says so
  }
  (*backend)->Shutdown();
  return 0;
}
