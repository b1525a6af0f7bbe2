"""The OpenAI-compatible server, called with real clients (openai; DSPy when installed) on a free localhost port:
served answers equal `metatuner generate`'s, concurrent requests share one batched generate with per-row prompts
and LoRA and answer exactly as alone, bad requests get JSON 4xx errors, and SIGTERM stops the server cleanly.
The engine's batching rules are tested on a scripted predictor, without a model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from metatuner.cli import main
from metatuner.config import ServeConfig
from metatuner.evaluation.predictors import Prediction, Predictor
from metatuner.serving.engine import Engine, Served
from metatuner.serving.server import bind, create_app
from metatuner.tasks import get_task
from metatuner.tasks.base import Example

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"file:{ROOT / 'examples' / 'capitals.yaml'}"
KEY = "sk-test"
QUERIES = ["What is the capital of Peru?", "What is the capital of Kenya?", "Who wrote Hamlet?", "2+2?",
           "What is the capital of a country with a long name, such as the United Arab Emirates?"]
TINY_TRAIN = [
    "train.steps=4", "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=6", "train.save_every=4",
    "train.actor_warmup_steps=2", "train.generator_warmup_queries=2", "train.generator_warmup_steps=1",
    "train.lr_static=0.05", "train.lr_hypernet=0.05", "data.train_limit=8", "data.val_size=2", "train.gate=false",
]


@contextlib.contextmanager
def running(app):
    """Serves ``app`` on a free 127.0.0.1 port in a thread; yields its base URL; always shuts it down."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


# ---- a real tiny model behind the server -------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, lively_model_dir):
    run = tmp_path_factory.mktemp("serve") / "run"
    assert main(["train", "--task", SPEC, "--model", str(lively_model_dir), "--out", str(run), "--no-eval", *TINY_TRAIN]) == 0
    return run


@pytest.fixture(scope="module")
def served(run_dir):
    """MetaTuner and zero-shot behind one server, micro-batching up to 8 requests within 300 ms."""
    from metatuner.recipes import named_predictors

    found, _ = named_predictors(run_dir, ["zero-shot"], None)
    settings = ServeConfig(max_batch_size=8, max_wait_ms=300, max_input_chars=200, max_tokens=64, max_body_bytes=4000)
    engine = Engine({n: Served(p, t) for n, (p, t) in found.items()}, settings.max_batch_size, settings.max_wait_ms)
    with running(create_app(engine, settings, api_key=KEY)) as url:
        yield url, engine


def generated(run_dir, query, tmp_path) -> dict:
    out = tmp_path / f"g{abs(hash(query))}.jsonl"
    assert main(["generate", "--run", str(run_dir), "--question", query, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_served_answers_equal_metatuner_generate(served, run_dir, tmp_path):
    url, _ = served
    api = client(url)
    assert sorted(m.id for m in api.models.list()) == ["metatuner", "zero-shot"]
    for query in QUERIES[:2]:
        want = generated(run_dir, query, tmp_path)
        chat = api.chat.completions.create(model="metatuner", messages=[{"role": "user", "content": query}])
        text = api.completions.create(model="metatuner", prompt=query)
        assert chat.choices[0].message.content == text.choices[0].text == want["output"] != ""
        assert chat.model_extra["metatuner"]["prompt"] == want["prompt"] == text.model_extra["metatuner"]["prompt"]
        assert chat.model_extra["metatuner"]["answer"] == want["answer"]
        assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > chat.usage.completion_tokens


def test_export_of_a_run_on_a_spec_task(run_dir, tmp_path, monkeypatch, capsys):
    import errno

    from metatuner import files

    # every file of the adapter, PEFT's adapter_config.json first, goes through the crash-safe write path: a
    # full disk there is one line, and no adapter folder (complete or not) appears
    real = files._write_all

    def full_disk(fd, data):
        os.write(fd, data[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", full_disk)
    assert main(["export", "--run", str(run_dir), "--query", QUERIES[0], "--out", str(tmp_path / "adapter")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"metatuner: error: cannot write {tmp_path / 'adapter' / 'adapter_config.json'}: No space left on device")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(files, "_write_all", real)

    assert main(["export", "--run", str(run_dir), "--query", QUERIES[0], "--out", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "query.json").read_text())["task"] == "capitals"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_system_message_replaces_the_initial_prompt(served):
    url, _ = served
    api = client(url)
    system = "Reply with one word."
    for model in ("metatuner", "zero-shot"):
        chat = api.chat.completions.create(model=model, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": QUERIES[0]}])
        assert chat.model_extra["metatuner"]["prompt"].startswith(system)  # MetaTuner may append its hint
    plain = api.chat.completions.create(model="zero-shot", messages=[{"role": "user", "content": QUERIES[0]}])
    assert plain.model_extra["metatuner"]["prompt"] == get_task(SPEC).instruction


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Polls ``condition`` until it holds; fails after ``timeout`` seconds (generous: a loaded machine is slow)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def held(engine):
    """Keeps ``engine``'s worker busy (on a request of a model of its own) until the block ends, so requests
    sent meanwhile all wait in its queue, however slowly they arrive: the batches they then form do not
    depend on the machine's speed."""
    task, gate = get_task(SPEC), threading.Event()
    engine.models["gate"] = Served(Scripted(gate=gate), task)
    try:
        busy = engine.submit("gate", "hold", 8)
        wait_until(lambda: engine.models["gate"].predictor.batches, "the engine runs the holding request")
        yield
    finally:
        gate.set()
        busy.result(timeout=60)
        del engine.models["gate"]


def test_concurrent_requests_share_a_batch_and_answer_as_alone(served):
    url, engine = served
    api = client(url)
    models = ["metatuner", "zero-shot"]
    alone = {(m, q): api.chat.completions.create(model=m, messages=[{"role": "user", "content": q}])
             for m in models for q in QUERIES}

    def ask(job):
        m, q = job
        return job, api.chat.completions.create(model=m, messages=[{"role": "user", "content": q}])

    jobs = [(m, q) for q in QUERIES for m in models]
    with ThreadPoolExecutor(len(jobs)) as pool:
        with held(engine):  # all ten requests are in the queue before the engine gathers a batch
            replies = [pool.submit(ask, job) for job in jobs]
            wait_until(lambda: engine._queue.qsize() == len(jobs), "every request waits in the queue")
            batches = engine.batches
        together = dict(r.result() for r in replies)
    for job, reply in together.items():
        assert reply.choices[0].message.content == alone[job].choices[0].message.content
        assert reply.model_extra["metatuner"]["prompt"] == alone[job].model_extra["metatuner"]["prompt"]
    # one batched generate per model (max_batch_size 8 >= 5 queries each), after the holding request's
    assert [r.model_extra["metatuner"]["batch_size"] for r in together.values()] == [len(QUERIES)] * len(jobs)
    assert engine.batches - batches == 1 + len(models)
    # per-row prompts and LoRA: different queries of one batch got different answers
    assert len({together[("metatuner", q)].choices[0].message.content for q in QUERIES}) > 1


# ---- streaming: server-sent events in OpenAI's chunk format ---------------------------------------------
def chat_stream(api, model: str, query: str, **kwargs) -> list:
    """The chunks of a streamed chat answer, read with the openai client's streaming API."""
    return list(api.chat.completions.create(model=model, messages=[{"role": "user", "content": query}], stream=True,
                                            **kwargs))


def test_streamed_answers_join_to_the_whole_answers(served):
    url, _ = served
    api = client(url)
    cases = [("metatuner", QUERIES[0], {}, True), ("zero-shot", QUERIES[1], {"max_completion_tokens": 5}, False),
             ("metatuner", QUERIES[2], {"max_tokens": 4, "stop": ["\n\n"], "seed": 3, "user": "u"}, True)]
    for model, query, options, include_usage in cases:
        whole = api.chat.completions.create(model=model, messages=[{"role": "user", "content": query}], **options)
        chunks = chat_stream(api, model, query, **options,
                             **({"stream_options": {"include_usage": True}} if include_usage else {}))
        if not include_usage:  # no usage chunk unless asked for
            assert chunks[-1].choices and chunks[-1].usage is None
            chunks.append(chunks[-1].model_copy(update={"choices": [], "usage": whole.usage}))
        opening, *pieces, finish, usage = chunks
        assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
        assert opening.choices[0].delta.role == "assistant" and opening.choices[0].delta.content == ""
        text = [c.choices[0].delta.content for c in pieces]
        assert "".join(text) == whole.choices[0].message.content != ""
        assert len(text) > 1  # token by token, not the whole answer at once
        assert all(c.choices[0].finish_reason is None and "metatuner" not in c.model_extra for c in [opening, *pieces])
        assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
        assert finish.choices[0].delta.content is None
        assert finish.model_extra["metatuner"] == whole.model_extra["metatuner"]  # the prompt, the answer, batch of 1
        assert usage.choices == [] and usage.usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 4

    whole = api.completions.create(model="metatuner", prompt=QUERIES[3], max_tokens=6)
    chunks = list(api.completions.create(model="metatuner", prompt=QUERIES[3], max_tokens=6, stream=True,
                                         stream_options={"include_usage": True}))
    *pieces, finish, usage = chunks
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text and len(pieces) > 1
    assert finish.choices[0].text == "" and finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish.model_extra["metatuner"] == whole.model_extra["metatuner"]
    assert usage.choices == [] and usage.usage == whole.usage


def test_streamed_requests_share_a_batch_with_whole_ones(served):
    url, engine = served
    api = client(url)
    alone = [api.chat.completions.create(model="metatuner", messages=[{"role": "user", "content": q}])
             for q in QUERIES[:3]]

    def ask(i: int):
        if i == 0:  # streamed chat
            chunks = chat_stream(api, "metatuner", QUERIES[0])
            return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].model_extra["metatuner"]
        if i == 1:  # streamed completion
            chunks = list(api.completions.create(model="metatuner", prompt=QUERIES[1], stream=True))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].model_extra["metatuner"]
        whole = api.chat.completions.create(model="metatuner", messages=[{"role": "user", "content": QUERIES[2]}])
        return whole.choices[0].message.content, whole.model_extra["metatuner"]

    with ThreadPoolExecutor(3) as pool:
        with held(engine):  # all three wait in the queue before the engine gathers a batch
            replies = [pool.submit(ask, i) for i in range(3)]
            wait_until(lambda: engine._queue.qsize() == 3, "every request waits in the queue")
            batches = engine.batches
        together = [r.result() for r in replies]
    assert engine.batches - batches == 2  # the holding request's, then one batched generate for all three
    for (text, extra), whole in zip(together, alone):
        assert text == whole.choices[0].message.content and extra["batch_size"] == 3
        assert extra["prompt"] == whole.model_extra["metatuner"]["prompt"]


def test_pieces_reach_each_request_while_its_batch_decodes(served):
    _, engine = served
    seen: list[tuple[int, str, bool]] = []  # (request, piece, whether its answer was out already)
    futures = {}
    with held(engine):  # both are queued before the engine gathers: they share one batched generate
        for i, query in enumerate(QUERIES[:2]):
            futures[i] = engine.submit("metatuner", query, 8,
                                       on_text=lambda t, i=i: seen.append((i, t, futures[i].done())))
    answers = [futures[i].result(timeout=60) for i in range(2)]
    for i, answer in enumerate(answers):
        pieces = [t for j, t, _ in seen if j == i]
        assert "".join(pieces) == answer.prediction.output and len(pieces) > 1 and answer.batch_size == 2
    assert not any(done for *_, done in seen)  # every piece went out before the batch's answers


def test_pieces_join_to_the_stripped_text_cut_at_the_first_stop(tiny_tokenizer):
    import torch
    from conftest import make_model

    from metatuner.evaluation.generation import RowStreamer, generate

    tok, stop = tiny_tokenizer, ("STOP", "\n\n")
    rows = [tok(text, add_special_tokens=False)["input_ids"] for text in ["  \n Hi  there \n", "abSTOPcd", "xyST y  z"]]
    rows.append(tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + rows[0])
    got: dict[int, list[str]] = {i: [] for i in range(len(rows))}
    streamer = RowStreamer(tok, {tok.eos_token_id, tok.pad_token_id}, stop, lambda row, text: got[row].append(text))
    streamer.put(torch.zeros(len(rows), 3, dtype=torch.long))  # the prompt, which is not streamed
    for step in range(max(map(len, rows))):  # as generate does: one [bs] column of new tokens per step
        streamer.put(torch.tensor([ids[step] if step < len(ids) else tok.pad_token_id for ids in rows]))
    streamer.end()
    assert {i: "".join(p) for i, p in got.items()} == {0: "Hi  there", 1: "ab", 2: "xyST y  z", 3: "ok"}
    assert got[0] == ["H", "i", "  t", "h", "e", "r", "e"]  # whitespace waits for what follows it
    assert got[2] == ["x", "y", "ST", " y", "  z"]  # "S", then "ST", held while they could begin "STOP"

    # and through model.generate, stop strings included: every row's pieces join to its returned text
    model = make_model(tok, init_range=0.2)
    queries = QUERIES[:3]
    plain = generate(model, tok, queries, 12)
    start = plain[1].text[1:3]  # a stop string that begins in the text and never ends there
    never = start + next(c for c in string.punctuation if all(start + c not in g.text for g in plain))
    texts = {}
    for stop in [(), (plain[0].text[2:4],), (never,)]:
        got = {i: [] for i in range(len(queries))}
        gens = generate(model, tok, queries, 12, stop, on_text=lambda row, text: got[row].append(text))
        assert ["".join(got[i]) for i in range(len(queries))] == [g.text for g in gens]
        texts[stop] = [g.text for g in gens]
    cut, held = list(texts.values())[1:]
    assert len(cut[0]) <= 2 < len(plain[0].text) and held == [g.text for g in plain]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ("{not json", 400, "malformed JSON body"),
        ('{"model": "metatuner"}', 400, "messages: Field required"),
        ('{"model": "metatuner", "messages": []}', 400, "messages: List should have at least 1 item"),
        ('{"model": "metatuner", "messages": [{"role": "system", "content": "x"}]}', 400, "no user message"),
        ('{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "unknown model 'gpt-9'; available: metatuner, zero-shot"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "' + "x" * 300 + '"}]}', 400, "allows 200"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}', 400, "exceeds serve.max_tokens=64"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n must be 1"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream: Input should be a valid boolean"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": 5}', 400, "stream_options: Input should be a valid dictionary"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": "yes"}}', 400, "stream_options.include_usage: Input should be a valid boolean"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}', 400, "stream_options is only allowed with stream=true"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 1000}', 400, "exceeds serve.max_tokens=64"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "stream": true, "n": 2}', 400, "n must be 1"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}', 400, "temperature"),
        ('{"model": "metatuner", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role"),
        ('{"model": "metatuner", "messages": [{"role": "user", "content": "' + "x" * 5000 + '"}]}', 413, "exceeds serve.max_body_bytes"),
    ],
)
def test_bad_requests_get_json_errors(served, body, status, message):
    import httpx2 as httpx

    url, _ = served
    reply = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == status and message in reply.json()["error"]["message"], reply.text
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"  # still serving


def test_the_api_key_is_required_when_set(served):
    import httpx2 as httpx
    import openai

    url, _ = served
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # no key
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "sk-wrong").models.list()
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # health needs no key
    assert httpx.get(f"{url}/v2/nothing", timeout=30).json()["error"]["code"] == "not_found"


def test_dspy_as_a_client(served):
    dspy = pytest.importorskip("dspy")
    url, _ = served
    lm = dspy.LM("openai/zero-shot", api_base=f"{url}/v1", api_key=KEY, cache=False, max_tokens=16)
    direct = client(url).chat.completions.create(model="zero-shot", messages=[{"role": "user", "content": QUERIES[0]}],
                                                  max_tokens=16)
    assert lm(QUERIES[0])[0] == direct.choices[0].message.content  # DSPy sends it as the one user message


def test_sigterm_stops_the_server_cleanly(lively_model_dir):
    import httpx2 as httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "metatuner.cli", "serve", "--method", "zero-shot", "--model", str(lively_model_dir),
         "--task", SPEC, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        line = proc.stdout.readline()  # "serving zero-shot at http://127.0.0.1:PORT/v1 ..." once it listens
        assert line.startswith("serving zero-shot at http://127.0.0.1:"), line + proc.stdout.read()
        url = line.split(" at ")[1].split()[0]
        reply = httpx.post(f"{url}/chat/completions", json={"model": "zero-shot", "messages": [
            {"role": "user", "content": QUERIES[0]}]}, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the engine's batching rules, on a scripted predictor ----------------------------------------
class Scripted(Predictor):
    """Answers each query with its text reversed, once ``gate`` (if any) is open; records every batch."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.batches = gate, []

    def predict(self, task, examples, max_new_tokens):
        self.batches.append([ex.query for ex in examples])
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        return [Prediction(task.instruction_for(ex), ex.query, ex.query[::-1], 1) for ex in examples]


def test_the_engine_batches_by_model_and_budget_up_to_its_size():
    task = get_task(SPEC)
    gate = threading.Event()
    a, b = Scripted(gate), Scripted()
    engine = Engine({"a": Served(a, task), "b": Served(b, task)}, max_batch_size=3, max_wait_ms=100).start()
    try:
        first = engine.submit("a", "q0", 8)  # alone after 100 ms, it occupies the worker while the rest queue up
        wait_until(lambda: a.batches, "q0 runs")
        futures = [engine.submit("a", f"q{i}", 8) for i in range(1, 5)]
        futures += [engine.submit("b", "x", 8), engine.submit("a", "long", 16),
                    engine.submit("a", "own p~", 8, instruction="Be brief.")]
        gate.set()  # every request is queued: what follows depends on their order only, not on timing
        answers = [f.result(timeout=60) for f in [first, *futures]]
    finally:
        gate.set()
        engine.stop()
    assert [x.prediction.output for x in answers] == ["0q", "1q", "2q", "3q", "4q", "x", "gnol", "~p nwo"]
    assert a.batches == [["q0"], ["q1", "q2", "q3"], ["q4", "own p~"], ["long"]] and b.batches == [["x"]]
    assert answers[-1].prediction.instruction == "Be brief." and answers[1].prediction.instruction == task.instruction


class Failing(Scripted):
    """Streams ``piece`` (if any) of the first answer, then fails."""

    streams = True

    def __init__(self, piece: str | None):
        super().__init__()
        self.piece = piece

    def predict(self, task, examples, max_new_tokens, on_text=None):
        if self.piece:
            on_text(0, self.piece)
        raise ValueError("the model fell over")


def test_streams_from_predictors_that_cannot_stream_fail_or_time_out():
    import openai

    task = get_task(SPEC)
    gate = threading.Event()
    engine = Engine({"whole": Served(Scripted(), task), "slow": Served(Scripted(gate), task),
                     "fails-first": Served(Failing(None), task), "fails-later": Served(Failing("par"), task)},
                    max_batch_size=1, max_wait_ms=0)
    with running(create_app(engine, ServeConfig(timeout_s=0.5))) as url:
        api = client(url)
        # a predictor without pieces: the answer goes out whole, in one chunk, when its batch is done
        chunks = chat_stream(api, "whole", "abc")
        assert [c.choices[0].delta.content for c in chunks] == ["", "cba", None]
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["metatuner"]["answer"] == "cba"
        # before the first piece, a failure or a timeout is still a status; after it, an error event ends the stream
        with pytest.raises(openai.InternalServerError) as e:
            chat_stream(api, "fails-first", "abc")
        assert e.value.status_code == 500 and "ValueError: the model fell over" in e.value.body["message"]
        with pytest.raises(openai.APIError, match="ValueError: the model fell over"):
            chat_stream(api, "fails-later", "abc")
        try:
            with pytest.raises(openai.InternalServerError) as e:
                list(api.completions.create(model="slow", prompt="abc", stream=True))
            assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        finally:
            gate.set()


def test_a_timed_out_request_is_dropped_and_the_server_keeps_serving():
    import httpx2 as httpx

    task = get_task(SPEC)
    gate = threading.Event()
    slow = Scripted(gate)  # the first request runs until both have timed out, however slow the machine
    engine = Engine({"slow": Served(slow, task)}, max_batch_size=1, max_wait_ms=0)
    with running(create_app(engine, ServeConfig(timeout_s=0.2))) as url:
        try:
            with ThreadPoolExecutor(2) as pool:
                replies = list(pool.map(lambda q: httpx.post(f"{url}/v1/completions",
                                                             json={"model": "slow", "prompt": q}, timeout=30),
                                        ["first", "second"]))
        finally:
            gate.set()
        assert [r.status_code for r in replies] == [504, 504]
        assert all(r.json()["error"]["code"] == "timeout" for r in replies)
        # the engine answers in order: once a later request is answered, the one that timed out while
        # waiting has been passed over
        assert engine.submit("slow", "third", 8).result(timeout=60).prediction.output == "driht"
        assert len(slow.batches) == 2 and slow.batches[1] == ["third"]  # the one that waited never ran
        assert httpx.get(f"{url}/health", timeout=30).json()["answered"] == 2


class Stepping(Predictor):
    """Decodes step by step without a model: a query's answer is its text reversed, after as many steps as its
    budget. Each step is recorded (the queries in it), then waits for ``gate`` (if any); a query "bad prefill"
    fails its admission, and a step with "bad step" in it fails."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.steps = gate, []

    def predict(self, task, examples, max_new_tokens):
        raise AssertionError("a predictor that decodes step by step is never answered whole")

    def start(self, task):
        return SteppingLoop(self, task)


class SteppingLoop:
    def __init__(self, predictor: Stepping, task):
        self.predictor, self.task, self.rows = predictor, task, []

    def __len__(self):
        return len(self.rows)

    def admit(self, examples, budgets, on_text=None):
        if any(ex.query == "bad prefill" for ex in examples):
            raise ValueError("the prefill fell over")
        self.rows += [[ex, budget] for ex, budget in zip(examples, budgets)]

    def step(self):
        self.predictor.steps.append([ex.query for ex, _ in self.rows])
        if self.predictor.gate is not None:
            assert self.predictor.gate.wait(60), "the test never opened the gate"
        if any(ex.query == "bad step" for ex, _ in self.rows):
            raise ValueError("the step fell over")
        for row in self.rows:
            row[1] -= 1
        done, self.rows = [r for r in self.rows if not r[1]], [r for r in self.rows if r[1]]
        return [(ex, Prediction(self.task.instruction_for(ex), ex.query, ex.query[::-1], 1), 1.0) for ex, _ in done]


def test_requests_join_a_running_decode_loop_and_models_take_turns():
    task = get_task(SPEC)
    gate = threading.Event()
    a, b = Stepping(gate), Stepping()
    engine = Engine({"a": Served(a, task), "b": Served(b, task)}, max_batch_size=3, max_wait_ms=0).start()
    try:
        first = engine.submit("a", "a0", 3)  # alone, it holds the worker in its first step while the rest queue up
        wait_until(lambda: a.steps, "a0's first step runs")
        futures = [engine.submit("a", "a1", 1), engine.submit("a", "gone", 1), engine.submit("b", "b0", 2),
                   engine.submit("a", "a2", 1)]
        futures[1].cancel()  # its caller gave up before it ran
        gate.set()  # every request is queued: what follows depends on their order only, not on timing
        answers = [f.result(timeout=60) for f in [first, futures[0], futures[2], futures[3]]]
    finally:
        gate.set()
        engine.stop()
    assert [x.prediction.output for x in answers] == ["0a", "1a", "0b", "2a"]
    # a1 joins a0's loop between steps and leaves after its one step; a2 came after b0, so it waits for b's turn
    assert a.steps == [["a0"], ["a0", "a1"], ["a0"], ["a2"]] and b.steps == [["b0"], ["b0"]]
    assert engine.batches == 3 and engine.answered == 4
    assert engine.steps == 6 and engine.mean_batch_size == 7 / 6


def test_a_failed_prefill_or_step_fails_its_requests_and_the_worker_goes_on():
    task = get_task(SPEC)
    gate = threading.Event()
    a = Stepping(gate)
    engine = Engine({"a": Served(a, task)}, max_batch_size=4, max_wait_ms=0).start()
    try:
        first = engine.submit("a", "a0", 2)
        wait_until(lambda: a.steps, "a0's first step runs")
        joiner = engine.submit("a", "bad prefill", 2)
        gate.set()
        assert first.result(timeout=60).prediction.output == "0a"  # the loop went on without the failed joiner
        with pytest.raises(ValueError, match="the prefill fell over"):
            joiner.result(timeout=60)
        gate.clear()
        futures = [engine.submit("a", "a1", 5)]
        wait_until(lambda: len(a.steps) == 3, "a1's first step runs")
        futures.append(engine.submit("a", "bad step", 1))
        gate.set()
        for future in futures:  # one failed step fails every request of its loop
            with pytest.raises(ValueError, match="the step fell over"):
                future.result(timeout=60)
        assert engine.submit("a", "a2", 1).result(timeout=60).prediction.output == "2a"
    finally:
        gate.set()
        engine.stop()
    assert a.steps[-1] == ["a2"] and engine.answered == 2


def test_a_short_answer_leaves_while_a_long_one_decodes_and_a_request_joins_meanwhile(lively_model_dir):
    from metatuner.evaluation.predictors import LMPredictor
    from metatuner.models.loading import load_model

    model, tok = load_model(str(lively_model_dir))
    predictor, task = LMPredictor(model, tok), get_task(SPEC)
    engine = Engine({"m": Served(predictor, task)}, max_batch_size=4, max_wait_ms=0).start()
    budgets = {QUERIES[0]: 24, QUERIES[1]: 2, QUERIES[2]: 3}
    alone = {q: predictor.predict(Served(predictor, task).view, [Example(id=q, query=q, answer="", target="")], b)[0]
             for q, b in budgets.items()}
    done, futures = [], {}

    def first_piece(text):  # on the worker, between two steps of the long answer: a new request arrives
        if QUERIES[2] not in futures:
            futures[QUERIES[2]] = engine.submit("m", QUERIES[2], budgets[QUERIES[2]])
            futures[QUERIES[2]].add_done_callback(lambda _: done.append(QUERIES[2]))

    try:
        with held(engine):  # the first two start one decode loop together
            for q in QUERIES[:2]:
                futures[q] = engine.submit("m", q, budgets[q], on_text=first_piece if q == QUERIES[0] else None)
                futures[q].add_done_callback(lambda _, q=q: done.append(q))
        wait_until(lambda: len(done) == 3, "every request is answered")
        answers = {q: f.result(timeout=0) for q, f in futures.items()}
    finally:
        engine.stop()
    for q, answer in answers.items():
        assert answer.prediction == alone[q]
    assert done == [QUERIES[1], QUERIES[2], QUERIES[0]]  # each left as soon as its answer ended
    assert engine.batches == 2  # the holding request's, then one decode loop: the joiner was answered by it
    assert 1 < answers[QUERIES[2]].batch_size <= 2 and answers[QUERIES[0]].batch_size < 2
