"""The fused DP kernels (did.dp_kernels): numba on the CPU, Triton under its interpreter, each
against the brute-force oracle of tests/test_did_counting.py and against the PyTorch path."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from did import counting, dp_kernels
from harness.core.errors import UserError
from tests.test_did_counting import BOS, brute_targets, pad_batch, random_cases

REPO = Path(__file__).resolve().parents[1]
HAS_NUMBA = importlib.util.find_spec("numba") is not None


def _against_brute_force(backend: str, count: int) -> None:
    """Random short cases (repeated tokens, BOS inside x0) through the dense targets of `backend`."""
    cases = random_cases(count, seed=11, allow_bos_inside=True)
    x0, keep, lengths = pad_batch(cases, width=11, pad_value=3)
    r = counting.dense_insertion_targets(x0, keep, lengths, 4, out_dtype=torch.float64, backend=backend)
    for b, (seq, kp, vocab) in enumerate(cases):
        xt = [t for t, k in zip(seq, kp) if k]
        expected = torch.zeros(11, 4, dtype=torch.float64)
        expected[: len(xt), :vocab] = torch.tensor([[float(f) for f in row] for row in brute_targets(seq, xt, vocab)],
                                                   dtype=torch.float64)
        torch.testing.assert_close(r[b], expected, atol=1e-12, rtol=0)


def _against_torch(backend: str, L: int) -> None:
    """A realistic batch (varying lengths, ~half deleted): the same tables as the PyTorch path, to
    the rounding of the logaddexps (float64: 1e-12 relative; float32: 1e-5)."""
    g = torch.Generator().manual_seed(3)
    B, V = 4, 12
    x0 = torch.randint(1, V, (B, L), generator=g)
    x0[:, 0] = BOS
    lengths = torch.tensor([L, L - 7, L // 3, 2])
    keep = torch.rand(B, L, generator=g) < 0.5
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ref = counting._tables(x0, keep, lengths, dtype, backend="torch")
        got = counting._tables(x0, keep, lengths, dtype, backend=backend)
        assert got.backend == backend
        assert torch.equal(torch.isfinite(ref.log_pair), torch.isfinite(got.log_pair))
        fin = torch.isfinite(ref.log_pair)
        torch.testing.assert_close(got.log_pair[fin], ref.log_pair[fin], rtol=tol, atol=tol)
        torch.testing.assert_close(got.log_n, ref.log_n, rtol=tol, atol=0)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_the_numba_kernel_matches_the_oracle_and_the_torch_path():
    _against_brute_force("numba", 200)
    _against_torch("numba", 96)
    # huge counts (C(1023, n) ~ 1e306): the same finite log-counts as PyTorch's logaddexp
    L = 1024
    x0 = torch.full((2, L), 1, dtype=torch.long)
    x0[:, 0] = BOS
    keep = torch.rand(2, L, generator=torch.Generator().manual_seed(1)) < torch.tensor([[0.5], [0.05]])
    ref = counting.sparse_insertion_targets(x0, keep, torch.tensor([L, L]), 3, dp_dtype=torch.float64, threshold=0.0,
                                            backend="torch")
    got = counting.sparse_insertion_targets(x0, keep, torch.tensor([L, L]), 3, dp_dtype=torch.float64, threshold=0.0,
                                            backend="numba")
    assert got.backend == "numba" and torch.equal(got.rows, ref.rows) and torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-12, atol=0)


TRITON_SCRIPT = """
import torch
from tests import test_dp_kernels as t
t._against_brute_force("triton", 40)
t._against_torch("triton", 24)
print("triton ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install -e '.[triton-interpret]'; .ci/run does)")
def test_the_triton_kernel_matches_the_oracle_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("triton ok"), out.stderr[-3000:]


def test_the_backend_is_chosen_by_the_environment_and_checked(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(dp_kernels.ENV, raising=False)
    assert dp_kernels.choose(cpu) == "torch"                               # the default: the committed results'
    monkeypatch.setenv(dp_kernels.ENV, "auto")
    assert dp_kernels.choose(cpu) == ("numba" if HAS_NUMBA else "torch")
    monkeypatch.setenv(dp_kernels.ENV, "fortran")
    with pytest.raises(UserError, match=r"DIDBENCH_DP='fortran': the DP backend must be one of torch, numba, triton"):
        dp_kernels.choose(cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match=r"DIDBENCH_DP=numba: not available for cuda tensors here"):
        dp_kernels.choose(cuda, "numba")
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"DIDBENCH_DP=triton: not available for cpu tensors here"):
            dp_kernels.choose(cpu, "triton")


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_a_did_run_records_its_dp_backend(monkeypatch):
    from harness.core.batch import Batch, Vocab
    from harness.core.methods import build

    method = build("did", Vocab(size=12, bos=0, eos=1, pad=2, mask=3), "tiny", "varlen", 8)
    assert method.runtime_info() == {}
    batch = Batch(torch.tensor([[0, 4, 5, 4, 6, 7], [0, 5, 5, 2, 2, 2]]), torch.tensor([6, 3]), "varlen")
    monkeypatch.setenv(dp_kernels.ENV, "numba")
    torch.manual_seed(0)
    method.loss(batch)
    assert method.runtime_info() == {"dp_backend": "numba"}
    monkeypatch.setenv(dp_kernels.ENV, "torch")
    method.loss(batch)
    assert method.runtime_info() == {"dp_backend": "numba, torch"}    # a mixed run says so
