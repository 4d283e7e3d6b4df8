"""DID: Deletion-Insertion Diffusion language models (shared/spec/did-method.md).

process  : forward deletion x0 -> x_t (packed survivors)
counting : exact insertion targets r = N(Ins(x_t, i, v), x0) / N(x_t, x0) by a log-space DP
dp_kernels, dp_triton : the DP's recurrence as one fused kernel (numba CPU, Triton CUDA; DIDBENCH_DP)
bench_dp : `python -m did.bench_dp`, the DP's cost against the sequence length per backend
heads    : csoftmax (variable length) and seqnorm (fixed length) output heads
loss     : DISE and DICE, per sequence
sampler  : parallel insertion sampler over a score function
method   : the registered methods `did` and `did-fixed`
"""
