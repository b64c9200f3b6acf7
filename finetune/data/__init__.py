"""finetune.data.scan."""
