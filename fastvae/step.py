"""One training step, built from a run plan: the model, its loss, the optimizer, and the update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastvae import distributed, reference
from fastvae.config import ModelConfig
from fastvae.cuda_graph import GraphedStep
from fastvae.kernels import sample_eps_torch
from fastvae.model import VAE, vae_loss
from fastvae.plan import RunPlan

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Adam's param-group keys that choose how it runs, not what it computes.
OPTIMIZER_IMPLEMENTATION = ("capturable", "fused", "foreach")


def build_model(plan: RunPlan, config: ModelConfig) -> torch.nn.Module:
    """The plan's model on the CPU: the fast VAE with the plan's layers and kernel, or the lab's."""
    return VAE(config, plan.layers, plan.kernel) if plan.model == "fast" else reference.VAE(config)


def make_loss_fn(model: torch.nn.Module, plan: RunPlan, beta: float) -> LossFn:
    """loss(images (B, C, H, W) float, seed_offset) -> the batch's summed negative ELBO (fp32 scalar).

    seed_offset is the int64 tensor [seed, offset] that eps (B, Z) is drawn from. The fast model draws it with
    its kernel; the lab's model takes only an explicit eps, drawn here with the PyTorch kernel's numbers.
    """
    dtype = plan.torch_amp_dtype
    device_type = plan.torch_device.type

    def fast_loss(images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, _, _, kl = model(images, seed_offset=seed_offset)
        return vae_loss(logits, images, kl, beta)

    z_dim = getattr(model, "module", model).z_dim  # under torchrun, DDP holds the model in .module

    def reference_loss(images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        recon, q_dist = model(images, sample_eps_torch(seed_offset, (len(images), z_dim)))
        return reference.loss(recon, images, q_dist, beta)

    return fast_loss if plan.model == "fast" else reference_loss


@dataclass
class TrainingStep:
    """`step(images)` trains on one batch and keeps its books on the device, where a whole-step CUDA graph
    captures them too: nothing is read on the host.

    Per epoch (`start_epoch`): eps is drawn from `seed_offset`, the int64 pair [seed, offset] that each step
    advances by its global batch's B * Z normals; `tally` (float64) holds [sum of the finite losses, the first
    step whose loss was not finite (0: none yet), steps taken].
    """

    model: torch.nn.Module  # the plain model, whose state_dict is checkpointed
    loss_fn: LossFn  # compiled and wrapped in DDP as the plan says
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    seed_offset: torch.Tensor
    tally: torch.Tensor
    normals_per_step: int  # the global batch's B * Z
    graph: GraphedStep | None = None  # the plan's whole-step CUDA graph, replaying `eager`

    def start_epoch(self, seed: int, offset: int) -> None:
        """Counters of a new epoch, set in place (a graph reads these very tensors): eps from [seed, offset]."""
        self.seed_offset.copy_(torch.tensor([seed, offset]))
        self.tally.zero_()

    def steps_to_steady(self) -> int:
        """Steps until this step runs as it will from then on: 1 (the first holds any compiling), or for a graph
        not yet captured, its uncaptured warmup steps and the capture."""
        return max(1, self.graph.steps_to_capture()) if self.graph else 1

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Train on `images`; returns the global batch's summed loss (a device tensor; graphed, the graph's own
        output buffer: read or copy it before the next step)."""
        return (self.graph or self.eager)(images)

    def eager(self, images: torch.Tensor) -> torch.Tensor:
        loss = train_step(self.loss_fn, images, self.seed_offset, self.optimizer, self.scaler)
        self.seed_offset[1:] += self.normals_per_step
        step = self.tally[2] + 1
        finite = torch.isfinite(loss)
        self.tally[0] += torch.where(finite, loss.double(), 0.0)
        self.tally[1] = torch.where(finite | (self.tally[1] > 0), self.tally[1], step)
        self.tally[2] = step
        return loss

    def load_state(self, saved: dict[str, Any]) -> None:
        """Adam's and the scaler's state from a checkpoint (`{"optimizer": ..., "scaler": ...}`), kept running as
        this plan built them: Optimizer.load_state_dict would also restore the saved run's implementation flags
        (a CPU run's non-capturable Adam would then fail this run's CUDA graph capture), and it places the step
        counts by the flags it loads."""
        flags = [{key: group[key] for key in OPTIMIZER_IMPLEMENTATION} for group in self.optimizer.param_groups]
        groups = [{**group, **ours} for group, ours in zip(saved["optimizer"]["param_groups"], flags, strict=True)]
        self.optimizer.load_state_dict({**saved["optimizer"], "param_groups": groups})
        if saved["scaler"]:  # empty when the saved run had no fp16 scaler: this one's starts fresh
            self.scaler.load_state_dict(saved["scaler"])


def build_step(plan: RunPlan, config: ModelConfig, *, lr: float, beta: float, seed: int,
               batch_size: int) -> TrainingStep:
    """The plan's model (weights drawn from `seed`) on the plan's device, its loss as the plan runs it, Adam;
    `batch_size` is one process's batch (of the global batch that its eps counters advance by)."""
    torch.manual_seed(seed)
    device = plan.torch_device
    model = build_model(plan, config).to(device)
    if plan.distributed:
        wrapped = distributed.wrap(model, device, plan.compile_mode if plan.compile else None, plan.fullgraph,
                                   plan.sync_bn)
        loss_fn = make_loss_fn(wrapped, plan, beta)
    else:
        # Only the step function is compiled: the plain model is kept for checkpoints.
        loss_fn = make_loss_fn(model, plan, beta)
        if plan.compile:
            loss_fn = torch.compile(loss_fn, mode=plan.compile_mode, fullgraph=plan.fullgraph)
    # A captured step keeps Adam's step count on the GPU (capturable), where the graph can advance it.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, capturable=plan.cuda_graph,
                                 fused=True if plan.optimizer == "fused" else None)
    scaler = torch.amp.GradScaler(device.type, init_scale=initial_loss_scale(batch_size, config),
                                  enabled=plan.amp_dtype == "float16")
    seed_offset = torch.zeros(2, dtype=torch.int64, device=device)
    tally = torch.zeros(3, dtype=torch.float64, device=device)
    step = TrainingStep(model, loss_fn, optimizer, scaler, seed_offset, tally,
                        batch_size * plan.world_size * config.z_dim)
    if plan.cuda_graph:
        step.graph = GraphedStep(step.eager)
    return step


def initial_loss_scale(batch_size: int, config: ModelConfig) -> float:
    """fp16's first loss scale: GradScaler's default 2^16 over the number of terms the loss sums, as a power of 2.

    The default is made for a mean loss; this one is a sum over the batch's pixels, so a weight's gradient sums
    B * C * H * W per-pixel terms and is that much larger. NOTE: CPU autocast fp16, batch 32: from 2^16 the first
    14 steps overflowed and were skipped (the scale halving to 4 each time) before one updated the weights.
    """
    terms = batch_size * config.im_chan * config.image_size**2
    return 2.0 ** math.floor(math.log2(2**16 / terms))


def train_step(loss_fn: LossFn, images: torch.Tensor, seed_offset: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """One step: loss, backward, optimizer update, with no host read. Returns the global batch's loss, summed
    over torchrun's processes (a 0-dim fp32 device tensor, detached). A non-finite loss is not caught here: the
    loop sees it at its next read and stops, and what it updated is never saved."""
    loss = loss_fn(images, seed_offset)  # this process's shard
    # DDP averages gradients over processes; the single-process loss is a sum over the global batch.
    scaler.scale(loss * distributed.world_size()).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return distributed.all_reduce_sum(loss.detach())
