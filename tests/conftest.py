"""Shared fixtures: a tiny random Llama and a character-level tokenizer with a ChatML template.

Everything is built from a config here (no network, no downloads), small enough that a forward pass
takes milliseconds. The model folder is written once per session so tests can also load it by path.
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import pytest
import torch

# tests never touch the network: hub look-ups fail at once instead of timing out
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# tiny models gain nothing from threads, and oversubscribed cores make small ops very slow
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.printable)
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(tokenizer, layers: int = 4, seed: int = 0, init_range: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init_range,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model saved with larger random weights: its greedy answers are not empty and differ between
    queries."""
    path = tmp_path_factory.mktemp("lively")
    make_model(tiny_tokenizer, init_range=0.2).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} not present")
    return SHARED_DATA


# ---- pytest-xdist ------------------------------------------------------------------------------------
# The fault-injection tally (tests/faults/conftest.py) is counted where the tests run, in the workers; each
# worker hands its counts over when it ends (its pytest_sessionfinish), and they are added up here, in the
# controller, which prints them with the fault suite's own summary.
@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    counted = getattr(node, "workeroutput", {}).get("fault tally")
    if counted:
        from faults.conftest import TALLY

        _add_counts(TALLY, counted)


def _add_counts(into, counted: dict) -> None:
    """Adds the numbers of ``counted`` (a worker's tally: counts by name, maybe nested by part) to ``into``."""
    for key, value in counted.items():
        if isinstance(value, dict):
            _add_counts(into[key] if isinstance(into, dict) else getattr(into, key), value)
        else:
            into[key] += value


def pytest_terminal_summary(terminalreporter, config):
    faults = sys.modules.get("faults.conftest")  # imported by pytest_testnodedown, or collected here
    if faults is not None and not config.pluginmanager.is_registered(faults):  # else its own hook prints
        faults.pytest_terminal_summary(terminalreporter)


def script_validation_scores(monkeypatch, generated: float, initial: float) -> None:
    """The harness scores MetaTuner's validation as ``generated`` with G's prompts and ``initial`` with p~
    (its answers are still computed), so a test decides what the validation gate sees."""
    from metatuner.evaluation import harness

    real = harness.evaluate

    def scored(predictor, task, examples, **kw):
        result = real(predictor, task, examples, **kw)
        result.metrics[result.primary_metric]["mean"] = generated if predictor.prompts == "generated" else initial
        return result

    monkeypatch.setattr(harness, "evaluate", scored)
