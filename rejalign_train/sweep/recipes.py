"""``rejalign-sweep --recipe NAME --set KEY=VALUE ...``: sweep configurations in the package.

A recipe is a sweep configuration file (YAML, as given first on the command line) in
``rejalign_train/recipes/``, with ``${KEY}`` where the user's data paths go and a ``variables:``
mapping saying what each key is. ``--set KEY=VALUE`` fills them in (in a configuration file of
one's own too); a key left unset, or one the recipe does not use, is an error that lists them.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

RECIPES_PACKAGE = "rejalign_train.recipes"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ValueError):
    """A recipe cannot be found, read or filled in."""


def recipe_names() -> list[str]:
    """The recipes the package ships."""
    folder = resources.files(RECIPES_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    """A shipped recipe's YAML text, by name (``paper_comparison``)."""
    resource = resources.files(RECIPES_PACKAGE) / f"{name}.yaml"
    if not resource.is_file():
        raise RecipeError(
            f"--recipe {name}: no such recipe (shipped: {', '.join(recipe_names()) or 'none'}; "
            "a configuration file of your own goes first on the command line)"
        )
    return resource.read_text(encoding="utf-8")


def parse_sets(values: list[str]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}``."""
    found: dict[str, str] = {}
    for value in values:
        key, eq, text = value.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise RecipeError(f"--set {value}: expected KEY=VALUE")
        found[key] = text
    return found


def _fill(value: Any, sets: dict[str, str], used: set[str], missing: set[str]) -> Any:
    if isinstance(value, str):

        def one(m: re.Match) -> str:
            if m.group(1) not in sets:
                missing.add(m.group(1))
                return m.group(0)
            used.add(m.group(1))
            return sets[m.group(1)]

        return VARIABLE.sub(one, value)
    if isinstance(value, list):
        return [_fill(v, sets, used, missing) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, sets, used, missing) for k, v in value.items()}
    return value


def substitute(config: dict[str, Any], values: list[str], origin: str) -> dict[str, Any]:
    """``${KEY}`` in the configuration's strings, from ``--set``; the ``variables:`` entry
    (what each key means) is taken out and names the keys in the errors."""
    described = config.pop("variables", None) or {}
    if not isinstance(described, dict):
        raise RecipeError(f"{origin}: variables: expected a mapping of KEY: description")
    sets = parse_sets(values)
    used: set[str] = set()
    missing: set[str] = set()
    filled = _fill(config, sets, used, missing)
    if missing:
        lines = [f"  --set {k}=...  {described.get(k, '')}".rstrip() for k in sorted(missing)]
        raise RecipeError(f"{origin} needs values for:\n" + "\n".join(lines))
    unused = sorted(set(sets) - used)
    if unused:
        raise RecipeError(
            f"--set {', '.join(unused)}: not used by {origin} (its keys: "
            f"{', '.join(sorted(described)) or 'none'})"
        )
    return filled


def load_recipe(name: str, values: list[str]) -> dict[str, Any]:
    """A shipped recipe as a configuration mapping, filled in."""
    import yaml

    try:
        config = yaml.safe_load(recipe_text(name))
    except yaml.YAMLError as exc:  # a shipped recipe is tested; this names it all the same
        raise RecipeError(f"recipe {name}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise RecipeError(f"recipe {name}: expected a mapping of option names to values")
    config = {str(k).replace("-", "_"): v for k, v in config.items()}
    return substitute(config, values, f"recipe {name}")


def recipe_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--recipe NAME`` and the ``--set`` values in an argument list, read before parsing
    (the recipe sets the parser's defaults)."""
    recipe, sets, current = None, [], None
    for token in argv:
        flag, eq, value = token.partition("=")
        if flag == "--recipe":
            recipe, current = (value, None) if eq else (None, "recipe")
        elif flag == "--set":
            current = "set"
            if eq:
                sets.append(value)
        elif token.startswith("--"):
            current = None
        elif current == "recipe":
            recipe, current = token, None
        elif current == "set":
            sets.append(token)
    return recipe, sets
