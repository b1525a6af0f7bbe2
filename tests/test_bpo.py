"""The BPO baseline (bpo-selfpairs): pair selection on scripted rewrites and rewards, the validation gate,
a released rewriter loaded from a folder, and an end-to-end fit on the tiny model."""

from __future__ import annotations

import json
import types

import pytest
import torch

from metatuner.config import load_config
from metatuner.methods.bpo import BPOConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation import evaluate
from metatuner.evaluation.generation import Generation, render_chat
from metatuner.methods import METHODS, bpo, opro
from metatuner.prompts import BPO
from metatuner.tasks import get_task
from metatuner.tasks.base import Example
from metatuner.training import rollouts

TASK = get_task("arithmetic")
TARGET = "2 + 3 = 5. The answer is 5."


def ex(i: str) -> Example:
    return Example(id=i, query=f"Question {i}: what is 2 + 3?", answer="5", target=TARGET)


def config(**bpo_cfg) -> types.SimpleNamespace:
    return types.SimpleNamespace(bpo=BPOConfig(**bpo_cfg), seed=0)


def test_bpo_is_registered_and_configurable():
    assert METHODS.get("bpo-selfpairs") is bpo.BPOSelfPairs and bpo.BPOSelfPairs.needs_training
    cfg = load_config(None, ["method=bpo-selfpairs", "bpo.queries=8", "bpo.model=THUDM/BPO"])
    assert cfg.bpo.queries == 8 and cfg.bpo.model == "THUDM/BPO"
    with pytest.raises(MetatunerError, match="bpo.samples must be >= 1"):
        BPOConfig(samples=0)
    with pytest.raises(MetatunerError, match="bpo.margin"):
        BPOConfig(margin=-0.1)
    assert bpo.BPOSelfPairs(None, None, config(steps=7)).budget() == 7
    assert bpo.BPOSelfPairs(None, None, config(model="x")).budget() == 0  # a released rewriter is not trained


def test_pairs_keep_a_rewrite_only_when_it_beats_the_original_and_never_a_leak(monkeypatch, tmp_path, tiny_model,
                                                                                 tiny_tokenizer):
    # per query: scripted rewrites and M's reward (minus gold NLL) for each prompt; the original scores -1.0
    script = {
        "a": {"Question a: compute 2 + 3.": -0.5, "Question a: what's 2+3?": -0.9},  # beats by 0.5: kept
        "b": {"Question b: 2 + 3 please": -0.97, "Question b: what is 2 + 3 now?": -1.4},  # 0.03 < margin
        "c": {"Question c: the answer is 5. What is 2 + 3?": 5.0,  # leaks the answer: dropped
              "Question c: what is 2 + 3 exactly?": -0.99},
    }
    rewards = {p: r for rw in script.values() for p, r in rw.items()} | {ex(q).query: -1.0 for q in script}

    def fake_outputs(self, task, examples, *, sample=False, n=1, temperature=1.0, frozen=False):
        assert sample and n == 2 and temperature == 0.7
        return [Generation(text, 1) for e in examples for text in script[e.id]]

    def fake_scores(mt, task, examples, prompts, factors, reward, max_length, groups=None):
        assert reward == "nll" and factors is None
        # M reads the task's messages with the candidate query in place of the original one
        inputs = mt.actor_inputs(task, examples, prompts)
        assert all(task.instruction in i and p in i for i, p in zip(inputs, prompts))
        return torch.tensor([rewards[p] for p in prompts])

    monkeypatch.setattr(bpo.SelfRewriter, "generate_outputs", fake_outputs)
    monkeypatch.setattr(rollouts, "score_prompts", fake_scores)
    method = bpo.BPOSelfPairs(tiny_model, tiny_tokenizer, config(queries=3, samples=2, temperature=0.7, steps=2,
                                                                   batch_size=2, margin=0.05),
                              run_dir=tmp_path / "run")
    predictor = method.fit(TASK, [ex(q) for q in script], [])

    pairs = [json.loads(line) for line in (tmp_path / "run" / "bpo_pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["original"], p["improved"]) for p in pairs] == [
        ("a", ex("a").query, "Question a: compute 2 + 3.")]
    assert pairs[0]["gain"] == pytest.approx(0.5)
    training = predictor.describe()["training"]
    assert training["pairs"] == 1 and training["leaked"] == 1 and training["queries"] == 3 and training["steps"] == 2
    assert predictor.describe()["gate"] == "none (no validation items)" and predictor.describe()["prompts"] == "rewritten"
    assert method.trainable_params > 0


def test_without_any_kept_pair_the_original_prompts_are_served(monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.setattr(bpo.SelfRewriter, "generate_outputs",
                        lambda self, task, examples, **kw: [Generation("Say 2 + 3.", 1) for _ in examples for _ in range(kw["n"])])
    monkeypatch.setattr(rollouts, "score_prompts", lambda mt, task, exs, prompts, *a: torch.tensor(
        [-1.0 if p.startswith("Question") else -2.0 for p in prompts]))
    method = bpo.BPOSelfPairs(tiny_model, tiny_tokenizer, config(queries=2, samples=2, steps=3))
    seen = []
    method.budgets, method.on_budget = {0, 1, 2}, lambda step, p: seen.append(step)
    predictor = method.fit(TASK, [ex("a"), ex("b")], [])
    d = predictor.describe()
    assert predictor.prompts == "initial" and d["gate"] == "initial (no pair kept)"
    assert d["training"]["pairs"] == 0 and d["training"]["steps"] == 0
    assert seen == [0, 1, 2]  # the learning curve's points all exist
    with pytest.raises(MetatunerError, match="needs training queries"):
        method.fit(TASK, [], [])


def test_predictor_renders_the_rewritten_query_under_the_task_instruction(tiny_model, tiny_tokenizer):
    rewrite = lambda task, examples: [f"Rewritten {e.id}: add 2 and 3." for e in examples]  # noqa: E731
    p = bpo.BPOPredictor(tiny_model, tiny_tokenizer, rewrite, "rewritten")
    instructions, rendered = p._inputs(TASK, [ex("a")])
    assert instructions == [TASK.instruction]
    assert rendered == [render_chat(tiny_tokenizer, [{"role": "system", "content": TASK.instruction},
                                                     {"role": "user", "content": "Rewritten a: add 2 and 3."}])]
    _, plain = bpo.BPOPredictor(tiny_model, tiny_tokenizer, rewrite, "initial")._inputs(TASK, [ex("a")])
    assert plain == [render_chat(tiny_tokenizer, TASK.messages(TASK.instruction, ex("a")))]


def test_a_rewrite_that_states_an_answer_is_replaced_by_the_query(tiny_model, tiny_tokenizer):
    """Any rewriter's output (self-trained or released) is screened where M reads it: a stated answer is a guess
    that M would copy, so the original query is read instead; a rewrite that states none is read as it is."""
    rewrite = lambda task, examples: ["Add 2 and 3. The answer is 5.", "Please add 2 and 3."]  # noqa: E731
    p = bpo.BPOPredictor(tiny_model, tiny_tokenizer, rewrite, "rewritten")
    assert p.queries(TASK, [ex("a"), ex("b")]) == [ex("a").query, "Please add 2 and 3."]


@pytest.mark.parametrize("rewritten, initial, gate_margin, served", [
    (0.6, 0.5, 0.0, "rewritten"), (0.5, 0.5, 0.0, "initial"), (0.6, 0.5, 0.2, "initial"), (0.4, 0.5, 0.0, "initial"),
])
def test_gate_serves_rewrites_only_when_they_score_higher_on_validation(monkeypatch, rewritten, initial, gate_margin,
                                                                        served):
    calls = []

    def fake_score(predictor, task, examples, cfg=None):
        calls.append((predictor.prompts, [e.id for e in examples]))
        return rewritten if predictor.prompts == "rewritten" else initial

    monkeypatch.setattr(opro, "score_predictor", fake_score)
    fake_model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path="fake"))
    method = bpo.BPOSelfPairs(fake_model, None, config(gate_margin=gate_margin))
    predictor = method.gated(TASK, [ex("v1"), ex("v2")], lambda t, e: [], {"rewriter": "x"})
    assert predictor.prompts == served
    d = predictor.describe()
    assert d["gate"] == served and d["val_score_rewritten"] == rewritten and d["val_score_initial"] == initial
    assert sorted(calls) == [("initial", ["v1", "v2"]), ("rewritten", ["v1", "v2"])]  # validation only


def test_released_rewriter_from_a_folder_uses_bpos_template_and_no_training(monkeypatch, tiny_model, tiny_tokenizer,
                                                                             tiny_model_dir):
    seen = []
    real_generate = bpo.generate

    def spy(model, tokenizer, texts, *args, **kw):
        seen.extend(texts)
        return real_generate(model, tokenizer, texts, *args, **kw)

    monkeypatch.setattr(bpo, "generate", spy)
    method = bpo.BPOSelfPairs(tiny_model, tiny_tokenizer, config(model=str(tiny_model_dir), max_new_tokens=6))
    val = TASK.load("train")[:2]
    predictor = method.fit(TASK, [], val)
    d = predictor.describe()
    assert d["rewriter"] == str(tiny_model_dir) and d["training"] == {"steps": 0} and method.trainable_params == 0
    assert d["gate"] in ("rewritten", "initial")
    assert seen and set(seen) <= {BPO["released"].format(prompt=v.query) for v in val}
    predictor.prompts = "rewritten"
    result = evaluate(predictor, TASK, val, batch_size=2, max_new_tokens=4, progress=False)
    assert result.n == 2


def test_released_rewriter_that_cannot_be_loaded_is_a_clear_error(tmp_path, tiny_model, tiny_tokenizer):
    method = bpo.BPOSelfPairs(tiny_model, tiny_tokenizer, config(model=str(tmp_path / "no-such-bpo")))
    with pytest.raises(MetatunerError, match="could not load model"):
        method.fit(TASK, [], [ex("a")])


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The answer is 42.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    return model(input_ids=ids).logits


def test_end_to_end_fit_on_the_tiny_model_trains_the_rewriter_and_leaves_m_unchanged(tiny_model, tiny_tokenizer):
    # (a rewrite cut at the cap ends at its last sentence: 40 random tokens usually hold a "." to cut at)
    torch.manual_seed(0)
    before = logits(tiny_model, tiny_tokenizer)
    train, val = TASK.load("train")[:6], TASK.load("train")[6:8]
    method = bpo.BPOSelfPairs(tiny_model, tiny_tokenizer, config(queries=4, samples=3, max_new_tokens=40, steps=2,
                                                                   batch_size=2, margin=0.0, lr=1e-2))
    seen = []
    method.budgets, method.on_budget = {0, 1, 2}, lambda step, p: seen.append((step, p.describe()["gate"]))

    predictor = method.fit(TASK, train, val)

    assert [s for s, _ in seen] == [0, 1, 2]
    training = predictor.describe()["training"]
    assert training["pairs"] >= 1 and training["steps"] == 2 and training["lr_schedule"] == "cosine"
    assert predictor.describe()["gate"] in ("rewritten", "initial") and predictor.name == "bpo-selfpairs"
    # M answers with the rewriter's adapter off: the base model's outputs are unchanged
    assert torch.allclose(logits(tiny_model, tiny_tokenizer), before)
    lora_b = [p for n, p in method.rewriter.lora.adapter_state("dec").items() if n.endswith(".B")]
    assert any(b.abs().sum() > 0 for b in lora_b)  # B starts at zero: the rewriter was trained
    assert method.trainable_params == sum(p.numel() for p in method.rewriter.lora.adapter_parameters("dec"))
    predictor.prompts = "rewritten"
    result = evaluate(predictor, TASK, TASK.load("test")[:3], batch_size=3, max_new_tokens=8, progress=False)
    assert result.n == 3 and 0.0 <= result.score <= 1.0


def test_the_rewriter_starts_where_it_did_as_a_metatuner_with_its_prompt_decoder_only(tiny_tokenizer):
    """R's adapter starts from the values G's decoder of such a MetaTuner starts from, and the RNGs move on
    alike, so a seed gives the pairs and the training it gave when R was built that way."""
    from conftest import make_model
    from metatuner.config import GeneratorConfig, HypernetConfig
    from metatuner.models.metatuner import MetaTuner

    cfg = BPOConfig(rank=4)
    model = make_model(tiny_tokenizer)
    torch.manual_seed(5)
    mt = MetaTuner(model, tiny_tokenizer, GeneratorConfig(targets=list(cfg.targets), rank=cfg.rank, alpha=cfg.alpha,
                                                          share_layers=0), HypernetConfig(targets=list(cfg.targets)))
    theirs, after_theirs = mt.g_lora.adapter_state("dec"), torch.rand(3)
    model = make_model(tiny_tokenizer)
    torch.manual_seed(5)
    rewriter = bpo.SelfRewriter(model, tiny_tokenizer, cfg)
    ours, after_ours = rewriter.lora.adapter_state("dec"), torch.rand(3)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(after_ours, after_theirs)
    assert not isinstance(rewriter, MetaTuner) and rewriter.state().keys() == {f"dec.{k}" for k in ours}
