"""Data: from a corpus to batches.

Owns the corpora (Shakespeare, text files, hub datasets, synthetic sources), the split by group,
the tokenizer (and rendering ids back to text), the `data:` settings and their hash, both
storages (`pt` and memory-mapped `shards`) with their writers (`prepare`, `shards`) and readers
(`storage`) side by side, the manifest with its file checks, deterministic batching, and the
zero-shot test sets.

May import: harness.core.
"""
