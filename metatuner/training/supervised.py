"""One supervised LoRA loop: the optimizer, its schedule and the plain fine-tuning loop every trained LoRA shares.

SFT's static LoRA (:class:`~metatuner.models.static.StaticLoRA`), BetterTogether's w steps, BPO's rewriter
and MetaTuner's warm-ups (and its joint steps' optimizer step) all train through one :class:`SupervisedLoop`.
It knows the parameters it steps only as named groups (``encoder``, ``decoder``, ``hypernet``, ``static``:
each trained at its ``train.lr_<name>`` times ``train.lr_scale``) and the loss only as a function of a batch;
it knows nothing of the model that holds them. It owns:

- one AdamW over the groups and one learning-rate schedule (:mod:`metatuner.training.schedule`) over the
  owner's whole budget of steps (MetaTuner's phases share it);
- fp16 loss scaling (a ``GradScaler``, disabled for float32 and bf16, where it passes the loss through);
- ``accelerate``: each process takes its share of every batch, gradients are averaged in one all-reduce
  before each step (:mod:`metatuner.training.collective`), the main process alone logs and checkpoints;
- per-group gradient clipping, non-finite loss checks, the step count and ``on_step`` (learning curves);
- ``log.jsonl`` and TensorBoard (:class:`~metatuner.training.logbook.Logbook`);
- safe points between steps: on SIGTERM / SIGINT (:mod:`metatuner.interrupts`) the owner's ``save`` runs
  and :class:`~metatuner.interrupts.Stopped` is raised; checkpoints hold the owner's tensors and data plus
  the optimizer, schedule, RNGs, log length and loss scale (:mod:`metatuner.training.checkpoint`), and
  :meth:`SupervisedLoop.restore` continues from one bit for bit.

Usage::

    loop = SupervisedLoop(cfg.train, run_dir, device_type="cpu")
    loop.setup(steps, {"static": params})
    loop.save = lambda: loop.save_checkpoint(model_state(), {"cursor": stream.cursor})
    loop.run("warmup_actor", "sft", steps, stream, lambda batch: nll(batch).mean())
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from metatuner import interrupts
from metatuner.errors import MetatunerError
from metatuner.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from metatuner.training.collective import agreed_signal, average_gradients
from metatuner.training.logbook import Logbook
from metatuner.training.schedule import make_scheduler
from metatuner.training.stream import DataStream

#: the parameter groups a loop knows, each trained at ``train.<field>`` times ``train.lr_scale``
LEARNING_RATES = {"encoder": "lr_encoder", "decoder": "lr_decoder", "hypernet": "lr_hypernet", "static": "lr_static"}

#: a loss function: a batch -> the loss, or a dict of named terms whose sum is stepped on
LossFn = Callable[[list], "torch.Tensor | dict[str, torch.Tensor]"]


class SupervisedLoop:
    """The optimizer, schedule, loss scaling, process group, log and stop points of one training run.

    Args:
        tc: the ``train`` section (:class:`~metatuner.config.TrainConfig`): learning rates, ``lr_scale``,
            schedule, ``weight_decay``, ``max_grad_norm``, ``batch_size``.
        run_dir: where ``log.jsonl`` and checkpoints go (None: nowhere).
        device_type: the device type the parameters live on (``cpu`` runs accelerate on the CPU).
        loss_scaling: fp16 activations: scale the loss before backward, unscale before clipping.
        progress: a tqdm bar per :meth:`run`.
    """

    def __init__(self, tc, run_dir: Path | None, *, device_type: str = "cpu", loss_scaling: bool = False,
                 progress: bool = True):
        self.tc, self.run_dir, self.progress = tc, run_dir, progress
        # fp16 activations: the loss is scaled before backward and the gradients unscaled before clipping (a
        # disabled scaler, for float32 and bf16, passes the loss through unchanged)
        self.scaler = torch.amp.GradScaler(device_type, enabled=loss_scaling)
        self.acc = Accelerator(cpu=device_type == "cpu")
        if tc.batch_size < self.acc.num_processes:
            raise MetatunerError(
                f"train.batch_size={tc.batch_size} is smaller than the {self.acc.num_processes} processes: "
                "every process needs at least one query of each batch"
            )
        self.groups: dict[str, list[torch.nn.Parameter]] = {}
        self.optimizer = self.scheduler = None
        self.step = 0  # optimizer steps taken
        self.on_step: Callable[[int], None] | None = None  # called with the step count after every optimizer step
        #: what a stop point saves before it stops (the owner's checkpoint); None: nothing is saved
        self.save: Callable[[], None] | None = None
        #: :meth:`run` also saves (``save``) after every this many optimizer steps (0: only at stop points), so a
        #: run killed inside a long warm-up loses at most this many steps
        self.save_every = 0
        self._logbook: Logbook | None = None

    # ---- optimizer and schedule ------------------------------------------------------------------
    def setup(self, total: int, groups: dict[str, list[torch.nn.Parameter]]) -> None:
        """One AdamW over the named ``groups`` (per-group learning rates, see :data:`LEARNING_RATES`) and one
        schedule over ``total`` steps; a step moves only the parameters its loss reaches."""
        self.groups = groups
        tc = self.tc
        lrs = {name: getattr(tc, field) * tc.lr_scale for name, field in LEARNING_RATES.items()}
        param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps]
        opt = torch.optim.AdamW(param_groups, weight_decay=tc.weight_decay)
        # the scheduler stays unwrapped: accelerate's wrapper would step it once per process, but each process
        # here takes a share of one batch, so one optimizer step is one scheduler step
        self.optimizer, self.scheduler = self.acc.prepare(opt), make_scheduler(opt, tc, total)

    def trainable_params(self) -> int:
        """The parameters the optimizer trains (0 before it is set up)."""
        if self.optimizer is None:
            return 0
        return sum({id(p): p.numel() for g in self.optimizer.param_groups for p in g["params"]}.values())

    def params(self) -> list[torch.nn.Parameter]:
        """Every parameter of every group, in order."""
        return [p for ps in self.groups.values() for p in ps]

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, phase: str, name: str, steps: int, stream: DataStream, loss_fn: LossFn, start: int = 0) -> None:
        """Optimizer steps ``start``..``steps`` on batches of ``stream`` (this process's share of each).

        ``loss_fn`` returns the loss (logged as ``<name>_loss``), or a dict of named terms whose sum is
        stepped on (each logged as ``<term>_loss``); each step's record is logged under ``phase``. A stop
        request is honoured between two of its steps (after the last one, the caller's own safe point
        follows), so a checkpoint saved by a stop inside the loop is never at its end; nor is one of the saves
        every ``save_every`` steps (:meth:`periodic_save`).
        """
        params = self.params()
        # closed also on an error, so the error's line starts on a line of its own
        with tqdm(total=steps, initial=start, desc=phase.replace("_", " "), disable=not self.progress) as bar:
            for k in range(start, steps):
                began = time.perf_counter()
                terms = loss_fn(self.share(stream.next(self.tc.batch_size)))
                terms = terms if isinstance(terms, dict) else {name: terms}
                self.check_finite(self.step + 1, terms)
                self.scaler.scale(sum(terms.values())).backward()
                lrs = self.lrs()
                self.optimizer_step(params)
                self.log({"phase": phase, "step": self.step, **{f"{t}_loss": v.item() for t, v in terms.items()},
                          **lrs, "seconds": time.perf_counter() - began})
                bar.update(1)
                if k + 1 < steps:
                    self.stop_point(self.periodic_save())

    def periodic_save(self) -> bool:
        """Saves (``save``) when the step count is a multiple of ``save_every``; whether it saved."""
        if self.save is None or not self.save_every or self.step % self.save_every:
            return False
        self.save()
        return True

    def lrs(self) -> dict[str, float]:
        """The learning rate each group is stepped with now (logged with the step)."""
        return {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}

    def optimizer_step(self, params: list[torch.Tensor]) -> None:
        """Averages the gradients of ``params`` across processes, unscales and clips them, steps the optimizer
        and the schedule, and counts the step (``on_step`` follows)."""
        average_gradients(self.acc, params)
        scaled = self.scaler.is_enabled() and any(p.grad is not None for p in params)
        if scaled:
            self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        self.clip(params)
        if scaled:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed fp16 (the scale then shrinks)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.at_step()

    def at_step(self) -> None:
        """Tells ``on_step`` the step count (also with 0, before the first step)."""
        if self.on_step is not None:
            self.on_step(self.step)

    def clip(self, params) -> None:
        """Clips each group's gradient on its own, so one component's large gradients (G's regularizer) never
        shrink another's step (one joint norm would)."""
        if self.tc.max_grad_norm <= 0:
            return
        chosen = {id(p) for p in params}
        for group in self.groups.values():
            grads = [p for p in group if id(p) in chosen and p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.tc.max_grad_norm)

    def check_finite(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """A non-finite loss term stops training with an error naming the last good checkpoint."""
        bad = {k: v.item() for k, v in losses.items() if not torch.isfinite(v).all()}
        if bad:
            last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
            raise MetatunerError(
                f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); training "
                f"stopped; last good checkpoint: {last or 'none'} (lower the learning rates or check the data)"
            )

    def stop_point(self, saved: bool = False) -> None:
        """A safe point: after a SIGTERM / SIGINT (in any process), ``save`` (unless a checkpoint was just
        saved) and raise :class:`~metatuner.interrupts.Stopped`."""
        signum = agreed_signal(self.acc, interrupts.requested())
        if not signum:
            return
        if not saved and self.save is not None:
            self.save()
        where = f"; checkpoint saved in {self.run_dir / 'checkpoints'}" if self.run_dir is not None else ""
        raise interrupts.Stopped(signum, f"at step {self.step}{where}")

    # ---- several processes (accelerate launch) ----------------------------------------------------
    def share(self, batch: list) -> list:
        """This process's share of a batch every process drew alike (the same seeded stream)."""
        return batch[self.acc.process_index :: self.acc.num_processes]

    def gather(self, items) -> list:
        """Items such as ``(query id, output, gain)`` from every process (collective: every process calls it)."""
        items = list(items)
        return list(gather_object(items)) if self.acc.num_processes > 1 else items

    # ---- log and checkpoints ---------------------------------------------------------------------
    def open_log(self, keep_bytes: int | None = None) -> None:
        """Opens ``log.jsonl`` (main process): cut to ``keep_bytes`` (0 for a fresh start, a checkpoint's
        length on resume), or appended to as it is (None)."""
        if self.run_dir is not None and self.acc.is_main_process:
            if self._logbook is not None:
                self._logbook.close()
            self._logbook = Logbook(self.run_dir, keep_bytes)

    def log(self, record: dict[str, Any]) -> None:
        """Writes one record (main process, with a run folder)."""
        if self.run_dir is None or not self.acc.is_main_process:
            return
        if self._logbook is None:
            self.open_log()
        self._logbook.write(record)

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """A checkpoint at the current step (main process, with a run folder): the owner's ``tensors`` and
        ``extra`` data, plus the optimizer, schedule, RNGs, the log's length and the loss scale."""
        if self.run_dir is None or not self.acc.is_main_process:
            return
        extra = {**extra, "log_bytes": self._logbook.sync() if self._logbook is not None else 0}
        if self.scaler.is_enabled():
            extra["grad_scaler"] = self.scaler.state_dict()
        save_checkpoint(self.run_dir, self.step, tensors, self.optimizer, self.scheduler, extra)

    def latest_checkpoint(self) -> Path:
        """The newest intact checkpoint of the run folder, to resume from; a one-line error when there is none."""
        ckpt = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if ckpt is None:
            where = self.run_dir / "checkpoints" if self.run_dir is not None else "a run without a folder"
            raise MetatunerError(f"resume: no checkpoint in {where}", cli=f"--resume: no checkpoint in {where}")
        return ckpt

    def restore(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Restores optimizer, schedule, RNGs, step, loss scale and the log (cut to the checkpoint's length)
        from checkpoint ``path``; returns the owner's tensors and extra data."""
        tensors, state = load_checkpoint(path, self.optimizer, self.scheduler)
        extra = state["extra"]
        self.open_log(keep_bytes=extra.get("log_bytes"))
        self.step = state["step"]
        if "grad_scaler" in extra:
            self.scaler.load_state_dict(extra["grad_scaler"])
        return tensors, extra
