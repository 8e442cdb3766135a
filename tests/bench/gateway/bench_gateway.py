#!/usr/bin/env python3
"""Gateway benchmark: one unary gRPC backend reached four ways, same run, loopback.

The backend is tests/gateway's echo backend as a process (echo_backend); every target calls
montage.testing.v1.EchoService/Unary with message "hello":
  direct        h2load -> backend (the ceiling)
  nginx         h2load -> nginx grpc_pass (Debian's, 2 workers, nginx.conf.template) -> backend
  gateway gRPC  h2load -> `montaged gateway` (2 worker threads) as native gRPC -> backend
  gateway REST  h2load -> the gateway, POST /v1/echo with JSON (grpc_json_transcoder) -> backend
Rounds are interleaved (direct, nginx, gateway gRPC, gateway REST, direct, ...). Each run is a short
warm-up, then a fixed number of requests sized from the warm-up's rate to last about --seconds,
so every count is exact. Nothing is pinned: the proxies' two workers need both cores, so req/s
includes sharing them with h2load and the backend; CPU per request is the steadier figure.

Success is not h2load's 2xx: a gRPC error travels in trailers h2load does not read. Every target is
first probed once with curl (grpc-status 0 in the trailers, the echoed message in the body), and in
every run the backend's own call counter (echo_backend --counters_file, written on SIGUSR1) must
have grown by exactly the requests h2load completed, all with HTTP 200. Latency percentiles come
from h2load's --log-file; proxy CPU-µs per request from /proc/<pid>/stat (nginx: master and
workers), the gateway's peak RSS from VmHWM.

Then a fan-out: POST /v1/batch on the gateway with 100 items calling EchoService/Unary that each
wait 200 ms (batch.proto), timed with curl after one untimed batch; all must succeed. The batch
service is montaged's own (routed to its gRPC port, descriptors from --montage-descriptors).
Without --montage-descriptors the gateway answers 404 for it, and that part is reported "not
available" (as is REST /v1/echo if it answers 404); the run goes on.

Usage: bench_gateway.py --montaged PATH --backend PATH --descriptors PATH
       [--montage-descriptors build/protos/montage.pb] [--smoke] [--rounds N] [--seconds S] [--conns C] [--streams M] [--batches N] [--nginx PATH] [--keep]
--smoke runs in seconds (CI): 1 round of about 1.5 s per target with fewer connections. Without
it, the full run (by hand): 5 rounds of 8 s per target, h2load -c16 -m10. It prints the figures,
the ratios and the issue's targets; it never asserts on speed. It exits non-zero only if a
component failed to start or requests failed that should not have.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import (child_pids, cpu_seconds, free_port, grpc_frame, h2load,  # noqa: E402
                      proc_status, varint, wait_for)

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = "montage.testing.v1.EchoService"
UNARY = f"/{SERVICE}/Unary"
MESSAGE = "hello"
BATCH_ITEMS = 100
BATCH_DELAY_S = 0.2
NOT_AVAILABLE_HTTP = (404, 501)
GRPC_UNIMPLEMENTED = 12

# The targets, printed beside the measured ratios.
TARGET_GRPC_RPS = 1.2       # gateway gRPC req/s >= 1.2x nginx
TARGET_GRPC_CPU = 0.8       # gateway gRPC CPU per request <= 0.8x nginx
TARGET_REST_RPS = 1.0       # gateway REST req/s >= 1.0x nginx gRPC
TARGET_BATCH_MS = 220.0     # 100 x 200 ms fan-out
TARGET_RSS_MIB = 100.0      # gateway VmHWM under the full load


class Failure(Exception):
    """Something that should have worked did not: the run exits non-zero."""


def echo_request():
    # montage.testing.v1.EchoRequest{message = 1}
    data = MESSAGE.encode()
    return b"\x0a" + varint(len(data)) + data


BATCH_SERVICE = "montage.gateway.v1.BatchService"


def cluster_yaml(name, port):
    """One STATIC HTTP/2 cluster of one host on 127.0.0.1, as a bootstrap's clusters[] entry."""
    return f"""  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"""


def bootstrap(backend_port, descriptors, self_port):
    """The gateway's Envoy v3 bootstrap: one listener on a free port, gRPC routed to the backend,
    REST/JSON transcoded first (re-matched on the gRPC path, the transcoder's default). The
    fan-out service is montaged's own (cluster `self`, its gRPC port); its items come back through
    this listener to the backend."""
    return f"""static_resources:
  listeners:
  - name: edge
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          route_config:
            name: routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/{SERVICE}/" }}
                route: {{ cluster: echo, timeout: 30s }}
              - match: {{ prefix: "/{BATCH_SERVICE}/" }}
                route: {{ cluster: self, timeout: 30s }}
          http_filters:
          - name: envoy.filters.http.grpc_json_transcoder
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
              proto_descriptor: {descriptors}
              services: [{SERVICE}, {BATCH_SERVICE}]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{cluster_yaml("echo", backend_port)}{cluster_yaml("self", self_port)}"""


def read_varint(data, pos):
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def merge_descriptor_sets(paths):
    """Serialized FileDescriptorSets are one repeated field (file = 1), so they concatenate; a
    file that two sets both carry (google/api/http.proto) is kept once, from the first set."""
    seen, out = set(), bytearray()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            tag, pos = read_varint(data, pos)
            length, body = read_varint(data, pos)
            entry = data[body:body + length]
            pos = body + length
            if tag != 0x0A:
                raise Failure(f"{path}: not a FileDescriptorSet")
            # FileDescriptorProto.name = 1 comes first in protoc's output.
            name_len, name_at = read_varint(entry, 1) if entry[:1] == b"\x0a" else (0, 0)
            name = entry[name_at:name_at + name_len]
            if name and name in seen:
                continue
            seen.add(name)
            out += b"\x0a" + varint(length) + entry
    return bytes(out)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def json_object(data):
    """`data` parsed as a JSON object; {} when it is not one."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_started(proc, ready, what, log_path):
    """Waits for `ready()`; a process that exits first is a failure with its log's tail."""
    def done():
        if proc.poll() is not None:
            raise Failure(f"{what} exited with {proc.returncode} while starting:\n"
                          f"{tail(log_path)}")
        return ready()
    try:
        wait_for(done, what)
    except RuntimeError as e:
        raise Failure(f"{e}:\n{tail(log_path)}") from None


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Backend:
    """The echo backend process and its call counter."""

    def __init__(self, binary, work, procs):
        self.counters_path = os.path.join(work, "echo-counters.json")
        port_file = os.path.join(work, "echo-port.json")
        self.log = os.path.join(work, "echo_backend.log")
        self.proc = subprocess.Popen(
            [binary, "--port=0", f"--port_file={port_file}",
             f"--counters_file={self.counters_path}"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        procs.append(self.proc)
        wait_started(self.proc, lambda: read_json(port_file) is not None, "echo_backend", self.log)
        self.port = read_json(port_file)["port"]
        self.seq = 0

    def calls(self):
        """Calls that reached a method so far (asks the backend with SIGUSR1)."""
        self.seq += 1
        self.proc.send_signal(signal.SIGUSR1)
        seq = self.seq

        def fresh():
            c = read_json(self.counters_path)
            return c is not None and c["seq"] >= seq
        wait_started(self.proc, fresh, "echo_backend counters", self.log)
        return read_json(self.counters_path)["calls"]


def start_nginx(backend_port, work, procs):
    run_dir = os.path.join(work, "nginx")
    os.makedirs(run_dir)
    port = free_port()
    with open(os.path.join(HERE, "nginx.conf.template")) as f:
        conf = f.read()
    conf = (conf.replace("@RUN_DIR@", run_dir).replace("@PORT@", str(port))
            .replace("@BACKEND_PORT@", str(backend_port)))
    conf_path = os.path.join(run_dir, "nginx.conf")
    with open(conf_path, "w") as f:
        f.write(conf)
    log = os.path.join(run_dir, "error.log")
    proc = subprocess.Popen(
        ["nginx", "-p", run_dir, "-e", log, "-c", conf_path, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    procs.append(proc)
    wait_started(proc, lambda: accepts(port) and len(child_pids(proc.pid)) >= 2, "nginx", log)
    return proc, port, log


def start_gateway(montaged, backend_port, descriptor_files, work, procs, extra_sets=()):
    # One descriptor set for the transcoder: the echo service's and montage's (for BatchService).
    descriptors = os.path.join(work, "descriptors.pb")
    with open(descriptors, "wb") as out:
        out.write(merge_descriptor_sets(descriptor_files))
    grpc_port = free_port()
    bootstrap_path = os.path.join(work, "envoy.yaml")
    with open(bootstrap_path, "w") as f:
        f.write(bootstrap(backend_port, descriptors, grpc_port))
    port_file = os.path.join(work, "montaged-ports.json")
    log = os.path.join(work, "montaged.log")
    proc = subprocess.Popen(
        [montaged, "gateway", f"--set=gateway.envoy_bootstrap={bootstrap_path}",
         "--set=gateway.worker_threads=2", f"--listen=127.0.0.1:{grpc_port}",
         "--admin_listen=127.0.0.1:0",
         f"--port_file={port_file}", "--set=logging.level=warning"]
        + [f"--set={kv}" for kv in extra_sets],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    procs.append(proc)
    wait_started(proc, lambda: (read_json(port_file) or {}).get("gateway"), "montaged gateway", log)
    return proc, int(read_json(port_file)["gateway"].rsplit(":", 1)[1]), log


def curl(url, body_path, content_type, work, timeout=30):
    """One HTTP/2 (prior knowledge) POST: (HTTP status, headers and trailers, body, seconds)."""
    head_path = os.path.join(work, "curl-head.txt")
    out_path = os.path.join(work, "curl-body.bin")
    cmd = ["curl", "-s", "--http2-prior-knowledge", "-X", "POST", "-H",
           f"content-type: {content_type}", "-H", "te: trailers", "--data-binary", f"@{body_path}",
           "-D", head_path, "-o", out_path, "-w", "%{http_code} %{time_total}",
           "--max-time", str(timeout), url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    if run.returncode != 0:
        raise Failure(f"curl {url} failed (exit {run.returncode}) {run.stderr.strip()}")
    code, seconds = run.stdout.split()
    with open(head_path, errors="replace") as f:
        head = {}
        for line in f:
            if ":" in line:
                k, v = line.split(":", 1)
                head[k.strip().lower()] = v.strip()
    with open(out_path, "rb") as f:
        body = f.read()
    return int(code), head, body, float(seconds)


def probe(target, work):
    """One call through `target` before any load: None when it works, "not available: ..." for
    REST while the gateway does not transcode yet; anything else is a Failure."""
    code, head, body, _ = curl(target["url"], target["body"], target["content_type"], work)
    if target["rest"]:
        if code in NOT_AVAILABLE_HTTP:
            return f"not available (HTTP {code}: {body.decode(errors='replace').strip()[:100]})"
        message = json_object(body).get("message") if code == 200 else None
        if message != MESSAGE:
            raise Failure(f"{target['name']}: probe answered HTTP {code}: {body[:200]!r}")
        return None
    status = head.get("grpc-status")
    if code != 200 or status != "0" or MESSAGE.encode() not in body:
        raise Failure(f"{target['name']}: probe answered HTTP {code}, grpc-status {status}, "
                      f"grpc-message {head.get('grpc-message')!r}")
    return None


def proxy_pids(target):
    proc = target["proxy"]
    if proc is None:
        return []
    return [proc.pid] + child_pids(proc.pid)


def proxy_cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def run_load(target, backend, args, work, round_no):
    """A warm-up, then one measured h2load run through `target`; the figures, or a Failure."""
    headers = [f"content-type: {target['content_type']}"]
    if not target["rest"]:
        headers.append("te: trailers")
    log_path = os.path.join(work, f"h2load-{target['key']}.log")
    timeout = max(120, args.seconds * 20)
    warm = h2load(target["url"], target["body"], headers, args.warmup, args.conns, args.streams,
                  log_path, timeout)
    requests = int(min(max(warm["rps"] * args.seconds, args.conns * args.streams * 10),
                       args.max_requests))

    pids = proxy_pids(target)
    calls_before = backend.calls()
    proxy_before = proxy_cpu(pids)
    backend_before = cpu_seconds(backend.proc.pid)
    r = h2load(target["url"], target["body"], headers, requests, args.conns, args.streams,
               log_path, timeout)
    r["proxy_us"] = (proxy_cpu(pids) - proxy_before) * 1e6 / max(1, r["done"]) if pids else None
    r["backend_us"] = (cpu_seconds(backend.proc.pid) - backend_before) * 1e6 / max(1, r["done"])
    r["backend_calls"] = backend.calls() - calls_before
    r["requests"] = requests

    problems = []
    if r["done"] != requests or r["errored"]:
        problems.append(f"h2load completed {r['done']} of {requests} ({r['errored']} errored)")
    if r["statuses"].get(200, 0) != requests:
        problems.append(f"HTTP statuses {dict(sorted(r['statuses'].items()))} for {requests} "
                        f"requests")
    if r["backend_calls"] != requests:
        problems.append(f"the backend counted {r['backend_calls']} calls for {requests} requests")
    if problems:
        raise Failure(f"{target['name']} round {round_no}: " + "; ".join(problems))
    return r


def batch_body(path):
    items = [{"id": f"i{i}", "method": UNARY,
              "body": {"message": f"b{i}", "delay": f"{BATCH_DELAY_S:.3f}s"}}
             for i in range(BATCH_ITEMS)]
    with open(path, "w") as f:
        json.dump({"items": items}, f)


def batch_not_available(code, head, body):
    if code in NOT_AVAILABLE_HTTP or head.get("grpc-status") == str(GRPC_UNIMPLEMENTED):
        return True
    return json_object(body).get("code") == GRPC_UNIMPLEMENTED


def measure_batch(gateway_port, backend, runs, work):
    """`runs` batches of 100 x 200 ms: a list of ms, or "not available: ..."; else a Failure.
    One batch more runs first, untimed but checked (it opens the fan-out's connection to the
    listener, as the load targets' warm-up does)."""
    body_path = os.path.join(work, "batch.json")
    batch_body(body_path)
    times = []
    for n in range(runs + 1):
        calls_before = backend.calls()
        code, head, body, seconds = curl(f"http://127.0.0.1:{gateway_port}/v1/batch", body_path,
                                         "application/json", work)
        if batch_not_available(code, head, body):
            text = body.decode(errors="replace").strip()[:100]
            return f"not available (HTTP {code}, grpc-status {head.get('grpc-status')}: {text})"
        problems = []
        results = json_object(body).get("results", []) if code == 200 else []
        results = results if isinstance(results, list) else []
        if code != 200 or len(results) != BATCH_ITEMS:
            problems.append(f"HTTP {code} with {len(results)} results: {body[:200]!r}")
        for i, item in enumerate(results):
            item = item if isinstance(item, dict) else {}
            status = item.get("status") if isinstance(item.get("status"), dict) else {}
            answer = item.get("body") if isinstance(item.get("body"), dict) else {}
            # google.rpc.Status prints code 0 (OK) as an absent field.
            if (status.get("code", 0) != 0 or answer.get("message") != f"b{i}"
                    or item.get("id") != f"i{i}"):
                problems.append(f"item {i}: {json.dumps(results[i])[:200]}")
                break
        calls = backend.calls() - calls_before
        if calls != BATCH_ITEMS:
            problems.append(f"the backend counted {calls} calls for {BATCH_ITEMS} items")
        if problems:
            raise Failure(f"batch {n + 1}: " + "; ".join(problems))
        if n > 0:
            times.append(seconds * 1000.0)
    return times


def spread(values):
    return f"[{min(values):.0f}–{max(values):.0f}]"


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(value, target, at_least):
    if value is None:
        return "n/a"
    return "met" if (value >= target if at_least else value <= target) else "NOT met"


def report(targets, args, gateway_hwm_kib, nginx_hwm_kib, batch, smoke):
    print()
    print(f"{'target':<14} {'req/s median':>12} {'[min–max]':>15} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'proxy CPU µs/req':>16} {'[min–max]':>11} {'backend µs/req':>14}")
    medians = {}
    for t in targets:
        if t["unavailable"]:
            print(f"{t['name']:<14} {t['unavailable']}")
            continue
        runs = t["runs"]
        m = {k: median_of(runs, k) for k in ("rps", "p50", "p99", "backend_us")}
        m["proxy_us"] = median_of(runs, "proxy_us") if t["proxy"] is not None else None
        medians[t["key"]] = m
        cpu = (f"{m['proxy_us']:>16.1f} {spread([r['proxy_us'] for r in runs]):>11}"
               if m["proxy_us"] is not None else f"{'—':>16} {'':>11}")
        print(f"{t['name']:<14} {m['rps']:>12.0f} {spread([r['rps'] for r in runs]):>15} "
              f"{m['p50']:>7.2f} {m['p99']:>7.2f} {cpu} {m['backend_us']:>14.1f}")

    def get(key, field):
        return medians[key][field] if key in medians else None

    runs_of = {t["key"]: t["runs"] for t in targets if not t["unavailable"]}
    rows = [  # name, numerator, denominator, figure, target, whether the target is a minimum
        ("gateway gRPC / nginx, req/s", "gw_grpc", "nginx", "rps", TARGET_GRPC_RPS, True),
        ("gateway gRPC / nginx, CPU per request", "gw_grpc", "nginx", "proxy_us", TARGET_GRPC_CPU,
         False),
        ("gateway REST / nginx gRPC, req/s", "gw_rest", "nginx", "rps", TARGET_REST_RPS, True),
        ("gateway REST / gateway gRPC, CPU per request", "gw_rest", "gw_grpc", "proxy_us", None,
         None),
        ("nginx / direct, req/s", "nginx", "direct", "rps", None, None),
        ("gateway gRPC / direct, req/s", "gw_grpc", "direct", "rps", None, None),
    ]
    print()
    print(f"{'ratio of medians':<46} {'measured':>9} {'per round':>13}   target")
    for name, num, den, field, target, at_least in rows:
        value = ratio(get(num, field), get(den, field))
        shown = f"{value:.2f}x" if value is not None else "n/a"
        per_round = [ratio(a[field], b[field])
                     for a, b in zip(runs_of.get(num, []), runs_of.get(den, []))]
        per_round = [r for r in per_round if r is not None]
        rounds = f"[{min(per_round):.2f}–{max(per_round):.2f}]" if per_round else ""
        goal = (f"{'≥' if at_least else '≤'} {target:.2f}x" if target is not None else "")
        mark = verdict(value, target, at_least) if target is not None else ""
        print(f"{name:<46} {shown:>9} {rounds:>13}   {goal:<10} {mark}".rstrip())

    print()
    if isinstance(batch, str):
        print(f"{'batch: 100 x 200 ms via POST /v1/batch':<46} {batch}")
    else:
        worst = max(batch)
        rounds = f"[{min(batch):.0f}–{worst:.0f}]"
        print(f"{'batch: 100 x 200 ms via POST /v1/batch, ms':<46} "
              f"{statistics.median(batch):>9.1f} {rounds:>13}   ≤ {TARGET_BATCH_MS:.0f} ms  "
              f"{verdict(worst, TARGET_BATCH_MS, False)} (the slowest of {len(batch)})")
    rss = gateway_hwm_kib / 1024.0 if gateway_hwm_kib else None
    shown = f"{rss:.1f}" if rss is not None else "n/a"
    print(f"{'gateway peak RSS (VmHWM), MiB':<46} {shown:>9} {'':>13}   "
          f"≤ {TARGET_RSS_MIB:.0f} MiB {verdict(rss, TARGET_RSS_MIB, False)}")
    if nginx_hwm_kib:
        print(f"{'nginx peak RSS (master + workers), MiB':<46} {nginx_hwm_kib / 1024.0:>9.1f}")
    if smoke:
        print("(smoke run: figures are indicative only; run without --smoke for the real ones)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--montaged", required=True)
    parser.add_argument("--backend", required=True, help="the echo_backend binary")
    parser.add_argument("--descriptors", required=True,
                        help="echo.proto's descriptor set (build/tests/gateway/generated/echo.pb)")
    parser.add_argument("--montage-descriptors", default="",
                        help="montage's descriptor set (build/protos/montage.pb), for the batch step")
    parser.add_argument("--nginx", default="nginx")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0, help="per target per round")
    parser.add_argument("--conns", type=int, default=0)
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--batches", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra montaged --set for the gateway, e.g. tracing.sample_ratio=0 "
                             "(by default every request is traced into the ring buffer)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.smoke else 5)
    args.seconds = args.seconds or (1.5 if args.smoke else 8.0)
    args.conns = args.conns or (4 if args.smoke else 16)
    args.streams = args.streams or (4 if args.smoke else 10)
    args.batches = args.batches or (1 if args.smoke else 5)
    args.warmup = max(args.conns * args.streams * 4, 300 if args.smoke else 3000)
    args.max_requests = 2_000_000

    for tool in ("h2load", "curl", args.nginx):
        if shutil.which(tool) is None:
            sys.exit(f"bench_gateway: {tool} is missing; run scripts/install-deps.sh")
    for path in (args.montaged, args.backend, args.descriptors):
        if not os.path.exists(path):
            sys.exit(f"bench_gateway: {path} does not exist (build it first)")

    # A SIGTERM (ctest's timeout) still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_gateway: terminated"))
    work = tempfile.mkdtemp(prefix="bench-gateway-")
    procs = []
    try:
        backend = Backend(args.backend, work, procs)
        nginx, nginx_port, _ = start_nginx(backend.port, work, procs)
        descriptor_files = [os.path.abspath(args.descriptors)]
        if args.montage_descriptors:
            descriptor_files.append(os.path.abspath(args.montage_descriptors))
        gateway, gateway_port, _ = start_gateway(args.montaged, backend.port, descriptor_files,
                                                 work, procs, args.gateway_set)
        grpc_body = os.path.join(work, "body.bin")
        with open(grpc_body, "wb") as f:
            f.write(grpc_frame(echo_request()))
        json_body = os.path.join(work, "body.json")
        with open(json_body, "w") as f:
            json.dump({"message": MESSAGE}, f)

        def target(key, name, port, proxy, rest=False):
            return {"key": key, "name": name, "proxy": proxy, "rest": rest, "runs": [],
                    "url": f"http://127.0.0.1:{port}{'/v1/echo' if rest else UNARY}",
                    "body": json_body if rest else grpc_body,
                    "content_type": "application/json" if rest else "application/grpc",
                    "unavailable": None}
        targets = [target("direct", "direct", backend.port, None),
                   target("nginx", "nginx", nginx_port, nginx),
                   target("gw_grpc", "gateway gRPC", gateway_port, gateway),
                   target("gw_rest", "gateway REST", gateway_port, gateway, rest=True)]
        for t in targets:
            t["unavailable"] = probe(t, work)

        print(f"gateway benchmark: {args.rounds} interleaved round(s), ~{args.seconds:g} s per "
              f"target, h2load -c{args.conns} -m{args.streams} -t1, unary {UNARY} "
              f"(\"{MESSAGE}\"), loopback, {os.cpu_count()} cores, nothing pinned, load average "
              f"{os.getloadavg()[0]:.2f} at the start")
        version = subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr
        print(f"{version.strip().replace('nginx version: ', '')} (2 workers); montaged gateway "
              f"(2 worker threads)")
        for t in targets:
            if t["unavailable"]:
                print(f"{t['name']}: {t['unavailable']}")
        for round_no in range(1, args.rounds + 1):
            line = []
            for t in targets:
                if t["unavailable"]:
                    continue
                r = run_load(t, backend, args, work, round_no)
                t["runs"].append(r)
                cpu = f", proxy {r['proxy_us']:.1f} µs/req" if r["proxy_us"] is not None else ""
                line.append(f"{t['name']} {r['rps']:.0f} req/s (p50 {r['p50']:.2f} ms, "
                            f"p99 {r['p99']:.2f} ms{cpu})")
            print(f"round {round_no}: " + "; ".join(line), flush=True)
        gateway_hwm = proc_status(gateway.pid, "VmHWM")
        nginx_hwm = sum(proc_status(p, "VmHWM") or 0 for p in proxy_pids(targets[1]))

        batch = measure_batch(gateway_port, backend, args.batches, work)
        gateway_hwm = max(gateway_hwm or 0, proc_status(gateway.pid, "VmHWM") or 0)
        report(targets, args, gateway_hwm, nginx_hwm, batch, args.smoke)
    except Failure as e:
        sys.exit(f"bench_gateway: FAILED: {e}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if args.keep:
            print(f"(work directory kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
