"""Generate docs/config.md, the config reference, from the config dataclasses.

Every key a config accepts is a field of a typed dataclass (see :mod:`orchestrator.config.typed`),
so the reference is generated from them rather than kept by hand: key path, type, default and
description. A field's description is its comment in the source — the ``# ...`` at the end of the
field's line, or the block of ``#`` lines right above the field — and a section's description is the
first paragraph of its dataclass's docstring. The comment stays next to the field it documents, so a
change to the field is seen with it.

Regenerate after changing a config dataclass or a method's ``Params``::

    python -m orchestrator._internal.config_reference > docs/config.md

``tests/test_config_reference.py`` fails while docs/config.md differs from this module's output.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Iterator, Literal, Union, get_args, get_origin

REGENERATE = "python -m orchestrator._internal.config_reference > docs/config.md"


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the reference."""

    path: str
    type: str
    default: str
    doc: str


@dataclasses.dataclass(frozen=True)
class Section:
    """One table: the keys of one dataclass at one place in the config."""

    path: str  # key path of the mapping this dataclass fills ("" for the top level)
    anchor: str  # HTML id other sections link to ("" for none)
    title: str
    doc: str
    keys: tuple[Key, ...]


# -- reading the source ---------------------------------------------------------------------------

@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in ``cls``'s own source (trailing, or the comment lines right above)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = " ".join(trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing)
        if not text:  # a block of whole-line comments directly above the field
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, lines[n - 1].strip().lstrip("#").strip())
                n -= 1
            text = " ".join(above)
        comments[node.target.id] = text
    return comments


def field_doc(cls: type, name: str) -> str:
    """The comment of field ``name``, looked up along the MRO (a subclass may inherit the field)."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in klass.__dict__.get("__annotations__", {}):
            return _field_comments(klass).get(name, "")
    return ""


def class_doc(cls: type) -> str:
    """First paragraph of the class's own docstring, on one line; empty when it has none (``@dataclass``
    then fills in the signature, which describes nothing)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


# -- rendering types, defaults and text -----------------------------------------------------------

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    """``Optional[X]`` -> X; anything else unchanged."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def render_type(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(render_type(a) for a in args)
    if origin is list:
        return f"list of {render_type(args[0])}"
    if origin is dict:
        return f"mapping of {render_type(args[0])} to {render_type(args[1])}"
    if _is_dataclass_type(tp):
        return "mapping"
    return tp.__name__


def _class_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _compact(value: Any) -> Any:
    """Plain data for a default; a dataclass instance keeps only its required fields and those that
    differ from the class's defaults."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v, default = getattr(value, f.name), _class_default(f)
            if default is dataclasses.MISSING or v != default:
                out[f.name] = _compact(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _compact(v) for k, v in value.items()}
    return value


def render_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    return "`" + json.dumps(_compact(value), ensure_ascii=False) + "`"


def _cell(text: str) -> str:
    """Markdown for a table cell: pipes escaped; outside code spans, angle brackets as entities (so
    ``<class>`` is not read as HTML) and Python's None/True/False in YAML's spelling."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        plain = parts[i].replace("<", "&lt;").replace(">", "&gt;")
        for python, yaml in (("None", "null"), ("True", "true"), ("False", "false")):
            plain = re.sub(rf"\b{python}\b", yaml, plain)
        parts[i] = plain
    return "`".join(parts)


def _sentence(text: str, addition: str) -> str:
    """``text`` followed by the sentence ``addition``."""
    text = text.strip().rstrip(".")
    return f"{text}. {addition}" if text else addition


def anchor(path: str, part: str = "") -> str:
    """The HTML id of the section documenting key ``path`` in the part of the reference named ``part``."""
    return "key-" + part + "".join(c if c.isalnum() else "-" for c in path.lower()).strip("-")


# -- walking the dataclasses ----------------------------------------------------------------------

def _signature(cls: type, default: Any) -> tuple[type, str]:
    """What a section documents: a dataclass and the defaults its keys show (its own defaults: "{}")."""
    return cls, json.dumps(_compact(default) if default is not None else {}, sort_keys=True, default=str)


def _container(tp: Any) -> tuple[str, type] | None:
    """For ``list[D]`` / ``dict[K, D]`` of a dataclass D: (the key-path segment of one entry, D)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is list and _is_dataclass_type(args[0]):
        return "<i>", args[0]
    if origin is dict and _is_dataclass_type(args[1]):
        return ("<step>" if args[0] is int else "<name>"), args[1]
    return None


def walk(cls: type, path: str, title: str, part: str = "", default: Any = None, seen: dict | None = None,
         linked: bool = True) -> Iterator[Section]:
    """Sections of ``cls`` at key ``path`` and of every dataclass nested in it, depth first.

    ``default`` is the instance the enclosing default provides (its field values are the defaults
    shown), or None for the class's own defaults. A dataclass already documented with the same
    defaults (``seen``: signature -> (key path, anchor)) is linked to instead of repeated. ``part``
    keeps one part's anchors apart from another's; ``linked=False``: a section nothing links to.
    """
    seen = {} if seen is None else seen
    here = anchor(path, part) if linked else ""
    seen.setdefault(_signature(cls, default), (path, here))
    hints = typing.get_type_hints(cls)
    keys, nested = [], []
    for f in (f for f in dataclasses.fields(cls) if f.init):
        key, tp = f"{path}.{f.name}" if path else f.name, hints[f.name]
        value = getattr(default, f.name) if default is not None else _class_default(f)
        text, inner, entry = field_doc(cls, f.name), _strip_optional(tp), _container(tp)
        if _is_dataclass_type(inner):
            sub_default = value if dataclasses.is_dataclass(value) else None
            earlier = seen.get(_signature(inner, sub_default))
            if earlier is None:
                earlier = seen[_signature(inner, sub_default)] = (key, anchor(key, part))
                nested.append((inner, key, sub_default))
                shown = "below"
            else:
                shown = "as there"
            text = _sentence(text, f"{'Keys in' if shown == 'below' else 'Same keys as'} [`{earlier[0]}`](#{earlier[1]}).")
            if value is None or value is dataclasses.MISSING:
                shown = render_default(value)
            keys.append(Key(key, render_type(tp), shown, text))
        elif entry is not None:
            segment, item_cls = entry
            item_key = f"{key}.{segment}"
            earlier = seen.get(_signature(item_cls, None))
            if earlier is None:
                earlier = seen[_signature(item_cls, None)] = (item_key, anchor(item_key, part))
                nested.append((item_cls, item_key, None))
            text = _sentence(text, f"Each entry: [`{earlier[0]}`](#{earlier[1]}).")
            keys.append(Key(key, render_type(tp), render_default(value), text))
        else:
            keys.append(Key(key, render_type(tp), render_default(value), text))
    yield Section(path, here, title, class_doc(cls), tuple(keys))
    for item_cls, key, sub_default in nested:
        yield from walk(item_cls, key, f"`{key}`", part, sub_default, seen)


# -- the document ---------------------------------------------------------------------------------

def _builtin_method_params() -> tuple[list[tuple[str, type]], list[tuple[str, type]]]:
    """(image methods, cross-modal methods) shipped in ``methods/``, as (name, Params dataclass) pairs."""
    import methods  # noqa: F401  (importing the package registers every built-in method)
    from methods import crossmodal_base
    from methods.base import list_methods, method_class

    def builtin(cls: type) -> bool:
        return cls.__module__.split(".")[0] == "methods"

    image = [(name, method_class(name).Params) for name in list_methods() if builtin(method_class(name))]
    crossmodal = [(name, crossmodal_base.CROSSMODAL_METHODS.get(name).Params)
                  for name in crossmodal_base.CROSSMODAL_METHODS.names() if builtin(crossmodal_base.CROSSMODAL_METHODS.get(name))]
    return image, crossmodal


def parts() -> list[tuple[str, str, list[Section]]]:
    """(heading, introduction, sections) of each part of the reference."""
    from orchestrator.config import ExperimentConfig
    from orchestrator.config.crossmodal import CrossModalExperiment
    from orchestrator.tuning.sweep import SweepConfig

    seen: dict = {}
    experiment = list(walk(ExperimentConfig, "", "Top level", seen=seen, linked=False))
    sweep = list(walk(SweepConfig, "sweep", "`sweep`", seen=seen))
    crossmodal = list(walk(CrossModalExperiment, "", "Top level (`kind: cross-modal`)", "crossmodal-",
                           seen=seen, linked=False))
    image_methods, crossmodal_methods = _builtin_method_params()
    method_sections = []
    for family, pairs in (("method", image_methods), ("cross-modal method", crossmodal_methods)):
        for name, params in pairs:
            method_sections += walk(params, "methods.<i>.params", f"`{name}` ({family})", name + "-",
                                    seen={}, linked=False)
    return [
        ("Experiment", "The keys of an experiment config (`compat run CONFIG`).", experiment),
        ("Sweep", "The `sweep:` section that `compat sweep` reads besides the experiment's keys.", sweep),
        ("Cross-modal experiment", "A config with `kind: cross-modal` at the top level has a schema of its "
         "own; the sections it shares with the experiment config link there.", crossmodal),
        ("Method parameters", "`params` of a `methods` entry, per built-in method "
         "(`methods: [{name: bct, params: {weight: 3}}]`).", method_sections),
    ]


def render() -> str:
    """docs/config.md as text."""
    out = [
        "# Config reference",
        "",
        "<!-- Generated from the config dataclasses; do not edit by hand. Regenerate with:",
        f"     {REGENERATE} -->",
        "",
        "Every key a config file (or `--set key.path=value`) accepts, with its type, its default and what",
        "it does. Entries of lists and mappings are named in key paths by index or name:",
        "`methods.0.params.weight`, `evaluation.sets.test.split`, `resources.steps.2.num_workers`. Unknown",
        "keys, wrong types and values outside the allowed ones fail before anything is written, with the",
        "key path in the error.",
        "",
    ]
    for heading, intro, sections in parts():
        out += [f"## {heading}", "", intro, ""]
        for section in sections:
            out += [f"### {section.title}", ""]
            if section.anchor:
                out += [f'<a id="{section.anchor}"></a>', ""]
            if not section.keys:
                out += ["No parameters.", ""]
                continue
            if section.doc:
                out += [_cell(section.doc), ""]
            out += ["| key | type | default | description |", "|---|---|---|---|"]
            out += [f"| `{k.path}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.doc)} |" for k in section.keys]
            out.append("")
    return "\n".join(out)


def undocumented() -> list[str]:
    """Key paths whose field has no comment (their description in the reference would be empty)."""
    return [k.path for _, _, sections in parts() for section in sections for k in section.keys if not k.doc]


if __name__ == "__main__":
    sys.stdout.write(render())
