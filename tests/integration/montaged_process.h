// Starts a real montaged (or any montage binary) as a child process on free loopback ports, for
// integration tests. The process writes its bound ports to a port file; Start() polls for it with
// a bound, and Stop() sends SIGTERM and reaps the exit code (SIGKILL only if a bound passes).
#ifndef MONTAGE_TESTS_INTEGRATION_MONTAGED_PROCESS_H_
#define MONTAGE_TESTS_INTEGRATION_MONTAGED_PROCESS_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"

namespace montage::testing {

struct ProcessResult {
  bool exited = false;
  int exit_code = -1;
  int signal = 0;
};

class MontagedProcess {
 public:
  // `args` follow the binary: e.g. {"cache", "--set=cache.max_bytes=1MiB"}. Listen addresses and
  // the port file are added here.
  static absl::StatusOr<std::unique_ptr<MontagedProcess>> Start(std::vector<std::string> args);
  ~MontagedProcess();

  const std::string& grpc_address() const { return grpc_address_; }
  const std::string& admin_address() const { return admin_address_; }
  pid_t pid() const { return pid_; }
  // Any address the port file names ("gateway"), or "" when it names none.
  std::string endpoint(const std::string& name) const {
    auto it = endpoints_.find(name);
    return it == endpoints_.end() ? "" : it->second;
  }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  // What the process wrote to stderr so far (its log).
  std::string log() const;

  // SIGTERM, then wait (bounded) for the exit.
  ProcessResult Stop();
  // Non-blocking check; ProcessResult::exited false while it runs.
  ProcessResult Poll();
  void Signal(int signal);

 private:
  MontagedProcess() = default;
  pid_t pid_ = -1;
  std::string dir_;
  std::string grpc_address_;
  std::string admin_address_;
  std::map<std::string, std::string> endpoints_;
  std::shared_ptr<grpc::Channel> channel_;
  bool reaped_ = false;
  ProcessResult result_;
};

// Path of the built montaged / montage binaries (set by CMake).
std::string MontagedPath();
std::string MontageCliPath();

// A unique empty directory under the test temp dir.
std::string MakeTempDir();

// Runs a command to completion, capturing stdout+stderr. Bounded by `timeout_seconds`.
struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& stdin_data = "",
                         int timeout_seconds = 60);

// A plain HTTP GET to host:port/path (status, body); status 0 on connection failure.
std::pair<long, std::string> HttpGet(const std::string& address, const std::string& path);

// Gives `ctx` a deadline `d` from now (every test call has one, so nothing hangs forever).
void WithDeadline(grpc::ClientContext& ctx, absl::Duration d = absl::Seconds(20));

// The field of the first google.rpc.BadRequest violation in `s`'s details ("" if none).
std::string FieldViolation(const grpc::Status& s);

// The value of the first sample of `name` whose labels contain `label_part` (-1 if none) in a
// Prometheus text page.
double MetricValue(const std::string& text, const std::string& name, const std::string& label_part);

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_INTEGRATION_MONTAGED_PROCESS_H_
