// HTTP/2 downstream connections: nghttp2's server session over a libevent bufferevent.
//
// Flow control is manual in the request direction: the connection window is reopened as soon as
// bytes arrive, a stream's window only when its handler consumes them, so a slow upstream holds
// back its own client and no other. In the response direction each stream queues what its handler
// sends; nghttp2 pulls from the queue as the client's windows allow, and the handler is told when
// its queue has drained.
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/nghttp2_session.h"
#include "gateway/server/connection.h"
#include "gateway/server/event_loop.h"

namespace montage::gateway {
namespace {

// Frames are serialized only while less than this waits for the socket.
constexpr size_t kOutputHighWater = 256 << 10;
constexpr int32_t kConnectionWindow = 1 << 30;

bool IsConnectionSpecific(absl::string_view name) {
  return name == "connection" || name == "keep-alive" || name == "proxy-connection" ||
         name == "transfer-encoding" || name == "upgrade";
}

class H2Connection;

class H2Stream final : public ServerStream {
 public:
  H2Stream(H2Connection* connection, int32_t id) : connection_(connection), id_(id) {}

  const RequestHead& head() const override { return head_; }
  EventLoop& loop() override;
  void SendHeaders(int status, HeaderList headers, bool end_stream) override;
  void SendData(absl::string_view data, bool end_stream) override;
  void SendTrailers(HeaderList trailers) override;
  void Reset() override;
  size_t PendingSendBytes() const override { return pending_.size() - sent_offset_; }
  void ConsumeRequestData(size_t bytes) override;

 private:
  friend class H2Connection;
  H2Connection* connection_;
  const int32_t id_;
  RequestHead head_;
  size_t header_bytes_ = 0;
  bool dispatched_ = false;
  bool request_ended_ = false;
  std::unique_ptr<StreamHandler> handler_;
  // The response.
  bool headers_sent_ = false;
  bool data_provider_ = false;  // the response has a body that ReadBody feeds
  std::string pending_;
  size_t sent_offset_ = 0;
  bool body_ended_ = false;
  bool has_trailers_ = false;
  HeaderList trailers_;
  bool completed_ = false;  // the response went out in full
  bool drain_signal_ = false;
};

class H2Connection final : public Connection {
 public:
  H2Connection(EventLoop& loop, ConnectionSet& owner, bufferevent* bev, std::string peer_ip,
               StreamDispatcher& dispatcher, const CodecOptions& options)
      : loop_(loop),
        owner_(owner),
        bev_(bev),
        peer_ip_(std::move(peer_ip)),
        dispatcher_(dispatcher),
        options_(options) {}

  ~H2Connection() override {
    CloseStreams();
    if (session_ != nullptr) nghttp2_session_del(session_);
    if (flush_event_ != nullptr) event_free(flush_event_);
    if (bev_ != nullptr) bufferevent_free(bev_);
  }

  bool Start() override {
    flush_event_ = event_new(
        loop_.base(), -1, 0,
        [](evutil_socket_t, short, void* self) { static_cast<H2Connection*>(self)->Flush(); },
        this);
    if (flush_event_ == nullptr) return false;
    Nghttp2SessionSpec spec;
    spec.server = true;
    spec.on_begin_headers = &OnBeginHeaders;
    spec.on_header = &OnHeader;
    spec.on_data_chunk_recv = &OnDataChunk;
    spec.on_frame_recv = &OnFrame;
    spec.on_stream_close = &OnStreamClose;
    spec.manual_window_updates = true;
    spec.settings = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, options_.max_concurrent_streams},
                     {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, options_.initial_stream_window},
                     {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
                      static_cast<uint32_t>(options_.max_request_headers_bytes)}};
    spec.connection_window = kConnectionWindow;
    session_ = NewNghttp2Session(spec, this);
    if (session_ == nullptr) return false;
    bufferevent_setcb(
        bev_, [](bufferevent*, void* self) { static_cast<H2Connection*>(self)->OnRead(); },
        [](bufferevent*, void* self) { static_cast<H2Connection*>(self)->Flush(); },
        [](bufferevent*, short, void* self) { static_cast<H2Connection*>(self)->Close(); }, this);
    if (bufferevent_enable(bev_, EV_READ | EV_WRITE) != 0) return false;
    // The sniffer left the preface (and maybe more) in the input buffer.
    // Idle: no stream open for idle_timeout. (A GOAWAY first would be politer; the client sees
    // the close and opens a new connection, as after any idle close.)
    idle_.Init(loop_.base(), options_.idle_timeout, [this] { Close(); });
    idle_.Arm();
    if (evbuffer_get_length(bufferevent_get_input(bev_)) > 0) OnRead();
    if (!closed_) Flush();
    return true;
  }

  void Close() override {
    if (closed_) return;
    closed_ = true;
    bufferevent_disable(bev_, EV_READ | EV_WRITE);
    CloseStreams();
    owner_.Remove(this);  // deleted later from the loop
  }

  EventLoop& loop() { return loop_; }

  void SubmitHeaders(H2Stream& s, int status, HeaderList headers, bool end_stream) {
    if (s.headers_sent_) return;
    s.headers_sent_ = true;
    std::vector<std::pair<std::string, std::string>> fields;
    fields.reserve(headers.size() + 1);
    fields.emplace_back(":status", std::to_string(status));
    for (auto& [name, value] : headers) {
      if (!IsConnectionSpecific(name)) fields.emplace_back(std::move(name), std::move(value));
    }
    std::vector<nghttp2_nv> nva = ToNv(fields);
    int rv;
    if (end_stream) {
      s.body_ended_ = true;
      rv = nghttp2_submit_response(session_, s.id_, nva.data(), nva.size(), nullptr);
    } else {
      s.data_provider_ = true;
      nghttp2_data_provider body;
      body.source.ptr = nullptr;
      body.read_callback = &ReadBody;
      rv = nghttp2_submit_response(session_, s.id_, nva.data(), nva.size(), &body);
    }
    if (rv != 0)
      nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, s.id_, NGHTTP2_INTERNAL_ERROR);
    ScheduleFlush();
  }

  void QueueData(H2Stream& s, absl::string_view data, bool end_stream) {
    if (!s.data_provider_ || s.body_ended_) return;
    // Drop what was sent, so the queue holds only unsent bytes (bounded by the handler's limit).
    if (s.sent_offset_ > 0 &&
        (s.sent_offset_ == s.pending_.size() || s.sent_offset_ >= (64 << 10))) {
      s.pending_.erase(0, s.sent_offset_);
      s.sent_offset_ = 0;
    }
    s.pending_.append(data.data(), data.size());
    if (end_stream) s.body_ended_ = true;
    nghttp2_session_resume_data(session_, s.id_);
    ScheduleFlush();
  }

  void QueueTrailers(H2Stream& s, HeaderList trailers) {
    if (!s.headers_sent_) {
      // Trailers-only: one HEADERS frame with end_stream.
      SubmitHeaders(s, 200, std::move(trailers), /*end_stream=*/true);
      return;
    }
    if (!s.data_provider_ || s.body_ended_) return;
    s.body_ended_ = true;
    s.has_trailers_ = true;
    s.trailers_ = std::move(trailers);
    nghttp2_session_resume_data(session_, s.id_);
    ScheduleFlush();
  }

  void ResetStream(H2Stream& s) {
    nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, s.id_, NGHTTP2_CANCEL);
    ScheduleFlush();
  }

  void Consume(H2Stream& s, size_t bytes) {
    nghttp2_session_consume_stream(session_, s.id_, bytes);
    ScheduleFlush();
  }

 private:
  static std::vector<nghttp2_nv> ToNv(std::vector<std::pair<std::string, std::string>>& fields) {
    std::vector<nghttp2_nv> nva;
    nva.reserve(fields.size());
    for (auto& [name, value] : fields) {
      nva.push_back({reinterpret_cast<uint8_t*>(name.data()),
                     reinterpret_cast<uint8_t*>(value.data()), name.size(), value.size(),
                     NGHTTP2_NV_FLAG_NONE});
    }
    return nva;
  }

  H2Stream* Find(int32_t id) {
    auto it = streams_.find(id);
    return it == streams_.end() ? nullptr : it->second.get();
  }

  static H2Connection* Self(void* p) { return static_cast<H2Connection*>(p); }

  static ssize_t ReadBody(nghttp2_session* session, int32_t stream_id, uint8_t* buf, size_t length,
                          uint32_t* data_flags, nghttp2_data_source*, void* self) {
    H2Connection* c = Self(self);
    H2Stream* s = c->Find(stream_id);
    if (s == nullptr) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    const size_t available = s->pending_.size() - s->sent_offset_;
    const size_t n = std::min(length, available);
    std::memcpy(buf, s->pending_.data() + s->sent_offset_, n);
    s->sent_offset_ += n;
    if (s->sent_offset_ == s->pending_.size()) {
      if (available > 0) {
        s->drain_signal_ = true;
        c->drained_.push_back(stream_id);
      }
      if (s->body_ended_) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        if (s->has_trailers_) {
          *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
          std::vector<std::pair<std::string, std::string>> fields(s->trailers_.begin(),
                                                                  s->trailers_.end());
          std::vector<nghttp2_nv> nva = ToNv(fields);
          if (nghttp2_submit_trailer(session, stream_id, nva.data(), nva.size()) != 0) {
            return NGHTTP2_ERR_CALLBACK_FAILURE;
          }
        }
      } else if (n == 0) {
        return NGHTTP2_ERR_DEFERRED;
      }
    }
    return static_cast<ssize_t>(n);
  }

  static int OnBeginHeaders(nghttp2_session*, const nghttp2_frame* frame, void* self) {
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
      H2Connection* c = Self(self);
      auto stream = std::make_unique<H2Stream>(c, frame->hd.stream_id);
      stream->head_.peer_ip = c->peer_ip_;
      stream->head_.http2 = true;
      c->streams_[frame->hd.stream_id] = std::move(stream);
      c->idle_.Disarm();
    }
    return 0;
  }

  static int OnHeader(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t, void* self) {
    H2Connection* c = Self(self);
    H2Stream* s = c->Find(frame->hd.stream_id);
    if (s == nullptr || s->dispatched_) return 0;  // trailers from the client are not used
    // nghttp2 does not enforce the SETTINGS_MAX_HEADER_LIST_SIZE it advertised; this does (the
    // stream is reset). Sizes count as in RFC 9113: name + value + 32.
    s->header_bytes_ += namelen + valuelen + 32;
    if (s->header_bytes_ > c->options_.max_request_headers_bytes) {
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    const absl::string_view key(reinterpret_cast<const char*>(name), namelen);
    std::string text(reinterpret_cast<const char*>(value), valuelen);
    RequestHead& head = s->head_;
    if (key == ":method") {
      head.method = std::move(text);
    } else if (key == ":path") {
      head.path = std::move(text);
    } else if (key == ":authority") {
      head.authority = std::move(text);
    } else if (key == ":scheme") {
      head.scheme = std::move(text);
    } else if (!key.empty() && key[0] != ':') {
      if (key == "host" && head.authority.empty()) head.authority = text;
      head.headers.emplace_back(std::string(key), std::move(text));
    }
    return 0;
  }

  static int OnDataChunk(nghttp2_session* session, uint8_t, int32_t stream_id, const uint8_t* data,
                         size_t len, void* self) {
    nghttp2_session_consume_connection(session, len);
    H2Stream* s = Self(self)->Find(stream_id);
    if (s == nullptr || s->handler_ == nullptr) {
      nghttp2_session_consume_stream(session, stream_id, len);
      return 0;
    }
    s->handler_->OnRequestData(absl::string_view(reinterpret_cast<const char*>(data), len), false);
    return 0;
  }

  static int OnFrame(nghttp2_session*, const nghttp2_frame* frame, void* self) {
    H2Connection* c = Self(self);
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    H2Stream* s = c->Find(frame->hd.stream_id);
    if (s == nullptr) return 0;
    const bool end_stream = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (frame->hd.type == NGHTTP2_HEADERS && !s->dispatched_) {
      s->dispatched_ = true;
      // Over TLS the transport decides, whatever :scheme the client sent.
      if (c->options_.tls) {
        s->head_.scheme = "https";
      } else if (s->head_.scheme.empty()) {
        s->head_.scheme = "http";
      }
      s->handler_ = c->dispatcher_.Dispatch(*s);
      // The handler may have been dispatched and then the stream reset from inside Dispatch.
      s = c->Find(frame->hd.stream_id);
      if (s == nullptr) return 0;
    }
    if (end_stream && !s->request_ended_) {
      s->request_ended_ = true;
      if (s->handler_ != nullptr) s->handler_->OnRequestData({}, true);
    }
    return 0;
  }

  static int OnStreamClose(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* self) {
    H2Connection* c = Self(self);
    auto it = c->streams_.find(stream_id);
    if (it == c->streams_.end()) return 0;
    std::unique_ptr<H2Stream> s = std::move(it->second);
    c->streams_.erase(it);
    if (c->streams_.empty()) c->idle_.Arm();
    const bool completed = error_code == NGHTTP2_NO_ERROR && s->body_ended_ && s->headers_sent_;
    if (s->handler_ != nullptr) s->handler_->OnStreamClosed(completed);
    return 0;
  }

  void OnRead() {
    if (closed_) return;
    evbuffer* input = bufferevent_get_input(bev_);
    const size_t size = evbuffer_get_length(input);
    const unsigned char* data = evbuffer_pullup(input, static_cast<ssize_t>(size));
    receiving_ = true;
    const ssize_t read = nghttp2_session_mem_recv(session_, data, size);
    receiving_ = false;
    evbuffer_drain(input, size);
    if (read < 0) {
      Close();
      return;
    }
    Flush();
  }

  void ScheduleFlush() {
    if (receiving_ || flushing_ || flush_scheduled_ || closed_) return;
    flush_scheduled_ = true;
    event_active(flush_event_, EV_TIMEOUT, 0);
  }

  void Flush() {
    flush_scheduled_ = false;
    if (receiving_ || flushing_ || closed_) return;
    flushing_ = true;
    evbuffer* output = bufferevent_get_output(bev_);
    if (Nghttp2Send(session_, output, kOutputHighWater) != 0) {
      flushing_ = false;
      Close();
      return;
    }
    flushing_ = false;
    // Handlers whose queue drained may send more; that schedules another flush.
    std::vector<int32_t> drained = std::move(drained_);
    drained_.clear();
    for (int32_t id : drained) {
      H2Stream* s = Find(id);
      if (s == nullptr || !s->drain_signal_) continue;
      s->drain_signal_ = false;
      if (s->handler_ != nullptr && s->PendingSendBytes() == 0) s->handler_->OnSendBufferDrained();
    }
    if (closed_) return;
    if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_) &&
        evbuffer_get_length(output) == 0) {
      Close();
    }
  }

  void CloseStreams() {
    // Handlers learn their client is gone; they may post work but not touch the stream.
    absl::flat_hash_map<int32_t, std::unique_ptr<H2Stream>> streams = std::move(streams_);
    streams_.clear();
    for (auto& [id, s] : streams) {
      if (s->handler_ != nullptr) s->handler_->OnStreamClosed(false);
    }
  }

  EventLoop& loop_;
  ConnectionSet& owner_;
  bufferevent* bev_;
  const std::string peer_ip_;
  StreamDispatcher& dispatcher_;
  const CodecOptions options_;
  nghttp2_session* session_ = nullptr;
  event* flush_event_ = nullptr;
  bool receiving_ = false;
  bool flushing_ = false;
  bool flush_scheduled_ = false;
  bool closed_ = false;
  absl::flat_hash_map<int32_t, std::unique_ptr<H2Stream>> streams_;
  IdleTimer idle_;  // armed while streams_ is empty
  std::vector<int32_t> drained_;
};

EventLoop& H2Stream::loop() { return connection_->loop(); }
void H2Stream::SendHeaders(int status, HeaderList headers, bool end_stream) {
  connection_->SubmitHeaders(*this, status, std::move(headers), end_stream);
}
void H2Stream::SendData(absl::string_view data, bool end_stream) {
  connection_->QueueData(*this, data, end_stream);
}
void H2Stream::SendTrailers(HeaderList trailers) {
  connection_->QueueTrailers(*this, std::move(trailers));
}
void H2Stream::Reset() { connection_->ResetStream(*this); }
void H2Stream::ConsumeRequestData(size_t bytes) { connection_->Consume(*this, bytes); }

}  // namespace

std::unique_ptr<Connection> NewHttp2Connection(EventLoop& loop, ConnectionSet& owner,
                                               bufferevent* bev, std::string peer_ip,
                                               StreamDispatcher& dispatcher,
                                               const CodecOptions& options) {
  return std::make_unique<H2Connection>(loop, owner, bev, std::move(peer_ip), dispatcher, options);
}

}  // namespace montage::gateway
