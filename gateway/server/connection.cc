#include "gateway/server/connection.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "gateway/server/event_loop.h"

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

// Waits for enough of the first bytes to tell HTTP/2 prior knowledge from HTTP/1.1.
class ConnectionSet::Sniffer {
 public:
  Sniffer(ConnectionSet* owner, bufferevent* bev, std::string peer_ip)
      : owner_(owner), bev_(bev), peer_ip_(std::move(peer_ip)) {}
  ~Sniffer() {
    if (bev_ != nullptr) bufferevent_free(bev_);
  }

  void Start() {
    bufferevent_setcb(
        bev_, [](bufferevent*, void* self) { static_cast<Sniffer*>(self)->OnRead(); }, nullptr,
        [](bufferevent*, short, void* self) { static_cast<Sniffer*>(self)->OnEvent(); }, this);
    bufferevent_enable(bev_, EV_READ);
  }

  bufferevent* Release() {
    bufferevent* bev = bev_;
    bev_ = nullptr;
    bufferevent_setcb(bev, nullptr, nullptr, nullptr, nullptr);
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
  void OnEvent() { owner_->Sniffed(this, /*http2=*/false); }

  ConnectionSet* owner_;
  bufferevent* bev_;
  std::string peer_ip_;
};

ConnectionSet::ConnectionSet(EventLoop& loop, StreamDispatcher& dispatcher, CodecOptions options)
    : loop_(loop), dispatcher_(dispatcher), options_(options) {
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
  bufferevent* bev = bufferevent_socket_new(loop_.base(), fd, BEV_OPT_CLOSE_ON_FREE);
  if (bev == nullptr) {
    close(fd);
    return;
  }
  auto sniffer = std::make_unique<Sniffer>(this, bev, std::move(peer_ip));
  Sniffer* raw = sniffer.get();
  sniffing_.emplace(raw, std::move(sniffer));
  raw->Start();
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

void ConnectionSet::Remove(Connection* connection) {
  auto it = connections_.find(connection);
  if (it == connections_.end()) return;
  dead_.push_back(std::move(it->second));
  connections_.erase(it);
  event_active(reaper_, EV_TIMEOUT, 0);
}

void ConnectionSet::Reap() { dead_.clear(); }

}  // namespace montage::gateway
