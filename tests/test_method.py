"""MetaTuner trained as the method intends (METHOD.md sections 4 and 6): the persistent expert set D2,
one learning-rate policy and budget over warm-ups and joint training, the warm-up as the starting point
(F a zero residual on the SFT model), a prompt branch that cannot make answers worse (p~ in every
best-of-n, no answer leakage, append / rewrite modes, the validation gate), and F reading the query."""

import json
import random

import pytest
import torch

from conftest import make_model, script_validation_scores
from metatuner.config import load_config
from metatuner.evaluation.generation import Generation
from metatuner.tasks import Example, get_task
from metatuner.training.build import build_metatuner
from metatuner.training.experts import ExpertSet
from metatuner.training.predictor import MetaTunerPredictor
from metatuner.training.rollouts import leaks, rollout
from metatuner.training.trainer import Trainer

FAST = [
    "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=4", "train.max_length=128",
    "train.warmup_ratio=0", "train.lr_schedule=constant",
    "train.prompt_branch=always",  # these tests follow G through every phase; tests/test_branch.py tests auto
]


def setup(tok, overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = load_config(None, [*FAST, *overrides])
    mt = build_metatuner(cfg, make_model(tok, seed=seed), tok)
    task = get_task("arithmetic")
    return cfg, mt, task


def log_of(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ---- the expert set D2 ------------------------------------------------------------------------------
def test_expert_set_keeps_the_best_gain_and_p_tilde_below_the_margin():
    d2 = ExpertSet(cap=10, margin=0.1)
    assert d2.offer("q", "hint a", 0.05, keep_initial="")  # below the margin: the expert is "keep p~"
    assert d2["q"].output == "" and d2["q"].gain == 0.0
    assert d2.offer("q", "hint b", 0.5, keep_initial="")
    assert not d2.offer("q", "hint c", 0.3, keep_initial="")  # worse than the kept one: no change
    assert not d2.offer("q", "hint d", 0.0, keep_initial="")  # a later p~ win never erases a better rewrite
    assert d2["q"].output == "hint b"


def test_expert_set_is_capped_and_round_trips_exactly():
    d2 = ExpertSet(cap=3, margin=0.0)
    for i in range(5):
        d2.offer(f"q{i}", f"h{i}", 1.0 + i, keep_initial="")
    d2.offer("q2", "better", 9.0, keep_initial="")  # improved last: it stays the longest
    assert list(d2.items) == ["q3", "q4", "q2"]
    copy = ExpertSet(cap=3, margin=0.0)
    copy.load_state(json.loads(json.dumps(d2.state())))
    assert copy.items == d2.items and copy.sample(2, random.Random(0)) == d2.sample(2, random.Random(0))


def test_metatuner_i_trains_its_decoder_on_every_regularization_step(tiny_tokenizer, tmp_path):
    # rollouts every 2 joint steps fall on the task-loss steps of the I schedule, and batches never repeat;
    # the regularizer must still find experts (D2 persists) on every one of its steps
    cfg, mt, task = setup(tiny_tokenizer, ["train.schedule=alternate", "train.steps=6", "train.rollout_every=2",
                                           "train.actor_warmup_steps=0", "train.generator_warmup_queries=0",
                                           "train.lr_decoder=0.01", "data.val_size=0"])
    train = task.load("train")[:12]  # 6 steps x batch 2: every query once
    dec = [p.detach().clone() for p in mt.g_lora.adapter_parameters("dec")]
    Trainer(cfg, mt, task, train, [], tmp_path, progress=False).run()
    joint = [r for r in log_of(tmp_path) if r["phase"] == "joint"]
    assert [("reg_loss" in r) for r in joint] == [False, True] * 3
    assert [("reward_initial" in r) for r in joint] == [True, False] * 3
    assert any(not torch.equal(a, b) for a, b in zip(dec, mt.g_lora.adapter_parameters("dec")))


def test_expert_set_is_saved_and_restored_with_the_checkpoint(tiny_tokenizer, tmp_path):
    args = ["train.steps=3", "train.rollout_every=1", "train.actor_warmup_steps=0", "train.generator_warmup_queries=0"]
    cfg, mt, task = setup(tiny_tokenizer, args)
    trainer = Trainer(cfg, mt, task, task.load("train")[:8], [], tmp_path, progress=False)
    trainer.run()
    cfg, mt, task = setup(tiny_tokenizer, args)
    again = Trainer(cfg, mt, task, task.load("train")[:8], [], tmp_path, progress=False)
    again.setup_optimizer(cfg.train.steps)
    again.restore(tmp_path / "checkpoints" / "step-000003")
    assert again.experts.items == trainer.experts.items and len(again.experts) == 6


# ---- one budget, one learning-rate policy, warm-ups as the starting point ------------------------------
def test_sft_and_metatuner_share_one_learning_rate_schedule_over_the_whole_budget(tiny_tokenizer, tmp_path):
    from metatuner.methods.trained import SFT

    common = ["train.steps=8", "train.lr_schedule=cosine", "train.warmup_ratio=0.25", "data.val_size=0"]
    cfg, mt, task = setup(tiny_tokenizer, common)
    train = task.load("train")[:8]
    SFT(mt.actor, tiny_tokenizer, cfg, run_dir=tmp_path / "sft").fit(task, train, [])
    sft = {r["step"]: r["lr_static"] for r in log_of(tmp_path / "sft") if "lr_static" in r}
    cfg, mt, task = setup(tiny_tokenizer, [*common, "train.actor_warmup_steps=4", "train.generator_warmup_steps=1",
                                           "train.generator_warmup_queries=2"])
    Trainer(cfg, mt, task, train, [], tmp_path / "mt", progress=False).run()
    ours = {r["step"]: r["lr_static"] for r in log_of(tmp_path / "mt") if "lr_static" in r}
    assert sorted(sft) == sorted(ours) == list(range(1, 9))  # warm-ups are counted in the budget of 8 steps
    assert all(abs(sft[s] - ours[s]) < 1e-12 for s in sft)
    assert sft[1] < sft[3] and sft[8] < sft[4]  # a warm-up, then a decay: one schedule, not one per phase


def test_right_after_the_warm_up_metatuner_is_exactly_the_sft_model(tiny_tokenizer):
    common = ["train.steps=4", "train.lr_static=0.05", "data.val_size=0"]
    cfg, mt, task = setup(tiny_tokenizer, [*common, "train.actor_warmup_steps=2"])
    train = task.load("train")[:8]
    trainer = Trainer(cfg, mt, task, train, [], None, progress=False)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    trainer.setup_optimizer(cfg.train.steps)
    trainer.warmup_actor(2)

    # the sft method itself (a static LoRA on M alone, no G or F), from the same seed, stopped after 2 of its 4
    # steps (the same learning rates): its LoRA starts from the same values and takes the same steps
    from metatuner.methods.trained import SFT

    class Stop(Exception):
        pass

    sft_cfg = load_config(None, [*FAST, *common])
    torch.manual_seed(0)
    sft = SFT(make_model(tiny_tokenizer, seed=0), tiny_tokenizer, sft_cfg)
    batch = task.load("test")[:3]
    prompts = [task.instruction] * 3
    found = {}

    def at_two_steps(step, predictor):
        with torch.no_grad():
            found["nll"] = predictor.static.answer_nll(task, batch, prompts)
        raise Stop

    sft.budgets, sft.on_budget = {2}, at_two_steps
    with pytest.raises(Stop):
        sft.fit(task, train, [])

    with torch.no_grad():
        ours = mt.answer_nll(task, batch, prompts, mt.factors(mt.encode(task, batch)))  # F's residual is on
        theirs = found["nll"]
        untuned = make_model(tiny_tokenizer)(**mt.tokenizer(prompts, return_tensors="pt")).logits
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        tuned = mt.actor(**mt.tokenizer(prompts, return_tensors="pt")).logits  # outside as_actor: the base
    torch.testing.assert_close(tuned, untuned)  # the static LoRA lives in the adapters, not the base weights


@pytest.mark.parametrize("overlap,variant", [(True, []), (False, []), (True, ["train.schedule=alternate"]),
                                             (True, ["train.ablation=no_hypernet"])],
                         ids=["joint", "sequential", "metatuner-i", "wo-f"])
def test_g_warm_up_also_trains_m_unless_the_warm_ups_run_one_after_the_other(tiny_tokenizer, tmp_path, overlap,
                                                                           variant):
    cfg, mt, task = setup(tiny_tokenizer, ["train.steps=4", "train.actor_warmup_steps=2",
                                           "train.generator_warmup_steps=2", "train.generator_warmup_queries=2",
                                           "data.val_size=0", f"train.overlap_warmups={str(overlap).lower()}",
                                           *variant])
    has_f = "train.ablation=no_hypernet" not in variant
    trainer = Trainer(cfg, mt, task, task.load("train")[:8], [], tmp_path, progress=False)
    seen = {}
    trainer.on_step = lambda step: seen.setdefault(step, {name: [p.detach().clone() for p in ps]
                                                          for name, ps in mt.parameter_groups().items()})
    trainer.run()
    after_m, after_g = seen[2], seen[4]  # end of M's warm-up, end of G's (no joint steps in a budget of 4)
    moved = {name: any(not torch.equal(a, b) for a, b in zip(after_m[name], after_g[name])) for name in after_m}
    assert moved["decoder"]
    assert moved["static"] == overlap  # M (static LoRA and F) steps with G, or waits
    assert moved["hypernet"] == (overlap and has_f)
    warm = [r for r in log_of(tmp_path) if r["phase"] == "warmup_generator" and "generator_sft_loss" in r]
    assert [r["step"] for r in warm] == [3, 4] and all(("task_loss" in r) == overlap for r in warm)
    assert trainer.stream.cursor == (4 if overlap else 0)  # M's batches come from the joint phase's stream


def test_every_shipped_config_and_protocol_warms_up(tiny_tokenizer):
    from metatuner.bench.protocol import Protocol, shipped_protocols
    from metatuner.config import SHIPPED

    configs = [load_config(name) for name in sorted(f.stem for f in SHIPPED.glob("*.yaml"))]
    protocols = [Protocol.load(name) for name in shipped_protocols()]  # each once: loading one takes ~0.3 s
    configs += [cfg for p in protocols for cfg in map(lambda cell: p.config(*cell), p.cells())
                if cfg.method == "metatuner"]
    assert configs
    for cfg in configs:
        actor, gen = cfg.train.warmups()
        assert actor > 0 and cfg.data.val_size > 0
        assert gen > 0 or cfg.train.ablation == "no_prompt"


# ---- a prompt branch that cannot make answers worse --------------------------------------------------
def test_leaks_catches_the_gold_answer_and_stated_answers():
    task = get_task("arithmetic")
    ex = Example("a", "Mia has 3 apples and buys 4. How many?", "7", "")
    assert leaks(task, ex, "Mia ends with 7 apples.")
    assert leaks(task, ex, "The answer to this question is 11.")
    assert leaks(task, ex, "The answer is 12")
    assert not leaks(task, ex, "Add the two numbers.")
    assert not leaks(task, ex, "Mia has 3 apples; add 4.")  # numbers of the query are fine
    assert not leaks(task, ex, task.instruction)  # p~ itself states a format, not an answer


def _scripted_rollout(monkeypatch, mt, task, outputs, rewards):
    monkeypatch.setattr(type(mt), "generate_outputs",
                        lambda self, task, examples, **kw: [Generation(o, 3) for o in outputs])
    seen = {}

    def score(mt_, task_, examples, prompts, factors, reward, max_length, groups=None):
        seen["prompts"] = prompts
        return torch.tensor([rewards[p] for p in prompts])

    monkeypatch.setattr("metatuner.training.rollouts.score_prompts", score)
    return seen


def test_p_tilde_competes_and_a_leaking_candidate_never_wins(tiny_tokenizer, monkeypatch):
    cfg, mt, task = setup(tiny_tokenizer)
    ex = Example("q", "Tom has 2 pens and buys 5. How many?", "7", "")
    p = task.instruction
    seen = _scripted_rollout(monkeypatch, mt, task, ["The answer is 7.", "Add them."],
                             {p: -1.0, f"{p} The answer is 7.": 0.0, f"{p} Add them.": -0.9})
    r = rollout(mt, task, [ex], None, 2, 1.0)
    assert seen["prompts"] == [p, f"{p} Add them."]  # the leak is never even scored
    assert r.best_outputs == ["Add them."] and abs(r.best_gains[0] - 0.1) < 1e-6 and r.leaked == 1
    _scripted_rollout(monkeypatch, mt, task, ["Add them.", "Count."],
                      {p: -1.0, f"{p} Add them.": -1.5, f"{p} Count.": -1.2})
    r = rollout(mt, task, [ex], None, 2, 1.0)
    assert r.best_outputs == [""] and r.best_gains == [0.0]  # nothing beat p~: keep p~ (no hint)


@pytest.mark.parametrize("mode", ["append", "rewrite"])
def test_prompt_modes_and_outputs_cut_at_the_cap(tiny_tokenizer, mode):
    cfg, mt, task = setup(tiny_tokenizer, [f"generator.mode={mode}"])
    ex = task.load("test")[0]
    p = task.instruction
    assert mt.compose(task, ex, "") == p
    assert mt.compose(task, ex, "Be careful.") == ("Be careful." if mode == "rewrite" else f"{p} Be careful.")
    assert mt.keep_initial_output(task, ex) == ("" if mode == "append" else p)
    assert mt.clean_output(Generation("Add first. Then subt", 4, finished=False)) == "Add first."
    assert mt.clean_output(Generation("Add first then subt", 4, finished=False)) == ""  # nothing complete: p~
    mt.gen_cfg.on_cap = "fallback"
    assert mt.clean_output(Generation("Add first. Then subt", 4, finished=False)) == ""
    assert mt.clean_output(Generation("Add first.", 2, finished=True)) == "Add first."


def test_generation_reports_rows_cut_at_the_cap(tiny_model, tiny_tokenizer):
    from metatuner.evaluation.generation import generate

    gens = generate(tiny_model, tiny_tokenizer, ["hello", "a longer text"], 3)
    assert all(g.new_tokens == 3 and not g.finished for g in gens if g.new_tokens == 3)


def test_the_gate_serves_p_tilde_when_generated_prompts_do_not_help(tiny_tokenizer, tmp_path, monkeypatch):
    cfg, mt, task = setup(tiny_tokenizer, ["train.steps=2", "train.actor_warmup_steps=1",
                                           "train.generator_warmup_queries=0", "train.gate_margin=0.05"])
    train, val = task.load("train")[:6], task.load("train")[6:10]
    script_validation_scores(monkeypatch, generated=0.5, initial=0.48)
    Trainer(cfg, mt, task, train, val, tmp_path, progress=False).run()
    final = [r for r in log_of(tmp_path) if r["phase"] == "eval"][-1]
    assert final["gate"] == "initial" and mt.serve_generated is False  # +2 points is within the margin
    predictor = MetaTunerPredictor(mt)
    assert predictor.instructions(task, val) == [task.instruction] * len(val)
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["extra"]["serve_generated"] is False  # the verdict travels with the run


def test_eval_every_zero_validates_once_at_the_end_with_diagnostics(tiny_tokenizer, tmp_path):
    cfg, mt, task = setup(tiny_tokenizer, ["train.steps=3", "train.actor_warmup_steps=1",
                                           "train.generator_warmup_steps=1", "train.generator_warmup_queries=2"])
    Trainer(cfg, mt, task, task.load("train")[:6], task.load("train")[6:9], tmp_path, progress=False).run()
    evals = [r for r in log_of(tmp_path) if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [3]
    for key in ("val_exact_match_flexible", "delta_norm", "delta_spread", "prompt_equal_initial", "prompt_words",
                "prompt_cut", "gate", "sample_prompts"):
        assert key in evals[0], key
    assert (tmp_path / "tb").is_dir()


# ---- F reads the query ---------------------------------------------------------------------------------
def test_f_pools_over_the_query_tokens_only(tiny_tokenizer):
    cfg, mt, task = setup(tiny_tokenizer)
    batch = task.load("test")[:3]
    enc, mask = mt.rewrite_batch(task, batch)
    for i, ex in enumerate(batch):
        pooled = tiny_tokenizer.decode(enc["input_ids"][i][mask[i].bool()])
        assert pooled == ex.query
    mt.gen_cfg.features = "all"
    enc, mask = mt.rewrite_batch(task, batch)
    assert torch.equal(mask, enc["attention_mask"])



@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_encode_runs_the_shared_prefix_once_with_the_same_states_and_gradients(tiny_tokenizer, monkeypatch, pooling):
    cfg, mt, task = setup(tiny_tokenizer, [f"generator.pooling={pooling}"])
    batch = task.load("test")[:3]
    with torch.no_grad():  # an encoder adapter that changes G's states, so its gradients are not trivially 0
        for name, p in mt.g_lora.model.named_parameters():
            if "lora_B" in name and name.endswith(".enc"):
                p.normal_(0, 0.05)
    enc_params = [p for n, p in mt.g_lora.model.named_parameters() if n.endswith(".enc")]
    starts = []
    run = type(mt)._run_to_feature_layer
    monkeypatch.setattr(type(mt), "_run_to_feature_layer", lambda self, ids, att, start: starts.append(start) or run(self, ids, att, start))

    def pooled_and_grads():
        for p in enc_params:
            p.grad = None
        out = mt.encode(task, batch)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in enc_params]

    shared, shared_grads = pooled_and_grads()
    monkeypatch.setattr(type(mt), "MIN_SHARED_PREFIX", 10**9)  # every row runs from its first token
    whole, whole_grads = pooled_and_grads()
    assert starts[0] >= 8 and starts[1] == 0  # the template and p~ before the query ran once
    assert torch.allclose(shared, whole, atol=1e-5, rtol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(shared_grads, whole_grads))
    assert any(g.abs().sum() > 0 for g in whole_grads)


def test_the_regularizer_runs_the_shared_prefix_once_with_the_same_losses_and_gradients(tiny_tokenizer, monkeypatch):
    import metatuner.evaluation.generation as generation
    import metatuner.models.metatuner as module

    cfg, mt, task = setup(tiny_tokenizer)
    batch = task.load("test")[:3]
    with torch.no_grad():  # adapters that change G's states, so their gradients are not trivially 0
        for name, p in mt.g_lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    params = [p for n, p in mt.g_lora.model.named_parameters() if n.endswith((".enc", ".dec")) and p.requires_grad]
    prefixes = []
    run = module.token_logprobs
    monkeypatch.setattr(module, "token_logprobs", lambda m, b, prefix=0, cache=None: prefixes.append(prefix) or run(m, b, prefix, cache))

    def losses_and_grads():
        for p in params:
            p.grad = None
        out = mt.prompt_nll(task, batch, ["Add the numbers.", "Mind the sign!", ""])
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    shared, shared_grads = losses_and_grads()
    monkeypatch.setattr(generation, "MIN_SHARED_PREFIX", 10**9)  # every row runs from its first token
    whole, whole_grads = losses_and_grads()
    assert prefixes[0] >= 8 and prefixes[1] == 0  # the template and p~ before the query ran once
    assert torch.allclose(shared, whole, atol=1e-5, rtol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(shared_grads, whole_grads))
    assert sum(g.abs().sum() > 0 for g in whole_grads) >= 2


def test_rollout_scoring_runs_each_querys_common_start_once_with_the_same_rewards(tiny_tokenizer, monkeypatch):
    import metatuner.evaluation.generation as generation
    from metatuner.models.metatuner import select_rows
    from metatuner.training.rollouts import score_prompts

    cfg, mt, task = setup(tiny_tokenizer)
    queries = task.load("test")[:3]
    with torch.no_grad():  # per-query LoRAs that differ, so a row scored under another query's LoRA would show
        for p in mt.hypernet.parameters():
            p.normal_(0, 0.2)
        factors = mt.factors(mt.encode(task, queries))
    rows = [0, 0, 0, 1, 1, 2, 2, 2]
    hints = ["", "Add.", "Mind the carry.", "", "Count twice.", "", "Go slowly.", "Subtract first."]
    examples = [queries[r] for r in rows]
    prompts = [mt.compose(task, ex, h) for ex, h in zip(examples, hints)]
    caches = []
    run = generation.prefix_cache
    monkeypatch.setattr("metatuner.models.metatuner.prefix_cache", lambda m, b, n, first: caches.append(
        (n, first)) or run(m, b, n, first))
    grouped = score_prompts(mt, task, examples, prompts, select_rows(factors, rows), "nll", 512, rows)
    plain = score_prompts(mt, task, examples, prompts, select_rows(factors, rows), "nll", 512)
    assert len(caches) == 1 and caches[0][0] >= 8 and caches[0][1] == [0, 3, 5]  # once per query
    assert torch.allclose(grouped, plain, atol=1e-5, rtol=1e-4)
    assert len(set(plain.tolist())) == len(plain)


def test_f_is_a_zero_residual_until_trained_and_then_differs_between_queries(tiny_tokenizer, tmp_path):
    cfg, mt, task = setup(tiny_tokenizer, ["train.steps=4", "train.actor_warmup_steps=2", "train.lr_hypernet=0.02",
                                           "train.generator_warmup_queries=0"])
    batch = task.load("test")[:3]
    factors = mt.factors(mt.encode(task, batch))
    assert all(torch.count_nonzero(b) == 0 for _, b in factors.values())
    Trainer(cfg, mt, task, task.load("train")[:8], [], tmp_path, progress=False).run()
    with torch.no_grad():
        factors = mt.factors(mt.encode(task, batch))
    b = next(iter(factors.values()))[1]
    assert torch.count_nonzero(b) > 0 and not torch.allclose(b[0], b[1])


# ---- speed: one batched generate for the rollout samples and the frozen decoder's prompts ------------------
def test_mixed_generate_equals_separate_greedy_and_sampled_calls(tiny_tokenizer):
    cfg, mt, task = setup(tiny_tokenizer, ["generator.max_prompt_tokens=6"])
    with torch.no_grad():  # make the two decoders differ, so a mix-up of adapters would show
        for key in mt.g_lora.adapters["dec"]:
            mt.g_lora.wrapped[key].lora_B["dec"].normal_(0, 0.5)
    sampled, greedy = task.load("test")[:2], task.load("test")[2:5]
    # at a tiny temperature sampling is greedy, so every row of the mixed call has a deterministic reference
    samples, frozen = mt.generate_mixed(task, sampled, 2, 1e-6, greedy)
    assert [g.text for g in frozen] == [g.text for g in mt.generate_outputs(task, greedy, frozen=True)]
    live = [g.text for g in mt.generate_outputs(task, sampled)]
    assert [g.text for g in samples] == [t for t in live for _ in range(2)]
    assert live != [g.text for g in mt.generate_outputs(task, sampled, frozen=True)]  # the decoders do differ



def test_mixed_generate_prefills_the_shared_prefix_once_per_adapter_group(tiny_tokenizer, monkeypatch):
    from metatuner.evaluation import generation

    cfg, mt, task = setup(tiny_tokenizer, ["generator.max_prompt_tokens=6"])
    with torch.no_grad():
        for key in mt.g_lora.adapters["dec"]:
            mt.g_lora.wrapped[key].lora_B["dec"].normal_(0, 0.5)
    sampled, greedy = task.load("test")[:2], task.load("test")[2:5]
    shapes = []
    hook = mt.generator.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        shared = mt.generate_mixed(task, sampled, 2, 1e-6, greedy)
        prefills = shapes[:2]
        monkeypatch.setattr(generation, "MIN_SHARED_PREFIX", 10**9)
        shapes.clear()
        whole = mt.generate_mixed(task, sampled, 2, 1e-6, greedy)
    finally:
        hook.remove()
    assert prefills[0][0] == 2 and prefills[0][1] >= 8  # the shared tokens: one row per group (dec, dec_frozen)
    assert prefills[1][0] == 5 and prefills[1][1] < shapes[0][1] - prefills[0][1] + 1  # then each text's own
    assert [[g.text for g in part] for part in shared] == [[g.text for g in part] for part in whole]

# ---- inputs longer than train.max_length -------------------------------------------------------------
def test_a_long_row_never_cuts_a_short_row_of_its_batch(tiny_tokenizer):
    cfg, mt, task = setup(tiny_tokenizer)
    short = Example("s", "Mia has 3 apples and buys 4. How many?", "7", "The answer is 7")
    long = Example("l", "Count the apples. " * 40, "9", "The answer is 9")
    prompts = [task.instruction] * 2
    with torch.no_grad():
        alone = mt.answer_nll(task, [short], prompts[:1], None, max_length=400)
        together = mt.answer_nll(task, [short, long], prompts, None, max_length=400)
        # the long row keeps its whole target and the end of its own context: as if cut alone
        long_alone = mt.answer_nll(task, [long], prompts[:1], None, max_length=400)
    assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-6) and alone[0] > 0.1
    assert together[1].item() == pytest.approx(long_alone[0].item(), abs=1e-6)


def test_encode_pairs_cuts_each_context_from_the_left_and_never_the_target(tiny_tokenizer):
    from metatuner.evaluation.generation import encode_pairs

    batch = encode_pairs(tiny_tokenizer, ["abcdefghij", "xy"], ["123", "4567890"], "cpu", max_length=6)
    ids, labels = batch["input_ids"], batch["labels"]
    decode = lambda row, mask: tiny_tokenizer.decode([t for t, m in zip(row.tolist(), mask.tolist()) if m])  # noqa: E731
    assert decode(ids[0], batch["attention_mask"][0]) == "hij123"  # the end of the context, the whole target
    assert decode(ids[1], batch["attention_mask"][1]) == "y4567890"  # a target over the cap: one context token
    assert [t for t in labels[0].tolist() if t != -100] == tiny_tokenizer("123", add_special_tokens=False)["input_ids"]
    assert [t for t in labels[1].tolist() if t != -100] == tiny_tokenizer("4567890", add_special_tokens=False)["input_ids"]


def test_padding_goes_with_each_call_and_never_changes_the_shared_tokenizer(tiny_tokenizer):
    """Generation pads on the left and G's encoder input on the right, while the tokenizer, which serving
    threads and TRL share, keeps the padding side it was given."""
    from metatuner.evaluation.generation import generate

    cfg, mt, task = setup(tiny_tokenizer)
    batch = [Example("a", "1+1?", "2", ""), Example("b", "A much longer question about 3 + 4?", "7", "")]
    for side in ("left", "right"):
        tiny_tokenizer.padding_side = side
        generate(mt.actor, tiny_tokenizer, ["hi", "a longer text"], 2)
        enc, _ = mt.rewrite_batch(task, batch)
        assert tiny_tokenizer.padding_side == side
        assert enc["attention_mask"][0, 0] == 1 and enc["attention_mask"][0, -1] == 0  # right-padded all the same
    tiny_tokenizer.padding_side = "right"
