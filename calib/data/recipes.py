"""Load a recipe from the top-level ``datasets/`` folder by path (it is not a package).

``load_recipe("doc_pages").build_doc_pages(out_dir, n_calib, n_eval, seed)`` builds the
demo's data. Recipes live beside the ``calib`` package in a source checkout; the wheel ships
the same folder as ``calib/_recipes`` (see setup.py), which is looked at first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from calib.errors import ConfigError

__all__ = ["load_recipe", "recipes_dir"]


def recipes_dir() -> Path:
    """``calib/_recipes`` in an installed wheel, else the source checkout's ``datasets/``."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "_recipes"
    return shipped if shipped.is_dir() else package.parent / "datasets"


def load_recipe(name: str, folder: str | Path | None = None) -> ModuleType:
    """Import ``datasets/<name>.py`` as a module named ``calib_recipe_<name>`` (cached)."""
    folder = Path(folder) if folder is not None else recipes_dir()
    path = folder / f"{name}.py"
    if not name.isidentifier() or not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        raise ConfigError(f"no dataset recipe '{name}' in {folder} (recipes: {have or 'none'})",
                          hint="recipes ship in the wheel (calib/_recipes) and in the source checkout's datasets/")
    mod_name = f"calib_recipe_{name}"
    if mod_name in sys.modules and getattr(sys.modules[mod_name], "__file__", None) == str(path):
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # needed by pickling in worker processes and dataclasses
    spec.loader.exec_module(mod)
    return mod
