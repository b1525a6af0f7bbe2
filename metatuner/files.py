"""The crash-safe write path: every file metatuner writes goes through this module.

A crash (kill -9, a full disk, a power loss) at any moment leaves each file and folder either as it was
or complete, never half written:

- :func:`write_bytes`, :func:`write_text`, :func:`write_json` write to a hidden sibling
  ``.<name>.tmp-<pid>``, flush and fsync it, rename it over the target (``os.replace``) and fsync the
  folder, so the rename itself survives a power loss;
- :func:`new_folder` yields a hidden sibling folder to fill (with :func:`write_new`, or any library's
  writer); on success every file in it is fsynced and the folder is renamed into place. Results folders,
  run folders, exported adapters and checkpoints appear this way, complete or not at all;
- :func:`replace_folder` puts a filled folder in the place of an existing one (``rescore``, a checkpoint
  saved again at the same step);
- :class:`JsonlAppender` / :func:`resume_jsonl`: an output of one JSON line per item (``predict``) that
  resumes after an interruption without redoing or duplicating lines;
- :class:`JsonLog` appends one whole JSON line per ``write`` (unbuffered: each line reaches the file at
  once) and fsyncs on :meth:`JsonLog.sync`; opening it cuts a torn last line a crash left behind, and
  :func:`read_json_lines` skips one.

An ``OSError`` (no space left, a read-only folder) becomes one :class:`MetatunerError` line naming the path;
the temporary file or folder is removed and the previous file stays as it was. Temporaries left by a
process that died are removed by the next write of the same name (:func:`sweep`). All bytes this package
writes itself reach the disk through :func:`_write_all`, where the fault-injection tests raise ENOSPC.

Two writers of other libraries are left their own file I/O, and why:

- transformers' ``save_pretrained`` into a :func:`new_folder` (the model folder of the GGUF conversion): the
  folder is staged, fsynced and renamed into place like any other, so it appears complete or not at all,
  and an ``OSError`` of the library's own writes (a full disk) is the same one line, naming the folder and
  the file, with the staged folder removed (:func:`staged_folder`). Only the ENOSPC injection at
  :func:`_write_all` does not reach those bytes; writing a model's files here instead would copy
  transformers' file formats. (PEFT's ``adapter_config.json`` in ``export`` is small and plain JSON, so
  ``models/export.py`` writes it here, as PEFT would and PEFT loads: tested);
- TensorBoard's event files (``tb/`` of a run, :mod:`metatuner.training.logbook`): an append-only stream
  that TensorBoard's writer owns (a background thread and its own file handle). Each record carries its
  length and CRC, and TensorBoard's reader drops a torn last record and reads the ones before it, which is
  what a crash can leave; they are a view of ``log.jsonl``, which is written here and is what ``--resume``
  relies on. Routing them through this module would mean replacing TensorBoard's writer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from metatuner.errors import MetatunerError

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


def _write_all(fd: int, data: bytes) -> None:
    """The one place bytes reach a file."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def _reported(action: str, path: Path) -> Iterator[None]:
    """Turns an OSError into one line that names ``path`` and the system's reason."""
    try:
        yield
    except OSError as e:
        raise MetatunerError(f"cannot {action} {path}: {e.strerror or e}") from None


def _temporary(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Best-effort removal (cleaning up after a failure must not hide the failure)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


def sweep(path: Path, every_name: bool = False) -> None:
    """Removes what dead processes left while writing ``path`` (``every_name``: anything in ``path``'s
    folder): ``.tmp-`` files or folders, and the ``.old-`` copy of a folder replaced with
    :func:`replace_folder`, which is put back when the crash came between the two renames (its target
    missing)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        m = _LEFTOVER.fullmatch(entry.name)
        if not m or (m["name"] != path.name and not every_name):
            continue
        if int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        target = entry.with_name(m["name"])
        if m["kind"] == "old" and not target.exists():
            os.rename(entry, target)
            fsync_dir(path.parent)
        else:
            _remove(entry)


def fsync_dir(path: Path) -> None:
    """Makes the folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> Path:
    """``mkdir -p`` with a one-line error (a read-only parent, a file in the way)."""
    path = Path(path)
    with _reported("create folder", path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_bytes(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically and durably (see the module docstring)."""
    path = Path(path)
    make_dirs(path.parent)
    sweep(path)
    tmp = _temporary(path)
    with _reported("write", path):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def write_new(path: Path, data: bytes | str) -> None:
    """Writes a file inside a folder from :func:`new_folder` (nobody else sees it until the folder is
    published, which fsyncs it)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    with _reported("write", path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)


def read_json(path: Path, what: str = "file") -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is one clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MetatunerError(f"{what} {path} not found") from None
    except OSError as e:
        raise MetatunerError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise MetatunerError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None


def is_nonempty_dir(path: Path) -> bool:
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _fsync_tree(root: Path, final: Path) -> None:
    """fsyncs every file and folder under ``root``, the staged form of ``final``."""
    with _reported("write", final):
        for folder, _, names in os.walk(root):
            for name in names:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(folder))


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yields an empty hidden sibling of ``final`` to fill and publish (:func:`new_folder`,
    :func:`replace_folder`); on failure it is removed."""
    final = Path(final)
    make_dirs(final.parent)
    sweep(final)
    tmp = _temporary(final)
    _remove(tmp)  # only ever ours: a leftover of a dead process with our pid
    with _reported("create folder", tmp):
        tmp.mkdir()
    try:
        yield tmp
    except MetatunerError as e:  # named as the user knows it: the folder being made, not its hidden name
        _remove(tmp)
        raise MetatunerError(str(e).replace(str(tmp), str(final))) from None
    except OSError as e:  # a library's own writes into the folder (save_pretrained): one line all the same
        _remove(tmp)
        where = final
        if isinstance(e.filename, (str, bytes)) and Path(os.fsdecode(e.filename)).is_relative_to(tmp):
            where = final / Path(os.fsdecode(e.filename)).relative_to(tmp)
        reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
        raise MetatunerError(f"cannot write {where}: {reason}") from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def new_folder(final: Path) -> Iterator[Path]:
    """Yields a hidden folder to fill; on success it becomes ``final``, complete. ``final`` must not exist
    or be empty (then it is replaced); a folder that appeared meanwhile is an error, never merged into."""
    final = Path(final)
    if is_nonempty_dir(final):
        raise MetatunerError(f"{final} already exists and is not empty")
    with staged_folder(final) as tmp:
        yield tmp
        _fsync_tree(tmp, final)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if is_nonempty_dir(final):
                raise MetatunerError(f"{final} already exists and is not empty") from None
            raise MetatunerError(f"cannot create {final}: {e.strerror or e}") from None
        fsync_dir(final.parent)


def replace_folder(staged: Path, final: Path) -> None:
    """Puts the complete folder ``staged`` in the place of ``final``: ``final`` is renamed to a hidden
    ``.old-<pid>`` sibling, ``staged`` renamed into place, then the old one removed. A crash between the
    two renames leaves ``final`` missing for a moment; :func:`sweep` (run by every write of that name) puts
    the old folder back."""
    staged, final = Path(staged), Path(final)
    _fsync_tree(staged, final)
    old = _temporary(final, "old")
    with _reported("replace", final):
        moved = final.exists()
        if moved:
            os.rename(final, old)
        try:
            os.rename(staged, final)
        except BaseException:
            if moved:
                os.rename(old, final)
            raise
        fsync_dir(final.parent)
    _remove(old)


class JsonLog:
    """An append-only JSON-lines file: one whole line per :meth:`write`, each reaching the file at once.

    Opening cuts a torn last line (a crash mid-write) and, with ``keep_bytes``, everything after that
    many bytes (the length a checkpoint recorded, so a resumed run's log matches an uninterrupted one).
    A failed write (no space left) is cut off again, so the file always ends with a whole line.
    """

    def __init__(self, path: Path, keep_bytes: int | None = None):
        self.path = Path(path)
        make_dirs(self.path.parent)
        with _reported("open", self.path):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
            size = os.fstat(self._fd).st_size
            keep = size if keep_bytes is None else min(size, keep_bytes)
            head = os.pread(self._fd, keep, 0)
            keep = head.rfind(b"\n") + 1  # 0 when there is no complete line
            if keep < size:
                os.ftruncate(self._fd, keep)

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        with _reported("write", self.path):
            size = os.fstat(self._fd).st_size
            try:
                _write_all(self._fd, line)
            except OSError:
                os.ftruncate(self._fd, size)
                raise

    def sync(self) -> int:
        """fsyncs the log; returns its length in bytes."""
        with _reported("write", self.path):
            os.fsync(self._fd)
            return os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a log, in order; [] when the file is missing. A line that is not a JSON object
    (the torn last line of a run killed mid-write, or one still being written) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


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
