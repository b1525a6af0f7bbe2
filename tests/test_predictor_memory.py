"""A trained MetaTuner that serves requests for days holds a bounded amount of memory: the per-query trace
of G's outputs keeps only the newest ``trace_limit`` queries."""

from __future__ import annotations

import gc
import tracemalloc

import torch

from conftest import make_model
from metatuner.config import load_config
from metatuner.serving.engine import Engine, Served
from metatuner.tasks import get_task
from metatuner.training.build import build_metatuner
from metatuner.training import predictor as predictor_module
from metatuner.training.predictor import MetaTunerPredictor
from test_gate import HINT, script


def test_serving_2000_requests_holds_flat_memory(tiny_tokenizer, monkeypatch):
    script(monkeypatch, lambda ex: HINT)  # scripted G and M: what is measured is the predictor's own state
    torch.manual_seed(0)
    mt = build_metatuner(load_config(None, []), make_model(tiny_tokenizer), tiny_tokenizer)
    predictor = MetaTunerPredictor(mt, prompts="generated", trace_limit=64)
    engine = Engine({"metatuner": Served(predictor, get_task("arithmetic"))}, max_batch_size=8, max_wait_ms=1).start()

    def serve(n: int, start: int) -> None:
        futures = [engine.submit("metatuner", f"Reverse the word w{start + i}.", 8) for i in range(n)]
        assert all(HINT in f.result(timeout=120).prediction.instruction for f in futures)

    def held() -> int:
        """Bytes allocated in the predictor's module and still alive: the trace's entries and its dict."""
        gc.collect()  # what is only waiting for the cycle collector is not held
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, predictor_module.__file__)])
        return sum(stat.size for stat in snapshot.statistics("filename"))

    tracemalloc.start()
    try:
        serve(400, 0)  # the trace is full after 64 queries
        after_400 = held()
        serve(1600, 400)
        after_2000 = held()
    finally:
        tracemalloc.stop()
        engine.stop()
    assert len(predictor.trace) == 64 and "request-1999" in predictor.trace  # the newest queries are kept
    # an unbounded trace grows by ~100 bytes per request here: 1600 requests would add over 150 kB
    assert after_2000 <= after_400 + 2_000, (after_400, after_2000)
