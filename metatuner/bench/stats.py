"""The grid's one interval method: a bootstrap over training seeds and test items.

A method's scores on a task form a grid: one row per training seed, one column per test item (every
seed is scored on the same items). The noise in its mean has two sources, the finite test set and the
training run, and an interval over items alone misses the second (SFT on the built-in task has scored
27% on one seed and 18% on another). Each of ``RESAMPLES`` bootstrap draws resamples the seeds with
replacement, then the items with replacement, and takes the mean over the drawn seeds x drawn items.
Items are crossed with seeds, so one draw of items serves every drawn seed: drawing items anew per seed
would treat one item under two seeds as two independent items and understate how much the items vary.
The interval is the draws' 2.5th and 97.5th percentiles; the draws come from a fixed RNG seed, so a
report is reproducible.

A *paired* difference resamples the per-(seed, item) differences of two methods over the seeds and items
both have, so the difficulty of an item and the luck of a seed cancel. Missing cells (an item one seed
did not score) are left out of a draw's mean.

Scores are passed as ``{(seed, item_id): score}``:

>>> est = bootstrap_mean({(0, "a"): 1.0, (0, "b"): 0.0, (1, "a"): 1.0, (1, "b"): 1.0})
>>> est["mean"], est["seeds"], est["n"]
(0.75, [0, 1], 2)
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
RNG_SEED = 0
LEVEL = 0.95

Scores = dict[tuple[int, str], float]


def bootstrap_mean(scores: Scores, resamples: int = RESAMPLES, seed: int = RNG_SEED, level: float = LEVEL) -> dict:
    """Mean of ``scores`` with its bootstrap interval over seeds, then items.

    Returns ``mean`` (over the scored (seed, item) cells), ``ci_low``, ``ci_high``, ``n`` (items),
    ``seeds`` (sorted), and ``per_seed`` (seed -> its mean), whose min and max give the spread across seeds.
    """
    if not scores:
        raise ValueError("no scores to bootstrap")
    seeds = sorted({s for s, _ in scores})
    items = sorted({i for _, i in scores})
    row, col = {s: k for k, s in enumerate(seeds)}, {i: k for k, i in enumerate(items)}
    grid = np.zeros((len(seeds), len(items)))  # [K seeds, N items]
    mask = np.zeros_like(grid)  # 1 where the (seed, item) cell was scored
    for (s, i), v in scores.items():
        grid[row[s], col[i]], mask[row[s], col[i]] = v, 1.0
    rng = np.random.default_rng(seed)
    k, n = grid.shape
    # a draw with replacement as counts: how often each seed / item was drawn
    seed_counts = rng.multinomial(k, np.full(k, 1 / k), size=resamples)  # [B, K]
    item_counts = rng.multinomial(n, np.full(n, 1 / n), size=resamples)  # [B, N]
    total = ((seed_counts @ grid) * item_counts).sum(1)  # [B]: the sum over drawn seeds x drawn items
    cells = ((seed_counts @ mask) * item_counts).sum(1)  # [B]: how many of those cells were scored
    draws = total[cells > 0] / cells[cells > 0]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    per_seed = {s: float(grid[r][mask[r] > 0].mean()) for s, r in row.items()}
    return {"mean": float(grid.sum() / mask.sum()), "ci_low": float(lo), "ci_high": float(hi), "n": n,
            "seeds": seeds, "per_seed": per_seed}


def paired_difference(a: Scores, b: Scores, resamples: int = RESAMPLES, seed: int = RNG_SEED,
                      level: float = LEVEL) -> dict | None:
    """``a`` minus ``b``, paired by (seed, item) over the cells both scored, with the bootstrap of
    :func:`bootstrap_mean` over those differences; adds ``better`` and ``worse`` (how many cells ``a``
    scored above / below ``b``). None when they share no cell."""
    shared = a.keys() & b.keys()
    if not shared:
        return None
    diffs = {key: a[key] - b[key] for key in shared}
    out = bootstrap_mean(diffs, resamples, seed, level)
    out.update(better=sum(d > 0 for d in diffs.values()), worse=sum(d < 0 for d in diffs.values()))
    return out


def excludes_zero(estimate: dict) -> bool:
    """Whether an interval lies wholly above or wholly below zero."""
    return estimate["ci_low"] > 0 or estimate["ci_high"] < 0
