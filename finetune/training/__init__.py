"""finetune.training."""
