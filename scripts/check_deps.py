"""Check that pyproject.toml's [project] dependencies are exactly the third-party modules bridge/ imports.

Run from the repository root with the package's venv (it maps modules to distributions through what is
installed): .venv/bin/python scripts/check_deps.py. Exit status 1 names each undeclared or unused dependency.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: Path) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only; ``bridge`` itself left out)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != package.name and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    declared = {normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    needed: dict[str, str] = {}
    problems = []
    for module, files in sorted(imported_modules(ROOT / "bridge").items()):
        names = distributions.get(module)
        if not names:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}) is not installed, so its distribution is unknown")
            continue
        for name in names:
            needed[normalise(name)] = module
    problems += [f"{dist} is imported ({needed[dist]}) but not declared in [project] dependencies" for dist in sorted(needed.keys() - declared)]
    problems += [f"{dist} is declared in [project] dependencies but bridge/ imports nothing from it" for dist in sorted(declared - needed.keys())]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
