// The seam between the HTTP codecs (HTTP/2 via nghttp2, HTTP/1.1 via http-parser) and what handles
// a request (the gRPC proxy, gRPC-Web, REST transcoding, the batch endpoint).
//
// A codec creates a ServerStream per request and asks a StreamDispatcher for a StreamHandler once
// the request head has arrived. Everything here runs on the connection's loop thread: a handler
// that learns something on another thread (a gRPC callback) posts to ServerStream::loop() first.
#ifndef MONTAGE_GATEWAY_SERVER_HTTP_STREAM_H_
#define MONTAGE_GATEWAY_SERVER_HTTP_STREAM_H_

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace montage::gateway {

class EventLoop;

// Header names are lower case (HTTP/2 requires it; the HTTP/1.1 codec folds them).
using HeaderList = std::vector<std::pair<std::string, std::string>>;

// The first value of `name` (lower case), or nullptr.
const std::string* FindHeader(const HeaderList& headers, absl::string_view name);

struct RequestHead {
  std::string method;     // :method
  std::string path;       // :path, with the query string
  std::string authority;  // :authority or Host
  std::string scheme;     // http or https
  HeaderList headers;     // regular fields, in order, pseudo-headers excluded
  std::string peer_ip;    // the TCP peer, for x-forwarded-for and trusted-caller checks
  bool http2 = false;
};

// The response side of one request, implemented by the codec. Not thread-safe: loop thread only.
// After the handler's OnStreamClosed has run, the stream is gone.
class ServerStream {
 public:
  virtual ~ServerStream() = default;
  virtual const RequestHead& head() const = 0;
  virtual EventLoop& loop() = 0;

  // Response head. With `end_stream` there is no body (a gRPC trailers-only answer is headers
  // with grpc-status and end_stream).
  virtual void SendHeaders(int status, HeaderList headers, bool end_stream) = 0;
  // Body bytes, queued; `end_stream` ends the response.
  virtual void SendData(absl::string_view data, bool end_stream) = 0;
  // Ends the response with trailers (HTTP/2; the HTTP/1.1 codec sends them as chunked trailers).
  virtual void SendTrailers(HeaderList trailers) = 0;
  // Aborts the response (RST_STREAM, or closing an HTTP/1.1 connection).
  virtual void Reset() = 0;

  // Response bytes queued and not yet written to the socket. A handler that produces data stops
  // producing above its own limit and resumes in OnSendBufferDrained.
  virtual size_t PendingSendBytes() const = 0;
  // Request-body flow control: the handler has taken `bytes` of request data off the stream's
  // hands (HTTP/2 opens the window by that much). Until it does, the client may send at most one
  // window (HTTP/1.1: reading pauses while more than a window is unconsumed).
  virtual void ConsumeRequestData(size_t bytes) = 0;
};

// Handles one request. Owned by its stream's codec; destroyed right after OnStreamClosed.
class StreamHandler {
 public:
  virtual ~StreamHandler() = default;
  // Request body bytes in order; `end_stream` on the last call (possibly with no bytes).
  virtual void OnRequestData(absl::string_view data, bool end_stream) = 0;
  // PendingSendBytes() fell to zero after having been above zero.
  virtual void OnSendBufferDrained() {}
  // The stream ended: `completed` when the response was sent in full, false when the client
  // reset the stream or the connection went away. The handler must drop its ServerStream*.
  virtual void OnStreamClosed(bool completed) = 0;
};

// Picks a handler for a new request. Called once per stream when the head is complete; the
// dispatcher may answer on the stream right away (an error) and return nullptr.
class StreamDispatcher {
 public:
  virtual ~StreamDispatcher() = default;
  virtual std::unique_ptr<StreamHandler> Dispatch(ServerStream& stream) = 0;
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_SERVER_HTTP_STREAM_H_
