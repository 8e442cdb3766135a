// montage: talks to a running montage suite. `montage help` lists the commands.
#include <malloc.h>

#include <iostream>
#include <string>
#include <vector>

#include "cmd/montage/cli.h"

int main(int argc, char** argv) {
  // Audio answers arrive as megabyte chunks. glibc would map each one fresh (and fault in every
  // page) and unmap it when freed; keeping them in the heap reuses the same pages chunk after
  // chunk.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 128 << 20);
  mallopt(M_TOP_PAD, 16 << 20);
  std::vector<std::string> args(argv + 1, argv + argc);
  return montage::cli::Run(args, std::cin, std::cout, std::cerr);
}
