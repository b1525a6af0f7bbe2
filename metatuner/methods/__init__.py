"""Methods: everything that turns a model plus training data into a predictor.

Every method (the baselines and MetaTuner) meets one interface, :class:`Method.fit`, and is scored by
the same evaluation harness, so results compare like with like. Each is one module that registers the
method with its config section (:class:`~metatuner.methods.base.MethodRegistry`); importing this package
registers the built-in ones, in the order their sections appear in ``config.yaml`` and ``metatuner config``.
A method of your own is a module of your own: :mod:`metatuner.plugins`.
"""

from metatuner.methods.base import METHODS, Method, get_method
# registers the methods; the order of the imports is the order of their config sections
from metatuner.methods import dpo, bpo, rl, rlprompt, opro, bettertogether, prompting, trained  # noqa: F401, I001

__all__ = ["METHODS", "Method", "get_method"]
