"""The crash-safe write path, shared by every writer: whole files replaced atomically (results, checkpoints,
the grid) and JSON Lines outputs appended line by line that resume after an interruption (``predict``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from metatuner.errors import MetatunerError


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a hidden sibling, then renames it over ``path``: readers (and a crash) see the
    old file or the new one, never half of one. The temporary name carries the pid, so processes writing
    the same file at once do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resume_jsonl(path: Path, key: str = "id") -> set:
    """The ``key`` of every complete line of a JSON Lines output written by :class:`JsonlAppender`, after
    cutting off a torn last line (a write interrupted before its newline), so appending resumes cleanly."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # whatever follows the last newline is an unfinished line
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    done = set()
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)[key])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MetatunerError(
                f"{path}:{n}: not a line this command wrote (no JSON object with {key!r}); choose another output file"
            ) from None
    return done


class JsonlAppender:
    """Appends one JSON object per line and flushes each line, so an interruption loses at most the line being
    written (which :func:`resume_jsonl` then cuts off)."""

    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = Path(path).open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
