"""The JSON schemas of the first compose design: the data of the grammar library comparison.

Compose answers were once a JSON object under a per-kind schema; the product now uses a
guided form (``model.page.form``), but the library comparison in ``bench.constrained``
(which chose xgrammar) was run on these schemas, and re-runs on them: here they are the
benchmark's data, no longer part of ``model``. :func:`probes` gives one document per
schema feature that a library must judge right.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from model.page.content import EXAMPLES, PageKind

__all__ = ["example_json", "probes", "schema_for"]

_SHORT = 40
_LINE = 90
_SENTENCES = 240


def _string(max_length: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


def _array(items: dict[str, Any], low: int, high: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": low, "maxItems": high}


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_CARD = _object(title=_string(_SHORT), text=_string(140))

# The block each kind adds between the tagline and the sections, as JSON-schema properties.
_BLOCKS: dict[PageKind, dict[str, dict[str, Any]]] = {
    PageKind.LANDING: {"features": _array(_CARD, 3, 3)},
    PageKind.PRICING: {
        "plans": _array(
            _object(name=_string(24), price=_string(12), features=_array(_string(48), 3, 4)),
            3,
            3,
        )
    },
    PageKind.FORM: {
        "form": _object(
            fields=_array(
                _object(
                    label=_string(30),
                    type={"enum": ["text", "email", "tel", "number", "date", "textarea"]},
                    required={"type": "boolean"},
                ),
                3,
                6,
            ),
            submit=_string(24),
        )
    },
    PageKind.FAQ: {
        "questions": _array(_object(question=_string(_LINE), answer=_string(200)), 4, 6)
    },
    PageKind.ARTICLE: {"paragraphs": _array(_string(_SENTENCES), 3, 5)},
    PageKind.DASHBOARD: {
        "stats": _array(_object(label=_string(24), value=_string(12)), 3, 4),
        "table": _object(
            columns=_array(_string(20), 3, 4),
            rows=_array(_array(_string(20), 3, 4), 3, 5),
        ),
    },
    PageKind.ITINERARY: {
        "days": _array(
            _object(name=_string(16), title=_string(_SHORT), activities=_array(_string(80), 2, 3)),
            3,
            5,
        )
    },
    PageKind.PORTFOLIO: {"projects": _array(_CARD, 3, 4)},
    PageKind.RESUME: {
        "experience": _array(
            _object(
                role=_string(_SHORT),
                organization=_string(_SHORT),
                period=_string(20),
                summary=_string(160),
            ),
            2,
            3,
        ),
        "skills": _array(_string(24), 4, 6),
    },
    PageKind.MENU: {
        "dishes": _array(
            _object(name=_string(_SHORT), description=_string(100), price=_string(10)), 4, 6
        )
    },
    PageKind.EVENT: {"schedule": _array(_object(time=_string(12), title=_string(60)), 3, 5)},
}

_SECTION = _object(
    heading=_string(_SHORT), text=_string(_SENTENCES), items=_array(_string(80), 0, 3)
)


def schema_for(kind: PageKind) -> dict[str, Any]:
    """The JSON schema of ``kind``'s content: every key required and in this order (title,
    tagline, the kind's block, sections, call to action, footer)."""
    properties: dict[str, dict[str, Any]] = {
        "title": _string(60),
        "tagline": _string(140),
        **_BLOCKS[kind],
        "sections": _array(_SECTION, 2, 3),
        "call_to_action": _object(text=_string(_LINE), button=_string(24)),
        "footer": _string(_LINE),
    }
    return _object(**properties)


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def example_json(kind: PageKind) -> str:
    """``kind``'s sample content (``model.page.content.EXAMPLES``) as compact JSON."""
    return _compact(EXAMPLES[kind])


def probes(kind: PageKind) -> dict[str, tuple[str, bool]]:
    """Documents for ``kind``'s schema, each with whether the schema accepts it."""
    base = copy.deepcopy(EXAMPLES[kind])
    block = next(key for key in base if key not in {"title", "tagline"})

    def variant(change: Callable[[dict[str, Any]], None]) -> str:
        data = copy.deepcopy(base)
        change(data)
        return _compact(data)

    cases: dict[str, tuple[str, bool]] = {
        "example": (variant(lambda d: None), True),
        "maxLength=60 ok": (variant(lambda d: d.update(title="t" * 60)), True),
        "maxLength": (variant(lambda d: d.update(title="t" * 61)), False),
        "minLength": (variant(lambda d: d.update(title="")), False),
        "minItems": (variant(lambda d: d.update(sections=d["sections"][:1])), False),
        "maxItems": (variant(lambda d: d.update(sections=d["sections"] * 2)), False),
        "required": (variant(lambda d: d.pop("footer")), False),
        "additionalProperties": (variant(lambda d: d.update(extra="x")), False),
        "nested required": (variant(lambda d: d["call_to_action"].pop("button")), False),
    }
    if isinstance(base[block], list) and isinstance(base[block][0], dict):
        first = base[block][0]
        key = next(iter(first))
        cases["nested additionalProperties"] = (
            variant(lambda d: d[block][0].update(extra="x")),
            False,
        )
        cases["nested maxLength"] = (variant(lambda d: d[block][0].update({key: "x" * 300})), False)
    if kind is PageKind.FORM:
        cases["enum"] = (variant(lambda d: d["form"]["fields"][0].update(type="password")), False)
        cases["enum ok"] = (variant(lambda d: d["form"]["fields"][0].update(type="date")), True)
    return cases
