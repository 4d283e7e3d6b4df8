"""The shared backbone: packed == per-sequence, RoPE restarts, causality, sizes."""
import pytest
import torch

from harness.core.backbone import Backbone, backbone_config, packed_positions
from harness.core.methods import UserError


def _model(**kw):
    torch.manual_seed(0)
    cfg = backbone_config("tiny", n_layers=2, d_model=32, n_heads=4, **kw)
    return Backbone(cfg, vocab_size=50).eval()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("time_cond", [False, True])
@pytest.mark.parametrize("lengths", [[5, 1, 9, 3, 16, 4], [7, 7, 7]])
def test_packed_equals_per_sequence(causal, time_cond, lengths):
    model = _model(causal=causal, time_cond=time_cond)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(0, 50, (int(lengths.sum()),))
    sigma = torch.rand(len(lengths)) if time_cond else None
    packed = model(tokens, lengths, sigma)
    pieces = []
    for b, seq in enumerate(tokens.split(lengths.tolist())):
        pieces.append(model(seq[None], sigma=None if sigma is None else sigma[b : b + 1])[0])
    torch.testing.assert_close(packed, torch.cat(pieces), atol=1e-5, rtol=1e-5)


def test_attention_does_not_cross_sequences():
    model = _model()
    lengths = torch.tensor([4, 4])
    tokens = torch.randint(0, 50, (8,))
    out1 = model(tokens, lengths)
    tokens2 = tokens.clone()
    tokens2[5] = (tokens2[5] + 1) % 50  # change the second sequence only
    out2 = model(tokens2, lengths)
    torch.testing.assert_close(out1[:4], out2[:4])
    assert not torch.allclose(out1[4:], out2[4:])


def test_causal_prefix_independent_of_future():
    model = _model(causal=True)
    x = torch.randint(0, 50, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 3) % 50
    torch.testing.assert_close(model(x)[0, :7], model(y)[0, :7])


def test_rope_restarts_per_sequence():
    assert packed_positions(torch.tensor([3, 1, 2])).tolist() == [0, 1, 2, 0, 0, 1]


def test_time_conditioning_requires_sigma():
    with pytest.raises(ValueError):
        _model(time_cond=True)(torch.randint(0, 50, (2, 4)))


def test_unknown_size_is_a_user_error():
    with pytest.raises(UserError):
        backbone_config("huge")


def test_paper_parameter_counts():
    """did-method.md 6.4: 85.0M / 302.2M / 708.2M non-embedding parameters (no time input)."""
    expected = {"small": 85.0e6, "medium": 302.2e6, "large": 708.2e6}
    with torch.device("meta"):
        for size, n in expected.items():
            model = Backbone(backbone_config(size), vocab_size=50257)
            print(size, model.num_params(non_embedding=True))
            assert abs(model.num_params(non_embedding=True) - n) < 0.06e6
            # untied input embedding + output linear (V x d) = the 162.3M / 405.2M / 836.9M totals
            total = model.num_params() + 50257 * model.cfg.d_model
            assert abs(total - {"small": 162.3e6, "medium": 405.2e6, "large": 836.9e6}[size]) < 0.1e6


def test_tiny_is_a_few_million_parameters():
    model = Backbone(backbone_config("tiny"), vocab_size=2048)
    assert 1e6 < model.num_params() < 5e6


def test_forward_flops_scale_per_sequence_not_packed_total():
    model = _model()
    one = model.forward_flops([64, 64])
    assert model.forward_flops([128]) > one  # attention is quadratic per sequence
