// The child processes of a process, read from /proc: for tests of code that starts workers.
// Header-only so any test target can use it.
#ifndef MONTAGE_TESTS_TESTING_CHILD_PROCESSES_H_
#define MONTAGE_TESTS_TESTING_CHILD_PROCESSES_H_

#include <dirent.h>
#include <sys/types.h>

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace montage::testing {

struct ChildProcess {
  pid_t pid = 0;
  std::string name;     // comm: at most 15 characters of the program's name
  std::string cmdline;  // arguments separated by NUL; empty for a zombie
};

// The processes whose parent is `parent` now.
inline std::vector<ChildProcess> ChildProcesses(pid_t parent) {
  std::vector<ChildProcess> children;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return children;
  std::vector<pid_t> all;
  while (dirent* entry = readdir(proc)) {
    pid_t pid = 0;
    if (absl::SimpleAtoi(entry->d_name, &pid)) all.push_back(pid);
  }
  closedir(proc);
  for (pid_t pid : all) {
    std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
    std::string line;
    if (!std::getline(stat, line)) continue;  // exited meanwhile
    // pid (comm) state ppid ...
    const size_t open = line.find('(');
    const size_t close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close + 2 > line.size()) {
      continue;
    }
    std::vector<std::string> fields = absl::StrSplit(line.substr(close + 2), ' ');
    pid_t ppid = 0;
    if (fields.size() < 2 || !absl::SimpleAtoi(fields[1], &ppid) || ppid != parent) continue;
    std::ifstream cmdline(absl::StrCat("/proc/", pid, "/cmdline"));
    children.push_back({pid, line.substr(open + 1, close - open - 1),
                        std::string(std::istreambuf_iterator<char>(cmdline), {})});
  }
  return children;
}

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_TESTING_CHILD_PROCESSES_H_
