"""Training: the one training loop and its step (loop), optimizers and LR schedules (optim), the
LR range test (lr_range), devices, precision and layout (compute), and torchrun (distributed).
"""
