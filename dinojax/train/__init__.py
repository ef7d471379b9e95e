"""Training: the loop (`trainer`), checkpoints (`checkpoint`), metrics and export."""
