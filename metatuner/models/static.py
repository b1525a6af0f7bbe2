"""A static LoRA on M: the model the SFT baseline and BetterTogether's w steps fine-tune.

M (frozen) plus one LoRA adapter named ``static`` on the target modules of the given layers, held in the
project's :class:`~metatuner.models.lora.LoRAModel`, so its tensors, their names and their initial values
are exactly those of MetaTuner's static LoRA (:meth:`MetaTuner.add_static_adapter
<metatuner.models.metatuner.MetaTuner.add_static_adapter>`): ``static.<layer>.<module>.A`` / ``.B`` in a
checkpoint, A random (PEFT's init), B zero. Nothing here knows of G, F or a training loop:

- :meth:`StaticLoRA.answer_nll`: per-row mean NLL of each example's target under M with the adapter on,
  the inputs rendered by ``render`` (default: the task's chat messages with the given instruction; a
  BetterTogether program passes one that puts its demos before the query);
- :meth:`StaticLoRA.parameter_groups` (``{"static": [...]}``) for
  :class:`~metatuner.training.supervised.SupervisedLoop`, :meth:`state` / :meth:`load_state` for
  checkpoints (a checkpoint of a whole MetaTuner loads too: only its ``static.*`` tensors are read);
- :meth:`StaticLoRA.active`: the context in which M answers with the adapter on (a predictor's weights).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import encode_pairs, render_chat, token_logprobs
from metatuner.models.lora import LoRAModel
from metatuner.models.precision import autocast_dtype, enable_autocast
from metatuner.models.recompute import set_gradient_checkpointing
from metatuner.tasks.base import Example, Task

#: renders each example's model input (a string) from the task, the examples and one instruction per example
Render = Callable[[Task, list[Example], list[str]], list[str]]

ADAPTER = "static"


def chat_inputs(tokenizer) -> Render:
    """The default rendering: the task's chat messages with the instruction, in the tokenizer's template."""
    def render(task: Task, examples: list[Example], prompts: list[str]) -> list[str]:
        return [render_chat(tokenizer, task.messages(p, ex)) for p, ex in zip(prompts, examples)]

    return render


class StaticLoRA:
    """M plus one static LoRA on ``targets`` in ``layers`` (all layers when None); see the module docstring.

    The adapter is created by :meth:`reset` (a fresh one, drawing A from torch's RNG), not by the constructor.
    """

    def __init__(self, model, tokenizer, targets: list[str], layers=None, rank: int = 8, alpha: float = 16.0,
                 render: Render | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.lora = LoRAModel(model)
        layers = layers if layers is not None else range(self.lora.num_layers)
        bad = [i for i in layers if not 0 <= i < self.lora.num_layers]
        if bad:
            raise MetatunerError(f"static LoRA layer {bad[0]} is not in the model; allowed: 0..{self.lora.num_layers - 1}")
        self.sites = self.lora.select(list(targets), layers)
        self.rank, self.alpha = rank, alpha
        self.render = render or chat_inputs(tokenizer)
        self.has_adapter = False

    @classmethod
    def from_config(cls, model, tokenizer, cfg, render: Render | None = None) -> StaticLoRA:
        """The static LoRA of a run config: on the sites of ``hypernet.targets`` / ``hypernet.layers`` (where
        MetaTuner puts its static LoRA) at ``train.static_rank`` / ``train.static_alpha``; forward passes
        autocast and blocks are recomputed as ``train.autocast`` / ``train.gradient_checkpointing`` say."""
        static = cls(model, tokenizer, cfg.hypernet.targets, cfg.hypernet.layers, cfg.train.static_rank,
                     cfg.train.static_alpha, render)
        static.set_precision(cfg.train.autocast, cfg.train.gradient_checkpointing)
        return static

    def reset(self) -> None:
        """A fresh adapter (A random, B zero: M answers as its base), replacing any earlier one."""
        kinds = sorted({s.kind for s in self.sites})
        self.lora.add_adapter(ADAPTER, kinds, sorted({s.layer for s in self.sites}), self.rank, self.alpha)
        self.has_adapter = True

    def set_precision(self, autocast: str = "auto", gradient_checkpointing: bool = False) -> None:
        """Autocast and gradient checkpointing of M's forward passes (see
        :meth:`MetaTuner.set_precision <metatuner.models.metatuner.MetaTuner.set_precision>`)."""
        enable_autocast(self.model, autocast_dtype(autocast, next(self.model.parameters()).dtype))
        set_gradient_checkpointing(self.model, self.lora, gradient_checkpointing)

    # ---- parameters and state --------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's trainable tensors (A and B of every site)."""
        return list(self.lora.adapter_parameters(ADAPTER)) if self.has_adapter else []

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """``{"static": parameters}``: the group :class:`~metatuner.training.supervised.SupervisedLoop` trains
        at ``train.lr_static``."""
        return {ADAPTER: self.parameters()}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by site (``<layer>.<module>.A`` / ``.B``), live (not copies); none before
        :meth:`reset`."""
        return self.lora.adapter_state(ADAPTER) if self.has_adapter else {}

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: ``static.<site>.A`` / ``.B``, the names MetaTuner gives them."""
        return {f"{ADAPTER}.{k}": v for k, v in self.adapter_state().items()}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Loads :meth:`state`'s tensors; other tensors (a MetaTuner checkpoint's G and F) are ignored."""
        if not self.has_adapter:
            self.reset()
        own = self.state()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise MetatunerError(f"checkpoint lacks {len(missing)} static LoRA tensors (e.g. {missing[0]}); "
                                 "wrong config?")
        for k, v in own.items():
            v.copy_(tensors[k])

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter's tensors by site (:meth:`load_snapshot` puts it back)."""
        return {k: v.detach().clone() for k, v in self.adapter_state().items()}

    @torch.no_grad()
    def load_snapshot(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Copies a :meth:`snapshot` into the adapter (programs that share one adapter slot swap theirs in)."""
        for k, v in self.adapter_state().items():
            v.copy_(snapshot[k])

    # ---- M with the adapter ----------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Context in which M answers with the adapter on (outside it M is its base)."""
        with self.lora.use((ADAPTER,) if self.has_adapter else ()):
            yield

    def answer_nll(self, task: Task, examples: list[Example], prompts: list[str], max_length: int = 512,
                   render: Render | None = None) -> torch.Tensor:
        """Per-row mean NLL of each example's target (plus EOS) under M with the adapter, the input rendered
        from the instruction ``prompts[i]`` by ``render`` (default: the one given at construction); a row
        longer than ``max_length`` tokens loses the start of its context (never its target)."""
        eos = self.tokenizer.eos_token or ""
        inputs = (render or self.render)(task, examples, prompts)
        batch = encode_pairs(self.tokenizer, inputs, [ex.target + eos for ex in examples], self.model.device,
                             max_length)
        with self.active():
            total, count = token_logprobs(self.model, batch)
        return -total / count.clamp(min=1)
