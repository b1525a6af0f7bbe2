"""Gradient checkpointing of a frozen base that carries LoRA adapters (``train.gradient_checkpointing``).

A checkpointed decoder block keeps only its input for the backward pass and runs its forward a second
time there, so a training step holds one block's activations at a time instead of every block's: less
memory for one more forward pass. It is transformers' own mechanism
(``activation_checkpointing_enable``, the successor of ``gradient_checkpointing_enable``), with:

- ``use_reentrant=False``: the gradient reaches the LoRA weights inside a block although the block's
  input (from a frozen embedding) does not require grad, so no input-grad hook is needed (it is
  removed: it would make the embeddings' output require grad in every pass);
- a ``context_fn`` that replays the adapters the forward saw: the backward pass runs after
  :meth:`~metatuner.models.lora.LoRAModel.use` has been left (per-row factors and active adapters gone),
  so the recomputation restores them (:meth:`~metatuner.models.lora.LoRAModel.recompute_context`);
  the autocast state is replayed by torch itself;
- the model stays in eval mode (no dropout anywhere, as in every other pass of this library), and only
  the blocks' own ``training`` flag is set, because transformers checkpoints a block only in training
  mode; their submodules (attention, MLP: where dropout lives) stay in eval mode.

Passes without gradients (generation, rollout scoring, evaluation) are not checkpointed, and so keep
their KV cache: transformers checkpoints only when gradients are enabled.
"""

from __future__ import annotations

from torch import nn

from metatuner.errors import MetatunerError
from metatuner.models.lora import LoRAModel

_ON = "_metatuner_checkpointing"  # on a checkpointed model: the LoRAModel whose adapters recomputation replays


def set_gradient_checkpointing(model: nn.Module, lora: LoRAModel, enabled: bool) -> None:
    """Checkpoints (``enabled``) or stops checkpointing the decoder blocks of ``model``.

    Args:
        model: a transformers causal LM (frozen, eval mode) wrapped by ``lora``.
        lora: the :class:`~metatuner.models.lora.LoRAModel` holding the model's adapters.
        enabled: on or off; turning on a model already on with ``lora`` (or off one already off) changes
            nothing, and on with another ``lora`` (a second MetaTuner on the same base) replays that one's.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    current = model.__dict__.get(_ON)
    if current is (lora if enabled else None):
        return
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if enabled:
        if not blocks or not getattr(model, "supports_gradient_checkpointing", False):
            raise MetatunerError(
                f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
                "set train.gradient_checkpointing=false"
            )
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": lora.recompute_context}
        )
        model.disable_input_require_grads()
    else:
        model.activation_checkpointing_disable()
    for block in blocks:
        block.training = enabled or model.training  # the block's own flag only (nn.Module.train recurses)
    setattr(model, _ON, lora if enabled else None)


def gradient_checkpointing(model: nn.Module) -> bool:
    """Whether ``model``'s blocks are checkpointed by :func:`set_gradient_checkpointing`."""
    return model.__dict__.get(_ON) is not None
