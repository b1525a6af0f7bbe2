"""Iteration-level decoding (a running batch that rows join and leave between steps) answers every query exactly as
``predictor.predict(task, [example], budget)`` answers it alone, for zero-shot, a static LoRA and MetaTuner (its own
generated prompt and its own generated LoRA per row), with rows that join while others are mid-decode, rows that end
early (EOS, a stop string, their own budget), streamed pieces, and a cache cut back to the longest row in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_model
from metatuner.config import load_config
from metatuner.evaluation.generation import Generation
from metatuner.evaluation.predictors import LMPredictor
from metatuner.models.metatuner import MetaTuner
from metatuner.models.static import StaticLoRA
from metatuner.serving.engine import RequestTask
from metatuner.tasks import get_task
from metatuner.tasks.base import Example
from metatuner.training.build import build_metatuner
from metatuner.training.predictor import MetaTunerPredictor, StaticLoRAPredictor

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"file:{ROOT / 'examples' / 'capitals.yaml'}"
QUERIES = ["What is the capital of Peru?", "Kenya?", "Who wrote Hamlet?", "2+2?",
           "What is the capital of a country with a long name, such as the United Arab Emirates?", "Name a river."]
BUDGETS = [12, 5, 20, 9, 16, 7]


def examples() -> list[Example]:
    meta = [{}, {}, {"instruction": "Be brief."}, {}, {}, {}]  # one row with its own p~ (a system message)
    return [Example(id=f"q{i}", query=q, answer="", target="", meta=m) for i, (q, m) in enumerate(zip(QUERIES, meta))]


def randomize(params, scale: float) -> None:
    """Gives zero-initialised LoRA weights random values, so that they change M's answers."""
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * scale)


def predictor(kind: str, tok, monkeypatch):
    model = make_model(tok, init_range=0.2)
    if kind == "zero-shot":
        return LMPredictor(model, tok)
    if kind == "static":
        static = StaticLoRA(model, tok, ["q_proj", "v_proj"], rank=4)
        static.reset()
        randomize([p for n, p in static.adapter_state().items() if n.endswith(".B")], 0.5)
        return StaticLoRAPredictor(static)
    torch.manual_seed(0)
    mt = build_metatuner(load_config(None, ["generator.max_prompt_tokens=6"]), model, tok)
    mt.add_static_adapter(4, 8.0)
    randomize(mt.hypernet.parameters(), 0.3)
    randomize(mt.m_lora.adapter_parameters("static"), 0.05)
    # G's greedy outputs, scripted: a random G writes no sentence within its cap, which would leave p~ everywhere
    def hints(self, task, exs, **kw):
        return [Generation(f"Think of {ex.query.split()[-1]}", 3) for ex in exs]

    monkeypatch.setattr(MetaTuner, "generate_outputs", hints)
    return MetaTunerPredictor(mt, prompts="generated")


@pytest.mark.parametrize("kind", ["zero-shot", "static", "metatuner"])
def test_rows_joining_and_leaving_answer_exactly_as_alone(tiny_tokenizer, kind, monkeypatch):
    p = predictor(kind, tiny_tokenizer, monkeypatch)
    task = RequestTask(get_task(SPEC))
    exs = examples()
    plain = [p.predict(task, [ex], b)[0].output for ex, b in zip(exs, BUDGETS)]
    longest = max(range(len(exs)), key=lambda i: len(plain[i]))
    task.stop = (plain[longest][2:4],)  # a stop string that ends the longest answer early
    alone = [p.predict(task, [ex], b)[0] for ex, b in zip(exs, BUDGETS)]
    assert len(alone[longest].output) <= 2 < 4 < len(plain[longest])
    if kind == "metatuner":  # each row its own generated prompt, and its own LoRA
        assert len({a.instruction for a in alone}) > 2 and alone[2].instruction.startswith("Be brief.")
        assert len({a.output for a in alone}) == len(alone)

    decoding = p.start(task)
    pieces = {ex.id: [] for ex in exs}
    answered, joined, step = {}, {}, 0

    def admit(indices):
        decoding.admit([exs[i] for i in indices], [BUDGETS[i] for i in indices],
                       [pieces[exs[i].id].append for i in indices])
        joined.update((exs[i].id, step) for i in indices)

    admit([0, 1, 2])
    while decoding:
        step += 1
        for ex, prediction, batch_size in decoding.step():
            answered[ex.id] = (prediction, batch_size, step)
        rows = decoding.batch.rows
        # the cache holds each row's tokens but its pending one, right-aligned: no column wider than the longest row
        assert decoding.batch.width == max((len(r.prompt) + len(r.new) - 1 for r in rows), default=0)
        if step == 3:
            admit([3, 4])  # join rows mid-decode
        if exs[1].id in answered and exs[5].id not in joined:
            admit([5])  # joins once a row has left
    for ex, want in zip(exs, alone):
        prediction, batch_size, _ = answered[ex.id]
        assert prediction == want, ex.id
        assert "".join(pieces[ex.id]) == want.output
    ended = {ex_id: at for ex_id, (_, _, at) in answered.items()}
    assert len(set(ended.values())) > 2  # rows left at different steps
    assert max(ended[i] for i in ("q0", "q1", "q2")) > 3  # q3 and q4 joined while the first rows decoded
    assert joined["q5"] == ended["q1"] < max(ended.values())  # q5 took a row's place in a running batch
    assert 1 < answered["q4"][1] < 5  # the mean number of rows over its steps


def test_a_predictor_with_weights_of_its_own_is_answered_whole(tiny_tokenizer, tiny_model):
    import contextlib

    class Own(LMPredictor):
        @contextlib.contextmanager
        def weights(self, task, examples):
            yield

    assert LMPredictor(tiny_model, tiny_tokenizer).start(get_task(SPEC)) is not None
    assert Own(tiny_model, tiny_tokenizer).start(get_task(SPEC)) is None
    tiny_model.generation_config.repetition_penalty = 1.2  # greedy decoding is no longer a plain argmax
    assert LMPredictor(tiny_model, tiny_tokenizer).start(get_task(SPEC)) is None
