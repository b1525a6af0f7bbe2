"""The ``metatuner`` command. It parses arguments, builds the config and calls a recipe; nothing more.

Every command accepts ``--config FILE`` (YAML holding overrides) and trailing ``key=value``
overrides (``eval.limit=20 model.dtype=bfloat16``); ``metatuner config`` lists every key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from metatuner.errors import MetatunerError

MAIN_JOB_LIMIT = 100


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
    p.add_argument("--out", help="results folder to create (default: runs/<method>-<task>-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metatuner",
        description="Per-query prompt and LoRA co-optimization for language models (MetaTuner).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("tasks", help="list the registered tasks")
    sub.add_parser("methods", help="list the registered methods")
    p = sub.add_parser("config", help="print every config key with its default and help, or a resolved config")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a method on a task's test split")
    _eval_flags(p)
    _common(p)

    p = sub.add_parser(
        "run", help=f"the main job on built-in defaults: zero-shot on the built-in task ({MAIN_JOB_LIMIT} items)"
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
    }
    return [f"{key}={getattr(args, flag)}" for flag, key in pairs.items() if getattr(args, flag, None) is not None]


def _config(args: argparse.Namespace, defaults: list[str] = ()):
    from metatuner.config import load_config

    return load_config(args.config, [*defaults, *args.overrides, *_flag_overrides(args)])


def cmd_tasks(args) -> None:
    from metatuner.tasks import TASKS

    for name in TASKS.names():
        task = TASKS.get(name)
        source = task.hub.path if task.hub else "built in (generated, no files)"
        print(f"{name:10s} metric={task.primary_metric:22s} data={source}")
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


def cmd_eval(args, defaults: list[str] = ()) -> None:
    from metatuner.recipes import eval_method, new_run_dir

    cfg = _config(args, defaults)
    out = Path(args.out) if args.out else new_run_dir(cfg.out_dir, cfg.method, cfg.data.task)
    result = eval_method(cfg, out)
    print(result.line())
    for name, m in result.metrics.items():
        print(f"  {name:24s} {100 * m['mean']:5.1f}%  [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]")
    print(f"results: {out}")


def cmd_run(args) -> None:
    cmd_eval(args, defaults=[f"eval.limit={MAIN_JOB_LIMIT}"])


COMMANDS = {"tasks": cmd_tasks, "methods": cmd_methods, "config": cmd_config, "eval": cmd_eval, "run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        COMMANDS[args.command](args)
    except MetatunerError as e:
        print(f"metatuner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metatuner: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
