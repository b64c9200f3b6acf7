"""finetune.model."""
