"""`vgpt serve` under load: 1, 4 and 16 concurrent clients, images/s and p50/p95 latency, and what
dynamic batching buys at 16 clients over serving the same clients one image at a time.

The server is the real thing: `python -m vgpt_cli serve` in its own process (uvicorn, the batcher,
multipart parsing, JPEG decoding, the backbone, the beam search); the clients are threads of this
process, each sending one 640 x 480 JPEG per request (httpx), one request after another.

Model: NOT a trained captioner (benchmarks/caption.py's make_model): random weights, a 2-layer
GPT-2 of --width with the real 50,257-token BPE, K = 3 encoder levels, over the real offline
EfficientNet-Lite0 (7 x 7 tokens, 224 px); beam 5, 20 tokens. Random weights rarely say EOS, so
every caption runs all 20 steps: the worst case for a beam search.

Three servers run side by side, and the scenarios take turns, --rounds times (the machine is shared:
a change in its load then falls on every side of the comparison):
  batched        --max-batch 16 --max-wait-ms 50, with 1, 4 and 16 clients
  one_at_a_time  --max-batch 1, with 16 clients: the same load, each image its own search
  batched_narrow as batched, with --precision int8 (--precision-server), with 16 clients

    python benchmarks/serve.py                  # ~3-4 minutes on a 2-core CPU
    python benchmarks/serve.py --width 256 --requests 48
    python benchmarks/serve.py --smoke          # seconds: 4 requests a scenario, 1 round, a 1-layer 64-wide model

Goals: images/s at 16 clients batched >= 3x images/s at 16 clients one at a time; batched int8 >= 1.8x
batched fp32 at 16 clients. The int8 ratio depends on how much of a request is the decoder: with the
default 2-layer decoder the (fp32) backbone and the HTTP path weigh as much as the search; --layers 12
--width 768 gives a GPT-2-small-sized decoder (minutes more).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.caption import make_images, make_model  # noqa: E402
from benchmarks.common import goal, parse_with_smoke, print_table, write_results  # noqa: E402

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m vgpt_cli serve` on a free port; stopped (by its own pid) on exit."""

    def __init__(self, model: Path, max_batch: int, max_wait_ms: float, log: Path, precision: str = "fp32") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "vgpt_cli", "serve", "--model", str(model), "--device", "cpu",
                    "--port", str(self.port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                    "--precision", precision]
        self.log = log

    def __enter__(self) -> ServerProcess:
        import httpx

        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.out = self.log.open("w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        # a start takes seconds; the limit only keeps a broken server from hanging the benchmark (generous:
        # on a busy shared machine two servers importing torch at once have taken minutes)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    """`clients` threads share `requests` one-image requests; each sends its next when the last is answered."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = http.post(url + "/v1/captions", files=[("images", (f"img{i}.jpg", images[i % len(images)],
                                                                       "image/jpeg"))])
                dt = time.perf_counter() - t
                with lock:
                    (latencies if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]}")
    return {"seconds": wall, "latencies": latencies}


def summary(server: str, clients: int, runs: list[dict]) -> dict:
    """Rounds of one scenario pooled: images/s = all requests / all seconds, latency percentiles of all."""
    lat = np.array([x for r in runs for x in r["latencies"]])
    seconds = sum(r["seconds"] for r in runs)
    return {"server": server, "clients": clients, "requests": len(lat), "seconds": round(seconds, 2),
            "images_per_s": round(len(lat) / seconds, 3), "p50_ms": int(round(float(np.percentile(lat, 50)) * 1000)),
            "p95_ms": int(round(float(np.percentile(lat, 95)) * 1000))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32,
                    help="one-image requests per round at 16 clients (4 clients: half, 1 client: a quarter)")
    ap.add_argument("--rounds", type=int, default=2, help="every scenario once per round, in turns")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--k", type=int, default=3, help="encoder levels")
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--precision-server", default="int8", help="the narrowed server's --precision (default int8)")
    args = parse_with_smoke(ap, "4 requests, 1 round, a tiny model, into serve_smoke.json", requests=4, rounds=1,
                            layers=1, width=64, k=1)

    started = time.perf_counter()
    scenarios = [("batched", 1, max(args.requests // 4, 1)), ("batched", 4, args.requests // 2),
                 ("batched", 16, args.requests), ("one_at_a_time", 16, args.requests),
                 ("batched_narrow", 16, args.requests)]
    runs: dict[tuple[str, int], list[dict]] = {(s, c): [] for s, c, _ in scenarios}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        make_model(model, args)
        images = [p.read_bytes() for p in make_images(tmp / "images", 8, 0)]
        # both servers up at once, the scenarios taken in turns, round after round: a change in the
        # machine's load (it is shared) then falls on both sides of the comparison alike
        with ServerProcess(model, 16, args.max_wait_ms, tmp / "batched.log") as batched, \
                ServerProcess(model, 1, 0, tmp / "single.log") as single, \
                ServerProcess(model, 16, args.max_wait_ms, tmp / "narrow.log", args.precision_server) as narrow:
            servers = {"batched": batched, "one_at_a_time": single, "batched_narrow": narrow}
            for srv in servers.values():
                load(srv.url, images, 2, 4)  # warm-up: first-call allocations, thread pools
            warm = batched.health()["images"]
            for rnd in range(args.rounds):
                for server, clients, n in scenarios:
                    r = load(servers[server].url, images, clients, n)
                    runs[(server, clients)].append(r)
                    print(f"round {rnd + 1}: {server:13s} {clients:2d} clients  {n / r['seconds']:.3f} images/s")
            h = batched.health()
            batches = {"batches": h["batches"], "images": h["images"] - warm, "largest_batch": h["largest_batch"]}
    rows = [summary(s, c, runs[(s, c)]) for s, c, _ in scenarios]
    # the same requests on both sides: the throughput ratio is the ratio of the seconds
    per_round = [round(o["seconds"] / b["seconds"], 3) for b, o in zip(runs[("batched", 16)], runs[("one_at_a_time", 16)])]

    print()
    print_table(rows, title="vgpt serve: one-image requests, beam 5, 20 tokens, CPU")
    by = {(r["server"], r["clients"]): r for r in rows}
    speedup = by[("batched", 16)]["images_per_s"] / by[("one_at_a_time", 16)]["images_per_s"]
    over_one_client = by[("batched", 16)]["images_per_s"] / by[("batched", 1)]["images_per_s"]
    narrow_speedup = by[("batched_narrow", 16)]["images_per_s"] / by[("batched", 16)]["images_per_s"]
    print(f"\nbatching speedup at 16 clients: {speedup:.2f}x over one image at a time "
          f"({over_one_client:.2f}x over a single client); --precision {args.precision_server}: "
          f"{narrow_speedup:.2f}x fp32's images/s")
    raw = {"model": f"random GPT-2 {args.layers}x{args.width} + real BPE, K={args.k}, EfficientNet-Lite0 224 px",
           "beam_size": 5, "max_length": 20, "max_wait_ms": args.max_wait_ms, "scenarios": rows,
           "batched_server_counts": batches, "speedup_16_clients_vs_one_at_a_time": round(speedup, 3),
           "speedup_16_clients_vs_one_at_a_time_per_round": per_round, "rounds": args.rounds,
           "speedup_16_clients_vs_1_client": round(over_one_client, 3),
           "batched_narrow_precision": args.precision_server,
           "narrow_vs_fp32_16_clients": round(narrow_speedup, 3),
           "load_average_1min_after": round(os.getloadavg()[0], 2),
           "seconds_total": round(time.perf_counter() - started, 1)}
    write_results(__file__, raw, {"batching_speedup_16_clients": goal(speedup, 3.0),
                                  f"{args.precision_server}_vs_fp32_16_clients": goal(narrow_speedup, 1.8)},
                  name="serve_smoke" if args.smoke else None)


if __name__ == "__main__":
    main()
