"""Typed configuration: nested dataclasses, YAML files that hold overrides, and ``key=value`` overrides.

Every field has a default and a help string (``metatuner config`` prints them all). A YAML file and
the command line only override what they name; unknown keys and values of the wrong type or outside
the allowed choices are rejected with a message naming what is allowed. The resolved config is
saved with every run (``config.yaml`` in the run folder).

Each method owns its section (``dpo.*``, ``ppo.*``, ...): the method's module declares the section's
dataclass and registers both (:meth:`metatuner.methods.base.MethodRegistry.register` calls
:func:`register_section`), and :class:`RunConfig` finds the sections through that registry, so the
overrides, ``metatuner config`` and ``config.yaml`` know a method's keys as soon as its module is
imported (the built-in methods, and those ``$METATUNER_PLUGINS`` names: :mod:`metatuner.plugins`). The
method modules are imported only when a section is needed (named in a file or an override, read, or
written out), so a config of the core sections alone loads without torch.

>>> cfg = load_config(None, ["eval.limit=20", "data.task=gsm8k"])
>>> cfg.eval.limit, cfg.data.task
(20, 'gsm8k')
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metatuner import files, plugins
from metatuner.errors import MetatunerError
from metatuner.options import ConfigKeyError, _at_least, non_negative, option, positive  # noqa: F401 - re-exported

SHIPPED = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    name: str = option("smollm2-135m", "downstream model M: built-in alias, Hugging Face id or local folder")
    dtype: str = option("float32", "weights dtype", ("float32", "bfloat16", "float16"))
    device: str = option("auto", "torch device ('auto' picks cuda when available, else cpu)")


@dataclass
class DataConfig:
    task: str = option("arithmetic", "task name (see `metatuner tasks`)")
    data_dir: str | None = option(
        None, "folder holding <task>/{train,test}.jsonl; unset: $METATUNER_DATA_DIR, then the hub"
    )
    train_limit: int | None = option(None, "use at most this many training items (seeded subset)")
    val_size: int = option(
        32, "items carved from train (seeded) for validation (MetaTuner's prompt gate, diagnostics; 0: none); never "
        "from test"
    )
    seed: int = option(0, "seed of the train/validation subset choice")

    def __post_init__(self):
        _at_least("data.train_limit", self.train_limit, 1)
        _at_least("data.val_size", self.val_size, 0)
        self.task = absolute_task_files(self.task)


TASK_FILE_PREFIX = "file:"


def absolute_task_files(name: str) -> str:
    """``file:spec.yaml`` task names with their paths made absolute, so a run's saved config finds its spec
    from any working directory (also the parts of a cross-task mix, ``file:a.yaml+gsm8k>file:b.yaml``)."""
    return re.sub(
        re.escape(TASK_FILE_PREFIX) + r"([^+>]+)",
        lambda m: TASK_FILE_PREFIX + str(Path(m.group(1).strip()).expanduser().resolve()),
        name,
    )


@dataclass
class EvalConfig:
    limit: int | None = option(None, "evaluate at most this many test items (seeded subset)")
    subset: str = option("first", "which items --limit keeps", ("first", "random"))
    seed: int = option(0, "seed of the random subset")
    batch_size: int = option(16, "generation batch size")
    max_new_tokens: int | None = option(None, "override the task's new-token budget")
    likelihood: bool = option(True, "also score multiple-choice tasks by option likelihood")
    splits: list[str] = option(
        None, "test splits to score, each in its own results folder: the first in the run's folder, each other "
        "beside it as <folder>@<split> (test_shift: the built-in tasks' template-shift test)",
        factory=lambda: ["test"],
    )
    budgets: list[int] | None = option(
        None, "learning curve: also score a trained method at these optimizer steps of its training (warm-ups "
        "counted; 0: before the first), each into <folder>.b<step>; the run's own end is scored as usual"
    )
    budget_splits: list[str] | None = option(
        None, "the splits the learning-curve points of eval.budgets are scored on, each one of eval.splits "
        "(unset: all of them); the run's own end is scored on every split"
    )
    after_training: bool = option(
        True, "`metatuner train` scores the test split when training ends (--no-eval sets false; --resume keeps it)"
    )

    def __post_init__(self):
        for b in self.budgets or ():
            _at_least("eval.budgets[]", b, 0)
        if not self.splits or len(set(self.splits)) < len(self.splits):
            raise MetatunerError(f"eval.splits must name at least one split, each once; got {self.splits!r}")
        if "train" in self.splits:
            raise MetatunerError("eval.splits may not hold 'train': methods are fitted on it")
        if self.budget_splits is not None and (not self.budget_splits or len(set(self.budget_splits)) < len(
                self.budget_splits) or not set(self.budget_splits) <= set(self.splits)):
            raise MetatunerError(f"eval.budget_splits must name one or more of eval.splits {self.splits!r}, each "
                                 f"once; got {self.budget_splits!r}")
        _at_least("eval.limit", self.limit, 1)
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class GeneratorConfig:
    """The prompt generator G and the meta encoder (its layers below k)."""

    model: str | None = option(None, "G's checkpoint; unset: the same as M, sharing one copy of the base weights")
    share_ratio: float = option(0.25, "k as a fraction of G's depth: layers [0, k) form the shared meta encoder")
    share_layers: int | None = option(None, "k as an absolute layer count (overrides share_ratio); 0 = no sharing")
    targets: list[str] = option(None, "G's LoRA target modules", factory=lambda: ["q_proj", "v_proj"])
    rank: int = option(8, "rank of G's LoRA adapters")
    alpha: float = option(16.0, "LoRA alpha of G's adapters (scale alpha / rank)")
    mode: str = option(
        "append", "rewrite = G writes the whole prompt (the paper); append = p~ plus a short per-query hint from G",
        ("append", "rewrite"),
    )
    max_prompt_tokens: int = option(16, "cap on the new tokens of a generated prompt (append: of the hint)")
    on_cap: str = option(
        "cut", "a generation that reaches the cap unfinished: cut at its last complete sentence, or fall back to p~",
        ("cut", "fallback"),
    )
    pooling: str = option("mean", "how layer k's states become F's input", ("mean", "last"))
    features: str = option(
        "query", "the tokens F's input is pooled over: the query's own (query) or the whole rewrite input (all)",
        ("query", "all"),
    )
    feature_layer: int | None = option(
        None, "with k = 0, the frozen layer F reads, counted from 1 (default: a quarter of the depth)"
    )

    def __post_init__(self):
        _at_least("generator.rank", self.rank, 1)
        _at_least("generator.max_prompt_tokens", self.max_prompt_tokens, 1)
        _at_least("generator.share_layers", self.share_layers, 0)
        _at_least("generator.feature_layer", self.feature_layer, 1)
        non_negative("generator", self, "alpha")
        if not 0.0 <= self.share_ratio <= 1.0:
            raise MetatunerError(f"generator.share_ratio must be in [0, 1], got {self.share_ratio}")


@dataclass
class HypernetConfig:
    """The parameter generator F and the per-query LoRA it writes for M."""

    targets: list[str] = option(None, "M's target modules for generated LoRA", factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = option(None, "M's layers given generated LoRA, 0-based (unset: all)")
    rank: int = option(8, "rank of the generated LoRA")
    alpha: float = option(16.0, "LoRA alpha of the generated LoRA (scale alpha / rank)")
    hidden: int = option(64, "width of F's two-layer MLPs")
    emb_dim: int = option(32, "size of F's layer and module-type embeddings")

    def __post_init__(self):
        for layer in self.layers or ():
            _at_least("hypernet.layers[]", layer, 0)
        for name in ("rank", "hidden", "emb_dim"):
            _at_least(f"hypernet.{name}", getattr(self, name), 1)
        non_negative("hypernet", self, "alpha")


@dataclass
class TrainConfig:
    """Warm-up and joint training."""

    schedule: str = option("joint", "joint = MetaTuner-J (sum of losses), alternate = MetaTuner-I", ("joint", "alternate"))
    ablation: str = option(
        "none", "no_hypernet = w/o F, no_prompt = w/o P, no_share = w/o S (k = 0)",
        ("none", "no_hypernet", "no_prompt", "no_share"),
    )
    steps: int = option(
        30, "the run's whole budget of optimizer steps: warm-up of M + warm-up of G + joint training; "
        "the learning-rate schedule spans all of it (for sft, all steps are SFT)"
    )
    batch_size: int = option(4, "queries per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr_encoder: float = option(1e-4, "learning rate of the shared meta encoder's LoRA (phi_s)")
    lr_decoder: float = option(1e-3, "learning rate of the prompt decoder's LoRA (phi_p)")
    lr_hypernet: float = option(1e-3, "learning rate of the hypernetwork F (phi_q)")
    lr_static: float = option(1e-3, "learning rate of M's static LoRA (the SFT baseline's LoRA)")
    freeze_static: bool = option(
        False, "freeze M's static LoRA after its warm-up (false: it keeps training on the task loss, F's LoRA a residual on top)"
    )
    lr_scale: float = option(
        1.0, "multiplies every learning rate above (one knob for tuning: `tune` in a bench protocol)"
    )
    lr_schedule: str = option("cosine", "learning-rate schedule after warm-up", ("constant", "linear", "cosine"))
    warmup_ratio: float = option(0.1, "fraction of steps with a linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    alpha: float = option(1.0, "weight of the supervised regularization loss")
    rollouts: int = option(4, "prompts sampled per query for the expert prompt set D2")
    temperature: float = option(1.0, "sampling temperature of rollouts")
    reward: str = option("nll", "rollout reward: nll (teacher-forced gold NLL) or em (greedy answer scored)", ("nll", "em"))
    rollout_every: int = option(2, "run rollouts every this many joint steps")
    rollout_queries: int | None = option(
        None, "queries of each batch rolled out on a rollout step, the first ones (unset: all): fewer cut G's "
        "sampling and the reward scoring, the largest parts of a step while the prompt branch is active"
    )
    expert_margin: float = option(
        0.05, "a sampled prompt becomes a query's expert only if its reward beats p~'s by this much (nats); else p~ is"
    )
    expert_cap: int = option(4096, "most queries the expert set D2 holds (the least recently improved leave first)")
    reg_batch_size: int | None = option(
        None, "queries sampled from D2 for the regularization term (unset: half of batch_size, at least 1)"
    )
    prefetch_limit: int = option(
        32, "most queries whose frozen-decoder prompts are decoded in one batch (this one and those due before the next sync)"
    )
    sync_every: int = option(10, "re-synchronise the frozen prompt decoder every this many steps")
    static_rank: int = option(8, "rank of M's static LoRA (warm-up SFT)")
    static_alpha: float = option(16.0, "LoRA alpha of M's static LoRA (scale alpha / rank)")
    actor_warmup_steps: int | None = option(
        None, "warm-up SFT steps of M's static LoRA, part of train.steps (unset: half of them; 0 = no static LoRA)"
    )
    generator_warmup_queries: int = option(32, "queries for G's rejection-sampling warm-up (0 = skip it)")
    generator_warmup_steps: int | None = option(
        None, "SFT steps of G on the warm-up's best prompts, part of train.steps (unset: a tenth of them; 0 = none)"
    )
    overlap_warmups: bool = option(
        True, "G's warm-up steps also train M (static LoRA and F) on the task loss with p~, as w/o P's joint "
        "steps do, so G's warm-up costs M no steps (false: they step G alone, the paper's sequential warm-ups)"
    )
    gate: bool = option(
        True, "at the end, serve p~ instead of generated prompts unless they score more than gate_margin higher on validation"
    )
    gate_margin: float = option(
        0.05, "generated prompts are served only if they score more than this (primary metric, 0-1) above p~ on validation"
    )
    prompt_branch: str = option(
        "auto", "auto = the prompt branch retires itself (no more rollouts, regularizer or prompt decoding; p~ is "
        "served) when warm-up rollouts, later rollouts or a validation gate show G's prompts do not beat p~; "
        "always = it trains to the end, the paper's schedule", ("auto", "always"),
    )
    retire_below: float = option(
        0.1, "prompt_branch=auto retires the branch when fewer than this share of rolled-out queries improved on p~ "
        "by expert_margin (G's warm-up rollouts, or the last retire_window queries of the joint phase's rollouts)"
    )
    retire_window: int = option(32, "queries of joint-phase rollouts that prompt_branch=auto judges at a time")
    max_length: int = option(512, "truncate M's training inputs to this many tokens")
    autocast: str = option(
        "auto", "mixed precision: forward passes of G and M (training, rollouts, generation) run under torch.autocast "
        "in this dtype; auto = on when model.dtype is bfloat16/float16 (in that dtype), none for float32; trainable "
        "weights, their optimizer state and the LoRA terms stay float32 (fp16 activations: the loss is scaled)",
        ("auto", "none", "bf16", "fp16"),
    )
    gradient_checkpointing: bool = option(
        False, "recompute G's and M's decoder blocks in the backward pass instead of keeping their activations: "
        "less memory for about one more forward pass per step (passes without gradients are unaffected)"
    )
    log_every: int = option(1, "log losses every this many steps")
    eval_every: int = option(0, "evaluate on the validation split every this many steps (0 = only at the end)")
    save_every: int = option(10, "checkpoint every this many steps (and at the end)")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "rollouts", "rollout_every", "sync_every", "static_rank",
                     "max_length", "log_every", "save_every", "expert_cap", "reg_batch_size", "prefetch_limit",
                     "retire_window", "rollout_queries"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        for name in ("actor_warmup_steps", "generator_warmup_queries", "generator_warmup_steps", "eval_every"):
            _at_least(f"train.{name}", getattr(self, name), 0)
        if self.temperature <= 0:
            raise MetatunerError(f"train.temperature must be > 0, got {self.temperature}")
        positive("train", self, "lr_encoder", "lr_decoder", "lr_hypernet", "lr_static")
        non_negative("train", self, "weight_decay", "max_grad_norm", "alpha", "expert_margin", "gate_margin",
                     "static_alpha")
        if self.lr_scale <= 0:
            raise MetatunerError(f"train.lr_scale must be > 0, got {self.lr_scale}")
        if not 0.0 <= self.retire_below <= 1.0:
            raise MetatunerError(f"train.retire_below must be in [0, 1], got {self.retire_below}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise MetatunerError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmups()[0] + self.warmups()[1] > self.steps:
            raise MetatunerError(
                f"train.actor_warmup_steps + train.generator_warmup_steps = {sum(self.warmups())} exceed "
                f"train.steps={self.steps}, the run's whole budget"
            )

    def warmups(self) -> tuple[int, int]:
        """(warm-up steps of M, warm-up steps of G), resolved from train.steps where unset."""
        actor = self.steps // 2 if self.actor_warmup_steps is None else self.actor_warmup_steps
        gen = max(1, self.steps // 10) if self.generator_warmup_steps is None else self.generator_warmup_steps
        gen = min(gen, self.steps - actor)
        if self.generator_warmup_queries == 0:
            gen = 0
        return actor, gen

    def joint_steps(self) -> int:
        return self.steps - sum(self.warmups())


@dataclass
class ServeConfig:
    """The HTTP server (``metatuner serve``): where it listens, batching and request limits."""

    host: str = option("127.0.0.1", "address to bind (localhost by default; 0.0.0.0 exposes the server to the network)")
    port: int = option(8000, "TCP port (0: any free port, printed at start)")
    max_batch_size: int = option(8, "most requests decoded together in one running batch (1 = one at a time)")
    max_wait_ms: float = option(10.0, "how long a decode loop's first request waits for more to start with it (later ones join between steps)")
    timeout_s: float = option(120.0, "a request not answered within this many seconds gets a 504 error")
    max_input_chars: int = option(8000, "longest query (and system message) accepted, in characters")
    max_tokens: int = option(1024, "largest max_tokens a request may ask for")
    max_body_bytes: int = option(1_000_000, "largest request body accepted, in bytes")

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_chars", "max_tokens", "max_body_bytes"):
            _at_least(f"serve.{name}", getattr(self, name), 1)
        if not 0 <= self.port <= 65535:
            raise ConfigKeyError("serve.port", f"serve.port must be in 0..65535, got {self.port}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ConfigKeyError("serve", f"serve.max_wait_ms must be >= 0 and serve.timeout_s > 0, got "
                                 f"{self.max_wait_ms} and {self.timeout_s}")


@dataclass(frozen=True)
class Section:
    """A method's config section: the dataclass of its keys, found in a run config under ``name``."""

    name: str
    config_class: type
    help: str


_SECTIONS: dict[str, Section] = {}  # in the order registered: the order config.yaml lists them


def register_section(name: str, config_class: type, help: str = "") -> Section:
    """Adds ``config_class`` to every run config as the section ``name`` (keys ``<name>.<field>``).

    Methods call this through :meth:`metatuner.methods.base.MethodRegistry.register`; registering the same
    class under the same name again changes nothing.

    Args:
        name: the section's key in the config (``dpo`` for ``dpo.steps=3``).
        config_class: a dataclass whose fields all have defaults and help strings (:func:`metatuner.options.option`).
        help: one line on what the section configures.

    Returns:
        The registered :class:`Section`.

    Raises:
        ValueError: ``name`` is a key of the core config, or holds another class already; ``config_class`` is
            not a dataclass.
    """
    if not dataclasses.is_dataclass(config_class):
        raise ValueError(f"config section {name!r}: {config_class!r} is not a dataclass")
    if name in {f.name for f in dataclasses.fields(RunConfig)}:
        raise ValueError(f"config section {name!r} would shadow the run config's own key {name!r}")
    old = _SECTIONS.get(name)
    if old is not None and old.config_class is not config_class:
        raise ValueError(f"config section {name!r} is registered twice ({old.config_class.__qualname__} and "
                         f"{config_class.__qualname__})")
    _SECTIONS.setdefault(name, Section(name, config_class, help))
    return _SECTIONS[name]


def method_sections() -> dict[str, Section]:
    """The registered method sections by name, in the order registered, after importing the built-in methods
    and the modules ``$METATUNER_PLUGINS`` names (:func:`metatuner.plugins.load`)."""
    plugins.load()
    return dict(_SECTIONS)


def _section(name: str) -> Section | None:
    """The registered section ``name``, importing the method modules first if it is not registered yet."""
    if name not in _SECTIONS and not name.startswith("_"):
        plugins.load()
    return _SECTIONS.get(name)


@dataclass(eq=False)
class RunConfig:
    """The root config: the core sections are its fields; each method's own section (``dpo``, ``ppo``, ... and
    those of plug-in methods) comes from the registry (:func:`register_section`), is read and set as an
    attribute (``cfg.dpo.steps``; one not set holds its defaults) and is written where the ``sections`` field
    stands."""

    method: str = option("zero-shot", "method to fit and evaluate (see `metatuner methods`)")
    model: ModelConfig = option(None, "the downstream model", factory=ModelConfig)
    data: DataConfig = option(None, "task data", factory=DataConfig)
    eval: EvalConfig = option(None, "evaluation", factory=EvalConfig)
    generator: GeneratorConfig = option(None, "MetaTuner's prompt generator G", factory=GeneratorConfig)
    hypernet: HypernetConfig = option(None, "MetaTuner's parameter generator F", factory=HypernetConfig)
    train: TrainConfig = option(None, "MetaTuner training", factory=TrainConfig)
    sections: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={
        "help": "the methods' own sections by name, each a key of the config (see `metatuner methods`)",
        "sections": True,
    })
    serve: ServeConfig = option(None, "the OpenAI-compatible server (metatuner serve)", factory=ServeConfig)
    out_dir: str = option("runs", "parent folder of run folders")
    seed: int = option(0, "global seed (torch, python, numpy)")

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise ConfigKeyError("seed", f"seed must be in 0..{2**32 - 1} (numpy's seeds), got {self.seed}")
        given, self.sections = self.sections, {}  # a copy: a config made by dataclasses.replace does not share it
        for name, value in given.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only for names not found the usual way: a method's section
        sections = self.__dict__.get("sections")
        if sections is not None and (section := _section(name)) is not None:
            return sections.setdefault(name, section.config_class())  # a section not set holds its defaults
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in {f.name for f in dataclasses.fields(self)}:
            object.__setattr__(self, name, value)
        elif (section := _section(name)) is None:
            raise ConfigKeyError(name, f"unknown config section {name!r}; registered: {', '.join(_SECTIONS)}")
        elif not isinstance(value, section.config_class):
            raise ConfigKeyError(name, f"{name} must be a {section.config_class.__name__}, got {value!r}")
        else:
            self.sections[name] = value

    def __eq__(self, other: Any) -> bool:  # sections not set equal their defaults
        return type(other) is type(self) and to_dict(self) == to_dict(other)


# ---- building configs from dicts ---------------------------------------------------------------
def config_fields(cls: type, sections: bool = True) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, type)`` of every key of dataclass ``cls``, in order. :class:`RunConfig`'s ``sections`` field
    stands for one key per registered method section (:func:`method_sections`), in the order registered, or
    for none when ``sections`` is false (then no method module is imported)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("sections"):
            out.append((f, hints[f.name]))
            continue
        for s in method_sections().values() if sections else ():
            g = dataclasses.field(default_factory=s.config_class, metadata={"help": s.help, "choices": None})
            g.name, g.type = s.name, s.config_class
            out.append((g, s.config_class))
    return out


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a (possibly partial) nested dict, checking names, types and choices."""
    if not isinstance(data, dict):
        raise ConfigKeyError(prefix.rstrip("."), f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    own = {f.name for f in dataclasses.fields(cls)}
    fields = {f.name: (f, hint) for f, hint in config_fields(cls, sections=any(k not in own for k in data))}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        tip = (f"; a plug-in method's section is known once ${plugins.ENV} names its module"
                if not prefix and "sections" in own else "")
        raise ConfigKeyError(
            prefix + unknown[0],
            f"unknown config key '{prefix}{unknown[0]}'; allowed: {', '.join(prefix + n for n in fields)}{tip}",
        )
    kwargs, sections = {}, {}
    for name, value in data.items():
        (f, hint), key = fields[name], prefix + name
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, {} if value is None else value, key + ".")  # empty: the defaults
        else:
            value = _coerce(key, value, hint, f.metadata.get("choices"))
        (kwargs if name in own else sections)[name] = value
    return cls(**kwargs, **({"sections": sections} if sections else {}))


def _coerce(key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None or (optional and value in ("none", "null", "None")):
        if optional:
            return None
        raise ConfigKeyError(key, f"{key} may not be empty")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    }.get(base)
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ConfigKeyError(key, f"{key} must be a list, got {value!r}")
        elem = typing.get_args(base)[0]
        return [_coerce(f"{key}[{i}]", v, elem, None) for i, v in enumerate(value)]
    if base in (int, float) and isinstance(value, str):
        # YAML reads "1e-3" (no dot) as a string; numbers written that way are still numbers
        try:
            value = base(value)
        except ValueError:
            pass
    if ok is None or not ok(value):
        raise ConfigKeyError(key, f"{key} must be {getattr(base, '__name__', base)}, got {value!r}")
    value = base(value)
    if base is float and math.isnan(value):
        raise ConfigKeyError(key, f"{key} must be a number, got nan")
    if choices and value not in choices:
        raise ConfigKeyError(key, f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise MetatunerError(f"override {item!r} is not of the form key=value (e.g. eval.limit=20)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise MetatunerError(f"override {item!r} has an empty key (keys look like eval.limit)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise MetatunerError(f"override {item!r}: invalid value ({str(e).splitlines()[0]})") from None
        node = out
        *parents, leaf = parts
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MetatunerError(f"override {item!r} conflicts with an earlier {'.'.join(parts[: i + 1])}=...")
        if isinstance(node.get(leaf), dict):
            raise MetatunerError(f"override {item!r} conflicts with an earlier {key.strip()}.<key>=...")
        node[leaf] = value
    return out


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML file holds ({} for an empty file); unreadable or malformed files are one clear error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MetatunerError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise MetatunerError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MetatunerError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MetatunerError(f"{path}: a {what} holds a mapping of keys (e.g. eval: {{limit: 20}}), not a {type(data).__name__}")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = RunConfig,
                values: dict[str, Any] | None = None) -> Any:
    """Defaults, then the YAML file (if any), then ``values`` (a nested dict of typed values, as the Python API
    gives them), then the ``key=value`` overrides.

    ``path`` is a file, or the name of a shipped config (``quick``, ``gsm8k``, ... in metatuner/configs).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and (SHIPPED / f"{path}.yaml").is_file():
            p = SHIPPED / f"{path}.yaml"
        if not p.is_file():
            names = ", ".join(sorted(f.stem for f in SHIPPED.glob("*.yaml")))
            raise MetatunerError(f"config file not found: {p} (shipped configs: {names})")
        data = read_yaml_mapping(p)
    data = merge(merge(data, values or {}), parse_overrides(list(overrides)))
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (copies), keys in the order ``metatuner config`` lists them."""
    out = {}
    for f, _ in config_fields(type(cfg)):
        value = getattr(cfg, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def config_text(cfg: Any) -> str:
    """The resolved config as the YAML a run folder keeps (``config.yaml``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    files.write_text(path, config_text(cfg))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for ``metatuner config``."""
    rows = []
    for f, hint in config_fields(cls):
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_ += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        rows.append((prefix + f.name, repr(default), help_))
    return rows
