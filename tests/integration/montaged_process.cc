#include "tests/integration/montaged_process.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace montage::testing {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& out_path,
            const std::string& err_path, const std::string& in_path) {
  // Everything the child needs is prepared before fork: between fork and exec only
  // async-signal-safe calls are allowed (other threads may hold malloc's lock).
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = fork();
  if (pid != 0) return pid;
  int in = in_path.empty() ? open("/dev/null", O_RDONLY) : open(in_path.c_str(), O_RDONLY);
  int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  dup2(in, 0);
  dup2(out, 1);
  dup2(err, 2);
  execv(args[0], args.data());
  _exit(127);
}

ProcessResult Decode(int status) {
  ProcessResult r;
  r.exited = true;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  return r;
}

}  // namespace

std::string MontagedPath() { return MONTAGED_PATH; }
std::string MontageCliPath() { return MONTAGE_CLI_PATH; }

std::string MakeTempDir() {
  std::string tmpl = ::testing::TempDir() + "/montage-XXXXXX";
  char* made = mkdtemp(tmpl.data());
  return made == nullptr ? ::testing::TempDir() : std::string(made);
}

absl::StatusOr<std::unique_ptr<MontagedProcess>> MontagedProcess::Start(
    std::vector<std::string> args) {
  std::unique_ptr<MontagedProcess> p(new MontagedProcess());
  p->dir_ = MakeTempDir();
  const std::string port_file = p->dir_ + "/ports.json";
  std::vector<std::string> argv = {MontagedPath()};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back("--listen=127.0.0.1:0");
  argv.push_back("--admin_listen=127.0.0.1:0");
  argv.push_back("--port_file=" + port_file);
  // The gateway (in `all` and `gateway`) also listens on a free port; harmless for the others.
  argv.push_back("--set=gateway.listen=127.0.0.1:0");
  p->pid_ = Spawn(argv, p->dir_ + "/stdout", p->dir_ + "/stderr", "");
  // Bounded polling for the port file (written only once everything serves).
  for (int i = 0; i < 3000; ++i) {
    std::ifstream in(port_file);
    if (in) {
      auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
      if (!j.is_discarded()) {
        p->grpc_address_ = j.value("grpc", "");
        p->admin_address_ = j.value("admin", "");
        for (auto it = j.begin(); it != j.end(); ++it) {
          if (it.value().is_string()) p->endpoints_[it.key()] = it.value().get<std::string>();
        }
        p->channel_ = grpc::CreateChannel(p->grpc_address_, grpc::InsecureChannelCredentials());
        return p;
      }
    }
    ProcessResult r = p->Poll();
    if (r.exited) {
      return absl::InternalError(absl::StrCat("montaged exited (code ", r.exit_code,
                                              ") before serving; log:\n", p->log()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("montaged never wrote ", port_file, "; log:\n", p->log()));
}

MontagedProcess::~MontagedProcess() {
  if (!reaped_ && pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

std::string MontagedProcess::log() const { return ReadAll(dir_ + "/stderr"); }

void MontagedProcess::Signal(int signal) { kill(pid_, signal); }

ProcessResult MontagedProcess::Poll() {
  if (reaped_) return result_;
  int status = 0;
  pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    result_ = Decode(status);
    return result_;
  }
  return ProcessResult{};
}

ProcessResult MontagedProcess::Stop() {
  if (!reaped_) kill(pid_, SIGTERM);
  for (int i = 0; i < 6000 && !reaped_; ++i) {
    if (Poll().exited) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!reaped_) {
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    reaped_ = true;
    result_ = Decode(status);
  }
  return result_;
}

CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& stdin_data,
                         int timeout_seconds) {
  const std::string dir = MakeTempDir();
  std::string in_path;
  if (!stdin_data.empty()) {
    in_path = dir + "/stdin";
    std::ofstream(in_path) << stdin_data;
  }
  pid_t pid = Spawn(argv, dir + "/out", dir + "/err", in_path);
  CommandResult result;
  int status = 0;
  bool done = false;
  for (int i = 0; i < timeout_seconds * 100; ++i) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      done = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!done) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = ReadAll(dir + "/out");
  result.err = ReadAll(dir + "/err");
  return result;
}

namespace {
size_t AppendBody(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}
}  // namespace

std::pair<long, std::string> HttpGet(const std::string& address, const std::string& path) {
  std::string body;
  long status = 0;
  CURL* curl = curl_easy_init();
  const std::string url = absl::StrCat("http://", address, path);
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &AppendBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 10L);
  if (curl_easy_perform(curl) == CURLE_OK) curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(curl);
  return {status, body};
}

void WithDeadline(grpc::ClientContext& ctx, absl::Duration d) {
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + d));
}

std::string FieldViolation(const grpc::Status& s) {
  google::rpc::Status rpc;
  if (!rpc.ParseFromString(s.error_details())) return "";
  for (const auto& any : rpc.details()) {
    google::rpc::BadRequest bad;
    if (any.UnpackTo(&bad) && bad.field_violations_size() > 0) {
      return bad.field_violations(0).field();
    }
  }
  return "";
}

double MetricValue(const std::string& text, const std::string& name,
                   const std::string& label_part) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + "{", 0) != 0 || line.find(label_part) == std::string::npos) continue;
    return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

}  // namespace montage::testing
