"""The training loop: epochs of the run plan's step (fastvae.step), test-set evaluation, per-epoch checkpoints, exact
resume, torchrun (fastvae.distributed)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastvae import distributed
from fastvae.checkpoint import load_into, load_optimizer_state, load_weights, save_checkpoint
from fastvae.config import ModelConfig, RunPlan, TrainConfig
from fastvae.data import shuffled_batches, to_float
from fastvae.distributed import Launch
from fastvae.errors import FastVAEError
from fastvae.evaluate import negative_elbo
from fastvae.files import ensure_writable_dir, save_png
from fastvae.malloc import keep_freed_memory
from fastvae.model import VAE
from fastvae.plan import make_plan
from fastvae.run_folder import RECORD, crash_point, load_record, new_record
from fastvae.seeds import EPS, EVAL, SAMPLES, SHUFFLE, derived_seed, generator
from fastvae.splits import Splits, load_splits
from fastvae.step import build_step

IMAGES = ("recon.png", "samples.png")
# NOTE: a host read waits for every queued step to finish, which leaves a GPU idle for about one step's launch
# latency; a read every 50 steps keeps that under 1% of an epoch (an estimate: not yet measured on a GPU).
READ_EVERY = 50


def read_schedule(steps: int, first: int = 1) -> list[int]:
    """The steps after which an epoch of `steps` reads its loss on the host: step `first` (the time up to it,
    with any compiling and graph capture, is reported on its own), every READ_EVERY-th, and the last."""
    return sorted({min(first, steps), steps, *range(READ_EVERY, steps + 1, READ_EVERY)})


def read_to_host(values: torch.Tensor) -> list[float]:
    """The training loop's one host read (it waits for the device): `values` as Python floats."""
    return values.tolist()


class Trainer:
    """Owns the plan, the training step (model, compiled loss, optimizer) and the data of one run."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, out_dir: Path, plan: RunPlan, splits: Splits,
                 log: Callable[[str], None] = print, progress: bool = True, launch: Launch = Launch()) -> None:
        self.config, self.model_config, self.out_dir, self.plan, self.log = config, model_config, out_dir, plan, log
        self.progress, self.launch = progress, launch
        self.pictures_repaired = False
        self.device = plan.torch_device
        log(f"plan:\n{self.plan.describe()}")
        if self.plan.cpu_allocator == "cached" and (why_not := keep_freed_memory()):
            log(f"note: --cpu-allocator cached had no effect ({why_not})")
        train_images = splits.train
        if config.limit_train is not None:
            train_images = train_images[: config.limit_train]
        if config.batch_size > len(train_images):
            raise FastVAEError(
                f"--batch-size {config.batch_size} is larger than the training set ({len(train_images)} "
                "images): lower --batch-size, raise --limit-train or give more images"
            )
        shape = tuple(train_images.shape[1:])
        expected = (model_config.im_chan, model_config.image_size, model_config.image_size)
        if shape != expected:
            raise FastVAEError(f"{config.data} images are {shape}, the model expects {expected}")
        self.test_images = splits.test.to(self.device)
        self.train_images = train_images.to(self.device)
        self.step = build_step(self.plan, model_config, lr=config.lr, beta=config.beta,
                               seed=derived_seed(config.seed), batch_size=config.batch_size // launch.world_size)
        self.model = self.step.model
        self.record = new_record(model_config, config, self.plan)

    def resume(self) -> None:
        record = load_record(self.out_dir)
        config, state, epoch = load_weights(self.out_dir)
        if config != self.model_config:
            raise FastVAEError(
                f"the checkpoint in {self.out_dir} has model {asdict(config)}, these options ask for "
                f"{asdict(self.model_config)}: drop the conflicting option (e.g. --z-dim) or use a new --out"
            )
        load_into(self.model, state, self.out_dir)
        self.step.load_state(load_optimizer_state(self.out_dir, epoch))
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
        """One pass over the training set; `epoch` counts from 1. The host reads the loss only at the steps of
        `read_schedule`: between them, steps queue on the device without waiting for it."""
        config, model = self.config, self.model
        model.train()
        steps = len(self.train_images) // config.batch_size
        first_read = min(self.step.steps_to_steady(), steps)
        reads = set(read_schedule(steps, first_read))
        shuffle = generator(config.seed, epoch, SHUFFLE)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="step",
                   disable=not self.progress, leave=False)
        launch = self.launch
        first_row = launch.rank * (config.batch_size // launch.world_size)  # this process's, in a global batch
        # eps[row, col] is normal number offset + row * Z + col under the epoch's seed (Philox in the Triton
        # kernel, counter_normal in PyTorch): each step advances the offset by B * Z on the device, so every step
        # and row of the epoch has its own counters, and starting at global row first_row gives each process the
        # single-process rows' eps.
        self.step.start_epoch(derived_seed(config.seed, epoch, EPS), first_row * self.model_config.z_dim)
        start, read_step, read_time = time.perf_counter(), 0, 0.0
        batches = shuffled_batches(self.train_images, config.batch_size, shuffle, launch.rank, launch.world_size)
        for step, images in enumerate(batches, 1):
            self.step(images)
            if step not in reads:
                continue
            loss_sum, bad_step, _ = read_to_host(self.step.tally)
            if bad_step:
                bar.close()
                raise FastVAEError(
                    f"the loss became NaN or infinite at epoch {epoch}, step {int(bad_step)}: training stopped; the "
                    f"checkpoint of epoch {epoch - 1} in {self.out_dir} is intact (try a lower --lr, or drop --amp)"
                )
            now = time.perf_counter()
            if read_step == 0:
                first_step_s, steady_start = now - start, now
            read_step, read_time = step, now
            steady = read_time - steady_start
            # global images/s: the processes step in lockstep
            speed = f"{(step - first_read) * config.batch_size / steady:.0f}" if steady > 0 else "-"
            bar.set_postfix(loss=f"{loss_sum / (step * config.batch_size):.2f}", img_s=speed)
            bar.update(step - bar.n)
        bar.close()
        seconds = read_time - start
        steady = read_time - steady_start
        return {
            "train_loss": loss_sum / (steps * config.batch_size),
            "images_per_s": (steps - first_read) * config.batch_size / steady if steps > first_read
            else steps * config.batch_size / seconds,
            "first_step_s": first_step_s,
            "first_steps": first_read,
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
        optimizer_state = {"optimizer": self.step.optimizer.state_dict(), "scaler": self.step.scaler.state_dict()}
        self.record["checkpoint"] = save_checkpoint(self.out_dir, self.model, self.model_config, self.record,
                                                    optimizer_state)
        self.save_images()

    def save_images(self) -> None:
        """recon.png (the first 16 test images above their reconstructions) and samples.png (64 decoded
        z ~ N(0, I))."""
        model = self.fast_model().eval()
        epoch = self.record["epochs_done"]
        with torch.no_grad():
            true = to_float(self.test_images[:16])
            eps = torch.zeros(len(true), self.model_config.z_dim, device=self.device)  # the posterior mean
            recon = torch.sigmoid(model(true, eps)[0])
            save_png(self.out_dir / IMAGES[0], torch.cat([true, recon]).cpu().numpy(), nrow=len(true))
            crash_point(epoch)
            z = torch.randn((64, self.model_config.z_dim), generator=generator(
                self.config.seed, 0, SAMPLES, device=self.device), device=self.device)
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
                    self.fast_model(), self.test_images, generator(config.seed, 0, EVAL, device=self.device)
                )
            self.record["epochs"].append({"epoch": epoch, **metrics})
            self.record["epochs_done"] = epoch
            if self.launch.main:
                self.save()
                steps = "first step" if metrics["first_steps"] == 1 else f"first {metrics['first_steps']} steps"
                first = f", {steps} {metrics['first_step_s']:.1f} s" + (
                    " incl. compile" + (" and graph capture" if self.plan.cuda_graph else "") if config.compile else "")
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
    plan = make_plan(config, launch)  # refuses what cannot work before any process waits on another
    out_dir, created = Path(out), None
    if launch.main:
        created = _first_missing(out_dir)
        ensure_writable_dir(out_dir)
        if not resume and (out_dir / RECORD).exists():
            raise FastVAEError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    else:
        log, progress = lambda _: None, False
    try:
        # A resumed run's images are converted to its model's channels; a new run's model takes the data's.
        splits = load_splits(config, model_config.im_chan if resume else None, progress)
        log(f"data: {splits.description}")
        if not resume and splits.train.shape[1] != model_config.im_chan:
            model_config = replace(model_config, im_chan=splits.train.shape[1])
        with distributed.process_group(launch, plan.torch_device, config.dist_timeout):
            trainer = Trainer(config, model_config, out_dir, plan, splits, log, progress, launch)
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
