"""The OPRO and BetterTogether baselines: search logic on scripted fakes, end to end on a tiny model."""

import random
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


@pytest.mark.parametrize("returns, chosen, kind", [("final", 3, "p"), ("best", 1, "p")])
def test_bettertogether_runs_steps_in_order_and_returns_the_final_or_the_best_program(monkeypatch, returns, chosen,
                                                                                     kind):
    order, calls = [], []
    scores = {P0: 0.2, "after p1": 0.5, "after w2": 0.4, "after p3": 0.45}
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction(scores, calls))
    spy_steps(monkeypatch, order)
    val = TASK.load("train")[100:103]
    method = BetterTogether(FAKE_MODEL, None, SimpleNamespace(bettertogether=BetterTogetherConfig(returns=returns)))
    pred = method.fit(TASK, TRAIN, val)
    assert order == ["p", "w", "p"]
    d = pred.describe()
    assert pred.instruction == f"after {kind}{chosen}" and d["chosen_step"] == chosen and d["chosen_kind"] == kind
    assert d["returns"] == returns and d["val_score"] == scores[pred.instruction]
    assert (d["best_step"], d["best_kind"], d["best_val_score"]) == (1, "p", 0.5)  # recorded either way
    assert [r["val_score"] for r in method.history] == [0.2, 0.5, 0.4, 0.45]
    assert [ids for _, ids in calls] == [[ex.id for ex in val]] * 4  # every program scored on validation


def test_bettertogether_defaults_are_dspys():
    cfg = BetterTogetherConfig()
    assert (cfg.max_bootstrapped_demos, cfg.max_labeled_demos, cfg.candidates) == (4, 16, 16)
    assert (cfg.exclude_demos, cfg.gold_fallback, cfg.returns, cfg.strategy) == (False, False, "final", "p -> w -> p")


def test_old_bettertogether_keys_still_load():
    cfg = load_config(None, ["bettertogether.demos=2", "bettertogether.trials=3"]).bettertogether
    assert (cfg.max_bootstrapped_demos, cfg.candidates, cfg.demos, cfg.trials) == (2, 3, None, None)
    with pytest.raises(MetatunerError, match="bettertogether.returns"):
        load_config(None, ["bettertogether.returns=last"])


def test_bettertogether_without_val_holds_out_part_of_train(monkeypatch):
    calls = []
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction({P0: 0.0, "after p1": 1.0}, calls))
    spy_steps(monkeypatch, [])
    cfg = SimpleNamespace(bettertogether=BetterTogetherConfig(strategy="p", val_size=4, score_size=3))
    method = BetterTogether(FAKE_MODEL, None, cfg)
    method.fit(TASK, TRAIN, [])
    held_out = set(calls[0][1])
    assert len(held_out) == 4 and held_out.isdisjoint(ex.id for ex in method.pool)
    assert len(method.pool) == len(TRAIN) - 4  # the demos optimizer bootstraps from all the rest
    with pytest.raises(MetatunerError, match="val_size"):
        BetterTogether(FAKE_MODEL, None, cfg).fit(TASK, TRAIN[:4], [])


def test_a_failing_step_returns_the_programs_so_far(monkeypatch):
    order = []
    monkeypatch.setattr(bt, "score_predictor", score_by_instruction({P0: 0.2, "after p1": 0.1}))
    spy_steps(monkeypatch, order, fail="w")
    for returns, expected in (("final", "after p1"), ("best", P0)):
        method = BetterTogether(FAKE_MODEL, None,
                                SimpleNamespace(bettertogether=BetterTogetherConfig(returns=returns)))
        pred = method.fit(TASK, TRAIN, TRAIN[:2])
        assert order[-2:] == ["p", "w"]  # the strategy stops at the failure
        assert pred.instruction == expected
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


ITEMS = TASK.load("train")[:20]
GOOD = {ex.id for i, ex in enumerate(ITEMS) if i % 3 == 0}  # the teacher answers these correctly


def scripted_teacher(answered):
    def answer(self, program, queries, teacher=False):
        answered.append((program, [ex.id for ex in queries], teacher))
        return [(f"own {ex.id}", ex.id in GOOD) for ex in queries]

    return answer


def dspy_bootstrap(order, size, k):
    """DSPy's BootstrapFewShot written out for the scripted teacher (bootstrap.py, _bootstrap and _train)."""
    boot = [i for i, ex in enumerate(order) if ex.id in GOOD][:size]
    raw = [ex for i, ex in enumerate(order) if i not in boot]
    random.Random(0).shuffle(raw)
    labeled = random.Random(0).sample(raw, min(k - len(boot), len(raw)))
    return [f"own {order[i].id}" for i in boot] + [ex.target for ex in labeled], [order[i].id for i in boot]


def test_demos_step_builds_dspys_candidate_set_and_keeps_the_first_best(monkeypatch):
    answered = []
    monkeypatch.setattr(BetterTogether, "answer", scripted_teacher(answered))
    monkeypatch.setattr(bt, "score_predictor", 
                        lambda pred, task, examples, config=None: float(sum(d.target.startswith("own") for d in pred.demos) == 2))
    cfg = BetterTogetherConfig(max_bootstrapped_demos=4, max_labeled_demos=6, candidates=5)
    method = BetterTogether(FAKE_MODEL, None, SimpleNamespace(bettertogether=cfg))
    method.task, method.seed, method.val_set, method.items = TASK, 0, TRAIN[:2], list(ITEMS)
    method.progress = False
    record = {}
    out = method.demos_step(Program(P0), 1, record)
    search = record["search"]
    assert [c["seed"] for c in search] == [-3, -2, -1, 0, 1, 2, 3, 4]
    assert search[0]["demos"] == [] and search[0]["score"] == 0.0  # zero-shot
    assert search[1]["demos"] == [ex.id for ex in random.Random(0).sample(ITEMS, 6)]  # labeled only
    assert (search[1]["bootstrapped"], search[1]["labeled"]) == (0, 6)
    candidates = []
    for c in search[2:]:
        order = list(ITEMS)
        size = 4
        if c["seed"] >= 0:
            random.Random(c["seed"]).shuffle(order)
            size = random.Random(c["seed"]).randint(1, 4)
        targets, boot = dspy_bootstrap(order, size, 6)
        assert c["bootstrapped"] == size and c["labeled"] == 6 - size and c["demos"][:size] == boot
        candidates.append(targets)
    assert search[2]["demos"][:4] == [ex.id for ex in ITEMS if ex.id in GOOD][:4]  # unshuffled: in order
    assert [c["score"] for c in search] == [float(c["bootstrapped"] == 2) for c in search]
    first_best = next(c for c in search if c["score"] == 1.0)
    assert record["candidate_seed"] == first_best["seed"] and [d.id for d in out.demos] == first_best["demos"]
    assert [d.target for d in out.demos] == candidates[[c["seed"] for c in search[2:]].index(first_best["seed"])]
    # the teacher has max_labeled_demos labeled demos (and leaves out the query it answers, below)
    for program, ids, teacher in answered:
        assert teacher and len(program.demos) == 6
        assert all(d.target == next(ex.target for ex in ITEMS if ex.id == d.id) for d in program.demos)


def test_the_teacher_answers_each_query_without_itself_among_the_demos(tiny_tokenizer):
    teacher = bt.TeacherPredictor(FAKE_MODEL, tiny_tokenizer, Program("Do it.", TRAIN[:3]))
    users = [m["content"] for m in teacher.messages(TASK, "Do it.", TRAIN[1]) if m["role"] == "user"]
    assert users == [TRAIN[0].query, TRAIN[2].query, TRAIN[1].query]
    assert len(teacher.messages(TASK, "Do it.", TRAIN[5])) == 1 + 2 * 3 + 1 and teacher.demos == TRAIN[:3]


def test_w_step_without_correct_traces_is_skipped_unless_gold_fallback(monkeypatch):
    monkeypatch.setattr(BetterTogether, "answer", lambda self, program, queries: [("x", False)] * len(queries))
    method = BetterTogether(FAKE_MODEL, None, SimpleNamespace(bettertogether=BetterTogetherConfig()))
    method.task, method.seed, method.items = TASK, 0, TRAIN
    method.budgets, seen = {0, 1, 2}, []
    method.on_budget = lambda step, pred: seen.append(step)
    record, program = {}, Program(P0, [TRAIN[0]])
    assert method.weight_step(program, 1, record) is program and method.static is None  # nothing trained
    assert record["traces"] == 0 and "gold_fallback" in record["skipped"] and "fallback" not in record
    assert seen == [0, 1, 2] and BetterTogetherConfig(gold_fallback=True).gold_fallback


@pytest.mark.parametrize("exclude", [False, True])
def test_weight_step_trains_on_own_traces_with_the_programs_demos(monkeypatch, tiny_model, tiny_tokenizer, exclude):
    import metatuner.models.static as mtm  # where the SFT inputs are encoded

    inputs, encode = [], mtm.encode_pairs
    monkeypatch.setattr(mtm, "encode_pairs", lambda tok, prompts, targets, device, max_length=None: (
        inputs.extend(zip(prompts, targets)), encode(tok, prompts, targets, device, max_length))[1])
    monkeypatch.setattr(BetterTogether, "answer", lambda self, program, queries: [
        (f"The answer is {i}.", i % 2 == 0) for i in range(len(queries))])
    cfg = tiny_config(bettertogether=BetterTogetherConfig(traces=4, w_steps=2, exclude_demos=exclude))
    cfg.train.max_length = 512 if exclude else 30  # with the demo, the inputs no longer fit: recorded
    method = BetterTogether(tiny_model, tiny_tokenizer, cfg)
    method.task, method.seed, method.items = TASK, 0, TRAIN[2:6]
    demo = replace(TRAIN[0], target="The answer is 1.")
    record = {}
    out = method.weight_step(Program("Do it.", [demo]), 1, record)
    assert record["traces"] == 2 and out.lora is not None and method.trainable_params > 0
    assert out.demos == ([] if exclude else [demo])
    assert record.get("truncated_inputs") == (None if exclude else 2)
    expected = ProgramPredictor(tiny_model, tiny_tokenizer, out, method.static)
    queries = {ex.id: ex for ex in TRAIN[2:6:2]}
    assert inputs and {t for _, t in inputs} <= {f"The answer is {i}.<|im_end|>" for i in (0, 2)}  # own outputs
    for prompt, _ in inputs:
        assert prompt in {render_chat(tiny_tokenizer, expected.messages(TASK, "Do it.", ex)) for ex in queries.values()}
        assert ("The answer is 1." in prompt) != exclude  # the demo is in the SFT input unless excluded


def test_weight_step_trains_a_static_lora_that_each_program_applies(tiny_model, tiny_tokenizer):
    cfg = tiny_config(bettertogether=BetterTogetherConfig(traces=3, w_steps=2, gold_fallback=True))
    method = BetterTogether(tiny_model, tiny_tokenizer, cfg)
    method.task, method.seed, method.items = TASK, 0, TRAIN[:3]
    rec_a, rec_b = {}, {}
    a = method.weight_step(Program("Do it.", demos=[TRAIN[0]]), 1, rec_a)
    method.items = TRAIN[3:6]
    b = method.weight_step(Program("Do it."), 2, rec_b)
    assert a.lora is not None and a.demos == [TRAIN[0]] and rec_a["traces"] == 0 and "gold" in rec_a["fallback"]
    ids = tiny_tokenizer("<|im_start|>user\n2 + 3<|im_end|>\n", return_tensors="pt")["input_ids"]

    def logits(program):
        pred = ProgramPredictor(tiny_model, tiny_tokenizer, program, method.static)
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
        bettertogether=BetterTogetherConfig(strategy="p -> w -> p", prompt_optimizer=optimizer, candidates=1,
                                            max_bootstrapped_demos=1, max_labeled_demos=2, score_size=2, traces=3,
                                            w_steps=2, val_size=2, gold_fallback=True),
        opro=OPROConfig(rounds=1, proposals_per_round=1, score_size=2),
    )
    proposer = ScriptedProposer([["[Reply with the number only.]"], ["[Add the numbers.]"]])
    method = get_method("bettertogether")(tiny_model, tiny_tokenizer, cfg, run_dir=tmp_path / "r", proposer=proposer)
    method.budgets, seen = {0, 2, 4}, []
    method.on_budget = lambda step, pred: seen.append(step)
    pred = method.fit(TASK, TRAIN, [])
    d = pred.describe()
    steps = d["steps"]
    assert [s["kind"] for s in steps] == ["initial", "p", "w", "p"]
    assert not any("error" in s for s in steps), steps
    assert steps[2]["static_lora"] and "search" in steps[1] and "search" in steps[3]
    assert d["chosen_step"] == 3 and d["best_step"] in range(4) and method.trainable_params > 0
    assert seen == [0, 2] and method.budget() == 2
    if optimizer == "demos":
        assert [c["seed"] for c in steps[1]["search"]] == [-3, -2, -1, 0]
    assert (tmp_path / "r" / "bettertogether.json").is_file() and (tmp_path / "r" / "log.jsonl").is_file()
    result = evaluate(pred, TASK, TASK.load("test")[:2], max_new_tokens=4, progress=False)
    assert result.n == 2 and result.records[0]["instruction"] == pred.instruction


# ---- BetterTogether's dspy backend (bettertogether.backend=dspy, the optional extra) -----------------
def test_dspy_backend_without_dspy_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dspy", None)  # import dspy raises ImportError
    cfg = SimpleNamespace(bettertogether=BetterTogetherConfig(backend="dspy"))
    with pytest.raises(MetatunerError, match=r"pip install 'metatuner\[dspy\]'"):
        BetterTogether(FAKE_MODEL, None, cfg).fit(TASK, TRAIN, TRAIN[:2])
    with pytest.raises(MetatunerError, match="prompt_optimizer=demos"):
        cfg.bettertogether = BetterTogetherConfig(backend="dspy", prompt_optimizer="opro")
        BetterTogether(FAKE_MODEL, None, cfg).fit(TASK, TRAIN, TRAIN[:2])


def scripted_generate(by_query):
    """The task model as a script: right on GOOD queries, and on any query whose prompt holds exactly two
    bootstrapped demos (outputs marked '(own)'); every output is marked '(own)'."""
    from metatuner.evaluation.generation import Generation

    def generate(model, tokenizer, texts, max_new_tokens, stop=(), **kwargs):
        outs = []
        for text in texts:
            ex = by_query[text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]]
            ok = ex.id in GOOD or text.count("(own)") == 2
            outs.append(Generation(f"The answer is {ex.answer if ok else 'none'}. (own)", 3))
        return outs

    return generate


def test_dspy_backend_builds_the_same_candidates_as_the_own_one(monkeypatch, tiny_tokenizer):
    pytest.importorskip("dspy")
    import metatuner.evaluation.predictors as predictors
    from metatuner.methods import bettertogether_dspy

    val = TASK.load("train")[100:104]
    fake = scripted_generate({ex.query: ex for ex in ITEMS + val})
    monkeypatch.setattr(predictors, "generate", fake)
    monkeypatch.setattr(bettertogether_dspy, "generate", fake)
    cfg = SimpleNamespace(bettertogether=BetterTogetherConfig(max_bootstrapped_demos=4, max_labeled_demos=6,
                                                              candidates=5),
                          eval=SimpleNamespace(batch_size=4, max_new_tokens=8))
    method = BetterTogether(FAKE_MODEL, tiny_tokenizer, cfg)
    method.task, method.seed, method.val_set, method.items, method.pool = TASK, 0, val, list(ITEMS), list(ITEMS)
    method.progress = False
    own, theirs = {}, {}
    a = method.demos_step(Program(P0), 1, own)
    b = bettertogether_dspy.dspy_demos_step(method, Program(P0), 1, theirs)
    assert [c["seed"] for c in theirs["search"]] == [-3, -2, -1, 0, 1, 2, 3, 4]
    for mine, dspys in zip(own["search"], theirs["search"], strict=True):
        assert (mine["seed"], mine["demos"]) == (dspys["seed"], dspys["demos"])
        assert mine["score"] == pytest.approx(dspys["score"])
    assert own["candidate_seed"] == theirs["candidate_seed"] == 1  # the first seed with 2 bootstrapped demos
    assert [(d.id, d.target) for d in a.demos] == [(d.id, d.target) for d in b.demos]


def test_dspy_backend_end_to_end_on_a_tiny_model(tmp_path, tiny_model, tiny_tokenizer):
    pytest.importorskip("dspy")
    cfg = tiny_config(bettertogether=BetterTogetherConfig(
        strategy="p -> w -> p", backend="dspy", candidates=1, max_bootstrapped_demos=1, max_labeled_demos=2,
        traces=3, w_steps=2, val_size=2, gold_fallback=True))
    method = get_method("bettertogether")(tiny_model, tiny_tokenizer, cfg, run_dir=tmp_path / "r")
    pred = method.fit(TASK, TRAIN, [])
    steps = pred.describe()["steps"]
    assert not any("error" in s for s in steps), steps
    assert [c["seed"] for c in steps[1]["search"]] == [-3, -2, -1, 0] and steps[1]["dspy"] == "3.4.1"
    assert steps[2]["static_lora"] and [c["seed"] for c in steps[3]["search"]] == [-3, -2, -1, 0]
    result = evaluate(pred, TASK, TASK.load("test")[:2], max_new_tokens=4, progress=False)
    assert result.n == 2
