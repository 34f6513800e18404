"""Message components and modals: finding them, the API's checks, and what a user sends back.

* :func:`walk` / :func:`find_component`: every component of a message or modal, nested ones
  included (action rows, a section's accessory, a label's component);
* :func:`validate_message_components` / :func:`validate_modal`: the checks Discord applies
  when a bot sends components or opens a modal (a 400 "Invalid Form Body" in real life);
* :func:`check_select_values`: what the Discord client lets a user pick in a select menu;
* :func:`modal_submit_components`: the ``data.components`` of the MODAL_SUBMIT interaction a
  user's answers produce, shaped like the modal (action rows or labels around the inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Component types (https://discord.com/developers/docs/components/reference).
ACTION_ROW = 1
BUTTON = 2
STRING_SELECT = 3
TEXT_INPUT = 4
USER_SELECT = 5
ROLE_SELECT = 6
MENTIONABLE_SELECT = 7
CHANNEL_SELECT = 8
TEXT_DISPLAY = 10
LABEL = 18

SELECT_TYPES = (STRING_SELECT, USER_SELECT, ROLE_SELECT, MENTIONABLE_SELECT, CHANNEL_SELECT)
LINK_STYLE, PREMIUM_STYLE = 5, 6
FLAG_COMPONENTS_V2 = 1 << 15


def walk(components: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every component, depth first, nested ones included."""
    for c in components:
        yield c
        yield from walk(c.get("components") or [])
        for key in ("accessory", "component"):
            if isinstance(c.get(key), dict):
                yield from walk([c[key]])


def find_component(components: list[dict[str, Any]], custom_id: str) -> dict[str, Any] | None:
    """The component whose ``custom_id`` is ``custom_id``, if any."""
    return next((c for c in walk(components) if c.get("custom_id") == custom_id), None)


def custom_ids(components: list[dict[str, Any]]) -> list[str]:
    return [c["custom_id"] for c in walk(components) if "custom_id" in c]


def validate_message_components(components: list[dict[str, Any]], flags: int = 0) -> list[str]:
    """The checks Discord makes on a message's ``components``; empty when they are valid.

    Classic messages (without the components-v2 flag) take up to 5 action rows, each of
    up to 5 buttons or exactly one select menu; custom_ids are unique within the message.
    """
    errors: list[str] = []
    ids = custom_ids(components)
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        errors.append(f"COMPONENT_CUSTOM_ID_DUPLICATED: {dupes}")
    for c in walk(components):
        if "custom_id" in c and not 1 <= len(str(c["custom_id"])) <= 100:
            errors.append(f"custom_id {c['custom_id']!r}: 1-100 characters")
        if c.get("type") == BUTTON:
            errors += _button_errors(c)
        elif c.get("type") in SELECT_TYPES:
            errors += _select_errors(c)
        elif c.get("type") == TEXT_INPUT:
            errors.append("text inputs belong in modals, not messages")
    if flags & FLAG_COMPONENTS_V2:
        return errors
    if len(components) > 5:
        errors.append("more than 5 action rows")
    for row in components:
        if row.get("type") != ACTION_ROW:
            errors.append(f"top-level component of type {row.get('type')} is not an action row")
            continue
        items = row.get("components") or []
        kinds = {i.get("type") for i in items}
        if not items:
            errors.append("an action row must hold at least one component")
        elif kinds <= {BUTTON}:
            if len(items) > 5:
                errors.append("an action row holds at most 5 buttons")
        elif len(items) != 1 or not kinds <= set(SELECT_TYPES):
            errors.append("an action row holds buttons or exactly one select menu")
    return errors


def _button_errors(c: dict[str, Any]) -> list[str]:
    style = c.get("style")
    errors = []
    if style not in range(1, 7):
        errors.append(f"button style {style!r} invalid")
    if style == LINK_STYLE:
        if not c.get("url") or "custom_id" in c:
            errors.append("a link button has a url and no custom_id")
    elif style != PREMIUM_STYLE and not c.get("custom_id"):
        errors.append("a button needs a custom_id")
    if len(c.get("label") or "") > 80:
        errors.append("button label over 80 characters")
    if not c.get("label") and not c.get("emoji") and style != PREMIUM_STYLE:
        errors.append("a button needs a label or an emoji")
    return errors


def _select_errors(c: dict[str, Any]) -> list[str]:
    errors = []
    options = c.get("options") or []
    low, high = int(c.get("min_values", 1)), int(c.get("max_values", 1))
    if not 0 <= low <= 25 or not 1 <= high <= 25 or low > high:
        errors.append(f"select {c.get('custom_id')!r}: min_values/max_values out of range")
    if len(c.get("placeholder") or "") > 150:
        errors.append("select placeholder over 150 characters")
    if c.get("type") != STRING_SELECT:
        return errors
    if not 1 <= len(options) <= 25:
        errors.append(f"select {c.get('custom_id')!r}: 1-25 options")
    if high > len(options):
        errors.append(f"select {c.get('custom_id')!r}: max_values over the number of options")
    values = [o.get("value") for o in options]
    if len(values) != len(set(values)):
        errors.append(f"select {c.get('custom_id')!r}: option values must be unique")
    for o in options:
        if not 1 <= len(str(o.get("label") or "")) <= 100:
            errors.append("select option label: 1-100 characters")
        if not 1 <= len(str(o.get("value") or "")) <= 100:
            errors.append("select option value: 1-100 characters")
    if sum(bool(o.get("default")) for o in options) > high:
        errors.append("more default options than max_values")
    return errors


def check_select_values(component: dict[str, Any], values: list[str]) -> None:
    """What the Discord client lets a user submit from ``component``; raises ValueError."""
    cid = component.get("custom_id")
    if component.get("type") not in SELECT_TYPES:
        raise ValueError(f"component {cid!r} (type {component.get('type')}) is not a select menu")
    if component.get("disabled"):
        raise ValueError(f"select {cid!r} is disabled")
    low, high = int(component.get("min_values", 1)), int(component.get("max_values", 1))
    if not low <= len(values) <= high:
        raise ValueError(f"select {cid!r} takes {low}-{high} values, not {len(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"select {cid!r}: a value can be picked once")
    if component.get("type") == STRING_SELECT:
        offered = [o.get("value") for o in component.get("options") or []]
        unknown = [v for v in values if v not in offered]
        if unknown:
            raise ValueError(f"select {cid!r} offers {offered}, not {unknown}")


def validate_modal(modal: dict[str, Any]) -> list[str]:
    """The checks Discord makes on a MODAL callback's data; empty when it is valid."""
    errors = []
    if not 1 <= len(str(modal.get("custom_id") or "")) <= 100:
        errors.append("modal custom_id: 1-100 characters")
    if not 1 <= len(str(modal.get("title") or "")) <= 45:
        errors.append("modal title: 1-45 characters")
    top = modal.get("components") or []
    if not 1 <= len(top) <= 5:
        errors.append("a modal holds 1-5 components")
    ids = custom_ids(top)
    if len(ids) != len(set(ids)):
        errors.append("COMPONENT_CUSTOM_ID_DUPLICATED")
    for c in top:
        ctype = c.get("type")
        if ctype == ACTION_ROW:
            inner = c.get("components") or []
            if len(inner) != 1 or inner[0].get("type") != TEXT_INPUT:
                errors.append("a modal action row holds exactly one text input")
            else:
                errors += _text_input_errors(inner[0], labelled=False)
        elif ctype == LABEL:
            if not 1 <= len(str(c.get("label") or "")) <= 45:
                errors.append("label: 1-45 characters")
            inner_c = c.get("component") or {}
            if inner_c.get("type") == TEXT_INPUT:
                errors += _text_input_errors(inner_c, labelled=True)
            elif inner_c.get("type") in SELECT_TYPES:
                errors += _select_errors(inner_c)
            else:
                errors.append(f"a label cannot hold a component of type {inner_c.get('type')}")
        elif ctype != TEXT_DISPLAY:
            errors.append(f"a modal cannot hold a top-level component of type {ctype}")
    return errors


def _text_input_errors(c: dict[str, Any], *, labelled: bool) -> list[str]:
    errors = []
    if not c.get("custom_id"):
        errors.append("a text input needs a custom_id")
    if c.get("style") not in (1, 2):
        errors.append(f"text input style {c.get('style')!r} invalid (1 short, 2 paragraph)")
    if labelled and c.get("label"):
        errors.append("a text input inside a label takes no label of its own")
    if not labelled and not 1 <= len(str(c.get("label") or "")) <= 45:
        errors.append("text input label: 1-45 characters")
    low, high = int(c.get("min_length", 0)), int(c.get("max_length", 4000))
    if not 0 <= low <= 4000 or not 1 <= high <= 4000 or low > high:
        errors.append("text input min_length/max_length out of range")
    if len(str(c.get("value") or "")) > high:
        errors.append("text input value longer than max_length")
    if len(str(c.get("placeholder") or "")) > 100:
        errors.append("text input placeholder over 100 characters")
    return errors


def modal_submit_components(
    modal: dict[str, Any], values: dict[str, str | list[str]]
) -> list[dict[str, Any]]:
    """``data.components`` of the MODAL_SUBMIT for ``modal`` answered with ``values``.

    Text inputs carry ``value`` (a prefilled ``value`` when the user left it, else ""),
    selects ``values``; each sits in the action row or label it had in the modal, with the
    ``id`` Discord gave it. Raises ValueError for what the client would not submit (an
    unknown input, a required input left empty, a length out of range).
    """
    inputs = {c["custom_id"]: c for c in walk(modal.get("components") or []) if "custom_id" in c}
    unknown = [k for k in values if k not in inputs]
    if unknown:
        raise ValueError(f"the modal has no inputs {unknown} (it has {list(inputs)})")
    out = []
    for c in modal.get("components") or []:
        if c.get("type") == ACTION_ROW:
            inner = [_answer(i, values) for i in c.get("components") or []]
            out.append({"type": ACTION_ROW, "id": c.get("id"), "components": inner})
        elif c.get("type") == LABEL:
            out.append(
                {"type": LABEL, "id": c.get("id"), "component": _answer(c["component"], values)}
            )
        elif c.get("type") == TEXT_DISPLAY:
            out.append({"type": TEXT_DISPLAY, "id": c.get("id")})
    return out


def _answer(c: dict[str, Any], values: dict[str, str | list[str]]) -> dict[str, Any]:
    cid = c["custom_id"]
    if c.get("type") in SELECT_TYPES:
        picked = values.get(cid, [])
        chosen = [picked] if isinstance(picked, str) else list(picked)
        if c.get("required", True) or chosen:
            check_select_values(c, chosen)
        return {"type": c["type"], "id": c.get("id"), "custom_id": cid, "values": chosen}
    raw = values.get(cid, c.get("value") or "")
    if not isinstance(raw, str):
        raise ValueError(f"text input {cid!r} takes a string, not {raw!r}")
    if raw or c.get("required", True):
        low, high = int(c.get("min_length", 0)), int(c.get("max_length", 4000))
        if not raw:
            raise ValueError(f"text input {cid!r} is required")
        if not low <= len(raw) <= high:
            raise ValueError(f"text input {cid!r} takes {low}-{high} characters, not {len(raw)}")
    return {"type": TEXT_INPUT, "id": c.get("id"), "custom_id": cid, "value": raw}
