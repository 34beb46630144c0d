"""`make gpu-check`: on a machine with a CUDA GPU, in one command, the CUDA tests, a short real run and the GPU
benchmarks, within a time budget it watches itself; writes results.md and results.json to --out."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastvae.config import ModelConfig, TrainConfig
from fastvae.data import FASHION_MNIST_DIR, load_images, to_float
from fastvae.flops import forward_flops, train_step_flops
from fastvae.kernels import reparameterize_kl_sampled, reparameterize_kl_sampled_compiled
from fastvae.model import VAE
from fastvae.plan import make_plan
from fastvae.reference import VAE as ReferenceVAE
from fastvae.step import build_step

# NOTE: the test -ELBO after 2 epochs of the default run on Fashion-MNIST (`fastvae train --epochs 2`, CPU, fp32,
# 2-core AMD EPYC): 267.49. A GPU run computes the same function with other rounding and eps numbers (Philox) and
# bf16: within 2% is the same training.
CPU_TWO_EPOCH_NEG_ELBO = 267.49
BUDGET_S = 360

# (name, TrainConfig options) of the training-step paths, each fp32 and --amp. Every path timed here is built from a
# run plan (fastvae.plan), as `fastvae train` runs it.
TRAIN_PATHS = {
    "reference-eager": {"model": "reference"},
    "fastvae-eager": {},
    "fastvae-compile": {"compile": True, "compile_mode": "default"},
    "fastvae-compile-cuda-graph": {"compile": True, "compile_mode": "reduce-overhead"},
}


@dataclass
class Sizes:
    train_batch: int
    reparameterize_elements: list[int]  # B * Z
    decoder_batches: list[int]
    timed_steps: int


GPU_SIZES = Sizes(1024, [2**k for k in (15, 18, 21, 24)], [1, 1024, 65536], 50)
# --device cpu: the same code at tiny sizes with the CUDA parts skipped, so the check cannot rot
# (tests/test_gpu_check.py).
CPU_SIZES = Sizes(32, [2**10, 2**12], [1, 8], 3)


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    budget_s: float = BUDGET_S
    facts: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def run(self, name: str, need_s: float, section: Callable[[], Any]) -> None:
        """Run `section` if `need_s` seconds are left, record its result, or a note saying why not."""
        if self.left_s() < need_s:
            self.skipped.append(f"{name}: skipped, {self.left_s():.0f} s left of the budget and it needs ~{need_s:.0f}")
            return
        start = time.monotonic()
        try:
            self.sections[name] = {"result": section(), "seconds": round(time.monotonic() - start, 1)}
        except Exception as e:  # a broken section is a finding of the check, not the end of it
            self.sections[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(f"{name}: {json.dumps(self.sections[name])[:300]}", flush=True)


def _median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median time of `fn` in ms: CUDA events on a GPU (no host sync inside the timed calls), the clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> dict[str, Any]:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
             "cpu_count": os.cpu_count()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
        big = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
        ms = _median_ms(lambda: big.clone(), device, repeats=5)
        facts["copy_gb_s"] = round(2 * big.numel() * 4 / ms / 1e6, 1)  # bytes read + written
    return facts


def cuda_tests(device: torch.device, root: Path) -> dict[str, Any]:
    if device.type != "cuda":
        return {"note": "skipped: needs a CUDA GPU"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=root, capture_output=True, text=True, timeout=240)
    tail = result.stdout.strip().splitlines()[-15:]
    return {"exit_code": result.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def short_run(device: torch.device, data_dir: Path | None, out: Path, quick: bool) -> dict[str, Any]:
    from fastvae.cli import main

    run = out / "run"
    argv = ["train", "--epochs", "1" if quick else "2", "--no-progress", "--out", str(run), "--device", device.type]
    argv += ["--data-dir", str(data_dir)] if data_dir else []
    argv += ["--batch-size", "32", "--limit-train", "64"] if quick else ["--compile", "--amp"]
    code = main(argv)
    record = json.loads((run / "run.json").read_text()) if code == 0 else {}
    epochs = record.get("epochs", [])
    result = {"exit_code": code, "epochs": epochs, "plan": record.get("plan")}
    if epochs and not quick:
        last = epochs[-1]["test_neg_elbo"]
        result["neg_elbo_vs_cpu"] = round(last / CPU_TWO_EPOCH_NEG_ELBO - 1, 4)
        result["ok"] = math.isfinite(epochs[-1]["train_loss"]) and abs(result["neg_elbo_vs_cpu"]) < 0.02
    return result


def train_steps(device: torch.device, data_dir: Path | None, sizes: Sizes) -> dict[str, Any]:
    images = to_float(load_images("fashion-mnist", "train", data_dir)[: sizes.train_batch]).to(device)
    seed_offset = torch.tensor([0, 0], device=device)
    results = {}
    for name, options in TRAIN_PATHS.items():
        for amp in (False, True):
            if amp and options.get("model") == "reference":
                continue  # the lab's Sigmoid + BCELoss is unsafe under autocast
            if options.get("compile") and device.type != "cuda":
                results[f"{name}{'-amp' if amp else ''}"] = {"note": "skipped: compiles only on the GPU check"}
                continue
            plan = make_plan(TrainConfig(device=device.type, amp=amp, **options))
            step = build_step(plan, ModelConfig(), lr=2e-3, beta=1.0, seed=0)
            start = time.perf_counter()
            step(images, seed_offset)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            ms = _median_ms(lambda step=step: step(images, seed_offset), device, sizes.timed_steps)
            results[f"{name}{'-amp' if amp else ''}"] = {
                "ms": round(ms, 3), "images_per_s": round(sizes.train_batch / ms * 1e3),
                "gflops": round(train_step_flops() * sizes.train_batch / ms / 1e6, 1),
                "first_step_s": round(first_s, 2), "cuda_graph": plan.cuda_graph, "layers": plan.layers,
                "kernel": plan.kernel,
            }
    base = results.get("reference-eager", {}).get("ms")
    for row in results.values():
        if base and "ms" in row:
            row["ratio_vs_lab"] = round(base / row["ms"], 2)
    return results


def reparameterize_kl_op(device: torch.device, sizes: Sizes, bandwidth_gb_s: float | None) -> dict[str, Any]:
    return {f"B*Z=2^{int(math.log2(n))}": _reparameterize_row(device, n, sizes, bandwidth_gb_s)
            for n in sizes.reparameterize_elements}


def _reparameterize_row(device: torch.device, elements: int, sizes: Sizes,
                        bandwidth_gb_s: float | None) -> dict[str, Any]:
    """Forward + backward of each reparameterize + KL path on B * Z = `elements` (Z = 32), fp32."""
    from torch.distributions.kl import kl_divergence
    from torch.distributions.normal import Normal

    z_dim = 32
    batch = elements // z_dim
    mean = torch.randn(batch, z_dim, device=device, requires_grad=True)
    log_sigma = torch.randn(batch, z_dim, device=device, requires_grad=True)
    seed_offset = torch.tensor([1, 0], device=device)
    paths: dict[str, Callable[[], Any]] = {
        "torch.distributions": lambda: _lab_reparameterize(mean, log_sigma, Normal, kl_divergence),
        "compiled formula": lambda: reparameterize_kl_sampled_compiled(mean, log_sigma, seed_offset),
    }
    if device.type == "cuda":
        paths["triton"] = lambda: reparameterize_kl_sampled(mean, log_sigma, seed_offset, "triton")
    # Bytes the fused op must move: forward reads mean, log_sigma, writes z, KL; backward reads dz, dKL,
    # mean, log_sigma, writes both gradients (fp32); eps is drawn, never stored.
    moved = 4 * (2 * elements + elements + batch) + 4 * (3 * elements + batch + 2 * elements)
    row = {}
    for name, forward in paths.items():
        def full(forward: Callable[[], Any] = forward) -> None:
            z, kl = forward()
            torch.autograd.grad((z.sum() + kl.sum()), (mean, log_sigma))

        ms = _median_ms(full, device, repeats=sizes.timed_steps)
        row[name] = {"ms": round(ms, 4), "gb_s": round(moved / ms / 1e6, 1)}
        if bandwidth_gb_s:
            row[name]["of_bandwidth"] = round(moved / ms / 1e6 / bandwidth_gb_s, 3)
    return row


def _lab_reparameterize(mean: torch.Tensor, log_sigma: torch.Tensor, normal: type, kl: Callable) -> tuple:
    q = normal(mean, log_sigma.exp())
    return q.rsample(), kl(q, normal(torch.zeros_like(mean), torch.ones_like(mean))).sum(-1)


def decoder_inference(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    config = ModelConfig()
    plan = make_plan(TrainConfig(device=device.type))
    fast = VAE(config, plan.layers, plan.kernel).to(device).eval()
    lab = ReferenceVAE(config).to(device).eval()
    fast.load_state_dict(lab.state_dict())
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"reference eager": lab.decode,
                                                                "fastvae eager": fast.decode}
    if device.type == "cuda":
        paths["fastvae compiled"] = torch.compile(fast.decode)
        paths["fastvae compiled, CUDA graphs"] = torch.compile(fast.decode, mode="reduce-overhead")

        def bf16(z: torch.Tensor, decode: Callable = paths["fastvae compiled, CUDA graphs"]) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return decode(z)

        paths["fastvae compiled, CUDA graphs, bf16"] = bf16
    with torch.inference_mode():
        return {f"batch {batch}": _decoder_row(paths, torch.randn(batch, config.z_dim, device=device), sizes)
                for batch in sizes.decoder_batches}


def _decoder_row(paths: dict[str, Callable[[torch.Tensor], torch.Tensor]], z: torch.Tensor,
                 sizes: Sizes) -> dict[str, Any]:
    row = {}
    for name, decode in paths.items():
        ms = _median_ms(lambda decode=decode: decode(z), z.device, repeats=sizes.timed_steps)
        row[name] = {"ms": round(ms, 4), "images_per_s": round(len(z) / ms * 1e3),
                     "gflops": round(forward_flops()["decoder"] * len(z) / ms / 1e6, 1)}
    return row


def markdown(report: Report) -> str:
    lines = [f"# fastvae GPU check ({report.facts.get('gpu') or report.facts['device']})", "",
             "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.facts.items()]
    for name, section in report.sections.items():
        lines += ["", f"## {name}", ""]
        result = section.get("result")
        if isinstance(result, dict) and result and all(isinstance(v, dict) for v in result.values()):
            columns = sorted({k for v in result.values() for k in v})
            lines += ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            lines += [f"| {row} | " + " | ".join(_cell(v.get(c)) for c in columns) + " |" for row, v in result.items()]
        else:
            lines += ["```", json.dumps(section, indent=1)[:4000], "```"]
    if report.skipped:
        lines += ["", "## skipped", "", *[f"- {note}" for note in report.skipped]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))
    parser.add_argument("--data-dir", default=os.environ.get("FASTVAE_DATA_DIR"),
                        help=f"folder with Fashion-MNIST's four IDX .gz files (default: {FASHION_MNIST_DIR})")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to PyTorch; run with --device cpu for the CPU mode", file=sys.stderr)
        return 2
    quick = device.type == "cpu"
    sizes = CPU_SIZES if quick else GPU_SIZES
    out, data_dir = Path(args.out), Path(args.data_dir) if args.data_dir else None
    out.mkdir(parents=True, exist_ok=True)
    report = Report(budget_s=args.budget_s)
    report.facts = environment(device)
    report.facts["onnxruntime CUDA provider"] = "not tested: onnxruntime-gpu is not installed on this machine" \
        if "CUDAExecutionProvider" not in _onnxruntime_providers() else "available"
    root = Path(__file__).resolve().parents[1]
    report.run("CUDA tests", 60, lambda: cuda_tests(device, root))
    report.run("2-epoch run (--compile --amp)", 60, lambda: short_run(device, data_dir, out, quick))
    report.run("training step", 60, lambda: train_steps(device, data_dir, sizes))
    report.run("reparameterize + KL (forward + backward)", 20,
               lambda: reparameterize_kl_op(device, sizes, report.facts.get("copy_gb_s")))
    report.run("decoder inference", 30, lambda: decoder_inference(device, sizes))
    report.facts["seconds"] = round(time.monotonic() - report.started, 1)
    (out / "results.json").write_text(json.dumps({"facts": report.facts, "sections": report.sections,
                                                  "skipped": report.skipped}, indent=1))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    failed = [name for name, section in report.sections.items() if "error" in section]
    return 1 if failed else 0


def _onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


if __name__ == "__main__":
    sys.exit(main())
