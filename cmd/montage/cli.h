// The montage command-line client: parses a command line, calls the suite over gRPC and prints
// a readable answer (or JSON with --json). Separate from main so tests can drive it.
#ifndef MONTAGE_CMD_MONTAGE_CLI_H_
#define MONTAGE_CMD_MONTAGE_CLI_H_

#include <iosfwd>
#include <string>
#include <vector>

namespace montage::cli {

// Exit codes: 0 success, 1 not found (a cache miss), 2 usage error, 3 the call failed.
int Run(const std::vector<std::string>& args, std::istream& in, std::ostream& out,
        std::ostream& err);

}  // namespace montage::cli

#endif  // MONTAGE_CMD_MONTAGE_CLI_H_
