#!/usr/bin/env python3
"""Peak memory with large images (issue #21), called by scripts/benchmark.sh memory.

Makes three sets of images (Pillow, from the peer's venv): 100 images of which three are
6000x6000 PNGs of about 130 kB (legal, within the decode limits, 36 megapixels each);
30 JPEGs of 4000x3000 (12 megapixels); 20 PNGs of 6000x6000. For each set: the daemon
(`dlsr serve`, default pipeline settings) through tansu on 127.0.0.1 until every image
has its output, its peak resident memory (VmHWM) and the memory after loading; and
`dlsr score --workers 1` over the same folder (peak RSS of the process).
Prints a Markdown table. Usage: memory_check.py BIN BUNDLE OUTDIR
"""
import os, re, socket, subprocess, sys, tempfile, time, urllib.request

from PIL import Image
import numpy as np

BIN, BUNDLE, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def big_png(path, side, seed):
    # A smooth gradient with a little structure: 36 MP that compress to ~100-200 kB.
    y, x = np.mgrid[0:side, 0:side]
    r = ((x * 255) // side).astype(np.uint8)
    g = ((y * 255) // side).astype(np.uint8)
    b = (((x // 500 + y // 500 + seed) % 2) * 128).astype(np.uint8)
    Image.fromarray(np.dstack([r, g, b])).save(path, optimize=True)


def jpeg(path, w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 50, w // 50, 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.BILINEAR).save(path, quality=90)


def small_png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)


def make_sets():
    sets = {}
    d = os.path.join(OUT, "mixed"); os.makedirs(d, exist_ok=True)
    for i in range(97):
        small_png(os.path.join(d, f"small-{i:03}.png"), i)
    for i in range(3):
        big_png(os.path.join(d, f"big-{i}.png"), 6000, i)
    sets["100 images, 3 of them 6000x6000 PNG"] = d
    d = os.path.join(OUT, "jpeg12mp"); os.makedirs(d, exist_ok=True)
    for i in range(30):
        jpeg(os.path.join(d, f"photo-{i:02}.jpg"), 4000, 3000, i)
    sets["30 JPEGs of 12 MP (4000x3000)"] = d
    d = os.path.join(OUT, "png36mp"); os.makedirs(d, exist_ok=True)
    for i in range(20):
        big_png(os.path.join(d, f"big-{i:02}.png"), 6000, i)
    sets["20 PNGs of 36 MP (6000x6000)"] = d
    return sets


def status_kb(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def metric_total(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def daemon_run(folder, n, tansu_port):
    topic = "mem-" + os.path.basename(folder)
    subprocess.run([BIN, "publish", "-q", "--brokers", f"127.0.0.1:{tansu_port}", "--topic", topic,
                    "--partitions", "3", "-X", "message.max.bytes=40000000", folder], check=True)
    port = free_port()
    cfg = os.path.join(OUT, f"{topic}.toml")
    with open(cfg, "w") as f:
        f.write(f'[kafka]\nbrokers = "127.0.0.1:{tansu_port}"\ngroup_id = "{topic}"\ninput_topics = ["{topic}"]\n'
                f'output_topic = "{topic}-verdicts"\ndead_letter_topic = "{topic}-dlq"\npublish = "all"\n'
                f'message_max_bytes = 40000000\n'
                f'[model]\nbundle = "{BUNDLE}"\ndevice = "cpu"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    for t in (f"{topic}-verdicts", f"{topic}-dlq"):
        subprocess.run([BIN, "publish", "-q", "--brokers", f"127.0.0.1:{tansu_port}", "--topic", t,
                        "--partitions", "1", "--limit", "0", folder], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(os.path.join(OUT, f"{topic}.log"), "w")
    d = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=log, stdout=log)
    try:
        started = time.time()
        loaded = None
        while time.time() - started < 900:
            time.sleep(0.5)
            try:
                done = metric_total(port, "dlsr_verdicts_total") + metric_total(port, "dlsr_dead_letters_total")
            except OSError:
                continue
            if loaded is None:
                loaded = status_kb(d.pid, "VmRSS") / 1024
            if done >= n:
                break
        else:
            raise SystemExit(f"{folder}: not every image scored in time")
        return status_kb(d.pid, "VmHWM") / 1024, loaded, time.time() - started
    finally:
        d.terminate(); d.wait(60)


def score_run(folder):
    # Sampled from /proc: a child's ru_maxrss starts at the parent's (this script holds
    # the images it made), so wait4's figure would be Python's, not dlsr's.
    p = subprocess.Popen([BIN, "-q", "score", "--model", BUNDLE, "--workers", "1", "--device", "cpu", folder],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while p.poll() is None:
        try:
            peak = max(peak, status_kb(p.pid, "VmHWM"))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.02)
    if p.returncode != 0:
        raise SystemExit(f"dlsr score {folder} failed ({p.returncode})")
    return peak / 1024


def main():
    os.makedirs(OUT, exist_ok=True)
    sets = make_sets()
    tansu_port = free_port()
    tansu = subprocess.Popen([os.path.join(ROOT, ".deps/bin/tansu"), "broker", "--listener-url",
                              f"tcp://127.0.0.1:{tansu_port}", "--advertised-listener-url",
                              f"tcp://127.0.0.1:{tansu_port}", "--storage-engine", "memory://tansu/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    rows = []
    try:
        for name, folder in sets.items():
            n = len(os.listdir(folder))
            peak, loaded, secs = daemon_run(folder, n, tansu_port)
            score_peak = score_run(folder)
            rows.append((name, peak, loaded, secs, score_peak))
    finally:
        tansu.kill()
    print("| images | daemon peak RSS | daemon RSS after start | all scored in | `dlsr score --workers 1` peak RSS |")
    print("|---|---|---|---|---|")
    for name, peak, loaded, secs, score_peak in rows:
        print(f"| {name} | {peak:.0f} MB | {loaded:.0f} MB | {secs:.0f} s | {score_peak:.0f} MB |")


main()
