"""The RLPrompt baseline: the soft Q-learning loss on hand-made tensors, the per-query z-score, the choice on
validation with a scripted scorer, and an end-to-end fit on the tiny model."""

from __future__ import annotations

import math
import types

import pytest
import torch

from metatuner.config import load_config
from metatuner.methods.rlprompt import RLPromptConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation import evaluate
from metatuner.methods import METHODS
from metatuner.methods import rlprompt
from metatuner.tasks import get_task


def consistent(rewards: torch.Tensor, actions: torch.Tensor, vocab: int = 5) -> torch.Tensor:
    """Random Q-values [B, T, V] set so that Q_t(a_t) = V_{t+1} (t < T) and Q_T(a_T) = r: soft-consistent."""
    torch.manual_seed(0)
    b, t = actions.shape
    q = torch.randn(b, t, vocab)
    for i in range(b):
        q[i, t - 1, actions[i, t - 1]] = rewards[i]
        for s in range(t - 2, -1, -1):
            q[i, s, actions[i, s]] = q[i, s + 1].logsumexp(-1)
    return q


def test_sql_loss_is_zero_when_q_values_are_consistent_with_the_rewards():
    actions = torch.tensor([[1, 3, 0], [4, 4, 2]])
    rewards = torch.tensor([2.0, -1.5])
    q = consistent(rewards, actions)
    assert rlprompt.sql_loss(q, q.clone(), actions, rewards).item() == pytest.approx(0.0, abs=1e-8)
    # another reward, or another action, breaks the consistency
    assert rlprompt.sql_loss(q, q, actions, rewards + 1) > 0.1
    assert rlprompt.sql_loss(q, q, actions.roll(1, dims=1), rewards) > 0.1


def test_sql_loss_gradient_raises_the_probability_of_a_rewarded_prompt():
    torch.manual_seed(1)
    actions = torch.tensor([[2, 0]])
    base = torch.randn(1, 2, 6)
    target = base.clone()

    def after_step(reward: float) -> torch.Tensor:
        q = base.clone().requires_grad_(True)
        rlprompt.sql_loss(q, target, actions, torch.tensor([reward])).backward()
        stepped = base - 0.01 * q.grad
        return stepped.log_softmax(-1).gather(-1, actions[..., None]).sum()  # log pi(prompt)

    start = base.log_softmax(-1).gather(-1, actions[..., None]).sum()
    assert after_step(10.0) > start > after_step(-10.0)
    # the target network gets no gradient
    q = base.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    rlprompt.sql_loss(q, t, actions, torch.tensor([1.0])).backward()
    assert t.grad is None


def test_rewards_are_z_scored_per_query_across_prompts():
    # two queries on very different scales: each is normalised on its own, so both count equally
    scores = torch.tensor([[0.0, -100.0], [1.0, -300.0], [2.0, -200.0]])
    z = rlprompt.zscore_per_query(scores)
    per_query = torch.tensor([[-1.2247, 1.2247], [0.0, -1.2247], [1.2247, 0.0]])
    assert torch.allclose(z, per_query.mean(1), atol=1e-3)
    # a query on which every prompt scores the same adds nothing
    flat = torch.cat([scores[:, :1], torch.full((3, 1), 7.0)], dim=1)
    assert torch.allclose(rlprompt.zscore_per_query(flat), torch.tensor([-1.2247, 0.0, 1.2247]) / 2, atol=1e-3)


def test_the_best_candidate_on_validation_wins_and_ties_keep_the_earlier():
    scores = {"a": 0.25, "b": 0.5, "c": 0.5, "d": 0.0}
    calls = []

    def score(c):
        calls.append(c)
        return scores[c]

    ranked = rlprompt.select_on_validation(["a", "b", "a", "c", "d"], score)
    assert ranked[0] == ("b", 0.5) and [c for c, _ in ranked] == ["b", "c", "a", "d"]
    assert calls == ["a", "b", "c", "d"]  # each distinct candidate is scored once


def test_config_section_and_bad_values():
    cfg = load_config(None, ["rlprompt.steps=3", "rlprompt.use=replace"])
    assert cfg.rlprompt.steps == 3 and cfg.rlprompt.use == "replace"
    with pytest.raises(MetatunerError, match="rlprompt.use must be one of append, replace"):
        load_config(None, ["rlprompt.use=prefix"])
    with pytest.raises(MetatunerError, match="rlprompt.prompts_per_step must be >= 2"):
        RLPromptConfig(prompts_per_step=1)
    with pytest.raises(MetatunerError, match="rlprompt.target_rate must be in"):
        RLPromptConfig(target_rate=1.5)


def test_the_target_rate_is_scaled_to_the_budget_so_the_target_moves_as_far_as_the_originals():
    def initial_share(rate: float, steps: int) -> float:
        """What is left of the target's initial values after ``steps`` Polyak updates towards a fixed policy."""
        target, policy = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
        with torch.no_grad():
            target.weight.fill_(1.0)
            policy.weight.fill_(0.0)
        for _ in range(steps):
            rlprompt.polyak_update(target, policy, rate)
        return target.weight.mean().item()

    original = initial_share(0.001, 12_000)  # the original RLPrompt: e^-12 of the initial values is left
    assert original < 1e-5
    assert initial_share(0.001, 6) > 0.99 and initial_share(0.001, 400) > 0.65  # the old default, our budgets
    for steps in (3, 6, 12, 16, 50, 200, 400):  # the budgets of the shipped configs and tests
        rate = RLPromptConfig(steps=steps).polyak_rate()
        assert rate == min(1.0, 12 / steps)
        # (1 - 12 / steps) ** steps <= e^-12: at least as far as the original over its run (all the way at rate 1)
        assert initial_share(rate, steps) <= math.exp(-12) + 1e-7
    assert RLPromptConfig(steps=400, target_rate=0.001).polyak_rate() == 0.001  # an explicit rate is kept
    assert load_config(None, ["rlprompt.target_rate=0.01"]).rlprompt.polyak_rate() == 0.01
    assert load_config(None, []).rlprompt.target_rate is None


def test_fit_moves_the_target_at_the_budgets_rate(tiny_model, tiny_tokenizer, monkeypatch):
    rates = []
    real = rlprompt.polyak_update

    def spy(target, source, rate):
        rates.append(rate)
        real(target, source, rate)
        # the target is the policy as it stood before the step (rate 1 for a budget under 12 steps)
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))

    monkeypatch.setattr(rlprompt, "polyak_update", spy)
    config = types.SimpleNamespace(rlprompt=RLPromptConfig(**{**TINY, "candidates": 1}))
    method = rlprompt.RLPrompt(tiny_model, tiny_tokenizer, config, scorer=lambda i, e: 0.0)
    method.progress = False
    predictor = method.fit(get_task("arithmetic"), get_task("arithmetic").load("train")[:4], [])
    assert rates == [1.0] * TINY["steps"] and predictor.training["target_rate"] == 1.0


def test_rlprompt_is_registered_and_needs_training_data(tiny_model, tiny_tokenizer):
    assert METHODS.get("rlprompt") is rlprompt.RLPrompt and rlprompt.RLPrompt.needs_training
    with pytest.raises(MetatunerError, match="rlprompt needs training items"):
        rlprompt.RLPrompt(tiny_model, tiny_tokenizer).fit(get_task("arithmetic"), [], [])


TINY = dict(steps=3, prompts_per_step=3, queries_per_step=2, hidden_size=16, lr=1e-2, fluent_top_k=0, top_k=0,
            candidates=3, val_size=2)


@pytest.mark.parametrize("use", ["append", "replace"])
def test_fit_learns_a_prompt_and_picks_it_on_validation(tmp_path, tiny_model, tiny_tokenizer, use):
    task = get_task("arithmetic")
    items = task.load("train")[:8]
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seen = []

    def scorer(instruction, examples):  # scripted: prefers longer instructions
        seen.append((instruction, [e.id for e in examples]))
        return len(instruction) / 1000

    config = types.SimpleNamespace(rlprompt=RLPromptConfig(**TINY, use=use), seed=0)
    method = rlprompt.RLPrompt(tiny_model, tiny_tokenizer, config, run_dir=tmp_path, scorer=scorer)
    method.progress = False
    method.budgets, at = {0, 1, 3}, []
    method.on_budget = lambda step, p: at.append((step, p.instruction))

    predictor = method.fit(task, items[2:], items[:2])

    training = predictor.describe()["training"]
    ids = training["prompt_ids"]
    assert len(ids) == RLPromptConfig().prompt_length == 5
    prompt = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    expected = (task.instruction + prompt if use == "append" else prompt).strip()
    assert predictor.instruction == expected and predictor.model is tiny_model
    # chosen on validation: every candidate scored on the validation items, the best (longest) one kept
    assert seen and all(e == [x.id for x in items[:2]] for _, e in seen)
    assert training["val_score"] == max(c["val_score"] for c in training["candidates"])
    assert training["val_score"] == len(predictor.instruction) / 1000
    # M is untouched; the MLP trained; learning-curve points at the requested steps
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_model.state_dict().items())
    assert [s for s, _ in at] == [0, 1, 3]
    assert method.trainable_params == 2 * 32 * 16 + 16 + 32
    assert (tmp_path / "rlprompt.json").is_file() and training["final_loss"] > 0

    result = evaluate(predictor, task, task.load("test")[:2], batch_size=2, max_new_tokens=4, progress=False)
    assert result.n == 2


def test_training_moves_the_mlp(tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    policy_weights = []
    original = rlprompt.PromptPolicy.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        policy_weights.append((self, {k: v.clone() for k, v in self.mlp.state_dict().items()}))

    mp = pytest.MonkeyPatch()
    mp.setattr(rlprompt.PromptPolicy, "__init__", spy)
    try:
        config = types.SimpleNamespace(rlprompt=RLPromptConfig(**{**TINY, "candidates": 1}))
        method = rlprompt.RLPrompt(tiny_model, tiny_tokenizer, config, scorer=lambda i, e: 0.0)
        method.progress = False
        method.fit(task, task.load("train")[:4], [])
    finally:
        mp.undo()
    (policy, before), = policy_weights
    assert any(not torch.equal(v, before[k]) for k, v in policy.mlp.state_dict().items())


def test_rollout_states_are_those_of_a_full_forward_and_skip_special_tokens(tiny_model, tiny_tokenizer):
    policy = rlprompt.PromptPolicy(tiny_model, tiny_tokenizer, "<|im_start|>system\nSolve it.", 16, fluent_top_k=3)
    ids, states = policy.rollout(3, 4, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 4) and states.shape == (3, 4, 32)
    ctx = policy.context.expand(3, -1)
    with torch.no_grad():
        full = tiny_model.get_decoder()(input_ids=torch.cat([ctx, ids], dim=1))[0]
    assert torch.allclose(states, full[:, ctx.shape[1] - 1 : -1], atol=1e-5)
    # fluent: every token is among M's own top-3 next tokens, and none is a special token
    lm_top = policy.head(states).masked_fill(
        torch.isin(torch.arange(len(tiny_tokenizer)), policy.banned), float("-inf")).topk(3, dim=-1).indices
    assert (lm_top == ids[..., None]).any(-1).all()
    assert not torch.isin(ids, torch.tensor(tiny_tokenizer.all_special_ids)).any()
    # greedy decoding is deterministic
    assert torch.equal(policy.rollout(2, 4, greedy=True)[0][0], policy.rollout(2, 4, greedy=True)[0][1])
