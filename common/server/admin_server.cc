#include "common/server/admin_server.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/server/evhttp_method.h"

namespace montage {
namespace {

void EnableLibeventThreads() {
  static const bool enabled = [] { return evthread_use_pthreads() == 0; }();
  (void)enabled;
}

}  // namespace

std::string JoinHostPort(absl::string_view host, int port) {
  if (host.find(':') != absl::string_view::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address) {
  std::string host;
  std::string port_text;
  if (!address.empty() && address[0] == '[') {
    const size_t close = address.find(']');
    if (close == std::string::npos || close + 1 >= address.size() || address[close + 1] != ':') {
      return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not [host]:port"));
    }
    host = address.substr(1, close - 1);
    port_text = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not host:port"));
    }
    host = address.substr(0, colon);
    port_text = address.substr(colon + 1);
  }
  int port;
  if (!absl::SimpleAtoi(port_text, &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' has no valid port"));
  }
  return std::make_pair(host, port);
}

absl::StatusOr<std::unique_ptr<AdminServer>> AdminServer::Start(const std::string& listen) {
  EnableLibeventThreads();
  auto host_port = SplitHostPort(listen);
  if (!host_port.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin listen address: ", host_port.status().message()));
  }
  std::unique_ptr<AdminServer> server(new AdminServer());
  server->host_ = host_port->first;
  server->base_ = event_base_new();
  if (server->base_ == nullptr) return absl::InternalError("event_base_new failed");
  server->http_ = evhttp_new(server->base_);
  if (server->http_ == nullptr) return absl::InternalError("evhttp_new failed");
  evhttp_set_allowed_methods(server->http_, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD);
  evhttp_set_max_body_size(server->http_, 64 * 1024);
  evhttp_set_max_headers_size(server->http_, 32 * 1024);
  evhttp_set_timeout(server->http_, 30);
  evhttp_set_gencb(server->http_, &AdminServer::OnRequest, server.get());
  evhttp_bound_socket* bound = evhttp_bind_socket_with_handle(
      server->http_, server->host_.c_str(), static_cast<uint16_t>(host_port->second));
  if (bound == nullptr) {
    return absl::UnavailableError(absl::StrCat("admin server cannot listen on ", listen));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(evhttp_bound_socket_get_fd(bound), reinterpret_cast<sockaddr*>(&addr), &len) !=
      0) {
    return absl::InternalError("getsockname failed on the admin socket");
  }
  server->port_ = addr.ss_family == AF_INET6
                      ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                      : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  // Stop() activates this event; unlike event_base_loopbreak, an activation made before the
  // loop starts is not lost.
  server->stop_event_ = event_new(
      server->base_, -1, 0,
      [](evutil_socket_t, short, void* base) {
        event_base_loopbreak(static_cast<event_base*>(base));
      },
      server->base_);
  if (server->stop_event_ == nullptr) return absl::InternalError("event_new failed");
  AdminServer* raw = server.get();
  server->thread_ = std::thread([raw] { event_base_dispatch(raw->base_); });
  return server;
}

AdminServer::~AdminServer() {
  Stop();
  if (stop_event_ != nullptr) event_free(stop_event_);
  if (http_ != nullptr) evhttp_free(http_);
  if (base_ != nullptr) event_base_free(base_);
}

void AdminServer::Stop() {
  if (!thread_.joinable()) return;
  event_active(stop_event_, EV_READ, 0);
  thread_.join();
}

std::string AdminServer::address() const {
  if (host_.find(':') != std::string::npos) return absl::StrCat("[", host_, "]:", port_);
  return absl::StrCat(host_, ":", port_);
}

void AdminServer::Handle(const std::string& path, AdminHandler handler) {
  absl::MutexLock lock(&mu_);
  handlers_[path] = std::move(handler);
}

void AdminServer::OnRequest(evhttp_request* request, void* self) {
  static_cast<AdminServer*>(self)->Dispatch(request);
}

void AdminServer::Dispatch(evhttp_request* request) {
  AdminRequest req;
  req.method = std::string(EvhttpMethodName(evhttp_request_get_command(request)));
  const evhttp_uri* uri = evhttp_request_get_evhttp_uri(request);
  const char* path = uri != nullptr ? evhttp_uri_get_path(uri) : nullptr;
  req.path = path != nullptr && *path != '\0' ? path : "/";
  const char* query = uri != nullptr ? evhttp_uri_get_query(uri) : nullptr;
  if (query != nullptr) {
    evkeyvalq params;
    if (evhttp_parse_query_str(query, &params) == 0) {
      for (evkeyval* kv = params.tqh_first; kv != nullptr; kv = kv->next.tqe_next) {
        req.query[kv->key] = kv->value;
      }
      evhttp_clear_headers(&params);
    }
  }

  AdminHandler handler;
  std::vector<std::string> known;
  {
    absl::MutexLock lock(&mu_);
    auto it = handlers_.find(req.path);
    if (it != handlers_.end()) {
      handler = it->second;
    } else {
      for (const auto& [p, h] : handlers_) known.push_back(p);
    }
  }
  AdminResponse response;
  if (handler) {
    response = handler(req);
  } else {
    std::sort(known.begin(), known.end());
    response.status = 404;
    response.body =
        absl::StrCat("no admin page at ", req.path, "; pages: ", absl::StrJoin(known, " "), "\n");
  }
  evkeyvalq* headers = evhttp_request_get_output_headers(request);
  evhttp_add_header(headers, "Content-Type", response.content_type.c_str());
  evhttp_add_header(headers, "Cache-Control", "no-cache, max-age=0");
  evbuffer* body = evbuffer_new();
  evbuffer_add(body, response.body.data(), response.body.size());
  evhttp_send_reply(request, response.status, nullptr, body);
  evbuffer_free(body);
}

}  // namespace montage
