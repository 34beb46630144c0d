"""Command line: `fastvae train`, `eval`, `export` (ONNX), and `sample`, `reconstruct` (from an ONNX file alone).

Errors in the user's input print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from fastvae.errors import FastVAEError
from fastvae.malloc import ALLOCATORS

# Options a resumed run must keep, so that it continues the same function and random streams.
_FIXED_ON_RESUME = ("data", "batch_size", "lr", "beta", "seed", "model", "limit_train")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def versions() -> str:
    """fastvae's version, those of the libraries it runs on, and the device `--device auto` would pick."""
    from importlib.metadata import PackageNotFoundError, version

    import fastvae

    def installed(*names: str) -> str:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return "not installed"

    import torch

    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    return (f"fastvae {fastvae.__version__} (torch {torch.__version__}, onnxruntime "
            f"{installed('onnxruntime-gpu', 'onnxruntime')}, triton {installed('triton')}; device: {device})")


class _PrintVersions(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of fastvae, torch, onnxruntime and Triton, and the device, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description=__doc__)
    parser.add_argument("-V", "--version", action=_PrintVersions)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the VAE; writes weights, metrics and image grids to --out")
    # Defaults are None here and filled from the dataclasses (or the checkpoint on --resume).
    train.add_argument("--data", choices=["fashion-mnist", "mnist"], help="dataset (default fashion-mnist)")
    train.add_argument("--data-dir", help="folder with the IDX files (default: the Debian package's folder)")
    train.add_argument("--epochs", type=int, help="total epochs of the run, counting resumed ones (default 10)")
    train.add_argument("--batch-size", type=int,
                       help="images per step, in all of torchrun's processes together (default 1024)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 2e-3)")
    train.add_argument("--z-dim", type=int, help="latent dimensions (default 32)")
    train.add_argument("--beta", type=float, help="weight of the KL term, beta-VAE (default 1.0)")
    train.add_argument("--seed", type=int, help="seed of weights, shuffles and samples (default 0)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(default auto: cuda if present)")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the step")
    train.add_argument("--amp", action="store_true", default=None, help="mixed precision (bf16, or fp16)")
    train.add_argument("--model", choices=["fast", "reference"], help="fast (default) or the lab's own code")
    train.add_argument("--limit-train", type=_positive_int, help="train on the first N images only")
    train.add_argument("--kernel", choices=["auto", "triton", "torch"],
                       help="reparameterize+KL: the Triton kernel or PyTorch (default auto: Triton on CUDA)")
    train.add_argument("--out", default="runs/fastvae", help="run folder (default runs/fastvae)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--sync-bn", action="store_true", default=None,
                       help="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)")
    train.add_argument("--cpu-allocator", choices=ALLOCATORS,
                       help="cached (default): glibc keeps freed memory for the next step, ~1.4x faster CPU steps "
                            "at the cost of holding the peak heap; system: glibc's defaults")
    train.add_argument("--dist-timeout", type=float,
                       help="under torchrun: seconds to wait for the other processes, at start and in every "
                            "collective, before giving up (default 300)")

    ev = sub.add_parser("eval", help="test-set negative ELBO and importance-weighted bound of a checkpoint")
    ev.add_argument("checkpoint", help="a run folder (or its model.safetensors)")
    ev.add_argument("--data", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    ev.add_argument("--data-dir")
    ev.add_argument("--k", type=_positive_int, default=1000, help="importance samples (default 1000)")
    ev.add_argument("--limit", type=_positive_int, help="evaluate the first N test images only")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    ex = sub.add_parser("export", help="export the decoder, encoder or whole VAE to ONNX, verified against PyTorch")
    ex.add_argument("model", help="the ONNX file to write, e.g. model.onnx")
    ex.add_argument("--checkpoint", required=True, help="a run folder (or its model.safetensors)")
    ex.add_argument("--part", choices=["decoder", "encoder", "vae"], default="decoder",
                    help="decoder: z -> images (default); encoder: images -> mean, log_sigma; "
                         "vae: images, eps -> reconstruction, mean, log_sigma")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's recommended one)")
    ex.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic; inputs, outputs float32")
    ex.add_argument("--decoder-graph", default="matmul",
                    help="matmul (default): the decoder's transposed convolutions as matrix products, faster in "
                         "onnxruntime on CPU; conv: standard ConvTranspose nodes, for runtimes with their own")
    ex.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")

    sa = sub.add_parser("sample", help="decode random latents with an exported decoder; writes a PNG grid")
    sa.add_argument("model", help="an ONNX file from `fastvae export --part decoder`")
    sa.add_argument("--n", type=_positive_int, default=64, help="images (default 64)")
    sa.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")
    sa.add_argument("--seed", type=int, help="seed of the latents (default: fresh randomness)")
    sa.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    rc = sub.add_parser("reconstruct", help="reconstruct test images with an exported VAE; writes a PNG grid")
    rc.add_argument("model", help="an ONNX file from `fastvae export --part vae`")
    rc.add_argument("--data", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    rc.add_argument("--data-dir")
    rc.add_argument("--n", type=_positive_int, default=16, help="first N test images (default 16)")
    rc.add_argument("--out", default="recon.png", help="PNG to write: originals above reconstructions")
    rc.add_argument("--seed", type=int, help="seed of the posterior noise eps (default: fresh randomness)")
    rc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def _train_configs(args: argparse.Namespace):
    from fastvae.config import ModelConfig, TrainConfig
    from fastvae.run_folder import load_record

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    z_dim = args.z_dim
    if args.resume:
        record = load_record(Path(args.out))
        saved = record["train_config"]
        saved_z = record["model_config"]["z_dim"]
        if z_dim is not None and z_dim != saved_z:
            raise FastVAEError(f"--z-dim {z_dim} disagrees with the checkpoint in {args.out} (z_dim {saved_z})")
        for name in _FIXED_ON_RESUME:
            if name in given and given[name] != saved[name]:
                raise FastVAEError(
                    f"--{name.replace('_', '-')} {given[name]} disagrees with the checkpoint in {args.out} "
                    f"({saved[name]}): a resumed run keeps it"
                )
        given = {**{k: saved[k] for k in _FIXED_ON_RESUME}, **given}
        z_dim = saved_z
    model_config = ModelConfig(**({} if z_dim is None else {"z_dim": z_dim}))
    return TrainConfig(**given), model_config


def _train(args: argparse.Namespace) -> int:
    config, model_config = _train_configs(args)  # every option is checked before torch is imported
    from fastvae.train import train

    train(config, model_config, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastvae.checkpoint import load_model
    from fastvae.data import load_images
    from fastvae.evaluate import importance_weighted_bound, negative_elbo
    from fastvae.train import generator, resolve_device

    device = resolve_device(args.device)
    model, epoch = load_model(args.checkpoint)
    model.to(device)
    config = model.config
    images = load_images(args.data, "test", args.data_dir)
    if images.shape[1:] != (config.im_chan, config.image_size, config.image_size):
        raise FastVAEError(f"{args.data} images are {tuple(images.shape[1:])}; the checkpoint expects "
                           f"{(config.im_chan, config.image_size, config.image_size)}")
    images = images[: args.limit].to(device)
    elbo = negative_elbo(model, images, generator(args.seed, 0, device=device))
    iwae = importance_weighted_bound(model, images, args.k, generator(args.seed, 1, device=device))
    print(f"{args.checkpoint} (epoch {epoch}, z_dim {config.z_dim}) on {len(images)} {args.data} test images:")
    print(f"  negative ELBO:       {elbo:.2f} nats/image")
    print(f"  IWAE bound (k={args.k}): {iwae:.2f} nats/image")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastvae.export.onnx import export_onnx

    export_onnx(args.model, args.checkpoint, args.part, opset=args.opset, fp16=args.fp16,
                decoder_graph=args.decoder_graph, verify=not args.no_verify)
    return 0


def _save_png(path: str, images, nrow: int) -> None:
    from fastvae.files import save_png

    try:
        save_png(path, images, nrow)
    except OSError as e:
        raise FastVAEError(f"cannot write {path}: {e.strerror}; choose another --out") from e


def _sample(args: argparse.Namespace) -> int:
    import math

    from fastvae.runtime import OnnxVAE

    try:  # the runtime speaks ValueError to other apps; here it becomes the CLI's one-line error
        vae = OnnxVAE(args.model, args.device)
        images = vae.sample(args.n, seed=args.seed)
    except ValueError as e:
        raise FastVAEError(str(e)) from e
    _save_png(args.out, images, nrow=math.ceil(math.sqrt(args.n)))
    print(f"wrote {args.out}: {args.n} samples from {args.model} ({vae.provider})")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from fastvae.data import load_images
    from fastvae.runtime import OnnxVAE

    try:
        vae = OnnxVAE(args.model, args.device)
        images = load_images(args.data, "test", args.data_dir)[: args.n].numpy().astype(np.float32) / 255
        recon = vae.reconstruct(images, seed=args.seed)
    except ValueError as e:
        raise FastVAEError(str(e)) from e
    _save_png(args.out, np.concatenate([images, recon]), nrow=len(images))
    print(f"wrote {args.out}: {len(images)} {args.data} test images above their reconstructions ({vae.provider})")
    return 0


def _print_error(line: str) -> None:
    # One write of the whole line: under torchrun every process shares stderr, and print's separate write of
    # the newline let two processes' errors run together on one line.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": _train, "eval": _eval, "export": _export, "sample": _sample, "reconstruct": _reconstruct}
        return commands[args.command](args)
    except FastVAEError as e:
        _print_error(f"fastvae {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _print_error(f"fastvae {args.command}: interrupted; files already written are intact")
        return 130


