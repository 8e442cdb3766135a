// The gateway's downstream listener: binds one address, accepts on its own loop and spreads the
// connections over the worker loops round-robin, where each connection's codec runs (behind TLS
// when the listener has a DownstreamTlsContext).
#ifndef MONTAGE_GATEWAY_SERVER_LISTENER_H_
#define MONTAGE_GATEWAY_SERVER_LISTENER_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gateway/config/bootstrap.h"
#include "gateway/server/connection.h"
#include "gateway/server/event_loop.h"
#include "gateway/server/tls_context.h"

struct evconnlistener;
struct sockaddr;

namespace montage::gateway {

// Thread-safe to construct and destroy from a control thread (not from a worker loop).
class Listener {
 public:
  // `address` is "host:port" (port 0: any free port). `workers` must outlive the listener. With
  // `tls`, connections are TLS: its files are read here, and a bad one fails the start (see
  // TlsContext::Create) before anything is bound.
  static absl::StatusOr<std::unique_ptr<Listener>> Start(
      const std::string& address, std::vector<EventLoop*> workers, StreamDispatcher& dispatcher,
      CodecOptions options, const std::optional<config::DownstreamTls>& tls = std::nullopt);
  // Stops accepting and closes every connection (their handlers learn it), on their loops.
  ~Listener();

  // "host:port" with the bound port.
  const std::string& address() const { return address_; }
  int port() const { return port_; }

 private:
  Listener() = default;
  void Accept(int fd, const ::sockaddr* addr);

  std::unique_ptr<TlsContext> tls_;  // used by the sets; outlives them
  std::unique_ptr<EventLoop> accept_loop_;
  std::vector<EventLoop*> workers_;
  std::vector<std::unique_ptr<ConnectionSet>> sets_;  // one per worker, used on its loop
  evconnlistener* listener_ = nullptr;
  std::atomic<size_t> next_{0};
  std::string address_;
  int port_ = 0;
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_SERVER_LISTENER_H_
