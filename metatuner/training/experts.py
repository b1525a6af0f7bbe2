"""The expert prompt set D2: per query, the best generator output found so far by rollouts.

Each rollout scores, for one query, ``n`` sampled generator outputs and the initial prompt ``p~`` with
the same M, so a candidate's *gain* (its reward minus ``p~``'s reward in that same rollout) is
comparable across rollouts even though M keeps changing. The set keeps, per query, the output with
the highest gain seen so far:

- a sampled output enters only if its gain exceeds ``margin`` (and it does not leak the answer, which
  the caller checks); otherwise the query's expert is the output that means "keep ``p~``" (``p~``
  itself in rewrite mode, the empty hint in append mode) with gain 0, so G learns to copy where
  rewriting does not help;
- it is replaced only by a strictly better one;
- at most ``cap`` queries are kept; the least recently improved leave first.

The regularization term samples its batch from the whole set on every step it applies, whichever
queries the current step rolled out. ``state()`` / ``load_state()`` round-trip exactly (checkpoints).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import asdict, dataclass


@dataclass
class Expert:
    output: str  # what G should write for this query (a whole prompt, or a hint in append mode)
    gain: float  # its reward minus p~'s reward, measured in the same rollout (0 for "keep p~")


class ExpertSet:
    def __init__(self, cap: int = 4096, margin: float = 0.0):
        self.cap, self.margin = cap, margin
        self.items: OrderedDict[str, Expert] = OrderedDict()  # least recently improved first

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, query_id: str) -> bool:
        return query_id in self.items

    def __getitem__(self, query_id: str) -> Expert:
        return self.items[query_id]

    def offer(self, query_id: str, output: str, gain: float, keep_initial: str) -> bool:
        """Offers one rollout's best candidate for a query; returns whether the set changed.

        ``keep_initial`` is the output that means "keep p~"; it becomes the expert when the candidate's
        gain is not above the margin and the query has no expert yet.
        """
        if gain <= self.margin:
            output, gain = keep_initial, 0.0
        current = self.items.get(query_id)
        if current is not None and gain <= current.gain:
            return False
        self.items[query_id] = Expert(output, gain)
        self.items.move_to_end(query_id)
        while len(self.items) > self.cap:
            self.items.popitem(last=False)
        return True

    def sample(self, n: int, rng: random.Random) -> list[str]:
        """Up to ``n`` distinct query ids, drawn uniformly from the whole set."""
        ids = list(self.items)
        return rng.sample(ids, min(n, len(ids)))

    def stats(self) -> dict[str, float]:
        """Size, share of queries whose expert is a generated output (gain > 0), and their mean gain."""
        gains = [e.gain for e in self.items.values() if e.gain > 0]
        return {"experts": len(self.items), "experts_generated": len(gains) / max(1, len(self.items)),
                "experts_gain": sum(gains) / len(gains) if gains else 0.0}

    def state(self) -> list[list]:
        return [[qid, asdict(e)] for qid, e in self.items.items()]

    def load_state(self, state: list[list]) -> None:
        self.items = OrderedDict((qid, Expert(**e)) for qid, e in state)
