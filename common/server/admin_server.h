// The admin HTTP server every montaged process runs on its own port (one per process, `montaged
// all` included): /metrics, /ready and /healthz from the daemon, and later the gateway's Envoy
// admin pages. Built on libevent's evhttp, with its own event-loop thread, so a slow scrape
// never touches a gRPC thread.
//
// Thread-safe: handlers may be added at any time; they run on the admin thread and must be quick.
#ifndef MONTAGE_COMMON_SERVER_ADMIN_SERVER_H_
#define MONTAGE_COMMON_SERVER_ADMIN_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

struct event;
struct event_base;
struct evhttp;
struct evhttp_request;

namespace montage {

struct AdminRequest {
  std::string method;
  // Path without the query string.
  std::string path;
  // Decoded query parameters (the last value wins).
  absl::flat_hash_map<std::string, std::string> query;
};

struct AdminResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

using AdminHandler = std::function<AdminResponse(const AdminRequest&)>;

class AdminServer {
 public:
  // Binds `listen` ("host:port"; port 0 picks one) and starts serving. Unknown paths are 404
  // with the list of known ones.
  static absl::StatusOr<std::unique_ptr<AdminServer>> Start(const std::string& listen);
  ~AdminServer();
  AdminServer(const AdminServer&) = delete;
  AdminServer& operator=(const AdminServer&) = delete;

  // Registers (or replaces) the handler for an exact path.
  void Handle(const std::string& path, AdminHandler handler);
  int port() const { return port_; }
  // "host:port" actually bound.
  std::string address() const;
  // Stops the loop and joins the thread. Idempotent.
  void Stop();

 private:
  AdminServer() = default;
  static void OnRequest(evhttp_request* request, void* self);
  void Dispatch(evhttp_request* request);

  std::string host_;
  int port_ = 0;
  event_base* base_ = nullptr;
  evhttp* http_ = nullptr;
  event* stop_event_ = nullptr;
  std::thread thread_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, AdminHandler> handlers_ ABSL_GUARDED_BY(mu_);
};

// Splits "host:port" (IPv6 as "[::1]:80"). INVALID_ARGUMENT naming `address` when malformed.
absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address);
// The reverse: "host:port", or "[host]:port" for an IPv6 literal.
std::string JoinHostPort(absl::string_view host, int port);

}  // namespace montage

#endif  // MONTAGE_COMMON_SERVER_ADMIN_SERVER_H_
