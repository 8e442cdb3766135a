#include "common/http/stream_parsers.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace montage::http {
namespace {

constexpr absl::string_view kUtf8Bom = "\xEF\xBB\xBF";

absl::Status LineTooLong(absl::string_view what, size_t limit) {
  return absl::ResourceExhaustedError(
      absl::StrCat(what, " longer than ", limit, " bytes in the response stream"));
}

}  // namespace

SseParser::SseParser(EventCallback on_event, size_t max_line_bytes)
    : on_event_(std::move(on_event)), max_line_bytes_(max_line_bytes) {}

absl::Status SseParser::Feed(absl::string_view chunk) {
  if (!error_.ok()) return error_;
  if (at_start_) {
    // The BOM may itself be cut between chunks, so hold back bytes that could still start one.
    while (!chunk.empty() && bom_prefix_.size() < kUtf8Bom.size() &&
           chunk.front() == kUtf8Bom[bom_prefix_.size()]) {
      bom_prefix_.push_back(chunk.front());
      chunk.remove_prefix(1);
    }
    if (bom_prefix_.size() < kUtf8Bom.size() && chunk.empty()) return absl::OkStatus();
    at_start_ = false;
    if (bom_prefix_.size() < kUtf8Bom.size() && !bom_prefix_.empty()) {
      // Not a BOM after all: those bytes are data.
      const std::string held = std::move(bom_prefix_);
      absl::Status status = Consume(held);
      if (!status.ok()) return status;
    }
    bom_prefix_.clear();
  }
  return Consume(chunk);
}

absl::Status SseParser::Consume(absl::string_view chunk) {
  if (chunk.empty()) return absl::OkStatus();
  size_t pos = 0;
  // A CR ended the previous chunk; an LF opening this one belongs to the same line end.
  if (last_was_cr_ && chunk.front() == '\n') pos = 1;
  last_was_cr_ = false;
  while (pos < chunk.size()) {
    const size_t end = chunk.find_first_of("\r\n", pos);
    if (end == absl::string_view::npos) {
      const absl::string_view rest = chunk.substr(pos);
      if (line_.size() + rest.size() > max_line_bytes_) {
        return error_ = LineTooLong("an event-stream line", max_line_bytes_);
      }
      line_.append(rest.data(), rest.size());
      return absl::OkStatus();
    }
    const absl::string_view piece = chunk.substr(pos, end - pos);
    if (line_.size() + piece.size() > max_line_bytes_) {
      return error_ = LineTooLong("an event-stream line", max_line_bytes_);
    }
    absl::Status status;
    if (line_.empty()) {
      status = ProcessLine(piece);  // the common case: the whole line is in this chunk
    } else {
      line_.append(piece.data(), piece.size());
      status = ProcessLine(line_);
      line_.clear();
    }
    if (!status.ok()) return error_ = std::move(status);
    pos = end + 1;
    if (chunk[end] == '\r') {
      if (pos == chunk.size()) {
        last_was_cr_ = true;
      } else if (chunk[pos] == '\n') {
        ++pos;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status SseParser::ProcessLine(absl::string_view line) {
  if (line.empty()) return Dispatch();
  if (line.front() == ':') return absl::OkStatus();  // a comment (often a keep-alive)
  absl::string_view field = line;
  absl::string_view value;
  const size_t colon = line.find(':');
  if (colon != absl::string_view::npos) {
    field = line.substr(0, colon);
    value = line.substr(colon + 1);
    absl::ConsumePrefix(&value, " ");
  }
  if (field == "data") {
    if (pending_.data.size() + value.size() + 1 > max_line_bytes_) {
      return LineTooLong("an event's data", max_line_bytes_);
    }
    pending_.data.append(value.data(), value.size());
    pending_.data.push_back('\n');
    has_data_ = true;
  } else if (field == "event") {
    pending_.event.assign(value.data(), value.size());
  } else if (field == "id") {
    // The last event id persists across events, as in the format; a NUL makes the field void.
    if (value.find('\0') == absl::string_view::npos) pending_.id.assign(value.data(), value.size());
  }
  // "retry" sets a reconnection delay, which means nothing to a single request; other fields
  // are ignored as the format says.
  return absl::OkStatus();
}

absl::Status SseParser::Dispatch() {
  if (!has_data_) {
    pending_.event.clear();
    return absl::OkStatus();
  }
  pending_.data.pop_back();  // the line end after the last data line
  if (pending_.event.empty()) pending_.event = "message";
  absl::Status status = on_event_ ? on_event_(pending_) : absl::OkStatus();
  pending_.event.clear();
  pending_.data.clear();
  has_data_ = false;
  return status;
}

absl::Status SseParser::Finish() {
  if (!error_.ok()) return error_;
  line_.clear();
  pending_.event.clear();
  pending_.data.clear();
  has_data_ = false;
  last_was_cr_ = false;
  return absl::OkStatus();
}

NdjsonParser::NdjsonParser(LineCallback on_line, size_t max_line_bytes)
    : on_line_(std::move(on_line)), max_line_bytes_(max_line_bytes) {}

absl::Status NdjsonParser::Feed(absl::string_view chunk) {
  if (!error_.ok()) return error_;
  while (!chunk.empty()) {
    const size_t newline = chunk.find('\n');
    if (newline == absl::string_view::npos) {
      // One byte of slack: the partial line may end in the CR of a CRLF.
      if (line_.size() + chunk.size() > max_line_bytes_ + 1) {
        return error_ = LineTooLong("an NDJSON line", max_line_bytes_);
      }
      line_.append(chunk.data(), chunk.size());
      return absl::OkStatus();
    }
    const absl::string_view piece = chunk.substr(0, newline);
    chunk.remove_prefix(newline + 1);
    absl::Status status;
    if (line_.empty()) {
      status = Deliver(piece);
    } else if (line_.size() + piece.size() > max_line_bytes_ + 1) {
      status = LineTooLong("an NDJSON line", max_line_bytes_);
    } else {
      line_.append(piece.data(), piece.size());
      status = Deliver(line_);
      line_.clear();
    }
    if (!status.ok()) return error_ = std::move(status);
  }
  return absl::OkStatus();
}

absl::Status NdjsonParser::Deliver(absl::string_view line) {
  absl::ConsumeSuffix(&line, "\r");
  if (line.size() > max_line_bytes_) return LineTooLong("an NDJSON line", max_line_bytes_);
  // Blank lines are not JSON values; streams use them as keep-alives.
  if (absl::StripAsciiWhitespace(line).empty()) return absl::OkStatus();
  return on_line_ ? on_line_(line) : absl::OkStatus();
}

absl::Status NdjsonParser::Finish() {
  if (!error_.ok()) return error_;
  if (line_.empty()) return absl::OkStatus();
  const std::string last = std::move(line_);
  line_.clear();
  absl::Status status = Deliver(last);
  if (!status.ok()) error_ = status;
  return status;
}

}  // namespace montage::http
