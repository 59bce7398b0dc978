"""The documentation: the site in docs/ builds with `mkdocs build --strict` (a broken link, a missing anchor or a
page left out of the nav fails it), and the README stays a front page whose links into docs/ resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 20_000  # characters
QUICK_START = "## Quick start\n\n```bash\nmake demo\nmake test\n```\n"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner about MkDocs 2.0
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return site_dir


def test_the_site_builds_in_strict_mode(site: Path):
    assert (site / "index.html").exists() and (site / "reference" / "index.html").exists()


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < README_LIMIT, f"README.md has {len(readme)} characters; move detail to docs/"
    assert QUICK_START in readme, "the Quick start opens with one bash block: make demo, make test"


def _page(site: Path, doc: Path) -> Path:
    """The built HTML of docs/<doc> (mkdocs' directory URLs: a.md -> a/index.html, index.md -> index.html)."""
    relative = doc.relative_to(ROOT / "docs").with_suffix("")
    return site / ("index.html" if relative.name == "index" else relative / "index.html")


def test_the_readme_links_resolve(site: Path):
    """mkdocs checks the links inside docs/; this checks the README's: every relative link names a file that
    exists, and every anchor into docs/ a heading of the built page."""
    readme = FENCE.sub("", (ROOT / "README.md").read_text())
    broken = []
    links = [link for link in LINK.findall(readme) if not re.match(r"[a-z][a-z0-9+.-]*:", link)]
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        target, _, anchor = link.partition("#")
        if not target:
            continue  # an anchor of the README itself: GitHub's slugs, not checked here
        path = (ROOT / unquote(target)).resolve()
        if not path.exists():
            broken.append(f"{link}: no file {target}")
            continue
        if anchor and path.suffix == ".md" and path.is_relative_to(ROOT / "docs"):
            html = _page(site, path).read_text()
            if f'id="{anchor}"' not in html:
                broken.append(f"{link}: no heading with anchor #{anchor} in {target}")
    assert not broken, "\n".join(broken)
