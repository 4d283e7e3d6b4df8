"""Baseline methods on the shared backbone: MDLM, RADD, ILM and AR."""
