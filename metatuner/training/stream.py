"""The training data as an endless, seeded, resumable stream."""

from __future__ import annotations

import random

from metatuner.tasks.base import Example


class DataStream:
    """An endless, seeded, resumable stream of training examples: a fresh shuffle every epoch."""

    def __init__(self, examples: list[Example], seed: int, cursor: int = 0):
        self.examples, self.seed, self.cursor = examples, seed, cursor
        self._epoch, self._order = -1, []

    def peek(self, n: int) -> list[Example]:
        """The next ``n`` examples, without moving the stream."""
        cursor = self.cursor
        try:
            return self.next(n)
        finally:
            self.cursor = cursor

    def next(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.examples))
            if epoch != self._epoch:
                self._order = list(range(len(self.examples)))
                random.Random(self.seed * 100_003 + epoch).shuffle(self._order)
                self._epoch = epoch
            out.append(self.examples[self._order[pos]])
            self.cursor += 1
        return out
