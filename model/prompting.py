"""The one prompt template, used by inference and by training alike.

A model trained on one format and prompted with another is the commonest silent bug in
this field, so nothing else in the project builds prompts.
"""

from __future__ import annotations

from typing import Any

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


def user_message(description: str, style: str | None = None) -> str:
    """The user's turn: the description, plus a style hint when one is chosen."""
    text = f"Create a web page: {description.strip()}"
    if style:
        hint = STYLE_HINTS.get(style, style)
        text += f"\nStyle: {hint}."
    return text


def build_prompt(tokenizer: Any, description: str, style: str | None = None) -> str:
    """The full prompt text, ending where the model's answer starts.

    Uses the tokenizer's chat template when it has one, CodeLlama-Instruct's
    ``[INST] ... [/INST]`` format otherwise. The text starts with the BOS token's text
    when the format wants one; encode it with :func:`encode_prompt`.
    """
    user = user_message(description, style)
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    bos = tokenizer.bos_token or ""
    return bos + _LLAMA2_TURN.format(user=_LLAMA2_SYSTEM.format(system=SYSTEM_PROMPT) + user)


def encode_prompt(tokenizer: Any, description: str, style: str | None = None) -> list[int]:
    """Token ids of :func:`build_prompt`, with exactly one BOS where the format has one."""
    text = build_prompt(tokenizer, description, style)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def encode_answer(tokenizer: Any, page: str) -> list[int]:
    """Token ids of a training target: the page itself, then EOS."""
    ids: list[int] = tokenizer(page.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
