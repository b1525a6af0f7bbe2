"""Methods: everything that turns a model plus training data into a predictor.

Every method (the baselines and MetaTuner) meets one interface, :class:`Method.fit`, and is scored by
the same evaluation harness, so results compare like with like. Each is one module that registers the
method with its config section (:class:`~metatuner.methods.base.MethodRegistry`). Importing this package
imports every module in it: first the ones listed below, in the order their sections appear in
``config.yaml`` and ``metatuner config``, then any other, by name, so a new module here needs no other edit
(its section follows the listed ones). A method of your own elsewhere: :mod:`metatuner.plugins`.
"""

import importlib
import pkgutil

from metatuner.methods.base import METHODS, Method, get_method
# the order of these imports is the order of the methods' config sections
from metatuner.methods import dpo, bpo, rl, rlprompt, opro, bettertogether, prompting, trained  # noqa: F401, I001

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "get_method"]
