"""Helpers shared by the benchmarks under tests/bench (ports, CPU time, polling, metrics)."""

import os
import re
import socket
import subprocess
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the full line (11 and 12 after the command).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def metric(admin, name, *label_parts):
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(p in line for p in label_parts):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def proc_status(pid, field):
    """A numeric field of /proc/<pid>/status (e.g. Threads, VmHWM in kB); None when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def grpc_frame(message):
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load_grpc(port, method_path, body_path, requests, conns, streams, log_path):
    """Unary gRPC calls with h2load pinned to core 1: req/s, completed, HTTP 200s, p50/p99 ms.

    h2load counts any HTTP 200 as success (gRPC errors arrive in trailers), so callers check
    the server's own counters for gRPC success.
    """
    cmd = ["taskset", "-c", "1", "h2load", "-n", str(requests), "-c", str(conns), "-m",
           str(streams), "-t", "1", "-H", "content-type: application/grpc", "-H", "te: trailers",
           "-d", body_path, "--log-file", log_path, f"http://127.0.0.1:{port}{method_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    latencies = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000.0)  # µs → ms
    latencies.sort()
    return {"rps": rps, "done": int(done.group(1)), "http_ok": int(done.group(2)),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}
