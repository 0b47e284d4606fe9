"""docs/config.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from orchestrator._internal import config_reference as ref

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_current():
    expected = ref.render()
    actual = (ROOT / "docs" / "config.md").read_text()
    assert actual == expected, (
        "docs/config.md is stale: a config dataclass or a method's Params changed. "
        f"Regenerate it from the repository root with:  {ref.REGENERATE}")


def test_every_key_has_a_description():
    assert ref.undocumented() == [], "give these fields a comment (it becomes their description in docs/config.md)"


def test_every_link_has_its_target():
    text = ref.render()
    targets = set(re.findall(r'<a id="([^"]+)"></a>', text))
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= targets, sorted(links - targets)


# -- the generator on small dataclasses of its own ---------------------------------------------------------------

@dataclass
class Inner:
    """An inner section.

    Only the first paragraph is the section's description."""

    size: int = 3  # how big
    # a comment block
    # over two lines
    mode: Literal["a", "b"] = "a"


@dataclass
class Base:
    inherited: float = 0.5  # documented in the base class


@dataclass
class Outer(Base):
    """The outer section."""

    name: str = "x"  # the name | with a pipe, None and <angle brackets>
    inner: Inner = field(default_factory=lambda: Inner(size=7))  # a nested section
    maybe: Optional[Inner] = None  # an optional one
    items: list[Inner] = field(default_factory=list)  # entries
    table: dict[int, Inner] = field(default_factory=dict)
    required: list[int] = field(default_factory=lambda: [1, 2])
    plain: int = 0


def test_field_comments_trailing_above_and_inherited():
    assert ref.field_doc(Inner, "size") == "how big"
    assert ref.field_doc(Inner, "mode") == "a comment block over two lines"
    assert ref.field_doc(Outer, "inherited") == "documented in the base class"
    assert ref.field_doc(Outer, "plain") == ""
    assert ref.class_doc(Inner) == "An inner section."
    assert ref.class_doc(Base) == ""  # @dataclass's generated signature is no description


def test_walk_sections_defaults_and_links():
    sections = list(ref.walk(Outer, "outer", "Outer"))
    assert [s.path for s in sections] == ["outer", "outer.inner", "outer.maybe"]
    top = {k.path: k for k in sections[0].keys}
    assert top["outer.inherited"].default == "`0.5`"
    assert top["outer.name"].default == '`"x"`'
    assert top["outer.required"].default == "`[1, 2]`"
    assert top["outer.inner"].default == "below"
    assert top["outer.inner"].doc == "a nested section. Keys in [`outer.inner`](#key-outer-inner)."
    assert top["outer.maybe"].default == "`null`" and top["outer.maybe"].type == "mapping or null"
    # list and dict entries with the class's own defaults: documented once, at the first place they appear
    assert top["outer.items"].doc == "entries. Each entry: [`outer.maybe`](#key-outer-maybe)."
    assert top["outer.table"].doc == "Each entry: [`outer.maybe`](#key-outer-maybe)."
    assert top["outer.table"].type == "mapping of int to mapping"
    inner = {k.path: k for k in sections[1].keys}
    assert inner["outer.inner.size"].default == "`7`"  # the enclosing default's value, not the class's 3
    assert inner["outer.inner.mode"].type == 'one of `"a"`, `"b"`'
    maybe = {k.path: k for k in sections[2].keys}
    assert maybe["outer.maybe.size"].default == "`3`"
    assert sections[1].doc == "An inner section."


def test_cells_escape_markdown_but_not_code():
    assert ref._cell("a | b, None, <x> `<y> None`") == "a \\| b, null, &lt;x&gt; `<y> None`"
