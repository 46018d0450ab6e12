"""The README is the front door: short, its recipe table is the code's, and its links resolve."""
import re
from pathlib import Path

from cilearn.methods.table import recipes_table, summaries_table

ROOT = Path(__file__).parent.parent


def test_readme_recipe_table_is_the_code():
    assert recipes_table(markdown=True) in (ROOT / "README.md").read_text(), \
        "README.md's recipe table is stale: paste `cilearn list --recipes --markdown`"


def test_readme_summary_table_is_the_code():
    assert summaries_table(markdown=True) in (ROOT / "README.md").read_text(), \
        "README.md's summary table is stale: paste `cilearn list --summaries --markdown`"


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


def test_every_relative_link_of_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
