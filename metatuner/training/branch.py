"""The prompt branch's own evidence, and its decision to retire (METHOD.md section 6, ``train.prompt_branch``).

On a small model, G's rewrites rarely beat p~: rollouts keep p~ as the expert, G learns to copy it, and
the validation gate serves p~. The branch then costs rollouts, a regularizer and prompt decoding on every
step and buys nothing. With ``prompt_branch=auto`` it watches three kinds of evidence, all from training
data and validation (never test):

1. G's warm-up rollouts: the share of warm-up queries whose best sample beat p~ by ``expert_margin``;
2. the joint phase's rollouts: the same share over the last ``retire_window`` rolled-out queries;
3. a validation with the gate (``train.eval_every``): G's prompts must score more than ``gate_margin``
   above p~ (:func:`~metatuner.evaluation.gate.gate_opens`).

A share below ``retire_below``, or a closed gate, retires the branch for the rest of the run: the trainer
then trains F, the shared encoder and the static LoRA on the task loss under p~, exactly as w/o P does,
and the trained predictor serves p~. ``prompt_branch=always`` records the evidence and never retires.

:class:`PromptBranch` holds only numbers and the decision, so it is saved with every checkpoint and a
resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptBranch:
    """Evidence and decision. ``mode``: ``auto`` or ``always``; ``below``: the share under which it retires;
    ``window``: the joint-phase queries judged at a time."""

    mode: str = "auto"
    below: float = 0.1
    window: int = 32
    #: ``{"step", "reason"}`` once retired
    retired: dict[str, Any] | None = None
    #: (improved, queries) of G's warm-up rollouts
    warmup: list[int] = field(default_factory=lambda: [0, 0])
    #: (improved, queries) per joint-phase rollout, oldest first; trimmed to the newest ``window`` queries
    recent: list[list[int]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.retired is None

    # ---- evidence ----------------------------------------------------------------------------------
    def record_warmup(self, improved: int, queries: int) -> None:
        self.warmup = [self.warmup[0] + improved, self.warmup[1] + queries]

    def record_rollout(self, improved: int, queries: int) -> None:
        self.recent.append([improved, queries])
        while sum(q for _, q in self.recent[1:]) >= self.window:  # keep just enough to cover the window
            self.recent.pop(0)

    # ---- decisions: each returns the reason to retire, or None ---------------------------------------
    def after_warmup(self) -> str | None:
        improved, queries = self.warmup
        if self.mode != "auto" or not queries or improved / queries >= self.below:
            return None
        return f"{improved} of {queries} warm-up queries improved on p~"

    def after_rollouts(self) -> str | None:
        improved, queries = (sum(x) for x in zip(*self.recent)) if self.recent else (0, 0)
        if self.mode != "auto" or queries < self.window or improved / queries >= self.below:
            return None
        return f"{improved} of the last {queries} rolled-out queries improved on p~"

    def at_gate(self, served: str, generated: float, initial: float) -> str | None:
        if self.mode != "auto" or served != "initial":
            return None
        return f"the validation gate served p~ (score {generated:.3f} with G's prompts, {initial:.3f} with p~)"

    def retire(self, step: int, reason: str) -> str:
        """Records the decision; returns the one-line message the log, summary and report show."""
        self.retired = {"step": step, "reason": reason}
        return self.message()

    def message(self) -> str | None:
        if self.retired is None:
            return None
        return f"prompt branch retired at step {self.retired['step']}: {self.retired['reason']}"

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"retired": self.retired, "warmup": list(self.warmup), "recent": [list(x) for x in self.recent]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.retired = state["retired"]
        self.warmup = list(state["warmup"])
        self.recent = [list(x) for x in state["recent"]]
