"""The validation gate: serve generated prompts only when validation says they help.

MetaTuner (G's prompts against p~) and BPO (rewritten queries against the original ones) both end
training by scoring the validation split twice, once with the generated prompts and once without, and
serve the generated ones only if :func:`gate_opens`. The rule is strict: the generated prompts must
score *more than* ``margin`` above the initial ones, so a tie (the usual case when G copies p~) serves
the initial prompts, which cost no prompt generation.
"""

from __future__ import annotations


def gate_opens(generated: float, initial: float, margin: float) -> bool:
    """Whether generated prompts are served.

    Args:
        generated: the validation score (primary metric, 0-1) with the generated prompts.
        initial: the validation score with the initial prompts (p~, or the original queries).
        margin: how much higher, at least, ``generated`` must be (>= 0); a difference of exactly
            ``margin`` does not open the gate.

    Returns:
        True when ``generated > initial + margin``.
    """
    return generated > initial + margin
