"""The serving engine: concurrent requests answered by iteration-level ("continuous") batching.

Requests arrive from any thread (``submit`` returns a ``concurrent.futures.Future``); one worker thread owns
the models and answers them. For a predictor that decodes step by step (``Predictor.start`` gives a
:class:`~metatuner.evaluation.predictors.Decoding`) the worker runs one **decode loop** at a time, for one model,
over a running batch of at most ``max_batch_size`` requests:

- a loop starts with the oldest waiting request, with every other waiting request for the same model, and with
  those that arrive for it within ``max_wait_ms`` (up to ``max_batch_size``), whatever their token budgets;
- each step decodes one token of every request in the batch; a request whose answer ended (EOS, a stop string,
  its own ``max_new_tokens``) leaves the batch at once and its future is resolved;
- between steps, requests for the same model join (their prefill runs, and for MetaTuner their own prompt and
  their own generated LoRA join the batch's per-row LoRA stack), unless a request for another model waits
  before them: then none joins, the loop drains, and the next loop serves the oldest waiting request. Models
  take turns in arrival order, so a busy model never starves another; a loop ends when its batch is empty.

Each answer equals the answer to the same request sent alone (greedy, token for token), whoever shares its
steps. A predictor that cannot decode step by step is answered as before this engine decoded continuously:
the oldest waiting request, with later ones for the same model and token budget gathered for up to
``max_wait_ms`` or ``max_batch_size`` of them, in one ``predictor.predict(task, batch, budget)``; requests for
another model or budget wait for a later batch, in arrival order. A request whose caller gave up (its future
cancelled) is dropped before it runs.

A request may stream: its ``on_text`` receives its answer's text in pieces while it is decoded (a predictor that
cannot stream gives none, and its caller sends the answer whole from the future); the other rows are unaffected,
so streamed and whole requests share batches.

A system message replaces p~ for its request only: the engine's task view answers ``instruction_for`` with
the request's own instruction, which both G (whose input holds p~) and M read.

Batch size: the mean number of requests in the decode steps that answered a request (:attr:`Answer.batch_size`),
and over all steps (:attr:`Engine.mean_batch_size`); a whole-batch ``predict`` counts as one step of its size.
"""

from __future__ import annotations

import collections
import functools
import itertools
import queue
import threading
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from metatuner.evaluation.predictors import Decoding, Prediction, Predictor
from metatuner.tasks.base import Example, Task

INSTRUCTION = "instruction"  # Example.meta key of a request's own p~
log = logging.getLogger(__name__)


class RequestTask(Task):
    """``task`` with each example's own instruction (``meta["instruction"]``) in place of p~ where it has one."""

    def __init__(self, task: Task):
        super().__init__(task.data_dir)
        self.inner = task
        for attr in ("name", "version", "instruction", "cot_instruction", "max_new_tokens", "cot_max_new_tokens",
                     "stop", "primary_metric"):
            setattr(self, attr, getattr(task, attr))

    def instruction_for(self, example: Example) -> str:
        return example.meta.get(INSTRUCTION) or self.inner.instruction_for(example)

    def messages(self, instruction: str, example: Example) -> list[dict[str, str]]:
        return self.inner.messages(instruction, example)

    def example_from_row(self, row: dict[str, Any]) -> Example:
        return self.inner.example_from_row(row)

    def extract(self, output: str) -> dict[str, str | None]:
        return self.inner.extract(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return self.inner.score(extracted, example)


@dataclass
class Served:
    """One model the engine answers for: a predictor and the task whose p~ and answer extraction it uses."""

    predictor: Predictor
    task: Task

    def __post_init__(self):
        self.view = RequestTask(self.task)


@dataclass
class Answer:
    prediction: Prediction
    extracted: str | None
    prompt_tokens: int
    batch_size: float  # the mean number of requests in the decode steps that answered this one


@dataclass
class _Request:
    model: str
    example: Example
    max_new_tokens: int
    future: Future
    on_text: Callable[[str], None] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.max_new_tokens


class Engine:
    """Answers requests for named models by continuous batching, on one worker thread (see the module docstring)."""

    def __init__(self, models: dict[str, Served], max_batch_size: int = 8, max_wait_ms: float = 10.0):
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._waiting: collections.deque[_Request] = collections.deque()  # taken from the queue, in arrival order
        self._loop_model: str | None = None  # the model of the decode loop in progress
        self._decoding: Decoding | None = None
        self._running: dict[str, _Request] = {}  # example id -> request, of the decode loop in progress
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="metatuner-engine", daemon=True)
        self.batches = 0  # decode loops and whole-batch predicts run so far
        self.answered = 0
        self.steps = 0  # decode steps run so far (a whole-batch predict counts as one)
        self.rows = 0  # requests in those steps, summed

    @property
    def mean_batch_size(self) -> float:
        """Requests per decode step so far (0 before the first)."""
        return self.rows / self.steps if self.steps else 0.0

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stops once the requests being decoded are answered; requests still waiting fail with RuntimeError."""
        self._stop.set()
        self._thread.join(timeout)
        for request in [*self._waiting, *_drain(self._queue)]:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(RuntimeError("the server is shutting down"))

    def budget(self, model: str) -> int:
        served = self.models[model]
        return served.predictor.budget(served.task)

    def submit(self, model: str, query: str, max_new_tokens: int, instruction: str | None = None,
               on_text: Callable[[str], None] | None = None) -> Future:
        """Queues one query for ``model``.

        Args:
            model: the name of a served model.
            query: the question.
            max_new_tokens: the answer's token budget (a predictor answered whole batches at a time shares a batch
                only with requests of the same budget).
            instruction: replaces p~ for this request (a system message).
            on_text: called on the worker thread with each next piece of the answer while it is decoded, when the
                model's predictor streams (``Predictor.streams``); the pieces join to the answer's output, or to
                a prefix of it that the caller completes from the future's answer. It must return quickly.

        Returns:
            A future whose result is an :class:`Answer`.
        """
        meta = {INSTRUCTION: instruction} if instruction else {}
        # a fresh id per request: predictors may cache per batch of ids (MetaTuner's prompts and factors)
        example = Example(id=f"request-{next(self._ids)}", query=query, answer="", target="", meta=meta)
        future: Future = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the server is shutting down"))
            return future
        self._queue.put(_Request(model, example, max_new_tokens, future, on_text))
        return future

    # ---- the worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set() or self._decoding is not None:
            if self._decoding is not None:
                self._advance()
                continue
            first = self._next(0.1)
            while first is not None and not first.future.set_running_or_notify_cancel():
                first = self._next(0.1)  # cancelled: its caller timed out before it ran
            if first is None:
                continue
            served = self.models[first.model]
            decoding = served.predictor.start(served.view) if not self._stop.is_set() else None
            if decoding is None:
                self._run(self._gather(first, lambda r: r.key == first.key))
            else:
                self._loop_model, self._decoding, self.batches = first.model, decoding, self.batches + 1
                self._admit(self._gather(first, lambda r: r.model == first.model))

    def _next(self, timeout: float) -> _Request | None:
        if self._waiting:
            return self._waiting.popleft()
        try:
            return self._queue.get(timeout=max(timeout, 0.0)) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: _Request, fits: Callable[[_Request], bool]) -> list[_Request]:
        """A batch: ``first`` (running), plus waiting requests that ``fits`` and those that arrive within
        ``max_wait_ms``, up to ``max_batch_size``; the others wait on, in order. Cancelled ones are dropped."""
        batch, later = [first], collections.deque()
        for request in self._waiting:  # already waiting: they join without waiting more
            (batch if fits(request) and len(batch) < self.max_batch_size else later).append(request)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                request = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            (batch if fits(request) else later).append(request)
        self._waiting = later
        return [first] + [r for r in batch[1:] if r.future.set_running_or_notify_cancel()]

    def _joiners(self) -> list[_Request]:
        """Waiting requests that join the decode loop now: those for its model, up to the batch's free places,
        that no request for another model waits before."""
        self._waiting.extend(_drain(self._queue))
        joiners = []
        while self._waiting and not self._stop.is_set() and len(self._running) + len(joiners) < self.max_batch_size:
            head = self._waiting[0]
            if head.model != self._loop_model and not head.future.cancelled():
                break  # another model's turn comes next
            self._waiting.popleft()
            if head.model == self._loop_model and head.future.set_running_or_notify_cancel():
                joiners.append(head)
        return joiners

    def _admit(self, requests: list[_Request]) -> None:
        """Adds running requests to the decode loop (their prefill); a failure fails them, and the loop goes on."""
        if not requests:
            return
        on_text = [functools.partial(_hand_over, r) if r.on_text else None for r in requests]
        try:
            self._decoding.admit([r.example for r in requests], [r.max_new_tokens for r in requests], on_text)
        except Exception as e:  # noqa: BLE001 - the worker outlives any failed prefill; its callers see the error
            for r in requests:
                r.future.set_exception(e)
        else:
            self._running.update((r.example.id, r) for r in requests)
        if not self._running:
            self._decoding = None

    def _advance(self) -> None:
        """One step of the decode loop: joiners are admitted, every request decodes a token, ended ones are
        answered; a failed step fails every request of the loop, which ends."""
        self._admit(self._joiners())
        if self._decoding is None:
            return
        rows = len(self._running)
        served = self.models[self._loop_model]
        try:
            answered = self._decoding.step()
        except Exception as e:  # noqa: BLE001 - the worker outlives any failed step; its callers see the error
            for r in self._running.values():
                r.future.set_exception(e)
            self._running, self._decoding = {}, None
            return
        self.steps, self.rows = self.steps + 1, self.rows + rows
        for example, prediction, batch_size in answered:
            self._resolve(self._running.pop(example.id), served, prediction, batch_size)
        if not self._running:
            self._decoding = None

    def _resolve(self, request: _Request, served: Served, prediction: Prediction, batch_size: float) -> None:
        try:
            answer = _answer(served, prediction, batch_size)
        except Exception as e:  # noqa: BLE001 - this request's error, not the loop's
            request.future.set_exception(e)
            return
        self.answered += 1
        request.future.set_result(answer)

    def _run(self, batch: list[_Request]) -> None:
        """Answers a batch with one ``predict`` (a predictor that cannot decode step by step)."""
        model, budget = batch[0].key
        served = self.models[model]
        examples = [r.example for r in batch]
        streaming = served.predictor.streams and any(r.on_text for r in batch)
        try:
            kwargs = {"on_text": lambda row, text: _hand_over(batch[row], text)} if streaming else {}
            predictions = served.predictor.predict(served.view, examples, budget, **kwargs)
            answers = [_answer(served, p, float(len(batch))) for p in predictions]
        except Exception as e:  # noqa: BLE001 - the worker outlives any failed batch; its callers see the error
            for r in batch:
                r.future.set_exception(e)
            return
        self.batches, self.steps, self.rows = self.batches + 1, self.steps + 1, self.rows + len(batch)
        self.answered += len(batch)
        for r, answer in zip(batch, answers, strict=True):
            r.future.set_result(answer)


def _answer(served: Served, p: Prediction, batch_size: float) -> Answer:
    tokenizer = getattr(served.predictor, "tokenizer", None)
    prompt_tokens = len(tokenizer(p.rendered, add_special_tokens=False)["input_ids"]) if tokenizer else 0
    return Answer(p, served.task.extract(p.output)["flexible"], prompt_tokens, batch_size)


def _hand_over(request: _Request, text: str) -> None:
    """Gives a streaming request its next piece of text; a failing receiver (its caller gone) costs the batch
    nothing: the request's answer still comes, through its future."""
    if request.on_text is not None:
        try:
            request.on_text(text)
        except Exception:  # noqa: BLE001 - one caller's failure must not end the other rows' generate
            log.warning("dropped a streamed piece of %s", request.example.id, exc_info=True)


def _drain(q: queue.Queue) -> list[Any]:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
