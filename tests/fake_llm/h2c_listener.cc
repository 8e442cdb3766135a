#include "tests/fake_llm/h2c_listener.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/nghttp2_session.h"

namespace montage::testing {
namespace {

// The kernel caps this at net.core.somaxconn.
constexpr int kListenBacklog = 65535;
// The connection-level receive window; request bodies never wait for a WINDOW_UPDATE.
constexpr int32_t kConnectionWindowSize = 1 << 30;
// Frames are serialized only while less than this waits for the socket; the write callback
// continues once it has drained.
constexpr size_t kOutputHighWater = 1 << 20;

// Connection-specific fields are forbidden in HTTP/2 (RFC 9113, 8.2.2); a scripted one is dropped.
bool IsConnectionSpecific(absl::string_view lower_name) {
  return lower_name == "connection" || lower_name == "keep-alive" ||
         lower_name == "proxy-connection" || lower_name == "transfer-encoding" ||
         lower_name == "upgrade";
}

}  // namespace

// One accepted TCP connection: its bufferevent, its nghttp2 server session and its open streams.
class H2cListener::Connection {
 public:
  struct Stream {
    IncomingRequest request;
    // Handed to the RequestHandler (or refused); later frames are ignored.
    bool dispatched = false;
    // Response body bytes nghttp2 has not taken yet, and whether more will follow.
    std::string pending;
    bool eof = false;
    StreamResponder* responder = nullptr;
  };

  Connection(H2cListener* owner, bufferevent* bev) : owner_(owner), bev_(bev) {}
  ~Connection();
  bool Init();

  Stream* Find(int32_t id) {
    auto it = streams_.find(id);
    return it == streams_.end() ? nullptr : it->second.get();
  }
  // The response head, with a body that the stream's `pending` and `eof` feed.
  void Respond(int32_t id, int status, const std::string& content_type, const HeaderList& headers);
  // More of the body (or its end) is in `pending`.
  void Resume(int32_t id);
  void Reset(int32_t id, uint32_t error_code);

 private:
  static ssize_t ReadBody(nghttp2_session* session, int32_t stream_id, uint8_t* buf, size_t length,
                          uint32_t* data_flags, nghttp2_data_source* source, void* self);
  static int OnBeginHeaders(nghttp2_session* session, const nghttp2_frame* frame, void* self);
  static int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t flags,
                      void* self);
  static int OnDataChunk(nghttp2_session* session, uint8_t flags, int32_t stream_id,
                         const uint8_t* data, size_t len, void* self);
  static int OnFrame(nghttp2_session* session, const nghttp2_frame* frame, void* self);
  static int OnStreamClose(nghttp2_session* session, int32_t stream_id, uint32_t error_code,
                           void* self);

  void OnRead();
  void OnEvent();
  // Serializes what nghttp2 has to send into the socket's output buffer. Not while nghttp2 is
  // reading (it must not be re-entered): the read handler flushes once it has returned.
  void Flush();
  // Unhooks the stream's responder; its departure (if watched) runs from the deferred event.
  void Detach(Stream& stream);
  void ScheduleClose();
  // Runs queued departures, then, when closing, every stream's departure and the removal of this
  // connection. Always from the loop, never inside a Responder call.
  void RunDeferred();

  H2cListener* owner_;
  bufferevent* bev_;
  nghttp2_session* session_ = nullptr;
  event* deferred_ = nullptr;
  bool receiving_ = false;
  bool closing_ = false;
  absl::flat_hash_map<int32_t, std::unique_ptr<Stream>> streams_;
  std::vector<std::function<void()>> departures_;
};

// Answers on one stream. It and its Stream point at each other until either goes.
class H2cListener::StreamResponder final : public Responder {
 public:
  StreamResponder(Connection* connection, int32_t id) : connection_(connection), id_(id) {}
  ~StreamResponder() override {
    if (Connection::Stream* s = stream()) s->responder = nullptr;
  }

  void WatchDeparture(std::function<void()> on_gone) override { on_gone_ = std::move(on_gone); }
  void SendWhole(int status, const std::string& content_type, const HeaderList& headers,
                 const std::string& body) override {
    Connection::Stream* s = stream();
    if (s == nullptr) return;
    s->pending = body;
    s->eof = true;
    connection_->Respond(id_, status, content_type, headers);
  }
  void StartStream(int status, const std::string& content_type,
                   const HeaderList& headers) override {
    if (stream() == nullptr) return;
    connection_->Respond(id_, status, content_type, headers);
  }
  void SendChunk(const std::string& bytes) override {
    Connection::Stream* s = stream();
    if (s == nullptr) return;
    s->pending += bytes;
    connection_->Resume(id_);
  }
  void EndStream() override {
    Connection::Stream* s = stream();
    if (s == nullptr) return;
    s->eof = true;
    connection_->Resume(id_);
  }
  bool ReadyToCut() override {
    Connection::Stream* s = stream();
    return s == nullptr || s->pending.empty();
  }
  void Cut(bool no_error) override {
    if (stream() != nullptr) {
      connection_->Reset(id_, no_error ? NGHTTP2_NO_ERROR : NGHTTP2_INTERNAL_ERROR);
    }
  }

  // The stream is gone: forget the connection and hand back the departure callback, if any.
  std::function<void()> Detach() {
    connection_ = nullptr;
    std::function<void()> on_gone = std::move(on_gone_);
    on_gone_ = nullptr;
    return on_gone;
  }

 private:
  Connection::Stream* stream() { return connection_ != nullptr ? connection_->Find(id_) : nullptr; }

  Connection* connection_;
  const int32_t id_;
  std::function<void()> on_gone_;
};

H2cListener::Connection::~Connection() {
  for (auto& [id, stream] : streams_) {
    if (stream->responder != nullptr) stream->responder->Detach();
  }
  if (session_ != nullptr) nghttp2_session_del(session_);
  if (deferred_ != nullptr) event_free(deferred_);
  bufferevent_free(bev_);  // closes the socket
}

bool H2cListener::Connection::Init() {
  deferred_ = event_new(
      bufferevent_get_base(bev_), -1, 0,
      [](evutil_socket_t, short, void* self) { static_cast<Connection*>(self)->RunDeferred(); },
      this);
  if (deferred_ == nullptr) return false;

  Nghttp2SessionSpec spec;
  spec.server = true;
  spec.on_begin_headers = &OnBeginHeaders;
  spec.on_header = &OnHeader;
  spec.on_data_chunk_recv = &OnDataChunk;
  spec.on_frame_recv = &OnFrame;
  spec.on_stream_close = &OnStreamClose;
  spec.settings = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, kMaxConcurrentStreams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<uint32_t>(kInitialWindowSize)}};
  spec.connection_window = kConnectionWindowSize;
  session_ = NewNghttp2Session(spec, this);
  if (session_ == nullptr) return false;

  bufferevent_setcb(
      bev_, [](bufferevent*, void* self) { static_cast<Connection*>(self)->OnRead(); },
      [](bufferevent*, void* self) { static_cast<Connection*>(self)->Flush(); },
      [](bufferevent*, short, void* self) { static_cast<Connection*>(self)->OnEvent(); }, this);
  if (bufferevent_enable(bev_, EV_READ | EV_WRITE) != 0) return false;
  Flush();
  return true;
}

void H2cListener::Connection::Respond(int32_t id, int status, const std::string& content_type,
                                      const HeaderList& headers) {
  // nghttp2 copies names and values (NGHTTP2_NV_FLAG_NONE); HTTP/2 wants names in lower case.
  std::vector<std::pair<std::string, std::string>> fields;
  fields.emplace_back(":status", std::to_string(status));
  fields.emplace_back("content-type", content_type);
  for (const auto& [name, value] : headers) {
    std::string lower = absl::AsciiStrToLower(name);
    if (!IsConnectionSpecific(lower)) fields.emplace_back(std::move(lower), value);
  }
  std::vector<nghttp2_nv> nva;
  nva.reserve(fields.size());
  for (auto& [name, value] : fields) {
    nva.push_back({reinterpret_cast<uint8_t*>(name.data()),
                   reinterpret_cast<uint8_t*>(value.data()), name.size(), value.size(),
                   NGHTTP2_NV_FLAG_NONE});
  }
  nghttp2_data_provider body;
  body.source.ptr = nullptr;
  body.read_callback = &ReadBody;
  if (nghttp2_submit_response(session_, id, nva.data(), nva.size(), &body) != 0) {
    nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, NGHTTP2_INTERNAL_ERROR);
  }
  Flush();
}

void H2cListener::Connection::Resume(int32_t id) {
  // Fails harmlessly when nghttp2 is not waiting on this stream's data (it will ask again).
  nghttp2_session_resume_data(session_, id);
  Flush();
}

void H2cListener::Connection::Reset(int32_t id, uint32_t error_code) {
  nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, error_code);
  Flush();
}

ssize_t H2cListener::Connection::ReadBody(nghttp2_session*, int32_t stream_id, uint8_t* buf,
                                          size_t length, uint32_t* data_flags, nghttp2_data_source*,
                                          void* self) {
  Stream* stream = static_cast<Connection*>(self)->Find(stream_id);
  if (stream == nullptr) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  const size_t n = std::min(length, stream->pending.size());
  std::memcpy(buf, stream->pending.data(), n);
  stream->pending.erase(0, n);
  if (stream->pending.empty() && stream->eof) {
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
  } else if (n == 0) {
    return NGHTTP2_ERR_DEFERRED;  // Resume() wakes it
  }
  return static_cast<ssize_t>(n);
}

int H2cListener::Connection::OnBeginHeaders(nghttp2_session*, const nghttp2_frame* frame,
                                            void* self) {
  if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
    static_cast<Connection*>(self)->streams_[frame->hd.stream_id] = std::make_unique<Stream>();
  }
  return 0;
}

int H2cListener::Connection::OnHeader(nghttp2_session*, const nghttp2_frame* frame,
                                      const uint8_t* name, size_t namelen, const uint8_t* value,
                                      size_t valuelen, uint8_t, void* self) {
  Stream* stream = static_cast<Connection*>(self)->Find(frame->hd.stream_id);
  if (stream == nullptr || stream->dispatched) return 0;
  const absl::string_view key(reinterpret_cast<const char*>(name), namelen);
  std::string text(reinterpret_cast<const char*>(value), valuelen);
  IncomingRequest& request = stream->request;
  if (key == ":method") {
    request.method = std::move(text);
  } else if (key == ":path") {
    const size_t question = text.find('?');
    request.path = text.substr(0, question);
    if (question != std::string::npos) request.query = text.substr(question + 1);
  } else if (key == ":authority") {
    request.headers.emplace_back("host", std::move(text));
  } else if (!key.empty() && key[0] != ':') {
    request.headers.emplace_back(std::string(key), std::move(text));
  }
  return 0;
}

int H2cListener::Connection::OnDataChunk(nghttp2_session* session, uint8_t, int32_t stream_id,
                                         const uint8_t* data, size_t len, void* self) {
  Stream* stream = static_cast<Connection*>(self)->Find(stream_id);
  if (stream == nullptr || stream->dispatched) return 0;
  if (stream->request.body.size() + len > kMaxRequestBodyBytes) {
    stream->dispatched = true;
    nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_REFUSED_STREAM);
    return 0;
  }
  stream->request.body.append(reinterpret_cast<const char*>(data), len);
  return 0;
}

int H2cListener::Connection::OnFrame(nghttp2_session*, const nghttp2_frame* frame, void* self) {
  auto* connection = static_cast<Connection*>(self);
  if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
      (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) == 0) {
    return 0;
  }
  Stream* stream = connection->Find(frame->hd.stream_id);
  if (stream == nullptr || stream->dispatched) return 0;
  stream->dispatched = true;
  auto responder = std::make_unique<StreamResponder>(connection, frame->hd.stream_id);
  stream->responder = responder.get();
  connection->owner_->handler_(std::move(stream->request), std::move(responder));
  return 0;
}

int H2cListener::Connection::OnStreamClose(nghttp2_session*, int32_t stream_id, uint32_t,
                                           void* self) {
  auto* connection = static_cast<Connection*>(self);
  auto it = connection->streams_.find(stream_id);
  if (it == connection->streams_.end()) return 0;
  connection->Detach(*it->second);
  connection->streams_.erase(it);
  return 0;
}

void H2cListener::Connection::Detach(Stream& stream) {
  if (stream.responder == nullptr) return;
  std::function<void()> on_gone = stream.responder->Detach();
  stream.responder = nullptr;
  if (on_gone != nullptr) {
    departures_.push_back(std::move(on_gone));
    event_active(deferred_, EV_TIMEOUT, 0);
  }
}

void H2cListener::Connection::OnRead() {
  evbuffer* input = bufferevent_get_input(bev_);
  const size_t size = evbuffer_get_length(input);
  const unsigned char* data = evbuffer_pullup(input, static_cast<ssize_t>(size));
  receiving_ = true;
  const ssize_t read = nghttp2_session_mem_recv(session_, data, size);
  receiving_ = false;
  evbuffer_drain(input, size);
  if (read < 0) {
    closing_ = true;
    RunDeferred();
    return;
  }
  Flush();
}

void H2cListener::Connection::OnEvent() {
  // The peer closed, or the socket failed: every unfinished stream lost its client.
  closing_ = true;
  RunDeferred();
}

void H2cListener::Connection::Flush() {
  if (receiving_ || closing_) return;
  evbuffer* output = bufferevent_get_output(bev_);
  if (Nghttp2Send(session_, output, kOutputHighWater) != 0) {
    ScheduleClose();
    return;
  }
  if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_) &&
      evbuffer_get_length(output) == 0) {
    ScheduleClose();
  }
}

void H2cListener::Connection::ScheduleClose() {
  closing_ = true;
  event_active(deferred_, EV_TIMEOUT, 0);
}

void H2cListener::Connection::RunDeferred() {
  if (closing_) {
    for (auto& [id, stream] : streams_) Detach(*stream);
  }
  std::vector<std::function<void()>> departures = std::move(departures_);
  departures_.clear();
  for (std::function<void()>& on_gone : departures) on_gone();
  if (closing_) owner_->Remove(this);  // deletes this
}

H2cListener::H2cListener(event_base* base, RequestHandler handler,
                         std::function<void()> on_connection)
    : base_(base), handler_(std::move(handler)), on_connection_(std::move(on_connection)) {}

absl::StatusOr<std::unique_ptr<H2cListener>> H2cListener::Start(
    event_base* base, int port, RequestHandler handler, std::function<void()> on_connection) {
  absl::StatusOr<LoopbackSocket> socket = ListenLoopback(port, kListenBacklog);
  if (!socket.ok()) return socket.status();
  std::unique_ptr<H2cListener> listener(
      new H2cListener(base, std::move(handler), std::move(on_connection)));
  // Backlog 0: the socket already listens. From here the listener owns (and closes) it.
  listener->listener_ = evconnlistener_new(
      base,
      [](evconnlistener*, evutil_socket_t fd, sockaddr*, int, void* self) {
        static_cast<H2cListener*>(self)->Accept(fd);
      },
      listener.get(), LEV_OPT_CLOSE_ON_FREE, 0, socket->fd);
  if (listener->listener_ == nullptr) {
    close(socket->fd);
    return absl::InternalError("evconnlistener_new failed");
  }
  listener->port_ = socket->port;
  return listener;
}

H2cListener::~H2cListener() {
  if (listener_ != nullptr) evconnlistener_free(listener_);
  connections_.clear();
}

void H2cListener::Accept(int fd) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  bufferevent* bev = bufferevent_socket_new(base_, fd, BEV_OPT_CLOSE_ON_FREE);
  if (bev == nullptr) {
    close(fd);
    return;
  }
  auto connection = std::make_unique<Connection>(this, bev);
  if (!connection->Init()) return;  // its destructor closes the socket
  connections_.emplace(connection.get(), std::move(connection));
  if (on_connection_ != nullptr) on_connection_();
}

void H2cListener::Remove(Connection* connection) { connections_.erase(connection); }

}  // namespace montage::testing
