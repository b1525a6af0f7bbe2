"""The OPRO and BetterTogether baselines: search logic on scripted fakes, end to end on a tiny model."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.evaluation import LMPredictor, evaluate
from metatuner.evaluation.generation import render_chat
from metatuner.methods import bettertogether as bt
from metatuner.methods import get_method
from metatuner.methods import opro
from metatuner.methods.bettertogether import BetterTogether, BetterTogetherConfig, Program, ProgramPredictor
from metatuner.methods.opro import OPRO, OPROConfig, clean_instruction
from metatuner.tasks import get_task

TASK = get_task("arithmetic")
TRAIN = TASK.load("train")[:12]
P0 = TASK.instruction
FAKE_MODEL = SimpleNamespace(config=SimpleNamespace(_name_or_path="fake"))  # never called: scoring is scripted


class ScriptedProposer:
    """OPRO's optimizer LM as a script: round r returns ``rounds[r]``; records every meta-prompt."""

    def __init__(self, rounds):
        self.rounds, self.prompts, self.ns = list(rounds), [], []

    def propose(self, meta_prompt, n):
        self.prompts.append(meta_prompt)
        self.ns.append(n)
        return self.rounds[len(self.prompts) - 1]


def score_by_instruction(scores, calls=None):
    """A stand-in for the harness: the score depends only on the predictor's instruction."""

    def score(predictor, task, examples, config=None):
        if calls is not None:
            calls.append((predictor, [ex.id for ex in examples]))
        return scores[predictor.instruction]

    return score


def tiny_config(**overrides):
    cfg = load_config(None, ["eval.max_new_tokens=4", "eval.batch_size=4", "train.batch_size=2",
                             "train.lr_static=0.05", "train.steps=2"])
    for name, section in overrides.items():
        setattr(cfg, name, section)  # the opro / bettertogether sections are not in RunConfig yet
    return cfg


# ---- OPRO ----------------------------------------------------------------------------------------
def test_opro_keeps_the_best_instruction_and_shows_history_in_ascending_order(monkeypatch):
    best = "Answer with 'The answer is N'."
    scores = {P0: 0.3, "Think hard.": 0.1, "Be brief.": 0.5, best: 0.9}
    monkeypatch.setattr(opro, "score_predictor", score_by_instruction(scores))
    proposer = ScriptedProposer([["[Think hard.]", '"Be brief."'], [f"Sure! [{best}]", "think hard.", "  "]])
    cfg = SimpleNamespace(opro=OPROConfig(rounds=2, proposals_per_round=3, score_size=4, shown_examples=2), seed=0)
    method = OPRO(FAKE_MODEL, None, cfg, proposer=proposer)
    pred = method.fit(TASK, TRAIN, [])
    assert pred.instruction == best and pred.name == "opro"
    # every new proposal once, with its score; the duplicate and the empty one are dropped
    assert method.history == [(P0, 0.3), ("Think hard.", 0.1), ("Be brief.", 0.5), (best, 0.9)]
    assert pred.describe()["history"] == [{"instruction": i, "score": s} for i, s in method.history]
    assert proposer.ns == [3, 3]
    first, second = proposer.prompts
    assert f"text:\n{P0}\nscore:\n30" in first and "Think hard." not in first
    order = [second.index(f"text:\n{i}\nscore:\n{s}") for i, s in [("Think hard.", 10), (P0, 30), ("Be brief.", 50)]]
    assert order == sorted(order)  # ascending by score, as in OPRO
    assert second.count("output:\n") == 2 and "Write the text in square brackets." in second
    shown = [ex for ex in TRAIN if f"Q: <INS>\n{ex.query}\nA:\noutput:\n{ex.answer}" in second]
    assert len(shown) == 2  # training queries with their gold answers


def test_opro_never_returns_an_instruction_worse_than_the_initial_one(monkeypatch):
    scores = {P0: 0.4, "Worse.": 0.2, "As good.": 0.4}
    monkeypatch.setattr(opro, "score_predictor", score_by_instruction(scores))
    proposer = ScriptedProposer([["[Worse.]", "[As good.]"]])
    cfg = SimpleNamespace(opro=OPROConfig(rounds=1, proposals_per_round=2, score_size=4))
    method = OPRO(FAKE_MODEL, None, cfg, proposer=proposer)
    assert method.fit(TASK, TRAIN, []).instruction == P0  # ties keep p~
    assert [i for i, _ in method.history] == [P0, "Worse.", "As good."]


def test_clean_instruction_follows_opro():
    assert clean_instruction("Here it is: [Solve it step by step.] Done.") == "Solve it step by step."
    assert clean_instruction('  "let\'s think\n  carefully."  ') == "Let's think carefully."
    assert clean_instruction("<INS>**Be exact.**</INS>") == "Be exact."
    assert clean_instruction("[") == "" and clean_instruction("[ ]") == ""


def test_opro_end_to_end_on_a_tiny_model(tmp_path, tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(opro=OPROConfig(rounds=1, proposals_per_round=2, score_size=3, max_new_tokens=8))
    method = get_method("opro")(tiny_model, tiny_tokenizer, cfg, run_dir=tmp_path / "r")
    pred = method.fit(TASK, TRAIN, [])
    assert method.history[0][0] == P0 and pred.instruction in [i for i, _ in method.history]
    assert max(s for _, s in method.history) == dict(method.history)[pred.instruction] >= method.history[0][1]
    assert (tmp_path / "r" / "opro.json").is_file()
    result = evaluate(pred, TASK, TASK.load("test")[:2], max_new_tokens=4, progress=False)
    assert result.n == 2 and all(r["instruction"] == pred.instruction for r in result.records)


# ---- the demos predictor -------------------------------------------------------------------------
def test_demos_are_rendered_as_earlier_turns(tiny_model, tiny_tokenizer):
    demos = [replace(TRAIN[0], target="The answer is 1."), replace(TRAIN[1], target="The answer is 2.")]
    query = TRAIN[2]
    plain = LMPredictor(tiny_model, tiny_tokenizer, "Do it.").predict(TASK, [query], 1)[0]
    assert plain.rendered == render_chat(tiny_tokenizer, TASK.messages("Do it.", query))
    shot = LMPredictor(tiny_model, tiny_tokenizer, "Do it.", demos=demos).predict(TASK, [query], 1)[0]
    turn = "<|im_start|>{}\n{}<|im_end|>\n"
    expected = (turn.format("system", "Do it.") + turn.format("user", demos[0].query)
                + turn.format("assistant", "The answer is 1.") + turn.format("user", demos[1].query)
                + turn.format("assistant", "The answer is 2.") + turn.format("user", query.query)
                + "<|im_start|>assistant\n")
    assert shot.rendered == expected
    assert LMPredictor(tiny_model, tiny_tokenizer, demos=demos).describe()["demos"] == [TRAIN[0].id, TRAIN[1].id]


# ---- BetterTogether ------------------------------------------------------------------------------
def spy_steps(monkeypatch, order, fail=None):
    def make(kind):
        def step(self, program, i, record):
            order.append(kind)
            if kind == fail:
                raise fail_with
            return Program(f"after {kind}{i}", program.demos, program.lora)

        return step

    fail_with = RuntimeError("boom") if fail else None
    monkeypatch.setattr(BetterTogether, "prompt_step", make("p"))
    monkeypatch.setattr(BetterTogether, "weight_step", make("w"))


def test_bettertogether_runs_steps_in_order_and_keeps_the_best_on_validation(monkeypatch):
    order, calls = [], []
    scores = {P0: 0.2, "after p1": 0.5, "after w2": 0.4, "after p3": 0.45}
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction(scores, calls))
    spy_steps(monkeypatch, order)
    val = TASK.load("train")[100:103]
    method = BetterTogether(FAKE_MODEL, None, SimpleNamespace(bettertogether=BetterTogetherConfig()))
    pred = method.fit(TASK, TRAIN, val)
    assert order == ["p", "w", "p"]
    assert pred.instruction == "after p1" and pred.describe()["chosen_step"] == 1
    assert pred.describe()["chosen_kind"] == "p"
    assert [r["val_score"] for r in method.history] == [0.2, 0.5, 0.4, 0.45]
    assert [ids for _, ids in calls] == [[ex.id for ex in val]] * 4  # every program scored on validation


def test_bettertogether_without_val_holds_out_part_of_train(monkeypatch):
    calls = []
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction({P0: 0.0, "after p1": 1.0}, calls))
    spy_steps(monkeypatch, [])
    cfg = SimpleNamespace(bettertogether=BetterTogetherConfig(strategy="p", val_size=4, score_size=3))
    method = BetterTogether(FAKE_MODEL, None, cfg)
    method.fit(TASK, TRAIN, [])
    held_out = set(calls[0][1])
    assert len(held_out) == 4 and held_out.isdisjoint(ex.id for ex in method.score_set + method.pool)
    with pytest.raises(MetatunerError, match="val_size"):
        BetterTogether(FAKE_MODEL, None, cfg).fit(TASK, TRAIN[:4], [])


def test_a_failing_step_returns_the_best_program_so_far(monkeypatch):
    order = []
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction({P0: 0.2, "after p1": 0.3}))
    spy_steps(monkeypatch, order, fail="w")
    method = BetterTogether(FAKE_MODEL, None, SimpleNamespace(bettertogether=BetterTogetherConfig()))
    pred = method.fit(TASK, TRAIN, TRAIN[:2])
    assert order == ["p", "w"]  # the strategy stops at the failure
    assert pred.instruction == "after p1"
    assert method.history[-1]["kind"] == "w" and method.history[-1]["error"] == "RuntimeError: boom"
    assert pred.describe()["steps"][-1]["error"] == "RuntimeError: boom"


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction({P0: 0.2}))

    def interrupted(self, program, i, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(BetterTogether, "prompt_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        BetterTogether(FAKE_MODEL, None, None).fit(TASK, TRAIN, TRAIN[:2])


def test_strategy_parsing():
    assert bt.parse_strategy("p -> w -> p") == ["p", "w", "p"] and bt.parse_strategy("w->p") == ["w", "p"]
    for bad in ("p -> x", "", "p w", "p -> -> w"):
        with pytest.raises(MetatunerError, match="allowed steps: p .*, w "):
            bt.parse_strategy(bad)
    with pytest.raises(MetatunerError, match="'x'"):
        BetterTogetherConfig(strategy="p -> x")


def test_demo_random_search_keeps_the_best_subset(monkeypatch):
    pool = [replace(ex, target=f"own {ex.id}") for ex in TRAIN[:6]]
    monkeypatch.setattr(BetterTogether, "correct_traces", lambda self, program, queries: pool)
    key = pool[4].id

    def score(predictor, task, examples, config=None):
        return float(any(d.id == key for d in predictor.demos)) + 0.1 * len(predictor.demos)

    monkeypatch.setattr(bt, "score_predictor", score)
    method = BetterTogether(FAKE_MODEL, None, SimpleNamespace(bettertogether=BetterTogetherConfig(demos=2, trials=12)))
    method.task, method.seed, method.score_set, method.pool = TASK, 0, TRAIN[:2], TRAIN
    record = {}
    out = method.demos_step(Program(P0), 1, record)
    assert key in [d.id for d in out.demos] and len(out.demos) == 2
    assert all(d.target.startswith("own ") for d in out.demos)  # the program's own outputs as answers
    assert record["search"][0] == {"demos": [], "score": 0.0}  # the current demos are a candidate
    assert record["bootstrapped"] == 6 and "demo_source" not in record
    monkeypatch.setattr(BetterTogether, "correct_traces", lambda self, program, queries: [])
    record = {}
    out = method.demos_step(Program(P0), 2, record)
    assert record["demo_source"].startswith("gold") and key in [d.id for d in out.demos]
    assert {d.target for d in out.demos} <= {ex.target for ex in TRAIN}  # gold targets


def test_weight_step_trains_a_static_lora_that_each_program_applies(tiny_model, tiny_tokenizer):
    cfg = tiny_config(bettertogether=BetterTogetherConfig(traces=3, w_steps=2))
    method = BetterTogether(tiny_model, tiny_tokenizer, cfg)
    method.task, method.seed, method.pool = TASK, 0, TRAIN
    rec_a, rec_b = {}, {}
    a = method.weight_step(Program("Do it.", demos=[TRAIN[0]]), 1, rec_a)
    b = method.weight_step(Program("Do it."), 2, rec_b)
    assert a.lora is not None and a.demos == [] and rec_a["traces"] == 0 and "gold" in rec_a["fallback"]
    ids = tiny_tokenizer("<|im_start|>user\n2 + 3<|im_end|>\n", return_tensors="pt")["input_ids"]

    def logits(program):
        pred = ProgramPredictor(tiny_model, tiny_tokenizer, program, method.mt)
        with torch.no_grad(), pred.weights(TASK, []):
            return tiny_model(ids).logits

    base, la, lb = logits(Program("x")), logits(a), logits(b)
    assert not torch.allclose(la, base, atol=1e-5) and not torch.allclose(la, lb, atol=1e-5)
    torch.testing.assert_close(logits(a), la)  # a's own snapshot, although b trained the adapter last
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, base)  # outside the predictor: the base model


@pytest.mark.parametrize("optimizer", ["demos", "opro"])
def test_bettertogether_end_to_end_on_a_tiny_model(tmp_path, tiny_model, tiny_tokenizer, optimizer):
    cfg = tiny_config(
        bettertogether=BetterTogetherConfig(strategy="p -> w -> p", prompt_optimizer=optimizer, demos=2, trials=2,
                                            score_size=2, traces=3, w_steps=2, val_size=2),
        opro=OPROConfig(rounds=1, proposals_per_round=1, score_size=2),
    )
    proposer = ScriptedProposer([["[Reply with the number only.]"], ["[Add the numbers.]"]])
    method = get_method("bettertogether")(tiny_model, tiny_tokenizer, cfg, run_dir=tmp_path / "r", proposer=proposer)
    pred = method.fit(TASK, TRAIN, [])
    steps = pred.describe()["steps"]
    assert [s["kind"] for s in steps] == ["initial", "p", "w", "p"]
    assert not any("error" in s for s in steps), steps
    assert steps[2]["static_lora"] and "search" in steps[1] and "search" in steps[3]
    assert (tmp_path / "r" / "bettertogether.json").is_file() and (tmp_path / "r" / "log.jsonl").is_file()
    result = evaluate(pred, TASK, TASK.load("test")[:2], max_new_tokens=4, progress=False)
    assert result.n == 2 and result.records[0]["instruction"] == pred.instruction
