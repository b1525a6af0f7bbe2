"""Trained methods: static LoRA SFT and MetaTuner (J or I schedule, and its ablations, via the config).

Both run on MetaTuner's training loop, so SFT here is exactly MetaTuner's warm-up of M, and both are
scored through the same :class:`MetaTunerPredictor` path (with the prompt and hypernetwork branches
switched off for SFT, it answers with ``p~`` and the static LoRA only).
"""

from __future__ import annotations

from pathlib import Path

from metatuner.methods.base import METHODS, Method
from metatuner.tasks.base import Example, Task


@METHODS.register("sft")
class SFT(Method):
    """Static LoRA on M fine-tuned on (p~, x) -> y for train.steps steps (MetaTuner's warm-up of M alone)."""

    needs_training = True

    def fit(self, task: Task, train: list[Example], val: list[Example]):
        from metatuner.models.metatuner import MetaTuner
        from metatuner.training.predictor import MetaTunerPredictor
        from metatuner.training.trainer import Trainer

        cfg = self.config
        mt = MetaTuner(self.model, self.tokenizer, cfg.generator, cfg.hypernet, use_hypernet=False, use_prompt=False)
        trainer = Trainer(cfg, mt, task, train, val, self.run_dir)
        trainer.on_step = lambda step: self.at_step(step, lambda: MetaTunerPredictor(mt, name="sft"))
        trainer.warmup_actor(cfg.train.steps)
        return MetaTunerPredictor(mt, name="sft")

    def budget(self) -> int:
        return self.config.train.steps


@METHODS.register("metatuner")
class MetaTunerMethod(Method):
    """MetaTuner: per-query prompt (G) and per-query LoRA (F); schedule and ablation from train.*."""

    needs_training = True

    def fit(self, task: Task, train: list[Example], val: list[Example]):
        from metatuner.training.build import build_metatuner
        from metatuner.training.predictor import MetaTunerPredictor
        from metatuner.training.trainer import Trainer

        mt = build_metatuner(self.config, self.model, self.tokenizer)
        trainer = Trainer(self.config, mt, task, train, val, self.run_dir)

        def now() -> MetaTunerPredictor:
            if val and mt.use_prompt:
                trainer.evaluate_val(gate=True)  # what a run stopped here would serve: its gate decides
            return MetaTunerPredictor(mt, name="metatuner")

        trainer.on_step = lambda step: self.at_step(step, now)
        trainer.run()
        return MetaTunerPredictor(mt, name="metatuner")

    def budget(self) -> int:
        return self.config.train.steps
