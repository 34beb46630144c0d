"""counter_normal: the counter convention, standard-normal statistics, and one graph under torch.compile.

The statistical bounds hold for any correct generator with a stated false-alarm probability, on a fresh
seed each run (printed on failure); none is tuned to the numbers drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from fastvae.kernels import reparameterize_kl_sampled, reparameterize_kl_sampled_compiled
from fastvae.kernels.counter_normal import counter_normal

SEED = 0x7FFF_0123_4567_89AB  # 63 bits, as train.derived_seed gives


def _pair(seed: int, offset: int) -> torch.Tensor:
    return torch.tensor([seed, offset])


def test_deterministic_and_keyed_by_seed_and_offset() -> None:
    batch, z_dim = 7, 20
    first = counter_normal(_pair(SEED, 1000), (batch, z_dim))
    assert first.shape == (batch, z_dim) and first.dtype == torch.float32
    assert torch.equal(first, counter_normal(_pair(SEED, 1000).clone(), (batch, z_dim)))
    for other in (_pair(SEED + 1, 1000), _pair(SEED - 2**32, 1000)):  # 2**32: the seed's high word counts
        assert not torch.isin(counter_normal(other, (batch, z_dim)), first).any(), other
    assert not torch.equal(counter_normal(_pair(SEED, 1001), (batch, z_dim)), first)  # the same numbers, moved
    # A step later by B * Z uses none of the same counters.
    assert not torch.isin(counter_normal(_pair(SEED, 1000 + batch * z_dim), (batch, z_dim)), first).any()


def test_element_i_is_counter_offset_plus_i() -> None:
    n = 1000
    whole = counter_normal(_pair(SEED, 2**40 + 3), (n,))
    for k in (1, 16, 17, 999):
        assert torch.equal(whole[k:], counter_normal(_pair(SEED, 2**40 + 3 + k), (n - k,))), k
    # As the Triton kernel's counters offset + row * Z + col: row r at offset + Z is row r + 1.
    rows = counter_normal(_pair(SEED, 0), (5, 33))
    assert torch.equal(counter_normal(_pair(SEED, 33), (5, 33))[:-1], rows[1:])
    assert torch.equal(rows.flatten(), counter_normal(_pair(SEED, 0), (165,)))


def test_extreme_seeds_and_offsets_are_finite() -> None:
    for seed, offset in [(0, 0), (-1, 0), (2**63 - 1, 2**62), (-(2**63), 2**63 - 100)]:  # the last one wraps
        x = counter_normal(_pair(seed, offset), (4096,))
        assert x.isfinite().all() and x.std() > 0.5, (seed, offset)


def test_standard_normal_statistics(fresh_seed: int) -> None:
    seed = fresh_seed * 0x9E3779B97F4A7C15 % 2**63  # 63 bits from this run's fresh 32-bit seed
    n = 2**20
    x = counter_normal(_pair(seed, 0), (n,)).double()
    assert x.isfinite().all(), seed
    # 6-sigma bounds (a false failure ~2e-9 each): sd(mean) = 1/sqrt(n), sd(variance) = sqrt(2/n), sd of a
    # mean of products of independent normals = 1/sqrt(n) (neighbours; the same counters under two seeds).
    assert abs(x.mean().item()) < 6 / n**0.5, seed
    assert abs(x.var().item() - 1) < 6 * (2 / n) ** 0.5, seed
    assert abs((x[1:] * x[:-1]).mean().item()) < 6 / n**0.5, seed
    other = counter_normal(_pair(seed ^ 1, 0), (n,)).double()
    assert abs((x * other).mean().item()) < 6 / n**0.5, seed
    # Kolmogorov-Smirnov: by the DKW inequality (Massart's constant) P(D > eps) <= 2 exp(-2 n eps^2) for any
    # n; eps = sqrt(ln(2 / alpha) / (2 n)) at alpha = 1e-6 is 2.69 / sqrt(n).
    cdf = torch.special.ndtr(x.sort().values)
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    distance = torch.maximum(steps[1:] - cdf, cdf - steps[:-1]).max().item()
    assert distance < math.sqrt(math.log(2 / 1e-6) / (2 * n)), (seed, distance)
    # Tails: P(|x| > 4) = 6.33e-5, so ~66 of 2**20; binomial count within 6 sd. Nothing past the 6.76 cap.
    expected = n * 2 * torch.special.ndtr(torch.tensor(-4.0, dtype=torch.float64)).item()
    assert abs((x.abs() > 4).sum().item() - expected) < 6 * expected**0.5, seed
    assert x.abs().max().item() <= math.sqrt(-2 * math.log(2.0**-33)) + 1e-6, seed


@pytest.mark.slow
def test_compiled_draw_equals_eager_and_a_new_pair_does_not_recompile() -> None:
    compiled = torch.compile(counter_normal, fullgraph=True, dynamic=False)  # fullgraph: no host read, no break
    compiled(_pair(SEED, 0), (7, 33))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for pair in (_pair(SEED, 231), _pair(3, 2**40)):
            # Inductor's log and cos may differ from eager's in the last bit; with |radius| <= 6.8 a 2-ulp
            # difference in each factor moves a value by at most ~2.4e-6.
            torch.testing.assert_close(compiled(pair, (7, 33)), counter_normal(pair, (7, 33)), rtol=1e-5, atol=3e-6)


@pytest.mark.slow
def test_compiled_sampled_op_matches_the_eager_formula() -> None:
    """reparameterize_kl_sampled_compiled: forward and backward graphs, eps drawn in the first and saved."""
    batch, z_dim = 7, 33
    encoding = torch.randn(batch, 2 * z_dim)
    mean, log_sigma = encoding[:, :z_dim], 0.5 * encoding[:, z_dim:]  # column halves, as the encoder gives
    dz, dkl = torch.randn(batch, z_dim), torch.randn(batch)

    def run(op: Callable[..., tuple[torch.Tensor, torch.Tensor]], pair: torch.Tensor) -> list[torch.Tensor]:
        m, s = mean.detach().requires_grad_(True), log_sigma.detach().requires_grad_(True)
        z, kl = op(m, s, pair)
        torch.autograd.backward((z, kl), (dz, dkl))
        return [z.detach(), kl.detach(), m.grad, s.grad]

    run(reparameterize_kl_sampled_compiled, _pair(SEED, 0))  # compiles both graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        pair = _pair(SEED, batch * z_dim)
        compiled = run(reparameterize_kl_sampled_compiled, pair)
    eager = run(lambda m, s, p: reparameterize_kl_sampled(m, s, p, kernel="torch"), pair)
    # eps may differ by ~2.4e-6 (see above), scaled by sigma * |dz| <= e^2 * 4 here: atol 1e-4. A wrong eps,
    # or one not saved for the backward, is off by O(1).
    for name, actual, expected in zip(("z", "kl", "dmean", "dlog_sigma"), compiled, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4, msg=name)
    # Inside a compiled region it traces the plain formula (aot_eager: checks the trace, not inductor's code).
    traced = run(torch.compile(reparameterize_kl_sampled_compiled, fullgraph=True, backend="aot_eager"), pair)
    for actual, expected in zip(traced, eager, strict=True):
        torch.testing.assert_close(actual, expected)
