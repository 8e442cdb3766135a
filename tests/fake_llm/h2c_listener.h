// The fake LLM provider's h2c transport: HTTP/2 with prior knowledge over cleartext TCP, served by
// nghttp2's server session on the fake's libevent loop. Each stream is one request handed to a
// RequestHandler with a Responder that answers on that stream (see transport.h). A stream reset
// by the client, or its connection closing, is reported as the client's departure.
//
// Not thread-safe: create, use and destroy it on the loop thread (or before the loop runs).
#ifndef MONTAGE_TESTS_FAKE_LLM_H2C_LISTENER_H_
#define MONTAGE_TESTS_FAKE_LLM_H2C_LISTENER_H_

#include <functional>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "tests/fake_llm/transport.h"

struct event_base;
struct evconnlistener;

namespace montage::testing {

class H2cListener {
 public:
  // Settings sent to every client.
  static constexpr uint32_t kMaxConcurrentStreams = 10000;
  static constexpr int32_t kInitialWindowSize = 16 << 20;

  // Listens on 127.0.0.1:`port` (0: any). `on_connection` runs for every accepted connection.
  static absl::StatusOr<std::unique_ptr<H2cListener>> Start(event_base* base, int port,
                                                            RequestHandler handler,
                                                            std::function<void()> on_connection);
  // Closes every connection. Departures are not reported: retire the requests first.
  ~H2cListener();
  H2cListener(const H2cListener&) = delete;
  H2cListener& operator=(const H2cListener&) = delete;

  int port() const { return port_; }

 private:
  class Connection;
  class StreamResponder;

  H2cListener(event_base* base, RequestHandler handler, std::function<void()> on_connection);
  void Accept(int fd);
  void Remove(Connection* connection);

  event_base* base_;
  RequestHandler handler_;
  std::function<void()> on_connection_;
  evconnlistener* listener_ = nullptr;
  int port_ = 0;
  absl::flat_hash_map<Connection*, std::unique_ptr<Connection>> connections_;
};

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_FAKE_LLM_H2C_LISTENER_H_
