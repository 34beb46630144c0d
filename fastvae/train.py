"""The training step and loop: compile, AMP, per-epoch checkpoints, exact resume, torchrun (fastvae.distributed).

Randomness is derived from (--seed, epoch, purpose), so an epoch's shuffle and eps draws do not depend on
what ran before it: resuming at an epoch boundary reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastvae import distributed, reference
from fastvae.checkpoint import load_into, load_optimizer_state, load_weights, save_checkpoint
from fastvae.config import ModelConfig, TrainConfig
from fastvae.data import load_images, shuffled_batches, to_float
from fastvae.distributed import Launch
from fastvae.errors import FastVAEError
from fastvae.evaluate import negative_elbo
from fastvae.files import ensure_writable_dir, save_png
from fastvae.kernels import resolve_kernel
from fastvae.kernels.reparameterize_kl import sample_eps_torch
from fastvae.malloc import keep_freed_memory
from fastvae.model import VAE, vae_loss
from fastvae.run_folder import RECORD, crash_point, load_record, new_record

_SHUFFLE, _EPS, _EVAL, _SAMPLES = range(4)
IMAGES = ("recon.png", "samples.png")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose, independent of every other (seed, keys) pair."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> 1)


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *keys))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastVAEError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise FastVAEError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def amp_dtype(device: torch.device, enabled: bool, log: Callable[[str], None]) -> torch.dtype | None:
    """bf16 where the device supports it, fp16 (with a gradient scaler) on older GPUs, None without --amp."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log("note: this CPU has no native bf16; --amp works but will be slower than fp32")
    return torch.bfloat16


def resolve_train_kernel(config: TrainConfig, device: torch.device) -> tuple[str, str]:
    """The run's reparameterize+KL implementation ('triton' or 'torch') and why, for the log and run.json."""
    if config.model == "reference":
        if config.kernel == "triton":
            raise FastVAEError("--kernel triton needs --model fast: the lab's model has no fused kernel")
        return "torch", "the reference model is the lab's code; its eps comes from counter_normal"
    try:
        return resolve_kernel(config.kernel, device)
    except ValueError as e:
        raise FastVAEError(f"--kernel {config.kernel}: {e}") from e


def build_model(kind: str, config: ModelConfig) -> torch.nn.Module:
    return VAE(config) if kind == "fast" else reference.VAE(config)


def make_loss_fn(model: torch.nn.Module, kind: str, beta: float, dtype: torch.dtype | None,
                 kernel: str = "torch") -> LossFn:
    """loss(images (B, C, H, W) float, seed_offset) -> the batch's summed negative ELBO (fp32 scalar).

    seed_offset is the int64 tensor [seed, offset] that eps (B, Z) is drawn from: in the Triton kernel with
    kernel 'triton'; otherwise here, by sample_eps_torch (inside the graph under torch.compile), and given to
    the model as an explicit eps: the PyTorch op's numbers, for the lab's model (which takes only an eps) as
    for the fast one (whose seed_offset path would pick Triton on CUDA even with --kernel torch).
    """
    device_type = next(model.parameters()).device.type
    z_dim = getattr(model, "module", model).z_dim  # under torchrun, DDP holds the model in .module

    def fast_loss(images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if kernel == "triton":
                logits, _, _, kl = model(images, seed_offset=seed_offset)
            else:
                logits, _, _, kl = model(images, sample_eps_torch(seed_offset, (len(images), z_dim)))
        return vae_loss(logits, images, kl, beta)

    def reference_loss(images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        recon, q_dist = model(images, sample_eps_torch(seed_offset, (len(images), z_dim)))
        return reference.loss(recon, images, q_dist, beta)

    if kind == "reference" and dtype is not None:
        raise FastVAEError("--amp needs --model fast: the lab's Sigmoid + BCELoss is unsafe under autocast")
    return fast_loss if kind == "fast" else reference_loss


def train_step(loss_fn: LossFn, images: torch.Tensor, seed_offset: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> float:
    """One step: loss, backward, optimizer update. Returns the global batch's loss (summed over torchrun's
    processes, so all of them see it); a non-finite one changes nothing, on every process alike."""
    loss = loss_fn(images, seed_offset)  # this process's shard
    value = distributed.all_reduce_sum(loss).item()
    if np.isfinite(value):
        # DDP averages gradients over processes; the single-process loss is a sum over the global batch.
        scaler.scale(loss * distributed.world_size()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return value


class Trainer:
    """Owns the model, its compiled twin, the optimizer and the data of one run."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, out_dir: Path,
                 log: Callable[[str], None] = print, progress: bool = True, launch: Launch = Launch()) -> None:
        self.config, self.model_config, self.out_dir, self.log = config, model_config, out_dir, log
        self.progress, self.launch = progress, launch
        self.pictures_repaired = False
        self.device = distributed.rank_device(resolve_device(config.device), launch)
        self.kernel, kernel_reason = resolve_train_kernel(config, self.device)
        log(f"kernel: {self.kernel} ({kernel_reason})")
        if self.device.type == "cpu" and config.cpu_allocator == "cached":
            log(keep_freed_memory())
        self.dtype = amp_dtype(self.device, config.amp, log)
        train_images = load_images(config.data, "train", config.data_dir)
        self.test_images = load_images(config.data, "test", config.data_dir).to(self.device)
        if config.limit_train is not None:
            train_images = train_images[: config.limit_train]
        if config.batch_size > len(train_images):
            raise FastVAEError(
                f"--batch-size {config.batch_size} is larger than the training set ({len(train_images)} "
                "images): lower --batch-size or raise --limit-train"
            )
        shape = tuple(train_images.shape[1:])
        expected = (model_config.im_chan, model_config.image_size, model_config.image_size)
        if shape != expected:
            raise FastVAEError(f"{config.data} images are {shape}, the model expects {expected}")
        self.train_images = train_images.to(self.device)

        torch.manual_seed(derived_seed(config.seed))
        self.model = build_model(config.model, model_config).to(self.device)
        # Keep the plain model for checkpoints; only the step function is compiled (under torchrun: the model
        # inside DDP).
        if launch.distributed:
            wrapped = distributed.wrap(self.model, self.device, config.compile, config.sync_bn)
            self.loss_fn = make_loss_fn(wrapped, config.model, config.beta, self.dtype, self.kernel)
        else:
            loss_fn = make_loss_fn(self.model, config.model, config.beta, self.dtype, self.kernel)
            # The lab's code calls torch.distributions.kl_divergence, whose type dispatch dynamo cannot trace:
            # it compiles in pieces around it. The fast model must compile whole.
            fullgraph = config.model == "fast"
            self.loss_fn = torch.compile(loss_fn, fullgraph=fullgraph) if config.compile else loss_fn
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.record = new_record(
            model_config, config, device=str(self.device), world_size=launch.world_size,
            amp_dtype=str(self.dtype).replace("torch.", "") if self.dtype else None, kernel=self.kernel,
            kernel_reason=kernel_reason,
        )

    def resume(self) -> None:
        record = load_record(self.out_dir)
        config, state, epoch = load_weights(self.out_dir)
        if config != self.model_config:
            raise FastVAEError(
                f"the checkpoint in {self.out_dir} has model {asdict(config)}, these options ask for "
                f"{asdict(self.model_config)}: drop the conflicting option (e.g. --z-dim) or use a new --out"
            )
        load_into(self.model, state, self.out_dir)
        saved = load_optimizer_state(self.out_dir, epoch)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.record["epochs_done"] = epoch
        self.record["epochs"] = record["epochs"]
        self.record["checkpoint"] = record["checkpoint"]
        self.log(f"resuming {self.out_dir} after epoch {epoch}")
        missing = [name for name in IMAGES if not (self.out_dir / name).exists()]
        if missing and self.launch.main:  # a kill landed between the checkpoint and its pictures
            self.save_images()
            self.log(f"wrote the missing {', '.join(missing)} from epoch {epoch}'s weights")
            self.pictures_repaired = True

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; `epoch` counts from 1."""
        config, model = self.config, self.model
        model.train()
        steps = len(self.train_images) // config.batch_size
        shuffle = generator(config.seed, epoch, _SHUFFLE)
        eps_seed = derived_seed(config.seed, epoch, _EPS)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="step",
                   disable=not self.progress, leave=False)
        loss_sum, first_step_s, start = 0.0, None, time.perf_counter()
        launch, z_dim = self.launch, self.model_config.z_dim
        first_row = launch.rank * (config.batch_size // launch.world_size)  # this process's, in a global batch
        batches = shuffled_batches(self.train_images, config.batch_size, shuffle, launch.rank, launch.world_size)
        for step, images in enumerate(batches, 1):
            # eps[row, col] is normal number offset + row * Z + col under eps_seed (Philox in the Triton
            # kernel, counter_normal in PyTorch): an offset of B * Z per step gives every step and row of the
            # epoch its own counters (see kernels/reparameterize_kl), and starting at global row first_row
            # gives each process the single-process rows' eps.
            offset = ((step - 1) * config.batch_size + first_row) * z_dim
            seed_offset = torch.tensor([eps_seed, offset], device=self.device)
            value = train_step(self.loss_fn, images, seed_offset, self.optimizer, self.scaler)
            if not np.isfinite(value):
                bar.close()
                raise FastVAEError(
                    f"loss became {value} at epoch {epoch}, step {step}: training stopped; the checkpoint of "
                    f"epoch {epoch - 1} in {self.out_dir} is intact (try a lower --lr, or drop --amp)"
                )
            loss_sum += value
            if first_step_s is None:
                first_step_s = time.perf_counter() - start
                steady_start, steady_images = time.perf_counter(), 0
            else:
                steady_images += config.batch_size  # global images/s: the processes step in lockstep
            elapsed = time.perf_counter() - steady_start
            bar.set_postfix(loss=f"{loss_sum / (step * config.batch_size):.2f}",
                            img_s=f"{steady_images / elapsed:.0f}" if elapsed > 0 else "-")
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        steady = time.perf_counter() - steady_start
        return {
            "train_loss": loss_sum / (steps * config.batch_size),
            "images_per_s": steady_images / steady if steps > 1 else config.batch_size / seconds,
            "first_step_s": first_step_s,
            "seconds": seconds,
        }

    def fast_model(self) -> VAE:
        """The fast model holding the current weights (the reference's state dict loads into it)."""
        if isinstance(self.model, VAE):
            return self.model
        twin = VAE(self.model_config).to(self.device)
        twin.load_state_dict(self.model.state_dict())
        return twin

    def save(self) -> None:
        optimizer_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        self.record["checkpoint"] = save_checkpoint(self.out_dir, self.model, self.model_config, self.record,
                                                    optimizer_state)
        self.save_images()

    def save_images(self) -> None:
        """recon.png (16 test images above their reconstructions) and samples.png (64 decoded z ~ N(0, I))."""
        model = self.fast_model().eval()
        epoch = self.record["epochs_done"]
        with torch.no_grad():
            true = to_float(self.test_images[:16])
            recon = torch.sigmoid(model(true, torch.zeros(16, self.model_config.z_dim, device=self.device))[0])
            save_png(self.out_dir / IMAGES[0], torch.cat([true, recon]).cpu().numpy(), nrow=16)
            crash_point(epoch)
            z = torch.randn((64, self.model_config.z_dim), generator=generator(
                self.config.seed, 0, _SAMPLES, device=self.device), device=self.device)
            save_png(self.out_dir / IMAGES[1], torch.sigmoid(model.decode(z)).cpu().numpy(), nrow=8)
            crash_point(epoch)

    def fit(self) -> dict[str, Any]:
        config = self.config
        start_epoch = self.record["epochs_done"] + 1
        if start_epoch > config.epochs:
            nothing = "nothing was trained" if self.pictures_repaired else "nothing was trained or written"
            self.log(f"{self.out_dir} already holds {start_epoch - 1} epochs (--epochs {config.epochs}): {nothing}; "
                     "pass a larger --epochs to go on")
            return self.record
        for epoch in range(start_epoch, config.epochs + 1):
            metrics = self.train_epoch(epoch)
            if self.launch.main:  # rank 0 alone evaluates and writes; the others wait at the barrier below
                metrics["test_neg_elbo"] = negative_elbo(
                    self.fast_model(), self.test_images, generator(config.seed, 0, _EVAL, device=self.device)
                )
            self.record["epochs"].append({"epoch": epoch, **metrics})
            self.record["epochs_done"] = epoch
            if self.launch.main:
                self.save()
                first = f", first step {metrics['first_step_s']:.1f} s" + (" incl. compile" if config.compile else "")
                self.log(
                    f"epoch {epoch}/{config.epochs}: train loss {metrics['train_loss']:.2f}, test -ELBO "
                    f"{metrics['test_neg_elbo']:.2f} nats/image, {metrics['images_per_s']:.0f} images/s{first}"
                )
            distributed.barrier()
        self.log(f"wrote {self.out_dir}: epochs {start_epoch}-{config.epochs} ({RECORD}, "
                 f"{self.record['checkpoint']}/, {', '.join(IMAGES)})")
        return self.record


def train(config: TrainConfig, model_config: ModelConfig, out: str | Path, resume: bool = False,
          log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in folder `out`; returns the run record (also in out/run.json).

    Under torchrun every process runs this; each trains on its shard of every batch, and rank 0 alone logs and
    writes `out` (every process reads it to resume).
    """
    launch = distributed.from_env()
    device = distributed.rank_device(resolve_device(config.device), launch)
    distributed.check_options(config, launch, device)
    out_dir, created = Path(out), None
    if launch.main:
        created = _first_missing(out_dir)
        ensure_writable_dir(out_dir)
        if not resume and (out_dir / RECORD).exists():
            raise FastVAEError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    else:
        log, progress = lambda _: None, False
    try:
        with distributed.process_group(launch, device, config.dist_timeout):
            trainer = Trainer(config, model_config, out_dir, log, progress, launch)
            if resume:
                trainer.resume()
            return trainer.fit()
    except BaseException:
        if created is not None and not (out_dir / RECORD).exists():  # failed before its first checkpoint
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet: what creating it would add."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing
