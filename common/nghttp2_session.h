// Setting up an nghttp2 session and moving its bytes to and from libevent buffers, shared by
// every HTTP/2 endpoint montage runs: the gateway's listener and its upstream connections,
// common/http's h2c pool, and the fake provider's h2c listener. Header-only, so that only the
// targets that link libnghttp2 and libevent pay for it.
#ifndef MONTAGE_COMMON_NGHTTP2_SESSION_H_
#define MONTAGE_COMMON_NGHTTP2_SESSION_H_

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/string_view.h"

namespace montage {

struct Nghttp2SessionSpec {
  bool server = false;
  // Callbacks left null are not set.
  nghttp2_on_begin_headers_callback on_begin_headers = nullptr;
  nghttp2_on_header_callback on_header = nullptr;
  nghttp2_on_frame_recv_callback on_frame_recv = nullptr;
  nghttp2_on_frame_send_callback on_frame_send = nullptr;
  nghttp2_on_data_chunk_recv_callback on_data_chunk_recv = nullptr;
  nghttp2_on_stream_close_callback on_stream_close = nullptr;
  // The owner returns received data to the flow-control windows itself (nghttp2_session_consume*),
  // so that a slow reader holds the peer back.
  bool manual_window_updates = false;
  // Sent first (SETTINGS).
  std::vector<nghttp2_settings_entry> settings;
  // The connection's receive window; 0 keeps HTTP/2's 64 KiB.
  int32_t connection_window = 0;
};

// The session, or nullptr when nghttp2 could not make it. Closed streams are not kept: nghttp2
// keeps them for the priority tree (up to the concurrent-stream limit per connection, hundreds of
// bytes per request ever served on a long connection) and nothing here uses priorities.
inline nghttp2_session* NewNghttp2Session(const Nghttp2SessionSpec& spec, void* user_data) {
  nghttp2_session_callbacks* callbacks = nullptr;
  if (nghttp2_session_callbacks_new(&callbacks) != 0) return nullptr;
  if (spec.on_begin_headers != nullptr) {
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, spec.on_begin_headers);
  }
  if (spec.on_header != nullptr) {
    nghttp2_session_callbacks_set_on_header_callback(callbacks, spec.on_header);
  }
  if (spec.on_frame_recv != nullptr) {
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, spec.on_frame_recv);
  }
  if (spec.on_frame_send != nullptr) {
    nghttp2_session_callbacks_set_on_frame_send_callback(callbacks, spec.on_frame_send);
  }
  if (spec.on_data_chunk_recv != nullptr) {
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, spec.on_data_chunk_recv);
  }
  if (spec.on_stream_close != nullptr) {
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, spec.on_stream_close);
  }
  nghttp2_option* option = nullptr;
  if (nghttp2_option_new(&option) != 0) {
    nghttp2_session_callbacks_del(callbacks);
    return nullptr;
  }
  nghttp2_option_set_no_closed_streams(option, 1);
  if (spec.manual_window_updates) nghttp2_option_set_no_auto_window_update(option, 1);
  nghttp2_session* session = nullptr;
  const int created = spec.server
                          ? nghttp2_session_server_new2(&session, callbacks, user_data, option)
                          : nghttp2_session_client_new2(&session, callbacks, user_data, option);
  nghttp2_option_del(option);
  nghttp2_session_callbacks_del(callbacks);
  if (created != 0) return nullptr;
  if (nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, spec.settings.data(),
                              spec.settings.size()) != 0 ||
      (spec.connection_window > 0 &&
       nghttp2_session_set_local_window_size(session, NGHTTP2_FLAG_NONE, 0,
                                             spec.connection_window) != 0)) {
    nghttp2_session_del(session);
    return nullptr;
  }
  return session;
}

// A header for nghttp2_submit_*: nghttp2 copies name and value, which need only live until then.
inline nghttp2_nv Nghttp2Header(absl::string_view name, absl::string_view value) {
  return nghttp2_nv{reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(),
                    value.size(), NGHTTP2_NV_FLAG_NONE};
}

// Feeds everything `in` holds to `session` and drains it. 0, or nghttp2's (negative) error; the
// callbacks never pause the session, so it takes all or fails.
inline int Nghttp2Receive(nghttp2_session* session, evbuffer* in) {
  for (;;) {
    const size_t size = evbuffer_get_contiguous_space(in);
    if (size == 0) return 0;
    const unsigned char* data = evbuffer_pullup(in, static_cast<ev_ssize_t>(size));
    const ssize_t used = nghttp2_session_mem_recv(session, data, size);
    if (used < 0) return static_cast<int>(used);
    evbuffer_drain(in, static_cast<size_t>(used));
  }
}

// Moves the frames `session` has queued into `out`, until it has no more or `out` holds
// `high_water` bytes. 0, or nghttp2's (negative) error.
inline int Nghttp2Send(nghttp2_session* session, evbuffer* out,
                       size_t high_water = std::numeric_limits<size_t>::max()) {
  while (evbuffer_get_length(out) < high_water) {
    const uint8_t* data = nullptr;
    const ssize_t n = nghttp2_session_mem_send(session, &data);
    if (n < 0) return static_cast<int>(n);
    if (n == 0) return 0;
    if (evbuffer_add(out, data, static_cast<size_t>(n)) != 0) return NGHTTP2_ERR_NOMEM;
  }
  return 0;
}

}  // namespace montage

#endif  // MONTAGE_COMMON_NGHTTP2_SESSION_H_
