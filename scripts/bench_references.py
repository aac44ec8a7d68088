#!/usr/bin/env python3
"""References benchmark (called by scripts/benchmark.sh references): the daemon's rate
on claim-check references against its rate on raw values, same images, one run.

moto's S3-compatible server on 127.0.0.1 holds N Fashion-MNIST PNGs; the daemon reaches
it through a TCP proxy that delays every request by LATENCY_MS (20), as a remote store
would. Phases alternate ROUNDS (2) times: raw PNG values on one topic, JSON references
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


s3_port, proxy_port, = free_port(), free_port()
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

    def publish(topic, *spec):
        subprocess.run([BIN, "publish", "--brokers", brokers, "--topic", topic, "--partitions", "3", *spec],
                       check=True, capture_output=True, env=env)

    for topic in ("dlsr-verdicts", "dlsr-dead-letters"):
        subprocess.run([BIN, "publish", "--brokers", brokers, "--topic", topic, "--partitions", "1", PNGS, "--limit", "0"],
                       check=False, capture_output=True)
    publish("raw", PNGS, "--limit", str(N))
    publish("refs", "--as-reference", "s3://bench/png/")

    def serve(topic, group):
        port = free_port()
        cfg = os.path.join(tempfile.mkdtemp(), "dlsr.toml")
        open(cfg, "w").write(f"""[kafka]\nbrokers = "{brokers}"\ngroup_id = "{group}"\ninput_topics = ["{topic}"]
publish = "all"\n[model]\nbundle = "{BUNDLE}"\n[metrics]\nlisten = "127.0.0.1:{port}"\n[log]\nlevel = "warn"
[input.object_store]\nendpoint = "http://127.0.0.1:{proxy_port}"\nallow_http = true\n""")
        daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=subprocess.DEVNULL, env=env)
        try:
            wait_metrics(port)
            rate = rate_until(port, N)
            text = metrics(port)
            dead = total(text, "dlsr_dead_letters_total")
            fetched = total(text, "dlsr_fetch_bytes_total")
        finally:
            daemon.terminate(); daemon.wait(timeout=60)
        return rate, dead, fetched

    raw, refs = [], []
    for r in range(ROUNDS):
        raw.append(serve("raw", f"raw-{r}"))
        refs.append(serve("refs", f"refs-{r}"))
    best_raw = max(x[0] for x in raw)
    best_refs = max(x[0] for x in refs)
    assert all(x[1] == 0 for x in raw + refs), f"dead letters: raw {raw} refs {refs}"
    print(f"| daemon on raw PNG values ({N} messages, best of {ROUNDS}) | {best_raw:.0f} msg/s |")
    print(f"| daemon on S3 references, {LATENCY * 1000:.0f} ms per request (best of {ROUNDS}) | {best_refs:.0f} msg/s |")
    print(f"| references / raw | {best_refs / best_raw:.2f} |")
    print(f"| bytes fetched per reference run | {refs[-1][2] / 1e6:.1f} MB |")
finally:
    tansu.kill()
    moto.kill()
