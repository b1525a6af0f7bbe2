"""Building a MetaTuner (G, F and M) from a run config: the one constructor every caller shares.

It lives in ``training`` (which may import ``models`` and ``config``), so the methods, the recipes and
the benchmarks all build it from here and no lower layer reaches up into ``recipes``.
"""

from __future__ import annotations

from metatuner.config import RunConfig
from metatuner.models.loading import load_model
from metatuner.models.metatuner import MetaTuner


def build_metatuner(cfg: RunConfig, model, tokenizer) -> MetaTuner:
    """G, F and M from the config; G shares M's base weights unless ``generator.model`` names another. Its
    forward passes autocast and its blocks are checkpointed as ``train.autocast`` and
    ``train.gradient_checkpointing`` say."""
    generator = gen_tok = None
    if cfg.generator.model not in (None, cfg.model.name):
        generator, gen_tok = load_model(cfg.generator.model, cfg.model.dtype, cfg.model.device)
    ablation = cfg.train.ablation
    mt = MetaTuner(
        model, tokenizer, cfg.generator, cfg.hypernet, generator=generator, gen_tokenizer=gen_tok,
        no_share=ablation == "no_share", use_hypernet=ablation != "no_hypernet", use_prompt=ablation != "no_prompt",
    )
    mt.set_precision(cfg.train.autocast, cfg.train.gradient_checkpointing)
    return mt
