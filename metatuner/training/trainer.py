"""The MetaTuner training loop, in named phases: setup, warm-up of M, warm-up of G, joint training.

Joint training minimises, per METHOD.md section 4,

    L = task(x, y)  +  alpha * reg(x, p*)

- ``task``: mean NLL of the gold target under M with the query's generated LoRA and a prompt from the
  frozen copy of the prompt decoder (gradients reach F and the shared encoder);
- ``reg``: teacher-forced NLL under G of the query's expert prompt ``p*`` from the rollouts (gradients
  reach the prompt decoder and the shared encoder).

``schedule=joint`` (MetaTuner-J) steps on the sum; ``schedule=alternate`` (MetaTuner-I) steps on the task
term at even steps and on the regularizer at odd ones. The loop runs on ``accelerate``: under
``accelerate launch`` each process takes its share of every batch (warm-ups included), gradients are
averaged across processes in one all-reduce before each step, and the rollouts' expert prompts are
gathered so every process (and the checkpoint) holds all of D2. Only the main process writes logs and
checkpoints. Every loss term is logged by name to ``log.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from metatuner.config import RunConfig
from metatuner.errors import MetatunerError
from metatuner.models.metatuner import MetaTuner
from metatuner.tasks.base import Example, Task
from metatuner.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from metatuner.training.rollouts import rollout


def lr_lambda(schedule: str, total: int, warmup_ratio: float):
    warm = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


class DataStream:
    """An endless, seeded, resumable stream of training examples: a fresh shuffle every epoch."""

    def __init__(self, examples: list[Example], seed: int, cursor: int = 0):
        self.examples, self.seed, self.cursor = examples, seed, cursor
        self._epoch, self._order = -1, []

    def next(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.examples))
            if epoch != self._epoch:
                self._order = list(range(len(self.examples)))
                random.Random(self.seed * 100_003 + epoch).shuffle(self._order)
                self._epoch = epoch
            out.append(self.examples[self._order[pos]])
            self.cursor += 1
        return out


class Trainer:
    def __init__(self, cfg: RunConfig, mt: MetaTuner, task: Task, train: list[Example], val: list[Example],
                 run_dir: Path | None, progress: bool = True):
        self.cfg, self.tc, self.mt, self.task = cfg, cfg.train, mt, task
        self.train_set, self.val = train, val
        self.run_dir = run_dir
        self.progress = progress
        self.acc = Accelerator(cpu=mt.actor.device.type == "cpu")
        if self.tc.batch_size < self.acc.num_processes:
            raise MetatunerError(
                f"train.batch_size={self.tc.batch_size} is smaller than the {self.acc.num_processes} processes: "
                "every process needs at least one query of each batch"
            )
        self.experts: dict[str, str] = {}  # D2: query id -> best prompt found by rollouts
        self.prompt_cache: dict[str, str] = {}  # frozen-decoder prompts, cleared at each sync
        self.step = 0
        self.stream = DataStream(train, cfg.data.seed)
        self._writer = None

    # ---- phases ----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> None:
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if resume and ckpt is None:
            raise MetatunerError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if self.tc.actor_warmup_steps and ckpt is None:
            self.warmup_actor()
        elif self.tc.actor_warmup_steps:
            self.mt.add_static_adapter(self.tc.static_rank, self.tc.static_alpha)
            self._freeze_static()
        self.setup_joint()
        if ckpt is not None:
            self.restore(ckpt)
        else:
            if self.tc.generator_warmup_queries and self.mt.use_prompt:
                self.warmup_generator()
            self.save()
        self.train_joint()

    def warmup_actor(self, steps: int | None = None, instruction: str | None = None) -> None:
        """M's static LoRA, fine-tuned on (p~, x) -> y: exactly the SFT baseline.

        ``instruction`` replaces ``p~`` in the inputs (BetterTogether fine-tunes under its current prompt).
        """
        steps = self.tc.actor_warmup_steps if steps is None else steps

        self.mt.add_static_adapter(self.tc.static_rank, self.tc.static_alpha)
        stream = DataStream(self.train_set, self.cfg.data.seed + 1)

        def loss(batch: list[Example]) -> torch.Tensor:
            prompts = [instruction or self.task.instruction_for(ex) for ex in batch]
            return self.mt.answer_nll(self.task, batch, prompts, None, self.tc.max_length).mean()

        params = list(self.mt.m_lora.adapter_parameters("static"))
        self._supervised("warmup_actor", "sft", params, self.tc.lr_static, steps, stream, loss)
        self._freeze_static()

    def _supervised(self, phase: str, name: str, params: list, lr: float, steps: int, stream: DataStream,
                    loss_fn) -> None:
        """A plain fine-tuning loop (the warm-ups): AdamW on ``params`` over ``steps`` batches of ``stream``."""
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.tc.weight_decay)
        for step in tqdm(range(steps), desc=phase.replace("_", " "), disable=not self.progress):
            start = time.perf_counter()
            loss = loss_fn(self._share(stream.next(self.tc.batch_size)))
            self._check_finite(step, {name: loss})
            loss.backward()
            self._sync_gradients(params)
            self._clip(params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.log({"phase": phase, "step": step, f"{name}_loss": loss.item(),
                      "seconds": time.perf_counter() - start})

    def _freeze_static(self) -> None:
        for p in self.mt.m_lora.adapter_parameters("static"):
            p.requires_grad_(False)

    def warmup_generator(self) -> None:
        """One round of rejection sampling: fine-tune G on each query's best sampled rewrite (or p~)."""
        queries = DataStream(self.train_set, self.cfg.data.seed + 2).next(self.tc.generator_warmup_queries)
        best: dict[str, str] = {}
        for i in tqdm(range(0, len(queries), self.tc.batch_size), desc="warm-up G (rollouts)", disable=not self.progress):
            batch = self._share(queries[i : i + self.tc.batch_size])  # the last chunk may leave a process none
            prompts = rollout(self.mt, self.task, batch, None, self.tc.rollouts, self.tc.temperature,
                              self.tc.reward, self.tc.max_length).best_prompts if batch else []
            best.update(self._gather(zip([ex.id for ex in batch], prompts)))
        stream = DataStream(queries, self.cfg.data.seed + 3)

        def loss(batch: list[Example]) -> torch.Tensor:
            return self.mt.prompt_nll(self.task, batch, [best[ex.id] for ex in batch]).mean()

        params = self.groups["encoder"] + self.groups["decoder"]
        self._supervised("warmup_generator", "generator_sft", params, self.tc.lr_decoder,
                         self.tc.generator_warmup_steps, stream, loss)
        self.experts.update(best)
        self.mt.sync_frozen_decoder()

    def setup_joint(self) -> None:
        self.groups = self.mt.parameter_groups()
        lrs = {"encoder": self.tc.lr_encoder, "decoder": self.tc.lr_decoder, "hypernet": self.tc.lr_hypernet}
        param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in self.groups.items() if ps]
        opt = torch.optim.AdamW(param_groups, weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.tc.lr_schedule, self.tc.steps, self.tc.warmup_ratio))
        # the scheduler stays unwrapped: accelerate's wrapper would step it once per process, but each process
        # here takes a share of one batch, so one optimizer step is one scheduler step
        self.optimizer, self.scheduler = self.acc.prepare(opt), sched

    def train_joint(self) -> None:
        bar = tqdm(total=self.tc.steps, initial=self.step, desc="joint training", disable=not self.progress)
        while self.step < self.tc.steps:
            record = self.train_step()
            if self.step % self.tc.log_every == 0:
                self.log(record)
            if self.tc.eval_every and self.step % self.tc.eval_every == 0 and self.val:
                self.evaluate_val()
            if self.step % self.tc.save_every == 0 or self.step == self.tc.steps:
                self.save()
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.endswith("_loss")})
            bar.update(1)
        bar.close()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``grad_accum`` micro-batches); returns the step's log record."""
        tc = self.tc
        start = time.perf_counter()
        record: dict[str, Any] = {"phase": "joint", "step": self.step + 1}
        terms = self.terms_for_step()
        for _ in range(tc.grad_accum):
            batch = self._share(self.stream.next(tc.batch_size))
            losses = self.forward_backward(batch, terms, record)
            for k, v in losses.items():
                record[f"{k}_loss"] = record.get(f"{k}_loss", 0.0) + v.item() / tc.grad_accum
        params = [p for ps in self.groups.values() for p in ps]
        self._sync_gradients(params)
        self._clip(params)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.step % tc.sync_every == 0:
            self.mt.sync_frozen_decoder()
            self.prompt_cache.clear()
        record.update({f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups})
        record["seconds"] = time.perf_counter() - start
        return record

    # ---- one step's pieces -----------------------------------------------------------------------
    def terms_for_step(self) -> set[str]:
        """Which loss terms drive this step's update (both for J; alternating for I)."""
        if self.tc.schedule == "alternate":
            return {"task"} if self.step % 2 == 0 else {"reg"}
        return {"task", "reg"}

    def forward_backward(self, batch: list[Example], terms: set[str], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Computes the step's loss terms on one micro-batch and back-propagates those in ``terms``.

        Each term is back-propagated as soon as it is computed, so the task loss's graph is freed before
        the regularizer's is built: the gradient of the weighted sum, at the peak memory of one term.
        """
        mt, task, tc = self.mt, self.task, self.tc
        out: dict[str, torch.Tensor] = {}

        def backward(name: str, weight: float = 1.0) -> None:
            self._check_finite(self.step + 1, {name: out[name]})
            if name in terms and out[name].requires_grad:
                (weight * out[name] / tc.grad_accum).backward()
            out[name] = out[name].detach()

        need_factors = "task" in terms or (mt.use_prompt and self.step % tc.rollout_every == 0)
        factors = mt.factors(mt.encode(task, batch)) if need_factors else None
        if mt.use_prompt and self.step % tc.rollout_every == 0:
            detached = {k: (a.detach(), b.detach()) for k, (a, b) in factors.items()} if factors else None
            r = rollout(mt, task, batch, detached, tc.rollouts, tc.temperature, tc.reward, tc.max_length)
            self.experts.update(self._gather(zip([ex.id for ex in batch], r.best_prompts)))
            record.update(reward_mean=r.mean_reward, reward_initial=r.initial_reward,
                          reward_best=sum(r.best_rewards) / len(r.best_rewards))
        if "task" in terms:
            prompts = self.frozen_prompts(batch)
            out["task"] = mt.answer_nll(task, batch, prompts, factors, tc.max_length).mean()
            backward("task")
        if "reg" in terms and mt.use_prompt:
            have = [ex for ex in batch if ex.id in self.experts]
            if have:
                out["reg"] = mt.prompt_nll(task, have, [self.experts[ex.id] for ex in have]).mean()
                backward("reg", tc.alpha)
        return out

    def frozen_prompts(self, batch: list[Example]) -> list[str]:
        """Prompts from the frozen decoder, generated once per query between two syncs."""
        missing = [ex for ex in batch if ex.id not in self.prompt_cache]
        if missing:
            new = self.mt.generate_prompts(self.task, missing, frozen=True)
            self.prompt_cache.update({ex.id: p for ex, p in zip(missing, new)})
        return [self.prompt_cache[ex.id] for ex in batch]

    # ---- several processes (accelerate launch) ----------------------------------------------------
    def _share(self, batch: list[Example]) -> list[Example]:
        """This process's share of a batch every process drew alike (the same seeded stream)."""
        return batch[self.acc.process_index :: self.acc.num_processes]

    def _gather(self, pairs) -> list[tuple[str, str]]:
        """``(query id, prompt)`` pairs from every process (collective: every process must call it)."""
        pairs = list(pairs)
        return list(gather_object(pairs)) if self.acc.num_processes > 1 else pairs

    def _sync_gradients(self, params: list[torch.Tensor]) -> None:
        """Averages gradients across processes with one all-reduce of a flat buffer.

        A parameter's gradient is the mean over the processes that produced one (a process whose share had
        no expert prompt yet gives the decoder none), and stays ``None`` where none did, as in one process.
        Every process calls this with the same parameters, so the collective never waits on a missing one.
        """
        if self.acc.num_processes == 1:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        flat = self.acc.reduce(torch.cat([*grads, present]), reduction="sum")
        counts = flat[-len(params):]
        offset = 0
        for p, count in zip(params, counts.tolist()):
            n = p.numel()
            if count > 0:
                p.grad = (flat[offset : offset + n] / count).view_as(p).to(p.dtype)
            offset += n

    def _clip(self, params) -> None:
        if self.tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.tc.max_grad_norm)

    def _check_finite(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        bad = {k: v.item() for k, v in losses.items() if not torch.isfinite(v).all()}
        if bad:
            last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
            raise MetatunerError(
                f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); training "
                f"stopped; last good checkpoint: {last or 'none'} (lower the learning rates or check the data)"
            )

    # ---- evaluation, logging, checkpoints ----------------------------------------------------------
    def evaluate_val(self) -> None:
        from metatuner.evaluation.harness import evaluate
        from metatuner.training.predictor import MetaTunerPredictor

        result = evaluate(MetaTunerPredictor(self.mt), self.task, self.val, batch_size=self.cfg.eval.batch_size,
                          likelihood=False, progress=False)
        samples = [{"id": r["id"], "prompt": r["instruction"], "output": r["output"]} for r in result.records[:3]]
        self.log({"phase": "eval", "step": self.step, f"val_{result.primary_metric}": result.score,
                  "sample_prompts": samples})

    def log(self, record: dict[str, Any]) -> None:
        if self.run_dir is None or not self.acc.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        step = record.get("step", 0)
        for k, v in record.items():
            if isinstance(v, float):
                self._writer.add_scalar(f"{record['phase']}/{k}", v, step)
        if "sample_prompts" in record:
            text = "\n\n".join(f"**{s['id']}**: {s['prompt']}" for s in record["sample_prompts"])
            self._writer.add_text("prompts", text, step)
        self._writer.flush()

    def save(self) -> None:
        if self.run_dir is None:
            return
        prompt_cache = dict(self._gather(self.prompt_cache.items()))  # each process cached its own share
        if not self.acc.is_main_process:
            return
        extra = {"cursor": self.stream.cursor, "experts": self.experts, "prompt_cache": prompt_cache,
                 "has_static": self.mt.has_static}
        save_checkpoint(self.run_dir, self.step, self.mt.trainable_state(), self.optimizer, self.scheduler, extra)

    def restore(self, path: Path) -> None:
        tensors, state = load_checkpoint(path, self.optimizer, self.scheduler)
        self.mt.load_trainable_state(tensors)
        self.step = state["step"]
        extra = state["extra"]
        self.stream.cursor = extra["cursor"]
        self.experts = dict(extra["experts"])
        self.prompt_cache = dict(extra["prompt_cache"])
