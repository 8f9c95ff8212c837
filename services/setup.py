"""`rose setup`: the o200k vocabulary and the tiny default checkpoint, made when missing."""

from __future__ import annotations

import argparse
import os
import sys

from shared.config import Settings


def setup(settings: Settings) -> None:
    """Make sure the vocabulary and the checkpoint exist; ValueError when a named model is missing.

    Only the default checkpoint folder is written: a --model folder the user named
    that does not hold a checkpoint is an error, not something to fill with random
    weights.
    """
    from shared.vocab import ensure_vocab

    ensure_vocab(settings.vocab_dir)
    if os.path.exists(os.path.join(settings.model_path, "config.json")):
        return
    if settings.model:
        raise ValueError(f"no checkpoint at {settings.model_path} (expected config.json there)")
    from services.worker.model.make_checkpoint import make_checkpoint

    print(f"rose: writing the tiny random checkpoint to {settings.model_path}", file=sys.stderr)
    make_checkpoint(settings.model_path, seed=0)


def main(settings: Settings, args: argparse.Namespace) -> int:
    try:
        setup(settings)
    except (OSError, ValueError) as exc:
        print(f"rose setup: {exc}", file=sys.stderr)
        return 1
    print(f"vocabulary: {settings.vocab_dir}\ncheckpoint: {settings.model_path}")
    return 0
