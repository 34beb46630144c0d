"""Training end to end on tiny data: outputs, exact resume, non-finite loss, evaluation bounds."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributions import Normal

from fastvae import reference
from fastvae import step as step_module
from fastvae import train as train_module
from fastvae.checkpoint import load_weights, save_checkpoint
from fastvae.cli import main
from fastvae.config import ModelConfig, TrainConfig
from fastvae.cuda_graph import WARMUP_STEPS, GraphedStep
from fastvae.data import load_images, to_float
from fastvae.evaluate import importance_weighted_bound, negative_elbo
from fastvae.kernels.counter_normal import counter_normal
from fastvae.kernels.reparameterize_kl_torch import reparameterize_kl_torch
from fastvae.model import VAE
from fastvae.plan import cpu_plan, make_plan
from fastvae.run_folder import new_record
from fastvae.step import make_loss_fn
from tests.helpers import TOLERANCES, folder_snapshot


def _train(data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data-dir", str(data_dir), "--batch-size", "32", "--limit-train", "128",
                 "--out", str(out), "--no-progress", *extra])


def test_train_writes_checkpoint_metrics_and_images(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data_dir, out, "--epochs", "2", "--z-dim", "8") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["epochs_done"] == 2 and [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["model_config"]["z_dim"] == 8
    assert all(e["test_neg_elbo"] > 0 and e["images_per_s"] > 0 for e in record["epochs"])
    config, state, epoch = load_weights(out)
    assert config.z_dim == 8 and epoch == 2 and "decode.gen.3.0.weight" in state
    assert Image.open(out / "recon.png").size == (16 * 30 + 2, 2 * 30 + 2)
    assert Image.open(out / "samples.png").size == (8 * 30 + 2, 8 * 30 + 2)
    assert not list(out.glob(".*.tmp")), "temp files left behind"


def test_resume_continues_exactly(tiny_data_dir: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_data_dir, straight, "--epochs", "4", "--seed", "3") == 0
    assert _train(tiny_data_dir, resumed, "--epochs", "2", "--seed", "3") == 0
    assert main(["train", "--resume", "--epochs", "4", "--out", str(resumed), "--data-dir", str(tiny_data_dir),
                 "--no-progress"]) == 0
    a, b = load_weights(straight)[1], load_weights(resumed)[1]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [json.loads((d / "run.json").read_text())["epochs"] for d in (straight, resumed)]
    assert [e["train_loss"] for e in losses[0]] == [e["train_loss"] for e in losses[1]]


def test_seed_changes_the_run(tiny_data_dir: Path, tmp_path: Path) -> None:
    for seed in ("1", "2"):
        assert _train(tiny_data_dir, tmp_path / seed, "--epochs", "1", "--seed", seed) == 0
    a, b = (load_weights(tmp_path / s)[1]["decode.gen.3.0.weight"] for s in ("1", "2"))
    assert not torch.equal(a, b)


def test_reference_model_trains_and_loads_into_fast(tiny_data_dir: Path, tmp_path: Path) -> None:
    assert _train(tiny_data_dir, tmp_path / "ref", "--epochs", "1", "--model", "reference") == 0
    config, state, _ = load_weights(tmp_path / "ref")
    VAE(config).load_state_dict(state)


@pytest.mark.slow
def test_reference_model_compiles(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--model reference --compile: dynamo cannot trace kl_divergence's dispatch, so a whole-graph compile
    raised a traceback; the lab's code compiles in pieces."""
    assert _train(tiny_data_dir, tmp_path / "ref", "--epochs", "1", "--model", "reference", "--compile") == 0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data_dir, out, "--epochs", "1") == 0
    before = folder_snapshot(out)
    real = step_module.make_loss_fn
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def loss(images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            value = loss_fn(images, eps)
            return value * float("nan") if calls["n"] == 3 else value

        return loss

    monkeypatch.setattr(step_module, "make_loss_fn", poisoned)
    assert main(["train", "--resume", "--epochs", "3", "--out", str(out), "--data-dir", str(tiny_data_dir),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 2, step 3" in err[0] and "epoch 1" in err[0]
    assert folder_snapshot(out) == before


def test_bounds_order_and_finiteness(tiny_data_dir: Path) -> None:
    model = VAE(ModelConfig(z_dim=4))
    images = load_images("mnist", "test", tiny_data_dir)[:6]
    elbo = negative_elbo(model, images, torch.Generator().manual_seed(0), batch_size=4)
    iwae_1 = importance_weighted_bound(model, images, 1, torch.Generator().manual_seed(0))
    iwae_64 = importance_weighted_bound(model, images, 64, torch.Generator().manual_seed(0), max_batch=50)
    assert 0 < iwae_64 <= iwae_1 + 1.0 and abs(iwae_1 - elbo) < 0.05 * elbo
    assert model.training, "evaluation must restore the training mode"


def test_iwae_matches_a_direct_computation(tiny_data_dir: Path) -> None:
    """One image per chunk and all k samples at once: eps for image i is the i-th (k, 1, Z) draw."""
    k, z_dim = 10, 4
    model = VAE(ModelConfig(z_dim=z_dim)).eval()
    images = load_images("mnist", "test", tiny_data_dir)[:3]
    bound = importance_weighted_bound(model, images, k, torch.Generator().manual_seed(5), max_batch=k)
    draws = torch.Generator().manual_seed(5)
    expected = []
    with torch.no_grad():
        for x in images.float() / 255:
            eps = torch.randn((k, 1, z_dim), generator=draws)[:, 0]
            mean, log_sigma = model.encode(x[None])
            q = Normal(mean, log_sigma.exp())
            z = mean + log_sigma.exp() * eps
            recon = torch.sigmoid(model.decode(z))
            log_px = -torch.nn.functional.binary_cross_entropy(recon, x.expand_as(recon), reduction="none")
            log_w = log_px.flatten(1).sum(1) + Normal(0.0, 1.0).log_prob(z).sum(1) - q.log_prob(z).sum(1)
            expected.append(-(torch.logsumexp(log_w, 0) - math.log(k)))
    assert bound == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_interrupt_during_save_waits_for_a_whole_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (torchrun stopping a job) or Ctrl-C mid-save is delivered only after the checkpoint is complete."""
    import os
    import signal

    from fastvae import run_folder

    seen: list[set[str]] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append({str(p.relative_to(tmp_path))
                                                                      for p in tmp_path.rglob("*")}))
    real_write = run_folder.atomic_write

    def write_then_interrupt(path, write):
        real_write(path, write)
        if path.name == run_folder.WEIGHTS:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_folder, "atomic_write", write_then_interrupt)
    try:
        record = new_record(ModelConfig(), TrainConfig(), cpu_plan(), epochs_done=1)
        save_checkpoint(tmp_path, VAE(), ModelConfig(), record, {"optimizer": {}})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [{"epoch-1", "epoch-1/model.safetensors", "epoch-1/optimizer.pt", "run.json"}]


def test_loss_fns_draw_eps_from_the_seed_offset_pair() -> None:
    """The fast model gets the [seed, offset] pair and draws eps with its kernel; the lab's model (which takes
    only an eps) gets counter_normal's (B, Z) draw from the same pair: the PyTorch kernel's numbers."""
    config, pair, images = ModelConfig(z_dim=4), torch.tensor([5, 64]), torch.rand(3, 1, 28, 28)
    seen: list[tuple[str, torch.Tensor | None]] = []

    class FastSpy(VAE):
        def forward(self, images, eps=None, seed_offset=None):
            seen.append(("fast", seed_offset))
            return super().forward(images, eps, seed_offset)

    class ReferenceSpy(reference.VAE):
        def forward(self, images, eps=None):
            seen.append(("reference", eps))
            return super().forward(images, eps)

    for kind, model in [("fast", FastSpy(config)), ("reference", ReferenceSpy(config))]:
        plan = make_plan(TrainConfig(device="cpu", model=kind))
        assert make_loss_fn(model, plan, 1.0)(images, pair).isfinite()
    eps = counter_normal(pair, (3, 4))
    assert [name for name, _ in seen] == ["fast", "reference"]
    assert seen[0][1] is pair and torch.equal(seen[1][1], eps)
    mean, log_sigma = torch.randn(3, 4), torch.randn(3, 4)
    for got, expected in zip(VAE(config).reparameterize(mean, log_sigma, seed_offset=pair),
                             reparameterize_kl_torch(mean, log_sigma, eps), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("steps, expected", [(1, [1]), (2, [1, 2]), (58, [1, 50, 58]), (100, [1, 50, 100]),
                                             (120, [1, 50, 100, 120])], ids=str)
def test_read_schedule(steps: int, expected: list[int]) -> None:
    assert train_module.read_schedule(steps) == expected


def test_a_graphed_epoch_first_reads_after_its_capture() -> None:
    """A whole-step graph's first epoch first reads after its warmup steps and capture, so its images/s is of
    replays; the time up to that read is reported apart, as a compile is."""
    graph = GraphedStep(lambda images: images)
    assert graph.steps_to_capture() == WARMUP_STEPS + 1 == 4
    assert train_module.read_schedule(58, graph.steps_to_capture()) == [4, 50, 58]
    assert train_module.read_schedule(3, graph.steps_to_capture()) == [3]


def test_an_epoch_reads_the_host_only_on_schedule(tiny_data_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A host read waits for the device: an epoch makes exactly the reads of its schedule, whatever its length."""
    reads: list[int] = []
    real = train_module.read_to_host
    monkeypatch.setattr(train_module, "READ_EVERY", 3)
    monkeypatch.setattr(train_module, "read_to_host", lambda values: reads.append(1) or real(values))
    assert _train(tiny_data_dir, tmp_path / "run", "--epochs", "2", "--batch-size", "16") == 0  # 8 steps an epoch
    assert len(reads) == 2 * len(train_module.read_schedule(8)) == 2 * 4


@pytest.mark.cuda
@pytest.mark.parametrize("graphed", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "graphed"])
def test_steps_between_reads_never_sync_the_gpu(tiny_data_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, graphed: bool) -> None:
    """CUDA's sync debug mode raises on any synchronizing call. It is on from the end of an epoch's first read
    to the epoch's end, except inside the loop's own reads: every step after the first is checked. Graphed, the
    one capture (which synchronizes, once a run) is let through too; its warmup steps and replays are checked."""
    real_read, real_epoch = train_module.read_to_host, train_module.Trainer.train_epoch
    real_call = GraphedStep.__call__

    def capture_may_sync(self: GraphedStep, images: torch.Tensor) -> torch.Tensor:
        if self.graph is not None or self.steps < WARMUP_STEPS:
            return real_call(self, images)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_call(self, images)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    def read_then_forbid_syncs(values: torch.Tensor) -> list[float]:
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_read(values)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def epoch(self, epoch: int) -> dict[str, float]:
        try:
            return real_epoch(self, epoch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train_module, "READ_EVERY", 4)
    monkeypatch.setattr(train_module, "read_to_host", read_then_forbid_syncs)
    monkeypatch.setattr(train_module.Trainer, "train_epoch", epoch)
    monkeypatch.setattr(GraphedStep, "__call__", capture_may_sync)
    graph = ["--compile", "--compile-mode", "reduce-overhead"] if graphed else []
    out = tmp_path / "run"
    assert _train(tiny_data_dir, out, "--epochs", "1", "--batch-size", "16", "--device", "cuda", *graph) == 0
    assert json.loads((out / "run.json").read_text())["plan"]["cuda_graph"] == graphed


@pytest.mark.parametrize("fused", [False, True], ids=["default-adam", "fused-adam"])
def test_fp16_scaler_skips_a_step_whose_gradients_overflow(fused: bool) -> None:
    """fp16's gradient scaler (CUDA GPUs without bf16) skips an update whose scaled gradients are inf and halves
    its scale. With the GPU plan's fused Adam the scaler hands its inf flag to the kernel (no host read), and the
    skipped step leaves Adam's step count alone. Checked with the CPU's scaler, the same class."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=fused or None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def loss_fn(images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        return (weight * images).sum()

    overflow = torch.full((3,), 1e35)  # x 2^16 is past fp32's largest
    step_module.train_step(loss_fn, overflow, torch.tensor([0, 0]), optimizer, scaler)
    assert torch.equal(weight.detach(), torch.ones(3)) and scaler.get_scale() == 2.0**15
    step_module.train_step(loss_fn, torch.ones(3), torch.tensor([0, 0]), optimizer, scaler)
    assert not torch.equal(weight.detach(), torch.ones(3)) and optimizer.state[weight]["step"].item() == 1


def test_resume_keeps_this_plans_optimizer_and_scaler(tiny_data_dir: Path) -> None:
    """A checkpoint of PyTorch's default Adam and no scaler, loaded into a step whose plan fuses Adam (a GPU's;
    fused Adam runs on the CPU too) and scales fp16 gradients: it keeps running as its plan built it. A plain
    Optimizer.load_state_dict turns the saved flags back on, which on a GPU breaks the graph capture."""
    images = to_float(load_images("mnist", "train", tiny_data_dir)[:16])
    plan = make_plan(TrainConfig(device="cpu"))
    saved_by = step_module.build_step(plan, ModelConfig(), lr=2e-3, beta=1.0, seed=0, batch_size=16)
    saved_by(images)
    saved = {"optimizer": saved_by.optimizer.state_dict(), "scaler": saved_by.scaler.state_dict()}
    assert saved["scaler"] == {}
    gpu_like = replace(plan, optimizer="fused", amp_dtype="float16")
    plain = step_module.build_step(gpu_like, ModelConfig(), lr=2e-3, beta=1.0, seed=0, batch_size=16)
    plain.optimizer.load_state_dict(saved["optimizer"])
    assert not plain.optimizer.param_groups[0]["fused"]  # the defect load_state guards against
    resumed = step_module.build_step(gpu_like, ModelConfig(), lr=2e-3, beta=1.0, seed=0, batch_size=16)
    resumed.load_state(saved)
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    assert {state["step"].dtype for state in resumed.optimizer.state.values()} == {torch.float32}
    assert resumed(images).isfinite()
    assert {int(state["step"]) for state in resumed.optimizer.state.values()} == {2}


def test_fp16_scaler_starts_at_a_scale_whose_gradients_fit(tiny_data_dir: Path) -> None:
    """The loss sums every pixel of the batch: from GradScaler's default 2^16 its fp16 gradients overflow and the
    first steps are skipped. From the step's own initial scale none is. Run with CPU autocast fp16, which
    computes in the same dtype as a GPU without bf16."""
    images = to_float(load_images("mnist", "train", tiny_data_dir)[:32])
    plan = replace(make_plan(TrainConfig(device="cpu", amp=True)), amp_dtype="float16")
    skipped = {}
    for start in ("default", "the step's"):
        step = step_module.build_step(plan, ModelConfig(), lr=2e-3, beta=1.0, seed=0, batch_size=32)
        if start == "default":
            step.scaler = torch.amp.GradScaler("cpu")
        for _ in range(3):
            assert step(images).isfinite()
        adam_steps = {int(state["step"]) for state in step.optimizer.state.values()}
        skipped[start] = 3 - adam_steps.pop() if len(adam_steps) == 1 else 3
    assert skipped == {"default": 3, "the step's": 0}


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-with-scaler"])
def test_amp_on_the_gpu_trains_as_fp32(tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       bf16: bool) -> None:
    """--amp on a GPU: bf16 autocast where the GPU has it, else fp16 with the gradient scaler (forced here by
    hiding bf16). The first epoch's loss is the fp32 run's within the half dtype's tolerance: both start from
    the same weights and draw the same eps."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    losses = {}
    for amp in ((), ("--amp",)):
        out = tmp_path / ("amp" if amp else "fp32")
        assert _train(tiny_data_dir, out, "--epochs", "1", "--device", "cuda", *amp) == 0
        record = json.loads((out / "run.json").read_text())
        assert record["plan"]["amp_dtype"] == (("bfloat16" if bf16 else "float16") if amp else None)
        losses[bool(amp)] = record["epochs"][0]["train_loss"]
        assert math.isfinite(record["epochs"][0]["test_neg_elbo"])
    dtype = torch.bfloat16 if bf16 else torch.float16
    assert losses[True] == pytest.approx(losses[False], rel=TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.slow
def test_whole_step_cuda_graph_trains_as_the_compiled_step(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--compile-mode reduce-overhead replays the whole step as one CUDA graph (3 uncaptured steps, then the
    capture, then replays: 8 steps an epoch here reach all three); it trains the same function as the compiled
    step without graphs. Not bit for bit: capturable Adam keeps its step count on the GPU and orders its
    arithmetic otherwise, so the losses may differ in the last bits after a few steps."""
    losses = {}
    for mode in ("default", "reduce-overhead"):
        out = tmp_path / mode
        assert _train(tiny_data_dir, out, "--epochs", "2", "--batch-size", "16", "--device", "cuda", "--compile",
                      "--compile-mode", mode) == 0
        record = json.loads((out / "run.json").read_text())
        assert record["plan"]["cuda_graph"] == (mode == "reduce-overhead")
        losses[mode] = [e["train_loss"] for e in record["epochs"]]
    assert losses["reduce-overhead"] == pytest.approx(losses["default"], rel=1e-4)
