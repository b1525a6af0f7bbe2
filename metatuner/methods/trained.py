"""Trained methods: static LoRA SFT and MetaTuner (J or I schedule, and its ablations, via the config).

SFT trains a :class:`~metatuner.models.static.StaticLoRA` (M and one static LoRA, no G or F) with
:func:`~metatuner.training.sft.fine_tune`, the one supervised loop MetaTuner's warm-up of M also runs in,
from the same initial values for the same seed, so SFT here is exactly that warm-up; it answers with
``p~`` and the static LoRA (:class:`~metatuner.training.predictor.StaticLoRAPredictor`). MetaTuner trains
through :class:`~metatuner.training.trainer.Trainer` and answers with :class:`MetaTunerPredictor`.
"""

from __future__ import annotations

from metatuner.methods.base import METHODS, Method
from metatuner.tasks.base import Example, Task


class _Trained(Method):
    """A method trained for ``train.steps`` optimizer steps."""

    needs_training = True

    def trained(self, trainer, step: int, predictor) -> None:
        self.trainable_params = trainer.trainable_params()  # what a learning-curve point at ``step`` cost
        self.at_step(step, predictor)

    def budget(self) -> int:
        return self.config.train.steps


@METHODS.register("sft")
class SFT(_Trained):
    """Static LoRA on M fine-tuned on (p~, x) -> y for train.steps steps (exactly MetaTuner's warm-up of M)."""

    resumable = True

    def fit(self, task: Task, train: list[Example], val: list[Example]):
        from metatuner.models.metatuner import draw_like_construction
        from metatuner.models.static import StaticLoRA
        from metatuner.training.predictor import StaticLoRAPredictor
        from metatuner.training.sft import fine_tune

        cfg = self.config
        # the same seed gives the static LoRA the initial values MetaTuner's warm-up of M starts from
        draw_like_construction(self.model, cfg.generator, cfg.hypernet)
        static = StaticLoRA.from_config(self.model, self.tokenizer, cfg)

        def on_step(step: int) -> None:
            self.trainable_params = sum(p.numel() for p in static.parameters())  # what a curve point cost
            self.at_step(step, lambda: StaticLoRAPredictor(static))

        loop = fine_tune(static, cfg, task, train, cfg.train.steps, self.run_dir, on_step=on_step,
                         save_every=cfg.train.save_every, resume=self.resume)
        self.trainable_params = loop.trainable_params()
        return StaticLoRAPredictor(static)


@METHODS.register("metatuner")
class MetaTunerMethod(_Trained):
    """MetaTuner: per-query prompt (G) and per-query LoRA (F); schedule and ablation from train.*."""

    resumable = True

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
        trainer.run(resume=self.resume)
        self.trainable_params = trainer.trainable_params()
        return MetaTunerPredictor(mt, name="metatuner")
