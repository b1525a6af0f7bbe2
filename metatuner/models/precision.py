"""Mixed precision: the frozen base runs its forward passes under ``torch.autocast``.

``train.autocast`` picks the autocast dtype (:func:`autocast_dtype`): ``auto`` turns it on exactly when
the base's weights are half precision (``model.dtype=bfloat16`` / ``float16``), so a float32 base runs
the code it always ran; ``bf16`` / ``fp16`` force it (also on a float32 base: classic mixed precision,
float32 weights and half-precision matmuls); ``none`` never (not ``off``, which YAML reads as false).
What stays float32 whatever the setting:

- trainable weights (LoRA adapters, F) and so their AdamW state: they are created in float32
  (:mod:`metatuner.models.lora`, :mod:`metatuner.models.hypernet`) and autocast never changes a
  parameter, it only casts copies for an op;
- the LoRA terms of a wrapped layer: :class:`~metatuner.models.lora.LoRALinear` computes them with
  autocast off, in float32, and adds them into the half-precision base output;
- the losses: token log-probabilities are taken from float32 logits.

Where activations are fp16 (fp16 autocast, or an fp16 base without it) the trainer scales the loss
(``torch.amp.GradScaler``, :func:`needs_loss_scaling`): fp16's range would flush small gradients to zero.
bf16 has float32's range and needs no scaling.

:func:`enable_autocast` wraps the ``forward`` of the causal LM, of its decoder (which the library also
calls on its own: the prefill, teacher-forced scoring) and of its output head, the way ``accelerate``
wraps a prepared model. Every caller then gets autocast without knowing of it: the trainer's task loss,
regularizer, encoder and rollout scoring, generation and evaluation. Backward passes run outside it,
as autocast asks. The device type is the model's (bf16 autocast runs on the CPU too).
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from metatuner.errors import MetatunerError

#: ``train.autocast`` values that force a dtype
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_MODES = ("auto", "none", *AUTOCAST_DTYPES)
_HALF = (torch.bfloat16, torch.float16)
_MARK = "_metatuner_autocast"  # set on a module whose forward runs under autocast: the dtype


def autocast_dtype(mode: str, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype forward passes autocast to under ``train.autocast=mode`` for a base of ``weights_dtype``.

    Args:
        mode: ``auto`` (the base's dtype if it is bf16 / fp16, else none), ``none``, ``bf16`` or ``fp16``.
        weights_dtype: the frozen base's parameter dtype.

    Returns:
        ``torch.bfloat16`` / ``torch.float16``, or None for no autocast.
    """
    if mode not in AUTOCAST_MODES:
        raise MetatunerError(f"unknown autocast mode {mode!r}; available: {', '.join(AUTOCAST_MODES)}")
    if mode == "auto":
        return weights_dtype if weights_dtype in _HALF else None
    return AUTOCAST_DTYPES.get(mode)


def enable_autocast(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Runs every forward of ``model`` (a causal LM), its decoder and its output head under
    ``torch.autocast(<model's device type>, dtype)``; ``dtype=None`` restores the plain forwards.
    Calling it again replaces the earlier setting."""
    device_type = next(model.parameters()).device.type
    modules = {id(m): m for m in (model, model.get_decoder(), model.get_output_embeddings()) if m is not None}
    for module in modules.values():
        if _MARK in module.__dict__:  # wrapped before: back to the class's own forward
            del module.forward
            delattr(module, _MARK)
        if dtype is None:
            continue
        module.forward = types.MethodType(_autocast(module.forward.__func__, device_type, dtype), module)
        setattr(module, _MARK, dtype)


def _autocast(forward, device_type: str, dtype: torch.dtype):
    """``forward(self, ...)`` under autocast. It is bound to the module as a method, not closed over a bound
    method, so that a deep copy of the model runs its own weights."""

    @functools.wraps(forward)  # keeps the signature, which ``generate`` inspects for the arguments it passes
    def wrapped(self, *args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(self, *args, **kwargs)

    return wrapped


def autocast_of(model: nn.Module) -> torch.dtype | None:
    """The dtype ``model``'s forward autocasts to (None: no autocast)."""
    return model.__dict__.get(_MARK)


def needs_loss_scaling(model: nn.Module) -> bool:
    """Whether ``model``'s activations are float16 (its autocast dtype, else its weights' dtype): then the loss is
    scaled before backward so that small gradients survive fp16's range."""
    return (autocast_of(model) or next(model.parameters()).dtype) is torch.float16
