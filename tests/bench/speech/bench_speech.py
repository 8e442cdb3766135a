#!/usr/bin/env python3
"""Speech benchmark: `montaged speech` against the espeak-ng command line, same text and voice.

  1. script:  a 780-word script as WAV (22,050 Hz mono, voice en-us) through the service (the
              `montage speak` CLI, which streams the samples (StreamSynthesize, PCM) and writes
              the WAV as they come) against `espeak-ng -v en-us -w` on the same text, both timed
              from process start to file written. Target: <= 1.2x the CLI.
  2. again:   the same script again: engine calls (montage_speech_segments_total{source="engine"})
              must not grow (every segment from the cache); target <= 0.2x the first run.
  3. long:    a 10,000-word text streamed as PCM (StreamSynthesize) from a fresh montaged: time
              to the first audio chunk (target <= 0.5 s) and the service's peak RSS while it
              produces all of it (VmHWM; target <= 200 MiB).

Usage: bench_speech.py --montaged PATH --cli PATH [--smoke]
--smoke uses short texts (CI). Prints the figures and ratios; never asserts on speed. Exits
non-zero only when something did not work (a process failed, audio is missing, or the second
run called the engine).
"""

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import free_port, metric, proc_status, wait_for  # noqa: E402

WORDS = ("creators often spend whole afternoons cutting a single video into shape so a clear plan "
         "for every shot saves hours later because the story stays focused and the audience "
         "keeps watching until the very end of the episode where the best tips usually wait "
         "for them").split()


def script(words):
    """Deterministic prose of `words` words in sentences of 9 to 17 words, no sentence repeated
    (a repeated sentence would be a segment cache hit in the first run)."""
    rng = random.Random(780)
    out, sentence, i = [], [], 0
    while i < words:
        sentence.append(rng.choice(WORDS))
        i += 1
        if len(sentence) >= 9 + (len(out) % 9) or i == words:
            text = " ".join(sentence)
            out.append(text[0].upper() + text[1:] + ".")
            sentence = []
    return " ".join(out)


def read_ports(path):
    try:
        with open(path) as f:
            import json
            return json.load(f)
    except (OSError, ValueError):
        return None


def start(montaged, tmp, name):
    port_file = os.path.join(tmp, f"{name}.json")
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    proc = subprocess.Popen([montaged, "speech", f"--listen=127.0.0.1:{free_port()}",
                             f"--admin_listen=127.0.0.1:{free_port()}",
                             f"--port_file={port_file}"], stdout=log, stderr=log)
    wait_for(lambda: read_ports(port_file), "montaged")
    ports = read_ports(port_file)
    return proc, ports["grpc"], ports["admin"]


def timed(cmd, stdin_path=None):
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()}")
    return elapsed, r.stdout


def best(n, fn):
    return min(fn() for _ in range(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--montaged", required=True)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    script_words = 60 if args.smoke else 780
    long_words = 600 if args.smoke else 10000

    with tempfile.TemporaryDirectory() as tmp:
        text_path = os.path.join(tmp, "script.txt")
        with open(text_path, "w") as f:
            f.write(script(script_words))
        procs = []
        try:
            proc, addr, admin = start(args.montaged, tmp, "first")
            procs.append(proc)
            cli = [args.cli, f"--addr={addr}"]
            # Warm the process up (channel, voice data) on another text.
            timed(cli + ["speak", "Warming up.", "--format=wav", "--voice=en-us",
                         f"--out={tmp}/warm.wav"])

            # 1. first run through the service, against the espeak-ng CLI.
            service_first, out = timed(cli + ["speak", "-", "--format=wav", "--voice=en-us",
                                              f"--out={tmp}/service.wav"], text_path)
            engine_after_first = metric(admin, "montage_speech_segments_total", 'source="engine"')
            peer = best(3, lambda: timed(["espeak-ng", "-v", "en-us", "-w", f"{tmp}/cli.wav",
                                          "-f", text_path])[0])
            service_size = os.path.getsize(f"{tmp}/service.wav")
            peer_size = os.path.getsize(f"{tmp}/cli.wav")
            print(f"script: {script_words} words -> WAV 22050 Hz mono ({out.strip()})")
            print(f"  espeak-ng -w (best of 3): {peer:.3f} s, {peer_size} bytes")
            print(f"  montaged speech (first):  {service_first:.3f} s, {service_size} bytes; "
                  f"ratio {service_first / peer:.2f}x (target <= 1.2x)")
            if service_size < 1000:
                raise RuntimeError("the service wrote no audio")

            # 2. the same script again: all from the segment cache.
            service_again = best(3, lambda: timed(
                cli + ["speak", "-", "--format=wav", "--voice=en-us",
                       f"--out={tmp}/again.wav"], text_path)[0])
            engine_after_again = metric(admin, "montage_speech_segments_total",
                                        'source="engine"')
            calls = engine_after_again - engine_after_first
            print(f"  again (best of 3): {service_again:.3f} s, engine calls {calls:.0f}; "
                  f"ratio to first {service_again / service_first:.2f}x (target <= 0.2x)")
            if calls != 0:
                raise RuntimeError(f"the cached run made {calls} engine calls")
            proc.terminate()
            proc.wait(timeout=30)
            procs.remove(proc)

            # 3. a long text streamed from a fresh process.
            long_path = os.path.join(tmp, "long.txt")
            with open(long_path, "w") as f:
                f.write(script(long_words))
            proc, addr, admin = start(args.montaged, tmp, "long")
            procs.append(proc)
            rss_before = proc_status(proc.pid, "VmHWM")
            elapsed, out = timed([args.cli, f"--addr={addr}", "speak", "-", "--stream",
                                  "--format=pcm", "--voice=en-us", f"--out={tmp}/long.pcm"],
                                 long_path)
            rss_peak = proc_status(proc.pid, "VmHWM")
            m = re.search(r"first audio after ([0-9.]+) s", out)
            first = float(m.group(1)) if m else float("nan")
            size = os.path.getsize(f"{tmp}/long.pcm")
            print(f"long: {long_words} words streamed as PCM: {size / 44100:.0f} s of audio in "
                  f"{elapsed:.2f} s; first audio after {first:.3f} s (target <= 0.5 s)")
            print(f"  montaged peak RSS {rss_peak / 1024:.0f} MiB (at start {rss_before / 1024:.0f}"
                  f" MiB; target <= 200 MiB)")
            if size < long_words * 1000:
                raise RuntimeError("the long stream is too short")
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
