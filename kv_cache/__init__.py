"""Per-buffer KV caches that follow edits."""
