"""A training run's log: every record in ``log.jsonl`` (crash-safe, see :class:`metatuner.files.JsonLog`) and
its numbers in TensorBoard (``tb/``).

Each record is one JSON line written at once. :meth:`Logbook.sync` fsyncs the log and returns its length,
which the trainer stores in each checkpoint; a resumed run reopens the log cut to that length, so its
``log.jsonl`` holds exactly the records of an uninterrupted run (TensorBoard's files may show the steps
after the checkpoint twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metatuner.files import JsonLog


class Logbook:
    def __init__(self, run_dir: Path, keep_bytes: int | None = None):
        self.run_dir = Path(run_dir)
        self.log = JsonLog(self.run_dir / "log.jsonl", keep_bytes)
        self._writer = None

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        step = record.get("step", 0)
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self._writer.add_scalar(f"{record['phase']}/{k}", v, step)
        if "sample_prompts" in record:
            text = "\n\n".join(f"**{s['id']}**: {s['prompt']}" for s in record["sample_prompts"])
            self._writer.add_text("prompts", text, step)
        self._writer.flush()

    def sync(self) -> int:
        """Makes every record durable; returns the log's length in bytes."""
        if self._writer is not None:
            self._writer.flush()
        return self.log.sync()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.log.close()
