"""The fused reparameterize + KL op against the lab's torch.distributions path, in each implementation.

The Triton kernels run for real on a GPU and, in CPU CI, under TRITON_INTERPRET=1. That variable must be set
before triton is imported and the rest of the suite needs compiled kernels, so the test_triton_* tests are
rerun in a subprocess that sets it (test_interpreter_runs_the_triton_kernel_tests).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch.distributions.normal import Normal

from fastvae import reference
from fastvae.cli import main
from fastvae.config import TrainConfig
from fastvae.kernels import reparameterize_kl, reparameterize_kl_sampled
from fastvae.kernels.reparameterize_kl_torch import reparameterize_kl_torch, sample_eps_torch
from fastvae.model import VAE
from fastvae.plan import make_plan
from tests.helpers import TOLERANCES

pytest.importorskip("triton", reason="the Triton kernels' tests need Triton (tests/test_without_triton.py: the rest)")
from fastvae.kernels.reparameterize_kl_triton import (  # noqa: E402
    reparameterize_kl_backward,
    reparameterize_kl_forward,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda" if torch.cuda.is_available() else None
def needs_triton(test: Callable[..., None]) -> Callable[..., None]:
    """A test of the Triton kernels themselves: compiled for the GPU where one is, interpreted under
    TRITON_INTERPRET=1. Marked `triton`, so the GPU check (`-m "cuda or triton"`) runs them natively."""
    reason = "no GPU: test_interpreter_runs_the_triton_kernel_tests reruns it interpreted"
    return pytest.mark.triton(pytest.mark.skipif(TRITON_DEVICE is None, reason=reason)(test))

SHAPES = [(batch, z_dim) for batch in (1, 7, 1024) for z_dim in (1, 20, 32, 33, 128)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = torch.ops.fastvae


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """torch.empty fills new tensors with NaN inside, so an output element a kernel never wrote shows up."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def _inputs(batch: int, z_dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """mean, log_sigma as the encoder gives them (column halves of one (B, 2Z) tensor), eps, dz, dkl."""
    encoding = torch.cat([torch.randn(batch, z_dim), 0.5 * torch.randn(batch, z_dim)], 1).to(dtype).to(device)
    eps = torch.randn(batch, z_dim, device=device)
    dz = torch.randn(batch, z_dim, device=device).to(dtype)
    dkl = torch.randn(batch, device=device)
    return encoding[:, :z_dim], encoding[:, z_dim:], eps, dz, dkl


def _reference(*inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The lab's path in fp64 on the same (rounded) inputs: [z, KL, d mean, d log_sigma], and each one's
    terms in absolute value. Errors are measured against the latter: rounding is relative to the terms, and
    an element that is a near-total cancellation (dz = -dkl * mean) has a tiny value, not a tiny error."""
    m, s, e, dz, dkl = (t.double() for t in inputs)
    m.requires_grad_(True)
    s.requires_grad_(True)
    q = Normal(m, s.exp())
    z = q.mean + q.stddev * e  # as reference.VAE draws z from a given eps
    kl = reference.kl_divergence_loss(q)
    torch.autograd.backward((z, kl), (dz, dkl))
    outputs = [z.detach(), kl.detach(), m.grad, s.grad]
    m, s, dkl = m.detach(), s.detach(), dkl[:, None]
    sigma = s.exp()
    terms = [m.abs() + sigma * e.abs(), (0.5 * (sigma**2 + m**2 + 1) + s.abs()).sum(-1),
             dz.abs() + (dkl * m).abs(), (dz * e * sigma).abs() + dkl.abs() * (sigma**2 + 1)]
    return outputs, terms


def _error(actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / terms.norm()).item()


# ---- Triton kernels: on a GPU, or on the CPU under TRITON_INTERPRET=1 ----


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, z_dim", SHAPES, ids=str)
def test_triton_forward_and_backward_match_reference(batch: int, z_dim: int, dtype: torch.dtype) -> None:
    mean, log_sigma, eps, dz, dkl = _inputs(batch, z_dim, dtype, TRITON_DEVICE)
    with poisoned():
        z, kl = reparameterize_kl_forward(mean, log_sigma, eps=eps)
        dmean, dlog_sigma = reparameterize_kl_backward(dz, dkl, mean, log_sigma, eps=eps)
    expected, terms = _reference(mean, log_sigma, eps, dz, dkl)
    assert (z.dtype, kl.dtype, dmean.dtype, dlog_sigma.dtype) == (dtype, torch.float32, dtype, dtype)
    # NOTE: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest): up to 2**-7 relative.
    for name, actual, want, scale in zip(("z", "kl", "dmean", "dlog_sigma"), (z, kl, dmean, dlog_sigma),
                                         expected, terms, strict=True):
        assert not actual.isnan().any(), f"{name}: elements left unwritten"
        assert _error(actual, want, scale) <= TOLERANCES[dtype], name


@needs_triton
def test_triton_philox_reproducible_and_counters_per_element() -> None:
    batch, z_dim = 7, 20
    zeros = torch.zeros(batch, z_dim, device=TRITON_DEVICE)

    def eps(seed: int, offset: int) -> torch.Tensor:
        # mean 0, log_sigma 0: z = 0 + 1 * eps exactly.
        return reparameterize_kl_forward(zeros, zeros, seed_offset=torch.tensor([seed, offset], device=zeros.device))[0]

    seed = 0x7FFF_0123_4567_89AB  # 63 bits, as train.derived_seed gives
    first = eps(seed, 1000)
    assert torch.equal(first, eps(seed, 1000))
    assert not torch.equal(first, eps(seed, 1001))
    assert not torch.equal(first, eps(seed - 2**32, 1000))  # the seed's high word is part of the key
    # Counter = offset + row * Z + col: a step later by B * Z never reuses one; row r at offset Z is row r + 1.
    assert torch.equal(eps(seed, 1000 + z_dim)[:-1], first[1:])
    assert not torch.isin(eps(seed, 1000 + batch * z_dim), first).any()


@needs_triton
def test_triton_philox_eps_is_standard_normal() -> None:
    batch, z_dim = 1024, 128
    zeros = torch.zeros(batch, z_dim, device=TRITON_DEVICE)
    eps = reparameterize_kl_forward(zeros, zeros, seed_offset=torch.tensor([12345, 0], device=zeros.device))[0]
    x = eps.double().flatten()
    n = x.numel()
    # 6-sigma bounds for n standard normals: sd(mean) = 1/sqrt(n), sd(variance) = sqrt(2/n), sd(lag-1 and
    # row-to-row correlation) = 1/sqrt(n). Chance of a false failure: about 2e-9 each.
    assert abs(x.mean().item()) < 6 / n**0.5
    assert abs(x.var().item() - 1) < 6 * (2 / n) ** 0.5
    assert abs((x[1:] * x[:-1]).mean().item()) < 6 / n**0.5
    assert abs((eps[1:].double() * eps[:-1].double()).mean().item()) < 6 / n**0.5
    # Columns 4j..4j+3 are the 4 lanes of one Philox call (two Box-Muller pairs): across m groups,
    # sd(correlation) = 1/sqrt(m), and within a pair sd(mean of (a^2 - 1)(b^2 - 1)) = 2/sqrt(m) for independent
    # normals, which a pair sharing its radius badly would fail.
    lanes = eps.double().reshape(batch, z_dim // 4, 4).reshape(-1, 4)  # (m, 4): lane k in column k
    m = lanes.shape[0]
    for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        assert abs((lanes[:, a] * lanes[:, b]).mean().item()) < 6 / m**0.5, (a, b)
    for a, b in ((0, 1), (2, 3)):
        assert abs(((lanes[:, a] ** 2 - 1) * (lanes[:, b] ** 2 - 1)).mean().item()) < 6 * 2 / m**0.5, (a, b)


def _philox_normals(seed: int, first: int, count: int) -> torch.Tensor:
    """Normals first .. first + count - 1 as the kernels define them, in NumPy: normal n is lane n % 4 of
    Philox4x32-10 (Triton's round constants) at counter words (n // 4 low, n // 4 high, 0, 0) under key
    (seed low, seed high), its 4 words made uniform and paired by Box-Muller as triton.language does."""
    import numpy as np

    def u32(x: np.ndarray) -> np.ndarray:
        return (x & 0xFFFF_FFFF).astype(np.uint64)

    groups = np.arange(first // 4, (first + count - 1) // 4 + 1, dtype=np.uint64)
    c = [u32(groups), groups >> np.uint64(32), np.zeros_like(groups), np.zeros_like(groups)]
    k0, k1 = np.uint64(seed & 0xFFFF_FFFF), np.uint64(seed >> 32)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        product_b, product_a = round_b * c[2], round_a * c[0]  # < 2**64: no wrap in uint64
        c = [(product_b >> np.uint64(32)) ^ c[1] ^ k0, u32(product_b), (product_a >> np.uint64(32)) ^ c[3] ^ k1,
             u32(product_a)]
        k0, k1 = u32(k0 + np.uint64(0x9E3779B9)), u32(k1 + np.uint64(0xBB67AE85))
    signed = [w.astype(np.uint32).view(np.int32) for w in c]
    uniform = [np.where(w < 0, ~w, w).astype(np.float32) * np.float32(4.6566127342e-10) for w in signed]
    normals = []
    for u_radius, u_angle in ((uniform[0], uniform[1]), (uniform[2], uniform[3])):
        radius = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1e-7), u_radius)))
        angle = np.float32(6.283185307179586) * u_angle
        normals += [radius * np.cos(angle), radius * np.sin(angle)]
    lanes = np.stack(normals, axis=1).reshape(-1)  # normal 4 * groups[0] + i at i
    return torch.from_numpy(lanes[first % 4:first % 4 + count].copy())


@needs_triton
def test_triton_philox_eps_is_the_documented_stream() -> None:
    """eps[row, col] = normal(offset + row * Z + col), normal defined by _philox_normals; the counters cross
    2**32 groups, so the counter's high word is checked too. To rounding: the kernels' log, sqrt, sin and cos
    are the device's."""
    seed, offset = 0x7FFF_0123_4567_89AB, 2**34 - 64
    for batch, z_dim, shift in ((7, 20, 0), (7, 20, 1), (5, 33, 0)):
        zeros = torch.zeros(batch, z_dim, device=TRITON_DEVICE)
        pair = torch.tensor([seed, offset + shift], device=zeros.device)
        eps = reparameterize_kl_forward(zeros, zeros, seed_offset=pair)[0].cpu().flatten()
        torch.testing.assert_close(eps, _philox_normals(seed, offset + shift, batch * z_dim), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_philox_grouped_and_per_element_paths_agree() -> None:
    """One Philox call per 4 columns (Z and offset multiples of 4) and one per element (otherwise) give the
    same numbers bit for bit: the same 4,224 normals laid out as rows of different lengths, or shifted by
    an offset that is not a multiple of 4, agree exactly, backward included."""
    seed, offset = 0x7FFF_0123_4567_89AB, 2**34 - 64  # group counters cross 2**32: the high word carries

    def eps(offset: int, batch: int, z_dim: int) -> torch.Tensor:
        zeros = torch.zeros(batch, z_dim, device=TRITON_DEVICE)
        pair = torch.tensor([seed, offset], device=zeros.device)
        return reparameterize_kl_forward(zeros, zeros, seed_offset=pair)[0].flatten()

    flat = eps(offset, 132, 32)  # grouped
    # Grouped: 64 and 132 columns (132 loops over two blocks, the second mostly masked); per element: 33, 1.
    for batch, z_dim in ((66, 64), (32, 132), (128, 33), (4224, 1)):
        assert torch.equal(eps(offset, batch, z_dim), flat), (batch, z_dim)
    for shift in (1, 2, 3):  # per element, because the offset is not a multiple of 4
        assert torch.equal(eps(offset + shift, 132, 32)[:-shift], flat[shift:]), shift
    mean, log_sigma, _, dz, dkl = _inputs(66, 64, torch.float32, TRITON_DEVICE)
    for name, shift in (("grouped", 0), ("per element", 1)):
        pair = torch.tensor([seed, offset - shift], device=mean.device)
        given = eps(offset - shift, 66, 64)[:66 * 64].reshape(66, 64)
        drawn = reparameterize_kl_backward(dz, dkl, mean, log_sigma, seed_offset=pair)
        read = reparameterize_kl_backward(dz, dkl, mean, log_sigma, eps=given)
        assert all(torch.equal(a, b) for a, b in zip(drawn, read, strict=True)), name


@needs_triton
@pytest.mark.parametrize("batch, z_dim", [(1, 1), (7, 20), (1024, 33)], ids=str)
def test_triton_backward_regenerates_the_forward_eps(batch: int, z_dim: int) -> None:
    mean, log_sigma, _, dz, dkl = _inputs(batch, z_dim, torch.float32, TRITON_DEVICE)
    seed_offset = torch.tensor([2024, 77 * batch * z_dim], device=mean.device)
    with poisoned():
        z, _ = reparameterize_kl_forward(mean, log_sigma, seed_offset=seed_offset)
        grads = reparameterize_kl_backward(dz, dkl, mean, log_sigma, seed_offset=seed_offset)
    recovered = ((z.double() - mean.double()) / log_sigma.double().exp()).float()
    from_eps = reparameterize_kl_backward(dz, dkl, mean, log_sigma, eps=recovered)
    _, terms = _reference(mean, log_sigma, recovered, dz, dkl)
    for actual, want, scale in zip(grads, from_eps, terms[2:], strict=True):
        assert not actual.isnan().any()
        assert _error(actual, want.double(), scale) <= TOLERANCES[torch.float32]
    # Exactly: with mean 0 and log_sigma 0 the forward's z is its eps, bit for bit.
    zeros = torch.zeros_like(mean)
    eps = reparameterize_kl_forward(zeros, zeros, seed_offset=seed_offset)[0]
    exact = reparameterize_kl_backward(dz, dkl, mean, log_sigma, eps=eps)
    assert all(torch.equal(a, b) for a, b in zip(grads, exact, strict=True))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_any_strides_give_the_contiguous_result(dtype: torch.dtype) -> None:
    batch, z_dim = 7, 33
    mean, log_sigma, _, _, _ = _inputs(batch, z_dim, dtype, TRITON_DEVICE)
    seed_offset = torch.tensor([5, 0], device=mean.device)
    dz_cases = {
        "stride 0 (z.sum())": torch.ones(1, 1, dtype=dtype, device=mean.device).expand(batch, z_dim),
        "transposed": torch.randn(z_dim, batch, device=mean.device).to(dtype).t(),
    }
    dkl = torch.full((1,), 0.5, device=mean.device).expand(batch)  # stride 0, as from kl.sum() * 0.5
    forward = reparameterize_kl_forward(mean, log_sigma, seed_offset=seed_offset)
    dense = reparameterize_kl_forward(mean.contiguous(), log_sigma.contiguous(), seed_offset=seed_offset)
    assert all(torch.equal(a, b) for a, b in zip(forward, dense, strict=True)), "row-strided mean, log_sigma"
    for name, dz in dz_cases.items():
        strided = reparameterize_kl_backward(dz, dkl, mean, log_sigma, seed_offset=seed_offset)
        contiguous = reparameterize_kl_backward(dz.contiguous(), dkl.contiguous(), mean.contiguous(),
                                                log_sigma.contiguous(), seed_offset=seed_offset)
        assert all(torch.equal(a, b) for a, b in zip(strided, contiguous, strict=True)), name


def _interpreter_runs_here() -> bool:
    """Triton 3.6's interpreter (torch 2.11's Triton) takes a loop bound as int() of a 1-element array, which
    NumPy >= 2.4 refuses; Triton >= 3.7 does not."""
    import numpy as np
    import triton

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return version >= (3, 7) or tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRET, reason="this is the interpreter run")
@pytest.mark.skipif(not _interpreter_runs_here(), reason="Triton < 3.7's interpreter fails on NumPy >= 2.4")
def test_interpreter_runs_the_triton_kernel_tests() -> None:
    """Reruns the test_triton_* tests on the CPU with TRITON_INTERPRET=1 set before anything imports triton."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_triton_"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[1], capture_output=True,
        text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"TRITON_INTERPRET=1 subprocess: {summary} ({time.perf_counter() - start:.0f} s with startup)")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary


# ---- The PyTorch implementation and the registered ops on the CPU ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, z_dim", [(1, 1), (7, 20), (1024, 33)], ids=str)
def test_cpu_op_forward_and_autograd_match_reference(batch: int, z_dim: int, dtype: torch.dtype) -> None:
    mean, log_sigma, eps, dz, dkl = _inputs(batch, z_dim, dtype, "cpu")
    mean.requires_grad_(True)
    log_sigma.requires_grad_(True)
    z, kl = OPS.reparameterize_kl(mean, log_sigma, eps)
    torch.autograd.backward((z, kl), (dz, dkl))
    expected, terms = _reference(mean.detach(), log_sigma.detach(), eps, dz, dkl)
    for actual, want, scale in zip((z, kl, mean.grad, log_sigma.grad), expected, terms, strict=True):
        assert _error(actual.detach(), want, scale) <= TOLERANCES[dtype]
    twin = reparameterize_kl_torch(mean, log_sigma, eps)
    assert torch.equal(twin[0], z) and torch.equal(twin[1], kl)


def test_cpu_ops_gradcheck_float64() -> None:
    mean = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    log_sigma = (0.5 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_(True)
    eps = torch.randn(3, 5, dtype=torch.float64)
    seed_offset = torch.tensor([3, 15])
    assert torch.autograd.gradcheck(lambda m, s: OPS.reparameterize_kl(m, s, eps), (mean, log_sigma))
    assert torch.autograd.gradcheck(lambda m, s: OPS.reparameterize_kl_sampled(m, s, seed_offset), (mean, log_sigma))


def _opcheck_cases(device: str) -> list[tuple[object, tuple[torch.Tensor, ...]]]:
    mean, log_sigma, eps, dz, dkl = (t.contiguous() for t in _inputs(7, 33, torch.float32, device))
    seed_offset = torch.tensor([1, 2], device=device)
    grad = [t.clone().requires_grad_(True) for t in (mean, log_sigma)]
    return [
        (OPS.reparameterize_kl.default, (*grad, eps)),
        (OPS.reparameterize_kl_sampled.default, (*grad, seed_offset)),
        (OPS.reparameterize_kl_backward.default, (dz, dkl, mean, log_sigma, eps)),
        (OPS.reparameterize_kl_sampled_backward.default, (dz, dkl, mean, log_sigma, seed_offset)),
    ]


def test_opcheck_cpu() -> None:
    """Schema, autograd registration and the fake (meta) kernel. test_aot_dispatch_dynamic is left out: it
    traces the op as torch.compile does, which decomposes a triton_op into its Triton kernels, and those have
    no CPU backend ('0 active drivers'); the dispatch never sends CPU tensors there (test_cuda_opcheck runs it)."""
    for op, args in _opcheck_cases("cpu"):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_cpu_sampled_path_is_deterministic_and_equals_the_dispatch() -> None:
    mean, log_sigma, _, _, _ = _inputs(7, 20, torch.float32, "cpu")
    pair = torch.tensor([9, 140])
    z, kl = OPS.reparameterize_kl_sampled(mean, log_sigma, pair)
    assert torch.equal(z, OPS.reparameterize_kl_sampled(mean, log_sigma, pair.clone())[0])
    assert not torch.equal(z, OPS.reparameterize_kl_sampled(mean, log_sigma, torch.tensor([9, 280]))[0])
    assert torch.equal(z, reparameterize_kl_sampled(mean, log_sigma, pair, kernel="torch")[0])
    assert torch.equal(z, reparameterize_kl_torch(mean, log_sigma, sample_eps_torch(pair, mean.shape))[0])


def test_cpu_stride0_gradient_through_the_op() -> None:
    mean, log_sigma, eps, _, _ = _inputs(7, 33, torch.float32, "cpu")
    pairs = []
    for explicit in (False, True):
        m, s = mean.detach().requires_grad_(True), log_sigma.detach().requires_grad_(True)
        z, kl = OPS.reparameterize_kl(m, s, eps)
        if explicit:
            torch.autograd.backward((z, kl), (torch.ones_like(z), torch.ones_like(kl)))
        else:
            (z.sum() + kl.sum()).backward()
        pairs.append((m.grad, s.grad))
    assert all(torch.equal(a, b) for a, b in zip(*pairs, strict=True))


@pytest.mark.slow
def test_cpu_compile_takes_the_formula() -> None:
    """A triton_op inside torch.compile on CPU tensors fails, so a CPU plan's kernel is the formula."""
    mean, log_sigma, eps, _, _ = _inputs(7, 20, torch.float32, "cpu")
    kernel = make_plan(TrainConfig(device="cpu")).kernel
    compiled = torch.compile(lambda m, s, e: reparameterize_kl(m, s, e, kernel=kernel), fullgraph=True,
                             backend="aot_eager")
    for actual, want in zip(compiled(mean, log_sigma, eps), reparameterize_kl_torch(mean, log_sigma, eps),
                            strict=True):
        torch.testing.assert_close(actual, want)


def test_model_draws_eps_from_seed_offset() -> None:
    model = VAE().eval()
    images = torch.rand(4, 1, 28, 28)
    pair = torch.tensor([1, 0])
    with torch.no_grad():
        sampled = model(images, seed_offset=pair)
        given = model(images, sample_eps_torch(pair, (4, model.z_dim)))
    assert all(torch.equal(a, b) for a, b in zip(sampled, given, strict=True))


# ---- Training with --kernel ----


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data), "--batch-size", "32", "--limit-train", "64", "--epochs", "1",
            "--z-dim", "8", "--out", str(out), "--no-progress", *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message; this machine has a GPU")
def test_train_kernel_triton_without_gpu_is_one_clear_line(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_train_args(tiny_data_dir, tmp_path / "run", "--kernel", "triton")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--kernel triton" in err and ("CUDA" in err or "Triton is not installed" in err), err
    assert not (tmp_path / "run" / "run.json").exists()


def test_train_records_the_kernel(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train_args(tiny_data_dir, tmp_path / "run", "--kernel", "torch")) == 0
    assert "kernel: torch (asked for)" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (record["plan"]["kernel"], record["plan"]["reasons"]["kernel"], record["train_config"]["kernel"]) == (
        "torch", "asked for", "torch")


# ---- CUDA: real launches, torch.compile ----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_autograd_matches_reference(dtype: torch.dtype) -> None:
    mean, log_sigma, eps, _, _ = _inputs(1024, 33, dtype, "cuda")
    mean.requires_grad_(True)
    log_sigma.requires_grad_(True)
    z, kl = reparameterize_kl(mean, log_sigma, eps, kernel="triton")
    (z.sum() + kl.sum()).backward()  # stride-0 gradients
    ones = torch.ones_like(z), torch.ones_like(kl)
    expected, terms = _reference(mean.detach(), log_sigma.detach(), eps, *ones)
    for actual, want, scale in zip((z, kl, mean.grad, log_sigma.grad), expected, terms, strict=True):
        assert _error(actual.detach(), want, scale) <= TOLERANCES[dtype]


@pytest.mark.cuda
def test_cuda_opcheck() -> None:
    for op, args in _opcheck_cases("cuda"):
        torch.library.opcheck(op, args)


@pytest.mark.slow
@pytest.mark.cuda
def test_cuda_compile_traces_into_the_kernel_without_recompiling() -> None:
    mean, log_sigma, _, _, _ = _inputs(1024, 32, torch.bfloat16, "cuda")
    mean.requires_grad_(True)

    def step(m: torch.Tensor, s: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        z, kl = reparameterize_kl_sampled(m, s, pair, kernel="triton")
        return z.float().square().sum() + kl.sum()

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: a graph break is an error
    for offset in (0, 1024 * 32):  # a new offset is a new tensor value, not a new graph
        pair = torch.tensor([7, offset], device="cuda")
        with torch._dynamo.config.patch(error_on_recompile=True):
            loss = compiled(mean, log_sigma, pair)
        (grad,) = torch.autograd.grad(loss, mean)
        eager_loss = step(mean, log_sigma, pair)
        (eager_grad,) = torch.autograd.grad(eager_loss, mean)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)  # sums may be ordered differently
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.cuda
def test_cuda_train_with_the_triton_kernel(tiny_data_dir: Path, tmp_path: Path) -> None:
    assert main(_train_args(tiny_data_dir, tmp_path / "run", "--device", "cuda", "--kernel", "triton")) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["plan"]["kernel"] == "triton" and math.isfinite(record["epochs"][-1]["test_neg_elbo"])
