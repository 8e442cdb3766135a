// Structured logging: one line per event, JSON (for collectors) or text (for people), with the
// trace id when the event belongs to a traced request. Secrets must never be passed as fields.
//
//   LogInfo("cache snapshot loaded", {{"entries", n}, {"path", path}});
//   LogWarning("upstream failed", {{"error", status.ToString()}}, trace_id);
//
// Thread-safe; each line is written with one write(2) so lines never interleave.
#ifndef MONTAGE_COMMON_LOGGING_H_
#define MONTAGE_COMMON_LOGGING_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <variant>

#include "absl/strings/string_view.h"

namespace montage {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

struct LogField {
  using Value = std::variant<std::string, int64_t, uint64_t, double, bool>;
  LogField(absl::string_view k, absl::string_view v) : key(k), value(std::string(v)) {}
  LogField(absl::string_view k, const char* v) : key(k), value(std::string(v)) {}
  LogField(absl::string_view k, const std::string& v) : key(k), value(v) {}
  LogField(absl::string_view k, int v) : key(k), value(static_cast<int64_t>(v)) {}
  LogField(absl::string_view k, long v) : key(k), value(static_cast<int64_t>(v)) {}
  LogField(absl::string_view k, long long v) : key(k), value(static_cast<int64_t>(v)) {}
  LogField(absl::string_view k, unsigned v) : key(k), value(static_cast<uint64_t>(v)) {}
  LogField(absl::string_view k, unsigned long v) : key(k), value(static_cast<uint64_t>(v)) {}
  LogField(absl::string_view k, unsigned long long v) : key(k), value(static_cast<uint64_t>(v)) {}
  LogField(absl::string_view k, double v) : key(k), value(v) {}
  LogField(absl::string_view k, bool v) : key(k), value(v) {}
  std::string key;
  Value value;
};

using LogFields = std::initializer_list<LogField>;

// Process-wide settings; call once at start-up (defaults: info, text, stderr).
void ConfigureLogging(LogLevel min_level, bool json, absl::string_view process_name);
bool LogEnabled(LogLevel level);

// Formats one line without writing it (tests use this).
std::string FormatLogLine(LogLevel level, absl::string_view message, LogFields fields,
                          absl::string_view trace_id, bool json);

void Log(LogLevel level, absl::string_view message, LogFields fields = {},
         absl::string_view trace_id = "");

inline void LogDebug(absl::string_view m, LogFields f = {}, absl::string_view trace = "") {
  if (LogEnabled(LogLevel::kDebug)) Log(LogLevel::kDebug, m, f, trace);
}
inline void LogInfo(absl::string_view m, LogFields f = {}, absl::string_view trace = "") {
  Log(LogLevel::kInfo, m, f, trace);
}
inline void LogWarning(absl::string_view m, LogFields f = {}, absl::string_view trace = "") {
  Log(LogLevel::kWarning, m, f, trace);
}
inline void LogError(absl::string_view m, LogFields f = {}, absl::string_view trace = "") {
  Log(LogLevel::kError, m, f, trace);
}

}  // namespace montage

#endif  // MONTAGE_COMMON_LOGGING_H_
