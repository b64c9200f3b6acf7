"""finetune.inference."""
