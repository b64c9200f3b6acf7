"""``python -m finetune`` runs the CLI."""

from finetune.cli.commands import main

if __name__ == "__main__":
    main()
