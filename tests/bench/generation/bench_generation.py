#!/usr/bin/env python3
"""Generation benchmark: many slow LLM calls at once through `montaged generation`.

A fake provider (tests/fake_llm on loopback) answers every request after a fixed delay and
records how many requests it held at once. By default montaged reaches it over h2c (HTTP/2 with
prior knowledge, common/http's nghttp2 transport), so the burst shares a few connections of up to
1000 streams each; --no-h2c uses HTTP/1.1 through libcurl, one connection per outstanding call.
montaged's generation service points at it through a config file. Then:
  1. burst:     N non-deterministic Generate calls at once (temperature 0.7: none cached or
                coalesced; the provider counts N requests), from h2load over 16 connections.
                Over h2c the provider first takes one burst of N straight from h2load, so its
                own cold start (it shares the 2 cores) is not in montaged's first burst.
                Reported: time for all to finish against the provider's delay, montaged's
                CPU-seconds, its peak thread count and peak RSS, the provider's peak in-flight,
                and what a blocking 8-thread server would need for the same load (N / 8 x delay).
                Then the same burst from gen_load (C++ async gRPC client, 16 channels, a distinct
                prompt per call), whose own CPU on the shared 2 cores shows in its time.
  2. identical: M identical deterministic calls at once; the provider's request count says how
                many upstream calls they cost (target 1).
  3. cached:    the answer of (2), now cached, with 50 outstanding: p50/p99 through gRPC, from
                gen_load (C++ gRPC client) and from h2load (-c50 -m1, as the cache benchmark;
                it costs the shared 2 cores less). Success is the server's own gRPC counter.
                Beside it the floor: the same server's grpc.health.v1 Check (a no-op unary call)
                driven the same way, and the ratio of the two p99s.

Usage: bench_generation.py --montaged PATH --fake PATH --load PATH [--smoke] [--h2c]
--smoke runs in seconds (CI) with a smaller burst and a short delay. Prints the figures; never
asserts on speed. Exits non-zero only when something did not work (a process failed to start,
calls failed, or the identical burst was not coalesced to one upstream call).
"""

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import (cpu_seconds, free_port, grpc_frame, h2load_grpc, metric,  # noqa: E402
                      proc_status, varint, wait_for)


def read_json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fake_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/stats", timeout=10) as r:
        return json.load(r)


def warm_provider(h2c_port, requests, tmp):
    """`requests` chat completions straight at the fake provider over h2c, all at once."""
    body = os.path.join(tmp, "provider-warm.json")
    with open(body, "w") as f:
        json.dump({"model": "gpt-fake", "messages": [{"role": "user", "content": "warm up"}]}, f)
    conns = 10
    subprocess.run(["taskset", "-c", "1", "h2load", "-n", str(requests), "-c", str(conns), "-m",
                    str(-(-requests // conns)), "-t", "1", "-H", "content-type: application/json",
                    "-d", body, f"http://127.0.0.1:{h2c_port}/v1/chat/completions"],
                   capture_output=True, timeout=600, check=True)


def fake_post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


class Sampler(threading.Thread):
    """Samples a process's thread count every 10 ms; keeps the peak."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_threads = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            n = proc_status(self.pid, "Threads")
            if n is not None:
                self.peak_threads = max(self.peak_threads, n)
            time.sleep(0.01)


def burst_request():
    """One GenerateRequest for h2load's burst: temperature 0.7, so neither cached nor coalesced."""
    content = b"Write a hook for a video about home espresso."
    message = b"\x08\x02" + b"\x12" + varint(len(content)) + content  # role USER, content
    sampling = b"\x09" + struct.pack("<d", 0.7)  # temperature
    return (b"\x0a" + varint(4) + b"fake" + b"\x22" + varint(len(message)) + message +
            b"\x2a" + varint(len(sampling)) + sampling)


def children_cpu():
    """CPU-seconds used by this script's finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cached_request():
    """The GenerateRequest gen_load's identical/closed modes send, serialized by hand."""
    content = b"Write a hook for a video about home espresso."
    message = b"\x08\x02" + b"\x12" + varint(len(content)) + content  # role USER, content
    sampling = b"\x09" + b"\x00" * 8  # temperature = 0.0 (explicitly present)
    return (b"\x0a" + varint(4) + b"fake" + b"\x22" + varint(len(message)) + message +
            b"\x2a" + varint(len(sampling)) + sampling)


def run_load(load, addr, mode, requests, **extra):
    cmd = [load, f"--addr={addr}", f"--mode={mode}", f"--requests={requests}", "--model=fake"]
    cmd += [f"--{k}={v}" for k, v in extra.items()]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--montaged", required=True)
    ap.add_argument("--fake", required=True)
    ap.add_argument("--load", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--delay", type=float, default=None, help="provider delay in seconds")
    ap.add_argument("--h2c", action=argparse.BooleanOptionalAction, default=True,
                    help="reach the provider over h2c (HTTP/2 prior knowledge); --no-h2c: HTTP/1.1")
    args = ap.parse_args()
    burst = args.requests or (300 if args.smoke else 10000)
    delay = args.delay if args.delay is not None else (0.2 if args.smoke else 2.0)
    identical = 100 if args.smoke else 1000
    closed = 2000 if args.smoke else 50000

    tmp = tempfile.mkdtemp(prefix="bench-generation-")
    procs = []
    try:
        fake_port_file = os.path.join(tmp, "fake.json")
        fake_cmd = [args.fake, "--port=0", f"--port_file={fake_port_file}",
                    f"--delay={int(delay * 1000)}ms"]
        if args.h2c:
            fake_cmd.append("--h2c_port=0")
        fake = subprocess.Popen(fake_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(fake)
        wait_for(lambda: read_json_file(fake_port_file), "the fake provider")
        fport = read_json_file(fake_port_file)["port"]  # HTTP/1.1: control pages, and calls with --no-h2c
        if args.h2c:
            # Each connection carries up to max_concurrent_streams calls (the fake allows 10000);
            # 1000 spreads the 10,000-call burst over ~10 connections, so neither one connection's
            # framing nor thousands of sockets dominate.
            transport = "h2c (HTTP/2 prior knowledge), max_concurrent_streams 1000"
            provider_url = f"http://127.0.0.1:{read_json_file(fake_port_file)['h2c_port']}/v1"
            provider_extra = "\n      http2_prior_knowledge: true"
            http_config = "{max_connections_per_host: 0, max_concurrent_streams: 1000}"
        else:
            transport = "HTTP/1.1, one connection per outstanding call"
            provider_url = f"http://127.0.0.1:{fport}/v1"
            provider_extra = ""
            http_config = "{max_connections_per_host: 0}"

        config = os.path.join(tmp, "montage.yaml")
        with open(config, "w") as f:
            f.write(f"""generation:
  providers:
    fake:
      kind: OPENAI
      base_url: {provider_url}
      retry: {{max_attempts: 1}}{provider_extra}
  deployments:
    fake-gpt: {{provider: fake, model: gpt-fake}}
  models:
    fake: {{deployments: [fake-gpt]}}
  http: {http_config}
logging: {{level: warning}}
tracing: {{sample_ratio: 0.0}}
""")
        port_file = os.path.join(tmp, "montaged.json")
        log = open(os.path.join(tmp, "montaged.log"), "w")
        montaged = subprocess.Popen([args.montaged, "generation", f"--config={config}",
                                     f"--listen=127.0.0.1:{free_port()}",
                                     f"--admin_listen=127.0.0.1:{free_port()}",
                                     f"--port_file={port_file}"], stdout=log, stderr=log)
        procs.append(montaged)
        wait_for(lambda: read_json_file(port_file), "montaged")
        addr = read_json_file(port_file)["grpc"]
        # Warm up channels and the provider connection path.
        run_load(args.load, addr, "burst", 20, channels=2)
        if args.h2c:
            # The provider stands for a service on other machines, yet here it shares montaged's
            # 2 cores. One burst straight at it first (h2load, OpenAI-shaped POSTs) has it touch
            # the memory of N held requests before montaged's cold burst, so that burst measures
            # montaged's cold start, not the fake's as well. Its CPU per burst is printed.
            warm_provider(read_json_file(fake_port_file)["h2c_port"], burst, tmp)
        fake_post(fport, "/_fake/reset", {})

        admin = read_json_file(port_file)["admin"]
        method = "/montage.generation.v1.GenerationService/Generate"
        grpc_port = int(addr.rsplit(":", 1)[1])

        # The burst from h2load: one request body for all, non-deterministic, so every call goes
        # upstream (the provider's request count proves it).
        burst_body = os.path.join(tmp, "burst.bin")
        with open(burst_body, "wb") as f:
            f.write(grpc_frame(burst_request()))
        sampler = Sampler(montaged.pid)
        sampler.start()

        def h2load_burst():
            """One burst; its figures. The provider's counters are reset first."""
            fake_post(fport, "/_fake/reset", {})
            cpu0 = cpu_seconds(montaged.pid)
            fake_cpu0 = cpu_seconds(fake.pid)
            ok0 = metric(admin, "montage_grpc_server_requests_total", 'code="OK"', method)
            load_cpu0 = children_cpu()
            r = h2load_grpc(grpc_port, method, burst_body, burst, 16, -(-burst // 16),
                            os.path.join(tmp, "burst.log"))
            r["load_cpu"] = children_cpu() - load_cpu0
            r["cpu"] = cpu_seconds(montaged.pid) - cpu0
            r["fake_cpu"] = cpu_seconds(fake.pid) - fake_cpu0
            r["stats"] = fake_stats(fport)
            ok = metric(admin, "montage_grpc_server_requests_total", 'code="OK"', method) - ok0
            if ok != burst or r["stats"]["total_requests"] != burst:
                raise RuntimeError(f"burst: {ok} of {burst} calls OK, "
                                   f"{r['stats']['total_requests']} provider requests")
            return r

        # The first burst meets a cold process (its heap and gRPC's threads grow, and on this VM
        # every new page faults expensively); the second, the same process warm.
        res = h2load_burst()
        warm = h2load_burst()
        sampler.stop.set()
        sampler.join()
        cpu, stats = res["cpu"], res["stats"]
        rss_mib = (proc_status(montaged.pid, "VmHWM") or 0) / 1024.0

        # The same burst from gen_load, a distinct prompt per call.
        fake_post(fport, "/_fake/reset", {})
        gen_cpu0 = children_cpu()
        gen = run_load(args.load, addr, "burst", burst, channels=16)
        gen_cpu = children_cpu() - gen_cpu0
        if gen["errors"]:
            raise RuntimeError(f"burst: {gen['errors']} calls failed: {gen['first_error']}")

        fake_post(fport, "/_fake/reset", {})
        ident = run_load(args.load, addr, "identical", identical, channels=4)
        upstream_identical = fake_stats(fport)["total_requests"]
        if ident["errors"]:
            raise RuntimeError(f"identical: {ident['errors']} failed: {ident['first_error']}")

        lat = run_load(args.load, addr, "closed", closed, concurrency=50, channels=1)
        if lat["errors"]:
            raise RuntimeError(f"closed: {lat['errors']} failed: {lat['first_error']}")

        ok_before = metric(admin, "montage_grpc_server_requests_total", 'code="OK"', method)
        body = os.path.join(tmp, "generate.bin")
        with open(body, "wb") as f:
            f.write(grpc_frame(cached_request()))
        h2 = h2load_grpc(grpc_port, method, body, closed, 50, 1,
                         os.path.join(tmp, "h2load.log"))
        ok_h2 = metric(admin, "montage_grpc_server_requests_total", 'code="OK"', method) - ok_before
        if ok_h2 != closed:
            raise RuntimeError(f"h2load: {ok_h2} of {closed} calls returned OK")
        # The floor: the cheapest unary call the same server answers (grpc.health.v1 Check of
        # the whole server, an empty request), the same way. A cached answer cannot beat it.
        noop_body = os.path.join(tmp, "health.bin")
        with open(noop_body, "wb") as f:
            f.write(grpc_frame(b""))
        noop = h2load_grpc(grpc_port, "/grpc.health.v1.Health/Check", noop_body, closed, 50, 1,
                           os.path.join(tmp, "h2load-noop.log"))
        if noop["http_ok"] != closed:
            raise RuntimeError(f"h2load: {noop['http_ok']} of {closed} health checks answered")

        blocking = burst / 8 * delay
        overhead = res["wall_s"] - delay
        print(f"generation benchmark ({'smoke' if args.smoke else 'full'}): provider delay "
              f"{delay:.2f} s, {burst} concurrent Generate calls")
        print(f"  provider transport         {transport}")
        print(f"  all finished in            {res['wall_s']:.3f} s  (overhead {overhead:.3f} s "
              f"over the provider's delay; p99 per call {res['p99']:.0f} ms; h2load, 16 "
              f"connections, {res['load_cpu']:.2f} CPU-s; the first burst after start)")
        print(f"  again, warm                {warm['wall_s']:.3f} s  (overhead "
              f"{warm['wall_s'] - delay:.3f} s; p99 per call {warm['p99']:.0f} ms; montaged CPU "
              f"{warm['cpu']:.2f} s)")
        print(f"  same burst from gen_load   {gen['wall_s']:.3f} s  (overhead "
              f"{gen['wall_s'] - delay:.3f} s; p99 per call {gen['p99_ms']:.0f} ms; C++ gRPC "
              f"client, 16 channels, distinct prompts, {gen_cpu:.2f} CPU-s of the 2 cores)")
        print(f"  provider peak in flight    {stats['peak_in_flight']} of {burst}")
        if args.h2c:
            print(f"  provider h2c connections   {stats['h2c_connections']} opened during the burst (+ the warm-up's)")
        print(f"  montaged CPU               {cpu:.2f} s  ({cpu / burst * 1e6:.0f} us per call; "
              "the first burst)")
        print(f"  provider CPU               {res['fake_cpu']:.2f} s first burst, "
              f"{warm['fake_cpu']:.2f} s warm (the fake shares the 2 cores"
              f"{'; warmed up by a burst of its own first' if args.h2c else ''})")
        print(f"  montaged peak threads      {sampler.peak_threads}")
        print(f"  montaged peak RSS          {rss_mib:.1f} MiB")
        print(f"  blocking 8-thread server   {blocking:.1f} s for the same load "
              f"({blocking / res['wall_s']:.0f}x longer)")
        print(f"  {identical} identical calls  -> {upstream_identical} upstream call(s); "
              f"{ident['cached']} answered from the cache")
        print(f"  cached answer, 50 outstanding (gen_load): p50 {lat['p50_ms']:.3f} ms, "
              f"p99 {lat['p99_ms']:.3f} ms ({lat['requests'] / lat['wall_s']:.0f} req/s)")
        print(f"  cached answer, 50 outstanding (h2load):   p50 {h2['p50']:.3f} ms, "
              f"p99 {h2['p99']:.3f} ms ({h2['rps']:.0f} req/s)")
        print(f"  no-op gRPC call (health Check), same way: p50 {noop['p50']:.3f} ms, "
              f"p99 {noop['p99']:.3f} ms ({noop['rps']:.0f} req/s); cached p99 is "
              f"{h2['p99'] / noop['p99']:.2f}x the floor")
        # Little's law: with 50 calls always outstanding the mean latency is 50 / throughput, so a
        # 1 ms p99 needs at least 50,000 answers a second; the no-op call shows what this server
        # and machine can answer at all.
        print(f"  Little's law at 50 outstanding: mean = 50 / req/s = {50e3 / h2['rps']:.2f} ms "
              f"cached, {50e3 / noop['rps']:.2f} ms no-op; a p99 <= 1 ms needs > 50000 req/s")
        if upstream_identical != 1:
            raise RuntimeError(f"{identical} identical calls made {upstream_identical} upstream "
                               "calls; single-flight should make 1")
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
