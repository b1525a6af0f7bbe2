"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching engine, run by uvicorn.

A thin layer: each route checks its request (``protocol``), makes one ``Engine.submit`` call and writes the
answer back; every error is a JSON body ``{"error": {...}}`` with a 4xx/5xx status, never a crash or a hang:

- 400 malformed JSON, missing or empty messages, no user message, bad or unsupported parameters, a query or
  system message over ``serve.max_input_chars``, ``max_tokens`` over ``serve.max_tokens``;
- 401 a missing or wrong API key, when the server has one (``Authorization: Bearer KEY``);
- 404 an unknown model or path; 413 a body whose Content-Length is over ``serve.max_body_bytes``;
- 504 no answer within ``serve.timeout_s`` (the request is dropped if it has not started); 503 shutting down.

``stream: true`` answers with server-sent events (``protocol``) once the answer's first piece is decoded, so the
errors above still come as statuses when they happen before it; ``serve.timeout_s`` bounds the whole stream, and
a failure after the first piece arrives as one ``data: {"error": {...}}`` event, without ``[DONE]``. A streamed
request shares batches as any other: its row's text goes out while its row decodes.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
uvicorn stops cleanly on SIGTERM or Ctrl-C: it stops accepting, finishes the requests in flight, then the
engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metatuner.config import ServeConfig
from metatuner.evaluation.predictors import Predictor
from metatuner.serving.engine import Answer, Engine, Served
from metatuner.serving.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    Completion, CompletionChunk, CompletionRequest, Extra, ModelCard, ModelList, TextChoice, TextChunkChoice, Usage,
    error_body,
)
from metatuner.tasks.base import Task

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status)


def create_app(engine: Engine, settings: ServeConfig, api_key: str | None = None) -> FastAPI:
    """The FastAPI app answering with ``engine``; starting and stopping the app starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="metatuner", description="OpenAI-compatible API over MetaTuner", lifespan=lifespan)

    @app.middleware("http")
    async def gate(request: Request, call_next):
        length = request.headers.get("content-length", "0")
        if not length.isdigit():
            return _error(400, "bad Content-Length header")
        if int(length) > settings.max_body_bytes:
            return _error(413, f"request body of {length} bytes exceeds serve.max_body_bytes={settings.max_body_bytes}",
                          code="request_too_large")
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                              "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body ({first.get('ctx', {}).get('error', 'invalid JSON')})")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return JSONResponse(error_body(f"{where}: {message}" if where else message, param=where or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code in (404, 405):
            return _error(e.status_code, f"no endpoint {request.method} {request.url.path}; endpoints: POST "
                          "/v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health", code="not_found")
        return _error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engine.models), "batches": engine.batches, "answered": engine.answered,
                "steps": engine.steps, "mean_batch_size": engine.mean_batch_size}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in engine.models])

    def checked(model: str, query: str, instruction: str | None, budget: int | None) -> int:
        """The request's token budget, after checking the model, the input sizes and the budget."""
        if model not in engine.models:
            raise ApiError(404, f"unknown model {model!r}; available: {', '.join(engine.models)}", code="model_not_found",
                           param="model")
        if not query.strip():
            raise ApiError(400, "the query (last user message or prompt) is empty")
        for what, text in (("query", query), ("system message", instruction or "")):
            if len(text) > settings.max_input_chars:
                raise ApiError(400, f"the {what} has {len(text)} characters; serve.max_input_chars allows "
                               f"{settings.max_input_chars}", code="context_length_exceeded")
        budget = budget or engine.budget(model)
        if budget > settings.max_tokens:
            raise ApiError(400, f"max_tokens={budget} exceeds serve.max_tokens={settings.max_tokens}", param="max_tokens")
        return budget

    def timed_out(future: Future) -> ApiError:
        future.cancel()  # dropped if it has not started
        return ApiError(504, f"no answer within serve.timeout_s={settings.timeout_s}s", "timeout", "timeout")

    def outcome(future: Future) -> Answer:
        """The answer of a finished request, or its failure as an ApiError."""
        try:
            return future.result(timeout=0)
        except RuntimeError as e:
            raise ApiError(503, str(e), "server_error", "unavailable") from None
        except Exception as e:  # noqa: BLE001 - a failed generate is this request's error, not the server's end
            raise ApiError(500, f"{type(e).__name__}: {e}", "server_error") from None

    async def answer(future: Future) -> Answer:
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
        except asyncio.TimeoutError:
            raise timed_out(future) from None
        except Exception:  # noqa: BLE001 - outcome says how it failed
            pass
        return outcome(future)

    def usage_and_extra(a: Answer, budget: int) -> dict:
        p = a.prediction
        return {"usage": Usage(prompt_tokens=a.prompt_tokens, completion_tokens=p.new_tokens,
                               total_tokens=a.prompt_tokens + p.new_tokens),
                "metatuner": Extra(prompt=p.instruction, answer=a.extracted, batch_size=a.batch_size)}

    def finish(a: Answer, budget: int) -> str:
        return "length" if a.prediction.new_tokens >= budget else "stop"

    async def streamed(chunks: Chunks, budget: int,
                       submit: Callable[[Callable[[str], None]], Future]) -> StreamingResponse:
        """Submits a streaming request (``submit(on_text)``) and answers with its events, once its first piece of
        text (or its whole answer) is there: a failure or timeout before that is still a status."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # the answer's text in pieces, then None: done
        future = submit(lambda text: _post(loop, pieces, text))
        future.add_done_callback(lambda _: _post(loop, pieces, None))
        deadline = loop.time() + settings.timeout_s

        async def next_piece() -> str | None:
            try:
                return await asyncio.wait_for(pieces.get(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise timed_out(future) from None

        first = await next_piece()
        if first is None:
            outcome(future)  # a failed request is answered with its status

        async def events() -> AsyncIterator[str]:
            sent, piece = "", first
            try:
                if (opening := chunks.opening()) is not None:
                    yield opening
                while piece is not None:
                    sent += piece
                    yield chunks.piece(piece)
                    piece = await next_piece()
                a = outcome(future)
                output = a.prediction.output
                if not output.startswith(sent):
                    log.warning("the streamed text %r is not the start of the answer %r", sent, output)
                elif len(output) > len(sent):  # a predictor that does not stream sends its answer whole here
                    yield chunks.piece(output[len(sent):])
                extra = usage_and_extra(a, budget)
                yield chunks.finish(finish(a, budget), extra["metatuner"])
                if chunks.include_usage:
                    yield chunks.usage(extra["usage"])
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield _event(e.body)
            finally:
                future.cancel()  # a client gone before its request ran: the request is dropped

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        query, instruction = body.query(), body.instruction()
        budget = checked(body.model, query, instruction, body.budget())
        if body.stream:
            return await streamed(Chunks(True, body.model, body.include_usage()), budget,
                                  lambda on_text: engine.submit(body.model, query, budget, instruction, on_text))
        a = await answer(engine.submit(body.model, query, budget, instruction))
        choice = ChatChoice(message=AssistantMessage(content=a.prediction.output), finish_reason=finish(a, budget))
        return ChatCompletion(model=body.model, choices=[choice], **usage_and_extra(a, budget))

    @app.post("/v1/completions", response_model=Completion)
    async def complete(body: CompletionRequest) -> Completion | StreamingResponse:
        budget = checked(body.model, body.query(), None, body.budget())
        if body.stream:
            return await streamed(Chunks(False, body.model, body.include_usage()), budget,
                                  lambda on_text: engine.submit(body.model, body.query(), budget, on_text=on_text))
        a = await answer(engine.submit(body.model, body.query(), budget))
        choice = TextChoice(text=a.prediction.output, finish_reason=finish(a, budget))
        return Completion(model=body.model, choices=[choice], **usage_and_extra(a, budget))

    return app


class Chunks:
    """The server-sent events of one streamed answer: chat (``chat.completion.chunk``) or text completion chunks,
    all with one id and creation time; ``usage: null`` in each when the usage comes at the end."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def opening(self) -> str | None:
        """The first event: the role, for chat; none for text completions."""
        return self._event([ChatChunkChoice(delta={"role": "assistant", "content": ""})]) if self.chat else None

    def piece(self, text: str) -> str:
        return self._event([ChatChunkChoice(delta={"content": text}) if self.chat else TextChunkChoice(text=text)])

    def finish(self, reason: str, extra: Extra) -> str:
        """The last chunk with a choice: no text, the finish reason, and this server's extras."""
        choice = (ChatChunkChoice(delta={}, finish_reason=reason) if self.chat
                  else TextChunkChoice(text="", finish_reason=reason))
        return self._event([choice], extra=extra)

    def usage(self, usage: Usage) -> str:
        return self._event([], usage=usage)

    def _event(self, choices: list, usage: Usage | None = None, extra: Extra | None = None) -> str:
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        body = kind(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                    metatuner=extra).model_dump(mode="json")
        if not self.include_usage:
            del body["usage"]
        if extra is None:
            del body["metatuner"]
        return _event(body)


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: Any) -> None:
    """Puts ``item`` on an asyncio queue from another thread; nothing when the loop has closed (no listener)."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from metatuner.errors import MetatunerError

        raise MetatunerError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    return sock


def serve(models: dict[str, tuple[Predictor, Task]], settings: ServeConfig, api_key: str | None = None) -> None:
    """Serves ``models`` (name -> (predictor, task)) until SIGTERM / Ctrl-C; prints the address when ready."""
    import uvicorn

    engine = Engine({name: Served(p, t) for name, (p, t) in models.items()}, settings.max_batch_size,
                    settings.max_wait_ms)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(engine, settings, api_key), log_level="warning",
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    server = uvicorn.Server(config)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    print(f"serving {', '.join(models)} at {url} (batches of up to {settings.max_batch_size} requests, "
          f"{settings.max_wait_ms:g} ms){'; API key required' if api_key else ''}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it found: a no-op
    # one here, so the command ends normally (exit 0) after a clean shutdown
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if on_main else None
    try:
        server.run(sockets=[sock])
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    print("server stopped", flush=True)
