// Downstream connections: the listener accepts on one loop and hands each connection to a worker
// loop, where the first bytes decide the codec (the HTTP/2 client preface → nghttp2, anything
// else → HTTP/1.1). On a TLS listener the handshake comes first, and the protocol ALPN settled on
// decides; without ALPN the first bytes do, as in cleartext. Connections are owned by their loop's
// ConnectionSet.
#ifndef MONTAGE_GATEWAY_SERVER_CONNECTION_H_
#define MONTAGE_GATEWAY_SERVER_CONNECTION_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "gateway/server/http_stream.h"

struct bufferevent;
struct event;
struct event_base;

namespace montage::gateway {

class EventLoop;
class TlsContext;

// Limits and settings every codec applies.
struct CodecOptions {
  uint32_t max_concurrent_streams = 10000;   // HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
  uint32_t initial_stream_window = 1 << 20;  // HTTP/2 per-stream receive window
  size_t max_request_headers_bytes = 60 << 10;
  // Set by the listener: its connections are TLS, so requests have the scheme "https".
  bool tls = false;
  // A connection with no request in progress for this long is closed
  // (common_http_protocol_options.idle_timeout; Envoy's default is 1 hour). Zero: never.
  absl::Duration idle_timeout = absl::Hours(1);
};

// Closes an idle connection: armed while it has no request in progress, disarmed while it has
// one. Loop thread only.
class IdleTimer {
 public:
  IdleTimer() = default;
  ~IdleTimer();
  IdleTimer(const IdleTimer&) = delete;
  IdleTimer& operator=(const IdleTimer&) = delete;
  // `on_idle` runs on the loop once the connection has been idle for `timeout` (zero: never).
  void Init(event_base* base, absl::Duration timeout, std::function<void()> on_idle);
  void Arm();     // no request in progress (again): the countdown starts over
  void Disarm();  // a request began

 private:
  event* timer_ = nullptr;
  absl::Duration timeout_ = absl::ZeroDuration();
  std::function<void()> on_idle_;
};

class ConnectionSet;

// One accepted connection. Loop thread only.
class Connection {
 public:
  virtual ~Connection() = default;
  // Starts reading (the input buffer may already hold bytes). False: close it now.
  virtual bool Start() = 0;
  // Closes the connection: every open stream's handler learns it was not completed.
  virtual void Close() = 0;
};

// The connections of one loop. Loop thread only (created and destroyed there).
class ConnectionSet {
 public:
  // With `tls` (which must outlive the set), every connection starts with a TLS handshake.
  ConnectionSet(EventLoop& loop, StreamDispatcher& dispatcher, CodecOptions options,
                const TlsContext* tls = nullptr);
  ~ConnectionSet();
  // Takes the accepted socket: completes the TLS handshake if any, picks the protocol and starts
  // the matching codec. A failed handshake just closes the socket.
  void Adopt(int fd, std::string peer_ip);
  // Called by a connection that has closed; it is deleted from the loop shortly after.
  void Remove(Connection* connection);
  size_t size() const { return connections_.size(); }

 private:
  class Sniffer;
  void Sniffed(Sniffer* sniffer, bool http2);
  void Drop(Sniffer* sniffer);
  void Reap();

  EventLoop& loop_;
  StreamDispatcher& dispatcher_;
  const CodecOptions options_;
  const TlsContext* const tls_;
  absl::flat_hash_map<Sniffer*, std::unique_ptr<Sniffer>> sniffing_;
  absl::flat_hash_map<Connection*, std::unique_ptr<Connection>> connections_;
  std::vector<std::unique_ptr<Connection>> dead_;
  event* reaper_ = nullptr;
};

// Codec factories (h2_connection.cc, h1_connection.cc). Both take ownership of `bev`.
std::unique_ptr<Connection> NewHttp2Connection(EventLoop& loop, ConnectionSet& owner,
                                               bufferevent* bev, std::string peer_ip,
                                               StreamDispatcher& dispatcher,
                                               const CodecOptions& options);
std::unique_ptr<Connection> NewHttp1Connection(EventLoop& loop, ConnectionSet& owner,
                                               bufferevent* bev, std::string peer_ip,
                                               StreamDispatcher& dispatcher,
                                               const CodecOptions& options);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_SERVER_CONNECTION_H_
