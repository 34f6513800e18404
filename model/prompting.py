"""The one prompt template, used by inference and by training alike.

A model trained on one format and prompted with another is the commonest silent bug in
this field, so nothing else in the project builds prompts.
"""

from __future__ import annotations

import html as html_lib
from dataclasses import dataclass, field
from typing import Any

from model.page.content import PageKind, classify_prompt, page_subject
from model.page.form import grammar_for
from model.types import GenerationRequest, PageMode, SafetyPolicy

SYSTEM_PROMPT = (
    "You are an expert web developer. Answer with one complete, self-contained HTML5 "
    "document (inline CSS and JavaScript, no external files) and nothing else."
)

STYLE_HINTS: dict[str, str] = {
    "modern": "a clean modern look with generous spacing and a bold accent colour",
    "minimal": "a minimal look: mostly typography, lots of white space, few colours",
    "playful": "a playful look: rounded shapes, bright colours, friendly wording",
    "corporate": "a sober corporate look: navy and grey, clear sections, formal wording",
    "dark": "a dark theme with light text and one vivid accent colour",
    "retro": "a retro 1990s web look: bold borders, tiled backgrounds, pixel fonts",
}

# CodeLlama-Instruct / Llama-2 chat format, used when the tokenizer has no chat template.
_LLAMA2_SYSTEM = "<<SYS>>\n{system}\n<</SYS>>\n\n"
_LLAMA2_TURN = "[INST] {user} [/INST]"


COMPOSE_SYSTEM_PROMPT = (
    "You write the words of web pages: short, concrete, friendly sentences in English."
)


def user_message(description: str, style: str | None = None) -> str:
    """The user's turn: the description, plus a style hint when one is chosen."""
    text = f"Create a web page: {description.strip()}"
    if style:
        hint = STYLE_HINTS.get(style, style)
        text += f"\nStyle: {hint}."
    return text


def compose_user_message(description: str, style: str | None, kind: PageKind) -> str:
    """The user's turn in compose mode: the request and the kind of page. The form itself
    (``model.page.form``) comes as the answer's lead-ins, one question at a time: a worked
    example in the prompt was copied word for word by the embedded model."""
    text = f"Write the text of a {kind.value} web page: {description.strip()}"
    if style:
        text += f"\nTone: {STYLE_HINTS.get(style, style)}."
    return text


def document_prefix(description: str) -> str:
    """The start every document-mode answer is given: doctype, a complete head, ``<body>``.

    The model continues inside the body, so it can neither garble the doctype nor open a
    code fence before the page; the theme's CSS is added to this head afterwards
    (``model.page``), not spent as prompt tokens.
    """
    title = html_lib.escape(page_subject(description), quote=False)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n</head>\n<body>\n"
    )


def _chat(tokenizer: Any, system: str, user: str) -> str:
    """System + user turn in the tokenizer's chat template (or CodeLlama's), ending where
    the model's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    bos = tokenizer.bos_token or ""
    return bos + _LLAMA2_TURN.format(user=_LLAMA2_SYSTEM.format(system=system) + user)


def build_prompt(
    tokenizer: Any,
    description: str,
    style: str | None = None,
    mode: PageMode = PageMode.DOCUMENT,
) -> str:
    """The full prompt text, ending where the model's answer starts.

    Uses the tokenizer's chat template when it has one, CodeLlama-Instruct's
    ``[INST] ... [/INST]`` format otherwise. The text starts with the BOS token's text
    when the format wants one; encode it with :func:`encode_prompt`. In document mode the
    answer's fixed start (:func:`document_prefix`) is not part of it: see
    :func:`plan_answer`.
    """
    if mode is PageMode.COMPOSE:
        kind = classify_prompt(description)
        return _chat(
            tokenizer, COMPOSE_SYSTEM_PROMPT, compose_user_message(description, style, kind)
        )
    return _chat(tokenizer, SYSTEM_PROMPT, user_message(description, style))


def encode_prompt(
    tokenizer: Any,
    description: str,
    style: str | None = None,
    mode: PageMode = PageMode.DOCUMENT,
) -> list[int]:
    """Token ids of :func:`build_prompt`, with exactly one BOS where the format has one."""
    text = build_prompt(tokenizer, description, style, mode)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def encode_compose_prompt(
    tokenizer: Any, description: str, style: str | None, kind: PageKind
) -> list[int]:
    """Token ids of the compose-mode prompt for an explicit ``kind`` (training builds
    examples of one kind whatever :func:`classify_prompt` says); for the classified kind
    they are the ids :func:`plan_answer` gives."""
    text = _chat(tokenizer, COMPOSE_SYSTEM_PROMPT, compose_user_message(description, style, kind))
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


# Strings a document-mode answer may not contain, by policy: a code fence (the page would
# hold markdown), and under standard/strict every way markup loads something remote (the
# CSP blocks it anyway; banning it while decoding keeps the page from depending on it).
_FENCE = ("```",)
_REMOTE_LOADS = (
    "<script src",
    "<link",
    "@import",
    "url(http",
    "url(//",
    "url('http",
    'url("http',
    'src="http',
    "src='http",
    'src="//',
    "src='//",
)
BANNED_STRINGS: dict[SafetyPolicy, tuple[str, ...]] = {
    SafetyPolicy.OFF: _FENCE,
    SafetyPolicy.STANDARD: _FENCE + _REMOTE_LOADS,
    SafetyPolicy.STRICT: _FENCE + _REMOTE_LOADS,
}


@dataclass(frozen=True)
class AnswerPlan:
    """How one request is decoded, whichever engine runs it.

    ``prompt_ids`` end where the answer starts; in document mode they include the encoded
    ``prefix`` (the skeleton), and the result's text starts with ``prefix`` too.
    ``grammar`` (compose) is the xgrammar EBNF the answer must follow (the guided form of
    ``model.page.form``); ``banned`` (document) are strings the answer may not contain
    (case-insensitive).
    """

    prompt_ids: list[int]
    prefix: str = ""
    grammar: str | None = None
    banned: tuple[str, ...] = field(default=())
    kind: PageKind | None = None


def plan_answer(tokenizer: Any, request: GenerationRequest) -> AnswerPlan:
    """The :class:`AnswerPlan` for ``request`` (its mode, style and safety policy)."""
    if request.mode is PageMode.COMPOSE:
        kind = classify_prompt(request.prompt)
        ids = encode_prompt(tokenizer, request.prompt, request.style, PageMode.COMPOSE)
        grammar = grammar_for(kind, page_subject(request.prompt))
        return AnswerPlan(prompt_ids=ids, grammar=grammar, kind=kind)
    prefix = document_prefix(request.prompt)
    text = build_prompt(tokenizer, request.prompt, request.style) + prefix
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return AnswerPlan(prompt_ids=ids, prefix=prefix, banned=BANNED_STRINGS[request.safety])


def encode_answer(tokenizer: Any, page: str) -> list[int]:
    """Token ids of a training target: the page itself, then EOS."""
    ids: list[int] = tokenizer(page.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
