"""The DPO baseline: pair building from scripted samples, and an end-to-end TRL fit on the tiny model."""

from __future__ import annotations

import types

import pytest
import torch

from metatuner.errors import MetatunerError
from metatuner.evaluation import evaluate
from metatuner.evaluation.generation import Generation, render_chat
from metatuner.methods import METHODS
from metatuner.methods import dpo
from metatuner.tasks import get_task
from metatuner.tasks.base import Example

TARGET = "2 + 3 = 5. The answer is 5."


def ex(i: str, answer: str = "5") -> Example:
    return Example(id=i, query=f"Question {i}: what is 2 + 3?", answer=answer, target=TARGET)


def scripted(monkeypatch, script: dict[str, list[str]]) -> list[dict]:
    """Replaces the sampler: the n-th sample for a query is ``script[query id][n]``; returns the calls made."""
    calls, served = [], {}

    def fake_generate(model, tokenizer, texts, max_new_tokens, stop=(), do_sample=False, temperature=1.0):
        calls.append({"rows": len(texts), "do_sample": do_sample, "temperature": temperature, "budget": max_new_tokens})
        out = []
        for t in texts:
            qid = next(q for q in script if f"Question {q}:" in t)
            n = served[qid] = served.get(qid, -1) + 1
            out.append(Generation(script[qid][n], 1))
        return out

    monkeypatch.setattr(dpo, "generate", fake_generate)
    return calls


def pairs_for(script, tokenizer, **cfg) -> list[dpo.Pair]:
    task = get_task("arithmetic")
    config = dpo.DPOMethodConfig(samples_per_query=len(next(iter(script.values()))), **cfg)
    return dpo.preference_pairs(None, tokenizer, task, [ex(q) for q in script], config)


def test_correct_answers_are_chosen_over_incorrect_ones(monkeypatch, tiny_tokenizer):
    script = {"a": ["The answer is 5.", "The answer is 7.", "The answer is 5.", "no idea"]}
    calls = scripted(monkeypatch, script)
    pairs = pairs_for(script, tiny_tokenizer, temperature=0.7, sample_batch_size=3, max_new_tokens=9)
    # one pair per distinct incorrect answer; duplicates of the correct one add nothing
    assert [(p.chosen, p.rejected, p.gold) for p in pairs] == [
        ("The answer is 5.", "The answer is 7.", False),
        ("The answer is 5.", "no idea", False),
    ]
    task = get_task("arithmetic")
    assert pairs[0].prompt == render_chat(tiny_tokenizer, task.messages(task.instruction, ex("a")))
    # 4 rows sampled in batches of at most 3, with the configured sampling settings
    assert [c["rows"] for c in calls] == [3, 1]
    assert all(c["do_sample"] and c["temperature"] == 0.7 and c["budget"] == 9 for c in calls)


def test_gold_target_is_chosen_when_no_sample_is_correct(monkeypatch, tiny_tokenizer):
    script = {"b": ["The answer is 4.", "The answer is 6.", "The answer is 4."]}
    scripted(monkeypatch, script)
    pairs = pairs_for(script, tiny_tokenizer)
    assert [(p.chosen, p.rejected, p.gold) for p in pairs] == [
        (TARGET, "The answer is 4.", True),
        (TARGET, "The answer is 6.", True),
    ]
    scripted(monkeypatch, script)
    assert pairs_for(script, tiny_tokenizer, gold_fallback=False) == []


def test_a_query_with_only_correct_samples_gives_no_pair(monkeypatch, tiny_tokenizer):
    # nothing to reject: neither the samples nor the gold fallback give an incorrect answer
    script = {"c": ["The answer is 5.", "So 5. The answer is 5."], "d": ["The answer is 5.", "The answer is 8."]}
    scripted(monkeypatch, script)
    pairs = pairs_for(script, tiny_tokenizer)
    assert [(p.id, p.rejected) for p in pairs] == [("d", "The answer is 8.")]


def test_max_pairs_bounds_the_pairs_and_takes_queries_in_turn(monkeypatch, tiny_tokenizer):
    wrong = ["The answer is 1.", "The answer is 2.", "The answer is 3.", "The answer is 4."]
    script = {q: wrong for q in ("e", "f", "g")}  # 4 gold-fallback pairs per query
    scripted(monkeypatch, script)
    pairs = pairs_for(script, tiny_tokenizer, max_pairs=5)
    assert [p.id for p in pairs] == ["e", "f", "g", "e", "f"]
    assert [p.rejected for p in pairs] == wrong[:1] * 3 + wrong[1:2] * 2


def test_config_rejects_bad_values():
    with pytest.raises(MetatunerError, match="dpo.samples_per_query must be >= 1"):
        dpo.DPOMethodConfig(samples_per_query=0)
    with pytest.raises(MetatunerError, match="dpo.beta must be > 0"):
        dpo.DPOMethodConfig(beta=0.0)


def test_fit_fails_clearly_without_pairs(monkeypatch, tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    method = dpo.DPO(tiny_model, tiny_tokenizer, types.SimpleNamespace(dpo=dpo.DPOMethodConfig(samples_per_query=2)))
    with pytest.raises(MetatunerError, match="train split is empty"):
        method.fit(task, [], [])
    scripted(monkeypatch, {"a": ["The answer is 5.", "The answer is 5."]})
    with pytest.raises(MetatunerError, match="no preference pair from 1 queries x 2 samples"):
        method.fit(task, [ex("a")], [])


def test_dpo_is_registered():
    assert METHODS.get("dpo") is dpo.DPO and dpo.DPO.needs_training


TINY = dict(queries=4, samples_per_query=2, max_new_tokens=8, steps=2, batch_size=2, grad_accum=1, lr=1e-2)


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The answer is 42.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    return model(input_ids=ids).logits


def test_fit_trains_a_lora_with_trl_and_leaves_the_base_model_alone(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.chdir(tmp_path)  # anything TRL wrote to the working directory would show up here
    task = get_task("arithmetic")
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    before = logits(tiny_model, tiny_tokenizer)
    config = types.SimpleNamespace(dpo=dpo.DPOMethodConfig(**TINY), seed=0)

    predictor = dpo.DPO(tiny_model, tiny_tokenizer, config).fit(task, task.load("train")[:6], [])

    # the returned model carries the trained (merged) LoRA: its outputs moved
    assert predictor.model is not tiny_model and not predictor.model.training
    assert not torch.allclose(logits(predictor.model, tiny_tokenizer), before)
    # the caller's model is untouched: same weights, no adapter layers, same outputs
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_model.state_dict().items())
    assert not any("lora" in n for n, _ in tiny_model.named_modules())
    assert torch.equal(logits(tiny_model, tiny_tokenizer), before)
    # the random tiny model never answers correctly, so every pair is a gold-fallback one
    training = predictor.describe()["training"]
    assert training["queries"] == 4 and training["pairs"] == training["gold_fallback"] > 0
    assert training["steps"] == 2 and training["final_loss"] > 0
    assert predictor.describe()["method"] == "dpo"
    assert list(tmp_path.iterdir()) == []  # no run folder: nothing saved

    result = evaluate(predictor, task, task.load("test")[:3], batch_size=3, max_new_tokens=8, progress=False)
    assert result.n == 3 and 0.0 <= result.score <= 1.0


def test_fit_saves_pairs_and_the_adapter_into_the_run_folder(tmp_path, tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    config = types.SimpleNamespace(dpo=dpo.DPOMethodConfig(**{**TINY, "queries": 2, "steps": 1}), seed=0)
    dpo.DPO(tiny_model, tiny_tokenizer, config, run_dir=tmp_path / "run").fit(task, task.load("train")[:2], [])
    lines = (tmp_path / "run" / "dpo_pairs.jsonl").read_text().splitlines()
    assert len(lines) >= 1 and '"chosen"' in lines[0]
    assert (tmp_path / "run" / "dpo" / "checkpoint-1" / "adapter_model.safetensors").is_file()


def test_pairs_longer_than_max_length_are_dropped_with_a_clear_error_when_none_fit(tiny_model, tiny_tokenizer):
    from metatuner.config import RunConfig
    from metatuner.errors import MetatunerError
    from metatuner.methods.dpo import DPO, DPOMethodConfig
    from metatuner.tasks import get_task

    cfg = RunConfig()
    cfg.dpo = DPOMethodConfig(queries=2, samples_per_query=2, max_new_tokens=4, steps=1, max_length=16)
    task = get_task("arithmetic")
    with pytest.raises(MetatunerError, match="longer than dpo.max_length=16"):
        DPO(tiny_model, tiny_tokenizer, cfg).fit(task, task.load("train")[:2], [])


# round(ratio * steps) warm-up steps, where TRL's own reading of a ratio (ceil) would give one more
@pytest.mark.parametrize("schedule, warmup_ratio, warmup_steps", [("cosine", 0.4, 2), ("constant", 0.2, 1)])
def test_dpo_follows_the_shared_learning_rate_schedule(monkeypatch, tiny_model, tiny_tokenizer,
                                                       schedule, warmup_ratio, warmup_steps):
    from metatuner.config import TrainConfig
    from metatuner.training.schedule import make_scheduler

    # scripted wrong answers: 2 queries x 2 gold-fallback pairs, no sampling from the model
    scripted(monkeypatch, {q: ["The answer is 1.", "The answer is 2."] for q in ("a", "b")})
    steps, lr = 6, 1e-2
    train = TrainConfig(lr_schedule=schedule, warmup_ratio=warmup_ratio)
    config = types.SimpleNamespace(dpo=dpo.DPOMethodConfig(**{**TINY, "steps": steps, "lr": lr}), train=train, seed=0)

    training = dpo.DPO(tiny_model, tiny_tokenizer, config).fit(get_task("arithmetic"), [ex("a"), ex("b")], []).training

    # the rates our own loops get from make_scheduler: the one before each of its steps is the one that step uses
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, train, steps)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert training["warmup_steps"] == warmup_steps and expected[warmup_steps - 1] < lr  # a real warm-up
    # TRL logs, at optimizer step k, the rate it took step k with (read before its scheduler steps)
    assert training["lrs"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
