#include "gateway/proxy/h2_upstream.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/nghttp2_session.h"
#include "gateway/proxy/upstream.h"
#include "gateway/proxy/upstream_call.h"
#include "gateway/server/event_loop.h"

namespace montage::gateway {
namespace {

constexpr size_t kFrameHeader = 5;
// Envoy's defaults for an upstream HTTP/2 connection's receive windows (256 MiB each).
constexpr uint32_t kDefaultWindow = 256u << 20;

}  // namespace

// One HTTP/2 connection to one host. Loop thread only. Owned by its pool; calls hold weak
// references.
class H2UpstreamConnection : public std::enable_shared_from_this<H2UpstreamConnection> {
 public:
  H2UpstreamConnection(H2UpstreamPool& pool, Cluster& cluster, UpstreamHost& host)
      : pool_(pool), cluster_(cluster), host_(host), stats_(cluster.stats()) {}

  ~H2UpstreamConnection() {
    // Calls still open are dropped without a report (the pool is going away).
    for (auto it = streams_.begin(); it != streams_.end();) DropStream(it++);
    if (session_ != nullptr) nghttp2_session_del(session_);
    if (flush_event_ != nullptr) event_free(flush_event_);
    if (ping_timer_ != nullptr) event_free(ping_timer_);
    if (bev_ != nullptr) bufferevent_free(bev_);
    if (counted_) host_.direct_connections_.fetch_sub(1, std::memory_order_relaxed);
  }

  // False when the socket or session could not even be set up (the caller fails its call).
  bool Connect();

  bool accepting() const { return !closing_ && !draining_; }

  // kPendingOverflow when the request would wait for a stream and the cluster's
  // max_pending_requests are taken; NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE (or another nghttp2
  // error) when it could not be submitted here; the stream id otherwise.
  static constexpr int32_t kPendingOverflow = -100000;
  int32_t Submit(H2UnaryRequest& request, std::shared_ptr<bool> cancelled,
                 std::function<void(UnaryResult&)> done);

  void CancelStream(int32_t id) {
    auto it = streams_.find(id);
    if (it == streams_.end()) return;
    DropStream(it);
    if (session_ != nullptr && !closing_) {
      nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
      ScheduleFlush();
    }
  }

 private:
  struct Stream {
    H2UpstreamConnection* connection = nullptr;
    int32_t id = -1;
    std::string out;  // the framed request message
    size_t out_offset = 0;
    std::function<void(UnaryResult&)> done;
    event* deadline_timer = nullptr;
    int http_status = 0;
    bool headers_done = false;  // the first HEADERS block ended
    bool has_grpc_status = false;
    int grpc_status = 0;
    std::string grpc_message;
    std::string grpc_details;
    HeaderList initial;
    HeaderList trailing;
    std::string body;
    bool timed_out = false;
    bool pending = false;  // counted in the cluster's pending requests until HEADERS go out
    std::shared_ptr<bool> cancelled;
  };
  using StreamMap = absl::flat_hash_map<int32_t, std::unique_ptr<Stream>>;

  void DropStream(StreamMap::iterator it) {
    if (it->second->deadline_timer != nullptr) event_free(it->second->deadline_timer);
    if (it->second->pending) cluster_.RemovePending();
    streams_.erase(it);
  }

  void ScheduleFlush() {
    if (!flush_scheduled_ && flush_event_ != nullptr) {
      flush_scheduled_ = true;
      event_active(flush_event_, EV_TIMEOUT, 0);
    }
  }

  // Moves what nghttp2 has to send into the socket's buffer; closes when the session is done.
  void Flush() {
    flush_scheduled_ = false;
    if (closing_) return;
    if (const int error = Nghttp2Send(session_, bufferevent_get_output(bev_)); error != 0) {
      Fail(absl::StrCat("HTTP/2 error: ", nghttp2_strerror(error)));
      return;
    }
    RunCompletions();
    if (!closing_ && nghttp2_session_want_read(session_) == 0 &&
        nghttp2_session_want_write(session_) == 0) {
      Fail("upstream closed the HTTP/2 session");
    }
  }

  void OnRead() {
    if (closing_) return;
    if (const int error = Nghttp2Receive(session_, bufferevent_get_input(bev_)); error != 0) {
      Fail(absl::StrCat("HTTP/2 error from upstream: ", nghttp2_strerror(error)));
      return;
    }
    Flush();
  }

  void OnEvent(short what) {
    if (what & BEV_EVENT_CONNECTED) {
      connected_ = true;
      bufferevent_set_timeouts(bev_, nullptr, nullptr);
      const int one = 1;
      setsockopt(bufferevent_getfd(bev_), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      setsockopt(bufferevent_getfd(bev_), SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
      host_.direct_connections_.fetch_add(1, std::memory_order_relaxed);
      counted_ = true;
      StartKeepalive();
      return;
    }
    if (!connected_) {
      Fail((what & BEV_EVENT_TIMEOUT) != 0 ? "connection timeout" : "connection failure");
      return;
    }
    Fail(what & BEV_EVENT_EOF ? "upstream closed the connection" : "upstream connection error");
  }

  // HTTP/2 PINGs every connection_keepalive.interval when the cluster asks for them; no answer
  // within connection_keepalive.timeout (20 s when unset) ends the connection, so a host that
  // vanished without a FIN or RST does not keep taking calls.
  void StartKeepalive() {
    const config::Http2Options& h2 = cluster_.config().http2_options;
    if (!h2.keepalive_interval.has_value() || *h2.keepalive_interval <= absl::ZeroDuration()) {
      return;
    }
    ping_timeout_ = h2.keepalive_timeout.value_or(absl::Seconds(20));
    ping_timer_ = event_new(
        pool_.loop_.base(), -1, EV_PERSIST,
        [](evutil_socket_t, short, void* self) {
          auto* c = static_cast<H2UpstreamConnection*>(self);
          std::shared_ptr<H2UpstreamConnection> keep = c->shared_from_this();
          c->Ping();
        },
        this);
    const timeval tv = absl::ToTimeval(*h2.keepalive_interval);
    if (ping_timer_ != nullptr) evtimer_add(ping_timer_, &tv);
  }

  void Ping() {
    if (closing_) return;
    if (ping_outstanding_) {
      if (absl::Now() - ping_sent_ > ping_timeout_) Fail("keepalive timeout");
      return;
    }
    if (nghttp2_submit_ping(session_, NGHTTP2_FLAG_NONE, nullptr) != 0) return;
    ping_outstanding_ = true;
    ping_sent_ = absl::Now();
    ScheduleFlush();
  }

  // The connection is unusable: every open call fails UNAVAILABLE (a connect failure or a reset
  // before any answer is safe to retry), then the pool forgets it.
  void Fail(absl::string_view reason) {
    if (closing_) return;
    closing_ = true;
    const std::string message = absl::StrCat(
        "upstream connect error or disconnect/reset before headers. reset reason: ", reason);
    for (auto& [id, stream] : streams_) {
      if (stream->done == nullptr) continue;
      UnaryResult result;
      result.status = stream->timed_out
                          ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded")
                          : grpc::Status(grpc::StatusCode::UNAVAILABLE, message);
      completions_.push_back({stream->cancelled, std::move(stream->done), std::move(result)});
    }
    for (auto it = streams_.begin(); it != streams_.end();) DropStream(it++);
    if (bev_ != nullptr) bufferevent_disable(bev_, EV_READ | EV_WRITE);
    RunCompletions();
    pool_.Remove(this);  // may destroy this
  }

  // Reports run after nghttp2 has returned: a report may start or cancel other calls.
  void RunCompletions() {
    if (completions_.empty()) return;
    std::vector<Completion> ready;
    ready.swap(completions_);
    std::shared_ptr<H2UpstreamConnection> keep = shared_from_this();
    // A report may cancel a call whose report is also ready: that one is dropped.
    for (Completion& c : ready) {
      if (!*c.cancelled) c.done(c.result);
    }
  }

  void Complete(Stream& stream, uint32_t error_code) {
    if (stream.done == nullptr) return;
    UnaryResult result;
    result.initial_metadata = std::move(stream.initial);
    result.trailing_metadata = std::move(stream.trailing);
    if (stream.timed_out) {
      result.status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded");
    } else if (stream.has_grpc_status) {
      result.status = grpc::Status(static_cast<grpc::StatusCode>(stream.grpc_status),
                                   std::move(stream.grpc_message), std::move(stream.grpc_details));
    } else if (error_code != NGHTTP2_NO_ERROR) {
      result.status = grpc::Status(
          GrpcCodeForH2Error(error_code),
          absl::StrCat("upstream reset the stream: ", nghttp2_http2_strerror(error_code)));
    } else if (stream.http_status != 200 && stream.http_status != 0) {
      result.status = grpc::Status(
          GrpcCodeForHttpStatus(stream.http_status),
          absl::StrCat("upstream answered HTTP ", stream.http_status, " without a grpc-status"));
    } else {
      result.status =
          grpc::Status(grpc::StatusCode::INTERNAL, "upstream ended the call without a grpc-status");
    }
    if (result.status.ok()) {
      // Exactly one uncompressed message.
      const std::string& body = stream.body;
      if (body.size() < kFrameHeader) {
        result.status =
            grpc::Status(grpc::StatusCode::INTERNAL, "upstream answered OK without a message");
      } else {
        const auto* p = reinterpret_cast<const uint8_t*>(body.data());
        const size_t length =
            (size_t{p[1]} << 24) | (size_t{p[2]} << 16) | (size_t{p[3]} << 8) | p[4];
        if ((p[0] & 0x01) != 0) {
          result.status = grpc::Status(grpc::StatusCode::INTERNAL,
                                       "upstream sent a compressed message the gateway did not "
                                       "ask for (grpc-accept-encoding: identity)");
        } else if (body.size() != kFrameHeader + length) {
          result.status = grpc::Status(grpc::StatusCode::INTERNAL,
                                       "upstream's unary answer was not exactly one gRPC message");
        } else {
          result.response = body.substr(kFrameHeader);
        }
      }
    }
    completions_.push_back({stream.cancelled, std::move(stream.done), std::move(result)});
    stream.done = nullptr;
  }

  // nghttp2 callbacks.
  // By stream id, not by pointer: a cancelled call's stream is gone while nghttp2 may still
  // hold its request (the reset then goes out instead).
  static ssize_t ReadRequest(nghttp2_session*, int32_t stream_id, uint8_t* buf, size_t length,
                             uint32_t* flags, nghttp2_data_source*, void* self) {
    Stream* stream = static_cast<H2UpstreamConnection*>(self)->Find(stream_id);
    if (stream == nullptr) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    const size_t n = std::min(length, stream->out.size() - stream->out_offset);
    std::memcpy(buf, stream->out.data() + stream->out_offset, n);
    stream->out_offset += n;
    if (stream->out_offset == stream->out.size()) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      std::string().swap(stream->out);
      stream->out_offset = 0;
    }
    return static_cast<ssize_t>(n);
  }

  Stream* Find(int32_t id) {
    auto it = streams_.find(id);
    return it == streams_.end() ? nullptr : it->second.get();
  }

  static int OnHeader(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t, void* self) {
    auto* c = static_cast<H2UpstreamConnection*>(self);
    Stream* stream = c->Find(frame->hd.stream_id);
    if (stream == nullptr) return 0;
    const absl::string_view n(reinterpret_cast<const char*>(name), namelen);
    const absl::string_view v(reinterpret_cast<const char*>(value), valuelen);
    if (n == ":status") {
      int status = 0;
      if (absl::SimpleAtoi(v, &status)) stream->http_status = status;
      return 0;
    }
    if (n == "grpc-status") {
      int code = 0;
      if (absl::SimpleAtoi(v, &code) && code >= 0 && code <= 16) {
        stream->has_grpc_status = true;
        stream->grpc_status = code;
      } else {
        stream->has_grpc_status = true;
        stream->grpc_status = grpc::StatusCode::UNKNOWN;
      }
      return 0;
    }
    if (n == "grpc-message") {
      stream->grpc_message = PercentDecodeGrpcMessage(v);
      return 0;
    }
    if (n == "grpc-status-details-bin") {
      std::string decoded;
      if (absl::Base64Unescape(v, &decoded)) stream->grpc_details = std::move(decoded);
      return 0;
    }
    if (absl::StartsWith(n, ":") || IsReservedMetadata(n)) return 0;
    // The first block is the response's headers; a later one (or the only one, trailers-only)
    // carries trailers.
    const bool trailers = stream->headers_done || (frame->hd.flags & NGHTTP2_FLAG_END_STREAM);
    (trailers ? stream->trailing : stream->initial).emplace_back(std::string(n), std::string(v));
    return 0;
  }

  // A request's HEADERS went out: it holds a stream now, no longer waits for one.
  static int OnFrameSend(nghttp2_session*, const nghttp2_frame* frame, void* self) {
    auto* c = static_cast<H2UpstreamConnection*>(self);
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    Stream* stream = c->Find(frame->hd.stream_id);
    if (stream != nullptr && stream->pending) {
      stream->pending = false;
      c->cluster_.RemovePending();
    }
    return 0;
  }

  static int OnFrameRecv(nghttp2_session*, const nghttp2_frame* frame, void* self) {
    auto* c = static_cast<H2UpstreamConnection*>(self);
    if (frame->hd.type == NGHTTP2_PING && (frame->hd.flags & NGHTTP2_FLAG_ACK)) {
      c->ping_outstanding_ = false;
      return 0;
    }
    if (frame->hd.type == NGHTTP2_GOAWAY) {
      // Streams above last_stream_id are closed by nghttp2 (REFUSED_STREAM: retriable); the rest
      // finish here, and new calls go to a new connection.
      c->draining_ = true;
      return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    Stream* stream = c->Find(frame->hd.stream_id);
    if (stream != nullptr) stream->headers_done = true;
    return 0;
  }

  static int OnDataChunk(nghttp2_session*, uint8_t, int32_t stream_id, const uint8_t* data,
                         size_t len, void* self) {
    auto* c = static_cast<H2UpstreamConnection*>(self);
    Stream* stream = c->Find(stream_id);
    if (stream != nullptr) stream->body.append(reinterpret_cast<const char*>(data), len);
    return 0;
  }

  static int OnStreamClose(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* self) {
    auto* c = static_cast<H2UpstreamConnection*>(self);
    auto it = c->streams_.find(stream_id);
    if (it == c->streams_.end()) return 0;
    c->Complete(*it->second, error_code);
    c->DropStream(it);
    if (c->draining_ && c->streams_.empty()) c->ScheduleFlush();  // closes once drained
    return 0;
  }

  H2UpstreamPool& pool_;
  Cluster& cluster_;
  UpstreamHost& host_;
  ClusterStats& stats_;
  bufferevent* bev_ = nullptr;
  nghttp2_session* session_ = nullptr;
  event* flush_event_ = nullptr;
  bool flush_scheduled_ = false;
  event* ping_timer_ = nullptr;
  absl::Duration ping_timeout_;
  bool ping_outstanding_ = false;
  absl::Time ping_sent_;
  bool connected_ = false;
  bool counted_ = false;
  bool closing_ = false;
  bool draining_ = false;
  // Open streams, and requests nghttp2 holds back until one of those closes (the upstream's
  // SETTINGS_MAX_CONCURRENT_STREAMS; Stream::pending).
  StreamMap streams_;
  struct Completion {
    std::shared_ptr<bool> cancelled;  // the call's: set by H2UnaryCall::Cancel
    std::function<void(UnaryResult&)> done;
    UnaryResult result;
  };
  std::vector<Completion> completions_;
};

bool H2UpstreamConnection::Connect() {
  const config::Cluster& cluster = cluster_.config();
  event_base* base = pool_.loop_.base();
  flush_event_ = event_new(
      base, -1, 0,
      [](evutil_socket_t, short, void* self) {
        auto* c = static_cast<H2UpstreamConnection*>(self);
        // Flush may end in Fail, which removes the connection from its pool.
        std::shared_ptr<H2UpstreamConnection> keep = c->shared_from_this();
        c->Flush();
        if (c->draining_ && c->streams_.empty() && !c->closing_) {
          c->closing_ = true;
          c->pool_.Remove(c);
        }
      },
      this);
  if (flush_event_ == nullptr) return false;
  const config::Http2Options& h2 = cluster.http2_options;
  Nghttp2SessionSpec spec;
  spec.on_header = &OnHeader;
  spec.on_frame_recv = &OnFrameRecv;
  spec.on_frame_send = &OnFrameSend;
  spec.on_data_chunk_recv = &OnDataChunk;
  spec.on_stream_close = &OnStreamClose;
  spec.settings = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
                    h2.initial_stream_window_size.value_or(kDefaultWindow)}};
  spec.connection_window = static_cast<int32_t>(std::min<uint32_t>(
      h2.initial_connection_window_size.value_or(kDefaultWindow), (1u << 31) - 1));
  session_ = NewNghttp2Session(spec, this);
  if (session_ == nullptr) return false;
  bev_ = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
  if (bev_ == nullptr) return false;
  bufferevent_setcb(
      bev_, [](bufferevent*, void* self) { static_cast<H2UpstreamConnection*>(self)->OnRead(); },
      nullptr,
      [](bufferevent*, short what, void* self) {
        auto* c = static_cast<H2UpstreamConnection*>(self);
        std::shared_ptr<H2UpstreamConnection> keep = c->shared_from_this();
        c->OnEvent(what);
      },
      this);
  const timeval connect_timeout = absl::ToTimeval(cluster.connect_timeout);
  bufferevent_set_timeouts(bev_, nullptr, &connect_timeout);
  bufferevent_enable(bev_, EV_READ | EV_WRITE);
  const UpstreamHost::DirectAddress& address = *host_.direct_address();
  if (bufferevent_socket_connect(bev_, reinterpret_cast<const sockaddr*>(&address.storage),
                                 static_cast<int>(address.length)) != 0) {
    return false;
  }
  ScheduleFlush();
  return true;
}

int32_t H2UpstreamConnection::Submit(H2UnaryRequest& request, std::shared_ptr<bool> cancelled,
                                     std::function<void(UnaryResult&)> done) {
  // Every stream the upstream allows is taken (or queued before this one): the request waits,
  // within the cluster's max_pending_requests.
  const size_t allowed =
      nghttp2_session_get_remote_settings(session_, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
  const bool pending = streams_.size() >= allowed;
  if (pending && !cluster_.TryAddPending()) return kPendingOverflow;
  auto stream = std::make_unique<Stream>();
  stream->pending = pending;
  stream->cancelled = std::move(cancelled);
  stream->connection = this;
  stream->done = std::move(done);
  const size_t length = request.message.size();
  stream->out.reserve(kFrameHeader + length);
  stream->out.push_back('\0');
  stream->out.push_back(static_cast<char>((length >> 24) & 0xff));
  stream->out.push_back(static_cast<char>((length >> 16) & 0xff));
  stream->out.push_back(static_cast<char>((length >> 8) & 0xff));
  stream->out.push_back(static_cast<char>(length & 0xff));
  stream->out.append(request.message);

  std::string timeout;
  if (request.deadline != absl::InfiniteFuture()) {
    timeout = GrpcTimeoutHeader(request.deadline - absl::Now());
  }
  std::vector<std::string> encoded;  // base64 of "-bin" values, alive until submitted
  encoded.reserve(request.metadata.size());
  std::vector<nghttp2_nv> nva;
  nva.reserve(8 + request.metadata.size());
  nva.push_back(Nghttp2Header(":method", "POST"));
  nva.push_back(Nghttp2Header(":scheme", "http"));
  nva.push_back(Nghttp2Header(":path", request.method));
  nva.push_back(Nghttp2Header(":authority", host_.address()));
  nva.push_back(Nghttp2Header("content-type", "application/grpc"));
  nva.push_back(Nghttp2Header("te", "trailers"));
  nva.push_back(Nghttp2Header("grpc-accept-encoding", "identity"));
  if (!timeout.empty()) nva.push_back(Nghttp2Header("grpc-timeout", timeout));
  for (const auto& [name, value] : request.metadata) {
    if (absl::EndsWith(name, "-bin")) {
      encoded.push_back(absl::Base64Escape(value));
      std::string& b64 = encoded.back();
      while (!b64.empty() && b64.back() == '=') b64.pop_back();
      nva.push_back(Nghttp2Header(name, b64));
    } else {
      nva.push_back(Nghttp2Header(name, value));
    }
  }
  nghttp2_data_provider provider;
  provider.source.ptr = nullptr;
  provider.read_callback = &ReadRequest;
  const int32_t id =
      nghttp2_submit_request(session_, nullptr, nva.data(), nva.size(), &provider, nullptr);
  if (id < 0) {
    if (pending) cluster_.RemovePending();
    if (id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE) {
      draining_ = true;
      if (streams_.empty()) ScheduleFlush();  // nothing left to finish: close
    }
    return id;
  }
  stream->id = id;
  if (request.deadline != absl::InfiniteFuture()) {
    stream->deadline_timer = evtimer_new(
        pool_.loop_.base(),
        [](evutil_socket_t, short, void* arg) {
          auto* s = static_cast<Stream*>(arg);
          H2UpstreamConnection* c = s->connection;
          s->timed_out = true;
          const int32_t id = s->id;
          if (s->pending) {
            // Still waiting for a stream: nghttp2 would close it (and let OnStreamClose report)
            // only when another stream ends. Report now.
            c->Complete(*s, NGHTTP2_CANCEL);
            c->DropStream(c->streams_.find(id));  // frees this timer and `s`
          }
          // Otherwise the stream closes with CANCEL and OnStreamClose reports DEADLINE_EXCEEDED.
          nghttp2_submit_rst_stream(c->session_, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
          c->ScheduleFlush();
        },
        stream.get());
    const timeval tv =
        absl::ToTimeval(std::max(absl::ZeroDuration(), request.deadline - absl::Now()));
    evtimer_add(stream->deadline_timer, &tv);
  }
  streams_.emplace(id, std::move(stream));
  ScheduleFlush();
  return id;
}

void H2UnaryCall::Cancel() {
  if (cancelled_ != nullptr) *cancelled_ = true;
  std::shared_ptr<H2UpstreamConnection> connection = connection_.lock();
  connection_.reset();
  if (connection != nullptr) connection->CancelStream(stream_id_);
}

H2UpstreamPool::~H2UpstreamPool() {
  // Connections may be referenced by completions in flight; clearing the map drops the last
  // owning references.
  connections_.clear();
}

void H2UpstreamPool::Remove(H2UpstreamConnection* connection) {
  for (auto it = connections_.begin(); it != connections_.end(); ++it) {
    auto& list = it->second;
    for (auto c = list.begin(); c != list.end(); ++c) {
      if (c->get() != connection) continue;
      // Destroyed outside of its own callbacks: the loop runs the release next.
      std::shared_ptr<H2UpstreamConnection> doomed = std::move(*c);
      list.erase(c);
      if (list.empty()) connections_.erase(it);
      loop_.Post([doomed = std::move(doomed)] {});
      return;
    }
  }
}

size_t H2UpstreamPool::connection_count() const {
  size_t n = 0;
  for (const auto& [host, list] : connections_) n += list.size();
  return n;
}

std::unique_ptr<H2UnaryCall> H2UpstreamPool::Start(Cluster& cluster, UpstreamHost& host,
                                                   H2UnaryRequest request,
                                                   std::function<void(UnaryResult&)> done) {
  auto call = std::make_unique<H2UnaryCall>();
  call->cancelled_ = std::make_shared<bool>(false);
  std::vector<std::shared_ptr<H2UpstreamConnection>>& list = connections_[&host];
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::shared_ptr<H2UpstreamConnection> connection;
    for (const auto& c : list) {
      if (c->accepting()) {
        connection = c;
        break;
      }
    }
    if (connection == nullptr) {
      connection = std::make_shared<H2UpstreamConnection>(*this, cluster, host);
      if (!connection->Connect()) break;
      list.push_back(connection);
    }
    const int32_t id = connection->Submit(request, call->cancelled_, done);
    if (id >= 0) {
      call->connection_ = connection;
      call->stream_id_ = id;
      return call;
    }
    if (id == H2UpstreamConnection::kPendingOverflow) {
      return FailSoon(std::move(call), std::move(done),
                      "upstream overflow: the cluster's max_pending_requests are waiting for a "
                      "stream already");
    }
    // Out of stream ids (the connection now drains): once more on a new connection.
  }
  if (list.empty()) connections_.erase(&host);
  return FailSoon(std::move(call), std::move(done),
                  "upstream connect error or disconnect/reset before headers. reset reason: "
                  "connection failure");
}

std::unique_ptr<H2UnaryCall> H2UpstreamPool::FailSoon(std::unique_ptr<H2UnaryCall> call,
                                                      std::function<void(UnaryResult&)> done,
                                                      std::string message) {
  // Reported from the loop, never inside Start(), and not at all once the call is cancelled.
  loop_.Post([cancelled = call->cancelled_, done = std::move(done),
              message = std::move(message)]() mutable {
    if (*cancelled) return;
    UnaryResult result;
    result.status = grpc::Status(grpc::StatusCode::UNAVAILABLE, std::move(message));
    done(result);
  });
  return call;
}

grpc::StatusCode GrpcCodeForHttpStatus(int http_status) {
  switch (http_status) {
    case 400:
      return grpc::StatusCode::INTERNAL;
    case 401:
      return grpc::StatusCode::UNAUTHENTICATED;
    case 403:
      return grpc::StatusCode::PERMISSION_DENIED;
    case 404:
      return grpc::StatusCode::UNIMPLEMENTED;
    case 429:
    case 502:
    case 503:
    case 504:
      return grpc::StatusCode::UNAVAILABLE;
    default:
      return grpc::StatusCode::UNKNOWN;
  }
}

grpc::StatusCode GrpcCodeForH2Error(uint32_t error_code) {
  switch (error_code) {
    case NGHTTP2_REFUSED_STREAM:
      return grpc::StatusCode::UNAVAILABLE;
    case NGHTTP2_CANCEL:
      return grpc::StatusCode::CANCELLED;
    case NGHTTP2_ENHANCE_YOUR_CALM:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case NGHTTP2_INADEQUATE_SECURITY:
      return grpc::StatusCode::PERMISSION_DENIED;
    default:
      return grpc::StatusCode::INTERNAL;
  }
}

std::string GrpcTimeoutHeader(absl::Duration remaining) {
  constexpr int64_t kMax = 99999999;  // eight digits
  const int64_t ns = std::max<int64_t>(1, absl::ToInt64Nanoseconds(remaining));
  // Rounded up so the upstream never gets less time than the gateway allows.
  const struct {
    int64_t ns_per_unit;
    char unit;
  } units[] = {{1000, 'u'},
               {1000000, 'm'},
               {1000000000, 'S'},
               {int64_t{60} * 1000000000, 'M'},
               {int64_t{3600} * 1000000000, 'H'}};
  for (const auto& u : units) {
    const int64_t value = ns / u.ns_per_unit + (ns % u.ns_per_unit != 0 ? 1 : 0);
    if (value <= kMax) return absl::StrCat(value, std::string(1, u.unit));
  }
  return absl::StrCat(kMax, "H");
}

std::string PercentDecodeGrpcMessage(absl::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    if (value[i] == '%' && i + 2 < value.size() &&
        absl::ascii_isxdigit(static_cast<unsigned char>(value[i + 1])) &&
        absl::ascii_isxdigit(static_cast<unsigned char>(value[i + 2]))) {
      auto hex = [](char c) {
        return c <= '9' ? c - '0' : (absl::ascii_tolower(static_cast<unsigned char>(c)) - 'a' + 10);
      };
      out.push_back(static_cast<char>(hex(value[i + 1]) * 16 + hex(value[i + 2])));
      i += 2;
    } else {
      out.push_back(value[i]);
    }
  }
  return out;
}

}  // namespace montage::gateway
