// An in-process gRPC server with montage.testing.v1.EchoService on a free loopback port, for the
// gateway's integration tests and benchmark: every streaming shape, delays without blocking a
// thread (a timer thread completes them), scripted failures, and counters of what it saw.
#ifndef MONTAGE_TESTS_GATEWAY_ECHO_BACKEND_H_
#define MONTAGE_TESTS_GATEWAY_ECHO_BACKEND_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace montage::testing {

class EchoBackend {
 public:
  // Listens on 127.0.0.1:`port` (0: a free port). `max_concurrent_streams` > 0 is announced in
  // HTTP/2 SETTINGS (gRPC's default otherwise).
  static absl::StatusOr<std::unique_ptr<EchoBackend>> Start(int port = 0,
                                                            int max_concurrent_streams = 0);
  ~EchoBackend();

  int port() const;
  std::string address() const;
  // Calls that reached a method, calls whose client cancelled (or whose deadline passed) while
  // they ran, and calls running now.
  int64_t calls() const;
  int64_t cancellations() const;
  int64_t in_flight() const;
  // Stops serving (in-flight calls are cancelled); Start() again on the same port to return.
  void Shutdown();
  // What grpc.health.v1 answers for the whole server (SERVING at start).
  void SetServing(bool serving);

  class Impl;

 private:
  explicit EchoBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_GATEWAY_ECHO_BACKEND_H_
