"""Model: a timm backbone with a new head (backbone), its layer groups, and the frozen prefix
that finetune-top can run once (frozen).
"""
