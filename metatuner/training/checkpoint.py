"""Training checkpoints: trainable state only, crash-safe on disk, verified on load, exact on resume.

A checkpoint is a folder ``run_dir/checkpoints/step-000123/`` holding

- ``trainable.safetensors``: the tensors the caller passes (never frozen base weights);
- ``optimizer.safetensors`` + ``optimizer.json``: every tensor of ``optimizer.state_dict()["state"]``
  under ``state.{param_idx}.{name}``; param groups and non-tensor state values in JSON;
- ``scheduler.json``: the scheduler's ``state_dict()`` (it must be JSON-serialisable);
- ``rng.safetensors`` + ``rng.json``: torch CPU (and CUDA) RNG states; python and numpy RNG states;
- ``state.json``: ``{"format": 2, "step": step, "extra": extra}`` with the caller's JSON data;
- ``manifest.json``: each other file's size and sha256.

``run_dir/checkpoints/latest`` names the newest complete folder. Usage::

    save_checkpoint(run_dir, step, {n: p for n, p in model.named_parameters() if p.requires_grad},
                    optimizer, scheduler, {"data_position": i})
    if (path := latest_checkpoint(run_dir)) is not None:
        tensors, state = load_checkpoint(path, optimizer, scheduler)  # restores optimizer, scheduler, RNGs
        model.load_state_dict(tensors, strict=False)
        start = state["step"]

Saving serialises everything first, writes the folder under a hidden name, fsyncs it and renames it into
place (:mod:`metatuner.files`), then points ``latest`` at it. Saving a step again (the last step, once
more after the final validation) first points ``latest`` at a hard-linked copy of the old folder, so
``latest`` never names a folder that is being replaced. The newest ``keep`` (>= 2) step folders stay.

:func:`latest_checkpoint` verifies the manifest: a checkpoint with a missing, truncated or corrupted file
is named in a warning and the newest good one is used instead. Resuming reproduces parameters, optimizer
state, learning rate and random draws bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from metatuner import files
from metatuner.errors import MetatunerError

STEP_DIR = re.compile(r"step-(\d+)")
HOLD_PREFIX = "hold-"  # a hard-linked copy ``latest`` names while a step is saved again
MANIFEST = "manifest.json"
FORMAT = 2  # checkpoints with a manifest; older ones (no "format" in state.json) load unverified
logger = logging.getLogger(__name__)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous copy: safetensors refuses tensors that share storage (tied weights, views)
    return t.detach().to("cpu", copy=True).contiguous()


def _to_json(obj, what: str) -> bytes:
    try:
        return json.dumps(obj).encode()
    except (TypeError, ValueError) as exc:
        raise MetatunerError(f"checkpoint {what} is not JSON-serialisable: {exc}") from None


def _serialise(step: int, tensors, optimizer, scheduler, extra: dict) -> dict[str, bytes]:
    """Every file of the checkpoint, as bytes (so bad input fails before anything is written)."""
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
    blobs = {
        "optimizer.json": _to_json({"param_groups": opt["param_groups"], "state": opt_values}, "optimizer state"),
        "scheduler.json": _to_json(scheduler.state_dict(), "scheduler state"),
        "rng.json": _to_json(rng_json, "RNG state"),
        "state.json": _to_json({"format": FORMAT, "step": step, "extra": extra}, "extra state"),
        "trainable.safetensors": save_bytes({k: _cpu(v) for k, v in tensors.items()}),
        "optimizer.safetensors": save_bytes(opt_tensors),
        "rng.safetensors": save_bytes(rng_tensors),
    }
    manifest = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in blobs.items()}
    blobs[MANIFEST] = json.dumps({"format": FORMAT, "files": manifest}, indent=1).encode()
    return blobs


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler, extra: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints``, point ``latest`` at it, keep the newest ``keep``.

    Returns the checkpoint folder. Everything is serialised before anything is written, so bad input
    (a non-JSON ``extra``) fails without touching disk.
    """
    if keep < 2:
        raise MetatunerError(f"checkpoint keep must be >= 2 (a damaged newest one falls back to the one before), got {keep}")
    blobs = _serialise(step, tensors, optimizer, scheduler, extra)
    root = files.make_dirs(Path(run_dir) / "checkpoints")
    name = f"step-{step:06d}"
    final, latest = root / name, root / "latest"
    hold = root / f"{HOLD_PREFIX}{name}"
    files.sweep(final, every_name=True)  # what saves killed mid-way left, of any step
    _remove_stale_holds(root)
    with files.staged_folder(final) as tmp:
        for fname, data in blobs.items():
            files.write_new(tmp / fname, data)
        if final.is_dir() and _named(root) == name:  # saved again: ``latest`` names a linked copy meanwhile
            shutil.rmtree(hold, ignore_errors=True)
            shutil.copytree(final, hold, copy_function=os.link)
            files.fsync_dir(root)
            files.write_text(latest, hold.name + "\n")
        files.replace_folder(tmp, final)
    files.write_text(latest, name + "\n")
    _remove_stale_holds(root)

    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir())
    for _, old in steps[:-keep]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def _remove_stale_holds(root: Path) -> None:
    named = _named(root)
    for p in root.glob(f"{HOLD_PREFIX}*"):
        if p.name != named:
            shutil.rmtree(p, ignore_errors=True)


def _named(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def verify(path: Path) -> list[str]:
    """What is wrong with checkpoint folder ``path`` ([] when it is complete and intact)."""
    path = Path(path)
    if not path.is_dir():
        return ["the folder does not exist"]
    if not (path / MANIFEST).is_file():
        try:  # written before checkpoints had a manifest: nothing to check against
            if "format" not in json.loads((path / "state.json").read_bytes()):
                return []
        except (OSError, ValueError, TypeError):
            pass
        return [f"{MANIFEST} is missing"]
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())["files"]
        wanted = {name: (int(want["size"]), str(want["sha256"])) for name, want in manifest.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, (size, sha256) in wanted.items():
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except OSError as e:
            problems.append(f"{name} is unreadable ({e.strerror or e})")
            continue
        if len(data) != size:
            problems.append(f"{name} has {len(data)} bytes, {size} expected (truncated?)")
        elif hashlib.sha256(data).hexdigest() != sha256:
            problems.append(f"{name} is corrupted (sha256 mismatch)")
    return problems


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of ``run_dir``: the folder ``latest`` names, else (when that one is
    damaged or missing, with a warning naming the damage) the newest intact step folder. None when no
    checkpoint was completed; an error when every one is damaged."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()), reverse=True)
    named = _named(root)
    candidates = list(dict.fromkeys(([root / named] if named else []) + steps))
    damaged = []
    for path in candidates:
        problems = verify(path)
        if not problems:
            if damaged:
                logger.warning("metatuner: warning: damaged checkpoint(s) skipped: %s; using %s",
                               "; ".join(damaged), path)
            return path
        damaged.append(f"{path}: {', '.join(problems)}")
    if damaged:
        raise MetatunerError(f"no intact checkpoint in {root}: {'; '.join(damaged)}")
    return None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint folder (``step-000123``) was saved at."""
    m = STEP_DIR.fullmatch(Path(path).name)
    if m is None:
        raise MetatunerError(f"{path} is not a checkpoint folder (step-NNNNNN)")
    return int(m[1])


def _check(path: Path) -> None:
    problems = verify(path)
    if problems:
        raise MetatunerError(f"cannot load checkpoint {path}: {', '.join(problems)}")


def _match_types(saved, current):
    """JSON turns tuples (AdamW ``betas``) into lists; give values back the type the optimizer uses."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def read_trainable(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors and ``state.json`` of a checkpoint, for inference (no optimizer, no RNG)."""
    path = Path(path)
    _check(path)
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
    _check(path)
    try:
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
