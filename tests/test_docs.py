"""The documentation stays true: docs/recipes.md is what the recipe schema gives (scripts/recipe_reference.py), every
relative link in README.md, CONTRIBUTING.md, CHANGELOG.md and docs/ resolves to a file of the repository (and, for a
link into a markdown page, to one of its headings), the README stays short, and the recipes the README and the
getting-started guide show are valid recipes."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field, create_model

from module_from_file import module_from_file

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250


def reference_script():
    return module_from_file("recipe_reference", ROOT / "scripts" / "recipe_reference.py")


def test_the_recipe_reference_is_the_schemas():
    ref = reference_script()
    page = ref.PAGE.read_text(encoding="utf-8") if ref.PAGE.is_file() else ""
    expected = ref.render()
    if page != expected:
        diff = list(difflib.unified_diff(page.splitlines(), expected.splitlines(), "docs/recipes.md", "the schema",
                                         lineterm="", n=0))
        pytest.fail(f"docs/recipes.md is stale (the recipe schema or scripts/recipe_reference.py changed): run "
                    f"`{ref.COMMAND}` and commit docs/recipes.md. First differences:\n" + "\n".join(diff[:20]))


def test_every_recipe_key_has_a_meaning():
    ref = reference_script()
    missing = [row[0] for _, rows in ref.sections() for row in rows if row[4] == ref.NO_MEANING]
    assert not missing, (f"recipe keys without a meaning: {missing}; give each a Field(description=...) in "
                         f"onpolicy_kd/recipe/schema.py, then "
                         f"run `{ref.COMMAND}`")


def test_a_key_added_to_the_schema_shows_in_the_reference():
    """The staleness check can fail: a schema with one more key renders another page, with that key in it."""
    from onpolicy_kd.recipe.schema import Recipe, TrainConfig

    ref = reference_script()
    train = create_model("TrainPlusOne", __base__=TrainConfig,
                         new_knob=(int, Field(3, ge=0, le=7, description="a key just added to the schema")))
    recipe = create_model("RecipePlusOne", __base__=Recipe, train=(train, Field(default_factory=train)))
    page = ref.render(recipe)
    assert "| `train.new_knob` | int | `3` | [0, 7] | a key just added to the schema |" in page
    assert page != ref.render()


FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, code spans removed (links inside code are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, hyphens and spaces stay),
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match[2])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    wrong = []
    for number, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: link to {target!r}"
            if not resolved.is_relative_to(ROOT):
                wrong.append(f"{where} points outside the repository")
            elif not resolved.exists():
                wrong.append(f"{where}: no such file {resolved.relative_to(ROOT)}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                wrong.append(f"{where}: {resolved.relative_to(ROOT)} has no heading with the anchor #{anchor}")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert not broken_links(page), "\n".join(broken_links(page))


def test_a_broken_link_would_be_found(tmp_path, monkeypatch):
    """The link check itself can fail: a missing file, a missing heading, a path out of the repository."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# A heading (`with.code`)\n\n```yaml\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-withcode) [gone](missing.md) [bad](other.md#not-a-heading) "
                    "`[code](not/a/link.md)` [web](https://example.org/x.md)\n")
    found = broken_links(page)
    assert len(found) == 2 and "missing.md" in found[0] and "#not-a-heading" in found[1], found


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference "
                                       f"material into a guide in docs/")


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_the_recipes_the_docs_show_are_valid(page):
    """Every full recipe (a YAML block with teacher, student and data) the page shows passes the schema's checks."""
    from onpolicy_kd.recipe.schema import Recipe

    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)
    recipes = [doc for doc in map(yaml.safe_load, blocks)
               if isinstance(doc, dict) and {"teacher", "student", "data"} <= set(doc)]
    assert recipes, f"{page} shows no full recipe"
    for recipe in recipes:
        Recipe.model_validate(recipe)
