"""Where methods and tasks come from: the built-in ones, and user modules named in ``METATUNER_PLUGINS``.

A method registers itself, with its config section, when its module is imported
(:meth:`metatuner.methods.base.MethodRegistry.register`), and a task likewise (``@TASKS.register``). The
built-in ones live in :mod:`metatuner.methods` and :mod:`metatuner.tasks`; one of your own lives in a module
of your own, named in the environment variable ``METATUNER_PLUGINS`` (several joined by commas), each entry a
module name importable from ``sys.path`` or the path of a ``.py`` file::

    METATUNER_PLUGINS=my_methods.py metatuner eval --method toy toy.scale=2
    METATUNER_PLUGINS=mypackage.methods metatuner bench --config protocol.yaml

The variable is read whenever a method, a task or a config section is looked up that is not registered yet
(and when they are listed), so the commands, their ``key=value`` overrides, ``metatuner config``, ``--resume``
and a benchmark's worker processes (which inherit the environment) all see the same methods and tasks. A
Python program can import its module itself instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from metatuner.errors import MetatunerError

ENV = "METATUNER_PLUGINS"
#: the modules whose import registers the built-in methods
BUILTIN = ("metatuner.methods",)

_loaded: set[str] = set()  # entries of ENV imported already


def named() -> list[str]:
    """The entries of ``$METATUNER_PLUGINS``, in order (empty ones skipped)."""
    return [e.strip() for e in os.environ.get(ENV, "").split(",") if e.strip()]


def load(builtin: bool = True) -> None:
    """Imports the built-in method modules (unless ``builtin`` is false: the tasks' registry, below the methods,
    asks only for the plug-ins) and every module ``$METATUNER_PLUGINS`` names that is not imported yet.

    Raises:
        MetatunerError: an entry that is neither an importable module nor a readable ``.py`` file, or whose
            import fails (the message names the entry and the error).
    """
    for name in BUILTIN if builtin else ():
        importlib.import_module(name)
    for entry in named():
        if entry not in _loaded:
            _import(entry)
            _loaded.add(entry)


def _import(entry: str) -> None:
    """Imports one entry: a ``.py`` file under its stem as the module name, else a module by name."""
    try:
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            if not path.is_file():
                raise MetatunerError(f"{ENV}: plugin file {entry!r} not found")
            if getattr(sys.modules.get(path.stem), "__file__", None) == str(path):
                return  # imported already (e.g. by the program itself)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module  # so its classes pickle and its own imports of it resolve
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[path.stem]
                raise
        else:
            importlib.import_module(entry)
    except MetatunerError:
        raise
    except ModuleNotFoundError as e:
        if e.name and entry.startswith(e.name):
            raise MetatunerError(f"{ENV}: no module named {entry!r} (a module on sys.path or a path to a .py "
                                 "file)") from None
        raise MetatunerError(f"{ENV}: importing plugin {entry!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a broken plugin is the user's to fix: say which one and why
        raise MetatunerError(f"{ENV}: importing plugin {entry!r} failed: {type(e).__name__}: {e}") from e
