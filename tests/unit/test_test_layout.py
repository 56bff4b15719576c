"""The test tree itself: pytest's default import mode ("prepend", no ``__init__.py``) imports every
test module by its file name, so two test files with one name in tests/unit and tests/integration
stop the whole run at collection (CI failed twice on this)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_every_test_module_name_is_unique_across_the_tree() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name != "conftest.py" and path.name != "__init__.py":
            by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"
