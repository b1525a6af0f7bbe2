"""The MetaTuner training loop, in named phases: setup, warm-up of M, warm-up of G, joint training, finish.

``train.steps`` is the run's whole budget of optimizer steps, and one optimizer and one learning-rate
schedule (:mod:`metatuner.training.schedule`) span all phases, so M's static LoRA sees the learning
rates an SFT run of the same budget sees:

1. warm-up of M (``actor_warmup_steps``): SFT of M's static LoRA on (p~, x) -> y, exactly the SFT baseline;
2. warm-up of G (``generator_warmup_steps``): one round of rejection sampling (rollouts on
   ``generator_warmup_queries`` queries fill the expert set D2), then SFT of G on D2. With
   ``overlap_warmups`` (the default) each of these steps also trains M (static LoRA and F) on the task
   loss under p~, on the joint phase's data stream, exactly as a joint step of w/o P does: G's warm-up
   then costs M no steps, and w/o P differs from MetaTuner-J only by the prompt branch;
3. joint training for the remaining steps, minimising per METHOD.md section 4

       L = task(x, y)  +  alpha * reg(x, p*)

   - ``task``: mean NLL of the gold target under M (base + static LoRA + the query's generated LoRA, a
     zero-initialised residual) with the prompt from the frozen copy of the prompt decoder; gradients
     reach F, the shared encoder and (unless ``freeze_static``) the static LoRA;
   - ``reg``: teacher-forced NLL under G of expert outputs ``p*`` sampled from the persistent expert set
     D2 (:mod:`metatuner.training.experts`) on every step it applies; gradients reach the prompt decoder
     and the shared encoder. Rollouts every ``rollout_every`` joint steps offer D2 better outputs.

   ``schedule=joint`` (MetaTuner-J) steps on the sum; ``schedule=alternate`` (MetaTuner-I) steps on the
   task term at even joint steps and on the regularizer at odd ones;
4. finish: one validation with diagnostics (ΔW norm and spread between queries, share of prompts equal
   to p~, prompt length, share cut at the cap, share that stated an answer) and the validation gate: the
   trained predictor serves G's prompts only if they score more than ``train.gate_margin`` above p~ on
   validation (:func:`~metatuner.evaluation.gate.gate_opens`), else p~ (``train.gate``).

The optimizer, its schedule, loss scaling, ``accelerate``, clipping, logging and stop points are those of
the one supervised loop every trained LoRA shares (:class:`~metatuner.training.supervised.SupervisedLoop`):
the warm-ups run through it, and each joint step ends in its optimizer step. Under ``accelerate launch``
each process takes its share of every batch, gradients are averaged across processes in one all-reduce
before each step, and the rollouts' expert outputs are gathered so every process (and the checkpoint)
holds all of D2. Only the main process writes logs and checkpoints. Every loss term is logged by name to
``log.jsonl`` and TensorBoard.

After each optimizer step the loop is at a safe point: on a SIGTERM / SIGINT (:mod:`metatuner.interrupts`)
it saves a checkpoint and stops, and :meth:`Trainer.run` with ``resume`` continues from any checkpoint
(also one inside a warm-up) bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from metatuner.config import RunConfig
from metatuner.models.metatuner import MetaTuner
from metatuner.models.precision import needs_loss_scaling
from metatuner.tasks.base import Example, Task
from metatuner.tasks.leaks import states_answer
from metatuner.training.branch import PromptBranch
from metatuner.training.experts import ExpertSet
from metatuner.training.rollouts import offer
from metatuner.training.stream import DataStream
from metatuner.training.supervised import SupervisedLoop


class Trainer:
    def __init__(self, cfg: RunConfig, mt: MetaTuner, task: Task, train: list[Example], val: list[Example],
                 run_dir: Path | None, progress: bool = True):
        self.cfg, self.tc, self.mt, self.task = cfg, cfg.train, mt, task
        self.train_set, self.val = train, val
        self.by_id = {ex.id: ex for ex in train}
        self.run_dir = run_dir
        self.progress = progress
        # autocast and checkpointing as the config says, also for a MetaTuner built without build_metatuner
        mt.set_precision(self.tc.autocast, self.tc.gradient_checkpointing)
        #: the optimizer, schedule, loss scaling, processes, log and stop points (the warm-ups run in it)
        self.loop = SupervisedLoop(self.tc, run_dir, device_type=mt.actor.device.type, progress=progress,
                                   loss_scaling=needs_loss_scaling(mt.actor) or needs_loss_scaling(mt.generator))
        self.loop.save = self.save
        self.loop.save_every = self.tc.save_every  # the warm-ups save as joint training does
        self.experts = ExpertSet(self.tc.expert_cap, self.tc.expert_margin)  # D2
        self.branch = PromptBranch(self.tc.prompt_branch, self.tc.retire_below, self.tc.retire_window)
        self.prompt_cache: dict[str, str] = {}  # query id -> frozen decoder's cleaned greedy output, until the next sync
        self.joint_start = 0  # the step at which joint training starts
        self.stream = DataStream(train, cfg.data.seed)
        self.finished = False  # the final validation (and gate) has run
        #: wall seconds spent in each part of the joint steps so far (``benchmarks/train_step.py`` reads it):
        #: encode (meta encoder + F), decode (G's prompts), score (rollout rewards), task and reg (forward and
        #: backward of each loss term)
        self.part_seconds: dict[str, float] = {}

    # ---- the loop's state, as the trainer's own ---------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken, over all phases."""
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        self.loop.step = value

    @property
    def on_step(self) -> Callable[[int], None] | None:
        """Called with the step count after every optimizer step (and with 0 before the first)."""
        return self.loop.on_step

    @on_step.setter
    def on_step(self, fn: Callable[[int], None] | None) -> None:
        self.loop.on_step = fn

    @property
    def optimizer(self):
        return self.loop.optimizer

    @property
    def groups(self) -> dict[str, list]:
        return self.loop.groups

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.loop.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.loop.scaler = scaler

    # ---- phases ----------------------------------------------------------------------------------
    def phase_steps(self) -> dict[str, int]:
        """Steps of each phase; G's warm-up needs the prompt branch, else its steps go to joint training."""
        actor, gen = self.tc.warmups()
        if not (self.mt.use_prompt and self.tc.generator_warmup_queries):
            gen = 0
        return {"actor": actor, "generator": gen, "joint": self.tc.steps - actor - gen}

    def run(self, resume: bool = False) -> None:
        """Trains from step 0, or (``resume``) from the newest intact checkpoint, in whichever phase it was
        saved: a stop on SIGTERM may save one in the middle of a warm-up."""
        ckpt = self.loop.latest_checkpoint() if resume else None
        plan = self.phase_steps()
        actor, gen = plan["actor"], plan["generator"]
        self.joint_start = actor + gen
        if actor:
            self.mt.add_static_adapter(self.tc.static_rank, self.tc.static_alpha)
        self.setup_optimizer(self.tc.steps)
        if ckpt is not None:
            self.restore(ckpt)
        else:
            self.loop.open_log(keep_bytes=0)
            self.log({"phase": "plan", "step": 0, **{f"{k}_steps": v for k, v in plan.items()}})
            self.loop.at_step()
        if self.step < self.joint_start:
            if self.step < actor:
                self.warmup_actor(actor, start=self.step)
            if gen:  # a checkpoint at step ``actor`` precedes G's rollouts; one inside G's warm-up follows them
                self.warmup_generator(gen, start=self.step - actor)
            self.save()
            self.loop.stop_point(saved=True)
        self.train_joint()
        self.finish()

    def setup_optimizer(self, total: int, groups: dict[str, list] | None = None) -> None:
        """One AdamW over every trainable component (per-component learning rates) and one schedule over
        ``total`` steps (:meth:`SupervisedLoop.setup`); a phase steps only the parameters its loss reaches."""
        self.loop.setup(total, groups if groups is not None else self.mt.parameter_groups())

    def trainable_params(self) -> int:
        """The parameters the optimizer trains (0 before it is set up)."""
        return self.loop.trainable_params()

    def warmup_actor(self, steps: int, start: int = 0) -> None:
        """M's static LoRA, fine-tuned on (p~, x) -> y for steps ``start``..``steps`` of the run's one schedule:
        exactly what the ``sft`` method does (:mod:`metatuner.methods.trained`) with the same seed and steps.
        ``start``: steps already taken (a resume)."""
        stream = DataStream(self.train_set, self.cfg.data.seed + 1, cursor=start * self.tc.batch_size)

        def loss(batch: list[Example]) -> torch.Tensor:
            prompts = [self.task.instruction_for(ex) for ex in batch]
            return self.mt.answer_nll(self.task, batch, prompts, None, self.tc.max_length).mean()

        self.supervised("warmup_actor", "sft", steps, stream, loss, start)

    def supervised(self, phase: str, name: str, steps: int, stream: DataStream, loss_fn, start: int = 0) -> None:
        """The one supervised loop (:meth:`SupervisedLoop.run`) on this run's optimizer and schedule."""
        self.loop.run(phase, name, steps, stream, loss_fn, start)

    def warmup_generator(self, steps: int, start: int = 0) -> None:
        """One round of rejection sampling: rollouts fill D2 (each query's best sampled output, or "keep
        p~"), then G is fine-tuned on D2 for ``steps`` steps. ``start`` > 0: a resume after the rollouts
        (D2 comes from the checkpoint) and ``start`` steps."""
        queries = DataStream(self.train_set, self.cfg.data.seed + 2).next(self.tc.generator_warmup_queries)
        if start == 0:
            with tqdm(total=len(queries), desc="warm-up G (rollouts)", disable=not self.progress) as bar:
                for i in range(0, len(queries), self.tc.batch_size):
                    stats = self.offer(self.loop.share(queries[i : i + self.tc.batch_size]), None, None)
                    self.branch.record_warmup(stats["improved"], stats["rolled_out"])
                    bar.update(len(queries[i : i + self.tc.batch_size]))
            reason = self.branch.after_warmup()
            if reason is not None:
                # G's warm-up steps become joint steps of w/o P: the run continues exactly as w/o P's would
                self.log({"phase": "warmup_generator", "step": self.step, **self.experts.stats()})
                self.retire(reason)
                self.joint_start = self.step
                return
        ids = list(dict.fromkeys(ex.id for ex in queries))
        stream = DataStream([self.by_id[i] for i in ids], self.cfg.data.seed + 3, cursor=start * self.tc.batch_size)

        trains_m = self.tc.overlap_warmups and (self.mt.has_static or self.mt.use_hypernet)

        def loss(batch: list[Example]) -> dict[str, torch.Tensor]:
            terms = {"generator_sft": self.mt.prompt_nll(self.task, batch,
                                                         [self.experts[ex.id].output for ex in batch]).mean()}
            if trains_m:  # M's share of the step: the task loss under p~, as a joint step of w/o P
                terms["task"] = self.p0_task_loss(self.loop.share(self.stream.next(self.tc.batch_size)))
            return terms

        self.supervised("warmup_generator", "generator_sft", steps, stream, loss, start)
        self.log({"phase": "warmup_generator", "step": self.step, **self.experts.stats()})
        self.mt.sync_frozen_decoder()

    def offer(self, batch: list[Example], factors, extra: list[str] | None, samples=None) -> dict[str, float]:
        """Rolls out ``batch`` (this process's share; may be empty) and offers every process's best outputs to D2."""
        tc = self.tc
        r, gathered = offer(self.experts, self.mt, self.task, batch, factors, tc, self.loop.gather,
                            lambda qid: self.mt.keep_initial_output(self.task, self.by_id[qid]), extra, samples)
        # every process's queries: the prompt branch's evidence is alike in every process
        counts = {"improved": sum(gain > tc.expert_margin for _, _, gain in gathered), "rolled_out": len(gathered)}
        if r is None:
            return counts
        stats = {"reward_initial": r.initial_reward, "reward_gain": sum(r.best_gains) / len(r.best_gains),
                 "leaked": r.leaked, **counts}
        if not math.isnan(r.mean_reward):
            stats["reward_mean"] = r.mean_reward
        return stats

    def train_joint(self) -> None:
        total = self.tc.steps
        if self.tc.freeze_static and self.mt.has_static:
            for p in self.mt.m_lora.adapter_parameters("static"):
                p.requires_grad_(False)
        with tqdm(total=total - self.joint_start, initial=self.step - self.joint_start, desc="joint training",
                  disable=not self.progress) as bar:
            while self.step < total:
                record = self.train_step()
                if self.step % self.tc.log_every == 0:
                    self.log(record)
                if self.branch.active and (reason := self.branch.after_rollouts()) is not None:
                    self.retire(reason)
                if self.tc.eval_every and self.step % self.tc.eval_every == 0 and self.val and self.step < total:
                    self.judge(self.evaluate_val(gate=self.branch.mode == "auto" and self.branch.active))
                saved = self.step % self.tc.save_every == 0 or self.step == total
                if saved:
                    self.save()
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.endswith("_loss")})
                bar.update(1)
                self.loop.stop_point(saved)

    def retire(self, reason: str) -> None:
        """Retires the prompt branch (:mod:`metatuner.training.branch`) from this step on: no rollouts, no
        regularizer, no prompt decoding; the task loss under p~, as w/o P; p~ served."""
        message = self.branch.retire(self.step, reason)
        self.mt.retire_prompt_branch(message)
        self.prompt_cache.clear()
        self.log({"phase": "prompt_branch", "step": self.step, "decision": "retired", "reason": reason,
                  "message": message})
        if self.progress:
            tqdm.write(message)

    def judge(self, record: dict[str, Any]) -> None:
        """A validation with the gate is evidence too: a closed gate retires the branch (``auto``)."""
        if "gate" not in record or not self.branch.active:
            return
        [initial] = [k for k in record if k.startswith("val_") and k.endswith("_initial")]
        reason = self.branch.at_gate(record["gate"], record[initial.removesuffix("_initial")], record[initial])
        if reason is not None:
            self.retire(reason)

    def finish(self) -> None:
        """The final validation (diagnostics, and the prompt gate), saved with the last checkpoint."""
        if self.val and not self.finished:
            self.evaluate_val(gate=True)
            self.finished = True
            self.save()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``grad_accum`` micro-batches); returns the step's log record."""
        tc = self.tc
        start = time.perf_counter()
        record: dict[str, Any] = {"phase": "joint", "step": self.step + 1}
        terms = self.terms_for_step()
        for micro in range(tc.grad_accum):
            batch = self.loop.share(self.stream.next(tc.batch_size))
            losses = self.forward_backward(batch, terms, record, micro)
            for k, v in losses.items():
                record[f"{k}_loss"] = record.get(f"{k}_loss", 0.0) + v.item() / tc.grad_accum
        record.update(self.loop.lrs())
        self.loop.optimizer_step(self.loop.params())
        if (self.step - self.joint_start) % tc.sync_every == 0:
            self.mt.sync_frozen_decoder()
            self.prompt_cache.clear()
        record["experts"] = len(self.experts)
        record["seconds"] = time.perf_counter() - start
        return record

    # ---- one step's pieces -----------------------------------------------------------------------
    def p0_task_loss(self, batch: list[Example], factors=None) -> torch.Tensor:
        """The task loss under p~: mean NLL of the gold targets under M (static LoRA and, with F, the
        queries' generated LoRA; ``factors`` computed here unless given)."""
        mt = self.mt
        if factors is None and mt.use_hypernet:
            factors = mt.factors(mt.encode(self.task, batch))
        prompts = [self.task.instruction_for(ex) for ex in batch]
        return mt.answer_nll(self.task, batch, prompts, factors, self.tc.max_length).mean()

    def terms_for_step(self) -> set[str]:
        """Which loss terms drive this step's update (both for J; alternating for I; the task loss alone once
        the prompt branch has retired)."""
        if not self.branch.active:
            return {"task"}
        if self.tc.schedule == "alternate":
            return {"task"} if (self.step - self.joint_start) % 2 == 0 else {"reg"}
        return {"task", "reg"}

    def forward_backward(self, batch: list[Example], terms: set[str], record: dict[str, Any],
                         micro: int = 0) -> dict[str, torch.Tensor]:
        """Computes the step's loss terms on one micro-batch and back-propagates those in ``terms``.

        Each term is back-propagated as soon as it is computed, so the task loss's graph is freed before
        the regularizer's is built: the gradient of the weighted sum, at the peak memory of one term.
        """
        mt, task, tc = self.mt, self.task, self.tc
        out: dict[str, torch.Tensor] = {}

        def backward(name: str, weight: float = 1.0) -> None:
            self.loop.check_finite(self.step + 1, {name: out[name]})
            if name in terms and out[name].requires_grad:
                self.scaler.scale(weight * out[name] / tc.grad_accum).backward()
            out[name] = out[name].detach()

        do_rollout = mt.use_prompt and (self.step - self.joint_start) % tc.rollout_every == 0
        need_factors = mt.use_hypernet and ("task" in terms or do_rollout)
        with self._timed("encode"):
            factors = mt.factors(mt.encode(task, batch)) if need_factors else None
        outputs = None
        if do_rollout:
            # the rollout's samples and the frozen decoder's greedy prompts still missing: one batched generate
            todo = self._frozen_todo(batch)
            roll = batch[: tc.rollout_queries or len(batch)]  # the queries rolled out: a prefix of the batch
            with self._timed("decode"):
                samples, greedy = mt.generate_mixed(task, roll, tc.rollouts, tc.temperature, todo)
            self.prompt_cache.update({ex.id: mt.clean_output(g) for ex, g in zip(todo, greedy)})
            outputs = [self.prompt_cache[ex.id] for ex in batch]
            n = len(roll)
            detached = {k: (a[:n].detach(), b[:n].detach()) for k, (a, b) in factors.items()} if factors else None
            with self._timed("score"):
                stats = self.offer(roll, detached, outputs[:n], samples)
            self.branch.record_rollout(stats["improved"], stats["rolled_out"])
            record.update(stats)
        elif mt.use_prompt and "task" in terms:
            with self._timed("decode"):
                outputs = self.frozen_outputs(batch)
        if "task" in terms:
            with self._timed("task"):
                if outputs is None:
                    out["task"] = self.p0_task_loss(batch, factors)
                else:
                    prompts = [mt.compose(task, ex, o) for ex, o in zip(batch, outputs)]
                    # an output that states an answer is composed into p~ (METHOD.md section 6): counted here
                    record["prompt_stated_answer"] = record.get("prompt_stated_answer", 0) + sum(
                        states_answer(task, ex, o) for ex, o in zip(batch, outputs))
                    out["task"] = mt.answer_nll(task, batch, prompts, factors, tc.max_length).mean()
                backward("task")
        if "reg" in terms and mt.use_prompt and len(self.experts):
            # a batch from the whole of D2, drawn alike in every process (D2 is gathered), then shared out
            rng = random.Random(self.cfg.seed * 1_000_003 + self.step * 101 + micro)
            ids = self.loop.share(self.experts.sample(tc.reg_batch_size or max(1, tc.batch_size // 2), rng))
            if ids:
                exs = [self.by_id[i] for i in ids]
                with self._timed("reg"):
                    out["reg"] = mt.prompt_nll(task, exs, [self.experts[i].output for i in ids]).mean()
                    backward("reg", tc.alpha)
        return out

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Adds the wall seconds of the block to ``part_seconds[part]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.part_seconds[part] = self.part_seconds.get(part, 0.0) + time.perf_counter() - start

    def frozen_outputs(self, batch: list[Example]) -> list[str]:
        """The frozen decoder's greedy (cleaned) outputs, generated once per query between two syncs.

        The frozen decoder does not change until the next sync, so a miss decodes this batch together with
        every query the stream will bring before that sync (this process's share) in one batched
        generate: decoding on a CPU costs nearly the same per token for 4 rows as for 16.
        """
        todo = self._frozen_todo(batch)
        if todo:
            gens = self.mt.generate_outputs(self.task, todo, frozen=True)
            self.prompt_cache.update({ex.id: self.mt.clean_output(g) for ex, g in zip(todo, gens)})
        return [self.prompt_cache[ex.id] for ex in batch]

    def _frozen_todo(self, batch: list[Example]) -> list[Example]:
        """Queries whose frozen-decoder prompt must be decoded now: this batch's missing ones and, when there
        are any, those the stream brings before the next sync (at most ``prefetch_limit`` in all)."""
        missing = {ex.id: ex for ex in batch if ex.id not in self.prompt_cache}
        if not missing:
            return []
        tc = self.tc
        left = tc.sync_every - (self.step - self.joint_start) % tc.sync_every  # steps until the next sync
        upcoming = self.stream.peek(max(0, left - 1) * tc.batch_size * tc.grad_accum + (tc.grad_accum - 1) * tc.batch_size)
        ahead = {ex.id: ex for ex in self._share_steps(upcoming) if ex.id not in self.prompt_cache and ex.id not in missing}
        return list(missing.values()) + list(ahead.values())[: max(0, tc.prefetch_limit - len(missing))]

    def _share_steps(self, examples: list[Example]) -> list[Example]:
        """This process's share of each consecutive batch of ``examples``."""
        bs = self.tc.batch_size
        return [ex for i in range(0, len(examples), bs) for ex in self.loop.share(examples[i : i + bs])]

    # ---- evaluation, logging, checkpoints ----------------------------------------------------------
    def evaluate_val(self, gate: bool = False) -> dict[str, Any]:
        """Scores the validation split and logs the diagnostics; with ``gate`` (at the end, or where a
        learning curve scores the run) also sets the prompt gate (see
        :func:`~metatuner.training.diagnostics.validate`)."""
        from metatuner.training.diagnostics import validate

        gate_margin = self.tc.gate_margin if gate and self.tc.gate else None
        record = {"phase": "eval", "step": self.step,
                  **validate(self.mt, self.task, self.val, self.cfg.eval.batch_size, gate_margin)}
        if not self.branch.active:
            record.update({"gate": "retired", "prompt_branch": self.branch.message(),
                           "prompt_branch_step": self.branch.retired["step"]})
        self.log(record)
        return record

    def log(self, record: dict[str, Any]) -> None:
        """One record to ``log.jsonl`` and TensorBoard (main process, with a run folder)."""
        self.loop.log(record)

    def save(self) -> None:
        """A checkpoint of the whole run: MetaTuner's trainable state, D2, the data position, the phase."""
        if self.run_dir is None:
            return
        prompt_cache = dict(self.loop.gather(self.prompt_cache.items()))  # each process cached its own share
        if not self.loop.acc.is_main_process:
            return
        extra = {"cursor": self.stream.cursor, "experts": self.experts.state(), "prompt_cache": prompt_cache,
                 "has_static": self.mt.has_static, "joint_start": self.joint_start,
                 "serve_generated": self.mt.serve_generated, "finished": self.finished,
                 "prompt_branch": self.branch.state()}
        self.loop.save_checkpoint(self.mt.trainable_state(), extra)

    def restore(self, path: Path) -> None:
        """Continues from checkpoint ``path`` (optimizer, schedule, RNGs and log through the loop)."""
        tensors, extra = self.loop.restore(path)
        self.mt.load_trainable_state(tensors)
        self.stream.cursor = extra["cursor"]
        self.experts.load_state(extra["experts"])
        self.prompt_cache = dict(extra["prompt_cache"])
        self.joint_start = extra["joint_start"]
        self.mt.serve_generated = extra["serve_generated"]
        self.finished = extra["finished"]
        if "prompt_branch" in extra:
            self.branch.load_state(extra["prompt_branch"])
        if not self.branch.active:
            self.mt.retire_prompt_branch(self.branch.message())
