"""The serving engine: concurrent requests micro-batched into one batched ``predict`` call.

Requests arrive from any thread (``submit`` returns a ``concurrent.futures.Future``); one worker thread owns
the models and answers them. It takes the oldest waiting request, then gathers more for the same model and
token budget until it holds ``max_batch_size`` of them or ``max_wait_ms`` have passed, and answers them with
one ``predictor.predict(task, batch, budget)``: for MetaTuner, one batched generate in which every row has
its own generated prompt and its own generated LoRA. Requests for another model or budget wait for a later
batch, in arrival order. A request whose caller gave up (its future cancelled) is dropped before it runs.

A request may stream: its ``on_text`` receives its answer's text in pieces while the batched generate decodes
it (a predictor that cannot stream gives none, and its caller sends the answer whole from the future); the
other rows of the batch are unaffected, so streamed and whole requests share batches.

A system message replaces p~ for its request only: the engine's task view answers ``instruction_for`` with
the request's own instruction, which both G (whose input holds p~) and M read.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from metatuner.evaluation.predictors import Prediction, Predictor
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
    batch_size: int  # how many requests shared the batched generate that answered this one


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
    """Answers requests for named models in micro-batches, on one worker thread (see the module docstring)."""

    def __init__(self, models: dict[str, Served], max_batch_size: int = 8, max_wait_ms: float = 10.0):
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._held: collections.deque[_Request] = collections.deque()  # taken from the queue, for a later batch
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="metatuner-engine", daemon=True)
        self.batches = 0  # batched generates run so far
        self.answered = 0

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stops after the batch in progress; requests still waiting fail with RuntimeError."""
        self._stop.set()
        self._thread.join(timeout)
        for request in [*self._held, *_drain(self._queue)]:
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
            max_new_tokens: the answer's token budget; requests share a batch only with requests of the same
                model and budget.
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
        while not self._stop.is_set():
            batch = self._gather()
            if batch:
                self._run(batch)

    def _next(self, timeout: float) -> _Request | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=max(timeout, 0.0)) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self) -> list[_Request]:
        """The next batch: the oldest live request, plus later ones for the same model and budget that arrive
        within ``max_wait_ms``; the others are held, in order, for the next batches."""
        first = self._next(0.1)
        while first is not None and not first.future.set_running_or_notify_cancel():
            first = self._next(0.1)  # cancelled: its caller timed out before it ran
        if first is None:
            return []
        batch, later = [first], []
        held, self._held = self._held, collections.deque()
        for request in held:  # already waiting: they join without waiting more
            (batch if request.key == first.key and len(batch) < self.max_batch_size else later).append(request)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                request = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            (batch if request.key == first.key else later).append(request)
        self._held.extend(later)
        live = [first]
        live += [r for r in batch[1:] if r.future.set_running_or_notify_cancel()]
        return live

    def _run(self, batch: list[_Request]) -> None:
        model, budget = batch[0].key
        served = self.models[model]
        examples = [r.example for r in batch]
        streaming = served.predictor.streams and any(r.on_text for r in batch)
        try:
            kwargs = {"on_text": lambda row, text: _hand_over(batch[row], text)} if streaming else {}
            predictions = served.predictor.predict(served.view, examples, budget, **kwargs)
            tokenizer = getattr(served.predictor, "tokenizer", None)
            answers = [
                Answer(p, served.task.extract(p.output)["flexible"],
                       len(tokenizer(p.rendered, add_special_tokens=False)["input_ids"]) if tokenizer else 0, len(batch))
                for p in predictions
            ]
        except Exception as e:  # noqa: BLE001 - the worker outlives any failed batch; its callers see the error
            for r in batch:
                r.future.set_exception(e)
            return
        self.batches += 1
        self.answered += len(batch)
        for r, answer in zip(batch, answers, strict=True):
            r.future.set_result(answer)


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

