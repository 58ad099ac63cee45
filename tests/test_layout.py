"""The test tree's own invariants.

pytest imports test modules and their helper modules by basename (rootdir
"prepend" import mode), so two files with the same name in different
folders either fail collection or, worse for helpers, silently share the
first one imported. Every module name under tests/ must be unique.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent


def test_python_module_basenames_are_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name in {"conftest.py", "__init__.py"} or "__pycache__" in path.parts:
            continue
        seen[path.name].append(str(path.relative_to(TESTS)))
    duplicates = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not duplicates, f"module basenames used more than once under tests/: {duplicates}"
