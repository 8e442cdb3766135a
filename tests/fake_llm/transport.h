// The seam between the fake LLM provider's request logic (fake_llm_server.cc) and the transports
// that carry it: HTTP/1.1 through libevent's evhttp and h2c through nghttp2 (h2c_listener.h). A
// transport turns each request into an IncomingRequest and a Responder; the logic answers through
// the Responder without knowing which protocol is underneath. Loop thread only, like the server.
#ifndef MONTAGE_TESTS_FAKE_LLM_TRANSPORT_H_
#define MONTAGE_TESTS_FAKE_LLM_TRANSPORT_H_

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::testing {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

// Bodies larger than this are refused by every transport.
inline constexpr size_t kMaxRequestBodyBytes = 8 << 20;

// One request as it arrived, whatever the protocol.
struct IncomingRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // without the query string
  std::string query;   // without the '?'
  std::string body;
  // As sent (HTTP/2: lower case, with :authority as "host").
  HeaderList headers;

  // The first value of header `name`, compared case-insensitively; empty when absent.
  std::string Header(absl::string_view name) const;
};

// Where one answer goes. Either SendWhole once, or StartStream, SendChunk..., then EndStream or
// (ReadyToCut, Cut). Calls after the client left are ignored. Destroying a Responder stops its
// departure watch; it never ends the answer by itself.
class Responder {
 public:
  virtual ~Responder() = default;

  // `on_gone` runs (once, from the event loop, never from inside another Responder call) when the
  // client leaves before the answer is complete. nullptr stops watching.
  virtual void WatchDeparture(std::function<void()> on_gone) = 0;
  virtual void SendWhole(int status, const std::string& content_type, const HeaderList& headers,
                         const std::string& body) = 0;
  virtual void StartStream(int status, const std::string& content_type,
                           const HeaderList& headers) = 0;
  virtual void SendChunk(const std::string& bytes) = 0;
  virtual void EndStream() = 0;
  // Whether everything sent so far has been handed to the socket, so that Cut loses nothing.
  virtual bool ReadyToCut() = 0;
  // Breaks the answer off: HTTP/1.1 closes the connection, HTTP/2 resets the stream (with
  // NO_ERROR when `no_error`, else INTERNAL_ERROR).
  virtual void Cut(bool no_error) = 0;
};

using RequestHandler = std::function<void(IncomingRequest, std::unique_ptr<Responder>)>;

// A non-blocking socket listening on 127.0.0.1:`port` (0: any free port) with `backlog`.
struct LoopbackSocket {
  int fd = -1;
  int port = 0;
};
absl::StatusOr<LoopbackSocket> ListenLoopback(int port, int backlog);

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_FAKE_LLM_TRANSPORT_H_
