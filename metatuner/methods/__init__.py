"""Methods: everything that turns a model plus training data into a predictor.

Every method (the baselines and MetaTuner) meets one interface, :class:`Method.fit`, and is scored by
the same evaluation harness, so results compare like with like.
"""

from metatuner.methods.base import METHODS, Method, get_method
from metatuner.methods import bettertogether, bpo, dpo, opro, prompting, rl, rlprompt, trained  # noqa: F401  (registers the methods)

__all__ = ["METHODS", "Method", "get_method"]
