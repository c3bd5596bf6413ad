"""The one render entry: a template's name and a checked context in, source and its key out.

Every generated kernel goes through ``render``: the attention kernels of a plan
(``codegen.kernels``) and the routing pre-kernels (``codegen.prekernels``). ``TEMPLATES``
is the table of what exists: each template file, the family the manifest and the cache
report it under, and the few values a template accepts from a fixed list of choices
instead of the printable-text rule. Only ints, bools, and text from sparseforge's own
printers reach a template (``check_context``); the one free-text value is the header
comment (a repr printed by the IR), which must stay on its line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache

import jinja2

from .._version import __version__

TEMPLATE_VERSION = 7  # of the templates as a set: part of every cache key

#: what printed expressions, kernel names and reprs of the IR may contain: no quotes,
#: newlines, backslashes, or anything else that could end a comment or a string
SAFE_TEXT = re.compile(r"[A-Za-z0-9_ ()+\-*/%<>=&|!~.,:\[\]]*")
#: the ``dot`` precision suffixes the attention templates take verbatim
DOT_PRECISIONS = ("", ', input_precision="ieee"')
SCHEDULES = ("segments", "hull", "dense")


@dataclass(frozen=True)
class Template:
    """A ``.py.jinja`` file under ``templates/``; ``family`` is what the manifest calls its
    kernels (forward, backward, decode, routing); ``choices``: context keys whose value
    must be one of a fixed tuple (checked here instead of by ``SAFE_TEXT``)."""

    file: str
    family: str
    choices: dict = field(default_factory=dict)


_ATTENTION_CHOICES = {"dot_precision": DOT_PRECISIONS, "schedule": SCHEDULES}

TEMPLATES: dict[str, Template] = {
    "forward": Template("forward.py.jinja", "forward", _ATTENTION_CHOICES),
    "backward_dq": Template("backward_dq.py.jinja", "backward", _ATTENTION_CHOICES),
    "backward_dkdv": Template("backward_dkdv.py.jinja", "backward", _ATTENTION_CHOICES),
    "decode": Template("decode.py.jinja", "decode", _ATTENTION_CHOICES),
    "routing": Template("routing.py.jinja", "routing"),
    "hierarchical": Template("hierarchical.py.jinja", "routing"),
    "clusters": Template("clusters.py.jinja", "routing"),
    "vertical_slash": Template("vertical_slash.py.jinja", "routing"),
}


class UnsafeTemplateValue(ValueError):
    """A value outside what the template accepts was about to be rendered."""


def check_context(value, path: str = "context") -> None:
    """Only ints, bools, and text from our printers (checked against ``SAFE_TEXT``)
    reach a template; anything else is a bug upstream and stops rendering here."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_context(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_context(v, f"{path}[{i}]")
    elif isinstance(value, str):
        if not SAFE_TEXT.fullmatch(value):
            raise UnsafeTemplateValue(f"{path}={value!r}: not a printed expression or name")
    elif not isinstance(value, int):  # bool is an int
        raise UnsafeTemplateValue(f"{path}: {type(value).__name__} cannot reach a template")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment of every template: undefined names are errors, nothing is
    escaped (the output is Python), trailing newlines kept (byte-stable sources)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("sparseforge", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


@dataclass(frozen=True)
class RenderedSource:
    """A rendered module: its readable ``name`` (the kernels' name prefix), the source and
    its sha256 (the content part of every cache key)."""

    name: str
    source: str
    sha256: str


def render(template: str, name: str, context: dict, *, comment: str = "") -> RenderedSource:
    """Source of ``template`` (a key of ``TEMPLATES``) for ``context``.

    ``name`` and every context value are checked (``check_context``, or the template's
    ``choices``); ``version`` and ``template_version`` are added here. ``comment`` is the
    header line's description (a pattern's or routing node's repr): any text on one line.
    """
    spec = TEMPLATES.get(template)
    if spec is None:
        raise ValueError(f"template={template!r}: expected one of {', '.join(TEMPLATES)}")
    if "\n" in comment or "\r" in comment:
        raise UnsafeTemplateValue(f"comment={comment!r}: must stay on one line")
    for key, allowed in spec.choices.items():
        if key in context and context[key] not in allowed:
            raise UnsafeTemplateValue(f"{key}={context[key]!r}: expected one of {allowed}")
    check_context({k: v for k, v in context.items() if k not in spec.choices})
    check_context(name, "name")
    source = environment().get_template(spec.file).render(
        version=__version__, template_version=TEMPLATE_VERSION, name=name, comment=comment,
        **context)
    return RenderedSource(name, source, hashlib.sha256(source.encode()).hexdigest())
