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
    """Unary gRPC calls with h2load pinned to core 1: req/s, wall seconds, completed, HTTP 200s,
    p50/p99 ms.

    h2load counts any HTTP 200 as success (gRPC errors arrive in trailers), so callers check
    the server's own counters for gRPC success.
    """
    open(log_path, "w").close()  # h2load appends to an existing log
    cmd = ["taskset", "-c", "1", "h2load", "-n", str(requests), "-c", str(conns), "-m",
           str(streams), "-t", "1", "-H", "content-type: application/grpc", "-H", "te: trailers",
           "-d", body_path, "--log-file", log_path, f"http://127.0.0.1:{port}{method_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    finished = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    wall_s = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    rps = float(finished.group(3))
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    latencies = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000.0)  # µs → ms
    latencies.sort()
    return {"rps": rps, "wall_s": wall_s, "done": int(done.group(1)),
            "http_ok": int(done.group(2)),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def child_pids(pid):
    """The pids whose parent is `pid` (e.g. nginx's workers under its master)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:  # ppid is field 4 of the full line (2 after the command)
            children.append(int(entry))
    return children


def h2load(url, body_path, headers, requests, conns, streams, log_path, timeout=600, taskset=None):
    """One h2load run of `requests` POSTs (-t 1); the per-request figures come from its log file.

    Returns req/s, h2load's done/succeeded/failed/errored counts, how many logged requests had
    each HTTP status (a dict) and p50/p99 in ms. h2load's "succeeded" means a 2xx; gRPC errors
    arrive in trailers it does not read, so gRPC callers must check grpc-status elsewhere (e.g.
    the server's own counter). `taskset`: a CPU list to pin h2load to (e.g. "1").
    """
    cmd = (["taskset", "-c", taskset] if taskset is not None else []) + [
        "h2load", "-n", str(requests), "-c", str(conns), "-m", str(streams), "-t", "1", "-d",
        body_path, "--log-file", log_path]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    open(log_path, "w").close()  # h2load appends to an existing log
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = run.stdout
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", out)
    if finished is None or counts is None:
        raise RuntimeError(f"h2load gave no figures (exit {run.returncode}): {out[-500:]} "
                           f"{run.stderr[-500:]}")
    statuses = {}
    latencies = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                statuses[int(parts[1])] = statuses.get(int(parts[1]), 0) + 1
                latencies.append(int(parts[2]) / 1000.0)  # µs → ms
    latencies.sort()
    return {"rps": float(finished.group(1)), "done": int(counts.group(1)),
            "succeeded": int(counts.group(2)), "failed": int(counts.group(3)),
            "errored": int(counts.group(4)), "statuses": statuses, "logged": len(latencies),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}
