"""The one prompt template, used by inference and by training alike.

A model trained on one format and prompted with another is the commonest silent bug in
this field, so nothing else in the project builds prompts.
"""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass, field
from typing import Any

from model.page.content import PageContent, PageKind, classify_prompt, page_subject
from model.page.form import answer_text, grammar_for
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
    """The :class:`AnswerPlan` for ``request`` (its mode, style and safety policy).

    A refine (``request.is_refine``) is planned by :func:`plan_refine`.
    """
    if request.is_refine:
        return plan_refine(tokenizer, request)
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


# ----------------------------------------------------------------------------- refine
#
# A refine edits the current page: the model is shown the page (document mode: its body;
# compose mode: its filled-in form) and the user's instruction, and answers with the whole
# new page in the same shape as a fresh answer (the same skeleton and banned strings, or
# the same form under the same grammar), so the page pipeline checks it the same way and
# an unchanged part can simply be copied.

_BODY_OPEN_RE = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_BODY_CLOSE_RE = re.compile(r"</body\s*>", re.IGNORECASE)
_HTML_CLOSE_RE = re.compile(r"</html\s*>", re.IGNORECASE)
_HEAD_RE = re.compile(
    r"^\s*(?:<!doctype[^>]*>\s*)?(?:<html\b[^>]*>\s*)?(?:<head\b.*?</head\s*>\s*)?",
    re.IGNORECASE | re.DOTALL,
)


def page_body(html: str) -> str:
    """The inner HTML of a page's ``<body>`` (up to its last ``</body>``, or ``</html>``):
    the part a document-mode answer writes. A page without a ``<body>`` tag is all body,
    less any doctype, ``<html>`` and ``<head>``. The head (the theme's CSS, the CSP) is the
    pipeline's, not the model's, so a refine prompt does not spend tokens on it."""
    opening = _BODY_OPEN_RE.search(html)
    body = html[opening.end() :] if opening else _HEAD_RE.sub("", html, count=1)
    for closing in (_BODY_CLOSE_RE, _HTML_CLOSE_RE):
        ends = list(closing.finditer(body))
        if ends:
            body = body[: ends[-1].start()]
            break
    return body.strip()


def refine_user_message(
    description: str, instruction: str, body: str, style: str | None = None
) -> str:
    """The user's turn of a document-mode refine: what the page is, its current body, the
    change asked for."""
    text = (
        f"Here is the body of a web page: {description.strip()}\n\n{body.strip()}\n\n"
        f"Change the page: {instruction.strip()}\n"
        "Answer with the whole new page; keep everything the change does not touch."
    )
    if style:
        text += f"\nStyle: {STYLE_HINTS.get(style, style)}."
    return text


def compose_refine_user_message(
    description: str, instruction: str, form: str, kind: PageKind, style: str | None = None
) -> str:
    """The user's turn of a compose-mode refine: the page's current form lines and the
    change asked for. The answer fills the same form again (its lead-ins come from the
    grammar, as for a new page)."""
    text = (
        f"This is the text of a {kind.value} web page: {description.strip()}\n\n"
        f"{form.strip()}\n\n"
        f"Write the text again with this change: {instruction.strip()}\n"
        "Keep every other line exactly as it is."
    )
    if style:
        text += f"\nTone: {STYLE_HINTS.get(style, style)}."
    return text


def source_content(content: PageContent | str) -> PageContent:
    """The compose page's content, from a :class:`PageContent` or its JSON
    (``HtmlPage.content``). Raises ``ValueError`` for JSON that is not page content."""
    if isinstance(content, PageContent):
        return content
    try:
        return PageContent.model_validate_json(content)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"source_content is not page content: {error}") from None


def refine_document_prompt_ids(
    tokenizer: Any, description: str, instruction: str, page: str, style: str | None = None
) -> list[int]:
    """Token ids of a document-mode refine of ``page`` (HTML): the chat prompt with the
    page's body and the instruction, then the answer's fixed start
    (:func:`document_prefix` of ``description``), where the model continues."""
    user = refine_user_message(description, instruction, page_body(page), style)
    text = _chat(tokenizer, SYSTEM_PROMPT, user) + document_prefix(description)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def refine_compose_prompt_ids(
    tokenizer: Any,
    description: str,
    instruction: str,
    content: PageContent | str,
    style: str | None = None,
    kind: PageKind | None = None,
) -> list[int]:
    """Token ids of a compose-mode refine of ``content``, for ``kind`` (default: the kind
    :func:`classify_prompt` gives ``description``; training passes its own)."""
    kind = kind or classify_prompt(description)
    form = answer_text(source_content(content), kind, page_subject(description))
    user = compose_refine_user_message(description, instruction, form, kind, style)
    ids: list[int] = tokenizer(
        _chat(tokenizer, COMPOSE_SYSTEM_PROMPT, user), add_special_tokens=False
    )["input_ids"]
    return ids


def plan_refine(tokenizer: Any, request: GenerationRequest) -> AnswerPlan:
    """The :class:`AnswerPlan` of a refine: ``request.prompt`` is the instruction,
    ``request.page_prompt`` what the page is about.

    Compose mode needs ``source_content`` and answers with the same form (and grammar) as
    a new page of that kind; document mode needs ``source_page`` and answers from the same
    skeleton with the same banned strings. Raises ``ValueError`` when the mode's source is
    missing.
    """
    description = request.page_prompt
    if request.mode is PageMode.COMPOSE:
        if request.source_content is None:
            raise ValueError("a compose-mode refine needs source_content (HtmlPage.content)")
        kind = classify_prompt(description)
        ids = refine_compose_prompt_ids(
            tokenizer, description, request.prompt, request.source_content, request.style, kind
        )
        grammar = grammar_for(kind, page_subject(description))
        return AnswerPlan(prompt_ids=ids, grammar=grammar, kind=kind)
    if request.source_page is None:
        raise ValueError("a document-mode refine needs source_page (the page's HTML)")
    ids = refine_document_prompt_ids(
        tokenizer, description, request.prompt, request.source_page, request.style
    )
    return AnswerPlan(
        prompt_ids=ids,
        prefix=document_prefix(description),
        banned=BANNED_STRINGS[request.safety],
    )
