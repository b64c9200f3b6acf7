"""finetune.reporting."""
