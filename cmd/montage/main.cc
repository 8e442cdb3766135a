// montage: talks to a running montage suite. `montage help` lists the commands.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "cmd/montage/cli.h"

namespace {

// Audio downloads (speak, podcast) receive whole files of tens of MB. On a fresh process every
// page of that is a page fault, and under a hypervisor faults were most of the time (an 11 MB WAV:
// 150 ms, 80 ms with huge pages). glibc gives malloc transparent huge pages only through its
// tunable, read at start, so those commands start once more with it set.
void UseHugePagesForDownloads(int argc, char** argv) {
  std::string command;  // the first argument that is not a flag
  for (int i = 1; i < argc && command.empty(); ++i) {
    if (argv[i][0] != '-') command = argv[i];
  }
  if (command != "speak" && command != "podcast") return;
  // Once only, even where glibc drops GLIBC_TUNABLES (secure mode).
  if (std::getenv("MONTAGE_CLI_RESTARTED") != nullptr) return;
  const char* current = std::getenv("GLIBC_TUNABLES");
  if (current != nullptr && std::strstr(current, "glibc.malloc.hugetlb") != nullptr) return;
  if (setenv("MONTAGE_CLI_RESTARTED", "1", 1) != 0) return;
  std::string tunables = "glibc.malloc.hugetlb=1";
  if (current != nullptr && *current != '\0') tunables = std::string(current) + ":" + tunables;
  if (setenv("GLIBC_TUNABLES", tunables.c_str(), 1) != 0) return;
  execv("/proc/self/exe", argv);
  // Could not start again: go on without huge pages.
}

}  // namespace

int main(int argc, char** argv) {
  UseHugePagesForDownloads(argc, argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  return montage::cli::Run(args, std::cin, std::cout, std::cerr);
}
