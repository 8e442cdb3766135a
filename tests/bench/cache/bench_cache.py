#!/usr/bin/env python3
"""Cache benchmark: gRPC Get against `montaged cache` vs redis-server GET, same run, loopback.

Both servers are pinned to core 0 and both load generators to core 1 (taskset). Values are
1 KiB. Two load shapes, the same number of requests outstanding for both peers:
  50 connections x 1 outstanding   (h2load -c50 -m1   | redis-benchmark -c50 -P1)
  50 connections x 16 outstanding  (h2load -c50 -m16  | redis-benchmark -c50 -P16)

h2load counts any HTTP 200 as a success, so gRPC success is taken from the server's own
counter (montage_grpc_server_requests_total{code="OK"}) and compared with the requests sent.
Latency percentiles come from h2load's --log-file; server CPU per request from /proc/<pid>/stat.

Usage: bench_cache.py --montaged PATH [--smoke] [--requests N]
--smoke runs a few seconds (CI); without it, a full run (by hand). It prints a table and the
ratios; it never asserts on speed. It exits non-zero only if something did not work (a server
failed to start, or requests failed).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import (cpu_seconds, free_port, grpc_frame, h2load_grpc, metric,  # noqa: E402
                      percentile, varint, wait_for)

VALUE = b"v" * 1024
KEY = b"bench:key"


def get_request():
    # montage.cache.v1.GetRequest{key = 2}
    return b"\x12" + varint(len(KEY)) + KEY


def set_request():
    # montage.cache.v1.SetRequest{key = 2, value = 3}, ttl unset (namespace default)
    return b"\x12" + varint(len(KEY)) + KEY + b"\x1a" + varint(len(VALUE)) + VALUE


def run_h2load(port, body_path, requests, conns, streams, log_path):
    return h2load_grpc(port, "/montage.cache.v1.CacheService/Get", body_path, requests, conns,
                       streams, log_path)


def run_redis_benchmark(port, requests, conns, pipeline):
    cmd = ["taskset", "-c", "1", "redis-benchmark", "-p", str(port), "-c", str(conns), "-n",
           str(requests), "-d", str(len(VALUE)), "-P", str(pipeline), "-t", "get", "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET":
            return {"rps": float(cells[1]), "p50": float(cells[4]), "p99": float(cells[6])}
    raise RuntimeError(f"could not parse redis-benchmark output:\n{out}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--montaged", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0)
    args = parser.parse_args()
    requests = args.requests or (5000 if args.smoke else 300000)
    rounds = args.rounds or (1 if args.smoke else 3)

    for tool in ("h2load", "redis-server", "redis-benchmark", "redis-cli", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_cache: {tool} is missing; run scripts/install-deps.sh")

    work = tempfile.mkdtemp(prefix="bench-cache-")
    procs = []
    try:
        redis_port = free_port()
        redis = subprocess.Popen(
            ["taskset", "-c", "0", "redis-server", "--port", str(redis_port), "--bind",
             "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        port_file = os.path.join(work, "ports.json")
        montaged = subprocess.Popen(
            ["taskset", "-c", "0", args.montaged, "cache", "--listen=127.0.0.1:0",
             "--admin_listen=127.0.0.1:0", f"--port_file={port_file}",
             "--set=logging.level=warning"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "montaged.log"), "w"))
        procs.append(montaged)
        wait_for(lambda: os.path.exists(port_file), "montaged")
        with open(port_file) as f:
            ports = json.load(f)
        grpc_port = int(ports["grpc"].rsplit(":", 1)[1])
        admin = ports["admin"]
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(redis_port), "ping"],
                                        capture_output=True).returncode == 0, "redis-server")

        # Preload 1 KiB under the same key in both.
        subprocess.run(["redis-cli", "-p", str(redis_port), "-x", "set", "key:__rand_int__"],
                       input=VALUE, check=True, capture_output=True)
        set_body = os.path.join(work, "set.bin")
        with open(set_body, "wb") as f:
            f.write(grpc_frame(set_request()))
        subprocess.run(["h2load", "-n", "1", "-c", "1", "-H", "content-type: application/grpc",
                        "-H", "te: trailers", "-d", set_body,
                        f"http://127.0.0.1:{grpc_port}/montage.cache.v1.CacheService/Set"],
                       check=True, capture_output=True)
        if metric(admin, "montage_grpc_server_requests_total", "CacheService/Set", 'code="OK"') != 1:
            sys.exit("bench_cache: preloading the montage cache failed")
        get_body = os.path.join(work, "get.bin")
        with open(get_body, "wb") as f:
            f.write(grpc_frame(get_request()))

        failures = 0
        print(f"cache benchmark: {requests} requests per run, {rounds} round(s), 1 KiB values, "
              f"servers on core 0, load on core 1")
        print(f"{'shape':<10} {'peer':<16} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'CPU µs/req':>11}")
        for streams in (1, 16):
            shape = f"50x{streams}"
            mont_runs, redis_runs = [], []
            for _ in range(rounds):
                ok_before = metric(admin, "montage_grpc_server_requests_total",
                                   "CacheService/Get", 'code="OK"')
                cpu_before = cpu_seconds(montaged.pid)
                r = run_h2load(grpc_port, get_body, requests, 50, streams,
                               os.path.join(work, f"h2load-{shape}.log"))
                r["cpu_us"] = (cpu_seconds(montaged.pid) - cpu_before) * 1e6 / max(1, r["done"])
                r["grpc_ok"] = metric(admin, "montage_grpc_server_requests_total",
                                      "CacheService/Get", 'code="OK"') - ok_before
                if r["grpc_ok"] != requests:
                    failures += 1
                    print(f"  montaged answered {r['grpc_ok']:.0f} of {requests} with grpc-status 0")
                mont_runs.append(r)

                cpu_before = cpu_seconds(redis.pid)
                rr = run_redis_benchmark(redis_port, requests, 50, streams)
                rr["cpu_us"] = (cpu_seconds(redis.pid) - cpu_before) * 1e6 / requests
                redis_runs.append(rr)

            def med(runs, k):
                return statistics.median(x[k] for x in runs)

            m = {k: med(mont_runs, k) for k in ("rps", "p50", "p99", "cpu_us")}
            rd = {k: med(redis_runs, k) for k in ("rps", "p50", "p99", "cpu_us")}
            print(f"{shape:<10} {'montaged gRPC':<16} {m['rps']:>10.0f} {m['p50']:>8.3f} "
                  f"{m['p99']:>8.3f} {m['cpu_us']:>11.1f}")
            print(f"{shape:<10} {'redis-server':<16} {rd['rps']:>10.0f} {rd['p50']:>8.3f} "
                  f"{rd['p99']:>8.3f} {rd['cpu_us']:>11.1f}")
            cpu_ratio = m["cpu_us"] / rd["cpu_us"] if rd["cpu_us"] > 0 else float("nan")
            print(f"{shape:<10} {'ratio':<16} {m['rps'] / rd['rps']:>9.2f}x "
                  f"{'':>8} {'':>8} {cpu_ratio:>10.2f}x   (montaged / redis)")
        if args.smoke:
            print("(smoke run: figures are indicative only; run without --smoke for the real ones)")
        if failures:
            sys.exit(f"bench_cache: {failures} run(s) had failed gRPC requests")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
