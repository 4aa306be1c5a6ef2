"""Safe files: atomic writes, checked JSON reads, and training checkpoints (safetensors and JSON only, renamed into
place). The bottom of the package: it imports nothing from pock_hf."""
