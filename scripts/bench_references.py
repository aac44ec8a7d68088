#!/usr/bin/env python3
"""References benchmark (called by scripts/benchmark.sh references): the daemon's rate
on claim-check references against its rate on raw values, same images, one run.

moto's S3-compatible server on 127.0.0.1 holds N Fashion-MNIST PNGs; the daemon reaches
it through a TCP proxy that delays every request by LATENCY_MS (20), as a remote store
would. moto is Python and spends about 4 ms of CPU per GET, on the cores the scorer
needs, so a second store answers the same S3 GETs from memory after the same delay
(`quick_s3`, asyncio, about 0.1 ms of CPU per request): that row shows what fetch
concurrency does about latency, the moto row what a real server on the same 2 cores
costs. Phases alternate ROUNDS (2) times: raw PNG values on one topic, JSON references
`{"id", "uri": "s3://bench/png/..."}` (from `dlsr publish --as-reference`) on another,
each through a fresh daemon and consumer group. Prints a Markdown table.
Run with the moto venv's python (it has boto3).
Usage: bench_references.py BIN BUNDLE PNG_DIR N"""
import asyncio, os, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, free_port, metrics, rate_until, start_tansu, total, wait_metrics  # noqa: E402
import boto3  # noqa: E402

BIN, BUNDLE, PNGS, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
LATENCY = float(os.environ.get("LATENCY_MS", "20")) / 1000
ROUNDS = int(os.environ.get("ROUNDS", "2"))


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delaying_proxy(listen_port, upstream_port):
    """Forwards 127.0.0.1:listen_port to upstream_port, each client chunk (a request)
    held back LATENCY seconds."""
    async def pipe(reader, writer, delay):
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r, client_w):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_r, up_w, LATENCY), pipe(up_r, client_w, 0))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()


def quick_s3(port, folder):
    """Answers `GET /bench/png/NAME` (any signature) with the file after LATENCY, keep-alive."""
    blobs = {f"/bench/png/{n}": open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}

    async def handle(reader, writer):
        try:
            while line := await reader.readline():
                path = line.split()[1].decode() if len(line.split()) > 1 else ""
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    pass
                await asyncio.sleep(LATENCY)
                body = blobs.get(path.split("?")[0])
                if body is None:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nLast-Modified: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
                                 + f'ETag: "{len(body)}"\r\nContent-Length: {len(body)}\r\n\r\n'.encode() + body)
                await writer.drain()
        except (ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()


s3_port, proxy_port, quick_port = free_port(), free_port(), free_port()
moto = subprocess.Popen([os.path.join(ROOT, ".deps/moto-venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tansu, brokers = start_tansu()
env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
           AWS_ALLOW_HTTP="true", AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}")
try:
    time.sleep(2)
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")
    s3.create_bucket(Bucket="bench")
    files = sorted(os.listdir(PNGS))[:N]
    for name in files:
        s3.upload_file(os.path.join(PNGS, name), "bench", f"png/{name}")
    delaying_proxy(proxy_port, s3_port)
    quick_s3(quick_port, PNGS)

    def publish(topic, *spec):
        subprocess.run([BIN, "publish", "--brokers", brokers, "--topic", topic, "--partitions", "3", *spec],
                       check=True, capture_output=True, env=env)

    for topic in ("dlsr-verdicts", "dlsr-dead-letters"):
        subprocess.run([BIN, "publish", "--brokers", brokers, "--topic", topic, "--partitions", "1", PNGS, "--limit", "0"],
                       check=False, capture_output=True)
    publish("raw", PNGS, "--limit", str(N))
    publish("refs", "--as-reference", "s3://bench/png/")

    def serve(topic, group, endpoint_port=proxy_port):
        port = free_port()
        cfg = os.path.join(tempfile.mkdtemp(), "dlsr.toml")
        open(cfg, "w").write(f"""[kafka]\nbrokers = "{brokers}"\ngroup_id = "{group}"\ninput_topics = ["{topic}"]
publish = "all"\n[model]\nbundle = "{BUNDLE}"\n[metrics]\nlisten = "127.0.0.1:{port}"\n[log]\nlevel = "warn"
[input.object_store]\nendpoint = "http://127.0.0.1:{endpoint_port}"\nallow_http = true\n""")
        daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=subprocess.DEVNULL, env=env)
        try:
            wait_metrics(port)
            cpu = (cpu_seconds(daemon.pid), cpu_seconds(moto.pid) + time.process_time())
            rate = rate_until(port, N)
            cpu = (cpu_seconds(daemon.pid) - cpu[0], cpu_seconds(moto.pid) + time.process_time() - cpu[1])
            text = metrics(port)
            dead = total(text, "dlsr_dead_letters_total")
            fetched = total(text, "dlsr_fetch_bytes_total")
        finally:
            daemon.terminate(); daemon.wait(timeout=60)
        return rate, dead, fetched, cpu

    raw, refs, quick = [], [], []
    for r in range(ROUNDS):
        raw.append(serve("raw", f"raw-{r}"))
        quick.append(serve("refs", f"quick-{r}", quick_port))
        refs.append(serve("refs", f"refs-{r}"))
    best_raw = max(x[0] for x in raw)
    best_refs = max(x[0] for x in refs)
    best_quick = max(x[0] for x in quick)
    assert all(x[1] == 0 for x in raw + refs + quick), f"dead letters: raw {raw} refs {refs} quick {quick}"
    ms = f"{LATENCY * 1000:.0f} ms per request"
    print(f"| daemon on raw PNG values ({N} messages, best of {ROUNDS}) | {best_raw:.0f} msg/s |")
    print(f"| daemon on S3 references, in-memory S3 GET responder, {ms} | {best_quick:.0f} msg/s ({best_quick / best_raw:.2f} x raw) |")
    print(f"| daemon on S3 references, moto behind a proxy, {ms} | {best_refs:.0f} msg/s ({best_refs / best_raw:.2f} x raw) |")
    print(f"| bytes fetched per reference run | {refs[-1][2] / 1e6:.1f} MB |")
    per = lambda runs, i: 1000 * sum(x[3][i] for x in runs) / (N * len(runs))
    print(f"| daemon CPU per message: raw / in-memory responder / moto | {per(raw, 0):.2f} / {per(quick, 0):.2f} / {per(refs, 0):.2f} ms |")
    print(f"| store, proxy and responder CPU per message: raw / in-memory responder / moto | {per(raw, 1):.2f} / {per(quick, 1):.2f} / {per(refs, 1):.2f} ms |")
    print(f"| cores | {os.cpu_count()} |")
finally:
    tansu.kill()
    moto.kill()
