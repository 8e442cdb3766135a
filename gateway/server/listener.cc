#include "gateway/server/listener.h"

#include <arpa/inet.h>
#include <event2/listener.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <future>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/server/admin_server.h"

namespace montage::gateway {
namespace {

constexpr int kBacklog = 4096;

std::string PeerIp(const sockaddr* addr) {
  char text[INET6_ADDRSTRLEN] = {0};
  if (addr->sa_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(addr)->sin_addr, text, sizeof(text));
  } else if (addr->sa_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(addr)->sin6_addr, text,
              sizeof(text));
  }
  return text;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Listener>> Listener::Start(
    const std::string& address, std::vector<EventLoop*> workers, StreamDispatcher& dispatcher,
    CodecOptions options, const std::optional<config::DownstreamTls>& tls) {
  if (workers.empty()) return absl::InvalidArgumentError("the gateway needs a worker loop");
  absl::StatusOr<std::pair<std::string, int>> hp = SplitHostPort(address);
  if (!hp.ok()) return hp.status();
  std::unique_ptr<TlsContext> tls_context;
  if (tls.has_value()) {
    absl::StatusOr<std::unique_ptr<TlsContext>> created = TlsContext::Create(*tls);
    if (!created.ok()) {
      return absl::Status(created.status().code(),
                          absl::StrCat("listener ", address, ": ", created.status().message()));
    }
    tls_context = *std::move(created);
  }
  options.tls = tls_context != nullptr;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port_text = std::to_string(hp->second);
  if (int rc = getaddrinfo(hp->first.empty() ? nullptr : hp->first.c_str(), port_text.c_str(),
                           &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve listen address '", address, "': ", gai_strerror(rc)));
  }
  int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const int one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || bind(fd, found->ai_addr, found->ai_addrlen) != 0 || listen(fd, kBacklog) != 0) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) close(fd);
    freeaddrinfo(found);
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address, ": ", why));
  }
  freeaddrinfo(found);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int port =
      ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);

  std::unique_ptr<Listener> listener(new Listener());
  listener->tls_ = std::move(tls_context);
  listener->workers_ = std::move(workers);
  for (EventLoop* loop : listener->workers_) {
    listener->sets_.push_back(
        std::make_unique<ConnectionSet>(*loop, dispatcher, options, listener->tls_.get()));
  }
  absl::StatusOr<std::unique_ptr<EventLoop>> accept_loop = EventLoop::Start("gw-accept");
  if (!accept_loop.ok()) {
    close(fd);
    return accept_loop.status();
  }
  listener->accept_loop_ = *std::move(accept_loop);
  listener->port_ = port;
  listener->address_ = JoinHostPort(hp->first, port);
  Listener* raw = listener.get();
  std::promise<bool> started;
  listener->accept_loop_->Post([raw, fd, &started] {
    raw->listener_ = evconnlistener_new(
        raw->accept_loop_->base(),
        [](evconnlistener*, evutil_socket_t client, sockaddr* addr, int, void* self) {
          static_cast<Listener*>(self)->Accept(client, addr);
        },
        raw, LEV_OPT_CLOSE_ON_FREE, 0, fd);
    started.set_value(raw->listener_ != nullptr);
  });
  if (!started.get_future().get()) {
    close(fd);
    return absl::InternalError("evconnlistener_new failed");
  }
  return listener;
}

void Listener::Accept(int fd, const sockaddr* addr) {
  const size_t i = next_.fetch_add(1, std::memory_order_relaxed) % workers_.size();
  ConnectionSet* set = sets_[i].get();
  workers_[i]->Post([set, fd, peer = PeerIp(addr)]() mutable { set->Adopt(fd, std::move(peer)); });
}

Listener::~Listener() {
  if (accept_loop_ != nullptr) {
    std::promise<void> stopped;
    accept_loop_->Post([this, &stopped] {
      if (listener_ != nullptr) evconnlistener_free(listener_);
      listener_ = nullptr;
      stopped.set_value();
    });
    stopped.get_future().wait();
    accept_loop_.reset();
  }
  // Each set is closed on its own loop.
  for (size_t i = 0; i < sets_.size(); ++i) {
    std::promise<void> done;
    workers_[i]->Post([&set = sets_[i], &done] {
      set.reset();
      done.set_value();
    });
    done.get_future().wait();
  }
}

}  // namespace montage::gateway
