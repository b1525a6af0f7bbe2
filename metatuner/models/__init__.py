"""Models: loading, per-row LoRA, the LoRA hypernetwork and the prompt generator."""

from metatuner.models.loading import load_model, load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
