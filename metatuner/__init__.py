"""metatuner: per-query prompt and LoRA co-optimization (MetaTuner, arXiv 2509.24245).

Layout (dependencies point one way, top to bottom; ``tests/test_imports.py`` checks there is no cycle):

- ``config``      typed configuration dataclasses, YAML files and ``key=value`` overrides
- ``tasks``       benchmarks: data loading, prompts, answer extraction, metrics
- ``models``      model loading, per-row LoRA, the hypernetwork, the prompt generator
- ``evaluation``  batched generation, predictors, the single evaluation harness
- ``training``    the MetaTuner training loop, its builder, rollouts, checkpoints, the learning-rate schedule
- ``methods``     the baselines and MetaTuner behind one ``Method.fit`` interface
- ``recipes``, ``bench``  end-to-end jobs and the methods x tasks x seeds grid
- ``cli``         the ``metatuner`` command (parses arguments, calls the above)
"""

from metatuner.errors import MetatunerError

__version__ = "0.1.0"
__all__ = ["MetatunerError", "__version__"]
