"""The crash-safe write path: atomic replacement with fsyncs, folders that appear complete, logs that
survive a torn line, and the cleanup of what dead processes left."""

import errno
import json
import os
import subprocess
import sys

import pytest

from metatuner import files
from metatuner.errors import MetatunerError


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_write_bytes_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "a.json"
    files.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.json"]
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".a.json.tmp-%d" % os.getpid()) and events[2][1] == str(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    files.write_text(target, "old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", full)
    with pytest.raises(MetatunerError, match=f"cannot write {target}: No space left on device"):
        files.write_text(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_a_librarys_own_write_failing_in_a_new_folder_is_one_line_and_leaves_nothing(tmp_path):
    """save_pretrained of PEFT or transformers writes into the staged folder with its own open(): a full disk
    there is reported as any other write, naming the folder's file, and the staged folder is removed."""
    final = tmp_path / "adapter"
    with pytest.raises(MetatunerError) as e:
        with files.new_folder(final) as tmp:
            files.write_new(tmp / "adapter_model.safetensors", b"x")
            with open(tmp / "adapter_config.json", "w"):  # what the library does, until the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "adapter_config.json"))
    assert str(e.value) == f"cannot write {final / 'adapter_config.json'}: No space left on device"
    assert os.listdir(tmp_path) == []
    with pytest.raises(MetatunerError, match=f"^cannot write {final}: Can't load it$"):
        with files.new_folder(final):
            raise OSError("Can't load it\nsee the docs")  # a library's OSError without errno: its first line
    assert os.listdir(tmp_path) == []


def test_new_folder_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "results"
    with pytest.raises(RuntimeError):
        with files.new_folder(final) as tmp:
            files.write_new(tmp / "records.jsonl", "x\n")
            assert not final.exists()
            raise RuntimeError("killed mid-way")
    assert os.listdir(tmp_path) == []
    with files.new_folder(final) as tmp:
        files.write_new(tmp / "records.jsonl", "x\n")
    assert os.listdir(final) == ["records.jsonl"] and os.listdir(tmp_path) == ["results"]
    with pytest.raises(MetatunerError, match="already exists and is not empty"):
        with files.new_folder(final):
            pass
    (tmp_path / "empty").mkdir()
    with files.new_folder(tmp_path / "empty") as tmp:  # an empty folder is taken
        files.write_new(tmp / "a", "1")
    assert os.listdir(tmp_path / "empty") == ["a"]


def test_sweep_removes_a_dead_processs_temporaries_and_puts_back_a_folder_it_was_replacing(tmp_path):
    dead = dead_pid()
    (tmp_path / f".a.json.tmp-{dead}").write_text("half")
    (tmp_path / f".a.json.tmp-{os.getppid()}").write_text("a live process is writing")
    (tmp_path / f".cell.old-{dead}").mkdir()  # killed between the two renames of replace_folder
    (tmp_path / f".cell.old-{dead}" / "summary.json").write_text("{}")
    (tmp_path / f".cell.tmp-{dead}").mkdir()
    files.sweep(tmp_path / "a.json")
    assert sorted(os.listdir(tmp_path)) == [f".a.json.tmp-{os.getppid()}", f".cell.old-{dead}", f".cell.tmp-{dead}"]
    files.sweep(tmp_path / "cell")
    assert sorted(os.listdir(tmp_path)) == [f".a.json.tmp-{os.getppid()}", "cell"]
    assert (tmp_path / "cell" / "summary.json").read_text() == "{}"


def test_replace_folder_swaps_a_complete_folder_in(tmp_path):
    with files.new_folder(tmp_path / "r") as tmp:
        files.write_new(tmp / "summary.json", "old")
    with files.staged_folder(tmp_path / "r") as tmp:
        files.write_new(tmp / "summary.json", "new")
        files.replace_folder(tmp, tmp_path / "r")
    assert (tmp_path / "r" / "summary.json").read_text() == "new" and os.listdir(tmp_path) == ["r"]


def test_json_log_cuts_a_torn_last_line_and_to_a_checkpoints_length(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed mid-write
    log = files.JsonLog(path)
    log.write({"step": 3})
    length = log.sync()
    log.write({"step": 4})
    log.close()
    assert files.read_json_lines(path) == [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 4}]
    files.JsonLog(path, keep_bytes=length).close()  # a resume from the checkpoint taken after step 3
    assert files.read_json_lines(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    path.write_text('{"step": 1}\n{"st')
    assert files.read_json_lines(path) == [{"step": 1}]  # readers skip a torn line


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(MetatunerError, match="summary .*missing.json not found"):
        files.read_json(tmp_path / "missing.json", "summary")
    (tmp_path / "bad.json").write_bytes(b"\xff{")
    with pytest.raises(MetatunerError, match="bad.json is not valid JSON"):
        files.read_json(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert files.read_json(tmp_path / "ok.json") == {"a": 1}


def test_tensorboards_own_files_lose_only_a_torn_last_record(tmp_path):
    """TensorBoard's event files are not written through files.py (see its docstring): what a crash can leave,
    a last record cut short, is dropped by TensorBoard's reader, which reads every record before it."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(3):
        writer.add_scalar("joint/loss", float(step), step)
    writer.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")

    def steps() -> list[int]:
        return [e.step for e in EventFileLoader(str(events)).Load() if e.summary.value]

    assert steps() == [0, 1, 2]
    os.truncate(events, events.stat().st_size - 5)
    assert steps() == [0, 1]
