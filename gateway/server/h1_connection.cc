// HTTP/1.1 downstream connections (placeholder until the codec lands in the next commit).
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "gateway/server/connection.h"

namespace montage::gateway {
namespace {

class RefusingHttp1Connection final : public Connection {
 public:
  RefusingHttp1Connection(ConnectionSet& owner, bufferevent* bev) : owner_(owner), bev_(bev) {}
  ~RefusingHttp1Connection() override { bufferevent_free(bev_); }
  bool Start() override {
    static constexpr char kAnswer[] =
        "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain\r\n"
        "content-length: 41\r\nconnection: close\r\n\r\nthis gateway speaks HTTP/2 only so far.\n";
    evbuffer_add(bufferevent_get_output(bev_), kAnswer, sizeof(kAnswer) - 1);
    bufferevent_setcb(
        bev_, nullptr,
        [](bufferevent*, void* self) { static_cast<RefusingHttp1Connection*>(self)->Close(); },
        [](bufferevent*, short, void* self) {
          static_cast<RefusingHttp1Connection*>(self)->Close();
        },
        this);
    bufferevent_enable(bev_, EV_WRITE);
    return true;
  }
  void Close() override {
    if (closed_) return;
    closed_ = true;
    bufferevent_disable(bev_, EV_READ | EV_WRITE);
    owner_.Remove(this);
  }

 private:
  ConnectionSet& owner_;
  bufferevent* bev_;
  bool closed_ = false;
};

}  // namespace

std::unique_ptr<Connection> NewHttp1Connection(EventLoop&, ConnectionSet& owner, bufferevent* bev,
                                               std::string, StreamDispatcher&,
                                               const CodecOptions&) {
  return std::make_unique<RefusingHttp1Connection>(owner, bev);
}

}  // namespace montage::gateway
