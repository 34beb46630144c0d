"""One training step, built from a run plan: the model, its loss, the optimizer, and the update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastvae import distributed, reference
from fastvae.config import ModelConfig
from fastvae.cuda_graph import GraphedStep
from fastvae.kernels import sample_eps_torch
from fastvae.model import VAE, vae_loss
from fastvae.plan import RunPlan

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    """`step(images, seed_offset)` trains on one batch and returns the global batch's summed loss, a device
    tensor: nothing is read on the host."""

    model: torch.nn.Module  # the plain model, whose state_dict is checkpointed
    loss_fn: LossFn  # compiled and wrapped in DDP as the plan says
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    graph: GraphedStep | None = None  # the plan's whole-step CUDA graph, replaying `eager`

    def __call__(self, images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        return (self.graph or self.eager)(images, seed_offset)

    def eager(self, images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        return train_step(self.loss_fn, images, seed_offset, self.optimizer, self.scaler)


def build_step(plan: RunPlan, config: ModelConfig, *, lr: float, beta: float, seed: int) -> TrainingStep:
    """The plan's model (weights drawn from `seed`) on the plan's device, its loss as the plan runs it, Adam."""
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
    scaler = torch.amp.GradScaler(device.type, enabled=plan.amp_dtype == "float16")
    step = TrainingStep(model, loss_fn, optimizer, scaler)
    if plan.cuda_graph:
        step.graph = GraphedStep(step.eager)
    return step


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
