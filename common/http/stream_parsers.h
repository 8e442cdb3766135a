// Incremental parsers for streamed HTTP bodies: Server-Sent Events (the WHATWG event-stream
// format: `event:`, `data:` (joined with "\n"), `id:`, `retry:`, comments, LF / CRLF / CR line
// ends, a blank line dispatches) and newline-delimited JSON. Feed them chunks as they arrive, cut
// anywhere; they call back once per complete event or line. A line (or an SSE event's data) longer
// than the configured limit is an error (RESOURCE_EXHAUSTED) so a broken upstream cannot grow
// memory without bound. After an error every later call returns that error.
//
// Not thread-safe: one parser belongs to one stream.
#ifndef MONTAGE_COMMON_HTTP_STREAM_PARSERS_H_
#define MONTAGE_COMMON_HTTP_STREAM_PARSERS_H_

#include <cstddef>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace montage::http {

struct SseEvent {
  std::string event;  // "message" when the stream named none
  std::string data;
  std::string id;
};

class SseParser {
 public:
  // Returning a non-OK status from the callback stops parsing; Feed returns that status.
  using EventCallback = absl::AnyInvocable<absl::Status(const SseEvent& event)>;

  explicit SseParser(EventCallback on_event, size_t max_line_bytes = size_t{1} << 20);

  absl::Status Feed(absl::string_view chunk);
  // End of stream: an event not followed by a blank line is dropped, as the format says.
  absl::Status Finish();

 private:
  absl::Status Consume(absl::string_view chunk);
  absl::Status ProcessLine(absl::string_view line);
  absl::Status Dispatch();

  EventCallback on_event_;
  size_t max_line_bytes_;
  std::string line_;
  bool last_was_cr_ = false;
  SseEvent pending_;
  bool has_data_ = false;
  // A UTF-8 byte order mark may open the stream and is skipped; these track it.
  bool at_start_ = true;
  std::string bom_prefix_;
  absl::Status error_;
};

class NdjsonParser {
 public:
  // Called with each non-empty line (without its line end); the JSON is not parsed here.
  using LineCallback = absl::AnyInvocable<absl::Status(absl::string_view line)>;

  explicit NdjsonParser(LineCallback on_line, size_t max_line_bytes = size_t{1} << 20);

  absl::Status Feed(absl::string_view chunk);
  // A last line without a newline is delivered.
  absl::Status Finish();

 private:
  absl::Status Deliver(absl::string_view line);

  LineCallback on_line_;
  size_t max_line_bytes_;
  std::string line_;
  absl::Status error_;
};

}  // namespace montage::http

#endif  // MONTAGE_COMMON_HTTP_STREAM_PARSERS_H_
