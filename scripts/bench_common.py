"""Helpers shared by the daemon benchmarks (bench_daemon.py, bench_references.py):
ports, /metrics parsing, a tansu broker on 127.0.0.1, and the daemon's rate on N
messages already in a topic."""
import os, re, socket, subprocess, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def metrics(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def total(text, name):
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def start_tansu():
    """(process, brokers) of an in-memory tansu."""
    kport = free_port()
    url = f"tcp://127.0.0.1:{kport}"
    tansu = subprocess.Popen([os.path.join(ROOT, ".deps/bin/tansu"), "broker", "--listener-url", url,
                              "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return tansu, f"127.0.0.1:{kport}"


def wait_metrics(port):
    while True:
        try:
            return metrics(port)
        except OSError:
            time.sleep(0.2)


def rate_until(port, n):
    """Messages/s from the first consumed message until `n` verdicts."""
    start = None
    while True:
        text = metrics(port)
        if start is None and total(text, "dlsr_messages_consumed_total") > 0:
            start = time.time()
        if total(text, "dlsr_verdicts_total") + total(text, "dlsr_dead_letters_total") >= n:
            return n / (time.time() - start)
        time.sleep(0.1)
