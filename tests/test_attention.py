"""Packed attention: every strategy equals naive per-sequence softmax attention, forward and backward."""
import math

import pytest
import torch

from harness.core import attention


def naive(q, k, v, lengths, causal):
    """Explicit softmax(QK^T / sqrt(d)) V per sequence, in float64."""
    outs = []
    for qs, ks, vs in zip(*(t.double().split(lengths.tolist()) for t in (q, k, v))):
        s = torch.einsum("nhd,mhd->hnm", qs, ks) / math.sqrt(q.shape[-1])
        if causal:
            n = s.shape[-1]
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        outs.append(torch.einsum("hnm,mhd->nhd", s.softmax(-1), vs))
    return torch.cat(outs).to(q.dtype)


STRATEGIES = {
    "packed": attention.packed_attention,
    "split": attention.split_attention,
    "bucketed": attention.bucketed_attention,
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[5, 1, 9, 3, 16, 4], [7, 7, 7], [0, 3, 0, 6], [33, 2, 64, 17]])
def test_strategy_matches_naive_forward_and_backward(name, causal, lengths):
    torch.manual_seed(0)
    lengths = torch.tensor(lengths)
    T, H, hd = int(lengths.sum()), 3, 8
    q, k, v = (torch.randn(T, H, hd, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(T, H, hd, dtype=torch.float64)
    out = STRATEGIES[name](q, k, v, lengths, causal=causal)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = naive(q, k, v, lengths, causal)
    ref = torch.autograd.grad(ref_out, (q, k, v), grad)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_all_empty_sequences_give_an_empty_output():
    q = torch.zeros(0, 2, 4)
    assert attention.packed_attention(q, q, q, torch.tensor([0, 0])).shape == (0, 2, 4)


def test_cumulative_offsets_are_int32_boundaries():
    cu = attention.cumulative_offsets(torch.tensor([3, 0, 2]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 5]


def test_cpu_takes_no_gpu_kernel():
    q = torch.randn(5, 2, 4, dtype=torch.bfloat16)
    assert attention._gpu_varlen(q, q, q, torch.tensor([2, 3]), False, 0.0) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_varlen_kernel_matches_naive(causal):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 130, 1, 64, 257], device="cuda")
    T, H, hd = int(lengths.sum()), 4, 64
    q, k, v = (torch.randn(T, H, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention._gpu_varlen(q, k, v, lengths, causal, 0.0)
    assert out is not None, "no CUDA varlen kernel ran (torch varlen_attn and flash-attn both unavailable)"
    ref = naive(q.float(), k.float(), v.float(), lengths.cpu(), causal)
    torch.testing.assert_close(out.float(), ref.to(out.device), atol=3e-2, rtol=3e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(naive(qf, kf, vf, lengths.cpu(), causal), (qf, kf, vf), grad.float())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float(), r, atol=5e-2, rtol=5e-2)


def test_did_like_lengths_are_seeded_and_in_range():
    from harness.metrics.bench_attention import did_like_lengths

    a, b = did_like_lengths(64, 16, seed=1), did_like_lengths(64, 16, seed=1)
    assert a.tolist() == b.tolist() and int(a.min()) >= 1 and int(a.max()) <= 64


def test_bench_attention_writes_rows(tmp_path):
    import json

    from harness.metrics import bench

    out = tmp_path / "att.json"
    assert bench.main(["attention", "--cases", "32x3", "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["seconds"]) == {"split", "bucketed", "padded", "dense@L"}
    assert row["efficiency"]["dense@L"] == 1.0 and 0 < row["kept_fraction"] <= 1
    assert row["speedup_vs_dense"]["split"] == row["seconds"]["dense@L"]["median"] / row["seconds"]["split"]["median"]


def test_bench_attention_figure(tmp_path):
    from analysis.cost_figures import bench_figure
    from harness.metrics import bench

    out = tmp_path / "attention-cpu.json"
    assert bench.main(["attention", "--cases", "16x2", "--repeats", "1", "--out", str(out)]) == 0
    import json

    from analysis.cost_figures import bench_plot

    assert bench_plot(json.loads(out.read_text()), "attention") is not None  # a real figure, not a placeholder
    png = bench_figure(out, tmp_path / "bench-attention-cpu.png")
    assert png.stat().st_size > 5000
