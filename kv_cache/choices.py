"""The values of the cache's settings, importable without numpy or the model: the LSP process checks settings
against them, and only the engine process loads what uses them."""

SPLICE_MODES = ("pie", "conflict-fast", "full")
# How an idle cache (not the one in use) keeps its K/V until its next edit or decode brings them back to fp32:
# "fp16" halves their bytes, "int8" (row_codec: a scale per token and layer, 127 levels) quarters them.
# bench/memory.py measures the memory, bench/pie.py and bench/decode.py the completions, against "fp32".
IDLE_ROWS = ("int8", "fp16", "fp32")
PERSIST_MAX_MB = 512  # the default cap on the saved buffers' files (setting persistMaxMb)
# Cross-file context (kv_cache/crossfile.py): a chunk cut shorter than the least is left out; the budget's bounds.
MIN_CHUNK_TOKENS = 16
MAX_CROSS_FILE_TOKENS = 4096
