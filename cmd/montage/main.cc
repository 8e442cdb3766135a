// montage: talks to a running montage suite. `montage help` lists the commands.
#include <iostream>
#include <string>
#include <vector>

#include "cmd/montage/cli.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return montage::cli::Run(args, std::cin, std::cout, std::cerr);
}
