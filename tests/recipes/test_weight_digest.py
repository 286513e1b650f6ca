"""weight_digest: the float64 Σ|w| per part, summed on the device and read by the host once."""
import pytest
import torch

from nemo_basic.recipes.callbacks import weight_digest
from nemo_basic.testing.syncs import count_host_syncs


def _module():
    g = torch.Generator().manual_seed(5)
    m = torch.nn.Module()
    m.vision_projection = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    m.language_model = torch.nn.Module()
    m.language_model.embedding = torch.nn.Embedding(50, 8, dtype=torch.bfloat16)
    m.language_model.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
    m.vision_model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)
    return m


def _reference(m):
    """Per element in float64, by walking the parameters' values on the host."""
    out = {"projector": 0.0, "language_model": 0.0, "vision_model": 0.0}
    for name, p in m.named_parameters():
        part = ("projector" if name.startswith("vision_projection.") else
                "language_model" if name.startswith("language_model.") else "vision_model")
        out[part] += sum(abs(float(x)) for x in p.detach().double().reshape(-1).tolist())
    return out


def test_digest_equals_float64_reference_with_one_host_transfer():
    m = _module()
    want = _reference(m)
    with count_host_syncs() as counter:
        got = weight_digest(m)
    assert got.keys() == want.keys()
    for part in want:
        assert got[part] == pytest.approx(want[part], rel=1e-12, abs=0), part
    # 9 parameters in 3 parts: one read of the three sums, no per-parameter float()
    assert dict(counter.counts) == {"tolist": 1}, dict(counter.counts)


def test_digest_of_a_module_without_a_part():
    m = torch.nn.Module()
    m.language_model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.language_model.weight.fill_(-0.5)
        m.language_model.bias.fill_(2.0)
    assert weight_digest(m) == {"projector": 0.0, "language_model": 7.0, "vision_model": 0.0}
