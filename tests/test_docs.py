"""The README stays a user's guide, and docs/architecture.md names every module a newcomer will meet."""

from __future__ import annotations

import re

from tests.conftest import ROOT

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _modules() -> list[str]:
    found = [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]
    return sorted(p.relative_to(ROOT).as_posix() for p in found if p.name not in ("__init__.py", "__main__.py"))


def test_the_architecture_page_names_every_module():
    page = ARCHITECTURE.read_text(encoding="utf-8")
    missing = [m for m in _modules() if f"`{m}`" not in page]
    assert not missing, f"docs/architecture.md does not name {missing}: add a line saying what each does"


def test_every_stage_package_has_its_entry_and_its_stage_module():
    from tasks.common.paths import STAGES

    for stage in STAGES:
        assert (ROOT / "tasks" / stage / "__main__.py").is_file() and (ROOT / "tasks" / stage / "stage.py").is_file()


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}
