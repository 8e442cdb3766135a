// montage-espeak-worker: one lane of the speech service's espeak pool, started by montaged with a
// socketpair on stdin/stdout (see services/speech/espeak_worker.h). It links libespeak-ng and
// Abseil only, so it is ready in milliseconds where a second montaged would spend a tenth of a
// second loading its libraries. Usage: montage-espeak-worker [ESPEAK_DATA_PATH]
#include "services/speech/espeak_worker.h"

int main(int argc, char** argv) {
  return montage::speech::RunEspeakWorker(argc >= 2 ? argv[1] : "");
}
