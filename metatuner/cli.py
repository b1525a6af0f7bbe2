"""The ``metatuner`` command. It parses arguments, builds the config and calls a recipe; nothing more.

Every command accepts ``--config FILE`` (YAML holding overrides) and trailing ``key=value``
overrides (``eval.limit=20 model.dtype=bfloat16``); ``metatuner config`` lists every key.

Exit codes: 0 done; 2 a problem with the input or the environment (one line on stderr, ``metatuner:
error: ...``); 143 / 130 stopped by SIGTERM / SIGINT at a safe point (training saved a checkpoint first:
``metatuner train --resume`` continues it); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import unicodedata
from pathlib import Path

from metatuner import interrupts
from metatuner.errors import MetatunerError

MAIN_JOB_CONFIG = "quick"
API_KEY_ENV = "METATUNER_API_KEY"  # the server's key when --api-key is not given

LONG_RUNNING = ("eval", "train", "run", "bench")  # stop at a safe point on SIGTERM / SIGINT


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2, like every other error."""

    def error(self, message: str):
        _print_error(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def _print_error(message: str) -> None:
    # one line, whatever the message quotes from a path or a value: control characters and line
    # separators are escaped, and so is what cannot be encoded (a file name that is not UTF-8)
    line = "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") and c != "\t" else c
                   for c in message)
    print(f"metatuner: error: {line}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file of config overrides")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. eval.limit=20")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="task name (default: arithmetic, the built-in task; see `metatuner tasks`)")
    p.add_argument("--model", help="built-in alias, Hugging Face id or local folder (default: smollm2-135m)")
    p.add_argument("--method", help="method to evaluate: zero-shot (default) or cot; see `metatuner methods`")
    p.add_argument("--limit", type=int, help="evaluate the first N test items (eval.subset=random for a seeded sample)")
    p.add_argument("--data-dir", help="folder with <task>/{train,test}.jsonl (default: $METATUNER_DATA_DIR, else the hub)")
    p.add_argument("--batch-size", type=int, help="generation batch size (default 16)")
    p.add_argument("--out", help="folder to create for the results (default: runs/<kind>-<task>-<time>); "
                   "an existing non-empty folder is refused")


def _answering_flags(p: argparse.ArgumentParser, several: bool) -> None:
    """What answers: a trained run, and/or registered methods fitted on its config (or on --config)."""
    p.add_argument("--run", metavar="DIR", help="trained MetaTuner run folder (answers as model 'metatuner')")
    p.add_argument("--method", dest="methods", metavar="NAME", action="append" if several else None,
                   help="a registered method (zero-shot, sft, ...) fitted on the run's config, else on --config "
                   "and overrides" + ("; repeat to serve several, each under its name" if several else ", instead of --run"))
    p.add_argument("--task", help="task name or file:spec.yaml (default: the run's, else arithmetic)")
    p.add_argument("--model", help="built-in alias, Hugging Face id or local folder (default: the run's, else smollm2-135m)")
    p.add_argument("--data-dir", help="folder with <task>/{train,test}.jsonl (default: $METATUNER_DATA_DIR, else the hub)")


def build_parser() -> argparse.ArgumentParser:
    from metatuner.bench.protocol import shipped_protocols

    parser = Parser(
        prog="metatuner",
        description="Per-query prompt and LoRA co-optimization for language models (MetaTuner).",
        epilog="exit codes: 0 done; 2 bad input or environment (one error line); 143 / 130 stopped by SIGTERM / "
        "SIGINT at a safe point (train saves a checkpoint first: continue with train --resume)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tasks", help="list the registered tasks, or show one (a spec file too) in a spec's shape")
    p.add_argument("task", nargs="?", help="a task name or file:spec.yaml: print its fields and its first test query")
    p.add_argument("--data-dir", help="folder with <task>/{train,test}.jsonl (default: $METATUNER_DATA_DIR, else the hub)")
    sub.add_parser("methods", help="list the registered methods")
    p = sub.add_parser("config", help="print every config key with its default and help, or a resolved config")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a method, or a trained run (--run), on a task's test split")
    _eval_flags(p)
    p.add_argument("--run", metavar="DIR", help="evaluate this trained MetaTuner run (its config, plus overrides)")
    _common(p)

    p = sub.add_parser("train", help="train MetaTuner (warm-up, then joint training), then evaluate on test")
    _eval_flags(p)
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where its last checkpoint stopped")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the test evaluation after training (kept by --resume: eval.after_training=false)")
    _common(p)

    p = sub.add_parser("generate", help="answer questions with a trained run, showing the generated prompt")
    p.add_argument("--run", metavar="DIR", required=True, help="trained run folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="one question (for multiple choice, include the options as the task does)")
    src.add_argument("--input", metavar="FILE", help="JSONL file of task rows (the task's fields, e.g. question)")
    p.add_argument("--output", metavar="FILE", help="write JSONL (id, prompt, answer) here instead of printing")
    p.add_argument("--batch-size", type=int, default=8, help="queries per batch (default 8)")

    p = sub.add_parser("predict", help="answer a JSONL file of queries (prompt, output, extracted answer per line); "
                       "resumes after an interruption")
    _answering_flags(p, several=False)
    p.add_argument("--input", metavar="FILE", required=True, help="JSONL queries: the task's fields, or --field")
    p.add_argument("--out", metavar="FILE", required=True, help="JSONL answers, appended; a rerun skips ids already there")
    p.add_argument("--field", help="take each row's query from this field as it is (default: the task builds it)")
    p.add_argument("--batch-size", type=int, help="queries per batched generate (default: eval.batch_size, 16)")
    _common(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat/completions, completions, models, health)")
    _answering_flags(p, several=True)
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch-size", type=int, help="most requests decoded together (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a decode loop's first request waits for more (default 10)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    _common(p)

    p = sub.add_parser("export", help="write one query's generated LoRA as a PEFT adapter folder")
    p.add_argument("--run", metavar="DIR", required=True, help="trained run folder")
    p.add_argument("--query", required=True, help="the question whose LoRA to export")
    p.add_argument("--out", required=True, help="adapter folder to create (loads with PeftModel.from_pretrained)")

    p = sub.add_parser("rescore", help="grade a results folder's stored outputs again with the current task code")
    p.add_argument("results", nargs="+", metavar="DIR", help="results folders written by eval / train / bench")
    p.add_argument("--data-dir", help="folder with <task>/{train,test}.jsonl (default: $METATUNER_DATA_DIR, else the hub)")

    p = sub.add_parser("bench", help="run a benchmark protocol: methods x tasks x seeds, resumable cell by cell")
    p.add_argument("--config", required=True, metavar="FILE",
                   help=f"protocol YAML, or a shipped one by name: {', '.join(shipped_protocols())} "
                   "(metatuner/configs/bench/)")
    p.add_argument("--out", help="grid folder (default: runs/bench-<protocol>); rerunning skips finished cells")
    p.add_argument("--data-dir", help="folder with <task>/{train,test}.jsonl for every cell")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods' cells")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N cells at once, one process each, sharing the CPU threads (default 1); a grid "
                   "folder may also be worked on by several bench commands at once: cells are claimed")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this machine's processes (default); ray: each cell and tuning job a task on a Ray "
                   "cluster (pip install 'metatuner[ray]'), with the same claims and folder layout, so either "
                   "backend resumes the other's grid")
    p.add_argument("--address", metavar="ADDR",
                   help="with --backend ray: the cluster to join (auto: the one `ray start` runs on this node; "
                   "host:port); default: start one on this machine")
    p.add_argument("--cpus-per-cell", type=float, metavar="N",
                   help="with --backend ray: CPUs each cell and tuning job reserves (default 1)")
    p.add_argument("--gpus-per-cell", type=float, metavar="N",
                   help="with --backend ray: GPUs each cell and tuning job reserves (default 0; 0.5 shares one GPU)")
    p.add_argument("--no-report", action="store_true", help="skip writing the table and plots at the end")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of protocol keys, e.g. seeds=[0] common.eval.limit=4 tasks=[gsm8k]")

    p = sub.add_parser("plan", help="parameters, memory per device, the cards it fits and step time of a MetaTuner "
                       "run on GPUs, from a model's config alone (no weights, no GPU)")
    p.add_argument("--config", metavar="FILE", help="YAML file of config overrides")
    p.add_argument("overrides", nargs="*", metavar="[MODEL] KEY=VALUE",
                   help="the model first (config.json, model folder, built-in alias or Hugging Face id: only its "
                   "config is read; default: model.name), then config overrides, e.g. model.dtype=bfloat16 "
                   "train.batch_size=16")
    p.add_argument("--devices", type=int, default=1, metavar="N", help="data-parallel GPUs (default 1)")
    p.add_argument("--tflops", type=float, metavar="X", help="sustained TFLOP/s per GPU, for step times")
    p.add_argument("--target-tokens", type=int, metavar="N",
                   help="answer tokens per query (default: a quarter of train.max_length)")
    p.add_argument("--protocol", metavar="FILE",
                   help="plan a bench protocol's cell instead of --config: a file or "
                   f"{', '.join(shipped_protocols())}; the overrides are then the protocol's keys "
                   "(common.train.batch_size=8)")
    p.add_argument("--method",
                   help="with --protocol: the protocol's method whose cell is planned (default metatuner-j)")

    p = sub.add_parser("report", help="rebuild the table (results.md) and plots of a grid from its results.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="grid folder written by `metatuner bench`")

    p = sub.add_parser(
        "run", help="the main job on built-in defaults: a quick MetaTuner run on the built-in task, "
        "scored against zero-shot on the same test items (configs/quick.yaml)",
    )
    _eval_flags(p)
    _common(p)
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = {
        "task": "data.task",
        "model": "model.name",
        "method": "method",
        "limit": "eval.limit",
        "data_dir": "data.data_dir",
        "batch_size": "eval.batch_size",
        "host": "serve.host",
        "port": "serve.port",
        "max_batch_size": "serve.max_batch_size",
        "max_wait_ms": "serve.max_wait_ms",
    }
    flags = [f"{key}={getattr(args, flag)}" for flag, key in pairs.items() if getattr(args, flag, None) is not None]
    return flags + (["eval.after_training=false"] if getattr(args, "no_eval", False) else [])


def _config(args: argparse.Namespace, defaults: list[str] = ()):
    from metatuner.config import load_config

    path = args.config or (MAIN_JOB_CONFIG if args.command == "run" else None)
    return load_config(path, [*defaults, *args.overrides, *_flag_overrides(args)])


def cmd_tasks(args) -> None:
    import yaml

    from metatuner.config import absolute_task_files
    from metatuner.tasks import TASKS, get_task

    if args.task:
        task = get_task(absolute_task_files(args.task), args.data_dir)
        print(yaml.safe_dump(task.card(), sort_keys=False, allow_unicode=True, width=120), end="")
        example = task.load("test")[0]
        print(f"first test query ({example.id}):\n  {example.query}\n  gold: {example.answer}\n  target: {example.target}")
        return
    for name in TASKS.names():
        task = TASKS.get(name)
        source = task.hub.path if task.hub else "built in (generated, no files)"
        print(f"{name:10s} metric={task.primary_metric:22s} data={source}  splits={', '.join(task.splits)}")
        print(f"{'':10s} p~: {task.instruction}")


def cmd_methods(args) -> None:
    from metatuner.methods import METHODS

    for name in METHODS.names():
        doc = (METHODS.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:12s} {doc[0] if doc else ''}")


def cmd_config(args) -> None:
    from metatuner.config import describe, to_dict
    import yaml

    if args.config or args.overrides:
        print(yaml.safe_dump(to_dict(_config(args)), sort_keys=False), end="")
        return
    for key, default, help_ in describe():
        print(f"{key:24s} {default:16s} {help_}")


def _print_result(title: str, result) -> None:
    print(f"{title}: {result.line()}")
    for name, m in result.metrics.items():
        print(f"  {name:24s} {100 * m['mean']:5.1f}%  [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]")
    if result.out_dir is not None:
        print(f"  results: {result.out_dir}")


def _print_results(title: str, results) -> None:
    for result in results:
        _print_result(title, result)


def cmd_eval(args) -> None:
    from metatuner.recipes import eval_method, eval_run, new_run_dir, refuse_existing

    if args.run:
        overrides = [*args.overrides, *_flag_overrides(args)]
        out = Path(args.out) if args.out else Path(args.run) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        refuse_existing(out)
        _print_results("metatuner", eval_run(args.run, overrides, out))
        return
    cfg = _config(args)
    out = Path(args.out) if args.out else new_run_dir(cfg.out_dir, cfg.method, cfg.data.task)
    _print_results(cfg.method, eval_method(cfg, out))


def cmd_train(args) -> None:
    from metatuner.api import train
    from metatuner.recipes import RunFolderExists

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise MetatunerError(f"--resume: {run_dir / 'config.yaml'} not found; is {run_dir} a training run folder?")
        config, overrides = None, [*args.overrides, *_flag_overrides(args)]
    else:
        config, overrides, run_dir = _config(args), None, Path(args.out) if args.out else None
    try:
        run = train(config, overrides, run_dir=run_dir, resume=bool(args.resume),
                    on_trained=lambda run: print(f"trained: {run.run_dir}"))
    except RunFolderExists as e:
        raise MetatunerError(f"run folder {e.run_dir} already exists; use --resume {e.run_dir} to continue it, "
                             "or choose another --out") from None
    except interrupts.Stopped as e:
        if getattr(e, "run_dir", None) is None:
            raise
        raise interrupts.Stopped(e.signum, f"{e.detail}; continue with: metatuner train --resume {e.run_dir}") from None
    if run.results_reused:
        print(f"already evaluated: {run.run_dir / 'eval-test'}")
    else:
        _print_results("metatuner", run.results)


def cmd_run(args) -> None:
    from metatuner.recipes import main_job, new_run_dir

    cfg = _config(args, defaults=[])
    run_dir = Path(args.out) if args.out else new_run_dir(cfg.out_dir, "quick", cfg.data.task)
    tuned, base = main_job(cfg, run_dir)
    _print_results("metatuner", tuned)
    _print_results("zero-shot", base)
    print(f"run folder: {run_dir}")


def _query(text: str, flag: str) -> str:
    if not text.strip():
        raise MetatunerError(f"{flag} is empty; give the text of the question")
    return text


def cmd_generate(args) -> None:
    from metatuner.api import load_run
    from metatuner.files import write_text
    from metatuner.tasks import Example, read_jsonl

    if args.question is not None:
        _query(args.question, "--question")
    if args.batch_size < 1:
        raise MetatunerError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.output and Path(args.output).is_dir():
        raise MetatunerError(f"--output {args.output} is a folder; give a file name")
    run = load_run(args.run)
    if args.question is not None:
        examples = [Example(id="question", query=args.question, answer="", target="")]
    else:
        rows = read_jsonl(Path(args.input))
        examples = [run.task.checked_example(row, args.input, i + 1) for i, row in enumerate(rows)]
        if not examples:
            raise MetatunerError(f"{args.input} holds no rows")
    if args.output:  # the whole file at once, never a part of it
        answers = run.answer(examples, batch_size=args.batch_size)
        write_text(Path(args.output), "".join(json.dumps(a.to_dict(), ensure_ascii=False) + "\n" for a in answers))
        return
    for b in range(0, len(examples), args.batch_size):  # each batch printed as soon as it is answered
        for a in run.answer(examples[b : b + args.batch_size], batch_size=args.batch_size):
            print(f"[{a.id}]\n  prompt: {a.prompt}\n  output: {a.output}\n  answer: {a.answer}", flush=True)


def _named_predictors(args):
    """The predictors a predict or serve command answers with, by name, and the config they resolved."""
    from metatuner.recipes import named_predictors

    methods = args.methods if isinstance(args.methods, list) else [args.methods] if args.methods else []
    overrides = [*args.overrides, *_flag_overrides(args)]
    return named_predictors(args.run, methods, None if args.run else _config(args), overrides)


def cmd_predict(args) -> None:
    from metatuner.serving.predict import predict_file

    if bool(args.run) == bool(args.methods):
        raise MetatunerError("predict answers with one predictor: give --run DIR or --method NAME")
    if not Path(args.input).is_file():
        raise MetatunerError(f"--input {args.input}: file not found")
    found, cfg = _named_predictors(args)
    [(name, (predictor, task))] = found.items()
    total, now = predict_file(predictor, task, Path(args.input), Path(args.out), field=args.field,
                              batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    print(f"{name}: answered {now} queries, {total - now} were already in {args.out} ({total} in all)")


def cmd_serve(args) -> None:
    from metatuner.serving.server import serve

    found, cfg = _named_predictors(args)
    serve(found, cfg.serve, args.api_key or os.environ.get(API_KEY_ENV) or None)


def cmd_export(args) -> None:
    from metatuner.api import export_adapter

    prompt = export_adapter(args.run, _query(args.query, "--query"), Path(args.out))
    print(f"prompt: {prompt}\nadapter: {args.out} (PeftModel.from_pretrained(base_model, {args.out!r}))")


def cmd_rescore(args) -> None:
    from metatuner.evaluation.harness import read_results_folder, rescore
    from metatuner.tasks import get_task

    for folder in args.results:
        saved, _ = read_results_folder(Path(folder))
        # a spec file's task is found by its path (in the saved config), a registered one by its name
        task = get_task(saved.get("config", {}).get("data", {}).get("task") or str(saved.get("task")), args.data_dir)
        _print_result(f"rescored {folder}", rescore(folder, task))


def cmd_bench(args) -> None:
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol
    from metatuner.bench.report import report

    if args.workers < 1:
        raise MetatunerError(f"--workers must be at least 1, got {args.workers}")
    ray_flags = [f for f, v in (("--address", args.address), ("--cpus-per-cell", args.cpus_per_cell),
                                ("--gpus-per-cell", args.gpus_per_cell)) if v is not None]
    if args.backend != "ray" and ray_flags:
        raise MetatunerError(f"{ray_flags[0]} is for --backend ray")
    if args.backend == "ray" and args.workers != 1:
        raise MetatunerError("--workers is for --backend local; on Ray as many cells run at once as the cluster "
                             "has room for (see --cpus-per-cell, --gpus-per-cell)")
    protocol = Protocol.load(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"bench-{protocol.name}"
    run_grid(protocol, out, args.data_dir, args.only, args.workers, args.backend, args.address,
             1 if args.cpus_per_cell is None else args.cpus_per_cell,
             0 if args.gpus_per_cell is None else args.gpus_per_cell)
    if args.no_report:
        return
    md, plots = report(out)
    print(md.read_text())
    print(f"results: {out / 'results.json'}\ntable: {md}\nplots: {', '.join(str(p) for p in plots)}")


def cmd_plan(args) -> None:
    from metatuner.models.plan import format_plan, load_model_config, plan

    model = args.overrides.pop(0) if args.overrides and "=" not in args.overrides[0] else None
    if args.protocol:
        from metatuner.bench.protocol import Protocol

        if args.config:
            raise MetatunerError("give --protocol or --config, not both")
        protocol = Protocol.load(args.protocol, args.overrides)
        method = args.method or "metatuner-j"
        if method not in protocol.methods:
            raise MetatunerError(f"--method {method!r} is not in protocol {protocol.name!r}; its methods: "
                                 f"{', '.join(protocol.methods)}")
        cfg = protocol.config(protocol.tasks[0], method, protocol.seeds[0])
        if cfg.method != "metatuner":
            raise MetatunerError(f"--method {method!r} runs {cfg.method!r}; plan sizes MetaTuner's cells only")
    else:
        cfg = _config(args)
    name = model or cfg.model.name
    print(format_plan(plan(cfg, load_model_config(name), devices=args.devices, tflops=args.tflops,
                           target_tokens=args.target_tokens, model_name=name)))


def cmd_report(args) -> None:
    from metatuner.bench.report import report

    md, plots = report(Path(args.run_dir))
    print(md.read_text())
    print(f"plots: {', '.join(str(p) for p in plots)}")


COMMANDS = {
    "tasks": cmd_tasks, "methods": cmd_methods, "config": cmd_config, "eval": cmd_eval, "train": cmd_train,
    "run": cmd_run, "generate": cmd_generate, "export": cmd_export, "bench": cmd_bench, "report": cmd_report,
    "rescore": cmd_rescore, "predict": cmd_predict, "serve": cmd_serve, "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and args.command != "train":
            raise MetatunerError(
                f"`metatuner {args.command}` runs in one process, not {processes}; start only `metatuner train` "
                "with accelerate launch / torchrun"
            )
        if args.command in LONG_RUNNING:
            with interrupts.stop_at_safe_points():
                COMMANDS[args.command](args)
        else:
            COMMANDS[args.command](args)
    except MetatunerError as e:
        _print_error(e.cli)
        return 2
    except interrupts.Stopped as e:
        print(f"metatuner: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("metatuner: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
