"""Reparameterize + KL to N(0, I) in one Triton kernel a pass: z = mean + exp(log_sigma) * eps, and KL per row.
Needs Triton: the package imports it only through fastvae.kernels.load_triton_kernels. The PyTorch twin is
reparameterize_kl_torch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from fastvae.kernels.reparameterize_kl_torch import (
    reparameterize_kl_backward_torch,
    reparameterize_kl_torch,
    sample_eps_torch,
)

# Elements one program handles: BLOCK_B rows x BLOCK_Z columns, 4 per thread with 8 warps.
# NOTE: sm_90 AOT build, SASS instructions in the loop body per element (a count, not a GPU timing), fp32,
# Z = 32, pointers, Z and strides multiples of 16 as a launch specializes them: 82.5 forward and 88 backward when
# offset and Z are multiples of 4 (one Philox call per 4 normals), 138 and 143 otherwise (two per 4), against 136
# and 138.5 for tl.randn's call per normal; 45-48 registers a thread with 8 warps (tl.randn: 47-48).
# tests/test_kernel_aot.py prints the registers of every variant.
_TILE = 1024
NUM_WARPS = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launcher(kernel: triton.JITFunction | InterpretedFunction) -> object:
    """wrap_triton(kernel), except under TRITON_INTERPRET=1, where @triton.jit gives an InterpretedFunction that
    runs eagerly as it is: torch >= 2.13's wrap_triton passes it through, 2.11's and 2.12's raise."""
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)


@triton.jit
def _philox_words(seed, counter):
    """Philox4x32-10's 4 uint32 words for int64 counters (>= 0, any shape): the counter's low and high words
    are c0 and c1 (c2 = c3 = 0), the int64 seed's low and high words the key."""
    low = counter.to(tl.uint32)
    zero = low * 0
    return tl.philox(seed, low, (counter >> 32).to(tl.uint32), zero, zero)


@triton.jit
def _group_normals(seed, counters):
    """The 4 normals (lanes 0-3) of the Philox calls at int64 counters: two Box-Muller pairs, lanes 0-1, 2-3."""
    w0, w1, w2, w3 = _philox_words(seed, counters)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    return n0, n1, n2, n3


@triton.jit
def _columns(l0, l1, l2, l3, BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr):
    """(BLOCK_B, BLOCK_Z) tile whose column 4j + k is lk[:, j], from four (BLOCK_B, BLOCK_Z // 4) tiles."""
    # A trailing (2, 2) axis [p, q] holding l(2p + q) flattens into column 4j + 2p + q.
    return tl.reshape(tl.join(tl.join(l0, l2), tl.join(l1, l3)), (BLOCK_B, BLOCK_Z))


@triton.jit
def _eps_grouped(seed, first, BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr):
    """_philox_eps where every first[i] is a multiple of 4: columns 4j..4j+3 are the 4 lanes of one call."""
    counters = (first >> 2)[:, None] + tl.arange(0, BLOCK_Z // 4)[None, :]  # (BLOCK_B, BLOCK_Z // 4)
    n0, n1, n2, n3 = _group_normals(seed, counters)
    return _columns(n0, n1, n2, n3, BLOCK_B, BLOCK_Z)


@triton.jit
def _eps_straddling(seed, first, BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr):
    """_philox_eps for any first: with s = first % 4, columns 4j..4j+3 are lanes s.. of call first // 4 + j
    followed by lanes ..s-1 of the next call, so two calls per 4 columns."""
    counters = (first >> 2)[:, None] + tl.arange(0, BLOCK_Z // 4)[None, :]  # (BLOCK_B, BLOCK_Z // 4)
    a0, a1, a2, a3 = _group_normals(seed, counters)
    b0, b1, b2, b3 = _group_normals(seed, counters + 1)
    s = (first % 4)[:, None]  # (BLOCK_B, 1)
    # Column 4j + k is normal s + k of the 8 lanes a0..a3, b0..b3.
    l0 = tl.where(s == 0, a0, tl.where(s == 1, a1, tl.where(s == 2, a2, a3)))
    l1 = tl.where(s == 0, a1, tl.where(s == 1, a2, tl.where(s == 2, a3, b0)))
    l2 = tl.where(s == 0, a2, tl.where(s == 1, a3, tl.where(s == 2, b0, b1)))
    l3 = tl.where(s == 0, a3, tl.where(s == 1, b0, tl.where(s == 2, b1, b2)))
    return _columns(l0, l1, l2, l3, BLOCK_B, BLOCK_Z)


@triton.jit
def _philox_eps(seed, first, grouped, BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr):
    """eps (BLOCK_B, BLOCK_Z) fp32: eps[i, c] is normal number first[i] + c; first (BLOCK_B,) int64.

    Normal n is lane n % 4 of the 4 normals of Philox call n // 4. grouped (a runtime flag: every first[i] a
    multiple of 4) takes one call per 4 columns, otherwise two. The calls form a (BLOCK_B, BLOCK_Z // 4) tile
    whose lanes are joined into columns, so a thread's 4 contiguous columns come from its own call(s): the
    loads, stores and eps share one layout, with no shuffle through shared memory."""
    tl.static_assert(BLOCK_Z % 4 == 0)
    if grouped:
        eps = _eps_grouped(seed, first, BLOCK_B, BLOCK_Z)
    else:
        eps = _eps_straddling(seed, first, BLOCK_B, BLOCK_Z)
    return eps


@triton.jit
def _reparameterize_kl_forward_kernel(
    mean_ptr,  # (B, Z), rows stride_mean apart, columns contiguous; fp32, bf16 or fp16
    log_sigma_ptr,  # (B, Z), rows stride_log_sigma apart, columns contiguous; mean's dtype
    eps_ptr,  # (B, Z) fp32 contiguous; read only when EPS_IN_MEMORY
    seed_offset_ptr,  # (2,) int64 [seed, offset]; read only when not EPS_IN_MEMORY
    z_ptr,  # (B, Z) contiguous, mean's dtype: output
    kl_ptr,  # (B,) fp32: output
    B,
    Z,
    stride_mean,
    stride_log_sigma,
    BLOCK_B: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    EPS_IN_MEMORY: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # int64: B * Z may pass 2**31
    row_mask = rows < B
    if not EPS_IN_MEMORY:
        seed = tl.load(seed_offset_ptr)
        offset = tl.load(seed_offset_ptr + 1)
        # BLOCK_Z is a multiple of 4, so every block of a row starts a Philox group when Z and offset do.
        grouped = (Z % 4 == 0) & (offset % 4 == 0)
    kl = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for start in range(0, Z, BLOCK_Z):
        cols = start + tl.arange(0, BLOCK_Z)
        mask = row_mask[:, None] & (cols < Z)[None, :]
        # Masked lanes load mean = log_sigma = 0, whose KL term 1/2 (1 + 0 - 1) - 0 is 0: no tl.where needed.
        mean = tl.load(mean_ptr + rows[:, None] * stride_mean + cols[None, :], mask=mask, other=0.0)
        log_sigma = tl.load(log_sigma_ptr + rows[:, None] * stride_log_sigma + cols[None, :], mask=mask, other=0.0)
        mean = mean.to(tl.float32)
        log_sigma = log_sigma.to(tl.float32)
        index = rows[:, None] * Z + cols[None, :]  # (BLOCK_B, BLOCK_Z) int64
        if EPS_IN_MEMORY:
            eps = tl.load(eps_ptr + index, mask=mask, other=0.0)
        else:
            # Normal number offset + element index under seed: the backward kernel draws the same eps again,
            # so eps is never written to memory.
            eps = _philox_eps(seed, offset + rows * Z + start, grouped, BLOCK_B, BLOCK_Z)
        sigma = tl.exp(log_sigma)
        tl.store(z_ptr + index, (mean + sigma * eps).to(z_ptr.dtype.element_ty), mask=mask)
        kl += tl.sum(0.5 * (sigma * sigma + mean * mean - 1.0) - log_sigma, axis=1)
    tl.store(kl_ptr + rows, kl, mask=row_mask)


@triton.jit
def _reparameterize_kl_backward_kernel(
    dz_ptr,  # (B, Z) contiguous, mean's dtype: gradient of z
    dkl_ptr,  # (B,) fp32 contiguous: gradient of KL
    mean_ptr,  # (B, Z), rows stride_mean apart, columns contiguous
    log_sigma_ptr,  # (B, Z), rows stride_log_sigma apart, columns contiguous
    eps_ptr,  # (B, Z) fp32 contiguous; read only when EPS_IN_MEMORY
    seed_offset_ptr,  # (2,) int64 [seed, offset], the forward's; read only when not EPS_IN_MEMORY
    dmean_ptr,  # (B, Z) contiguous, mean's dtype: output
    dlog_sigma_ptr,  # (B, Z) contiguous, mean's dtype: output
    B,
    Z,
    stride_mean,
    stride_log_sigma,
    BLOCK_B: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    EPS_IN_MEMORY: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if not EPS_IN_MEMORY:
        seed = tl.load(seed_offset_ptr)
        offset = tl.load(seed_offset_ptr + 1)
        grouped = (Z % 4 == 0) & (offset % 4 == 0)
    dkl = tl.load(dkl_ptr + rows, mask=row_mask, other=0.0)[:, None]  # (BLOCK_B, 1)
    for start in range(0, Z, BLOCK_Z):
        cols = start + tl.arange(0, BLOCK_Z)
        mask = row_mask[:, None] & (cols < Z)[None, :]
        mean = tl.load(mean_ptr + rows[:, None] * stride_mean + cols[None, :], mask=mask, other=0.0)
        log_sigma = tl.load(log_sigma_ptr + rows[:, None] * stride_log_sigma + cols[None, :], mask=mask, other=0.0)
        mean = mean.to(tl.float32)
        log_sigma = log_sigma.to(tl.float32)
        index = rows[:, None] * Z + cols[None, :]
        dz = tl.load(dz_ptr + index, mask=mask, other=0.0).to(tl.float32)
        if EPS_IN_MEMORY:
            eps = tl.load(eps_ptr + index, mask=mask, other=0.0)
        else:
            eps = _philox_eps(seed, offset + rows * Z + start, grouped, BLOCK_B, BLOCK_Z)  # the forward's eps
        sigma = tl.exp(log_sigma)
        # d/dmean [z, KL] = [1, mean]; d/dlog_sigma [z, KL] = [eps * sigma, sigma^2 - 1].
        dmean = dz + dkl * mean
        dlog_sigma = dz * eps * sigma + dkl * (sigma * sigma - 1.0)
        tl.store(dmean_ptr + index, dmean.to(dmean_ptr.dtype.element_ty), mask=mask)
        tl.store(dlog_sigma_ptr + index, dlog_sigma.to(dlog_sigma_ptr.dtype.element_ty), mask=mask)


def block_sizes(z_dim: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_Z) for rows of z_dim: columns in blocks of 32, 64 or 128 (longer rows loop)."""
    # Comparisons rather than next_power_of_2's bit tricks: z_dim is a SymInt when traced with dynamic shapes.
    block_z = 32 if z_dim <= 32 else 64 if z_dim <= 64 else 128
    return _TILE // block_z, block_z


def _check_inputs(mean: torch.Tensor, log_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if mean.dim() != 2 or mean.shape != log_sigma.shape:
        raise ValueError(f"mean and log_sigma must both be (B, Z), got {tuple(mean.shape)}, {tuple(log_sigma.shape)}")
    if mean.dtype != log_sigma.dtype or mean.dtype not in _DTYPES:
        raise ValueError(f"mean and log_sigma must share a dtype among fp32, bf16, fp16; got {mean.dtype}, "
                         f"{log_sigma.dtype}")
    # Rows may be apart (the encoder's output halves are column slices); columns must be contiguous.
    return tuple(t if t.stride(1) == 1 else t.contiguous() for t in (mean, log_sigma))


def _eps_or_seed_offset(
    mean: torch.Tensor, eps: torch.Tensor | None, seed_offset: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_ptr, seed_offset_ptr) arguments; the one a variant does not read gets a tensor already at hand."""
    if (eps is None) == (seed_offset is None):
        raise ValueError("pass exactly one of eps and seed_offset")
    if eps is not None:
        if eps.shape != mean.shape:
            raise ValueError(f"eps must be {tuple(mean.shape)}, got {tuple(eps.shape)}")
        eps = eps.float().contiguous()
        return eps, eps
    if seed_offset.shape != (2,) or seed_offset.dtype != torch.int64 or seed_offset.device != mean.device:
        raise ValueError(f"seed_offset must be an int64 tensor [seed, offset] on {mean.device}")
    return mean, seed_offset


def reparameterize_kl_forward(
    mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor | None = None,
    seed_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: z (B, Z) in mean's dtype and KL (B,) fp32; eps read from `eps` or drawn."""
    mean, log_sigma = _check_inputs(mean, log_sigma)
    eps_arg, seed_offset_arg = _eps_or_seed_offset(mean, eps, seed_offset)
    batch, z_dim = mean.shape
    z = torch.empty((batch, z_dim), dtype=mean.dtype, device=mean.device)
    kl = torch.empty((batch,), dtype=torch.float32, device=mean.device)
    block_b, block_z = block_sizes(z_dim)
    _launcher(_reparameterize_kl_forward_kernel)[(triton.cdiv(batch, block_b),)](
        mean, log_sigma, eps_arg, seed_offset_arg, z, kl, batch, z_dim, mean.stride(0), log_sigma.stride(0),
        BLOCK_B=block_b, BLOCK_Z=block_z, EPS_IN_MEMORY=eps is not None, num_warps=NUM_WARPS,
    )
    return z, kl


def reparameterize_kl_backward(
    dz: torch.Tensor, dkl: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor,
    eps: torch.Tensor | None = None, seed_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (d mean, d log_sigma), each (B, Z) in mean's dtype, in one pass."""
    mean, log_sigma = _check_inputs(mean, log_sigma)
    eps_arg, seed_offset_arg = _eps_or_seed_offset(mean, eps, seed_offset)
    if dz.shape != mean.shape or dkl.shape != mean.shape[:1]:
        raise ValueError(f"dz must be {tuple(mean.shape)} and dkl ({mean.shape[0]},)")
    # A gradient from z.sum() has stride 0 and the kernel does flat pointer arithmetic: copy such gradients.
    dz = dz.to(mean.dtype).contiguous()
    dkl = dkl.float().contiguous()
    batch, z_dim = mean.shape
    dmean = torch.empty((batch, z_dim), dtype=mean.dtype, device=mean.device)
    dlog_sigma = torch.empty((batch, z_dim), dtype=mean.dtype, device=mean.device)
    block_b, block_z = block_sizes(z_dim)
    _launcher(_reparameterize_kl_backward_kernel)[(triton.cdiv(batch, block_b),)](
        dz, dkl, mean, log_sigma, eps_arg, seed_offset_arg, dmean, dlog_sigma, batch, z_dim, mean.stride(0),
        log_sigma.stride(0), BLOCK_B=block_b, BLOCK_Z=block_z, EPS_IN_MEMORY=eps is not None, num_warps=NUM_WARPS,
    )
    return dmean, dlog_sigma


# The ops. On CUDA they run the kernels above (and torch.compile traces into them); on CPU they run the
# PyTorch formula registered below (eager only: inside torch.compile a triton_op is decomposed into its
# kernels, which have no CPU backend, so a CPU run's plan picks kernel "torch" and calls the formula, not the op).


@triton_op("fastvae::reparameterize_kl", mutates_args=())
def _eps_op(mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_forward(mean, log_sigma, eps=eps)


@triton_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _eps_backward_op(
    dz: torch.Tensor, dkl: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_backward(dz, dkl, mean, log_sigma, eps=eps)


@triton_op("fastvae::reparameterize_kl_sampled", mutates_args=())
def _sample_op(
    mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_forward(mean, log_sigma, seed_offset=seed_offset)


@triton_op("fastvae::reparameterize_kl_sampled_backward", mutates_args=())
def _sample_backward_op(
    dz: torch.Tensor, dkl: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_backward(dz, dkl, mean, log_sigma, seed_offset=seed_offset)


@_eps_op.register_kernel("cpu")
def _eps_cpu(mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_torch(mean, log_sigma, eps)


@_eps_backward_op.register_kernel("cpu")
def _eps_backward_cpu(
    dz: torch.Tensor, dkl: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_backward_torch(dz, dkl, mean, log_sigma, eps)


@_sample_op.register_kernel("cpu")
def _sample_cpu(
    mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_torch(mean, log_sigma, sample_eps_torch(seed_offset, mean.shape))


@_sample_backward_op.register_kernel("cpu")
def _sample_backward_cpu(
    dz: torch.Tensor, dkl: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_kl_backward_torch(dz, dkl, mean, log_sigma, sample_eps_torch(seed_offset, mean.shape))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs)  # (mean, log_sigma, eps or seed_offset)


def _eps_grads(ctx: torch.autograd.function.FunctionCtx, dz: torch.Tensor, dkl: torch.Tensor) -> tuple:
    dmean, dlog_sigma = torch.ops.fastvae.reparameterize_kl_backward(dz, dkl, *ctx.saved_tensors)
    return dmean, dlog_sigma, None  # eps is a sample, not a parameter


def _sample_grads(ctx: torch.autograd.function.FunctionCtx, dz: torch.Tensor, dkl: torch.Tensor) -> tuple:
    dmean, dlog_sigma = torch.ops.fastvae.reparameterize_kl_sampled_backward(dz, dkl, *ctx.saved_tensors)
    return dmean, dlog_sigma, None


_eps_op.register_autograd(_eps_grads, setup_context=_setup_context)
_sample_op.register_autograd(_sample_grads, setup_context=_setup_context)
