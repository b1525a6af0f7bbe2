"""The public Python API: configs, tasks, training, answering, evaluation and export as functions and objects.

Everything here is re-exported from ``metatuner`` (lazily: ``import metatuner`` loads neither torch nor
transformers until one of these is first used). A notebook run in a few lines::

    import metatuner

    def same_city(output: str, answer: str) -> float:  # a metric: (model output, gold answer) -> [0, 1]
        return float(answer.lower() in output.lower())

    rows = [{"country": "France", "capital": "Paris"}, {"country": "Japan", "capital": "Tokyo"}, ...]
    task = metatuner.make_task(train=rows, test=rows[:8], template="What is the capital of {country}?",
                               answer="capital", metric=same_city, name="capitals")
    run = metatuner.train("quick", task=task, run_dir="runs/capitals", train={"steps": 20})
    print(run.results[0].score)                              # scored on the test rows after training
    for a in run.answer(["What is the capital of Italy?"]):
        print(a.prompt, a.output, a.answer)                  # generated prompt, output, extracted answer
    run.export_adapter("What is the capital of Italy?", "adapters/italy")  # a PEFT adapter folder

The shape follows TRL, PEFT and DSPy where they fit: a typed config object (:func:`load_config`, like
``GRPOConfig``) whose sections take keyword overrides; tasks as data with a metric that is a plain callable
(DSPy's ``metric``, TRL's reward functions); one call that fits and returns an object
(:func:`train` / :func:`fit`, like ``get_peft_model`` and ``compile``), not a tuple. The command line
(``metatuner train``, ``generate``, ``export``) is a thin layer over these functions.

Modules: :mod:`~metatuner.api.inputs` (configs and tasks), :mod:`~metatuner.api.runs` (the :class:`Run` a fit
returns, and its :class:`Answer`), :mod:`~metatuner.api.fitting` (train, fit, load, export). The package sits at
the top of the library, above the recipes (``metatuner.recipes``) and serving, and below ``metatuner.cli``;
only the CLI (and ``metatuner``'s lazy re-export) imports it.
"""

from metatuner.api.fitting import export_adapter, fit, load_run, train
from metatuner.api.inputs import load_config, load_task, make_task
from metatuner.api.runs import Answer, Run

__all__ = ["Answer", "Run", "export_adapter", "fit", "load_config", "load_run", "load_task", "make_task", "train"]
