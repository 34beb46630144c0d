"""Ahead-of-time build of every Triton kernel variant for sm_80 and sm_90, without a GPU.

Each variant must give a cubin and must not spill; its registers and spills are printed (see them with -s).
Each is built twice: with no integer or pointer known to be a multiple of 16, and with all of them, as a launch
at Z = 32 specializes them (vectorized loads and stores, and fewer registers).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from itertools import product

import pytest
import torch

triton = pytest.importorskip("triton", reason="ahead-of-time compiling the kernels needs Triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastvae.kernels.reparameterize_kl_triton import (  # noqa: E402
    NUM_WARPS,
    _reparameterize_kl_backward_kernel,
    _reparameterize_kl_forward_kernel,
    block_sizes,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 makes the kernels interpreted functions"),
]

KERNELS = [_reparameterize_kl_forward_kernel, _reparameterize_kl_backward_kernel]
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Every (BLOCK_B, BLOCK_Z) the launchers pick: rows longer than 128 reuse the 128 block.
BLOCKS = sorted({block_sizes(z_dim) for z_dim in range(1, 257)})


def _signature(kernel: triton.JITFunction, dtype: torch.dtype, constexprs: dict[str, object]) -> dict[str, str]:
    """The argument types the launchers pass; a pointer a variant does not read is a tensor at hand."""
    ty = TYPES[dtype]
    eps_in_memory = constexprs["EPS_IN_MEMORY"]
    pointers = {"kl_ptr": "*fp32", "dkl_ptr": "*fp32", "eps_ptr": "*fp32" if eps_in_memory else f"*{ty}",
                "seed_offset_ptr": "*fp32" if eps_in_memory else "*i64"}
    return {
        name: "constexpr" if name in constexprs else pointers.get(name, f"*{ty}") if name.endswith("_ptr") else "i32"
        for name in kernel.arg_names
    }


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from Triton's own ptxas, with the flags Triton uses."""
    arch = re.search(r"^\.target (\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [triton.knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
             source, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return int(re.search(r"Used (\d+) registers", log).group(1)), int(stores), int(loads)


@pytest.mark.parametrize("divisible", [False, True], ids=lambda divisible: "by16" if divisible else "any")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("dtype", list(TYPES), ids=str)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.__name__.strip("_"))
def test_every_variant_builds_without_spills(
    kernel: triton.JITFunction, dtype: torch.dtype, arch: int, divisible: bool
) -> None:
    spilled = []
    for (block_b, block_z), eps_in_memory in product(BLOCKS, (False, True)):
        constexprs = {"BLOCK_B": block_b, "BLOCK_Z": block_z, "EPS_IN_MEMORY": eps_in_memory}
        signature = _signature(kernel, dtype, constexprs)
        # The hint Triton's launcher gives an int or pointer argument that is a multiple of 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if divisible and signature[name] != "constexpr"}
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS},
        )
        assert compiled.asm["cubin"][:4] == b"\x7fELF", "no cubin"
        registers, stores, loads = _ptxas_usage(compiled.asm["ptx"])
        variant = (f"{kernel.__name__} sm_{arch} {TYPES[dtype]} {constexprs} num_warps={NUM_WARPS}"
                   f"{' multiples of 16' if divisible else ''}")
        print(f"{variant}: {registers} registers, spills {stores} B stored / {loads} B loaded")
        if stores or loads:
            spilled.append(variant)
    assert not spilled, f"register spills in {spilled}"


class _Sm90:
    """Stands in for Triton's active GPU driver: torch.compile's analysis asks it only for the target."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


@pytest.mark.parametrize("eps_in_memory", [False, True], ids=["drawn", "given"])
@pytest.mark.parametrize("kernel, outputs", [(_reparameterize_kl_forward_kernel, {"z_ptr", "kl_ptr"}),
                                             (_reparameterize_kl_backward_kernel, {"dmean_ptr", "dlog_sigma_ptr"})],
                         ids=["forward", "backward"])
def test_compile_sees_exactly_the_outputs_written(kernel: triton.JITFunction, outputs: set[str],
                                                  eps_in_memory: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile reads a user kernel's Triton IR (its helpers' calls included) to learn which tensors it
    writes; were that to fail, it would assume every input is written and copy them all in the compiled step."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    monkeypatch.setattr(triton.runtime.driver, "_active", _Sm90())
    batch, z_dim = 8, 32
    block_b, block_z = block_sizes(z_dim)
    kwargs = {name: torch.empty(2, dtype=torch.int64) if name == "seed_offset_ptr" else torch.empty(batch, z_dim)
              for name in kernel.arg_names if name.endswith("_ptr")}
    kwargs.update(B=batch, Z=z_dim, stride_mean=2 * z_dim, stride_log_sigma=2 * z_dim, BLOCK_B=block_b,
                  BLOCK_Z=block_z, EPS_IN_MEMORY=eps_in_memory)
    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.13
        written = {dep.name for dep in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes}
    else:
        written = set(wrap.identify_mutated_tensors(kernel, kwargs, {}))
    assert written == outputs
