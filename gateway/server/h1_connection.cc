// HTTP/1.1 downstream connections: libhttp-parser's request parser over a libevent bufferevent.
//
// One request at a time. The parser pauses at the end of every request and is fed again only
// once that request's stream has finished, so pipelined requests wait, unparsed, in the input
// buffer and are answered in order. The socket is still read while a response is pending (up to
// kMaxBufferedInput; libevent stops reading above that), so a client that goes away is noticed
// and its handler told at once.
//
// Request bodies are fed to the parser only while the handler holds less than a window of
// delivered, unconsumed bytes; the rest stays in the input buffer, which then fills up and stops
// the reading.
//
// Handlers are never called back from inside their own calls into the stream: a stream method
// only records what it was asked (and writes response bytes), and Advance(), which runs from the
// loop, acts on it: retires a finished stream, dispatches the next request, closes.
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <http_parser.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gateway/server/connection.h"
#include "gateway/server/event_loop.h"

namespace montage::gateway {
namespace {

// Bytes read from the client and not yet parsed (pipelined requests, body beyond the window).
constexpr size_t kMaxBufferedInput = 1 << 20;
constexpr size_t kMaxUrlBytes = 64 << 10;
// The head is parsed in slices so that the URL and header limits are checked as it arrives
// (http-parser reports a field only when it ends or its input runs out).
constexpr size_t kHeadSlice = 4 << 10;
// After the last response, what the client still sends is read and dropped for a while, so that
// closing does not reset the connection under a response it has not read yet.
constexpr size_t kMaxLingerBytes = 1 << 20;
constexpr timeval kLingerTimeout = {5, 0};

// Connection-level fields: not passed on in a request head, not taken from a handler.
bool IsConnectionSpecific(absl::string_view name) {
  return name == "connection" || name == "keep-alive" || name == "proxy-connection" ||
         name == "transfer-encoding" || name == "upgrade";
}

// Response fields are written verbatim, so nothing may end a line or the head early.
bool IsWritableField(absl::string_view name, absl::string_view value) {
  if (name.empty()) return false;
  for (char c : name) {
    if (c <= ' ' || c == ':' || c == 0x7f) return false;
  }
  for (char c : value) {
    if (c == '\r' || c == '\n' || c == '\0') return false;
  }
  return true;
}

bool HasToken(absl::string_view list, absl::string_view token) {
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    if (absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(item), token)) return true;
  }
  return false;
}

std::string StatusLine(int status) {
  const char* reason = http_status_str(static_cast<http_status>(status));
  if (std::strcmp(reason, "<unknown>") == 0) reason = "Unknown";
  return absl::StrCat("HTTP/1.1 ", status, " ", reason, "\r\n");
}

// How the response body is delimited.
enum class Framing { kNone, kLength, kChunked, kUntilClose };

class H1Connection;

class H1Stream final : public ServerStream {
 public:
  explicit H1Stream(H1Connection* connection) : connection_(connection) {}

  const RequestHead& head() const override { return head_; }
  EventLoop& loop() override;
  void SendHeaders(int status, HeaderList headers, bool end_stream) override;
  void SendData(absl::string_view data, bool end_stream) override;
  void SendTrailers(HeaderList trailers) override;
  void Reset() override;
  size_t PendingSendBytes() const override;
  void ConsumeRequestData(size_t bytes) override;

 private:
  friend class H1Connection;
  bool Open() const;
  void Write(absl::string_view bytes);
  void EndBody(const HeaderList& trailers);

  H1Connection* const connection_;
  RequestHead head_;
  // The request.
  bool http10_ = false;
  bool head_method_ = false;
  bool dispatched_ = false;
  bool request_complete_ = false;
  size_t unconsumed_ = 0;  // body bytes delivered to the handler and not consumed yet
  // Both sides: false once this must be the connection's last exchange.
  bool keep_alive_ = true;
  // The response.
  bool headers_sent_ = false;
  Framing framing_ = Framing::kNone;
  uint64_t remaining_ = 0;  // of a content-length body
  bool response_ended_ = false;
  bool reset_ = false;
  bool drain_armed_ = false;  // the handler queued bytes: tell it when the output drains
  bool finished_ = false;     // OnStreamClosed has been called
  std::unique_ptr<StreamHandler> handler_;  // last: destroyed before the rest of the stream
};

class H1Connection final : public Connection {
 public:
  H1Connection(EventLoop& loop, ConnectionSet& owner, bufferevent* bev, std::string peer_ip,
               StreamDispatcher& dispatcher, const CodecOptions& options)
      : loop_(loop),
        owner_(owner),
        bev_(bev),
        peer_ip_(std::move(peer_ip)),
        dispatcher_(dispatcher),
        options_(options),
        window_(std::max<size_t>(options.initial_stream_window, 1)) {
    http_parser_init(&parser_, HTTP_REQUEST);
    parser_.data = this;
  }

  ~H1Connection() override {
    if (stream_ != nullptr) FinishStream(/*completed=*/false);
    if (advance_event_ != nullptr) event_free(advance_event_);
    if (linger_event_ != nullptr) event_free(linger_event_);
    if (bev_ != nullptr) bufferevent_free(bev_);
  }

  bool Start() override {
    advance_event_ = event_new(
        loop_.base(), -1, 0,
        [](evutil_socket_t, short, void* self) { static_cast<H1Connection*>(self)->Advance(); },
        this);
    linger_event_ = evtimer_new(
        loop_.base(),
        [](evutil_socket_t, short, void* self) { static_cast<H1Connection*>(self)->Close(); },
        this);
    if (advance_event_ == nullptr || linger_event_ == nullptr) return false;
    bufferevent_setcb(
        bev_, [](bufferevent*, void* self) { static_cast<H1Connection*>(self)->OnRead(); },
        [](bufferevent*, void* self) { static_cast<H1Connection*>(self)->OnWritten(); },
        [](bufferevent*, short what, void* self) {
          static_cast<H1Connection*>(self)->OnEvent(what);
        },
        this);
    bufferevent_setwatermark(bev_, EV_READ, 0, kMaxBufferedInput);
    if (bufferevent_enable(bev_, EV_READ | EV_WRITE) != 0) return false;
    idle_.Init(loop_.base(), options_.idle_timeout, [this] { Close(); });
    idle_.Arm();
    // The sniffer left the first bytes in the input buffer.
    if (evbuffer_get_length(bufferevent_get_input(bev_)) > 0) Advance();
    return true;
  }

  void Close() override {
    if (closed_) return;
    closed_ = true;
    bufferevent_disable(bev_, EV_READ | EV_WRITE);
    if (linger_event_ != nullptr) evtimer_del(linger_event_);
    if (stream_ != nullptr) FinishStream(stream_->response_ended_ && !stream_->reset_);
    owner_.Remove(this);  // deleted later from the loop
  }

  EventLoop& loop() { return loop_; }
  bool closed() const { return closed_; }
  evbuffer* output() { return bufferevent_get_output(bev_); }

  void ScheduleAdvance() {
    if (advance_scheduled_ || closed_) return;
    advance_scheduled_ = true;
    event_active(advance_event_, EV_TIMEOUT, 0);
  }

 private:
  static H1Connection* Self(http_parser* parser) {
    return static_cast<H1Connection*>(parser->data);
  }

  static const http_parser_settings& Settings() {
    static const http_parser_settings settings = [] {
      http_parser_settings s;
      http_parser_settings_init(&s);
      s.on_message_begin = &OnMessageBegin;
      s.on_url = &OnUrl;
      s.on_header_field = &OnHeaderField;
      s.on_header_value = &OnHeaderValue;
      s.on_headers_complete = &OnHeadersComplete;
      s.on_body = &OnBody;
      s.on_message_complete = &OnMessageComplete;
      return s;
    }();
    return settings;
  }

  // --- Parser callbacks (inside http_parser_execute, inside Pump). A nonzero return stops the
  // parser with an error; error_status_ then says how to answer.

  static int OnMessageBegin(http_parser* parser) {
    H1Connection* c = Self(parser);
    if (c->stream_ != nullptr) return -1;  // cannot happen: the parser is not fed meanwhile
    c->stream_ = std::make_unique<H1Stream>(c);
    c->idle_.Disarm();
    c->url_.clear();
    c->header_bytes_ = 0;
    c->in_value_ = false;
    c->error_status_ = 0;
    c->error_text_.clear();
    return 0;
  }

  static int OnUrl(http_parser* parser, const char* at, size_t length) {
    H1Connection* c = Self(parser);
    if (c->url_.size() + length > kMaxUrlBytes) {
      return c->Fail(414, absl::StrCat("the request URL is over ", kMaxUrlBytes, " bytes"));
    }
    c->url_.append(at, length);
    return 0;
  }

  static int OnHeaderField(http_parser* parser, const char* at, size_t length) {
    H1Connection* c = Self(parser);
    H1Stream* s = c->stream_.get();
    const bool new_field = c->in_value_ || s->head_.headers.empty();
    c->in_value_ = false;
    // A field line costs its name, value, ": " and CRLF.
    if (!c->CountHeaderBytes(length + (new_field ? 4 : 0))) return -1;
    if (s->dispatched_) return 0;  // trailers of a chunked request body are not used
    if (new_field) s->head_.headers.emplace_back();
    std::string& name = s->head_.headers.back().first;
    const size_t old = name.size();
    name.append(at, length);
    for (size_t i = old; i < name.size(); ++i) name[i] = absl::ascii_tolower(name[i]);
    return 0;
  }

  static int OnHeaderValue(http_parser* parser, const char* at, size_t length) {
    H1Connection* c = Self(parser);
    H1Stream* s = c->stream_.get();
    if (!c->CountHeaderBytes(length)) return -1;
    c->in_value_ = true;
    if (s->dispatched_) return 0;
    s->head_.headers.back().second.append(at, length);
    return 0;
  }

  static int OnHeadersComplete(http_parser* parser) {
    H1Connection* c = Self(parser);
    H1Stream* s = c->stream_.get();
    if (parser->method == HTTP_CONNECT) {
      return c->Fail(405, "CONNECT is not supported by this gateway");
    }
    RequestHead& head = s->head_;
    head.method = http_method_str(static_cast<http_method>(parser->method));
    head.scheme = c->options_.tls ? "https" : "http";
    head.peer_ip = c->peer_ip_;
    head.http2 = false;
    s->http10_ = parser->http_major == 0 || (parser->http_major == 1 && parser->http_minor == 0);
    s->head_method_ = parser->method == HTTP_HEAD;
    s->keep_alive_ = http_should_keep_alive(parser) != 0;

    HeaderList fields = std::move(head.headers);
    head.headers.clear();
    head.headers.reserve(fields.size());
    int hosts = 0;
    bool expect_continue = false;
    for (auto& [name, value] : fields) {
      value.erase(value.find_last_not_of(" \t") + 1);  // http-parser keeps trailing whitespace
      if (name == "host") {
        if (++hosts == 1) head.authority = value;
      } else if (name == "expect") {
        expect_continue = absl::EqualsIgnoreCase(value, "100-continue");
        continue;  // answered here
      } else if (IsConnectionSpecific(name) || name == "http2-settings") {
        continue;  // an Upgrade to h2c is ignored: the request is served as HTTP/1.1
      }
      head.headers.emplace_back(std::move(name), std::move(value));
    }
    if (hosts > 1) return c->Fail(400, "more than one Host header");
    if (!c->SetTarget(head)) return -1;
    if (head.authority.empty() && !s->http10_) return c->Fail(400, "no Host header");

    const bool has_body = (parser->flags & F_CHUNKED) != 0 ||
                          (parser->content_length != ULLONG_MAX && parser->content_length > 0);
    s->dispatched_ = true;
    s->handler_ = c->dispatcher_.Dispatch(*s);
    if (s->handler_ == nullptr && !s->headers_sent_) {
      // The dispatcher neither answered nor took the request.
      s->SendHeaders(500, {{"content-type", "text/plain"}}, /*end_stream=*/false);
      s->SendData("no handler took the request\n", /*end_stream=*/true);
    }
    if (expect_continue && has_body && !s->http10_ && s->handler_ != nullptr && !s->headers_sent_ &&
        !s->reset_) {
      static constexpr absl::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      evbuffer_add(c->output(), kContinue.data(), kContinue.size());
    }
    return 0;
  }

  static int OnBody(http_parser* parser, const char* at, size_t length) {
    H1Connection* c = Self(parser);
    H1Stream* s = c->stream_.get();
    if (s->handler_ == nullptr || s->reset_) return 0;  // dropped
    s->unconsumed_ += length;
    s->handler_->OnRequestData(absl::string_view(at, length), /*end_stream=*/false);
    return 0;
  }

  static int OnMessageComplete(http_parser* parser) {
    H1Connection* c = Self(parser);
    H1Stream* s = c->stream_.get();
    s->request_complete_ = true;
    // Whatever follows is the next request: it waits until this one has been answered.
    http_parser_pause(parser, 1);
    if (s->handler_ != nullptr && !s->reset_) s->handler_->OnRequestData({}, /*end_stream=*/true);
    return 0;
  }

  int Fail(int status, std::string text) {
    error_status_ = status;
    error_text_ = std::move(text);
    return -1;
  }

  bool CountHeaderBytes(size_t bytes) {
    header_bytes_ += bytes;
    if (header_bytes_ <= options_.max_request_headers_bytes) return true;
    Fail(431, absl::StrCat("the request header fields are over ",
                           options_.max_request_headers_bytes, " bytes"));
    return false;
  }

  // The path (origin form, "*", or taken from an absolute URL, which also gives the authority).
  bool SetTarget(RequestHead& head) {
    if (!url_.empty() && (url_[0] == '/' || url_ == "*")) {
      head.path = url_;
      return true;
    }
    http_parser_url parts;
    http_parser_url_init(&parts);
    if (http_parser_parse_url(url_.data(), url_.size(), 0, &parts) != 0 ||
        (parts.field_set & (1 << UF_HOST)) == 0) {
      Fail(400, "the request target is neither a path nor an absolute URL");
      return false;
    }
    auto field = [&](http_parser_url_fields f) {
      return absl::string_view(url_).substr(parts.field_data[f].off, parts.field_data[f].len);
    };
    // The authority is the host (with its brackets, if an IPv6 literal) up to the port's end.
    size_t begin = parts.field_data[UF_HOST].off;
    size_t end = begin + parts.field_data[UF_HOST].len;
    if (begin > 0 && url_[begin - 1] == '[') --begin;
    if (end < url_.size() && url_[end] == ']') ++end;
    if ((parts.field_set & (1 << UF_PORT)) != 0) {
      end = parts.field_data[UF_PORT].off + parts.field_data[UF_PORT].len;
    }
    head.authority = url_.substr(begin, end - begin);
    head.path = (parts.field_set & (1 << UF_PATH)) != 0 ? std::string(field(UF_PATH)) : "/";
    if ((parts.field_set & (1 << UF_QUERY)) != 0) absl::StrAppend(&head.path, "?", field(UF_QUERY));
    return true;
  }

  // --- The state machine.

  void Advance() {
    advance_scheduled_ = false;
    if (closed_) return;
    if (advancing_) {
      ScheduleAdvance();
      return;
    }
    advancing_ = true;
    for (;;) {
      if (closed_ || closing_) break;
      if (stream_ != nullptr && stream_->reset_) {
        Close();
        break;
      }
      Pump();
      if (closed_ || closing_ || (stream_ != nullptr && stream_->reset_)) continue;
      if (stream_ == nullptr || !stream_->response_ended_) break;
      // The response is out. A request body not read by now is not waited for.
      if (!stream_->request_complete_) stream_->keep_alive_ = false;
      const bool keep_alive = stream_->keep_alive_;
      FinishStream(/*completed=*/true);
      if (!keep_alive) BeginClosing();
    }
    advancing_ = false;
  }

  // Feeds the parser what it may have now.
  void Pump() {
    evbuffer* input = bufferevent_get_input(bev_);
    while (!closed_ && !closing_) {
      size_t limit = kHeadSlice;
      if (H1Stream* s = stream_.get(); s != nullptr && s->dispatched_) {
        if (s->request_complete_ || s->reset_) return;
        limit = SIZE_MAX;
        if (s->handler_ != nullptr) {
          if (s->unconsumed_ >= window_) return;
          limit = window_ - s->unconsumed_;
        }
      }
      evbuffer_iovec chunk;
      if (evbuffer_peek(input, -1, nullptr, &chunk, 1) < 1 || chunk.iov_len == 0) return;
      const size_t n = std::min(chunk.iov_len, limit);
      const size_t parsed =
          http_parser_execute(&parser_, &Settings(), static_cast<const char*>(chunk.iov_base), n);
      evbuffer_drain(input, parsed);
      const http_errno error = HTTP_PARSER_ERRNO(&parser_);
      if (error == HPE_PAUSED) {
        http_parser_pause(&parser_, 0);
        continue;
      }
      if (error != HPE_OK || parsed != n) {
        ParseFailed(error == HPE_OK ? HPE_UNKNOWN : error);
        return;
      }
    }
  }

  void ParseFailed(http_errno error) {
    const int status = error_status_ != 0             ? error_status_
                       : error == HPE_HEADER_OVERFLOW ? 431
                                                      : 400;
    const std::string text = !error_text_.empty()
                                 ? error_text_
                                 : absl::StrCat("bad request: ", http_errno_description(error));
    if (stream_ != nullptr) {
      const bool answered = stream_->headers_sent_;
      const bool answer_complete = stream_->response_ended_ && !stream_->reset_;
      FinishStream(answer_complete);
      if (answered) {
        // A response is out (or partly out): it cannot be followed by an error answer.
        if (answer_complete) {
          BeginClosing();
        } else {
          Close();
        }
        return;
      }
    }
    std::string answer = StatusLine(status);
    absl::StrAppend(&answer, "content-type: text/plain\r\ncontent-length: ", text.size() + 1,
                    "\r\nconnection: close\r\n\r\n", text, "\n");
    evbuffer_add(output(), answer.data(), answer.size());
    BeginClosing();
  }

  // The handler learns how its stream ended and is destroyed with it.
  void FinishStream(bool completed) {
    std::unique_ptr<H1Stream> s = std::move(stream_);
    s->finished_ = true;
    idle_.Arm();
    if (s->handler_ != nullptr) s->handler_->OnStreamClosed(completed);
  }

  // No more requests: the output is flushed, then the connection closed gently.
  void BeginClosing() {
    if (closing_ || closed_) return;
    closing_ = true;
    evbuffer_drain(bufferevent_get_input(bev_), evbuffer_get_length(bufferevent_get_input(bev_)));
    if (evbuffer_get_length(output()) == 0) Flushed();
  }

  void Flushed() {
    if (eof_) {
      SendCloseNotify();
      Close();
      return;
    }
    if (lingering_) return;
    lingering_ = true;
    SendCloseNotify();
    shutdown(bufferevent_getfd(bev_), SHUT_WR);
    evtimer_add(linger_event_, &kLingerTimeout);
  }

  // Over TLS the end of the output is announced (close_notify), so that the client can tell a
  // response that ended from one that was cut. Once only: a second SSL_shutdown would read.
  void SendCloseNotify() {
    SSL* ssl = bufferevent_openssl_get_ssl(bev_);
    if (ssl != nullptr && (SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN) == 0) SSL_shutdown(ssl);
  }

  // --- bufferevent callbacks.

  void OnRead() {
    if (closed_) return;
    if (closing_) {
      evbuffer* input = bufferevent_get_input(bev_);
      if (lingering_) lingered_bytes_ += evbuffer_get_length(input);
      evbuffer_drain(input, evbuffer_get_length(input));
      if (lingered_bytes_ > kMaxLingerBytes) Close();
      return;
    }
    Advance();
  }

  // The output buffer has been written out.
  void OnWritten() {
    if (closed_) return;
    if (closing_) {
      Flushed();
      return;
    }
    H1Stream* s = stream_.get();
    if (s != nullptr && s->drain_armed_ && s->handler_ != nullptr && !s->finished_) {
      s->drain_armed_ = false;
      s->handler_->OnSendBufferDrained();
    }
  }

  void OnEvent(short what) {
    if (closed_) return;
    if ((what & BEV_EVENT_EOF) == 0 || (what & BEV_EVENT_ERROR) != 0) {
      Close();
      return;
    }
    // The client has closed its side. A response in progress is abandoned at once (its handler
    // cancels its work); one already out is flushed first.
    eof_ = true;
    // libevent's TLS bufferevent stops writing when it reports the end of input; what is queued
    // must still go out.
    if (options_.tls) bufferevent_enable(bev_, EV_WRITE);
    if (closing_) {
      if (evbuffer_get_length(output()) == 0) Close();
      return;
    }
    if (stream_ != nullptr && (!stream_->response_ended_ || stream_->reset_)) {
      Close();
      return;
    }
    if (stream_ != nullptr) FinishStream(/*completed=*/true);
    BeginClosing();
  }

  EventLoop& loop_;
  ConnectionSet& owner_;
  bufferevent* bev_;
  const std::string peer_ip_;
  StreamDispatcher& dispatcher_;
  const CodecOptions options_;
  const size_t window_;
  http_parser parser_;
  event* advance_event_ = nullptr;
  event* linger_event_ = nullptr;
  // The request being parsed or answered.
  std::unique_ptr<H1Stream> stream_;
  IdleTimer idle_;  // armed while no request is in progress
  std::string url_;
  size_t header_bytes_ = 0;
  bool in_value_ = false;  // the last header callback was for a value
  int error_status_ = 0;   // how to answer the parse error a callback caused
  std::string error_text_;
  // The connection.
  bool advance_scheduled_ = false;
  bool advancing_ = false;
  bool closing_ = false;    // no more requests; flushing, then lingering
  bool lingering_ = false;  // our side is shut down; reading until the client closes
  size_t lingered_bytes_ = 0;
  bool eof_ = false;
  bool closed_ = false;
};

// --- H1Stream

EventLoop& H1Stream::loop() { return connection_->loop(); }

bool H1Stream::Open() const { return !finished_ && !connection_->closed(); }

void H1Stream::Write(absl::string_view bytes) {
  if (bytes.empty()) return;
  evbuffer_add(connection_->output(), bytes.data(), bytes.size());
  drain_armed_ = true;
}

void H1Stream::SendHeaders(int status, HeaderList headers, bool end_stream) {
  if (!Open() || headers_sent_ || reset_) return;
  headers_sent_ = true;
  if (status < 100 || status > 999) status = 500;
  const bool informational_or_204 = status < 200 || status == 204;
  const bool no_body = informational_or_204 || status == 304 || head_method_;

  std::string out = StatusLine(status);
  std::optional<uint64_t> content_length;
  for (const auto& [name, value] : headers) {
    if (!IsWritableField(name, value)) continue;
    if (name == "connection") {
      if (HasToken(value, "close")) keep_alive_ = false;
      continue;
    }
    if (IsConnectionSpecific(name)) continue;
    if (name == "content-length") {
      uint64_t n = 0;
      if (!content_length.has_value() && absl::SimpleAtoi(value, &n)) content_length = n;
      continue;  // written below, once
    }
    absl::StrAppend(&out, name, ": ", value, "\r\n");
  }
  if (no_body) {
    framing_ = Framing::kNone;
    if (content_length.has_value() && !informational_or_204) {
      absl::StrAppend(&out, "content-length: ", *content_length, "\r\n");
    } else if (end_stream && !content_length.has_value() && !informational_or_204 &&
               status != 304) {
      absl::StrAppend(&out, "content-length: 0\r\n");
    }
  } else if (end_stream) {
    framing_ = Framing::kNone;
    absl::StrAppend(&out, "content-length: 0\r\n");
  } else if (content_length.has_value()) {
    framing_ = Framing::kLength;
    remaining_ = *content_length;
    absl::StrAppend(&out, "content-length: ", *content_length, "\r\n");
  } else if (!http10_) {
    framing_ = Framing::kChunked;
    absl::StrAppend(&out, "transfer-encoding: chunked\r\n");
  } else {
    framing_ = Framing::kUntilClose;  // HTTP/1.0 has no chunking: the body ends with the connection
    keep_alive_ = false;
  }
  if (!keep_alive_) {
    absl::StrAppend(&out, "connection: close\r\n");
  } else if (http10_) {
    absl::StrAppend(&out, "connection: keep-alive\r\n");
  }
  out += "\r\n";
  Write(out);
  if (end_stream) EndBody({});
}

void H1Stream::SendData(absl::string_view data, bool end_stream) {
  if (!Open() || !headers_sent_ || response_ended_ || reset_) return;
  if (!data.empty()) {
    switch (framing_) {
      case Framing::kNone:
        break;  // HEAD, 204, 304: no body
      case Framing::kLength: {
        // More than announced is dropped; the framing stays intact.
        const size_t n = static_cast<size_t>(std::min<uint64_t>(data.size(), remaining_));
        Write(data.substr(0, n));
        remaining_ -= n;
        break;
      }
      case Framing::kChunked:
        Write(absl::StrCat(absl::Hex(data.size()), "\r\n"));
        Write(data);
        Write("\r\n");
        break;
      case Framing::kUntilClose:
        Write(data);
        break;
    }
  }
  if (end_stream) EndBody({});
}

void H1Stream::SendTrailers(HeaderList trailers) {
  if (!Open() || response_ended_ || reset_) return;
  if (!headers_sent_) {
    SendHeaders(200, std::move(trailers), /*end_stream=*/true);  // trailers-only, as on HTTP/2
    return;
  }
  EndBody(trailers);
}

void H1Stream::EndBody(const HeaderList& trailers) {
  if (framing_ == Framing::kChunked) {
    std::string last = "0\r\n";
    for (const auto& [name, value] : trailers) {
      if (!IsWritableField(name, value) || IsConnectionSpecific(name) || name == "content-length") {
        continue;
      }
      absl::StrAppend(&last, name, ": ", value, "\r\n");
    }
    last += "\r\n";
    Write(last);
  } else if (framing_ == Framing::kLength && remaining_ > 0) {
    keep_alive_ = false;  // short of its content-length: only closing tells the client
  }
  response_ended_ = true;
  connection_->ScheduleAdvance();
}

void H1Stream::Reset() {
  if (!Open()) return;
  reset_ = true;
  connection_->ScheduleAdvance();
}

size_t H1Stream::PendingSendBytes() const {
  return connection_->closed() ? 0 : evbuffer_get_length(connection_->output());
}

void H1Stream::ConsumeRequestData(size_t bytes) {
  if (!Open()) return;
  unconsumed_ -= std::min(bytes, unconsumed_);
  connection_->ScheduleAdvance();
}

}  // namespace

std::unique_ptr<Connection> NewHttp1Connection(EventLoop& loop, ConnectionSet& owner,
                                               bufferevent* bev, std::string peer_ip,
                                               StreamDispatcher& dispatcher,
                                               const CodecOptions& options) {
  return std::make_unique<H1Connection>(loop, owner, bev, std::move(peer_ip), dispatcher, options);
}

}  // namespace montage::gateway
