"""The CUDA path: varlen attention inside the backbone, bf16 autocast training, sampling and the
bound on the GPU, synchronised benchmark timing. Run with `pytest -m gpu` on a CUDA machine
(scripts/gpu_check.sh does, with the GPU benchmark); skipped elsewhere."""
import json

import pytest
import torch

from harness.data.manifest import load_tokenizer
from harness.data.storage import load_split

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FIXED = ["did-fixed", "radd", "mdlm", "ar"]
VARLEN = ["did", "radd", "mdlm", "ilm", "ar"]


def _build(name, layout, toy_data, max_len=32):
    from harness.core import methods

    torch.manual_seed(0)
    vocab = load_tokenizer(toy_data).vocab
    return methods.build(name, vocab, "tiny", layout, max_len).cuda()


def _batch(toy_data, layout, n=8):


    rows = load_split(toy_data, "train", layout)
    return rows.batch(list(range(n))).to(torch.device("cuda"))


@pytest.mark.parametrize("causal", [False, True])
def test_packed_backbone_bf16_matches_per_sequence(causal):
    from harness.core.backbone import Backbone, backbone_config

    torch.manual_seed(0)
    model = Backbone(backbone_config("tiny", causal=causal), vocab_size=100).cuda().eval()
    lengths = torch.tensor([5, 77, 1, 130, 32], device="cuda")
    tokens = torch.randint(0, 100, (int(lengths.sum()),), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(tokens, lengths).float()
        pieces = [model(seq[None])[0].float() for seq in tokens.split(lengths.tolist())]
    torch.testing.assert_close(packed, torch.cat(pieces), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("layout,name", [("fixed", m) for m in FIXED] + [("varlen", m) for m in VARLEN])
def test_bf16_training_step_bound_and_sampling_on_cuda(layout, name, toy_data):
    from harness.metrics.timing import train_step

    model = _build(name, layout, toy_data).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _batch(toy_data, layout)
    stats = train_step(model, opt, batch, torch.device("cuda"), use_bf16=True)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients under bf16"
    assert all(v == v for v in stats.values() if isinstance(v, float)), stats
    model.eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bound = model.nll_bound(batch, mc=2, generator=gen)
    assert bound.dtype == torch.float64 and bool(torch.isfinite(bound).all()) and bool((bound > 0).all())
    res = model.sample(2, 4, generator=torch.Generator(device="cuda").manual_seed(0))
    assert len(res.tokens) == 2 and res.nfe >= 1
    vocab_size = model.vocab.size
    assert all(0 <= t < vocab_size for seq in res.tokens for t in seq)


def test_ar_kv_cache_samples_equal_recomputation_on_cuda(toy_data):

    from harness.core import methods

    vocab = load_tokenizer(toy_data).vocab
    out = {}
    for cache in (True, False):
        torch.manual_seed(0)
        model = methods.build("ar", vocab, "tiny", "varlen", 32, kv_cache=cache).cuda().eval()
        res = model.sample(4, 1, generator=torch.Generator(device="cuda").manual_seed(3))
        assert res.info["kv_cache"] is cache
        out[cache] = res.tokens
    assert out[True] == out[False]


def test_bench_train_on_cuda_reports_peak_memory_and_limits(toy_data, tmp_path):
    from harness.metrics import bench

    path = tmp_path / "bench.json"
    assert bench.main(["train", "--data", str(toy_data), "--sizes", "tiny", "--fixed-lengths", "32",
                       "--methods", "did-fixed", "radd", "did", "--batch-size", "4", "--warmup", "1",
                       "--repeats", "2", "--device", "cuda", "--out", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["precision"] == "bf16"
    for row in result["rows"]:
        assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] > 0
        assert row["s_per_step"]["median"] > 0


def test_the_triton_dp_kernel_matches_the_torch_path_on_cuda():
    """did.dp_kernels' Triton kernel compiled for the GPU (the interpreter test runs on a CPU)."""
    pytest.importorskip("triton")
    from did import counting

    g = torch.Generator().manual_seed(3)
    B, L, V = 4, 300, 12
    x0 = torch.randint(1, V, (B, L), generator=g)
    x0[:, 0] = 0
    lengths = torch.tensor([L, L - 7, L // 3, 2])
    keep = torch.rand(B, L, generator=g) < 0.5
    x0, lengths, keep = x0.cuda(), lengths.cuda(), keep.cuda()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ref = counting._tables(x0, keep, lengths, dtype, backend="torch")
        got = counting._tables(x0, keep, lengths, dtype, backend="triton")
        assert got.backend == "triton"
        assert torch.equal(torch.isfinite(ref.log_pair), torch.isfinite(got.log_pair))
        fin = torch.isfinite(ref.log_pair)
        torch.testing.assert_close(got.log_pair[fin], ref.log_pair[fin], rtol=tol, atol=tol)
