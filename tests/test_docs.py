"""The docs stay true: docs/config.md is what ``raydistill.config_doc.render()`` writes, README.md
stays short, and every relative link in README.md and docs/*.md points to a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

from raydistill import config_doc

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# [text](target) and ![alt](target); targets with a scheme (https:, mailto:) or only an anchor are skipped.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_config_md_is_generated_from_the_config():
    expected = config_doc.render()
    actual = (DOCS / "config.md").read_text(encoding="utf-8")
    assert actual == expected, f"docs/config.md is stale: regenerate it with `{config_doc.COMMAND}`"


def test_config_md_lists_every_field():
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    from raydistill.config import Config

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            sub = config_doc.sub_model(field.annotation)
            if sub is not None:
                yield from keys(sub, f"{prefix}{name}.")

    missing = [k for k in keys(Config) if f"| `{k}` |" not in text]
    assert not missing, f"docs/config.md lacks {missing}: regenerate it with `{config_doc.COMMAND}`"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines (at most 250): move the detail to docs/"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _relative_links(path: Path) -> list[tuple[str, Path]]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue
        file = target.split("#", 1)[0]
        out.append((target, (path.parent / file).resolve() if file else path.resolve()))
    return out


def test_relative_links_point_to_existing_files():
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 5, pages
    broken = [f"{page.relative_to(REPO)}: {target}" for page in pages for target, resolved in _relative_links(page)
              if not resolved.exists()]
    assert not broken, "relative links to missing files:\n  " + "\n  ".join(broken)
    bad_anchors = [f"{page.relative_to(REPO)}: {target}" for page in pages for target, resolved in _relative_links(page)
                   if "#" in target and resolved.suffix == ".md" and resolved.exists()
                   and target.split("#", 1)[1] not in _anchors(resolved)]
    assert not bad_anchors, "links to headings that do not exist:\n  " + "\n  ".join(bad_anchors)
    readme_targets = {resolved for _, resolved in _relative_links(REPO / "README.md")}
    assert DOCS / "config.md" in readme_targets  # the README points to the generated reference
