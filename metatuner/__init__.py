"""metatuner: per-query prompt and LoRA co-optimization (MetaTuner, arXiv 2509.24245).

Layout (dependencies point one way, top to bottom; ``tests/test_imports.py`` checks there is no cycle):

- ``config``      typed configuration dataclasses, YAML files and ``key=value`` overrides
- ``tasks``       benchmarks: data loading, prompts, answer extraction, metrics
- ``models``      model loading, per-row LoRA, the hypernetwork, the prompt generator
- ``evaluation``  batched generation, predictors, the single evaluation harness
- ``training``    the MetaTuner training loop, its builder, rollouts, checkpoints, the learning-rate schedule
- ``methods``     the baselines and MetaTuner behind one ``Method.fit`` interface
- ``recipes``, ``bench``  end-to-end jobs and the methods x tasks x seeds grid
- ``api``         the public Python API, re-exported here: ``metatuner.train(...)``, ``metatuner.make_task(...)``
- ``cli``         the ``metatuner`` command (parses arguments, calls the above)

The API's names load on first use (``import metatuner`` imports neither torch nor transformers)::

    import metatuner

    task = metatuner.make_task(train=rows, test=rows[:8], template="Q: {question}", metric=my_metric)
    run = metatuner.train("quick", task=task, run_dir="runs/mine", train={"steps": 20})
    run.answer(["Q: ..."]), run.evaluate(), run.export_adapter("Q: ...", "adapter/")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metatuner.errors import MetatunerError

if TYPE_CHECKING:
    from metatuner.api import Answer, Run, export_adapter, fit, load_config, load_run, load_task, make_task, train

__version__ = "0.1.0"
#: the public API's names, loaded from ``metatuner.api`` on first use
_API = ("Answer", "Run", "export_adapter", "fit", "load_config", "load_run", "load_task", "make_task", "train")
__all__ = ["MetatunerError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from metatuner import api

        return getattr(api, name)
    raise AttributeError(f"module 'metatuner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
