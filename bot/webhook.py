"""Answering an interaction from its webhook alone (a restarted bot, another shard).

An interaction's follow-ups and its ``@original`` message are reached through the
application's webhook with the interaction's token: ``/webhooks/{application}/{token}``.
Any process holding the token can use it for 15 minutes, which is what lets a job outlive
the bot process that received it. :class:`WebhookInteraction` offers the few members of
``discord.Interaction`` that the status board and delivery use.
"""

from __future__ import annotations

from typing import Any

import discord

from bot.jobs import DeliveryInfo

DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024


class WebhookInteraction:
    """A stand-in for ``discord.Interaction`` built from a job's :class:`DeliveryInfo`."""

    def __init__(self, client: discord.Client, info: DeliveryInfo) -> None:
        self.client = client
        self.id = info.interaction_id
        self.application_id = info.application_id
        self.token = info.token
        self.filesize_limit = info.attachment_limit or DEFAULT_ATTACHMENT_LIMIT
        # The same webhook discord.Interaction.followup builds (type 3: an application's).
        self.followup = discord.Webhook.from_state(
            data={"id": info.application_id, "type": 3, "token": info.token},
            state=client._connection,
        )

    async def edit_original_response(self, *, content: str, view: Any = None) -> Any:
        """Edit the interaction's first message (the deferred "thinking" one)."""
        # Discord's route takes "@original" where a message id goes.
        original: Any = "@original"
        followup: Any = self.followup
        return await followup.edit_message(original, content=content, view=view)


def delivery_info_of(interaction: discord.Interaction) -> DeliveryInfo:
    """What a job keeps of ``interaction`` so that any process can answer it later."""
    shard_id = 0
    guild_id = interaction.guild_id
    client = interaction.client
    shard_count = getattr(client, "shard_count", None) or 1
    if guild_id is not None and shard_count > 1:
        shard_id = (guild_id >> 22) % shard_count
    return DeliveryInfo(
        application_id=interaction.application_id,
        token=interaction.token,
        interaction_id=interaction.id,
        shard_id=shard_id,
        attachment_limit=int(getattr(interaction, "filesize_limit", 0) or 0),
    )
