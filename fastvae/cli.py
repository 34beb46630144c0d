"""Command line: `fastvae train`, `eval`, `export` (ONNX), and `sample`, `reconstruct` (from an ONNX file alone).

Errors in the user's input print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fastvae.config import COMPILE_MODES, DATASETS, DECODER_GRAPHS, DEVICES, KERNELS, LAYERS, MODELS, PARTS
from fastvae.errors import FastVAEError
from fastvae.malloc import ALLOCATORS

if TYPE_CHECKING:
    from fastvae.config import ModelConfig, TrainConfig

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


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other bad input's (its own print usage lines first)."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{self.prog}: error: {message} (see {self.prog} --help)")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastvae", description=__doc__)
    parser.add_argument("-V", "--version", action=_PrintVersions)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the VAE; writes weights, metrics and image grids to --out")
    # Defaults are None here and filled from the dataclasses (or the checkpoint on --resume).
    train.add_argument("--data", help=f"a dataset ({' or '.join(DATASETS)}; default fashion-mnist), or your own "
                       "images: a folder of PNG/JPEG/BMP/WebP files or a .npy/.npz array")
    train.add_argument("--data-dir", help="folder with a dataset's IDX files (default: the Debian package's folder)")
    train.add_argument("--channels", type=int, choices=(1, 3),
                       help="1 (grayscale) or 3 (colour); images are converted (default: the source's own)")
    train.add_argument("--test-fraction", type=float,
                       help="your own images: the share held out for testing, drawn by --seed (default 0.1)")
    train.add_argument("--test-data", help="your own images: a folder or array of test images instead")
    train.add_argument("--skip-bad", action="store_true", default=None,
                       help="your own images: skip unreadable files (and count them) instead of stopping")
    train.add_argument("--epochs", type=int, help="total epochs of the run, counting resumed ones (default 10)")
    train.add_argument("--batch-size", type=int,
                       help="images per step, in all of torchrun's processes together (default 1024)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 2e-3)")
    train.add_argument("--z-dim", type=int, help="latent dimensions (default 32)")
    train.add_argument("--beta", type=float, help="weight of the KL term, beta-VAE (default 1.0)")
    train.add_argument("--seed", type=int, help="seed of weights, shuffles and samples (default 0)")
    train.add_argument("--device", choices=DEVICES, help="(default auto: cuda if present)")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the step")
    train.add_argument("--compile-mode", choices=COMPILE_MODES,
                       help="with --compile: default, or reduce-overhead / max-autotune, which on a GPU replay the "
                            "whole step as one CUDA graph (default auto: reduce-overhead on a GPU, default on the CPU)")
    train.add_argument("--amp", action="store_true", default=None, help="mixed precision (bf16, or fp16)")
    train.add_argument("--model", choices=MODELS, help="fast (default) or the lab's own code")
    train.add_argument("--limit-train", type=_positive_int, help="train on the first N images only")
    train.add_argument("--layers", choices=LAYERS,
                       help="the fast model's convolutions: matmul custom ops or the library's (default auto: "
                            "matmul on the CPU, library on a GPU)")
    train.add_argument("--kernel", choices=KERNELS,
                       help="reparameterize+KL: the Triton kernel or PyTorch (default auto: Triton on CUDA)")
    train.add_argument("--out", default="runs/fastvae", help="run folder (default runs/fastvae)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--sync-bn", action="store_true", default=None,
                       help="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)")
    train.add_argument("--cpu-allocator", choices=ALLOCATORS,
                       help="cached (default): glibc keeps freed memory for the next step, faster CPU steps at the "
                            "cost of holding the peak heap (docs/performance.md); system: glibc's defaults")
    train.add_argument("--dist-timeout", type=float,
                       help="under torchrun: seconds to wait for the other processes, at start and in every "
                            "collective, before giving up (default 300)")

    ev = sub.add_parser("eval", help="test-set negative ELBO and importance-weighted bound of a checkpoint")
    ev.add_argument("checkpoint", help="a run folder (or its model.safetensors)")
    ev.add_argument("--data", help="a dataset or your own images (default: the run's own test split)")
    ev.add_argument("--data-dir", help="folder with a dataset's IDX files")
    ev.add_argument("--k", type=_positive_int, default=1000, help="importance samples (default 1000)")
    ev.add_argument("--limit", type=_positive_int, help="evaluate the first N test images only")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", choices=DEVICES, default="auto")

    ex = sub.add_parser("export", help="export the decoder, encoder or whole VAE to ONNX, verified against PyTorch")
    ex.add_argument("model", help="the ONNX file to write, e.g. model.onnx")
    ex.add_argument("--checkpoint", required=True, help="a run folder (or its model.safetensors)")
    ex.add_argument("--part", choices=PARTS, default="decoder",
                    help="decoder: z -> images (default); encoder: images -> mean, log_sigma; "
                         "vae: images, eps -> reconstruction, mean, log_sigma")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's recommended one)")
    ex.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic; inputs, outputs float32")
    ex.add_argument("--decoder-graph", choices=DECODER_GRAPHS, default="matmul",
                    help="matmul (default): the decoder's transposed convolutions as matrix products, faster in "
                         "onnxruntime on CPU; conv: standard ConvTranspose nodes, for runtimes with their own")
    ex.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")

    from fastvae.bulk import MAX_GRID_IMAGES

    sa = sub.add_parser("sample", help="decode random latents with an exported decoder; writes a PNG grid or .npy")
    sa.add_argument("model", help="an ONNX file from `fastvae export --part decoder`")
    sa.add_argument("--n", type=_positive_int, default=64, help="images (default 64)")
    sa.add_argument("--out", default="samples.png",
                    help=f"file to write (default samples.png): .png, a grid of at most {MAX_GRID_IMAGES} images; "
                         ".npy, one float32 array (n, C, H, W) for any --n")
    sa.add_argument("--seed", type=int, help="seed of the latents (default: fresh randomness)")
    sa.add_argument("--device", choices=DEVICES, default="auto")

    rc = sub.add_parser("reconstruct", help="reconstruct test images with an exported VAE; writes a PNG grid")
    rc.add_argument("model", help="an ONNX file from `fastvae export --part vae`")
    rc.add_argument("--data", help="a dataset or your own images (default: the test split of the run the file "
                                   "was exported from, else fashion-mnist)")
    rc.add_argument("--data-dir", help="folder with a dataset's IDX files")
    rc.add_argument("--n", type=_positive_int, default=16,
                    help=f"first N test images (default 16, at most {MAX_GRID_IMAGES // 2})")
    rc.add_argument("--out", default="recon.png", help="PNG to write: originals above reconstructions")
    rc.add_argument("--seed", type=int, help="seed of the posterior noise eps (default: fresh randomness)")
    rc.add_argument("--device", choices=DEVICES, default="auto")

    sw = sub.add_parser("serve-web", help="serve the browser demo (examples/web) with an exported decoder")
    sw.add_argument("model", help="an ONNX file from `fastvae export --part decoder`, served as /model.onnx")
    sw.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    sw.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    return parser


def _train_configs(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    from fastvae.config import ModelConfig, TrainConfig
    from fastvae.run_folder import configs_to_resume

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.resume:
        return configs_to_resume(Path(args.out), given, args.z_dim)
    return TrainConfig(**given), ModelConfig(**({} if args.z_dim is None else {"z_dim": args.z_dim}))


def _train(args: argparse.Namespace) -> int:
    config, model_config = _train_configs(args)  # every option is checked before torch is imported
    from fastvae.train import train

    train(config, model_config, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastvae.checkpoint import load_model
    from fastvae.config import TrainConfig
    from fastvae.evaluate import importance_weighted_bound, negative_elbo
    from fastvae.plan import make_plan
    from fastvae.run_folder import RECORD, load_record
    from fastvae.seeds import generator
    from fastvae.splits import load_test_images, split_config

    plan = make_plan(TrainConfig(device=args.device))
    device = plan.torch_device
    model, epoch = load_model(args.checkpoint, plan)
    model.to(device)
    config = model.config
    run = Path(args.checkpoint)
    saved = load_record(run)["train_config"] if (run / RECORD).is_file() else None
    data = split_config(saved, args.data, args.data_dir)  # the run's own test split unless --data says otherwise
    images = load_test_images(data, config.im_chan)
    if images.shape[1:] != (config.im_chan, config.image_size, config.image_size):
        raise FastVAEError(f"{data.data} images are {tuple(images.shape[1:])}; the checkpoint expects "
                           f"{(config.im_chan, config.image_size, config.image_size)}")
    images = images[: args.limit].to(device)
    elbo = negative_elbo(model, images, generator(args.seed, 0, device=device))
    iwae = importance_weighted_bound(model, images, args.k, generator(args.seed, 1, device=device))
    print(f"{args.checkpoint} (epoch {epoch}, z_dim {config.z_dim}) on {len(images)} {data.data} test images:")
    print(f"  negative ELBO:       {elbo:.2f} nats/image")
    print(f"  IWAE bound (k={args.k}): {iwae:.2f} nats/image")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastvae.export.opset import check_opset

    check_opset(args.opset)  # before torch is imported
    from fastvae.export.exporter import export_onnx

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

    from fastvae.bulk import MAX_GRID_IMAGES, write_samples_npy
    from fastvae.files import check_output_file
    from fastvae.runtime import OnnxVAE

    # The output is checked before the model loads, so a bad --out costs nothing.
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".png", ".npy"):
        raise FastVAEError(f"--out must end in .png or .npy, got {args.out}")
    if suffix == ".png" and args.n > MAX_GRID_IMAGES:
        raise FastVAEError(f"--n {args.n} is more than a PNG grid holds ({MAX_GRID_IMAGES} images); write them "
                           f"as one array instead: --out {Path(args.out).with_suffix('.npy')}")
    check_output_file(args.out, "--out")
    try:  # the runtime speaks ValueError to other apps; here it becomes the CLI's one-line error
        vae = OnnxVAE(args.model, args.device)
        if suffix == ".npy":
            write_samples_npy(args.out, vae, args.n, args.seed)
        else:
            images = vae.sample(args.n, seed=args.seed)
    except ValueError as e:
        raise FastVAEError(str(e)) from e
    except OSError as e:  # only the .npy is written in the block: a full disk, a folder removed meanwhile
        raise FastVAEError(f"cannot write {args.out}: {e.strerror}; choose another --out") from e
    if suffix == ".png":
        _save_png(args.out, images, nrow=math.ceil(math.sqrt(args.n)))
    form = "a float32 array" if suffix == ".npy" else "a grid"
    print(f"wrote {args.out}: {args.n} samples from {args.model} as {form} ({vae.provider})")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from fastvae.bulk import MAX_GRID_IMAGES
    from fastvae.files import check_output_file
    from fastvae.runtime import META_DATA, OnnxVAE
    from fastvae.splits import load_test_images, split_config

    if 2 * args.n > MAX_GRID_IMAGES:
        raise FastVAEError(f"--n {args.n} is too many: originals and reconstructions make {2 * args.n} images, "
                           f"more than a PNG grid holds ({MAX_GRID_IMAGES}); use --n {MAX_GRID_IMAGES // 2} or fewer")
    check_output_file(args.out, "--out")
    try:
        vae = OnnxVAE(args.model, args.device)
        saved = json.loads(vae.metadata[META_DATA]) if META_DATA in vae.metadata else None
        data = split_config(saved, args.data, args.data_dir)  # the exported run's test split
        test = load_test_images(data, vae.image_shape[0])
        images = test[: args.n].numpy().astype(np.float32) / 255
        recon = vae.reconstruct(images, seed=args.seed)
    except ValueError as e:
        raise FastVAEError(str(e)) from e
    _save_png(args.out, np.concatenate([images, recon]), nrow=len(images))
    print(f"wrote {args.out}: {len(images)} {data.data} test images above their reconstructions ({vae.provider})")
    return 0


def _serve_web(args: argparse.Namespace) -> int:
    from fastvae.serve_web import serve

    serve(Path(args.model), port=args.port, host=args.host)
    return 0


def _print_error(line: str) -> None:
    # One write of the whole line: under torchrun every process shares stderr, and print writes the newline
    # separately, which lets two processes' errors run together on one line.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or an option error already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        commands = {"train": _train, "eval": _eval, "export": _export, "sample": _sample, "reconstruct": _reconstruct,
                    "serve-web": _serve_web}
        return commands[args.command](args)
    except FastVAEError as e:
        _print_error(f"fastvae {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _print_error(f"fastvae {args.command}: interrupted; files already written are intact")
        return 130


