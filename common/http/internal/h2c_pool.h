// HTTP/2 with prior knowledge to cleartext servers (h2c) on nghttp2, for HttpClient. Private to
// common/http.
//
// Why not libcurl: before 8.0 it fails every second stream on an h2c connection ("Error in the
// HTTP2 framing layer", curl issue 10634) and Debian 12 ships 7.88, so through libcurl each h2c
// call needed a connection of its own. Here many calls share a few connections: an LLM burst of
// 10,000 calls to a vLLM or LiteLLM server takes ten connections, not ten thousand.
//
// The pool runs on the HttpClient's loop thread (one event_base) and is touched by no other.
// Connections are kept per origin; a connection takes streams up to the smaller of
// max_concurrent_streams and the server's SETTINGS_MAX_CONCURRENT_STREAMS, then another one is
// opened (up to max_connections_per_host; past that, nghttp2 queues the request on the least busy
// connection until a stream ends). With max_total_connections, a request for an origin without a
// connection waits (the client asks MakeRoomFor first) until a connection closes or an idle one
// of another origin can be closed for it, as libcurl does at CURLMOPT_MAX_TOTAL_CONNECTIONS.
// Credentials in the URL go as Basic authorization (HttpClient adds the header, as libcurl would,
// unless the request has its own). Host names resolve through libevent's asynchronous resolver
// (evdns reads /etc/resolv.conf and /etc/hosts), each address tried in turn; nothing here
// blocks.
//
// Flow control: each stream's receive window is consumed only as its data is handed to the sink,
// so a sink that pauses holds back the server after one window (1 MiB); the connection's window is
// returned at once, so one paused stream never stalls the others.
#ifndef MONTAGE_COMMON_HTTP_INTERNAL_H2C_POOL_H_
#define MONTAGE_COMMON_HTTP_INTERNAL_H2C_POOL_H_

#include <sys/socket.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/http/http_client.h"

struct event;
struct event_base;
struct evdns_base;

namespace montage::http::internal {

// What one stream reports, on the loop thread, never from inside H2cPool::Start, Reset or the
// pool's destructor. After Reset of its stream a sink hears nothing more.
// How a stream ended.
struct H2cClose {
  // OK when the whole answer arrived (the server ended the stream); otherwise the transport
  // failed.
  absl::Status status;
  // A retry may succeed (connection refused or lost, stream refused).
  bool transient = false;
  // The server did not act on the request, or most likely did not: it refused the stream, or a
  // connection that had been working died before any answer to it. Such a request may be sent
  // again once whatever its method, as libcurl does for a reused connection that dies.
  bool unprocessed = false;
};

class H2cStreamSink {
 public:
  virtual ~H2cStreamSink() = default;
  // The final answer's status and headers (interim 1xx answers are skipped; names lowercase).
  virtual void OnH2cHeaders(int status, Headers headers) = 0;
  // A piece of the body. kPause: nothing more is delivered until H2cPool::Resume.
  virtual DataAction OnH2cData(absl::string_view chunk) = 0;
  // The stream ended: see H2cClose.
  virtual void OnH2cClosed(struct H2cClose close) = 0;
};

struct H2cTarget {
  std::string host;       // name or address; IPv6 in brackets as in a URL
  std::string port;       // decimal
  std::string authority;  // :authority (host[:port] as the URL wrote it)
};

struct H2cRequest {
  absl::string_view method;
  absl::string_view path;  // path and query
  const Headers* headers = nullptr;
  Headers extra_headers;   // added after `headers` (trace context)
  absl::string_view body;  // must outlive the stream
  // How long this request waits for its connection to come up (DNS and TCP), counted from Start;
  // zero means 300 s, as libcurl. Each request waiting on a connection that is not up yet keeps
  // its own. Once one gave up, the connection takes no new requests (a retry opens another); it
  // stops trying when no request waits for it any more.
  absl::Duration connect_timeout = absl::Seconds(10);
};

struct H2cPoolOptions {
  uint32_t max_connections_per_host = 0;  // 0: no limit
  uint32_t max_concurrent_streams = 100;  // per connection, besides the server's limit; 0: none
  absl::Duration idle_timeout = absl::Seconds(60);
  uint32_t max_total_connections = 0;  // every origin's; 0: no limit
  // Called on the loop (never inside Start or an nghttp2 callback) when a connection closed or
  // went idle while max_total_connections is set: requests waiting for room may go now.
  std::function<void()> on_room;
  // "host:port" (host in lower case, without brackets) → addresses to try in order, instead of
  // resolving the name (HttpClientOptions::resolve).
  absl::flat_hash_map<std::string, std::vector<std::pair<sockaddr_storage, int>>> resolve;
};

class H2cConnection;

class H2cPool {
 public:
  // A stream in flight; empty when default-constructed or after Reset.
  struct Handle {
    std::weak_ptr<H2cConnection> connection;
    int32_t stream_id = 0;
  };

  H2cPool(event_base* base, H2cPoolOptions options);
  // Parses HttpClientOptions::resolve entries into H2cPoolOptions::resolve; INVALID_ARGUMENT
  // naming the malformed entry ("resolve[2]").
  static absl::Status ParseResolve(
      const std::vector<std::string>& entries,
      absl::flat_hash_map<std::string, std::vector<std::pair<sockaddr_storage, int>>>& out);
  // Closes every connection; the sinks of streams still open hear nothing.
  ~H2cPool();
  H2cPool(const H2cPool&) = delete;
  H2cPool& operator=(const H2cPool&) = delete;

  // Whether a request for `target` may start now without passing max_total_connections: the
  // origin has a connection, or there is room for one, or an idle connection of another origin
  // was closed to make room. False: wait for options.on_room and ask again.
  bool MakeRoomFor(const H2cTarget& target);
  // Starts `request` on a connection to `target`. Errors here are the request's own (a header
  // nghttp2 refuses, out of memory); failures to connect arrive at the sink later.
  absl::StatusOr<Handle> Start(const H2cTarget& target, H2cRequest request, H2cStreamSink* sink);
  // Resets the stream (RST_STREAM CANCEL) if it is still open; its sink hears nothing more.
  void Reset(Handle& handle);
  // Delivers what a paused stream held back, then more as it arrives.
  void Resume(const Handle& handle);

 private:
  friend class H2cConnection;
  void Remove(H2cConnection* connection);
  // A connection closed or went idle: schedules on_room.
  void RoomMayHaveFreed();
  size_t LiveConnections() const;
  evdns_base* Resolver();

  event_base* const base_;
  const H2cPoolOptions options_;
  evdns_base* dns_ = nullptr;
  event* room_event_ = nullptr;  // runs options_.on_room from the loop
  // By "host:port".
  absl::flat_hash_map<std::string, std::vector<std::shared_ptr<H2cConnection>>> connections_;
};

}  // namespace montage::http::internal

#endif  // MONTAGE_COMMON_HTTP_INTERNAL_H2C_POOL_H_
