#!/usr/bin/env python3
"""Daemon benchmark (called by scripts/benchmark.sh daemon): tansu on 127.0.0.1, N
Fashion-MNIST images published, `dlsr serve` started; measures messages/s until every
message is scored (from /metrics), offline `dlsr score` on the same images, end-to-end
latency p50/p99 at about half the measured rate, and resident memory after N and
10N messages (MEM_CHUNKS+1 batches of N), sampled after each batch. Prints a Markdown table. AUDIT=off
turns the window audit off. Usage: bench_daemon.py BIN BUNDLE IDX N"""
import os, re, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, free_port, metrics, rate_until, start_tansu, total, wait_metrics  # noqa: E402

BIN, BUNDLE, DATA, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def quantile(text, name, q):
    buckets = [(float("inf") if le == "+Inf" else float(le), float(v))
               for le, v in re.findall(rf'^{name}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} ([0-9.e+-]+)$', text, re.M)]
    merged = {}
    for le, v in buckets:
        merged[le] = merged.get(le, 0) + v
    edges = sorted(merged.items())
    count = edges[-1][1] if edges else 0
    for le, v in edges:
        if v >= q * count:
            return le
    return float("nan")


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024


mport = free_port()
tansu, brokers = start_tansu()
tmp = tempfile.mkdtemp()
cfg = os.path.join(tmp, "dlsr.toml")
# AUDIT=off runs the daemon without the window audit (for the side-by-side in the README).
audit = "false" if os.environ.get("AUDIT", "on") == "off" else "true"
open(cfg, "w").write(f"""[kafka]\nbrokers = "{brokers}"\ngroup_id = "bench"\npublish = "all"\n[model]\nbundle = "{BUNDLE}"\n
[metrics]\nlisten = "127.0.0.1:{mport}"\n[log]\nlevel = "warn"\n[audit]\nenabled = {audit}\n""")
try:
    for topic in ("dlsr-verdicts", "dlsr-dead-letters"):
        subprocess.run([BIN, "publish", "--brokers", brokers, "--topic", topic, "--partitions", "1", DATA, "--limit", "0"],
                       check=False, capture_output=True)

    def publish(n, rate=None):
        args = [BIN, "publish", "--brokers", brokers, "--topic", "images", "--partitions", "3", DATA, "--limit", str(n)]
        if rate:
            args += ["--rate", str(rate)]
        subprocess.run(args, check=True, capture_output=True)

    publish(N)  # the topic is created on first produce
    daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=subprocess.DEVNULL)
    wait_metrics(mport)
    rate = rate_until(mport, N)
    rss_n = rss_mb(daemon.pid)

    t = time.time()
    out = subprocess.run([BIN, "-q", "score", "--model", BUNDLE, DATA, "--limit", str(N)], check=True,
                         capture_output=True, text=True).stdout
    offline = out.count("\n") / (time.time() - t)

    # Latency at about half the daemon's rate; histogram deltas over this phase only.
    before = metrics(mport)
    half = max(1, int(rate / 2))
    n_lat = min(N, half * 20)
    publish(n_lat, rate=half)
    while total(metrics(mport), "dlsr_verdicts_total") < N + n_lat:
        time.sleep(0.2)
    after = metrics(mport)

    def delta(q, name="dlsr_end_to_end_seconds"):
        # Quantile of the phase: subtract cumulative bucket counts of `before`.
        pattern = r'^' + name + r'_bucket{([^}]*)le="([^"]+)"[^}]*} ([0-9.e+-]+)$'
        b = {le: v for _, le, v in re.findall(pattern, before, re.M)}
        lines = [f'{name}_bucket{{le="{le}"}} {float(v) - float(b.get(le, 0))}'
                 for _, le, v in re.findall(pattern, after, re.M)]
        return quantile("\n".join(lines), name, q)

    def phase_mean(name):
        grab = lambda text, suffix: float((re.findall(r'^' + name + suffix + r'(?:{[^}]*})? ([0-9.e+-]+)$', text, re.M) or ["0"])[0])
        n = grab(after, "_count") - grab(before, "_count")
        return (grab(after, "_sum") - grab(before, "_sum")) / n if n else float("nan")

    p50, p99 = delta(0.5), delta(0.99)
    wait50, wait99 = delta(0.5, "dlsr_batch_wait_seconds"), delta(0.99, "dlsr_batch_wait_seconds")
    mean_batch = phase_mean("dlsr_batch_size")
    # Memory: MEM_CHUNKS (default 9) more batches of N, so 10N in all; RSS after each.
    chunks = int(os.environ.get("MEM_CHUNKS", "9"))
    rss_series = [rss_n]
    for i in range(chunks):
        publish(N)
        while total(metrics(mport), "dlsr_verdicts_total") < (i + 2) * N + n_lat:
            time.sleep(0.5)
        rss_series.append(rss_mb(daemon.pid))
    rss_5n = rss_series[-1]
    daemon.terminate(); daemon.wait(timeout=60)
    # JSON_OUT=FILE also writes the figures as JSON (scripts/capacity_plan.py reads it).
    if os.environ.get("JSON_OUT"):
        import json
        with open(os.environ["JSON_OUT"], "w") as f:
            json.dump({"daemon_msgs_per_s": rate, "offline_images_per_s": offline, "messages": N,
                       "input_px": int(os.environ.get("SIZE", "64")), "audit": audit == "true",
                       "latency_p50_s": p50, "latency_p99_s": p99, "rss_mb": rss_5n,
                       "cores": os.cpu_count(), "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" \t:")}, f, indent=1)
    print(f"| daemon through tansu | {rate:.0f} msg/s |")
    print(f"| offline `dlsr score`, same images | {offline:.0f} images/s |")
    print(f"| daemon / offline | {rate / offline:.2f} |")
    print(f"| end-to-end latency at {half} msg/s: p50 / p99 (histogram bucket upper bounds) | {p50 * 1000:.0f} ms / {p99 * 1000:.0f} ms |")
    print(f"| at {half} msg/s: time queued for a batch p50 / p99; mean batch size | {wait50 * 1000:.0f} ms / {wait99 * 1000:.0f} ms; {mean_batch:.1f} |")
    print(f"| resident memory after {N} / {(chunks + 1) * N + n_lat} messages | {rss_n:.0f} MB / {rss_5n:.0f} MB |")
    print(f"| resident memory after each {N} messages | {' '.join(f'{r:.0f}' for r in rss_series)} MB |")
finally:
    tansu.kill()
