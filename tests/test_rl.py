"""The RL baselines: PPO's pieces on hand-made tensors, the task reward, and PPO / GRPO fits on the tiny model."""

from __future__ import annotations

import types

import pytest
import torch

from metatuner.config import RunConfig, TrainConfig, load_config
from metatuner.errors import MetatunerError
from metatuner.evaluation import evaluate
from metatuner.evaluation.generation import render_chat, tokens_generated
from metatuner.methods import METHODS
from metatuner.methods import rl
from metatuner.methods.rl import GRPOMethodConfig, PPOMethodConfig
from metatuner.tasks import get_task
from metatuner.tasks.base import Example


def ex(i: str, answer: str = "5") -> Example:
    return Example(id=i, query=f"Question {i}: what is 2 + 3?", answer=answer, target="2 + 3 = 5. The answer is 5.")


# ---- PPO's loss and advantages ----------------------------------------------------------------------
def loss_of(ratio: float, adv: float, eps: float = 0.2):
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
    zeros = torch.zeros(1, 1)
    loss, stats = rl.ppo_loss(logp, zeros, torch.tensor([[adv]]), zeros, zeros, zeros, torch.ones(1, 1), eps, 0.2, 0.1)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize("ratio, adv, clipped", [
    (1.5, 1.0, True),    # a good action already made much likelier: no further push
    (0.5, -1.0, True),   # a bad action already made much rarer: no further push
    (1.1, 1.0, False),   # inside the trust region
    (0.5, 1.0, False),   # a good action made rarer: the unclipped (larger) loss still pulls it back
    (1.5, -1.0, False),  # a bad action made likelier: likewise
])
def test_clipping_stops_the_gradient_only_where_the_ratio_left_the_trust_region(ratio, adv, clipped):
    loss, grad, stats = loss_of(ratio, adv)
    if clipped:
        assert grad == 0.0 and loss == pytest.approx(-adv * (1.2 if ratio > 1 else 0.8))
    else:
        assert grad == pytest.approx(-adv * ratio) and loss == pytest.approx(-adv * ratio)
    assert stats["clipfrac"] == (1.0 if abs(ratio - 1) > 0.2 else 0.0)


def test_the_value_loss_is_clipped_around_the_rollout_values():
    vpred = torch.tensor([[2.0]], requires_grad=True)
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    # old value 0, return 0: the clipped prediction (0.2) is nearer the return, the max takes the unclipped 2.0
    loss, stats = rl.ppo_loss(zero, zero, zero, vpred, zero, zero, one, 0.2, 0.2, 1.0)
    assert stats["vf_loss"] == pytest.approx(0.5 * 4.0)
    # return 3: the unclipped 2.0 is nearer; the max takes the clipped 0.2, whose gradient is 0
    loss, stats = rl.ppo_loss(zero, zero, zero, vpred, zero, torch.full((1, 1), 3.0), one, 0.2, 0.2, 1.0)
    loss.backward()
    assert stats["vf_loss"] == pytest.approx(0.5 * 2.8**2) and vpred.grad.item() == 0.0


def test_kl_penalty_is_zero_when_the_policy_is_the_reference_and_the_score_lands_on_the_last_token():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = rl.kl_rewards(logp, logp.clone(), torch.tensor([1.0, 0.5]), mask, kl_coef=0.05)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert rewards.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]
    # a policy likelier than the reference on a token pays kl_coef * log-ratio there
    rewards, kl = rl.kl_rewards(logp, logp - 1.0, torch.zeros(2), mask, kl_coef=0.05)
    assert torch.allclose(kl, mask) and torch.allclose(rewards, -0.05 * mask)


def test_gae_with_gamma_and_lambda_one_is_the_return_to_go_minus_the_value():
    rewards = torch.tensor([[0.1, 0.2, 1.0, 9.0]])  # the last entry is past the answer's end
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[1.3, 1.2, 1.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[0.8, 0.8, 0.7, 0.0]]))
    # lambda 0: one-step TD errors
    adv, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[0.1 + 0.4 - 0.5, 0.2 + 0.3 - 0.4, 1.0 - 0.3, 0.0]]))


def test_whitening_uses_only_the_answer_tokens():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    out = rl.masked_whiten(x, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


# ---- the reward ---------------------------------------------------------------------------------------
class ScriptedTask:
    """A task whose answer counts when it says 'yes'; the strict format is 'ANSWER: ...'."""

    primary_metric = "em"
    stop = ("\n\n",)

    def __init__(self):
        self.graded = []

    def grade(self, output, example):
        self.graded.append(output)
        strict = output.split("ANSWER:")[1].strip() if "ANSWER:" in output else None
        return {"strict": strict, "flexible": output}, {"em": float("yes" in output), "f1": 0.5}


def test_the_reward_is_the_primary_score_of_the_answer_cut_at_the_stop_string():
    task = ScriptedTask()
    assert rl.task_reward(task, "  yes \n\nno", ex("a")) == 1.0
    assert task.graded == ["yes"]  # cut and stripped as the harness does
    assert rl.task_reward(task, "no\n\nyes", ex("a")) == 0.0
    assert rl.task_reward(task, "ANSWER: no", ex("a"), format_bonus=0.1) == pytest.approx(0.1)
    assert rl.task_reward(task, "ANSWER: yes", ex("a"), format_bonus=0.1) == pytest.approx(1.1)


def test_the_grpo_reward_function_grades_each_completion_against_its_query_and_counts_tokens():
    task = ScriptedTask()
    examples = [ex("a"), ex("b")]
    reward = rl.grpo_reward(task, examples)
    before = tokens_generated()
    out = reward(prompts=["p", "p", "q"], completions=["yes", "no", [{"role": "assistant", "content": "yes"}]],
                 completion_ids=[[1, 2], [3], [4, 5, 6]], example_index=[0, 0, 1], trainer_state=None)
    assert out == [1.0, 0.0, 1.0] and tokens_generated() - before == 6


def test_arithmetic_reward_on_real_answers():
    task = get_task("arithmetic")
    item = task.load("train")[0]
    assert rl.task_reward(task, item.target, item) == 1.0
    assert rl.task_reward(task, "The answer is banana.", item) == 0.0


# ---- config and registration -----------------------------------------------------------------------
def test_methods_are_registered_and_configured():
    assert METHODS.get("ppo") is rl.PPO and METHODS.get("grpo") is rl.GRPO
    assert rl.PPO.needs_training and rl.GRPO.needs_training
    cfg = load_config(None, ["ppo.steps=3", "grpo.group_size=3", "grpo.loss_type=grpo"])
    assert cfg.ppo.steps == 3 and cfg.grpo.group_size == 3 and cfg.grpo.loss_type == "grpo"
    assert rl.PPO(None, None, cfg).budget() == 3 and rl.GRPO(None, None, RunConfig()).budget() == 12


def test_config_rejects_bad_values():
    with pytest.raises(MetatunerError, match="grpo.group_size must be >= 2"):
        GRPOMethodConfig(group_size=1)
    with pytest.raises(MetatunerError, match="divisible by ppo.minibatches"):
        PPOMethodConfig(batch_size=6, minibatches=4)
    with pytest.raises(MetatunerError, match="ppo.lam must be in"):
        PPOMethodConfig(lam=1.5)


def test_fit_fails_clearly_without_training_queries(tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    for cls in (rl.PPO, rl.GRPO):
        with pytest.raises(MetatunerError, match="train split is empty"):
            cls(tiny_model, tiny_tokenizer, RunConfig()).fit(task, [], [])


# ---- fits on the tiny model -----------------------------------------------------------------------
@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The answer is 42.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    return model(input_ids=ids).logits


def fit(cls, monkeypatch, tiny_model, tiny_tokenizer, **sections):
    # the random tiny model never answers right: a scripted score that varies with the answer gives a signal
    monkeypatch.setattr(rl, "graded", lambda task, out, example: (sum(map(ord, out)) % 7 / 7, False))
    task = get_task("arithmetic")
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    before = logits(tiny_model, tiny_tokenizer)
    method = cls(tiny_model, tiny_tokenizer, types.SimpleNamespace(**sections, seed=0))
    steps = []
    method.budgets = {0, 1, 2}
    method.on_budget = lambda step, predictor: steps.append((step, predictor.describe()["method"]))
    tokens = tokens_generated()
    predictor = method.fit(task, task.load("train")[:4], [])
    # the returned model carries the merged LoRA: its outputs moved; the caller's model is untouched
    assert predictor.model is not tiny_model and not predictor.model.training
    assert not torch.allclose(logits(predictor.model, tiny_tokenizer), before)
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_model.state_dict().items())
    assert not any("lora" in n for n, _ in tiny_model.named_modules())
    assert not any("lora" in n for n, _ in predictor.model.named_modules())
    assert torch.equal(logits(tiny_model, tiny_tokenizer), before)
    assert tokens_generated() > tokens  # rollouts are counted
    assert method.trainable_params > 0
    result = evaluate(predictor, task, task.load("test")[:2], batch_size=2, max_new_tokens=6, progress=False)
    assert result.n == 2
    return predictor, steps


def test_ppo_fit_trains_the_lora_and_reports_each_step(monkeypatch, tiny_model, tiny_tokenizer):
    cfg = PPOMethodConfig(steps=3, batch_size=2, epochs=2, max_new_tokens=6, lr=5e-2, format_bonus=0.1)
    predictor, steps = fit(rl.PPO, monkeypatch, tiny_model, tiny_tokenizer, ppo=cfg,
                           train=TrainConfig(lr_schedule="constant", warmup_ratio=0.0))
    assert steps == [(0, "ppo"), (1, "ppo"), (2, "ppo")]
    training = predictor.describe()["training"]
    assert predictor.describe()["method"] == "ppo"
    # 3 steps of 2 epochs per rollout batch: 2 rollouts, the second cut after its first step
    assert training["steps"] == 3 and training["rollouts"] == 2 and len(training["loss"]) == 3
    assert training["lrs"] == [5e-2] * 3 and len(training["kl"]) == 2
    assert training["kl"][0] == pytest.approx(0.0, abs=1e-5)  # the first rollout: LoRA B = 0, policy = reference


def test_ppo_prompts_are_rendered_as_the_harness_renders_them(monkeypatch, tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    seen = []
    real = rl.rollout
    monkeypatch.setattr(rl, "rollout", lambda model, tok, prompts, *a: seen.extend(prompts) or real(model, tok, prompts, *a))
    items = task.load("train")[:2]
    cfg = PPOMethodConfig(steps=1, batch_size=2, epochs=1, max_new_tokens=4)
    rl.PPO(tiny_model, tiny_tokenizer, types.SimpleNamespace(ppo=cfg, seed=0)).fit(task, items, [])
    expected = {render_chat(tiny_tokenizer, task.messages(task.instruction_for(e), e)) for e in items}
    assert set(seen) == expected


def test_grpo_fit_trains_the_lora_with_trl_and_calls_at_step(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.chdir(tmp_path)  # anything TRL wrote to the working directory would show up here
    cfg = GRPOMethodConfig(steps=2, batch_size=2, group_size=2, max_new_tokens=6, lr=5e-2)
    predictor, steps = fit(rl.GRPO, monkeypatch, tiny_model, tiny_tokenizer, grpo=cfg, train=TrainConfig(warmup_ratio=0.0))
    assert steps == [(0, "grpo"), (1, "grpo"), (2, "grpo")]
    training = predictor.describe()["training"]
    assert predictor.describe()["method"] == "grpo"
    assert training["steps"] == 2 and len(training["rewards"]) == 2 and training["group_size"] == 2
    assert all(0.0 <= r <= 1.0 for r in training["rewards"])
    assert list(tmp_path.iterdir()) == []  # no run folder: nothing saved


def test_grpo_prompts_keep_the_harness_tokens_when_the_tokenizer_adds_a_bos(tiny_tokenizer):
    rendered = render_chat(tiny_tokenizer, get_task("arithmetic").messages("Solve.", ex("a")))
    assert rl.trl_prompt(tiny_tokenizer, rendered) == rendered  # adds nothing: the text is left alone

    class AddsBos:
        bos_token = "<s>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    assert rl.trl_prompt(AddsBos(), "<s>system ...") == "system ..."
    assert rl.trl_prompt(AddsBos(), "system ...") == "system ..."
