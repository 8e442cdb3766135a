// Test helper: reads one sample back from Prometheus text exposition.
#ifndef MONTAGE_COMMON_TELEMETRY_METRICS_TEST_UTIL_H_
#define MONTAGE_COMMON_TELEMETRY_METRICS_TEST_UTIL_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace montage::telemetry::testing {

// The value of the first sample of `name` whose labels include every entry of `labels` (label
// values must not contain '"', ',' or '='; enough for ours). nullopt when there is none.
inline std::optional<double> SampleValue(absl::string_view text, absl::string_view name,
                                         const std::map<std::string, std::string>& labels = {}) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line.front() == '#') continue;
    if (!absl::ConsumePrefix(&line, name)) continue;
    std::map<std::string, std::string> found;
    if (absl::ConsumePrefix(&line, "{")) {
      const size_t close = line.find('}');
      if (close == absl::string_view::npos) continue;
      for (absl::string_view pair : absl::StrSplit(line.substr(0, close), ',', absl::SkipEmpty())) {
        std::vector<absl::string_view> kv = absl::StrSplit(pair, absl::MaxSplits('=', 1));
        if (kv.size() != 2) continue;
        absl::string_view value = kv[1];
        absl::ConsumePrefix(&value, "\"");
        absl::ConsumeSuffix(&value, "\"");
        found[std::string(kv[0])] = std::string(value);
      }
      line.remove_prefix(close + 1);
    }
    if (!absl::ConsumePrefix(&line, " ")) continue;  // a longer metric name
    bool match = true;
    for (const auto& [key, value] : labels) {
      auto it = found.find(key);
      if (it == found.end() || it->second != value) match = false;
    }
    if (!match) continue;
    double value = 0;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return std::nullopt;
}

}  // namespace montage::telemetry::testing

#endif  // MONTAGE_COMMON_TELEMETRY_METRICS_TEST_UTIL_H_
