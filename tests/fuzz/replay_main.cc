// A main() for fuzz targets in the normal (gcc, uninstrumented) build: runs the target's
// LLVMFuzzerTestOneInput over every file of the corpus directories and files named on the
// command line, so each corpus is a regression test that runs with the other unit tests. A crash
// or a failed invariant (the targets abort) fails the test; so does an empty corpus, which would
// otherwise pass while testing nothing. libFuzzer builds (-DMONTAGE_FUZZ=ON) use libFuzzer's own
// main instead of this one.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <system_error>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
// Optional in a fuzz target, as in libFuzzer.
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);

namespace {

namespace fs = std::filesystem;

// Appends the regular files under `arg` (or `arg` itself); false when it cannot be read.
bool CollectInputs(const fs::path& arg, std::vector<fs::path>* inputs) {
  std::error_code error;
  if (fs::is_regular_file(arg, error)) {
    inputs->push_back(arg);
    return true;
  }
  if (!fs::is_directory(arg, error)) {
    std::fprintf(stderr, "replay: %s: not a file or directory\n", arg.c_str());
    return false;
  }
  for (fs::recursive_directory_iterator it(arg, error), end; !error && it != end;
       it.increment(error)) {
    if (it->is_regular_file(error)) inputs->push_back(it->path());
  }
  if (error) {
    std::fprintf(stderr, "replay: %s: %s\n", arg.c_str(), error.message().c_str());
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize != nullptr) LLVMFuzzerInitialize(&argc, &argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
    return 2;
  }
  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    if (!CollectInputs(argv[i], &inputs)) return 1;
  }
  if (inputs.empty()) {
    std::fprintf(stderr, "replay: FAILED: no inputs under %s; an empty corpus tests nothing\n",
                 argv[1]);
    return 1;
  }
  std::sort(inputs.begin(), inputs.end());
  for (const fs::path& input : inputs) {
    std::ifstream file(input, std::ios::binary);
    if (!file) {
      std::fprintf(stderr, "replay: %s: cannot open\n", input.c_str());
      return 1;
    }
    const std::vector<uint8_t> data((std::istreambuf_iterator<char>(file)),
                                    std::istreambuf_iterator<char>());
    // Printed first, so that a crash's output names the input that caused it.
    std::fprintf(stderr, "replay: %s (%zu bytes)\n", input.c_str(), data.size());
    // An exact-size heap copy, so an empty input is a valid pointer and a read past the end is
    // at least a read past an allocation.
    std::unique_ptr<uint8_t[]> copy(new uint8_t[data.size() + (data.empty() ? 1 : 0)]);
    std::copy(data.begin(), data.end(), copy.get());
    LLVMFuzzerTestOneInput(copy.get(), data.size());
  }
  std::fprintf(stderr, "replay: %zu inputs, no failures\n", inputs.size());
  return 0;
}
