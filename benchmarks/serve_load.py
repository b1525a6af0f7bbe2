"""Load test of `metatuner serve`: C concurrent clients send a fixed number of requests; localhost only.

    .venv/bin/python benchmarks/serve_load.py [--run DIR] [--model smollm2-135m] [--clients 8] [--requests 64]
        [--max-batch-size 8] [--max-wait-ms 20] [--time-limit 1800] [--out results/bench/serve_load.json]

Without ``--run`` a run is trained first, once, into ``--run-dir`` (default ``runs/serve-load-<model>``):
``metatuner train --config quick --model MODEL --out DIR --no-eval``.

Two servers start as subprocesses on free 127.0.0.1 ports, each serving ``metatuner`` (the run) and
``zero-shot`` (the run's base model with p~, no adapter): one batches continuously (up to ``--max-batch-size``
requests decode together, each leaving as soon as its answer ends and others joining between decode steps; a
decode loop's first request waits ``--max-wait-ms`` for company), the other answers one request at a time
(``serve.max_batch_size=1``). For each server and model, after ``--clients`` untimed warm-up requests,
``--clients`` threads send ``--requests`` requests in all (the run's test queries, cycled; chat completions with
the task's own token budget) and the phase reports
latency p50 / p95, throughput (answered requests, and completion tokens, per second of the phase), failed
requests and the mean batch size the server reports (per answer: the mean number of requests in the decode
steps that produced it). A thread samples each server's resident memory (RSS) every 100 ms; memory is flat when
its peak over the measured phases stays within ``--max-rss-growth-mb`` of its level after the warm-up.

Ratios printed: batched MetaTuner throughput / batched zero-shot throughput, in requests and in tokens per
second (issue 21's target: >= 0.8 in both), and batching's gain (batched / one-at-a-time throughput) for each
model. Everything is bounded: ``--requests`` per phase, ``--time-limit`` seconds for the whole benchmark (a phase stops sending at its share),
a timeout per request. Exits 1 when any request failed or memory grew. Timing is never a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODELS = ("metatuner", "zero-shot")


def train_run(model: str, run_dir: Path) -> Path:
    if (run_dir / "checkpoints").is_dir():
        return run_dir
    print(f"training a run: metatuner train --config quick --model {model} --out {run_dir} --no-eval", flush=True)
    subprocess.run([sys.executable, "-m", "metatuner.cli", "train", "--config", "quick", "--model", model,
                    "--out", str(run_dir), "--no-eval"], check=True)
    return run_dir


def queries(run_dir: Path, n: int) -> list[str]:
    from metatuner.config import load_config
    from metatuner.tasks import get_task

    cfg = load_config(run_dir / "config.yaml")
    return [ex.query for ex in get_task(cfg.data.task, cfg.data.data_dir).load("test")[:n]]


class Server:
    """``metatuner serve`` in a subprocess on a free localhost port, with a thread sampling its RSS."""

    def __init__(self, run_dir: Path, batch: int, wait_ms: float, timeout_s: float, extra: list[str]):
        cmd = [sys.executable, "-m", "metatuner.cli", "serve", "--run", str(run_dir), "--method", "zero-shot",
               "--host", "127.0.0.1", "--port", "0", "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms),
               f"serve.timeout_s={timeout_s}", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.stop()
            raise SystemExit(f"the server did not start: {line}{self.proc.stdout.read()}")
        self.url = line.split(" at ")[1].split()[0]
        self.samples: list[tuple[float, float]] = []  # (time, RSS MB)
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _sample(self) -> None:
        while not self._sampling.wait(0.1) and self.proc.poll() is None:
            self.samples.append((time.monotonic(), self.rss_mb()))

    def stop(self) -> None:
        if hasattr(self, "_sampling"):
            self._sampling.set()
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server shuts down cleanly
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ask(url: str, model: str, query: str, timeout: float) -> tuple[float, int | None, int, str | None]:
    """One chat completion: (latency s, batch size the server reports, completion tokens, error or None)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": query}]}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            data = json.loads(reply.read())
        return time.perf_counter() - start, data["metatuner"]["batch_size"], data["usage"]["completion_tokens"], None
    except (urllib.error.URLError, TimeoutError, OSError, KeyError, ValueError) as e:
        return time.perf_counter() - start, None, 0, f"{type(e).__name__}: {e}"


def phase(server: Server, model: str, texts: list[str], clients: int, requests: int, deadline: float,
          timeout: float) -> dict:
    """``requests`` requests from ``clients`` threads, stopping at ``deadline``; latency, throughput, failures."""
    with ThreadPoolExecutor(clients) as pool:  # warm-up, untimed
        list(pool.map(lambda i: ask(server.url, model, texts[i % len(texts)], timeout), range(clients)))
    baseline = server.rss_mb()
    lock, counter, results = threading.Lock(), iter(range(requests)), []

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            result = ask(server.url, model, texts[i % len(texts)], timeout)
            with lock:
                results.append(result)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.monotonic() - start
    ok = sorted(latency for latency, _, _, error in results if error is None)
    tokens = sum(n for _, _, n, error in results if error is None)
    rss = [mb for t, mb in server.samples if t >= start]
    failures = [error for _, _, _, error in results if error is not None]
    return {
        "model": model, "sent": len(results), "answered": len(ok), "failed": len(failures),
        "not_sent": requests - len(results), "errors": sorted(set(failures))[:3], "seconds": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "completion_tokens": tokens, "throughput_tps": tokens / wall if wall > 0 else 0.0,
        "p50_s": statistics.median(ok) if ok else None,
        "p95_s": ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None,
        "mean_batch": statistics.mean(b for _, b, _, e in results if e is None) if ok else None,
        "rss_after_warmup_mb": baseline, "rss_peak_mb": max(rss, default=baseline),
        "rss_end_mb": server.rss_mb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="trained run folder (default: train one with --config quick)")
    parser.add_argument("--model", default="smollm2-135m", help="model of the run trained without --run")
    parser.add_argument("--run-dir", type=Path, help="where that run goes (default: runs/serve-load-<model>)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="requests per server and model")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the batching server's most requests decoded together")
    parser.add_argument("--max-wait-ms", type=float, default=20.0, help="how long the batching server's decode loop waits for its first requests")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds for all phases together")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="memory is flat within this much")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("serve_overrides", nargs="*", metavar="KEY=VALUE", help="overrides for both servers")
    args = parser.parse_args()

    run_dir = args.run or train_run(args.model, args.run_dir or Path("runs") / f"serve-load-{Path(args.model).name}")
    texts = queries(run_dir, max(args.requests, args.clients))
    started = time.monotonic()
    results = {}
    setups = (("batched", args.max_batch_size, args.max_wait_ms), ("one-at-a-time", 1, 0.0))
    for s, (name, batch, wait) in enumerate(setups):
        server = Server(run_dir, batch, wait, args.request_timeout, args.serve_overrides)
        try:
            for m, model in enumerate(MODELS):
                left = args.time_limit - (time.monotonic() - started)
                share = left / (len(setups) * len(MODELS) - (s * len(MODELS) + m))
                results[f"{name}/{model}"] = phase(server, model, texts, args.clients, args.requests,
                                                   time.monotonic() + share, args.request_timeout)
                print(f"{name:14s} {model:10s} " + json.dumps({k: v for k, v in results[f'{name}/{model}'].items()
                                                              if k != "model"}), flush=True)
        finally:
            server.stop()

    def rps(key: str, unit: str = "rps") -> float:
        return results[key][f"throughput_{unit}"]

    ratios = {
        "metatuner_vs_zero_shot_batched": rps("batched/metatuner") / max(rps("batched/zero-shot"), 1e-9),
        "metatuner_vs_zero_shot_batched_tokens": rps("batched/metatuner", "tps") / max(rps("batched/zero-shot", "tps"), 1e-9),
        "batching_gain_metatuner": rps("batched/metatuner") / max(rps("one-at-a-time/metatuner"), 1e-9),
        "batching_gain_zero_shot": rps("batched/zero-shot") / max(rps("one-at-a-time/zero-shot"), 1e-9),
    }
    failed = sum(r["failed"] for r in results.values())
    growth = max(r["rss_peak_mb"] - r["rss_after_warmup_mb"] for r in results.values())
    print(f"\nclients {args.clients}, requests {args.requests} per phase, run {run_dir}\n")
    print("| server | model | answered | failed | p50 s | p95 s | req/s | tokens/s | mean batch | RSS after warm-up / peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, model = key.split("/")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {model} | {r['answered']}/{args.requests} | {r['failed']} | {fmt(r['p50_s'])} | "
              f"{fmt(r['p95_s'])} | {r['throughput_rps']:.2f} | {r['throughput_tps']:.1f} | {fmt(r['mean_batch'])} | "
              f"{r['rss_after_warmup_mb']:.0f} / {r['rss_peak_mb']:.0f} |")
    print(f"\nMetaTuner / zero-shot throughput, batched: {ratios['metatuner_vs_zero_shot_batched']:.2f}x in "
          f"requests/s, {ratios['metatuner_vs_zero_shot_batched_tokens']:.2f}x in tokens/s (target >= 0.8x in both; "
          f"both answer with the task's own token budget)")
    print(f"batching gain: MetaTuner {ratios['batching_gain_metatuner']:.2f}x, "
          f"zero-shot {ratios['batching_gain_zero_shot']:.2f}x")
    print(f"failed requests: {failed}; largest RSS growth after warm-up: {growth:.0f} MB "
          f"({'flat' if growth <= args.max_rss_growth_mb else 'GREW'}, limit {args.max_rss_growth_mb:g} MB)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "run": str(run_dir),
                                        "phases": results, "ratios": ratios, "failed": failed,
                                        "rss_growth_mb": growth}, indent=2))
    return 1 if failed or growth > args.max_rss_growth_mb else 0


if __name__ == "__main__":
    sys.exit(main())
