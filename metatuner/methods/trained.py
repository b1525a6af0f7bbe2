"""Trained methods: static LoRA SFT and MetaTuner (J or I schedule, and its ablations, via the config).

Both run on MetaTuner's training loop, so SFT here is exactly MetaTuner's warm-up of M, and both are
scored through the same :class:`MetaTunerPredictor` path (with the prompt and hypernetwork branches
switched off for SFT, it answers with ``p~`` and the static LoRA only).
"""

from __future__ import annotations

from pathlib import Path

from metatuner.methods.base import METHODS, Method
from metatuner.tasks.base import Example, Task


class _Trained(Method):
    """A method fitted by :class:`~metatuner.training.trainer.Trainer`."""

    needs_training = True

    def trained(self, trainer, step: int, predictor) -> None:
        self.trainable_params = trainer.trainable_params()  # what a learning-curve point at ``step`` cost
        self.at_step(step, predictor)

    def budget(self) -> int:
        return self.config.train.steps


@METHODS.register("sft")
class SFT(_Trained):
    """Static LoRA on M fine-tuned on (p~, x) -> y for train.steps steps (MetaTuner's warm-up of M alone)."""

    def fit(self, task: Task, train: list[Example], val: list[Example]):
        from metatuner.models.metatuner import MetaTuner
        from metatuner.training.predictor import MetaTunerPredictor
        from metatuner.training.trainer import Trainer

        cfg = self.config
        mt = MetaTuner(self.model, self.tokenizer, cfg.generator, cfg.hypernet, use_hypernet=False, use_prompt=False)
        trainer = Trainer(cfg, mt, task, train, val, self.run_dir)
        trainer.on_step = lambda step: self.trained(trainer, step, lambda: MetaTunerPredictor(mt, name="sft"))
        trainer.warmup_actor(cfg.train.steps)
        self.trainable_params = trainer.trainable_params()
        return MetaTunerPredictor(mt, name="sft")


@METHODS.register("metatuner")
class MetaTunerMethod(_Trained):
    """MetaTuner: per-query prompt (G) and per-query LoRA (F); schedule and ablation from train.*."""

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

        trainer.on_step = lambda step: self.trained(trainer, step, now)
        trainer.run()
        self.trainable_params = trainer.trainable_params()
        return MetaTunerPredictor(mt, name="metatuner")
