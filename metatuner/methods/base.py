"""The method interface and its registry.

A method is one module: a :class:`Method` subclass that names its config section's dataclass
(``config_class``, under ``config_section``) and registers both with one decorator::

    @dataclass
    class ToyConfig:
        scale: float = option(1.0, "how much to scale by")

    @METHODS.register("toy")
    class Toy(Method):
        config_class = ToyConfig  # its keys are toy.* (config_section defaults to the method's name)

        def fit(self, task, train, val):
            cfg = self.method_config  # a ToyConfig: toy.scale=2 on the command line sets cfg.scale
            ...

Importing the module registers it; :mod:`metatuner.plugins` says how the commands find a module of your own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

from metatuner import plugins
from metatuner.config import RunConfig, register_section
from metatuner.evaluation.predictors import Predictor
from metatuner.registry import Registry
from metatuner.tasks.base import Example, Task


class Method(ABC):
    """Fits a predictor for a task. Methods without training ignore ``train`` and ``val``.

    Args:
        model: the downstream model M.
        tokenizer: M's tokenizer.
        config: the run config (:class:`~metatuner.config.RunConfig`: the method reads its own section and the
            shared ones, e.g. ``train.lr_schedule`` and ``seed``), or an instance of ``config_class`` alone (the
            other sections then take their defaults).
        run_dir: where training logs and checkpoints go (None: nowhere).
    """

    name: str
    #: whether ``fit`` needs training data (the recipes load the train split only then)
    needs_training: bool = False
    #: whether ``fit`` can continue a stopped fit from the newest checkpoint in ``run_dir`` (``resume``)
    resumable: bool = False
    #: the dataclass of the method's config section (None: the method reads only the shared sections)
    config_class: type | None = None
    #: the section's key in the run config (None: the method's registered name)
    config_section: str | None = None

    def __init__(self, model, tokenizer, config: Any = None, run_dir: Path | None = None):
        if self.config_class is not None and isinstance(config, self.config_class):
            config = RunConfig(sections={self.section_name(): config})
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.run_dir = run_dir  # where training logs and checkpoints go (None: nowhere)
        #: learning curves: called as ``on_budget(step, predictor)`` at each step of ``budgets`` during ``fit``
        self.on_budget: Callable[[int, Predictor], None] | None = None
        self.budgets: set[int] = set()
        #: called as ``on_step(step)`` after every optimizer step of ``fit`` (and with 0 before the first)
        self.on_step: Callable[[int], None] | None = None
        #: ``fit`` continues from the newest checkpoint in ``run_dir`` (methods with ``resumable``)
        self.resume: bool = False
        #: the parameters ``fit`` trained (set by trained methods with :func:`count_trainable`), for results tables
        self.trainable_params: int = 0

    @classmethod
    def section_name(cls) -> str:
        """The key of the method's section in the run config."""
        return cls.config_section or cls.name

    @property
    def method_config(self) -> Any:
        """The method's own section: ``config.<section>`` as it stands now, or ``config_class``'s defaults when
        the config has none (None for a method without a ``config_class``)."""
        if self.config_class is None:
            return None
        return getattr(self.config, self.section_name(), None) or self.config_class()

    @abstractmethod
    def fit(self, task: Task, train: list[Example], val: list[Example]) -> Predictor:
        """Returns the predictor this method produces for ``task``."""

    def budget(self) -> int:
        """The optimizer steps ``fit`` takes in all (0 for methods that do not train)."""
        return 0

    def at_step(self, step: int, predictor: Callable[[], Predictor]) -> None:
        """Trained methods call this after each optimizer step (and with 0 before the first): at a step of
        ``budgets`` the predictor the method would return now is handed to ``on_budget``."""
        if self.on_step is not None:
            self.on_step(step)
        if self.on_budget is not None and step in self.budgets:
            self.on_budget(step, predictor())


def count_trainable(*modules) -> int:
    """The trainable parameters (``requires_grad``) of ``modules``, each tensor counted once."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters() if p.requires_grad}
    return sum(seen.values())


class MethodRegistry(Registry[type[Method]]):
    """The methods by name. Registering a method also registers its config section; looking up one not
    registered yet, or listing them, first imports the modules that register methods
    (:func:`metatuner.plugins.load`)."""

    def register(self, name: str) -> Callable[[type[Method]], type[Method]]:
        """Class decorator: registers the method under ``name`` (also setting its ``name``) and its
        ``config_class`` as the config section ``config_section`` (default: ``name``).

        Raises:
            ValueError: ``name`` is taken, or the section holds another dataclass already.
        """
        add = super().register(name)

        def register_method(cls: type[Method]) -> type[Method]:
            cls.name = name
            add(cls)
            if cls.config_class is not None:
                doc = (cls.config_class.__doc__ or "").strip().splitlines()
                register_section(cls.section_name(), cls.config_class, doc[0] if doc else "")
            return cls

        return register_method


METHODS = MethodRegistry("method", discover=plugins.load)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (built in, or from a module ``$METATUNER_PLUGINS`` names)."""
    return METHODS.get(name)
