"""A run: one (method, layout, size, seed) trained model.

Owns what a run is (`recipe`: settings, recipe hash, checkpoint, EMA, `load_run`), the training
loop (`loop`) and the process it runs in (`process`: DDP, warning signals), its validation curve
(`validation`), its FLOPs and FLOPs matching (`flops`) and
drawing samples from a trained run (`generate`, `python -m harness sample`). The loop reports
through a callback (`loop.Reporter`); it never imports a tracking library.

May import: harness.core, harness.data.
"""
