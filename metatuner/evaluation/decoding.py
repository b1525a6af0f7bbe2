"""Iteration-level ("continuous") greedy decoding: a running batch that rows join and leave between decode steps.

:func:`~metatuner.evaluation.generation.generate` decodes a batch until its longest row ends; a
:class:`RunningBatch` instead lets each row leave the moment it ends and new rows join at any step boundary,
as vLLM and TGI schedule. Every row keeps the answer it gets alone (greedy, token for token):

- **Layout**: one KV cache ``[rows, heads, L, dim]`` with the rows right-aligned: row i's real tokens fill its
  last columns, the columns before them are padding, masked out (attention mask ``[rows, L]``). Positions count
  a row's real tokens only, so each row attends to exactly what it would attend to alone.
- **Join** (:meth:`RunningBatch.admit`): the new rows' prompts, all but their last token, are prefilled
  (decoder only, left-padded among themselves, under their own weights); then the running cache and the new
  one are merged, the shorter one padded on the left. A row's last prompt token is its first pending input.
- **Step** (:meth:`RunningBatch.step`): one forward of every row's pending token, greedy argmax. A row ends at an
  end token (EOS, or the pad: :func:`~metatuner.evaluation.generation.row_result` cuts there anyway), at a stop
  string (transformers' ``StopStringCriteria`` on the row's own tokens, prompt included, as ``generate`` checks)
  or at its own budget; it leaves at once, and columns that no remaining row uses are cut, so the cache never
  grows past the longest row in it.
- **Per-row weights**: the batch keeps per-row LoRA factors (``[rows, ...]``, e.g. MetaTuner's F output) aligned
  with its rows and runs every forward inside ``weights(factors)``, which the predictor supplies.

Only plain full-attention caches are supported (``DynamicLayer``; no sliding windows), and generation configs
whose greedy decoding is a plain argmax (no repetition penalty or other logits processor): :func:`supports`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from metatuner.evaluation.generation import Generation, RowText, end_ids, row_result

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

#: generation-config fields that add a logits processor to greedy decoding, with the values that add none
_PLAIN_GREEDY = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                 "min_length": (None, 0), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
                 "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                 "sequence_bias": (None,), "exponential_decay_length_penalty": (None,)}


def supports(model) -> bool:
    """Whether a :class:`RunningBatch` decodes ``model`` exactly as ``generate`` does greedily."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = model.generation_config
    plain = all(getattr(config, name, None) in allowed for name, allowed in _PLAIN_GREEDY.items())
    return plain and all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


@dataclass
class _Row:
    key: Any
    prompt: list[int]
    budget: int
    text: RowText | None  # None: nobody streams this row, so its text is decoded once, when it ends
    steps: int = 0  # decode steps taken
    shared: int = 0  # rows in those steps, summed (this row included)
    new: list[int] = field(default_factory=list)


@dataclass
class Finished:
    """A row that ended: its key, its generation, and the mean number of rows of the steps that decoded it."""

    key: Any
    generation: Generation
    batch_size: float


class RunningBatch:
    """Rows being decoded greedily on ``model``, joining and leaving between steps (see the module docstring).

    Args:
        model: a causal LM for which :func:`supports` holds.
        tokenizer: its tokenizer.
        stop: stop strings; a row ends when its text reaches one (the text is cut there).
        weights: ``weights(factors)`` is the context every forward runs in, with ``factors`` the per-row LoRA
            factors of the rows in that forward (None when the predictor has none).
    """

    def __init__(self, model, tokenizer, stop: tuple[str, ...] = (),
                 weights: Callable[[Factors | None], ContextManager] | None = None):
        from transformers import DynamicCache
        from transformers.generation.stopping_criteria import StopStringCriteria

        self.model, self.tokenizer, self.stop = model, tokenizer, tuple(stop)
        self.weights = weights or (lambda factors: contextlib.nullcontext())
        self.ends = end_ids(model, tokenizer)
        self.stops = StopStringCriteria(tokenizer, list(stop)) if stop else None
        device = model.device
        self.rows: list[_Row] = []
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [rows, L]: 1 = a real token
        self.pending = torch.zeros(0, dtype=torch.long, device=device)  # [rows]: each row's next input token
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # [rows]: that token's position
        self.factors: Factors | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns of the cache (the longest row's tokens so far, but its pending one)."""
        return self.mask.shape[1]

    @torch.no_grad()
    def admit(self, keys: list[Any], texts: list[str], budgets: list[int], factors: Factors | None = None,
              on_text: list[Callable[[str], None] | None] | None = None) -> None:
        """Adds rows: ``texts[i]`` (the model input) decodes up to ``budgets[i]`` new tokens and finishes under
        ``keys[i]``; ``factors`` are the new rows' per-row LoRA factors; ``on_text[i]``, if given, receives the
        row's text in pieces while it decodes."""
        from transformers import DynamicCache

        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        device = self.model.device
        width = max(len(x) for x in ids) - 1
        prefix = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(x) + 1) + x[:-1] for x in ids],
                              dtype=torch.long, device=device).reshape(len(ids), width)  # [new, width]
        mask = torch.tensor([[0] * (width - len(x) + 1) + [1] * (len(x) - 1) for x in ids],
                            dtype=torch.long, device=device).reshape(len(ids), width)
        cache = DynamicCache(config=self.model.config)
        if width:
            positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
            with self.weights(factors):
                self.model.get_decoder()(input_ids=prefix, attention_mask=mask, position_ids=positions, cache=cache,
                                         use_cache=True)
        self._merge(cache, mask, factors)
        self.pending = torch.cat([self.pending, torch.tensor([x[-1] for x in ids], device=device)])
        self.positions = torch.cat([self.positions, torch.tensor([len(x) - 1 for x in ids], device=device)])
        for key, x, budget, send in zip(keys, ids, budgets, on_text or [None] * len(ids), strict=True):
            text = RowText(self.tokenizer, self.ends, self.stop, send) if send else None
            self.rows.append(_Row(key, x, budget, text))

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One decode step of every row; returns the rows that ended, which have left the batch."""
        if not self.rows:
            return []
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)  # [rows, L + 1]
        with self.weights(self.factors):
            logits = self.model(input_ids=self.pending[:, None], attention_mask=mask,
                                position_ids=self.positions[:, None], cache=self.cache, use_cache=True).logits
        tokens = logits[:, -1].argmax(-1)  # [rows]
        self.mask, self.pending, self.positions = mask, tokens, self.positions + 1
        stopped = self._stopped(tokens.tolist())
        finished, keep = [], []
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            row.new.append(token)
            if row.text is not None:
                row.text.push(token)
            row.steps, row.shared = row.steps + 1, row.shared + len(self.rows)
            if token in self.ends or stopped[i] or len(row.new) >= row.budget:
                if row.text is not None:
                    row.text.close()
                generation = row_result(self.tokenizer, row.new, self.ends, self.stop, row.budget)
                finished.append(Finished(row.key, generation, row.shared / row.steps))
            else:
                keep.append(i)
        if finished:
            self._keep(keep)
        return finished

    def _stopped(self, tokens: list[int]) -> list[bool]:
        """Per row, whether its tokens (prompt included) now end in a stop string, as ``generate`` checks."""
        if self.stops is None:
            return [False] * len(tokens)
        span = self.stops.maximum_token_len
        return [bool(self.stops(torch.tensor([(row.prompt + row.new + [token])[-span:]]), None)[0])
                for row, token in zip(self.rows, tokens)]

    def _keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay; leading columns that none of them uses are cut."""
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask, self.pending, self.positions = self.mask[index], self.pending[index], self.positions[index]
        if self.factors is not None:
            self.factors = {k: (a[index], b[index]) for k, (a, b) in self.factors.items()}
        used = self.mask.any(0)  # [L]
        start = int(used.long().argmax()) if bool(used.any()) else self.width
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            if _filled(layer):
                layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    def _merge(self, cache, mask: torch.Tensor, factors: Factors | None) -> None:
        """Appends the rows of a prefilled ``cache`` (with its attention ``mask``) to the running ones, padding the
        shorter of the two on the left."""
        if not self.rows:
            self.cache, self.mask, self.factors = cache, mask, factors
            return
        if (self.factors is None) != (factors is None):
            raise ValueError("rows with per-row factors and rows without cannot share a running batch")
        width = max(self.width, mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            like = old.keys if _filled(old) else new.keys if _filled(new) else None
            if like is None:  # nothing cached on either side yet (one-token prompts)
                continue
            empty = lambda n: (like.new_zeros(n, like.shape[1], 0, like.shape[3]),) * 2  # noqa: E731 - [n, heads, 0, dim]
            parts = [(layer.keys, layer.values) if _filled(layer) else empty(n)
                     for layer, n in ((old, len(self.rows)), (new, mask.shape[0]))]
            if not old.is_initialized:
                old.lazy_initialization(like, like)
            old.keys = torch.cat([_pad_left(k, width, -2) for k, _ in parts])
            old.values = torch.cat([_pad_left(v, width, -2) for _, v in parts])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        if factors is not None:
            self.factors = {k: (torch.cat([a, factors[k][0]]), torch.cat([b, factors[k][1]]))
                            for k, (a, b) in self.factors.items()}


def _filled(layer) -> bool:
    """Whether a cache layer holds any column."""
    return layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0


def _pad_left(t: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width`` (a mask ``[rows, L]``: -1; keys or values
    ``[rows, heads, L, dim]``: -2)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)
