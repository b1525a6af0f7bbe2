"""Batched text generation and continuation scoring on a causal LM.

``generate`` decodes one batch with left padding and the KV cache (``model.generate``), stops each
row at EOS or at the first stop string, and returns the new text. ``continuation_logprobs`` scores
given continuations after given contexts in one teacher-forced forward pass. Both leave the batch
order unchanged, which is what lets a per-row adapter (one LoRA per row) ride along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The model input for chat messages: the tokenizer's chat template when it has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


@dataclass
class Generation:
    text: str
    new_tokens: int
    #: False when the row stopped at ``max_new_tokens`` without EOS or a stop string (cut at the cap)
    finished: bool = True


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Drops everything from the first stop string on."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    stop: tuple[str, ...] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    num_samples: int = 1,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Generation]:
    """Generates ``num_samples`` continuations for every text of one batch (greedy unless ``do_sample``),
    grouped by text. With several samples the texts are prefilled once and the KV cache is shared by
    their samples, instead of prefilling every copy (the model must not carry per-row adapters then).

    ``on_text(row, text)``, when given, receives each output row's text while it is decoded, in pieces
    that join to exactly that row's :attr:`Generation.text` (see :class:`RowStreamer`)."""
    # the padding side goes with this call: the tokenizer object, shared by threads, is left as it is
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample else dict(do_sample=False)
    if num_samples > 1:
        cache = _prefill(model, enc["input_ids"], enc["attention_mask"])
        cache.batch_repeat_interleave(num_samples)
        enc = {k: v.repeat_interleave(num_samples, dim=0) for k, v in enc.items()}
        kwargs["cache"] = cache
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(stop) or None,
        tokenizer=tokenizer if stop else None,
        streamer=RowStreamer(tokenizer, end_ids(model, tokenizer), stop, on_text) if on_text else None,
        **kwargs,
    )
    return _results(model, tokenizer, out[:, enc["input_ids"].shape[1] :], stop, max_new_tokens)


#: tokens decoded in this process so far: every decode path of this module ends in ``_results``, and code that
#: decodes with a generate of its own (a TRL trainer) adds its tokens with :func:`count_generated`
_GENERATED = [0]


def count_generated(n: int) -> None:
    """Adds ``n`` tokens decoded outside this module to :func:`tokens_generated`."""
    _GENERATED[0] += int(n)


def tokens_generated() -> int:
    """Tokens decoded in this process so far (the recipes count a method's training cost by differences)."""
    return _GENERATED[0]


def _results(model, tokenizer, new: torch.Tensor, stop: tuple[str, ...], max_new_tokens: int) -> list[Generation]:
    """``new [bs, new]`` generated ids as Generations (text cut at EOS / the first stop string)."""
    ends = end_ids(model, tokenizer)
    return [row_result(tokenizer, row.tolist(), ends, stop, max_new_tokens) for row in new]


def row_result(tokenizer, ids: list[int], ends: set[int], stop: tuple[str, ...], max_new_tokens: int) -> Generation:
    """One row's generated ``ids`` as a Generation: decoded up to its first end token, cut at the first stop
    string, stripped; counted in :func:`tokens_generated`."""
    n = _first_end(ids, ends)
    text = tokenizer.decode(ids[: n or len(ids)], skip_special_tokens=True)
    stopped = n is not None or any(s in text for s in stop)
    finished = stopped or len(ids) < max_new_tokens
    count_generated(n or len(ids))
    return Generation(cut_at_stop(text, stop).strip(), n or len(ids), finished=finished)


def _first_end(ids: list[int], ends: set[int]) -> int | None:
    """How many tokens a row holds up to and including its first EOS / pad (generate pads finished rows);
    None when it has none."""
    return next((i + 1 for i, t in enumerate(ids) if t in ends), None)


class RowText:
    """One row's answer text while it decodes: :meth:`push` each new token, :meth:`close` when the row ends without
    an end token; ``send(piece)`` receives pieces that join to exactly the text :func:`row_result` gives for the
    row's tokens (decoded up to its EOS, cut at the first stop string, stripped).

    A piece goes out only once it can no longer change: the newest token's text stays back (it may be part of a
    character or merge still completing), as do leading and trailing whitespace (the result is stripped) and an
    ending that could be the start of a stop string. The last piece goes out at an end token (EOS, or the pad
    generate gives a finished row, which also follows a stop string) or at :meth:`close`.
    """

    def __init__(self, tokenizer, ends: set[int], stop: tuple[str, ...], send: Callable[[str], None]):
        self.tokenizer, self.ends, self.stop, self.send = tokenizer, ends, stop, send
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def push(self, token: int) -> None:
        if not self.done:
            self.ids.append(token)
            self._flush(final=token in self.ends)

    def close(self) -> None:
        if not self.done:
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        ids = self.ids
        if final:
            self.done = True
            text = cut_at_stop(self.tokenizer.decode(ids[: _first_end(ids, self.ends) or len(ids)],
                                                     skip_special_tokens=True), self.stop)
        else:
            text = self.tokenizer.decode(ids[:-1], skip_special_tokens=True).rstrip("\ufffd")
            cut = cut_at_stop(text, self.stop)
            text = cut if len(cut) < len(text) else text[: len(text) - _stop_prefix(text, self.stop)]
        text = text.strip()
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            self.send(piece)


class RowStreamer:
    """A ``model.generate`` streamer (``put``/``end``) that hands each row's new text to ``on_text(row, text)`` while
    the batch decodes, one :class:`RowText` per row, so that a row's pieces join to exactly the text
    :func:`generate` returns for it. A row's last piece goes out when the row ends (EOS or the pad generate gives a
    finished row), or at ``end()`` for rows cut at the budget.
    """

    def __init__(self, tokenizer, ends: set[int], stop: tuple[str, ...], on_text: Callable[[int, str], None]):
        self.tokenizer, self.ends, self.stop, self.on_text = tokenizer, ends, stop, on_text
        self.rows: list[RowText] | None = None  # None until the prompt came

    def put(self, value: torch.Tensor) -> None:
        if self.rows is None:  # generate's first call hands over the prompt ids [bs, T]
            self.rows = [RowText(self.tokenizer, self.ends, self.stop, lambda text, row=row: self.on_text(row, text))
                         for row in range(value.shape[0])]
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):  # [bs] new tokens
            row.push(token)

    def end(self) -> None:
        for row in self.rows or []:
            row.close()


def _stop_prefix(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest ending of ``text`` that begins one of the ``stop`` strings (0: none)."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class _GreedyRows:
    """A logits processor that leaves only each greedy row's argmax, so sampling picks it: greedy and
    sampled rows decode in one ``generate``."""

    def __init__(self, greedy: torch.Tensor):
        self.greedy = greedy  # [bs] bool

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = scores.argmax(-1, keepdim=True)  # [bs, 1]
        only = torch.full_like(scores, float("-inf")).scatter(-1, keep, scores.gather(-1, keep))
        return torch.where(self.greedy[:, None].to(scores.device), only, scores)


@torch.no_grad()
def generate_rows(
    model, tokenizer, texts: list[str], rows: list[int], max_new_tokens: int, *, greedy: list[bool],
    temperature: float = 1.0, stage=None, groups: list[int] | None = None,
) -> list[Generation]:
    """One batched generate of ``len(rows)`` continuations: row ``j`` continues ``texts[rows[j]]``, greedily
    where ``greedy[j]``, else sampled at ``temperature``.

    Each text is prefilled once and its KV cache copied to its rows. ``stage("prefill", index)`` and
    ``stage("decode")`` are the contexts the passes run in (e.g. per-row adapters, which differ because the
    prefill has one row per text, or the texts ``index`` selects, and the decode one per output row).
    The tokens every text starts with alike (a template and an instruction: at least
    ``MIN_SHARED_PREFIX``) are prefilled once per group of texts that run under the same adapters
    (``groups``: one id per text; unset: one group), and each text's own tokens follow them, left-padded.
    """
    import contextlib

    from transformers import LogitsProcessorList

    stage = stage or (lambda name, index=None: contextlib.nullcontext())
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cache, input_ids, attention = _prefill_shared(model, tokenizer.pad_token_id, ids, groups or [0] * len(ids), stage)
    index = torch.tensor(rows, device=model.device)
    cache.batch_select_indices(index)
    with stage("decode"):
        out = model.generate(
            input_ids=input_ids.index_select(0, index), attention_mask=attention.index_select(0, index),
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, cache=cache,
            do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
            logits_processor=LogitsProcessorList([_GreedyRows(torch.tensor(greedy))]),
        )
    return _results(model, tokenizer, out[:, input_ids.shape[1] :], (), max_new_tokens)


#: the fewest leading tokens all texts of a :func:`generate_rows` call must share to be prefilled once
MIN_SHARED_PREFIX = 8


def _prefill_shared(model, pad_id: int, ids: list[list[int]], groups: list[int], stage):
    """The KV cache of every text but its last token, and the ``[texts, T]`` ids and attention mask
    ``generate`` continues them from.

    The leading tokens all texts share (capped so that each keeps at least two tokens of its own) run once
    per group; each text's remaining tokens come after them, left-padded: ``[shared][pad...][own]``, the
    padding masked and positions counted over real tokens (as ``generate`` counts them), so each row sees
    what it would see alone. Without a long enough shared prefix, one text, or a cache that is not plain
    full attention (sliding windows), every text runs whole, plainly left-padded.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    device = model.device
    start = 0
    while len(ids) > 1 and start < min(map(len, ids)) - 2 and all(x[start] == ids[0][start] for x in ids):
        start += 1
    cache = DynamicCache(config=model.config)
    if start < MIN_SHARED_PREFIX or not all(type(c) is DynamicLayer for c in cache.layers):
        start = 0
    if start:
        order = list(dict.fromkeys(groups))  # group ids, first appearance first
        first = torch.tensor([groups.index(g) for g in order], device=device)  # one text of each group
        prefix = torch.tensor([ids[0][:start]] * len(order), device=device)
        with stage("prefill", first):
            model.get_decoder()(input_ids=prefix, attention_mask=torch.ones_like(prefix), cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([order.index(g) for g in groups], device=device))
    own = [x[start:] for x in ids]
    width = max(map(len, own))
    input_ids = torch.tensor([ids[0][:start] + [pad_id] * (width - len(x)) + x for x in own], device=device)
    attention = torch.tensor([[1] * start + [0] * (width - len(x)) + [1] * len(x) for x in own], device=device)
    with stage("prefill", None):
        _prefill(model, input_ids, attention, cache, start)
    return cache, input_ids, attention


def _prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None, start: int = 0):
    """The KV cache of every row but its last token, with the positions ``generate`` gives left-padded
    rows, so that ``generate`` continues from it exactly as from its own prefill. ``cache`` may already
    hold the first ``start`` tokens of every row; only the tokens after them run.

    Only the decoder runs: the output head would compute ``[rows, T, vocab]`` logits nobody reads (on the
    default model that was about a quarter of the prefill's time).
    """
    from transformers import DynamicCache

    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    cache = cache if cache is not None else DynamicCache(config=model.config)
    model.get_decoder()(input_ids=input_ids[:, start:-1], attention_mask=attention_mask[:, :-1],
                        position_ids=positions[:, start:-1], cache=cache, use_cache=True)
    return cache


def end_ids(model, tokenizer) -> set[int]:
    """The tokens a row ends at: the model's EOS ids, the tokenizer's EOS and its pad (generate pads finished rows)."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    ids.add(tokenizer.eos_token_id)
    ids.add(tokenizer.pad_token_id)
    return ids


def encode_pairs(
    tokenizer, contexts: list[str], continuations: list[str], device, max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded ``context + continuation`` ids with labels only on the continuation (-100 elsewhere).

    ``max_length`` caps each row on its own, before padding: a row longer than it loses the start of its
    context (at least one context token is kept, so the first target token stays predicted) and never a
    target token. A short row in a batch with a long one is therefore encoded exactly as it is alone.
    A target that alone reaches ``max_length`` is kept whole, so such a row stays longer than the cap.
    """
    rows, labels = [], []
    for ctx, cont in zip(contexts, continuations, strict=True):
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        y = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if max_length is not None and len(c) + len(y) > max_length:
            c = c[len(c) - max(1, max_length - len(y)) :]  # the end of the context: the query and the turn marker
        rows.append(c + y)
        labels.append([-100] * len(c) + y)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # [bs, T]
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=device)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}


#: label positions whose logits a no-grad :func:`token_logprobs` computes at a time
LOGIT_CHUNK = 256


def token_logprobs(model, batch: dict[str, torch.Tensor], prefix: int = 0,
                   cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of label log-probabilities and label-token counts (differentiable).

    The output head runs only on the positions that predict a label: a full ``[bs, T, vocab]`` logits
    tensor (hundreds of MB for a 49k vocabulary) is never built. Without grad (rollout scoring, evaluation)
    it runs on ``LOGIT_CHUNK`` positions at a time, so scoring two dozen candidates holds no more logits
    than a training step does.

    ``prefix`` > 0 (:func:`shared_prefix_length`): the first ``prefix`` tokens of every row are alike and
    unlabelled; they run once, as one row whose keys and values every row attends to (gradients flow
    through them to the shared weights as through separate rows). The caller vouches that one pass means
    the same for every row: the same adapters, a plain full-attention cache, no recomputed blocks. ``cache``:
    those keys and values already computed, one row per row of ``batch`` (:func:`prefix_cache`, e.g. run once
    per group of rows that share their adapters).
    """
    ids, attention = batch["input_ids"], batch["attention_mask"]
    decoder = model.get_decoder()
    if prefix:
        if cache is None:
            cache = prefix_cache(model, batch, prefix, [0])
            cache.batch_repeat_interleave(ids.shape[0])
        positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        hidden = decoder(input_ids=ids[:, prefix:], attention_mask=attention, position_ids=positions, cache=cache,
                         use_cache=True)[0]
    else:  # no KV cache: nothing decodes after this pass (and checkpointed blocks would drop it, with a warning)
        hidden = decoder(input_ids=ids, attention_mask=attention, use_cache=False)[0]
    labels = batch["labels"][:, prefix + 1:]  # [bs, T-1-prefix]: position t predicts token t + 1
    mask = labels != -100
    rows = mask.nonzero()[:, 0]  # [N]
    head, states, targets = model.get_output_embeddings(), hidden[:, :-1][mask], labels[mask]  # [N, d], [N]
    chunk = len(targets) if torch.is_grad_enabled() else LOGIT_CHUNK
    lp = torch.cat([
        -nn.functional.cross_entropy(head(states[i : i + chunk]).float(), targets[i : i + chunk], reduction="none")
        for i in range(0, len(targets), max(1, chunk))
    ]) if len(targets) else states.new_zeros(0, dtype=torch.float32)  # [N]
    total = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return total, mask.sum(-1)


def prefix_cache(model, batch: dict[str, torch.Tensor], prefix: int, rows: list[int]):
    """The KV cache of the first ``prefix`` tokens of ``batch``'s rows ``rows`` (one cache row each, in the
    caller's adapter and grad context), for :func:`token_logprobs` once expanded to every row."""
    from transformers import DynamicCache

    index = torch.tensor(rows, device=batch["input_ids"].device)
    ids, attention = batch["input_ids"].index_select(0, index), batch["attention_mask"].index_select(0, index)
    cache = DynamicCache(config=model.config)
    model.get_decoder()(input_ids=ids[:, :prefix], attention_mask=attention[:, :prefix], cache=cache, use_cache=True)
    return cache


def shared_prefix_length(model, batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens of ``batch`` (right-padded, :func:`encode_pairs`) :func:`token_logprobs` may
    run once: those alike in every row, attended and unlabelled, ending before the first labelled token's
    predecessor. 0 for one row, a prefix shorter than ``MIN_SHARED_PREFIX``, or a model whose cache is not
    plain full attention (sliding windows)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    alike = ((ids == ids[:1]) & (attention == 1) & (labels == -100)).all(0)  # [T]
    start = int(alike.long().cumprod(0).sum())
    labelled = (labels != -100).any(0).nonzero()
    if len(labelled):
        start = min(start, int(labelled[0]) - 1)  # the position predicting the first target runs with its row
    if start < MIN_SHARED_PREFIX or not all(type(c) is DynamicLayer for c in DynamicCache(config=model.config).layers):
        return 0
    return start


@torch.no_grad()
def continuation_logprobs(model, tokenizer, contexts: list[str], continuations: list[str]) -> list[float]:
    """Mean per-token log-probability of each continuation given its context."""
    batch = encode_pairs(tokenizer, contexts, continuations, model.device)
    total, count = token_logprobs(model, batch)
    return (total / count.clamp(min=1)).tolist()
