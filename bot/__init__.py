"""The Discord bot: ``/html prompt:...`` -> a downloadable ``.html`` page.

Modules, in the order a request flows through them:

- :mod:`bot.settings` - typed settings from the environment and ``.env``.
- :mod:`bot.commands` - /html, /queue, /mypages, the Cancel button, error replies.
- :mod:`bot.scheduler` - bounded, fair (round-robin per user), cancellable job queue.
- :mod:`bot.worker` - the one thread that owns the engine (batched or continuous).
- :mod:`bot.status` - the deferred message: queue position, ETA, progress, paced edits.
- :mod:`bot.delivery` - the page as an attachment, retries, expired tokens.
- :mod:`bot.store` - finished pages kept on disk per user.
- :mod:`bot.client` - ``HtmlBot``, which wires them together; :mod:`bot.__main__` runs it.

Nothing here touches tensors: the model is reached only through the engine protocols of
:mod:`model.types`.
"""
