"""Fitting into run folders: :func:`train` (MetaTuner, with resume), :func:`fit` (any registered method),
:func:`load_run` and :func:`export_adapter`, on top of the recipes (``metatuner.recipes``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metatuner.api.inputs import (
    PYTHON_TASK_PREFIX, TASK_FOLDER, ConfigSource, Overrides, _nested, _resolve_task, _task_of, load_config,
    save_task, saved_task_name,
)
from metatuner.api.runs import Run
from metatuner.config import RunConfig, merge
from metatuner.errors import MetatunerError
from metatuner.options import ConfigKeyError
from metatuner.tasks import Task

if TYPE_CHECKING:
    from metatuner.evaluation.harness import EvalResult


def _read_results(cfg: RunConfig, task: Task, done: Path) -> list[EvalResult]:
    """The results an earlier evaluation after training wrote (``done``, and beside it one folder per
    other split)."""
    from metatuner.evaluation.harness import EvalResult, read_results_folder
    from metatuner.recipes import split_dir

    results = []
    for split in cfg.eval.splits:
        folder = done if split == cfg.eval.splits[0] else split_dir(done, split)
        summary, records = read_results_folder(folder)
        results.append(EvalResult(summary.get("task", task.name), summary["n"], summary["metrics"],
                                  summary["primary_metric"], summary["timing"]["seconds"], records, folder,
                                  summary.get("split", split)))
    return results


def train(
    config: ConfigSource = None,
    overrides: Overrides = None,
    /,
    *,
    task: Task | str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    evaluate: bool | None = None,
    progress: bool = True,
    on_trained: Callable[[Run], None] | None = None,
    **values: Any,
) -> Run:
    """Trains MetaTuner (warm-ups, then joint training) into a run folder, then scores it on the test splits.

    The run folder has one owner while it trains (a lock file); a new one appears at once holding
    ``config.yaml``, and a folder that exists and is not empty is refused unless ``resume``. A stop by
    SIGTERM / SIGINT (inside :func:`metatuner.interrupts.stop_at_safe_points`) saves a checkpoint first and
    raises ``metatuner.interrupts.Stopped`` with the folder as its ``run_dir``; ``resume=True`` continues it
    bit for bit.

    Args:
        config: as :func:`load_config` takes it (a file, a shipped config's name such as ``"quick"``, a
            ``RunConfig``); with ``resume``, leave it unset: the run folder's own ``config.yaml`` is used.
        overrides: config overrides, as :func:`load_config` takes them.
        task: the task (a :class:`~metatuner.tasks.Task` from :func:`make_task` or :func:`load_task`, or a
            name or spec file); unset: the config's ``data.task``. A task built in Python is written into the
            run folder as a spec file with its rows, which the config names (a metric not importable by name
            keeps it out: then :func:`load_run` and a resume take the task again).
        run_dir: the run folder (default: a new ``<out_dir>/metatuner-<task>-<time>``); required with ``resume``.
        resume: continue the run in ``run_dir`` from its newest checkpoint (from step 0 if it has none).
        evaluate: score on ``config.eval.splits`` after training (default: ``config.eval.after_training``); a
            resumed run whose results exist reads them back instead.
        progress: show progress bars.
        on_trained: called with the :class:`Run` once training is done, before the evaluation (in the main
            process only).
        **values: more config overrides as keyword arguments (``train={"steps": 20}``).

    Returns:
        The :class:`Run`: the trained predictor, the task, the config, the run folder and the results.

    Example::

        run = train("quick", task=task, run_dir="runs/capitals", train={"steps": 20})
        print(run.results[0].line())  # capitals score = ...% (95% CI ..., n=...)
        run = train(task=task, run_dir="runs/capitals", resume=True)  # after a stop: continues it
    """
    from accelerate.utils import broadcast_object_list

    from metatuner import interrupts
    from metatuner.models.loading import process_state
    from metatuner.recipes import eval_splits, new_run_dir, run_folder, train_metatuner
    from metatuner.training.checkpoint import latest_checkpoint
    from metatuner.training.predictor import MetaTunerPredictor

    if resume:
        if run_dir is None:
            raise MetatunerError("resume continues a run folder: give run_dir")
        if config is not None:
            raise MetatunerError("a resumed run keeps its own config.yaml; give overrides only, not config")
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise MetatunerError(f"{run_dir / 'config.yaml'} not found; is {run_dir} a training run folder?")
        config = run_dir / "config.yaml"
    cfg = load_config(config, overrides, **values)
    task_obj, cfg = _resolve_task(task, cfg)
    if resume and task_obj is None and cfg.data.task.startswith(PYTHON_TASK_PREFIX):
        _task_of(cfg, run_dir)  # refused before the lock: the rows are not in any file
    state = process_state(cfg.model.device)  # under `accelerate launch` / `torchrun`: one of the processes that train
    if run_dir is None:
        label = task_obj.name if task_obj is not None else cfg.data.task
        run_dir = Path(broadcast_object_list([str(new_run_dir(cfg.out_dir, "metatuner", label))])[0])
    run_dir = Path(run_dir)
    cfg, saved = _saving_task(cfg, task_obj, run_dir)
    evaluate = cfg.eval.after_training if evaluate is None else evaluate
    with run_folder(cfg, run_dir, resume=resume):
        if saved and state.is_main_process:
            save_task(task_obj, run_dir / TASK_FOLDER)
        # a run killed before its first checkpoint starts again from step 0
        from_checkpoint = resume and latest_checkpoint(run_dir) is not None
        try:
            mt, task_obj = train_metatuner(cfg, run_dir, resume=from_checkpoint, progress=progress, task=task_obj)
            state.wait_for_everyone()
            run = Run(MetaTunerPredictor(mt), task_obj, cfg, run_dir, main_process=state.is_main_process)
            if not state.is_main_process:
                return run  # the main process scores the trained model; the others are done
            if on_trained is not None:
                on_trained(run)
            if not evaluate:
                return run
            done = run_dir / "eval-test"
            if (done / "summary.json").is_file():
                run.results, run.results_reused = _read_results(cfg, task_obj, done), True
            else:
                run.results = eval_splits(run.predictor, task_obj, cfg, done, progress)
            return run
        except interrupts.Stopped as e:
            e.run_dir = run_dir
            raise


def fit(
    method: str,
    config: ConfigSource = None,
    overrides: Overrides = None,
    /,
    *,
    task: Task | str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    evaluate: bool = False,
    progress: bool = True,
    **values: Any,
) -> Run:
    """Fits any registered method (``zero-shot``, ``cot``, ``sft``, ``dpo``, ``opro``, ... ; ``metatuner
    methods`` lists them) on a task's train split, as DSPy's ``compile`` does a program.

    ``fit("metatuner", ...)`` is :func:`train`. Other methods fit from the start: only MetaTuner resumes.

    Args:
        method: the registered method's name.
        config: as :func:`load_config` takes it.
        overrides: config overrides, as :func:`load_config` takes them.
        task: the task (object, name or spec file); unset: the config's ``data.task``.
        run_dir: a run folder to create for the fit's config, logs and checkpoints (and results with
            ``evaluate``); None writes nothing.
        resume: with ``method="metatuner"`` only: continue the run in ``run_dir``.
        evaluate: score on ``config.eval.splits`` after fitting (into ``run_dir/eval-test`` when given).
        progress: show progress bars.
        **values: more config overrides as keyword arguments (``sft={"lr": 1e-4}``, ``train={"steps": 20}``).

    Returns:
        The :class:`Run` holding the fitted predictor.

    Example::

        baseline = fit("zero-shot", task=task, evaluate=True)
        sft = fit("sft", task=task, run_dir="runs/capitals-sft", evaluate=True, train={"steps": 20})
        print(baseline.results[0].score, sft.results[0].score)
    """
    from metatuner.methods import get_method

    get_method(method)  # an unknown name fails here, listing the registered ones
    if method == "metatuner":
        return train(config, overrides, task=task, run_dir=run_dir, resume=resume, evaluate=evaluate,
                     progress=progress, **{**values, "method": method})
    if resume:
        raise MetatunerError(f"method {method!r} fits from the start; only metatuner resumes a run folder")
    from metatuner.recipes import eval_splits, fit_method, run_folder

    cfg = load_config(config, overrides, **{**values, "method": method})
    task_obj, cfg = _resolve_task(task, cfg)
    folder = Path(run_dir) if run_dir is not None else None

    def fitted() -> Run:
        predictor, fitted_task = fit_method(cfg, folder, task=task_obj)
        run = Run(predictor, fitted_task, cfg, folder, method=method)
        if evaluate:
            run.results = eval_splits(predictor, fitted_task, cfg, folder / "eval-test" if folder else None, progress)
        return run

    if folder is None:
        return fitted()
    cfg, saved = _saving_task(cfg, task_obj, folder)
    with run_folder(cfg, folder):
        if saved:
            save_task(task_obj, folder / TASK_FOLDER)
        return fitted()


def _saving_task(cfg: RunConfig, task: Task | None, run_dir: Path) -> tuple[RunConfig, bool]:
    """The config naming the spec file a task built in Python gets in ``run_dir`` (see
    :mod:`metatuner.api.inputs`), and whether there is one to write."""
    saved = saved_task_name(task, run_dir / TASK_FOLDER)
    if saved is None:
        return cfg, False
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=saved)), True


def load_run(run_dir: str | Path, overrides: Overrides = None, /, *, task: Task | None = None, **values: Any) -> Run:
    """Loads a trained MetaTuner run: its config (plus overrides) and its newest intact checkpoint.

    Args:
        run_dir: the run folder :func:`train` (or ``metatuner train``) wrote.
        overrides: config overrides, as :func:`load_config` takes them (``{"eval.limit": 20}``).
        task: the task, when the run was trained on one built in Python whose metric cannot be imported by
            name (its config names ``python:<name>``); otherwise the run's own task is loaded.
        **values: more config overrides as keyword arguments.

    Returns:
        The :class:`Run` (its ``results`` empty: score it with :meth:`Run.evaluate`).

    Example::

        run = load_run("runs/gsm8k-j", eval={"limit": 200})
        print(run.evaluate().line())
        run = load_run("runs/capitals", task=task)  # trained on a task built in Python
    """
    from metatuner.recipes import load_run as restore
    from metatuner.training.predictor import MetaTunerPredictor

    strings = [] if overrides is None or isinstance(overrides, Mapping) else list(overrides)
    nested = merge(_nested(overrides) if isinstance(overrides, Mapping) else {}, _nested(values))
    run_dir = Path(run_dir)
    try:
        mt, cfg = restore(run_dir, strings, nested)
    except ConfigKeyError as e:
        raise MetatunerError(str(e)) from None
    if task is None:
        task = _task_of(cfg, run_dir)
    return Run(MetaTunerPredictor(mt), task, cfg, run_dir)


def export_adapter(run: Run | str | Path, query: str, out_dir: str | Path) -> str:
    """Writes the LoRA a trained MetaTuner run generates for one query as a PEFT adapter folder.

    Args:
        run: a :class:`Run`, or a run folder (loaded with :func:`load_run`).
        query: the question, as the model sees it.
        out_dir: the folder to create (refused when it exists and is not empty, before any model loads).

    Returns:
        The prompt the run gives that query.

    Example::

        prompt = export_adapter("runs/gsm8k-j", "Tom has 3 apples ...", "adapters/tom")
    """
    from metatuner import files

    out = Path(out_dir)
    if not query.strip():
        raise MetatunerError("the query is empty; give the text of the question")
    if files.is_nonempty_dir(out):  # before the model loads
        raise MetatunerError(f"export folder {out} is not empty")
    return (run if isinstance(run, Run) else load_run(run)).export_adapter(query, out)
