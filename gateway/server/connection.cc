#include "gateway/server/connection.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "gateway/server/event_loop.h"
#include "gateway/server/tls_context.h"

namespace montage::gateway {
namespace {

constexpr absl::string_view kHttp2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

}  // namespace

const std::string* FindHeader(const HeaderList& headers, absl::string_view name) {
  for (const auto& [key, value] : headers) {
    if (key == name) return &value;
  }
  return nullptr;
}

// Waits for the TLS handshake, if any, and then for ALPN's answer or enough of the first bytes to
// tell HTTP/2 prior knowledge from HTTP/1.1.
class ConnectionSet::Sniffer {
 public:
  Sniffer(ConnectionSet* owner, bufferevent* bev, std::string peer_ip, bool handshaking)
      : owner_(owner), bev_(bev), peer_ip_(std::move(peer_ip)), handshaking_(handshaking) {}
  ~Sniffer() {
    if (bev_ != nullptr) bufferevent_free(bev_);
  }

  // A client that sends nothing (or never finishes its TLS handshake) for `timeout` is dropped.
  void Start(absl::Duration timeout) {
    bufferevent_setcb(
        bev_, [](bufferevent*, void* self) { static_cast<Sniffer*>(self)->OnRead(); }, nullptr,
        [](bufferevent*, short what, void* self) { static_cast<Sniffer*>(self)->OnEvent(what); },
        this);
    if (timeout > absl::ZeroDuration()) {
      const timeval tv = absl::ToTimeval(timeout);
      bufferevent_set_timeouts(bev_, &tv, nullptr);
    }
    bufferevent_enable(bev_, EV_READ);
  }

  bufferevent* Release() {
    bufferevent* bev = bev_;
    bev_ = nullptr;
    bufferevent_setcb(bev, nullptr, nullptr, nullptr, nullptr);
    bufferevent_set_timeouts(bev, nullptr, nullptr);  // the codec keeps its own idle timer
    return bev;
  }
  const std::string& peer_ip() const { return peer_ip_; }

 private:
  void OnRead() {
    evbuffer* input = bufferevent_get_input(bev_);
    const size_t have = std::min(evbuffer_get_length(input), kHttp2Preface.size());
    char head[32];
    evbuffer_copyout(input, head, have);
    const bool prefix_of_preface = std::memcmp(head, kHttp2Preface.data(), have) == 0;
    if (prefix_of_preface && have < kHttp2Preface.size()) return;  // wait for more
    owner_->Sniffed(this, prefix_of_preface);
  }
  void OnEvent(short what) {
    if (what & BEV_EVENT_TIMEOUT) {
      owner_->Drop(this);  // silent for too long: nobody to answer
      return;
    }
    if (!handshaking_) {
      owner_->Sniffed(this, /*http2=*/false);
      return;
    }
    if ((what & BEV_EVENT_CONNECTED) == 0) {
      // The handshake failed (or the client left): there is no one to answer.
      owner_->Drop(this);
      return;
    }
    handshaking_ = false;
    const absl::string_view protocol = NegotiatedAlpn(bufferevent_openssl_get_ssl(bev_));
    if (protocol == kAlpnHttp2 || protocol == kAlpnHttp11) {
      owner_->Sniffed(this, protocol == kAlpnHttp2);
    } else if (evbuffer_get_length(bufferevent_get_input(bev_)) > 0) {
      OnRead();  // no ALPN: the first bytes decide
    }
  }

  ConnectionSet* owner_;
  bufferevent* bev_;
  std::string peer_ip_;
  bool handshaking_;
};

ConnectionSet::ConnectionSet(EventLoop& loop, StreamDispatcher& dispatcher, CodecOptions options,
                             const TlsContext* tls)
    : loop_(loop), dispatcher_(dispatcher), options_(options), tls_(tls) {
  reaper_ = event_new(
      loop_.base(), -1, 0,
      [](evutil_socket_t, short, void* self) { static_cast<ConnectionSet*>(self)->Reap(); }, this);
}

ConnectionSet::~ConnectionSet() {
  sniffing_.clear();
  // Closing tells every open stream's handler; handlers may post, never re-enter the set.
  std::vector<Connection*> open;
  for (auto& [c, owned] : connections_) open.push_back(c);
  for (Connection* c : open) c->Close();
  connections_.clear();
  dead_.clear();
  if (reaper_ != nullptr) event_free(reaper_);
}

void ConnectionSet::Adopt(int fd, std::string peer_ip) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  bufferevent* bev = nullptr;
  if (tls_ == nullptr) {
    bev = bufferevent_socket_new(loop_.base(), fd, BEV_OPT_CLOSE_ON_FREE);
    if (bev == nullptr) {
      close(fd);
      return;
    }
  } else {
    SSL* ssl = tls_->NewSession();
    if (ssl == nullptr) {
      close(fd);
      return;
    }
    // The bufferevent owns the session and the socket. Its callbacks are not deferred, so the
    // codecs see the same calling pattern as over a socket bufferevent.
    bev = bufferevent_openssl_socket_new(loop_.base(), fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                         BEV_OPT_CLOSE_ON_FREE);
    // Out of memory. libevent may already have closed the socket and freed the session, so
    // neither is touched again.
    if (bev == nullptr) return;
    // A client that closes TCP without close_notify has still ended its side, as in cleartext;
    // requests carry their own framing, so nothing can be truncated unnoticed.
    bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
  }
  auto sniffer = std::make_unique<Sniffer>(this, bev, std::move(peer_ip), tls_ != nullptr);
  Sniffer* raw = sniffer.get();
  sniffing_.emplace(raw, std::move(sniffer));
  raw->Start(options_.idle_timeout);
}

void ConnectionSet::Sniffed(Sniffer* sniffer, bool http2) {
  auto it = sniffing_.find(sniffer);
  if (it == sniffing_.end()) return;
  std::unique_ptr<Sniffer> owned = std::move(it->second);
  sniffing_.erase(it);
  bufferevent* bev = owned->Release();
  std::unique_ptr<Connection> connection =
      http2 ? NewHttp2Connection(loop_, *this, bev, owned->peer_ip(), dispatcher_, options_)
            : NewHttp1Connection(loop_, *this, bev, owned->peer_ip(), dispatcher_, options_);
  Connection* raw = connection.get();
  connections_.emplace(raw, std::move(connection));
  if (!raw->Start()) raw->Close();
}

void ConnectionSet::Drop(Sniffer* sniffer) { sniffing_.erase(sniffer); }

void ConnectionSet::Remove(Connection* connection) {
  auto it = connections_.find(connection);
  if (it == connections_.end()) return;
  dead_.push_back(std::move(it->second));
  connections_.erase(it);
  event_active(reaper_, EV_TIMEOUT, 0);
}

void ConnectionSet::Reap() { dead_.clear(); }

IdleTimer::~IdleTimer() {
  if (timer_ != nullptr) event_free(timer_);
}

void IdleTimer::Init(event_base* base, absl::Duration timeout, std::function<void()> on_idle) {
  if (timeout <= absl::ZeroDuration()) return;
  timeout_ = timeout;
  on_idle_ = std::move(on_idle);
  timer_ = event_new(
      base, -1, 0,
      [](evutil_socket_t, short, void* self) {
        auto* t = static_cast<IdleTimer*>(self);
        if (t->on_idle_ != nullptr) t->on_idle_();
      },
      this);
}

void IdleTimer::Arm() {
  if (timer_ == nullptr) return;
  const timeval tv = absl::ToTimeval(timeout_);
  evtimer_add(timer_, &tv);
}

void IdleTimer::Disarm() {
  if (timer_ != nullptr) evtimer_del(timer_);
}

}  // namespace montage::gateway
