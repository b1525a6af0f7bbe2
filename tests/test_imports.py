"""The package's dependencies point one way: no import cycle between ``metatuner`` modules.

The graph is read from the source with ``ast`` (nothing is imported), and counts every import of a
``metatuner`` module, also those inside functions: a lazy import hides a cycle from Python but not
from the design (config -> tasks -> models -> evaluation -> training -> methods -> recipes/bench -> cli).

An import of ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are left
out, since a package's ``__init__`` re-exporting its own submodules would otherwise always be a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "metatuner"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(node: ast.AST, name: str, is_package: bool, known: set[str]) -> list[str]:
    """The ``metatuner`` modules one import statement of module ``name`` names."""
    def resolve(target: str) -> str | None:  # the longest known module that ``target`` is, or lies in
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    if isinstance(node, ast.Import):
        return [m for a in node.names if (m := resolve(a.name))]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's own package, one level up per extra dot
        package = name if is_package else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        m = sub if sub in known else resolve(base)
        if m:
            found.append(m)
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for modules given by name and source text (packages end in ``.__init__``)."""
    names = {n.removesuffix(".__init__"): n.endswith(".__init__") for n in sources}
    known = set(names)
    graph: dict[str, set[str]] = {}
    for raw, text in sources.items():
        name = raw.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(text, filename=raw)):
            deps.update(imported(node, name, names[name], known))
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found one after another, dropping each one's closing edge, so one report lists every knot."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles = []
    while cycle := find_cycle(graph):
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def package_sources() -> dict[str, str]:
    return {(module_name(p) + ".__init__" if p.name == "__init__.py" else module_name(p)): p.read_text(encoding="utf-8")
            for p in modules().values()}


def test_metatuner_modules_import_each_other_without_a_cycle():
    graph = import_graph(package_sources())
    assert "metatuner.config" in graph and graph["metatuner.methods.dpo"]  # the graph was read
    cycles = all_cycles(graph)
    assert not cycles, "import cycle(s) between metatuner modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_lazy_relative_and_from_package_imports():
    sources = {
        "metatuner.__init__": "",
        "metatuner.a.__init__": "from metatuner.a import b\n",
        "metatuner.a.b": "def f():\n    from metatuner.a.c import g\n",
        "metatuner.a.c": "from . import d\nimport metatuner.e.x\n",
        "metatuner.a.d": "from ..e import thing\n",
        "metatuner.e": "",
    }
    graph = import_graph(sources)
    assert graph == {"metatuner": set(), "metatuner.a": {"metatuner.a.b"}, "metatuner.a.b": {"metatuner.a.c"},
                     "metatuner.a.c": {"metatuner.a.d", "metatuner.e"}, "metatuner.a.d": {"metatuner.e"},
                     "metatuner.e": set()}
    assert find_cycle(graph) is None
    # a lazy import back into the package (the shape of the old tasks.base <-> tasks.cross cycle) is one
    sources["metatuner.e"] = "def h():\n    from metatuner.a.b import f\n"
    cycle = ["metatuner.a.b", "metatuner.a.c", "metatuner.a.d", "metatuner.e", "metatuner.a.b"]
    assert find_cycle(import_graph(sources)) == cycle and all_cycles(import_graph(sources)) == [cycle]


def test_only_the_api_and_the_cli_import_the_serving_package():
    """Serving sits above evaluation, training and the recipes, and below the public API and the CLI: nothing
    else imports it."""
    graph = import_graph(package_sources())
    users = sorted(m for m, deps in graph.items() if not m.startswith("metatuner.serving")
                   and any(d.startswith("metatuner.serving") for d in deps))
    assert users == ["metatuner.api.runs", "metatuner.cli"]
    assert any(d.startswith("metatuner.recipes") or d.startswith("metatuner.evaluation")
               for d in graph["metatuner.serving.predict"] | graph["metatuner.serving.engine"])


def test_the_public_api_sits_on_the_recipes_below_the_cli():
    """``metatuner.api`` is the top of the library: it builds on the recipes, and only the CLI and the package's
    lazy re-export (``metatuner.__getattr__``) import it."""
    graph = import_graph(package_sources())
    users = sorted(m for m, deps in graph.items() if not m.startswith("metatuner.api")
                   and any(d.startswith("metatuner.api") for d in deps))
    assert users == ["metatuner", "metatuner.cli"]
    assert "metatuner.recipes" in graph["metatuner.api.fitting"]
    assert not any(d.startswith("metatuner.api") for d in graph["metatuner.recipes"])


def test_import_metatuner_loads_no_torch_and_the_api_on_first_use():
    """``import metatuner`` stays fast: neither torch nor transformers nor the API module loads with it; the
    API's names load on first use, from ``metatuner.api``."""
    import subprocess
    import sys

    code = ("import sys, metatuner; heavy = ('torch', 'transformers', 'metatuner.api');"
            "print([m for m in heavy if m in sys.modules]); print(metatuner.train.__module__);"
            "print('metatuner.api' in sys.modules, metatuner.Run is sys.modules['metatuner.api'].Run)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["[]", "metatuner.api.fitting", "True True"]
    import metatuner

    assert set(metatuner._API) <= set(dir(metatuner)) and set(metatuner._API) <= set(metatuner.__all__)
    try:
        metatuner.no_such_name
    except AttributeError as e:
        assert "no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError("an unknown name is an AttributeError")


BENCH_LAYERS = ["protocol", "cells", "tuning", "collect", "workers", "ray_backend", "grid"]  # each imports those before it
BENCH_REPORT = ["stats", "logs", "curves", "plots", "report"]  # rebuilt from the folder's files alone


def test_the_bench_package_is_layered_by_job():
    """``bench/``: protocol, cells and claims, tuning, collection, the per-cell job and its workers, the grid's
    entry point, each importing only the layers below it; the report reads a finished folder and never imports
    what runs cells."""
    graph = import_graph(package_sources())
    bench = {m.removeprefix("metatuner.bench."): {d.removeprefix("metatuner.bench.") for d in deps
                                                   if d.startswith("metatuner.bench.")}
             for m, deps in graph.items() if m.startswith("metatuner.bench.")}
    assert set(bench) == set(BENCH_LAYERS) | set(BENCH_REPORT)  # a new module takes its place in a list above
    for i, name in enumerate(BENCH_LAYERS):
        assert bench[name] <= set(BENCH_LAYERS[:i]), f"bench.{name} imports {sorted(bench[name] - set(BENCH_LAYERS[:i]))}"
    for name in BENCH_REPORT:
        assert bench[name] <= {"cells", "tuning"} | set(BENCH_REPORT), f"bench.{name} imports {sorted(bench[name])}"
    users = sorted(m for m, deps in graph.items() if not m.startswith("metatuner.bench")
                   and deps & {"metatuner.bench.workers", "metatuner.bench.ray_backend"})
    assert users == []  # outside bench/, a grid runs through grid.run_grid only
    assert third_party_users("ray") == ["metatuner.bench.ray_backend"]  # an optional extra: imported in one place


def third_party_users(package: str) -> list[str]:
    """The ``metatuner`` modules that import ``package`` (absolute imports, also inside functions)."""
    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        return [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []

    return sorted(name.removesuffix(".__init__") for name, text in package_sources().items()
                  if any(n.split(".")[0] == package for node in ast.walk(ast.parse(text)) for n in names(node)))


def test_the_planner_stays_in_the_models_layer():
    """``metatuner plan``'s library module builds models and reads configs; it never reaches up."""
    deps = import_graph(package_sources())["metatuner.models.plan"]
    assert "metatuner.models.metatuner" in deps
    above = ("metatuner.training", "metatuner.methods", "metatuner.recipes", "metatuner.bench", "metatuner.serving",
             "metatuner.cli")
    assert not [d for d in deps if d.startswith(above)]


def test_the_config_finds_method_sections_through_the_registry_not_by_import():
    """Each method's section lives in the method's module: the config and the plugin loader import no method
    module (the sections arrive when ``metatuner.plugins`` imports the modules by name), and nothing is left of
    the old list of every method's config in one module."""
    graph = import_graph(package_sources())
    assert not [d for d in graph["metatuner.config"] if d.startswith("metatuner.methods")]
    assert graph["metatuner.plugins"] == {"metatuner.errors"}
    assert "metatuner.plugins" in graph["metatuner.config"] and "metatuner.config" in graph["metatuner.methods.base"]
    assert "metatuner.method_configs" not in graph


def test_precision_and_recompute_sit_low_in_the_models_layer():
    """Autocast and gradient checkpointing wrap a base model and its LoRA layers: they import only the errors and
    ``models.lora``, and the MetaTuner (not the trainer) applies them, so every caller of a model gets them."""
    graph = import_graph(package_sources())
    assert graph["metatuner.models.precision"] == {"metatuner.errors"}
    assert graph["metatuner.models.recompute"] == {"metatuner.errors", "metatuner.models.lora"}
    assert {"metatuner.models.precision", "metatuner.models.recompute"} <= graph["metatuner.models.metatuner"]


def test_the_supervised_loop_knows_no_model_and_sft_needs_no_metatuner():
    """One supervised LoRA loop (``training.supervised``) steps named parameter groups on a loss function: it
    imports no model, no trainer and no method. The static LoRA on M (``models.static``) and SFT's fine-tuning
    (``training.sft``) do without MetaTuner; MetaTuner's trainer composes the loop."""
    graph = import_graph(package_sources())
    loop = graph["metatuner.training.supervised"]
    assert not [d for d in loop if d.startswith(("metatuner.models", "metatuner.methods", "metatuner.recipes"))]
    assert "metatuner.training.trainer" not in loop
    assert "metatuner.models.metatuner" not in graph["metatuner.models.static"]
    assert not [d for d in graph["metatuner.models.static"] if d.startswith("metatuner.training")]
    assert graph["metatuner.training.sft"] & {"metatuner.models.metatuner", "metatuner.training.trainer"} == set()
    assert {"metatuner.training.supervised", "metatuner.models.static"} <= graph["metatuner.training.sft"]
    assert "metatuner.training.supervised" in graph["metatuner.training.trainer"]


def test_no_method_builds_a_metatuner_with_parts_off_or_swaps_its_methods():
    """Issue 23: a baseline builds what it trains (a static LoRA on M, BPO's rewriter), never a MetaTuner with
    its prompt or hypernetwork branch switched off, a subclass of MetaTuner, or a MetaTuner whose methods are
    replaced on the object at runtime. (The ablations w/o F and w/o P are MetaTuner runs: ``training.build``
    sets the switches from ``train.ablation``, never to a literal False.)"""
    mt_source = (ROOT / "models" / "metatuner.py").read_text(encoding="utf-8")
    [mt_class] = [n for n in ast.parse(mt_source).body if isinstance(n, ast.ClassDef) and n.name == "MetaTuner"]
    mt_methods = {n.name for n in mt_class.body if isinstance(n, ast.FunctionDef)} - {"__init__"}
    found = []
    for name, text in package_sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg in ("use_prompt", "use_hypernet") and isinstance(kw.value, ast.Constant) \
                            and kw.value.value is False:
                        found.append(f"{name}: {kw.arg}=False")
            if isinstance(node, ast.ClassDef) and any(
                    (b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)) == "MetaTuner" for b in node.bases):
                found.append(f"{name}: class {node.name}(MetaTuner)")
            if name.startswith("metatuner.methods") and isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [f"{name}: .{t.attr} assigned" for t in targets
                          if isinstance(t, ast.Attribute) and t.attr in mt_methods and not (
                              isinstance(t.value, ast.Name) and t.value.id == "self")]
    assert not found, found
