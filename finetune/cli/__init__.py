"""The command line: a thin click layer over the Python API (:mod:`finetune.cli.commands`)."""

from finetune.cli.commands import main

__all__ = ["main"]
