"""What a fit returns: a :class:`Run` (the predictor with its task, config, run folder and results), which
answers questions (:class:`Answer`), scores a split and exports one query's adapter."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metatuner.config import RunConfig
from metatuner.errors import MetatunerError
from metatuner.tasks import Example, Task

if TYPE_CHECKING:
    from metatuner.evaluation.harness import EvalResult
    from metatuner.evaluation.predictors import Predictor
    from metatuner.models.metatuner import MetaTuner


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
    #: the whole JSON record (``metatuner.serving.predict.prediction_record``) the fields were read from
    record: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Answer:
        return cls(record["id"], record["query"], record["prompt"], record["output"], record["answer"],
                   record["extracted"], record.get("gold"), record.get("scores"), record)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record ``metatuner generate --output`` and ``metatuner predict`` write for this answer."""
        return dict(self.record)


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
                answers.append(Answer.from_record(prediction_record(self.task, ex, p)))
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
        from metatuner.recipes import eval_predictor, refuse_existing

        cfg = self.config
        if limit is not None:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, limit=limit))
        out = Path(out_dir) if out_dir is not None else None
        refuse_existing(out)
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
