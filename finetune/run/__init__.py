"""finetune.run."""
