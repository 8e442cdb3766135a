#include "common/http/internal/h2c_pool.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/nghttp2_session.h"

namespace montage::http::internal {
namespace {

// Per-stream receive window: what a paused stream may hold back.
constexpr int32_t kStreamWindow = 1 << 20;
// The connection's window; returned as soon as data arrives (see OnDataChunk).
constexpr int32_t kConnectionWindow = 16 << 20;
// A response's headers, names and values together; more resets the stream (libcurl's limit).
constexpr size_t kMaxHeaderBytes = 100 << 10;

// Headers that belong to an HTTP/1.1 connection and must not appear in HTTP/2 (RFC 9113 8.2.2),
// and ones this client sets itself.
bool IsDroppedRequestHeader(absl::string_view lower_name) {
  return lower_name == "connection" || lower_name == "keep-alive" ||
         lower_name == "proxy-connection" || lower_name == "transfer-encoding" ||
         lower_name == "upgrade" || lower_name == "host" || lower_name == "expect" ||
         lower_name == "content-length" || lower_name == "te";
}

}  // namespace

// One HTTP/2 connection to one origin. Loop thread only. Owned by the pool; handles hold weak
// references. A connection that failed or drained stays in the pool (not accepting) until its
// last stream has reported, so that a paused stream that had its whole answer is still delivered.
class H2cConnection : public std::enable_shared_from_this<H2cConnection> {
 public:
  H2cConnection(H2cPool& pool, std::string key, H2cTarget target)
      : pool_(pool), key_(std::move(key)), target_(std::move(target)) {}

  ~H2cConnection() {
    if (dns_request_ != nullptr) evdns_getaddrinfo_cancel(dns_request_);
    if (session_ != nullptr) nghttp2_session_del(session_);
    for (event* ev : {flush_event_, connect_event_, connect_timer_, idle_timer_}) {
      if (ev != nullptr) event_free(ev);
    }
    if (bev_ != nullptr) bufferevent_free(bev_);
  }

  bool Init();

  const std::string& key() const { return key_; }
  bool accepting() const { return !closing_ && !draining_; }
  size_t open_streams() const { return open_; }
  size_t stream_limit() const {
    size_t limit =
        nghttp2_session_get_remote_settings(session_, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
    const uint32_t ours = pool_.options_.max_concurrent_streams;
    if (ours > 0) limit = std::min<size_t>(limit, ours);
    return limit;
  }

  // The stream id, or nghttp2's error (NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE: this connection is
  // used up; it drains).
  int32_t Submit(H2cRequest& request, H2cStreamSink* sink);

  void ResetStream(int32_t id) {
    auto it = streams_.find(id);
    if (it == streams_.end()) return;
    const bool open = !it->second->closed;
    streams_.erase(it);
    if (open) {
      StreamEnded();
      if (!closing_) nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
    }
    // A connection still coming up that nobody waits for any more stops trying.
    if (!connected_ && open_ == 0) return Close();
    ScheduleFlush();
  }

  void ResumeStream(int32_t id) {
    Stream* stream = Find(id);
    if (stream == nullptr || !stream->paused) return;
    std::shared_ptr<H2cConnection> keep = shared_from_this();
    stream->paused = false;
    if (!stream->held.empty()) {
      std::string held;
      held.swap(stream->held);
      if (!Deliver(id, held)) return;
      stream = Find(id);
    }
    if (stream->closed && !stream->paused) to_report_.push_back(id);
    ScheduleFlush();  // window updates, and the report of a stream that ended while paused
  }

 private:
  friend class H2cPool;

  struct Stream {
    int32_t id = 0;
    H2cStreamSink* sink = nullptr;
    absl::string_view body;
    size_t body_offset = 0;
    int status = 0;
    Headers headers;
    size_t header_bytes = 0;
    bool headers_delivered = false;
    bool paused = false;
    std::string held;    // data that arrived while paused
    bool ended = false;  // the server sent END_STREAM
    bool closed = false;
    H2cClose close;
    // While the connection is not up: when this stream stops waiting for it (its request's
    // connect_timeout after it was submitted).
    absl::Time connect_deadline = absl::InfiniteFuture();
    absl::Duration connect_timeout;
  };

  Stream* Find(int32_t id) {
    auto it = streams_.find(id);
    return it == streams_.end() ? nullptr : it->second.get();
  }

  void ArmIdleTimerIfUnused() {
    if (open_ == 0 && !closing_ && idle_timer_ != nullptr) {
      const timeval tv = absl::ToTimeval(pool_.options_.idle_timeout);
      evtimer_add(idle_timer_, &tv);
    }
  }

  // A stream stopped counting against the connection's limit.
  void StreamEnded() {
    --open_;
    ArmIdleTimerIfUnused();
    if (open_ == 0) pool_.RoomMayHaveFreed();  // it may be closed for another origin now
  }

  // The connect timer fires at `when` (the earliest connect deadline of the waiting streams).
  void ArmConnectTimerAt(absl::Time when) {
    armed_connect_deadline_ = when;
    const timeval tv = absl::ToTimeval(std::max(when - absl::Now(), absl::ZeroDuration()));
    evtimer_add(connect_timer_, &tv);
  }

  // The connection is not up yet: streams whose own connect_timeout passed end with
  // DEADLINE_EXCEEDED, a transport failure (retried as the request's policy says, like a failed
  // connect); the others wait on. With none left waiting, the connection gives up.
  void OnConnectTimer() {
    std::shared_ptr<H2cConnection> keep = shared_from_this();
    armed_connect_deadline_ = absl::InfiniteFuture();
    if (connected_ || closing_) return;
    const absl::Time now = absl::Now();
    absl::Time next = absl::InfiniteFuture();
    for (auto& [id, stream] : streams_) {
      if (stream->closed) continue;
      if (stream->connect_deadline > now) {
        next = std::min(next, stream->connect_deadline);
        continue;
      }
      stream->closed = true;
      stream->close.status = absl::DeadlineExceededError(
          absl::StrCat("no connection to ", target_.authority, " within ",
                       absl::ToInt64Milliseconds(stream->connect_timeout), " ms"));
      stream->close.transient = true;
      // Nothing is written to the socket before it connects (see Flush), so nghttp2 still holds
      // the HEADERS and drops them.
      nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
      StreamEnded();
      to_report_.push_back(id);
      // Retries and new requests open another connection; the ones still waiting stay.
      draining_ = true;
    }
    if (next == absl::InfiniteFuture()) {
      return Fail(absl::DeadlineExceededError(
                      absl::StrCat("no connection to ", target_.authority, " in time")),
                  true);
    }
    ArmConnectTimerAt(next);
    ScheduleFlush();  // reports the streams that gave up
  }

  // Hands `chunk` to the stream's sink. False when the stream is gone afterwards (reset by its
  // sink).
  bool Deliver(int32_t id, absl::string_view chunk) {
    Stream* stream = Find(id);
    const DataAction action = stream->sink->OnH2cData(chunk);
    stream = Find(id);
    if (stream == nullptr) return false;
    if (!closing_) nghttp2_session_consume_stream(session_, id, chunk.size());
    if (action == DataAction::kPause) stream->paused = true;
    return true;
  }

  void ScheduleFlush() {
    if (!flush_scheduled_ && flush_event_ != nullptr) {
      flush_scheduled_ = true;
      event_active(flush_event_, EV_TIMEOUT, 0);
    }
  }

  // Sends what nghttp2 has queued, reports streams that ended, and closes a connection that is
  // done. Runs from the loop, never inside nghttp2.
  void Flush() {
    flush_scheduled_ = false;
    std::shared_ptr<H2cConnection> keep = shared_from_this();
    // Before the socket connects nghttp2 keeps what it would send: a request that gives up
    // waiting is then dropped, not sent later behind a RST_STREAM.
    if (!closing_ && connected_) {
      if (const int error = Nghttp2Send(session_, bufferevent_get_output(bev_)); error != 0) {
        return Fail(absl::UnavailableError(absl::StrCat("HTTP/2 error: ", nghttp2_strerror(error))),
                    true);
      }
    }
    ReportClosed();
    if (closing_) {
      if (streams_.empty()) pool_.Remove(this);
      return;
    }
    if (nghttp2_session_want_read(session_) == 0 && nghttp2_session_want_write(session_) == 0) {
      return Fail(absl::UnavailableError("the server ended the HTTP/2 session"), true);
    }
    if (draining_ && open_ == 0) Close();
  }

  // Streams that ended report in the order they ended; a paused one waits for Resume, which
  // queues its report again.
  void ReportClosed() {
    std::vector<int32_t> ids;
    ids.swap(to_report_);
    for (int32_t id : ids) {
      auto it = streams_.find(id);
      // Gone: reset by its sink (perhaps by another stream's report).
      if (it == streams_.end() || it->second->paused) continue;
      std::unique_ptr<Stream> owned = std::move(it->second);
      streams_.erase(it);
      owned->sink->OnH2cClosed(std::move(owned->close));
    }
  }

  void OnRead() {
    std::shared_ptr<H2cConnection> keep = shared_from_this();
    if (closing_) return;
    if (const int error = Nghttp2Receive(session_, bufferevent_get_input(bev_)); error != 0) {
      return Fail(absl::UnavailableError(
                      absl::StrCat("HTTP/2 error from the server: ", nghttp2_strerror(error))),
                  true);
    }
    Flush();
  }

  void OnEvent(short what) {
    std::shared_ptr<H2cConnection> keep = shared_from_this();
    if ((what & BEV_EVENT_CONNECTED) != 0) {
      connected_ = true;
      evtimer_del(connect_timer_);
      armed_connect_deadline_ = absl::InfiniteFuture();
      const int one = 1;
      setsockopt(bufferevent_getfd(bev_), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      setsockopt(bufferevent_getfd(bev_), SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
      ScheduleFlush();  // what nghttp2 held until now
      return;
    }
    if (!connected_) {
      const int error = EVUTIL_SOCKET_ERROR();
      if (next_address_ < addresses_.size()) return ConnectNext();
      return Fail(absl::UnavailableError(absl::StrCat("cannot connect to ", target_.authority, ": ",
                                                      evutil_socket_error_to_string(error))),
                  true);
    }
    Fail(absl::UnavailableError((what & BEV_EVENT_EOF) != 0 ? "the server closed the connection"
                                                            : "the connection failed"),
         true);
  }

  void StartConnect();
  // Connects to the next address; a socket tried before is replaced (nothing was written to it:
  // Flush waits for the connection).
  void ConnectNext();
  bufferevent* NewSocket();

  // The connection is unusable: every stream still open ends with `status`.
  void Fail(absl::Status status, bool transient) {
    if (closing_) return;
    closing_ = true;
    pool_.RoomMayHaveFreed();
    for (auto& [id, stream] : streams_) {
      // One that ended already reports as it would have (a paused one after Resume).
      if (stream->closed) continue;
      stream->closed = true;
      stream->close.status = status;
      stream->close.transient = transient;
      stream->close.unprocessed = transient && working_ && !stream->headers_delivered;
      stream->paused = false;  // an unfinished answer is not delivered in part
      stream->held.clear();
      to_report_.push_back(id);
    }
    open_ = 0;
    ShutDownSocket();
    ScheduleFlush();  // reports, then leaves the pool
  }

  // Closes a connection with no open streams (idle, or drained after GOAWAY).
  void Close() {
    if (closing_) return;
    closing_ = true;
    pool_.RoomMayHaveFreed();
    ShutDownSocket();
    ScheduleFlush();
  }

  void ShutDownSocket() {
    if (bev_ != nullptr) {
      bufferevent_free(bev_);
      bev_ = nullptr;
    }
    if (idle_timer_ != nullptr) evtimer_del(idle_timer_);
    if (connect_timer_ != nullptr) evtimer_del(connect_timer_);
  }

  // nghttp2 callbacks. Streams are found by id: a stream reset by its sink is gone while nghttp2
  // may still deliver frames for it.
  static ssize_t ReadBody(nghttp2_session*, int32_t stream_id, uint8_t* buf, size_t length,
                          uint32_t* flags, nghttp2_data_source*, void* self) {
    Stream* stream = static_cast<H2cConnection*>(self)->Find(stream_id);
    if (stream == nullptr) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    const size_t n = std::min(length, stream->body.size() - stream->body_offset);
    std::memcpy(buf, stream->body.data() + stream->body_offset, n);
    stream->body_offset += n;
    if (stream->body_offset == stream->body.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return static_cast<ssize_t>(n);
  }

  static int OnHeader(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t, void* self) {
    Stream* stream = static_cast<H2cConnection*>(self)->Find(frame->hd.stream_id);
    if (stream == nullptr || stream->headers_delivered) return 0;  // gone, or trailers
    const absl::string_view n(reinterpret_cast<const char*>(name), namelen);
    const absl::string_view v(reinterpret_cast<const char*>(value), valuelen);
    stream->header_bytes += namelen + valuelen;
    if (stream->header_bytes > kMaxHeaderBytes) {
      stream->close.status = absl::ResourceExhaustedError(
          absl::StrCat("the server's response headers exceed ", kMaxHeaderBytes, " bytes"));
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets the stream
    }
    if (n == ":status") {
      if (!absl::SimpleAtoi(v, &stream->status)) stream->status = 0;
      return 0;
    }
    if (!absl::StartsWith(n, ":")) stream->headers.emplace_back(std::string(n), std::string(v));
    return 0;
  }

  static int OnFrameRecv(nghttp2_session*, const nghttp2_frame* frame, void* self) {
    auto* c = static_cast<H2cConnection*>(self);
    c->working_ = true;
    if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS) &&
        (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0) {
      if (Stream* stream = c->Find(frame->hd.stream_id); stream != nullptr) stream->ended = true;
    }
    if (frame->hd.type == NGHTTP2_GOAWAY) {
      // Streams above last_stream_id close with REFUSED_STREAM (retriable); the rest finish, and
      // new requests go to another connection.
      c->draining_ = true;
      return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    const int32_t id = frame->hd.stream_id;
    Stream* stream = c->Find(id);
    if (stream == nullptr || stream->headers_delivered) return 0;
    if (stream->status >= 100 && stream->status < 200) {
      stream->headers.clear();  // interim; the final answer follows
      stream->status = 0;
      return 0;
    }
    stream->headers_delivered = true;
    stream->sink->OnH2cHeaders(stream->status, std::move(stream->headers));
    return 0;
  }

  static int OnDataChunk(nghttp2_session* session, uint8_t, int32_t stream_id, const uint8_t* data,
                         size_t len, void* self) {
    auto* c = static_cast<H2cConnection*>(self);
    nghttp2_session_consume_connection(session, len);
    Stream* stream = c->Find(stream_id);
    if (stream == nullptr) return 0;
    const absl::string_view chunk(reinterpret_cast<const char*>(data), len);
    if (stream->paused) {
      stream->held.append(chunk.data(), chunk.size());
      return 0;
    }
    c->Deliver(stream_id, chunk);
    return 0;
  }

  static int OnStreamClose(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* self) {
    auto* c = static_cast<H2cConnection*>(self);
    Stream* stream = c->Find(stream_id);
    if (stream == nullptr || stream->closed) return 0;
    stream->closed = true;
    H2cClose& close = stream->close;
    if (!close.status.ok()) {
      // Set by a callback that refused the answer (its headers are too large): kept.
    } else if (error_code == NGHTTP2_NO_ERROR && stream->headers_delivered && stream->ended) {
      close.status = absl::OkStatus();
    } else if (error_code == NGHTTP2_REFUSED_STREAM) {
      // Also what nghttp2 reports for requests past a GOAWAY's last stream id.
      close.status = absl::UnavailableError("the server refused the HTTP/2 stream");
      close.transient = true;
      close.unprocessed = true;
    } else {
      close.status = absl::UnavailableError(
          error_code == NGHTTP2_NO_ERROR
              ? std::string("the server closed the HTTP/2 stream before the end of its answer")
              : absl::StrCat("the server reset the HTTP/2 stream: ",
                             nghttp2_http2_strerror(error_code)));
      close.transient = !stream->headers_delivered;
    }
    c->StreamEnded();
    c->to_report_.push_back(stream_id);
    c->ScheduleFlush();  // reports it once nghttp2 has returned
    return 0;
  }

  H2cPool& pool_;
  const std::string key_;
  const H2cTarget target_;
  nghttp2_session* session_ = nullptr;
  bufferevent* bev_ = nullptr;
  evdns_getaddrinfo_request* dns_request_ = nullptr;
  event* flush_event_ = nullptr;
  event* connect_event_ = nullptr;
  event* connect_timer_ = nullptr;
  event* idle_timer_ = nullptr;
  absl::Time armed_connect_deadline_ = absl::InfiniteFuture();
  bool flush_scheduled_ = false;
  bool connected_ = false;
  bool working_ = false;  // a frame from the server arrived
  bool resolved_ = false;
  // Where to connect, tried in order until one answers.
  std::vector<std::pair<sockaddr_storage, int>> addresses_;
  size_t next_address_ = 0;
  bool closing_ = false;
  bool draining_ = false;
  size_t open_ = 0;  // streams nghttp2 still runs (or queues)
  absl::flat_hash_map<int32_t, std::unique_ptr<Stream>> streams_;
  std::vector<int32_t> to_report_;  // streams that ended, to report after nghttp2 returns
};

bool H2cConnection::Init() {
  event_base* base = pool_.base_;
  flush_event_ = event_new(
      base, -1, 0,
      [](evutil_socket_t, short, void* self) { static_cast<H2cConnection*>(self)->Flush(); }, this);
  connect_event_ = event_new(
      base, -1, 0,
      [](evutil_socket_t, short, void* self) { static_cast<H2cConnection*>(self)->StartConnect(); },
      this);
  connect_timer_ = evtimer_new(
      base,
      [](evutil_socket_t, short, void* self) {
        static_cast<H2cConnection*>(self)->OnConnectTimer();
      },
      this);
  idle_timer_ = evtimer_new(
      base,
      [](evutil_socket_t, short, void* self) {
        auto* c = static_cast<H2cConnection*>(self);
        std::shared_ptr<H2cConnection> keep = c->shared_from_this();
        if (c->open_ == 0) c->Close();
      },
      this);
  if (flush_event_ == nullptr || connect_event_ == nullptr || connect_timer_ == nullptr ||
      idle_timer_ == nullptr) {
    return false;
  }

  Nghttp2SessionSpec spec;
  spec.on_header = &OnHeader;
  spec.on_frame_recv = &OnFrameRecv;
  spec.on_data_chunk_recv = &OnDataChunk;
  spec.on_stream_close = &OnStreamClose;
  spec.manual_window_updates = true;  // see OnDataChunk and Deliver
  spec.settings = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kStreamWindow}};
  spec.connection_window = kConnectionWindow;
  session_ = NewNghttp2Session(spec, this);
  if (session_ == nullptr) return false;
  bev_ = NewSocket();
  if (bev_ == nullptr) return false;
  // Connecting (and failing to) happens on the next loop turn, so that no sink hears anything
  // from inside H2cPool::Start.
  event_active(connect_event_, EV_TIMEOUT, 0);
  return true;
}

void H2cConnection::StartConnect() {
  if (closing_) return;
  // An address needs no resolver ("[::1]:8080" or "127.0.0.1:8080").
  sockaddr_storage address{};
  int length = sizeof(address);
  const std::string host_port = absl::StrCat(target_.host, ":", target_.port);
  if (evutil_parse_sockaddr_port(host_port.c_str(), reinterpret_cast<sockaddr*>(&address),
                                 &length) == 0) {
    addresses_.emplace_back(address, length);
    return ConnectNext();
  }
  std::string name(absl::StripSuffix(absl::StripPrefix(target_.host, "["), "]"));
  // A name pinned to addresses (HttpClientOptions::resolve) is not looked up.
  if (auto pinned =
          pool_.options_.resolve.find(absl::StrCat(absl::AsciiStrToLower(name), ":", target_.port));
      pinned != pool_.options_.resolve.end()) {
    addresses_ = pinned->second;
    return ConnectNext();
  }
  evdns_base* dns = pool_.Resolver();
  if (dns == nullptr) {
    return Fail(absl::UnavailableError("cannot start the DNS resolver"), true);
  }
  evutil_addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  hints.ai_flags = EVUTIL_AI_ADDRCONFIG;
  // The callback may run before evdns_getaddrinfo returns (names from /etc/hosts).
  evdns_getaddrinfo_request* request = evdns_getaddrinfo(
      dns, name.c_str(), target_.port.c_str(), &hints,
      [](int result, evutil_addrinfo* found, void* self) {
        if (result == EVUTIL_EAI_CANCEL) return;  // the connection is being destroyed
        auto* c = static_cast<H2cConnection*>(self);
        std::shared_ptr<H2cConnection> keep = c->shared_from_this();
        c->dns_request_ = nullptr;
        c->resolved_ = true;
        if (result != 0 || found == nullptr) {
          if (found != nullptr) evutil_freeaddrinfo(found);
          return c->Fail(absl::UnavailableError(absl::StrCat("cannot resolve ", c->target_.host,
                                                             ": ", evutil_gai_strerror(result))),
                         true);
        }
        for (evutil_addrinfo* a = found; a != nullptr; a = a->ai_next) {
          if (a->ai_addrlen > sizeof(sockaddr_storage)) continue;
          sockaddr_storage storage{};
          std::memcpy(&storage, a->ai_addr, a->ai_addrlen);
          c->addresses_.emplace_back(storage, static_cast<int>(a->ai_addrlen));
        }
        evutil_freeaddrinfo(found);
        c->ConnectNext();
      },
      this);
  if (!resolved_) dns_request_ = request;
}

bufferevent* H2cConnection::NewSocket() {
  bufferevent* bev = bufferevent_socket_new(pool_.base_, -1, BEV_OPT_CLOSE_ON_FREE);
  if (bev == nullptr) return nullptr;
  bufferevent_setcb(
      bev, [](bufferevent*, void* self) { static_cast<H2cConnection*>(self)->OnRead(); }, nullptr,
      [](bufferevent*, short what, void* self) {
        static_cast<H2cConnection*>(self)->OnEvent(what);
      },
      this);
  bufferevent_enable(bev, EV_READ | EV_WRITE);
  return bev;
}

void H2cConnection::ConnectNext() {
  while (!closing_ && next_address_ < addresses_.size()) {
    const auto& [address, length] = addresses_[next_address_++];
    if (next_address_ > 1) {
      bufferevent* fresh = NewSocket();
      if (fresh == nullptr) break;
      bufferevent_free(bev_);
      bev_ = fresh;
    }
    if (bufferevent_socket_connect(bev_, reinterpret_cast<const sockaddr*>(&address), length) ==
        0) {
      return;
    }
  }
  Fail(absl::UnavailableError(absl::StrCat("cannot connect to ", target_.authority)), true);
}

int32_t H2cConnection::Submit(H2cRequest& request, H2cStreamSink* sink) {
  std::vector<std::string> lowered;  // names in lower case, alive until submitted
  const Headers empty;
  const Headers& given = request.headers != nullptr ? *request.headers : empty;
  lowered.reserve(given.size() + request.extra_headers.size());
  std::vector<nghttp2_nv> nva;
  nva.reserve(given.size() + request.extra_headers.size() + 6);
  absl::string_view authority = target_.authority;
  bool has_user_agent = false;
  for (const Headers* list : {&given, static_cast<const Headers*>(&request.extra_headers)}) {
    for (const auto& [name, value] : *list) {
      lowered.push_back(absl::AsciiStrToLower(name));
      const std::string& lower = lowered.back();
      if (lower == "host") authority = value;
      if (IsDroppedRequestHeader(lower)) continue;
      has_user_agent = has_user_agent || lower == "user-agent";
      nva.push_back(Nghttp2Header(lower, value));
    }
  }
  std::vector<nghttp2_nv> pseudo = {
      Nghttp2Header(":method", request.method), Nghttp2Header(":scheme", "http"),
      Nghttp2Header(":authority", authority), Nghttp2Header(":path", request.path)};
  nva.insert(nva.begin(), pseudo.begin(), pseudo.end());
  const std::string content_length = absl::StrCat(request.body.size());
  const bool has_body = !request.body.empty() || request.method == "POST" ||
                        request.method == "PUT" || request.method == "PATCH";
  if (has_body) nva.push_back(Nghttp2Header("content-length", content_length));
  if (!has_user_agent) nva.push_back(Nghttp2Header("user-agent", "montage-http/1"));

  auto stream = std::make_unique<Stream>();
  stream->sink = sink;
  stream->body = request.body;
  nghttp2_data_provider provider;
  provider.source.ptr = nullptr;
  provider.read_callback = &ReadBody;
  const int32_t id = nghttp2_submit_request(session_, nullptr, nva.data(), nva.size(),
                                            request.body.empty() ? nullptr : &provider, nullptr);
  if (id < 0) {
    if (id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE) {
      draining_ = true;
      ScheduleFlush();  // closes once its streams are done
    }
    return id;
  }
  stream->id = id;
  if (!connected_) {
    stream->connect_timeout = request.connect_timeout > absl::ZeroDuration()
                                  ? request.connect_timeout
                                  : absl::Seconds(300);
    stream->connect_deadline = absl::Now() + stream->connect_timeout;
  }
  if (!connected_ && stream->connect_deadline < armed_connect_deadline_) {
    ArmConnectTimerAt(stream->connect_deadline);
  }
  streams_.emplace(id, std::move(stream));
  ++open_;
  evtimer_del(idle_timer_);
  ScheduleFlush();
  return id;
}

H2cPool::H2cPool(event_base* base, H2cPoolOptions options)
    : base_(base), options_(std::move(options)) {
  room_event_ = event_new(
      base_, -1, 0,
      [](evutil_socket_t, short, void* self) {
        auto* pool = static_cast<H2cPool*>(self);
        if (pool->options_.on_room) pool->options_.on_room();
      },
      this);
}

void H2cPool::RoomMayHaveFreed() {
  if (options_.max_total_connections > 0 && options_.on_room && room_event_ != nullptr) {
    event_active(room_event_, EV_TIMEOUT, 0);
  }
}

size_t H2cPool::LiveConnections() const {
  size_t live = 0;
  for (const auto& [key, list] : connections_) {
    for (const auto& connection : list) live += connection->closing_ ? 0 : 1;
  }
  return live;
}

bool H2cPool::MakeRoomFor(const H2cTarget& target) {
  if (options_.max_total_connections == 0) return true;
  // The origin's own connections take the request (nghttp2 queues past their stream limits).
  if (auto it = connections_.find(absl::StrCat(target.host, ":", target.port));
      it != connections_.end()) {
    for (const auto& connection : it->second) {
      if (connection->accepting()) return true;
    }
  }
  if (LiveConnections() < options_.max_total_connections) return true;
  // At the limit: an idle connection of another origin is closed to make room.
  for (const auto& [key, list] : connections_) {
    for (const auto& connection : list) {
      if (connection->accepting() && connection->open_streams() == 0) {
        connection->Close();
        return true;
      }
    }
  }
  return false;
}

absl::Status H2cPool::ParseResolve(
    const std::vector<std::string>& entries,
    absl::flat_hash_map<std::string, std::vector<std::pair<sockaddr_storage, int>>>& out) {
  for (size_t i = 0; i < entries.size(); ++i) {
    const absl::string_view entry = entries[i];
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(
          absl::StrCat("resolve[", i, "]: ", why,
                       "; expected HOST:PORT:ADDRESS[,ADDRESS]... as curl's --resolve"));
    };
    // HOST, possibly [IPv6], then :PORT:, then the addresses.
    size_t host_end = 0;
    absl::string_view host;
    if (absl::StartsWith(entry, "[")) {
      host_end = entry.find(']');
      if (host_end == absl::string_view::npos) return bad("no ']' after the host");
      host = entry.substr(1, host_end - 1);
      ++host_end;
    } else {
      host_end = entry.find(':');
      if (host_end == absl::string_view::npos) return bad("no port");
      host = entry.substr(0, host_end);
    }
    if (host.empty() || host_end >= entry.size() || entry[host_end] != ':') return bad("no host");
    const absl::string_view rest = entry.substr(host_end + 1);
    const size_t port_end = rest.find(':');
    uint32_t port = 0;
    if (port_end == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, port_end), &port) ||
        port == 0 || port > 65535) {
      return bad("the port must be a number from 1 to 65535");
    }
    std::vector<std::pair<sockaddr_storage, int>> addresses;
    for (absl::string_view address : absl::StrSplit(rest.substr(port_end + 1), ',')) {
      address = absl::StripAsciiWhitespace(address);
      if (!absl::StartsWith(address, "[") && address.find(':') != absl::string_view::npos) {
        return bad(absl::StrCat("write the IPv6 address \"", address, "\" in brackets"));
      }
      const std::string with_port = absl::StrCat(address, ":", port);
      sockaddr_storage storage{};
      int length = sizeof(storage);
      if (address.empty() ||
          evutil_parse_sockaddr_port(with_port.c_str(), reinterpret_cast<sockaddr*>(&storage),
                                     &length) != 0) {
        return bad(absl::StrCat("\"", address, "\" is not an IP address"));
      }
      addresses.emplace_back(storage, length);
    }
    out[absl::StrCat(absl::AsciiStrToLower(host), ":", port)] = std::move(addresses);
  }
  return absl::OkStatus();
}

H2cPool::~H2cPool() {
  // Connections may be kept alive by a flush in progress further up the stack; clearing the map
  // drops the owning references.
  connections_.clear();
  if (room_event_ != nullptr) event_free(room_event_);
  if (dns_ != nullptr) evdns_base_free(dns_, /*fail_requests=*/0);
}

evdns_base* H2cPool::Resolver() {
  if (dns_ == nullptr) dns_ = evdns_base_new(base_, EVDNS_BASE_INITIALIZE_NAMESERVERS);
  return dns_;
}

absl::StatusOr<H2cPool::Handle> H2cPool::Start(const H2cTarget& target, H2cRequest request,
                                               H2cStreamSink* sink) {
  const std::string key = absl::StrCat(target.host, ":", target.port);
  auto& list = connections_[key];
  // Two tries: a connection that ran out of stream ids drains, and the second try opens another.
  for (int attempt = 0; attempt < 2; ++attempt) {
    H2cConnection* chosen = nullptr;
    H2cConnection* least = nullptr;
    size_t accepting = 0;
    for (const auto& connection : list) {
      if (!connection->accepting()) continue;
      ++accepting;
      if (connection->open_streams() < connection->stream_limit()) {
        chosen = connection.get();
        break;
      }
      if (least == nullptr || connection->open_streams() < least->open_streams()) {
        least = connection.get();
      }
    }
    const bool room_for_another =
        options_.max_total_connections == 0 || LiveConnections() < options_.max_total_connections;
    if (chosen == nullptr && room_for_another &&
        (options_.max_connections_per_host == 0 || accepting < options_.max_connections_per_host)) {
      auto connection = std::make_shared<H2cConnection>(*this, key, target);
      if (!connection->Init()) {
        if (list.empty()) connections_.erase(key);
        return absl::ResourceExhaustedError("cannot set up an HTTP/2 connection");
      }
      list.push_back(connection);
      chosen = connection.get();
    }
    if (chosen == nullptr) chosen = least;
    if (chosen == nullptr) {
      return absl::ResourceExhaustedError(
          "no HTTP/2 connection may be opened: max_total_connections is reached");
    }
    const int32_t id = chosen->Submit(request, sink);
    if (id > 0) return Handle{chosen->weak_from_this(), id};
    chosen->ArmIdleTimerIfUnused();
    if (id != NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot send the HTTP/2 request: ", nghttp2_strerror(id)));
    }
  }
  return absl::UnavailableError("no HTTP/2 stream available");
}

void H2cPool::Reset(Handle& handle) {
  std::shared_ptr<H2cConnection> connection = handle.connection.lock();
  handle.connection.reset();
  if (connection != nullptr) connection->ResetStream(handle.stream_id);
}

void H2cPool::Resume(const Handle& handle) {
  std::shared_ptr<H2cConnection> connection = handle.connection.lock();
  if (connection != nullptr) connection->ResumeStream(handle.stream_id);
}

void H2cPool::Remove(H2cConnection* connection) {
  auto it = connections_.find(connection->key());
  if (it == connections_.end()) return;
  auto& list = it->second;
  list.erase(std::remove_if(list.begin(), list.end(),
                            [&](const auto& c) { return c.get() == connection; }),
             list.end());
  if (list.empty()) connections_.erase(it);
}

}  // namespace montage::http::internal
