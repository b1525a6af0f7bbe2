"""Training checkpoints: trainable state only, atomic on disk, exact on resume.

A checkpoint is a folder ``run_dir/checkpoints/step-000123/`` holding

- ``trainable.safetensors``: the tensors the caller passes (never frozen base weights);
- ``optimizer.safetensors`` + ``optimizer.json``: every tensor of ``optimizer.state_dict()["state"]``
  under ``state.{param_idx}.{name}``; param groups and non-tensor state values in JSON;
- ``scheduler.json``: the scheduler's ``state_dict()`` (it must be JSON-serialisable);
- ``rng.safetensors`` + ``rng.json``: torch CPU (and CUDA) RNG states; python and numpy RNG states;
- ``state.json``: ``{"step": step, "extra": extra}`` with the caller's JSON data (data position, ...).

``run_dir/checkpoints/latest`` names the newest complete folder. Usage::

    save_checkpoint(run_dir, step, {n: p for n, p in model.named_parameters() if p.requires_grad},
                    optimizer, scheduler, {"data_position": i})
    if (path := latest_checkpoint(run_dir)) is not None:
        tensors, state = load_checkpoint(path, optimizer, scheduler)  # restores optimizer, scheduler, RNGs
        model.load_state_dict(tensors, strict=False)
        start = state["step"]

Saving writes into a hidden temporary sibling folder, moves it into place with ``os.replace`` and then
replaces ``latest`` the same way, so a crash at any point leaves the previous checkpoint and ``latest``
intact. Resuming reproduces parameters, optimizer state, learning rate and random draws bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metatuner.errors import MetatunerError
from metatuner.files import write_text_atomic

STEP_DIR = re.compile(r"step-(\d+)")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous copy: safetensors refuses tensors that share storage (tied weights, views)
    return t.detach().to("cpu", copy=True).contiguous()


def _to_json(obj, what: str) -> str:
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise MetatunerError(f"checkpoint {what} is not JSON-serialisable: {exc}") from None


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler, extra: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints``, point ``latest`` at it, keep the newest ``keep``.

    Returns the checkpoint folder. Everything is serialised before anything is written, so bad input
    (a non-JSON ``extra``) fails without touching disk.
    """
    if keep < 1:
        raise MetatunerError(f"checkpoint keep must be >= 1, got {keep}")
    opt = optimizer.state_dict()
    opt_tensors, opt_values = {}, {}
    for idx, values in opt["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"state.{idx}.{name}"] = _cpu(value)
            else:
                opt_values.setdefault(str(idx), {})[name] = value
    rng_tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng_tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng_json = {"python": [py_version, list(py_state), py_gauss],
                "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    texts = {
        "optimizer.json": _to_json({"param_groups": opt["param_groups"], "state": opt_values}, "optimizer state"),
        "scheduler.json": _to_json(scheduler.state_dict(), "scheduler state"),
        "rng.json": _to_json(rng_json, "RNG state"),
        "state.json": _to_json({"step": step, "extra": extra}, "extra state"),
    }

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: _cpu(v) for k, v in tensors.items()}, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors, tmp / "rng.safetensors")
        for fname, text in texts.items():
            (tmp / fname).write_text(text)
        if final.exists():  # re-saving a step: os.replace cannot overwrite a non-empty folder
            old = root / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", name + "\n")

    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir())
    for _, old in steps[:-keep]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``run_dir/checkpoints/latest`` names, or None when no checkpoint was completed."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = latest.parent / latest.read_text().strip()
    if not path.is_dir():
        raise MetatunerError(f"{latest} names {path.name}, which does not exist")
    return path


def _match_types(saved, current):
    """JSON turns tuples (AdamW ``betas``) into lists; give values back the type the optimizer uses."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def read_trainable(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors and ``state.json`` of a checkpoint, for inference (no optimizer, no RNG)."""
    path = Path(path)
    try:
        return load_file(path / "trainable.safetensors"), json.loads((path / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as exc:
        raise MetatunerError(f"cannot load checkpoint {path}: {exc}") from None


def load_checkpoint(path: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore ``optimizer``, ``scheduler`` and all RNG states from ``path``; return (tensors, state.json).

    The optimizer must be built over the same parameters, in the same order, as the saved one; its
    state tensors are moved to each parameter's device and dtype by ``load_state_dict`` (``step`` stays
    as the optimizer keeps it). Raises MetatunerError when the checkpoint is missing, incomplete or
    does not fit the optimizer.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            raise FileNotFoundError("no such checkpoint folder")
        tensors = load_file(path / "trainable.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        opt_json = json.loads((path / "optimizer.json").read_text())
        sched = json.loads((path / "scheduler.json").read_text())
        rng_tensors = load_file(path / "rng.safetensors")
        rng = json.loads((path / "rng.json").read_text())
        state = json.loads((path / "state.json").read_text())

        opt_state: dict[int, dict] = {}
        for key, value in opt_tensors.items():
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
        for idx, values in opt_json["state"].items():
            opt_state.setdefault(int(idx), {}).update(values)
        groups = [{k: _match_types(v, current.get(k)) for k, v in saved.items()}
                  for saved, current in zip(opt_json["param_groups"], optimizer.param_groups)]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        scheduler.load_state_dict(sched)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise MetatunerError(f"cannot load checkpoint {path}: {exc}") from None

    torch.set_rng_state(rng_tensors["torch"])
    cuda = [rng_tensors[f"cuda.{i}"] for i in range(len(rng_tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return tensors, state
