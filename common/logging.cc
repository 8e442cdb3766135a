#include "common/logging.h"

#include <unistd.h>

#include <atomic>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace montage {
namespace {

std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_json{false};
absl::Mutex g_name_mu;
std::string* g_process_name = new std::string("montage");

absl::string_view LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

std::string ValueText(const LogField::Value& v) {
  struct Visitor {
    std::string operator()(const std::string& s) const {
      // Quote values with spaces so text lines stay parseable.
      if (s.find_first_of(" \t\"=") == std::string::npos && !s.empty()) return s;
      return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    }
    std::string operator()(int64_t i) const { return absl::StrCat(i); }
    std::string operator()(uint64_t u) const { return absl::StrCat(u); }
    std::string operator()(double d) const { return absl::StrCat(d); }
    std::string operator()(bool b) const { return b ? "true" : "false"; }
  };
  return std::visit(Visitor{}, v);
}

}  // namespace

void ConfigureLogging(LogLevel min_level, bool json, absl::string_view process_name) {
  g_min_level.store(static_cast<int>(min_level));
  g_json.store(json);
  absl::MutexLock lock(&g_name_mu);
  *g_process_name = std::string(process_name);
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_min_level.load(); }

std::string FormatLogLine(LogLevel level, absl::string_view message, LogFields fields,
                          absl::string_view trace_id, bool json) {
  const absl::Time now = absl::Now();
  std::string process;
  {
    absl::MutexLock lock(&g_name_mu);
    process = *g_process_name;
  }
  if (json) {
    nlohmann::json line;
    line["ts"] = absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", now, absl::UTCTimeZone());
    line["level"] = LevelName(level);
    line["process"] = process;
    line["msg"] = std::string(message);
    if (!trace_id.empty()) line["trace_id"] = std::string(trace_id);
    for (const LogField& f : fields) {
      std::visit([&](const auto& v) { line[f.key] = v; }, f.value);
    }
    return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  std::string out = absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", now, absl::UTCTimeZone()),
                                 " ", LevelName(level), " ", process, ": ", message);
  for (const LogField& f : fields) absl::StrAppend(&out, " ", f.key, "=", ValueText(f.value));
  if (!trace_id.empty()) absl::StrAppend(&out, " trace_id=", trace_id);
  out.push_back('\n');
  return out;
}

void Log(LogLevel level, absl::string_view message, LogFields fields, absl::string_view trace_id) {
  if (!LogEnabled(level)) return;
  const std::string line = FormatLogLine(level, message, fields, trace_id, g_json.load());
  // One write per line: concurrent lines never interleave.
  size_t written = 0;
  while (written < line.size()) {
    const ssize_t n = ::write(STDERR_FILENO, line.data() + written, line.size() - written);
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
}

}  // namespace montage
