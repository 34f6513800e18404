"""The buttons under a delivered page: Refine, Regenerate and a style switch.

Like the Cancel button, each view is stopped before it is sent: presses are routed by
custom_id in ``Commands.on_component``, so they work on messages sent before a restart and
from any shard. Every custom_id carries the job id of the version it was sent with.
"""

from __future__ import annotations

import discord

from model.prompting import STYLE_HINTS

REFINE_PREFIX = "htmlbot:refine:"
REGENERATE_PREFIX = "htmlbot:regen:"
STYLE_PREFIX = "htmlbot:style:"
REFINE_MODAL_PREFIX = "htmlbot:refine-modal:"
INSTRUCTION_ID = "instruction"
INSTRUCTION_MAX = 500


def style_names() -> list[str]:
    """The styles a page can switch to (Discord allows 25 options)."""
    return list(STYLE_HINTS)[:25]


def page_view(job_id: str, styles: list[str]) -> discord.ui.View:
    """Refine and Regenerate buttons, then a select of the styles (at most 25)."""
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(
            label="Refine", style=discord.ButtonStyle.primary, custom_id=REFINE_PREFIX + job_id
        )
    )
    view.add_item(
        discord.ui.Button(
            label="Regenerate",
            style=discord.ButtonStyle.secondary,
            custom_id=REGENERATE_PREFIX + job_id,
        )
    )
    if styles:
        view.add_item(
            discord.ui.Select(
                custom_id=STYLE_PREFIX + job_id,
                placeholder="Switch style…",
                options=[discord.SelectOption(label=name, value=name) for name in styles[:25]],
                row=1,
            )
        )
    view.stop()
    return view


class RefineModal(discord.ui.Modal):
    """The instruction for a refine ("make the header blue", "add a pricing section")."""

    def __init__(self, job_id: str) -> None:
        super().__init__(title="Refine this page", custom_id=REFINE_MODAL_PREFIX + job_id)
        self.instruction: discord.ui.TextInput[RefineModal] = discord.ui.TextInput(
            label="What should change?",
            custom_id=INSTRUCTION_ID,
            style=discord.TextStyle.paragraph,
            placeholder="e.g. make the header blue, add a section about opening hours",
            max_length=INSTRUCTION_MAX,
        )
        self.add_item(self.instruction)
        self.stop()  # answered by custom_id in Commands.on_modal, like the buttons


def modal_value(data: object, custom_id: str) -> str:
    """The value of the text input ``custom_id`` in a modal submit's data."""
    if not isinstance(data, dict):
        return ""
    for row in data.get("components", []):
        children = row.get("components") or ([row["component"]] if "component" in row else [])
        for child in children:
            if child.get("custom_id") == custom_id:
                return str(child.get("value", ""))
    return ""
