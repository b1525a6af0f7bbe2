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

Layering: this module sits at the top of the library, above the recipes (``metatuner.recipes``) and
serving, and below ``metatuner.cli``; only the CLI imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metatuner.config import RunConfig, absolute_task_files, from_dict, load_config as _load_config, merge, to_dict
from metatuner.errors import MetatunerError
from metatuner.options import ConfigKeyError
from metatuner.tasks import Example, SpecTask, Task, get_task
from metatuner.tasks.metrics import function_metric
from metatuner.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from metatuner.evaluation.harness import EvalResult
    from metatuner.evaluation.predictors import Predictor
    from metatuner.models.metatuner import MetaTuner

#: ``data.task`` of a run whose task was built in Python (its rows are not in any file)
PYTHON_TASK_PREFIX = "python:"

ConfigSource = RunConfig | str | Path | None
Overrides = Mapping[str, Any] | Sequence[str] | None

__all__ = ["Answer", "Run", "export_adapter", "fit", "load_config", "load_run", "load_task", "make_task", "train"]


# ---- configs -----------------------------------------------------------------------------------
def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.name": x, "train": {"steps": 2}}`` -> ``{"model": {"name": x}, "train": {"steps": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not all(key.split(".")):
            raise MetatunerError(f"config key {key!r} is not a key such as 'eval.limit'")
        *parents, leaf = key.split(".")
        node: dict[str, Any] = {}
        node[leaf] = _nested(value) if isinstance(value, Mapping) else value
        for p in reversed(parents):
            node = {p: node}
        out = merge(out, node)
    return out


def load_config(config: ConfigSource = None, overrides: Overrides = None, /, **values: Any) -> RunConfig:
    """The typed run config: defaults, then a config file, then overrides.

    Args:
        config: a YAML file of overrides, a shipped config by name (``"quick"``, ``"gsm8k"``, ...), a
            :class:`~metatuner.config.RunConfig` to start from, or None for the defaults.
        overrides: a mapping of keys to values, nested (``{"train": {"steps": 20}}``) or dotted
            (``{"train.steps": 20}``), or a list of ``"key=value"`` strings as the command line takes them.
        **values: more overrides, as keyword arguments: a section as a dict (``train={"steps": 20}``) or a
            top-level key (``seed=1``); dotted keys go through ``**{"model.name": ...}``.

    Returns:
        The resolved :class:`~metatuner.config.RunConfig`. Unknown keys and values of the wrong type or
        outside the allowed choices raise :class:`~metatuner.MetatunerError` naming what is allowed.

    Example::

        >>> cfg = load_config("quick", train={"steps": 20}, **{"eval.limit": 8})
        >>> cfg.train.steps, cfg.eval.limit
        (20, 8)
    """
    strings: list[str] = []
    nested: dict[str, Any] = {}
    if isinstance(overrides, Mapping):
        nested = _nested(overrides)
    elif overrides is not None:
        if isinstance(overrides, str):
            raise MetatunerError(f"overrides {overrides!r}: give a mapping or a list of 'key=value' strings")
        strings = list(overrides)
    nested = merge(nested, _nested(values))
    try:
        if isinstance(config, RunConfig):
            base = merge(to_dict(config), nested)
            return _load_config(None, strings, values=base) if strings else from_dict(RunConfig, base)
        return _load_config(config, strings, values=nested)
    except ConfigKeyError as e:
        raise MetatunerError(str(e)) from None


# ---- tasks -------------------------------------------------------------------------------------
def load_task(name: str | Path, data_dir: str | Path | None = None) -> Task:
    """A task by name: a built-in one (``"gsm8k"``; ``metatuner tasks`` lists them), a spec file (a path to
    a ``.yaml`` file, or ``"file:spec.yaml"``) or a cross-task mix such as ``"math+hotpotqa>gsm8k"``.

    Args:
        name: the task's name or spec file.
        data_dir: the folder holding ``<task>/{train,test}.jsonl`` for built-in tasks (unset:
            ``$METATUNER_DATA_DIR``, else the Hugging Face hub). A spec file names its own data.

    Returns:
        The :class:`~metatuner.tasks.Task`.

    Example::

        >>> load_task("examples/capitals.yaml").name
        'capitals'
    """
    return get_task(_task_name(name), None if data_dir is None else str(data_dir))


def _task_name(name: str | Path) -> str:
    """A task's name as ``data.task`` holds it: a path to a ``.yaml`` file as ``file:<absolute path>``."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) and not text.startswith("file:"):
        text = "file:" + text
    return absolute_task_files(text)


def _rows(data: Any, split: str) -> list[dict[str, Any]]:
    """The rows of a list of dicts, a ``datasets.Dataset`` or a pandas ``DataFrame``."""
    if hasattr(data, "columns") and hasattr(data, "to_dict"):  # a pandas DataFrame
        data = data.to_dict(orient="records")
    elif hasattr(data, "column_names") and hasattr(data, "to_list"):  # a datasets.Dataset
        data = data.to_list()
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise MetatunerError(f"{split} rows: give a list of dicts, a datasets.Dataset or a pandas DataFrame, "
                             f"not a {type(data).__name__}")
    rows = list(data)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise MetatunerError(f"{split} row {i}: a row is a mapping of field names to values, "
                                 f"got a {type(row).__name__}")
    return [dict(row) for row in rows]


def make_task(
    train: Any = None,
    test: Any = None,
    *,
    template: str = "{question}",
    answer: str = "answer",
    metric: str | Callable[[str, str], float | dict[str, float]] = "exact",
    name: str = "custom",
    instruction: str | None = None,
    target: str | None = None,
    options: list[str] | None = None,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    primary: str | None = None,
    pattern: str | None = None,
) -> Task:
    """A task from Python objects, graded like a spec-file task (``metatuner.tasks.spec``) with the same fields.

    Args:
        train: the training rows: a list of dicts, a ``datasets.Dataset`` or a pandas ``DataFrame``.
        test: the test rows, in the same forms (what :meth:`Run.evaluate` and evaluation after training score).
        template: the query, from a row's fields in Python format syntax (``"Q: {question}"``).
        answer: the field holding the gold answer.
        metric: a metric by name (``exact``, ``numeric``, ``f1``, ``letter``, ``math``, ``regex``) or a
            callable ``metric(output, answer) -> float`` (or a dict of floats), called with the whole model
            output and the gold answer, as a ``module:function`` metric of a spec file is.
        name: the task's name in results and run folders.
        instruction: the initial instruction p~ MetaTuner rewrites per query (unset: the metric's default;
            required with a callable metric).
        target: the field holding a worked solution to fine-tune on (unset: the answer in the metric's format).
        options: with ``metric="letter"``: the fields holding the options, or one field holding a list.
        max_new_tokens: the answer's new-token budget.
        stop: generation stops at the first of these strings.
        primary: with a callable metric returning a dict: the score reported first (default ``score``).
        pattern: with ``metric="regex"``: the pattern whose first group is the answer.

    Returns:
        The :class:`~metatuner.tasks.Task`. Rows are checked when a split is loaded; errors name the split
        and the row (``capitals[train]:3: row lacks field(s) capital ...``).

    Example::

        >>> task = make_task(train=[{"question": "2+2?", "answer": "4"}] * 4, metric="numeric")
        >>> task.load("train")[0].query
        '2+2?'
    """
    rows = {split: _rows(data, split) for split, data in (("train", train), ("test", test)) if data is not None}
    if not rows:
        raise MetatunerError(f"task {name!r}: no rows given; give train and/or test rows")
    grader = None
    metric_fields: dict[str, Any] = {"pattern": pattern, "primary": primary}
    if callable(metric):
        if pattern:
            raise MetatunerError("pattern goes with metric='regex', not with a callable metric")
        label = getattr(metric, "__name__", type(metric).__name__)
        grader, metric_fields = function_metric(metric, label, primary), {"name": label}
    elif isinstance(metric, str):
        metric_fields["name"] = metric
    else:
        raise MetatunerError(f"metric must be a metric's name or a callable(output, answer), not {metric!r}")
    fields = {"name": name, "template": template, "answer": answer, "target": target, "options": options,
              "instruction": instruction, "max_new_tokens": max_new_tokens, "stop": list(stop),
              "metric": {k: v for k, v in metric_fields.items() if v is not None}}
    try:
        spec = from_dict(TaskSpec, {k: v for k, v in fields.items() if v is not None})
    except ConfigKeyError as e:
        raise MetatunerError(f"task {name!r}: {e}") from None
    return SpecTask(spec=spec, rows=rows, grader=grader)


def _task_ref(task: Task) -> str:
    """What a run's ``data.task`` records for a task object: its spec file or name; a task built in Python
    is recorded as ``python:<name>`` (its rows live in no file: :func:`load_run` takes it again)."""
    if isinstance(task, SpecTask):
        return f"file:{task.path.resolve()}" if task.path is not None else PYTHON_TASK_PREFIX + task.name
    return task.name


def _resolve_task(task: Task | str | Path | None, cfg: RunConfig) -> tuple[Task | None, RunConfig]:
    """The task object to use (None: the config's ``data.task``, which a name given here replaces) and the
    config recording it."""
    if task is None:
        return None, cfg
    if isinstance(task, Task):
        return task, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=_task_ref(task)))
    return None, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=_task_name(task)))


def _task_of(cfg: RunConfig, where: Path) -> Task:
    if cfg.data.task.startswith(PYTHON_TASK_PREFIX):
        name = cfg.data.task.removeprefix(PYTHON_TASK_PREFIX)
        raise MetatunerError(f"{where} was trained on task {name!r}, built in Python: its rows are in no file; "
                             f"pass the task again (task=make_task(...))")
    return get_task(cfg.data.task, cfg.data.data_dir)


# ---- runs --------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One answered question: the prompt the model was given, its output and the answer extracted from it
    (with the gold answer and scores when the question came with one)."""

    id: str
    query: str
    prompt: str
    output: str
    answer: str | None
    extracted: dict[str, str | None]
    gold: str | None = None
    scores: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON record ``metatuner generate --output`` and ``metatuner predict`` write."""
        record = dataclasses.asdict(self)
        return record if self.scores is not None else {k: v for k, v in record.items() if k not in ("gold", "scores")}


@dataclass
class Run:
    """A fitted predictor with everything that made it: what :func:`train`, :func:`fit` and :func:`load_run`
    return.

    Attributes:
        predictor: answers batches of examples (``predictor.predict(task, examples, max_new_tokens)``).
        task: the task it was fitted on.
        config: the resolved config (saved as ``config.yaml`` in ``run_dir``).
        run_dir: the run folder (checkpoints, logs, results), or None when nothing was written.
        method: the registered method that was fitted (``metatuner`` for :func:`train`).
        results: the evaluation results, one per split of ``config.eval.splits`` (empty when not evaluated).
        results_reused: the results were read from ``run_dir``, written by an earlier call (a resumed run
            that had already been evaluated).
        main_process: False in the other processes of a run trained under ``accelerate launch`` /
            ``torchrun`` (they train, but evaluate nothing).
    """

    predictor: Predictor
    task: Task
    config: RunConfig
    run_dir: Path | None
    method: str = "metatuner"
    results: list[EvalResult] = field(default_factory=list)
    results_reused: bool = False
    main_process: bool = True

    @property
    def metatuner(self) -> MetaTuner:
        """The trained MetaTuner (G, F and M) of a MetaTuner run."""
        mt = getattr(self.predictor, "mt", None)
        if mt is None:
            raise MetatunerError(f"method {self.method!r} has no MetaTuner; train one with metatuner.train")
        return mt

    def answer(self, questions: Sequence[str | Mapping[str, Any] | Example], *, batch_size: int = 8,
               max_new_tokens: int | None = None) -> list[Answer]:
        """Answers questions with the fitted predictor (for MetaTuner: a generated prompt and LoRA per query).

        Args:
            questions: each a query as the model sees it (a string), a row of the task's fields (a dict, e.g.
                ``{"country": "Italy"}``; with the answer field too, the answer is also scored), or an
                :class:`~metatuner.tasks.Example`.
            batch_size: questions per batched generate.
            max_new_tokens: the answer's new-token budget (unset: the task's).

        Returns:
            One :class:`Answer` per question, in order: ``prompt``, ``output`` and the extracted ``answer``.

        Example::

            for a in run.answer(["What is the capital of Italy?", {"country": "Peru"}]):
                print(a.prompt, a.output, a.answer)
        """
        from metatuner.serving.predict import prediction_record

        if batch_size < 1:
            raise MetatunerError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(questions, (str, Mapping)):
            raise MetatunerError("questions is a list (of strings, rows or examples); wrap one question in [...]")
        examples = [self._example(q, i) for i, q in enumerate(questions, 1)]
        budget = max_new_tokens or self.predictor.budget(self.task)
        answers = []
        for b in range(0, len(examples), batch_size):
            batch = examples[b : b + batch_size]
            for ex, p in zip(batch, self.predictor.predict(self.task, batch, budget), strict=True):
                answers.append(Answer(**prediction_record(self.task, ex, p)))
        return answers

    def _example(self, question: str | Mapping[str, Any] | Example, i: int) -> Example:
        if isinstance(question, Example):
            return question
        if isinstance(question, str):
            if not question.strip():
                raise MetatunerError(f"question {i} is empty; give the text of the question")
            return Example(id=str(i), query=question, answer="", target="")
        if isinstance(question, Mapping):
            return self.task.query_example({"id": str(i), **question}, "questions", i)
        raise MetatunerError(f"question {i}: give a string, a dict of the task's fields or an Example, "
                             f"not a {type(question).__name__}")

    def evaluate(self, split: str | None = None, *, limit: int | None = None, out_dir: str | Path | None = None,
                 progress: bool = False) -> EvalResult:
        """Scores the predictor on a test split of its task, through the same harness as every method.

        Args:
            split: the split (default: the first of ``config.eval.splits``, ``test``).
            limit: score the first N items (default: ``config.eval.limit``; ``config.eval.subset`` picks them).
            out_dir: a results folder to create (records, summary, config); None writes nothing.
            progress: show a progress bar.

        Returns:
            The :class:`~metatuner.evaluation.harness.EvalResult`: ``.score`` (the primary metric's mean),
            ``.metrics`` with 95% intervals and ``.records`` per item.

        Example::

            result = run.evaluate(limit=20, out_dir="runs/capitals/eval-first-20")
            print(result.line(), result.metrics[result.primary_metric])
        """
        from metatuner import files
        from metatuner.recipes import eval_predictor

        cfg = self.config
        if limit is not None:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, limit=limit))
        out = Path(out_dir) if out_dir is not None else None
        if out is not None and files.is_nonempty_dir(out):
            raise MetatunerError(f"results folder {out} already exists and is not empty")
        return eval_predictor(self.predictor, self.task, cfg, out, progress, split)

    def export_adapter(self, query: str, out_dir: str | Path) -> str:
        """Writes the LoRA F generates for ``query`` as a PEFT adapter folder (MetaTuner runs only).

        Args:
            query: the question whose adapter to write, as the model sees it.
            out_dir: the folder to create; it loads with ``PeftModel.from_pretrained(base_model, out_dir)``.

        Returns:
            The prompt the run gives that query (generated, or p~ when the validation gate kept it).

        Example::

            prompt = run.export_adapter("What is the capital of Italy?", "adapters/italy")
            model = PeftModel.from_pretrained(base_model, "adapters/italy")  # M with Italy's LoRA
        """
        from metatuner.models.export import export_peft_adapter

        if not query.strip():
            raise MetatunerError("the query is empty; give the text of the question")
        return export_peft_adapter(self.metatuner, self.task, query, Path(out_dir))


# ---- fitting -----------------------------------------------------------------------------------
def _read_results(cfg: RunConfig, task: Task, done: Path) -> list[EvalResult]:
    """The results an earlier evaluation after training wrote (``done``, and beside it one folder per
    other split)."""
    from metatuner.evaluation.harness import EvalResult, read_results_folder
    from metatuner.recipes import split_dir

    first, *others = cfg.eval.splits
    results = []
    for split in cfg.eval.splits:
        folder = done if split == first else split_dir(done, split)
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
            name or spec file); unset: the config's ``data.task``. A task built in Python is recorded in the
            config as ``python:<name>``; :func:`load_run` and a resume then take it again.
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
    evaluate = cfg.eval.after_training if evaluate is None else evaluate
    with run_folder(cfg, run_dir, resume=resume):
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
    with run_folder(cfg, folder):
        return fitted()


def load_run(run_dir: str | Path, overrides: Overrides = None, /, *, task: Task | None = None, **values: Any) -> Run:
    """Loads a trained MetaTuner run: its config (plus overrides) and its newest intact checkpoint.

    Args:
        run_dir: the run folder :func:`train` (or ``metatuner train``) wrote.
        overrides: config overrides, as :func:`load_config` takes them (``{"eval.limit": 20}``).
        task: the task, when the run was trained on one built in Python (its rows are in no file);
            otherwise the run's own task is loaded.
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
