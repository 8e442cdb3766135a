// montaged's configuration: defaults, one YAML file, environment overrides and --set flags,
// merged in that order into a montage.config.v1.Config and validated before anything starts.
//
// The YAML is read generically through the proto's descriptor, so a new config field needs no
// parser change. Unknown keys and bad values are INVALID_ARGUMENT naming the file, line and what
// is wrong. Secrets never live in the config: a SecretRef names where to read them.
#ifndef MONTAGE_COMMON_CONFIG_H_
#define MONTAGE_COMMON_CONFIG_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "montage/config/v1/config.pb.h"

namespace montage::config {

using Config = ::montage::config::v1::Config;

// Every field's default value (what an empty file means).
Config DefaultConfig();

struct LoadOptions {
  // YAML file; empty means defaults only.
  std::string path;
  // The process environment as NAME=VALUE pairs; only MONTAGE__* entries are read.
  std::vector<std::pair<std::string, std::string>> environment;
  // "field.path=value" overrides (from --set), applied last.
  std::vector<std::string> overrides;
};

// Defaults, then the file, then the environment, then overrides; then Validate().
absl::StatusOr<Config> LoadConfig(const LoadOptions& options);

// The current process environment, for LoadOptions::environment.
std::vector<std::pair<std::string, std::string>> ProcessEnvironment();

// Merges YAML text into `message`. `source` names it in errors ("montage.yaml").
absl::Status MergeYaml(absl::string_view yaml, absl::string_view source,
                       google::protobuf::Message& message);

// Sets one field from text: `path` is dot-separated field names (map keys are path components:
// "cache.namespaces.audio.max_bytes"). `source` names where it came from in errors.
absl::Status SetFieldFromText(google::protobuf::Message& message, absl::string_view path,
                              absl::string_view value, absl::string_view source);

// Range and consistency checks that the schema cannot express.
absl::Status Validate(const Config& config);

// "100MiB", "1.5GB", "4096" → bytes. Binary (KiB, MiB, GiB) and decimal (KB, MB, GB) units.
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);

// The secret named by `ref` (environment variable or file, trailing newline stripped). The
// error message names the variable or file, never the value.
absl::StatusOr<std::string> ResolveSecret(const ::montage::config::v1::SecretRef& ref);

// The config as YAML-compatible JSON for /config_dump (secrets are references, so nothing leaks).
std::string ConfigToJson(const Config& config);

}  // namespace montage::config

#endif  // MONTAGE_COMMON_CONFIG_H_
