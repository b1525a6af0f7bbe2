"""Batched text generation and continuation scoring on a causal LM.

``generate`` decodes one batch with left padding and the KV cache (``model.generate``), stops each
row at EOS or at the first stop string, and returns the new text. ``continuation_logprobs`` scores
given continuations after given contexts in one teacher-forced forward pass. Both leave the batch
order unchanged, which is what lets a per-row adapter (one LoRA per row) ride along.
"""

from __future__ import annotations

from dataclasses import dataclass

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
) -> list[Generation]:
    """Generates ``num_samples`` continuations for every text of one batch (greedy unless ``do_sample``),
    grouped by text. With several samples the texts are prefilled once and the KV cache is shared by
    their samples, instead of prefilling every copy (the model must not carry per-row adapters then)."""
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
    ends = _end_ids(model, tokenizer)
    results = []
    for row in new:
        ids = row.tolist()
        # count tokens up to and including the first EOS / pad (generate pads finished rows)
        n = next((i + 1 for i, t in enumerate(ids) if t in ends), None)
        text = tokenizer.decode(ids[: n or len(ids)], skip_special_tokens=True)
        stopped = n is not None or any(s in text for s in stop)
        finished = stopped or len(ids) < max_new_tokens
        results.append(Generation(cut_at_stop(text, stop).strip(), n or len(ids), finished=finished))
        count_generated(n or len(ids))
    return results


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
    temperature: float = 1.0, stage=None,
) -> list[Generation]:
    """One batched generate of ``len(rows)`` continuations: row ``j`` continues ``texts[rows[j]]``, greedily
    where ``greedy[j]``, else sampled at ``temperature``.

    Each text is prefilled once and its KV cache copied to its rows. ``stage("prefill")`` and
    ``stage("decode")`` are the contexts the two passes run in (e.g. per-row adapters, which differ
    because the prefill has one row per text and the decode one per output row).
    """
    import contextlib

    from transformers import LogitsProcessorList

    stage = stage or (lambda name: contextlib.nullcontext())
    # the padding side goes with this call: the tokenizer object, shared by threads, is left as it is
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    with stage("prefill"):
        cache = _prefill(model, enc["input_ids"], enc["attention_mask"])
    index = torch.tensor(rows, device=model.device)
    cache.batch_select_indices(index)
    enc = {k: v.index_select(0, index) for k, v in enc.items()}
    with stage("decode"):
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, cache=cache,
            do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
            logits_processor=LogitsProcessorList([_GreedyRows(torch.tensor(greedy))]),
        )
    return _results(model, tokenizer, out[:, enc["input_ids"].shape[1] :], (), max_new_tokens)


def _prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The KV cache of every row but its last token, with the positions ``generate`` gives left-padded
    rows, so that ``generate`` continues from it exactly as from its own prefill.

    Only the decoder runs: the output head would compute ``[rows, T, vocab]`` logits nobody reads (on the
    default model that was about a quarter of the prefill's time).
    """
    from transformers import DynamicCache

    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    out = model.get_decoder()(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                              position_ids=positions[:, :-1], cache=DynamicCache(config=model.config), use_cache=True)
    return out.cache


def _end_ids(model, tokenizer) -> set[int]:
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


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of label log-probabilities and label-token counts (differentiable).

    The output head runs only on the positions that predict a label: a full ``[bs, T, vocab]`` logits
    tensor (hundreds of MB for a 49k vocabulary) is never built.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    labels = batch["labels"][:, 1:]  # [bs, T-1]: position t predicts token t + 1
    mask = labels != -100
    rows = mask.nonzero()[:, 0]  # [N]
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()  # [N, vocab]
    lp = -nn.functional.cross_entropy(logits, labels[mask], reduction="none")  # [N]
    total = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return total, mask.sum(-1)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, contexts: list[str], continuations: list[str]) -> list[float]:
    """Mean per-token log-probability of each continuation given its context."""
    batch = encode_pairs(tokenizer, contexts, continuations, model.device)
    total, count = token_logprobs(model, batch)
    return (total / count.clamp(min=1)).tolist()
