"""``python -m training``: parse the config, train, and turn known errors into one line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from model.errors import ModelError
from training.config import TrainConfig, parse_config
from training.errors import TrainingError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 2 a user-facing error)."""
    # Under torchrun / accelerate launch every process runs this; only rank 0 narrates.
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config: TrainConfig = parse_config(argv)
        from training.loop import train

        metrics = train(config).metrics
    except (TrainingError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    before = metrics.get("before", {}).get("eval_loss", float("nan"))
    after = metrics.get("after", {}).get("eval_loss", float("nan"))
    print(f"done: {metrics['steps']} steps; eval loss {before:.4f} -> {after:.4f}")
    print(f"adapter in {config.output_dir}")
    return 0
