import subprocess
import sys

import pytest
import torch

from elora_fed.sketch.projection import JLProjector


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_depend_on_seed_row_and_column_only(kind):
    small = JLProjector(1000, 64, seed=7, kind=kind, block_rows=3)
    large = JLProjector(1000, 64, seed=7, kind=kind, block_rows=512)
    x = torch.randn(5, 1000)
    torch.testing.assert_close(small.project(x), large.project(x))  # block size changes memory, not P
    torch.testing.assert_close(small.block(100, 130), large.block(0, 1000)[100:130], rtol=0, atol=0)
    other = JLProjector(1000, 64, seed=8, kind=kind)
    assert not torch.equal(other.block(0, 10), small.block(0, 10))
    # projecting parameter tensors at their offsets adds up to projecting the whole vector
    torch.testing.assert_close(large.project(x[:, :400]) + large.project(x[:, 400:], row_offset=400), large.project(x))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entry_distribution(kind):
    block = JLProjector(100_000, 100, seed=1, kind=kind).block(0, 2000)
    assert abs(block.mean().item()) < 1e-3
    assert abs(block.var().item() * 100 - 1) < 0.01  # variance 1/d
    if kind == "rademacher":
        assert torch.allclose(block.abs(), torch.tensor(0.1))


@pytest.mark.e2e
def test_two_processes_build_the_same_projection():
    code = (
        "import torch, hashlib; from elora_fed.sketch.projection import JLProjector;"
        "b = JLProjector(10**9, 400, seed=42).block(123456789, 123456789 + 64);"
        "print(hashlib.sha256(b.numpy().tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    here = JLProjector(10**9, 400, seed=42).block(123456789, 123456789 + 64)
    import hashlib

    assert digests == {hashlib.sha256(here.numpy().tobytes()).hexdigest() + "\n"}


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_product_distortion_shrinks_like_one_over_sqrt_d(kind):
    torch.manual_seed(0)
    x, y = torch.randn(200, 3000), torch.randn(200, 3000)
    x[100:] = y[100:] + 0.3 * x[100:]  # half the pairs strongly correlated
    exact = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    errors = {}
    for d in (100, 400, 1600):
        projector = JLProjector(3000, d, seed=3, kind=kind)
        px, py = projector.project(x), projector.project(y)
        errors[d] = ((px * py).sum(1) / (x.norm(dim=1) * y.norm(dim=1)) - exact).abs().mean().item()
    for d, error in errors.items():
        assert 0.3 / d**0.5 < error < 1.5 / d**0.5, errors  # the expected order, about 1/sqrt(d)
    assert 2.5 < errors[100] / errors[1600] < 6.5, errors  # 16x the dimension, ~4x less distortion
