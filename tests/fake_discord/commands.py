"""Application commands as Discord checks them and sends them back.

Two halves: :func:`validate_command` applies the checks the real API makes to a registered
command (a 400 "Invalid Form Body" in real life), nested subcommands and groups included;
:func:`build_options` turns what a test wants to send (``{"setting": "cooldown"}`` under the
path ``["set"]``) into the ``data.options`` tree of an APPLICATION_COMMAND interaction, with
the checks the Discord client makes before it lets a user send a command (required options,
choices, lengths, ranges, channel types).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# Application command option types
# (https://discord.com/developers/docs/interactions/application-commands#application-command-object-application-command-option-type).
OPT_SUB_COMMAND = 1
OPT_SUB_COMMAND_GROUP = 2
OPT_STRING = 3
OPT_INTEGER = 4
OPT_BOOLEAN = 5
OPT_USER = 6
OPT_CHANNEL = 7
OPT_ROLE = 8
OPT_MENTIONABLE = 9
OPT_NUMBER = 10
OPT_ATTACHMENT = 11

SNOWFLAKE_TYPES = (OPT_USER, OPT_CHANNEL, OPT_ROLE, OPT_MENTIONABLE, OPT_ATTACHMENT)
_NESTING = (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP)
_CHOICE_TYPES = (OPT_STRING, OPT_INTEGER, OPT_NUMBER)
_PYTHON_TYPES = {bool: OPT_BOOLEAN, int: OPT_INTEGER, float: OPT_NUMBER, str: OPT_STRING}

# Discord's documented limits for application commands.
_NAME_RE = re.compile(r"^[-_'\w]{1,32}$")

# Turns a test's value for a snowflake option (a FakeUser, FakeRole, FakeChannel or an id)
# into the wire value, filling ``data.resolved`` on the way.
Resolve = Callable[[dict[str, Any], Any], str]


def validate_command(cmd: dict[str, Any]) -> list[str]:
    """The checks Discord applies to a command payload; an empty list when it is valid."""
    errors: list[str] = []
    name = cmd.get("name", "")
    ctype = cmd.get("type", 1)
    if not _NAME_RE.match(name) or (ctype == 1 and name != name.lower()):
        errors.append(f"name {name!r} invalid")
    if ctype == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
        errors.append(f"{name}: description must be 1-100 characters")
    if ctype != 1 and cmd.get("options"):
        errors.append(f"{name}: only slash commands take options")
    _validate_options(name, cmd.get("options") or [], depth=0, errors=errors)
    return errors


def _validate_options(
    where: str, options: list[dict[str, Any]], depth: int, errors: list[str]
) -> None:
    """One level of options: a command's (depth 0), a group's (1) or a subcommand's (1 or 2)."""
    if len(options) > 25:
        errors.append(f"{where}: more than 25 options")
    names = [o.get("name") for o in options]
    if len(names) != len(set(names)):
        errors.append(f"{where}: duplicate option names")
    nesting = [o for o in options if o.get("type") in _NESTING]
    if nesting and len(nesting) != len(options):
        errors.append(f"{where}: subcommands and groups cannot be mixed with other options")
    seen_optional = False
    for opt in options:
        oname = opt.get("name", "")
        path = f"{where}.{oname}"
        otype = opt.get("type")
        if not _NAME_RE.match(oname) or oname != oname.lower():
            errors.append(f"{path}: name invalid")
        if not 1 <= len(opt.get("description") or "") <= 100:
            errors.append(f"{path}: description must be 1-100 characters")
        if not isinstance(otype, int) or not OPT_SUB_COMMAND <= otype <= OPT_ATTACHMENT:
            errors.append(f"{path}: unknown option type {otype!r}")
            continue
        if otype in _NESTING:
            _validate_nesting(path, opt, depth, errors)
            continue
        if opt.get("required"):
            if seen_optional:
                errors.append(f"{path}: required options must come first")
        else:
            seen_optional = True
        _validate_value_option(path, opt, errors)


def _validate_nesting(path: str, opt: dict[str, Any], depth: int, errors: list[str]) -> None:
    inner = opt.get("options") or []
    if opt["type"] == OPT_SUB_COMMAND_GROUP:
        if depth != 0:
            errors.append(f"{path}: a group can only sit directly under a command")
        if any(o.get("type") != OPT_SUB_COMMAND for o in inner):
            errors.append(f"{path}: a group holds only subcommands")
    elif depth > 1:
        errors.append(f"{path}: subcommands nest at most two levels deep")
    elif any(o.get("type") in _NESTING for o in inner):
        errors.append(f"{path}: a subcommand cannot hold subcommands or groups")
    if opt.get("required"):
        errors.append(f"{path}: subcommands and groups cannot be required")
    _validate_options(path, inner, depth + 1, errors)


def _validate_value_option(path: str, opt: dict[str, Any], errors: list[str]) -> None:
    otype = opt["type"]
    choices = opt.get("choices") or []
    if choices and otype not in _CHOICE_TYPES:
        errors.append(f"{path}: only string, integer and number options take choices")
    if len(choices) > 25:
        errors.append(f"{path}: more than 25 choices")
    if choices and opt.get("autocomplete"):
        errors.append(f"{path}: autocomplete cannot be combined with choices")
    for choice in choices:
        if not 1 <= len(str(choice.get("name") or "")) <= 100:
            errors.append(f"{path}: choice names must be 1-100 characters")
        if _option_type_of(choice.get("value")) not in _compatible(otype):
            errors.append(f"{path}: choice value {choice.get('value')!r} does not fit type {otype}")
    for key in ("min_length", "max_length"):
        if key in opt and (otype != OPT_STRING or not 0 <= int(opt[key]) <= 6000):
            errors.append(f"{path}: {key} only on strings, 0-6000")
    for key in ("min_value", "max_value"):
        if key in opt and otype not in (OPT_INTEGER, OPT_NUMBER):
            errors.append(f"{path}: {key} only on integers and numbers")
    if "channel_types" in opt and otype != OPT_CHANNEL:
        errors.append(f"{path}: channel_types only on channel options")


def _option_type_of(value: Any) -> int | None:
    return _PYTHON_TYPES.get(type(value))


def _compatible(otype: int) -> tuple[int, ...]:
    # A number option's choices may be written as integers.
    return (OPT_INTEGER, OPT_NUMBER) if otype == OPT_NUMBER else (otype,)


def split_command_path(
    registered: list[dict[str, Any]], path: list[str], values: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """Complete ``path`` (subcommand names) from the nested form of ``values``.

    ``send_command("settings", {"set": {"setting": "cooldown"}})`` means the path ``["set"]``
    with the values ``{"setting": "cooldown"}``; a group nests once more.
    """
    path = list(path)
    options = _options_at(registered, path)
    while options and all(o.get("type") in _NESTING for o in options):
        if len(values) != 1:
            raise ValueError(
                f"pick one subcommand of {[o['name'] for o in options]}, got {list(values)}"
            )
        [(name, inner)] = values.items()
        path.append(name)
        values = dict(inner or {})
        options = _options_at(registered, path)
    return path, values


def _options_at(registered: list[dict[str, Any]], path: list[str]) -> list[dict[str, Any]]:
    options = registered
    for name in path:
        found = next((o for o in options if o.get("name") == name), None)
        if found is None or found.get("type") not in _NESTING:
            known = [o.get("name") for o in options if o.get("type") in _NESTING]
            raise LookupError(f"no subcommand or group {name!r} (there are {known})")
        options = found.get("options") or []
    return options


def build_options(
    registered: list[dict[str, Any]],
    path: list[str],
    values: dict[str, Any],
    resolve: Resolve,
    *,
    client_checks: bool = True,
) -> list[dict[str, Any]]:
    """The interaction's ``data.options``: ``path`` as nested subcommand/group options (types
    2 and 1, each with its own ``options``) around the leaf's value options.

    Option names must be registered and required options present (LookupError /
    ValueError). ``client_checks``: also check each value as the Discord client does (its
    type, choices, lengths, ranges); without it a test can send what only a modified client
    would (an over-long prompt), to test the bot's own checks.
    """
    if path:
        leaf_specs = _options_at(registered, path)
        nested = _value_options(leaf_specs, values, resolve, client_checks=client_checks)
        for depth in range(len(path), 0, -1):
            spec = next(
                o
                for o in _options_at(registered, path[: depth - 1])
                if o["name"] == path[depth - 1]
            )
            nested = [{"name": spec["name"], "type": spec["type"], "options": nested}]
        return nested
    if registered and all(o.get("type") in _NESTING for o in registered):
        raise ValueError(f"name a subcommand: one of {[o['name'] for o in registered]}")
    return _value_options(registered, values, resolve, client_checks=client_checks)


def _value_options(
    specs: list[dict[str, Any]],
    values: dict[str, Any],
    resolve: Resolve,
    *,
    client_checks: bool,
) -> list[dict[str, Any]]:
    by_name = {o["name"]: o for o in specs}
    unknown = [k for k in values if k not in by_name]
    if unknown:
        raise LookupError(f"no option {unknown} (the command has {list(by_name)})")
    missing = [o["name"] for o in specs if o.get("required") and o["name"] not in values]
    if missing:
        raise ValueError(f"required options missing: {missing}")
    out = []
    for name, value in values.items():
        spec = by_name[name]
        if client_checks:
            check_value(spec, value)
        wire = resolve(spec, value) if spec["type"] in SNOWFLAKE_TYPES else value
        out.append({"name": name, "type": spec["type"], "value": wire})
    return out


def check_value(spec: dict[str, Any], value: Any) -> None:
    """What the Discord client refuses to send for the option ``spec``: raises ValueError."""
    otype, name = spec["type"], spec["name"]
    if otype in SNOWFLAKE_TYPES:
        return  # checked where it is resolved
    wanted = _compatible(otype)
    if _option_type_of(value) not in wanted:
        raise ValueError(f"option {name!r} (type {otype}) cannot take {value!r}")
    choices = spec.get("choices") or []
    if choices and value not in [c["value"] for c in choices]:
        raise ValueError(f"option {name!r}: {value!r} is not one of its choices")
    if otype == OPT_STRING:
        if not spec.get("min_length", 0) <= len(value) <= spec.get("max_length", 6000):
            raise ValueError(f"option {name!r}: length {len(value)} out of range")
        return
    if "min_value" in spec and value < spec["min_value"]:
        raise ValueError(f"option {name!r}: {value} < min_value {spec['min_value']}")
    if "max_value" in spec and value > spec["max_value"]:
        raise ValueError(f"option {name!r}: {value} > max_value {spec['max_value']}")
