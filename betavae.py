"""A minimal, readable Beta-VAE in PyTorch, trained on a built-in procedural dSprites.

Beta-VAE (Higgins et al., ICLR 2017) is a VAE whose KL term is weighted by beta > 1: the tighter
information bottleneck pushes each latent dimension towards one factor of variation. Papers: Kingma &
Welling 2013 (VAE), Higgins et al. 2017 (beta-VAE), Burgess et al. 2018 (capacity control and the
disentangling network), Chen et al. 2018 (beta-TCVAE: beta on the total correlation alone, --objective tc).

    python betavae.py train --beta 4                  # train on the built-in shapes data (no download)
    python betavae.py train --beta 4 --resume         # continue runs/shapes-beta4 from its last.pt
    python betavae.py traverse --gif                  # latent traversal of the newest run's best.pt
    python betavae.py interpolate / sample / reconstruct / plot
    python betavae.py evaluate                        # MIG, SAP, DCI, modularity, beta-VAE, FactorVAE scores
    python betavae.py train --dataset mnist --data-dir data --download    # or dsprites, celeba, folder
    python betavae.py bench                           # loader, training, encoder and decoder img/s
    python betavae.py study                           # time to disentangle: MIG against minutes per setting
    torchrun --standalone --nproc_per_node 2 betavae.py train --beta 4   # DistributedDataParallel
    python betavae.py --help                          # every subcommand; `train --help` every option
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, Optional

# OpenMP's default busy-waiting made 2-thread torch 3-5x slower whenever other processes shared the cores
# (docs/performance.md); passive waiting costs little on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

# torch-free helpers shared with infer_onnx.py, so that both tools draw the same pictures
from infer_onnx import (GENNORM_SCALE, PADDING, Parser, UserError, image_grid, interpolation_codes,
                        interpolation_figure, labelled, prior_codes, read_image, report_errors, save_figure,
                        select_dims, stack_vertically, time_calls, traversal_codes, traversal_gif, traversal_labels,
                        traversal_values)

__version__ = "0.1.0"
IMAGE_SIZE = 64


# ----------------------------------------------------------------------------------------------------
# Config: what defines a model and a run. The checkpoint stores it, so every subcommand rebuilds the
# model from the checkpoint alone. Each field's help text is also its --flag's help.

def option(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    # data
    dataset: str = option("shapes", "training data; shapes is built in, the others read --data-dir",
                          choices=["shapes", "dsprites", "mnist", "fashion-mnist", "celeba", "folder"])
    data_dir: str = option("data", "folder holding the files of dsprites, mnist, fashion-mnist, celeba or folder")
    val_size: int = option(5000, "shapes: images held out for validation (a fixed, seeded subset)")
    val_fraction: float = option(0.05, "datasets without an official split: fraction held out for validation")
    workers: int = option(-1, "DataLoader worker processes (-1: none for data held in memory, half the "
                          "CPU cores, 1 to 4, for image files)")
    epoch_size: int = option(20000, "training images drawn per epoch; 0 means a full pass")
    # model
    latent_dim: int = option(128, "number of latent dimensions")
    arch: str = option("tutorial", "network: the tutorial's (3x3 convs, BatchNorm, LeakyReLU), Burgess et al.'s "
                       "(4x4 convs, ReLU, no BatchNorm; disentanglement_lib's for dSprites), or broadcast: "
                       "Burgess et al.'s encoder with a spatial broadcast decoder (Watters et al. 2019)",
                       choices=["tutorial", "burgess", "broadcast"])
    mean_init: bool = option(False, "start the decoder's output bias at the logit of the training images' mean "
                             "intensity, so the first steps learn the shapes rather than the background")
    channels: int = option(0, "image channels for --dataset folder: 1 or 3 (0: 3 unless every image is grey); "
                           "set from the data for the others", choices=[0, 1, 3])
    prior: str = option("normal", "p(z): the standard normal, or gennorm4, a flat-topped generalised normal "
                        "(shape 4, unit variance) whose rotated codes are not independent; it did not help on "
                        "the shapes (docs/study.md)", choices=["normal", "gennorm4"])
    # loss
    recon: str = option("mse", "reconstruction term: squared error or Bernoulli cross-entropy",
                        choices=["mse", "bce"])
    objective: str = option("kl", "what beta weights: kl, the whole KL (Higgins et al. 2017); tc, only the total "
                            "correlation of the aggregate posterior, the other parts of the KL at weight 1 "
                            "(beta-TCVAE, Chen et al. 2018)", choices=["kl", "tc"])
    beta: float = option(4.0, "weight of the KL term, or of its total correlation under --objective tc "
                         "(1 is a plain VAE)")
    tc_estimator: str = option("mws", "how --objective tc estimates log q(z) from a batch: minibatch-weighted "
                               "(mws) or minibatch-stratified (mss) sampling", choices=["mws", "mss"])
    kl_warmup: int = option(0, "epochs over which beta rises linearly from 0 (0: off)")
    free_bits: float = option(0.0, "each latent dim's batch-mean KL counts at least this many nats")
    capacity: Optional[float] = option(None, "Burgess et al.: target KL C_max in nats; the objective "
                                       "becomes recon + gamma*|KL - C(t)| (unset: off)", type=float)
    capacity_epochs: int = option(10, "epochs over which the capacity C(t) rises from 0 to C_max")
    gamma: float = option(1000.0, "weight of |KL - C(t)| under --capacity")
    # optimisation
    lr: float = option(1e-4, "Adam learning rate (halved by ReduceLROnPlateau, see --lr-patience)")
    lr_warmup: int = option(0, "epochs over which the lr rises step by step from near 0 to --lr, so that Adam's "
                            "first steps are smaller than its later ones (0: off)")
    lr_patience: int = option(5, "epochs without a better validation objective that ReduceLROnPlateau "
                              "tolerates; the next one halves the lr (a long run may want more; may change "
                              "on --resume)")
    batch_size: int = option(32, "images per optimisation step")
    epochs: int = option(20, "epochs to train (with --resume: the total to reach)")
    clip_grad: float = option(0.0, "clip the gradient norm to this value (0: off)")
    sync_bn: bool = option(False, "under torchrun on CUDA: BatchNorm statistics over the global batch "
                           "(SyncBatchNorm) instead of each process's own")
    amp: bool = option(False, "bfloat16 autocast for the model's forward pass (CPU and CUDA); the loss and "
                       "the weights stay float32")
    compile: bool = option(False, "torch.compile the training step's model (the first steps wait about a "
                           "minute for the compiler)")
    seed: int = option(0, "seeds python, numpy and torch; a CPU run repeats bit for bit")
    device: str = option("auto", "auto picks CUDA, then MPS, then CPU",
                         choices=["auto", "cpu", "cuda", "mps"])
    eval_every: int = option(0, "every E epochs, compute the disentanglement metrics on a smaller sample "
                             "(n 1000, 1000/500 points) into history.csv (0: off)")
    # output
    out: str = option("", "run folder (default: runs/<dataset>-beta<beta>)")
    tensorboard: bool = option(False, "also log scalars and images to TensorBoard in the run folder")


# The Config defaults above are the tutorial's settings (for faces). Where the time-to-disentangle study
# (`python betavae.py study`, docs/study.md) found better ones for a dataset, they are here; any flag overrides them.
TUTORIAL = "the tutorial's settings"
SPRITES = {"latent_dim": 10, "epochs": 38, "arch": "broadcast", "recon": "bce", "lr": 5e-4, "batch_size": 256,
           "objective": "tc"}
SPRITES_WHY = ("beta weights only the total correlation (Chen et al.), not the whole KL: at equal images it "
               "separated the factors several times better over 3 seeds, with disentanglement_lib's recipe "
               "(Burgess et al.'s encoder, Bernoulli loss, lr 5e-4, 10-d); batch 256, not the recipe's 64, "
               "because the larger batch estimates the total correlation better; a spatial broadcast decoder "
               "(Watters et al.), not Burgess et al.'s, because it draws a position as a shift against x and y: "
               "median MIG 0.153 against 0.040 over seeds 0-5 at 500,000 images; 38 epochs, not 25, because the MIG "
               "still climbs: median 0.318 over seeds 0, 4, 5 at 760,000 images; --objective kl trains "
               "Higgins et al.'s beta-VAE (docs/study.md)")
DATASET_DEFAULTS = {
    "shapes": (SPRITES, SPRITES_WHY),
    "dsprites": (SPRITES, SPRITES_WHY),
    "mnist": ({}, TUTORIAL),
    "fashion-mnist": ({}, TUTORIAL),
    "celeba": ({}, TUTORIAL),
    "folder": ({}, TUTORIAL),
}


def config_from_args(args) -> Config:
    """The Config of a command line: its flags, then the dataset's defaults for the flags not typed,
    then Config's (the tutorial's) for the rest."""
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if f.name in vars(args)})
    for name, value in DATASET_DEFAULTS[cfg.dataset][0].items():
        if name not in args.given:
            setattr(cfg, name, value)
    check_config(cfg)
    return cfg


# the lr rule for larger batches: keep the default lr. Adam's square-root rule (1e-3 at batch 256) collapsed
# the total-correlation objective early, where 5e-4 matched batch 64 at equal images (docs/study.md)
LR_RULE = "the default lr at any batch size (docs/training.md#large-batches)"


def default_lr_batch(dataset: str) -> tuple[float, int]:
    """(lr, batch size) of the dataset's defaults."""
    defaults, tutorial = DATASET_DEFAULTS[dataset][0], Config()
    return defaults.get("lr", tutorial.lr), defaults.get("batch_size", tutorial.batch_size)


def describe_defaults(cfg: Config, given: set[str]) -> Optional[str]:
    """One line naming the dataset defaults a run uses instead of the tutorial's, and why (None if none)."""
    defaults, why = DATASET_DEFAULTS[cfg.dataset]
    tutorial = Config()
    used = [name for name in defaults if name not in given and defaults[name] != getattr(tutorial, name)]
    if not used:
        return None
    show = lambda value: f"{value:g}" if isinstance(value, float) else str(value)
    ours = ", ".join(f"--{name.replace('_', '-')} {show(defaults[name])}" for name in used)
    theirs = ", ".join(show(getattr(tutorial, name)) for name in used)
    return f"{cfg.dataset} defaults: {ours} (the tutorial's: {theirs}); {why}"


# Flags that may change when a run is resumed; every other one must match the stored run.
RESUMABLE_FLAGS = {"epochs", "device", "tensorboard", "out", "eval_every", "workers", "data_dir", "amp", "compile",
                   "lr_patience"}


def check_config(cfg: Config) -> None:
    """Reject nonsense settings with one clear line, before any work starts."""
    rules = [
        (cfg.beta >= 0, "--beta must be >= 0"),
        (cfg.latent_dim >= 1, "--latent-dim must be >= 1"),
        (cfg.val_size >= 1, "--val-size must be >= 1"),
        (0 < cfg.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (cfg.workers >= -1, "--workers must be >= 0 (or -1 for automatic)"),
        (cfg.dataset != "shapes" or cfg.workers <= 0, "the built-in shapes are rendered on the training device, "
                                                       "without loader workers: --workers is for data read from files"),
        (cfg.epoch_size >= 0, "--epoch-size must be >= 0 (0 means a full pass)"),
        (cfg.kl_warmup >= 0, "--kl-warmup must be >= 0"),
        (cfg.free_bits >= 0, "--free-bits must be >= 0"),
        (cfg.capacity is None or cfg.capacity >= 0, "--capacity must be >= 0"),
        (cfg.capacity_epochs >= 1, "--capacity-epochs must be >= 1"),
        (cfg.gamma > 0, "--gamma must be > 0"),
        (cfg.capacity is None or cfg.kl_warmup == 0, "--capacity and --kl-warmup are alternatives; pick one"),
        (cfg.objective == "kl" or cfg.batch_size >= 2, "--objective tc estimates the total correlation from the "
                                                        "batch: --batch-size must be >= 2"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.lr_patience >= 0, "--lr-patience must be >= 0"),
        (0 <= cfg.lr_warmup <= cfg.lr_patience, "--lr-warmup must be 0 to --lr-patience epochs: "
                                                 "ReduceLROnPlateau must not act while the lr rises"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.clip_grad >= 0, "--clip-grad must be >= 0"),
        (cfg.eval_every >= 0, "--eval-every must be >= 0"),
    ]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def schedule(cfg: Config, epoch: int) -> tuple[float, Optional[float]]:
    """(beta_eff, capacity C) for a 1-based epoch; both stay constant within an epoch, so the
    validation loss is exactly that epoch's training objective."""
    beta = cfg.beta * min(1.0, epoch / cfg.kl_warmup) if cfg.kl_warmup else cfg.beta
    capacity = None if cfg.capacity is None else cfg.capacity * min(1.0, epoch / cfg.capacity_epochs)
    return beta, capacity


def schedule_done(cfg: Config, epoch: int) -> bool:
    """True once warm-up and capacity have reached their final values (from then on, losses compare)."""
    ramp = cfg.kl_warmup if cfg.capacity is None else cfg.capacity_epochs
    return epoch >= ramp


# ----------------------------------------------------------------------------------------------------
# Data: a procedural equivalent of DeepMind's dSprites, rendered on demand.
# Factors (as in dSprites): shape x scale x orientation x position X x position Y = 737,280 images.

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
RADIUS = 10.0  # circumradius in pixels of every shape at scale 1: any rotation fits this circle
MARGIN = RADIUS + 1  # centres stay this far from the border, so no shape touches or leaves the frame


def render_shapes(factors: torch.Tensor, device=None) -> torch.Tensor:
    """Render (B, 5) integer factor classes as (B, 1, 64, 64) binary float images, all at once, on `device`
    (default: the CPU). Bit for bit the same images on any device: each image's size, angle and centre are
    computed on the CPU (cos and sin may round differently elsewhere), and the pixel work on the device
    uses only +, -, *, / and comparisons, which IEEE 754 rounds the same everywhere."""
    factors = torch.as_tensor(factors, dtype=torch.long).cpu()
    shape, scale_i, angle_i, x_i, y_i = factors.T.float()
    scale = 0.5 + 0.1 * scale_i                                  # 6 values, 0.5 to 1
    angle = 2 * math.pi * angle_i / FACTOR_SIZES[2]               # 40 values over a full turn
    centre_x = MARGIN + (IMAGE_SIZE - 2 * MARGIN) * x_i / (FACTOR_SIZES[3] - 1)
    centre_y = MARGIN + (IMAGE_SIZE - 2 * MARGIN) * y_i / (FACTOR_SIZES[4] - 1)
    # 6 numbers per image cross to the device, instead of 4,096 pixels
    geometry = torch.stack([shape, centre_x, centre_y, RADIUS * scale, torch.cos(angle), torch.sin(angle)])
    shape, centre_x, centre_y, size, cos, sin = geometry.to(device)[:, :, None, None]
    pixel = torch.arange(IMAGE_SIZE, dtype=torch.float32, device=device) + 0.5  # pixel centres
    dx = (pixel[None, None, :] - centre_x) / size
    dy = (pixel[None, :, None] - centre_y) / size
    p, q = cos * dx + sin * dy, -sin * dx + cos * dy               # (B, 64, 64) rotated into the shape's frame
    square = (p.abs() <= 1 / math.sqrt(2)) & (q.abs() <= 1 / math.sqrt(2))
    ellipse = p * p + (q / 0.5) * (q / 0.5) <= 1
    hx, hy = 1.25 * p, 0.25 - 1.25 * q                            # heart curve, centred on its circumcircle
    curve = hx * hx + hy * hy - 1
    heart = curve * curve * curve - hx * hx * (hy * hy * hy) <= 0
    image = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))  # 0 square, 1 ellipse, 2 heart
    return image.float().unsqueeze(1)                             # (B, 1, 64, 64)


class Shapes(Dataset):
    """Every point of the dSprites factor grid; item i is grid point i, rendered when asked for."""

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES
    channels = 1

    def __len__(self) -> int:
        return math.prod(FACTOR_SIZES)

    def factors(self, indices) -> torch.Tensor:
        """(B, 5) factor classes of the given item indices."""
        return torch.stack(torch.unravel_index(torch.as_tensor(indices), FACTOR_SIZES), dim=1)

    def render(self, factors) -> torch.Tensor:
        """Images with chosen factor classes (used by evaluation to sample controlled pairs)."""
        return render_shapes(factors)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.render(self.factors([index]))[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        # DataLoader calls this with a whole batch: one vectorised render instead of B small ones
        return list(self.render(self.factors(indices)))


def split_validation(dataset: Dataset, val_size: int) -> tuple[Subset, Subset]:
    """A fixed validation subset, the same for every run and seed, so validation losses compare."""
    if val_size >= len(dataset):
        raise UserError(f"a validation set of {val_size} leaves no training data ({len(dataset)} images); "
                        f"lower --val-size or --val-fraction")
    generator = torch.Generator().manual_seed(1234)
    val_idx = torch.randperm(len(dataset), generator=generator)[:val_size]
    is_val = torch.zeros(len(dataset), dtype=torch.bool)
    is_val[val_idx] = True
    train_idx = torch.nonzero(~is_val).squeeze(1)
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.sort().values.tolist())


def base_items(data: Dataset) -> tuple[Dataset, np.ndarray]:
    """(the dataset beneath (nested) Subsets, the indices there of data's items)."""
    indices = np.arange(len(data))
    while isinstance(data, Subset):
        indices, data = np.asarray(data.indices)[indices], data.dataset
    return data, indices


def load_shapes(cfg: Config, download: bool):
    return Shapes(), None


_loaded: dict[tuple, tuple] = {}  # a process loads each dataset once (dSprites takes seconds)


def load_dataset(cfg: Config, download: bool = False) -> tuple[Dataset, Optional[Dataset]]:
    """(the dataset, its official validation split or None), loaded once per process."""
    key = (cfg.dataset, cfg.data_dir, cfg.channels)
    if key not in _loaded:
        _loaded[key] = DATASETS[cfg.dataset](cfg, download)
    return _loaded[key]


def full_dataset(cfg: Config) -> Dataset:
    """The dataset a checkpoint was trained on, whole (its training split where there is an official one)."""
    return load_dataset(cfg)[0]


def make_datasets(cfg: Config, download: bool = False) -> tuple[Dataset, Dataset]:
    """(train, val) for cfg.dataset: the official split where one exists, else a fixed random one
    (--val-size for shapes, --val-fraction otherwise); sets cfg.channels from the data."""
    dataset, official_val = load_dataset(cfg, download)
    cfg.channels = dataset.channels
    _loaded[(cfg.dataset, cfg.data_dir, cfg.channels)] = dataset, official_val  # now known by its channels too
    if official_val is not None:
        return dataset, official_val
    val_size = cfg.val_size if cfg.dataset == "shapes" else max(1, round(cfg.val_fraction * len(dataset)))
    return split_validation(dataset, val_size)


def loader_workers(cfg: Config) -> int:
    """--workers, or automatically: none for data in memory (it loads far faster than it trains: see the
    bench in docs/datasets.md), and half the cores (1 to 4) for image files, leaving the rest to training."""
    if cfg.workers >= 0:
        return cfg.workers
    return max(1, min(4, (os.cpu_count() or 2) // 2)) if cfg.dataset in ("folder", "celeba") else 0


class EpochBatches:
    """A batch sampler whose batches change every epoch, so one DataLoader (and its workers) serves all."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RenderedBatches:
    """The built-in shapes' training batches, rendered on the training device in a batch sampler's order:
    no DataLoader, and on a GPU no pixels cross from the host (render_shapes: the same images anywhere)."""

    def __init__(self, data: Dataset, batches: EpochBatches, device):
        shapes, self.grid = base_items(data)  # the grid points behind the items of a (nested) Subset
        self.factors, self.batches, self.device = shapes.factors, batches, device

    def __iter__(self):
        for batch in self.batches:
            yield render_shapes(self.factors(self.grid[batch]), self.device)

    def __len__(self) -> int:
        return len(self.batches)


def drawn_on_device(data: Dataset) -> bool:
    """Whether training renders the batches on its device: the built-in shapes."""
    return isinstance(base_items(data)[0], Shapes)


def data_path(train_set: Dataset, device, workers: int) -> str:
    """Where the training batches come from, in a few words for the start line."""
    return f"shapes drawn on {device}" if drawn_on_device(train_set) else f"{workers} loader workers"


def train_loader(train_set: Dataset, cfg: Config, device) -> tuple[Iterable, EpochBatches, int]:
    """(loader, its per-epoch batch sampler, worker count): the built-in shapes drawn on the device, or
    one DataLoader whose workers live all run long. The loader has its own generator, so the global RNG
    sees only the model's noise (exact resume)."""
    workers, batches = loader_workers(cfg), EpochBatches()
    if drawn_on_device(train_set):
        return RenderedBatches(train_set, batches, device), batches, workers
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    return loader, batches, workers


def preview_images(val_set: Dataset, n: int) -> torch.Tensor:
    """n validation images spread evenly over the validation set, (n, C, 64, 64)."""
    positions = torch.linspace(0, len(val_set) - 1, min(n, len(val_set))).long()
    return torch.stack([val_set[i] for i in positions.tolist()])


def mean_intensity(train_set: Dataset, n: int = 1024) -> torch.Tensor:
    """(C,) mean pixel of n training images spread evenly over the set (no random draw: seeds stay as they are)."""
    positions = torch.linspace(0, len(train_set) - 1, min(n, len(train_set))).long()
    return torch.stack([train_set[i] for i in positions.tolist()]).mean(dim=(0, 2, 3))


def epoch_batches(train_set: Dataset, cfg: Config, generator: torch.Generator) -> list[list[int]]:
    """The epoch's batches of indices: --epoch-size fresh random items (all of them when 0)."""
    sampler = RandomSampler(train_set, num_samples=cfg.epoch_size or None, generator=generator)
    return list(BatchSampler(sampler, cfg.batch_size, drop_last=False))


# ----------------------------------------------------------------------------------------------------
# Model: a convolutional encoder and a decoder back to the image, in one of three networks. `tutorial`
# is the tutorial's (3x3 convs with BatchNorm); `burgess` is Burgess et al. 2018's, which disentanglement_lib
# trains on dSprites (4x4 convs, ReLU, no BatchNorm: the total-correlation estimate compares the samples of
# a batch with each other, and BatchNorm would couple them). `broadcast` keeps Burgess et al.'s encoder and
# draws with Watters et al. 2019's spatial broadcast decoder: z is copied to every cell of a grid, beside
# the cell's own x and y, so a position is a shift against those coordinate channels rather than a map from
# 10 numbers to a 4x4 layout that a fully connected layer must learn.

def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01))


def deconv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01))


def relu_convs(kind, widths: list[int]) -> list[nn.Module]:
    """Burgess et al.'s 4x4 stride-2 (transposed) convolutions, each halving (doubling) the image side."""
    return [layer for c_in, c_out in zip(widths, widths[1:]) for layer in (kind(c_in, c_out, 4, 2, 1), nn.ReLU())]


GRID = {"tutorial": (256, 4, 4), "burgess": (64, 4, 4)}  # the feature map at the bottleneck, (C, 4, 4)
BROADCAST_SIDE = 16  # the broadcast grid: 16x16 cells, then two upsamplings to 64 (64x64: ~30x the compute)


def coordinate_grid(side: int) -> torch.Tensor:
    """(1, 2, side, side): each cell's x (channel 0, left to right) and y (channel 1, top to bottom) in [-1, 1]."""
    ticks = torch.linspace(-1, 1, side)
    return torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"))[None]


class Encoder(nn.Module):
    """Image (B, C, 64, 64) -> posterior mean mu and log-variance logvar, each (B, latent_dim)."""

    def __init__(self, latent_dim: int, channels: int, arch: str = "tutorial"):
        super().__init__()
        if arch in ("burgess", "broadcast"):  # 64 -> 32 -> 16 -> 8 -> 4, then a hidden layer of 256
            self.net = nn.Sequential(*relu_convs(nn.Conv2d, [channels, 32, 32, 64, 64]), nn.Flatten(),
                                     nn.Linear(64 * 4 * 4, 256), nn.ReLU())  # (B, 256)
            features = 256
        else:
            self.net = nn.Sequential(conv_block(channels, 32), conv_block(32, 64), conv_block(64, 128),
                                     conv_block(128, 256), nn.Flatten())  # (B, 256*4*4)
            features = 256 * 4 * 4
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_logvar = nn.Linear(features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    """Latent code (B, latent_dim) -> image (B, C, 64, 64) in [0, 1]; `logits` skips the sigmoid."""

    def __init__(self, latent_dim: int, channels: int, arch: str = "tutorial"):
        super().__init__()
        self.grid = GRID.get(arch)  # None for broadcast, whose decoder starts from a grid rather than a layer
        # burgess and tutorial mirror the encoder's four downsamplings: 4 -> 8 -> 16 -> 32 -> 64
        if arch == "broadcast":  # (latent_dim + 2, 16, 16) -> two 3x3 convs -> 16 -> 32 -> 64
            self.register_buffer("coords", coordinate_grid(BROADCAST_SIDE))
            self.net = nn.Sequential(nn.Conv2d(latent_dim + 2, 64, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                                     *relu_convs(nn.ConvTranspose2d, [64, 32]), nn.ConvTranspose2d(32, channels, 4, 2, 1))
        elif arch == "burgess":
            self.fc = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 64 * 4 * 4), nn.ReLU())
            self.net = nn.Sequential(*relu_convs(nn.ConvTranspose2d, [64, 64, 32, 32]),
                                     nn.ConvTranspose2d(32, channels, 4, 2, 1))
        else:
            self.fc = nn.Linear(latent_dim, 256 * 4 * 4)
            self.net = nn.Sequential(deconv_block(256, 128), deconv_block(128, 64), deconv_block(64, 32),
                                     deconv_block(32, 32), nn.Conv2d(32, channels, 3, padding=1))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.grid is None:  # broadcast: every cell gets all of z and its own coordinates
            tiled = z[:, :, None, None].expand(-1, -1, BROADCAST_SIDE, BROADCAST_SIDE)
            return self.net(torch.cat([tiled, self.coords.expand_as(tiled[:, :2])], dim=1))  # (B, C, 64, 64)
        return self.net(self.fc(z).view(-1, *self.grid))  # (B, C, 64, 64)

    @torch.no_grad()
    def init_output_bias(self, mean: torch.Tensor) -> None:
        """Set the last layer's bias to logit(mean), a (C,) mean intensity: a fresh decoder then draws
        the average image's brightness from its first step (Karpathy's "init well")."""
        self.net[-1].bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


class BetaVAE(nn.Module):
    def __init__(self, latent_dim: int = 128, channels: int = 1, arch: str = "tutorial"):
        super().__init__()
        self.encoder = Encoder(latent_dim, channels, arch)
        self.decoder = Decoder(latent_dim, channels, arch)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and logvar of q(z|x); mu is the code of an image at evaluation time."""
        return self.encoder(x)

    def reparameterize(self, mu, logvar, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I): the noise is an input, so gradients reach mu and sigma."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]."""
        return self.decoder(z)

    def forward(self, x, generator: Optional[torch.Generator] = None):
        """Decoder logits of a sampled z (the loss needs logits for a stable BCE), mu, logvar and z (the
        total-correlation estimate compares each z with every image's posterior)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        return self.decoder.logits(z), mu, logvar, z


# ----------------------------------------------------------------------------------------------------
# Loss: negative ELBO with a weighted KL (Higgins et al. 2017, eq. 4), Burgess et al.'s capacity form, or
# beta on the total correlation alone (Chen et al. 2018, eq. 4 with alpha = gamma = 1).

# The prior p(z) = prod_d p(z_d): the standard normal, or a generalised normal of shape 4 with unit variance,
# p(z_d) = exp(-(z_d/a)^4) / (2 a Gamma(5/4)). A rotation of two independent normal dims is still
# independent, so no term of the objective tells x and y from their rotations; a rotation of two
# independent non-normal dims is not (Darmois-Skitovich, the reason ICA works), and the dimension-wise KL
# pulls each marginal towards this flat-topped shape, so the total correlation sees the rotation.
# GENNORM_SCALE, a = sqrt(G(1/4)/G(3/4)), makes the variance a^2 G(3/4)/G(1/4) = 1 (infer_onnx.py samples it).
GENNORM = f"exp(-(z_d/{GENNORM_SCALE:.4f})^4)/Z, a generalised normal of shape 4 and unit variance"
GENNORM_LOG_NORM = math.log(2 * GENNORM_SCALE * math.gamma(1.25))  # log Z


def prior_sample(prior: str, n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """(n, latent_dim) codes drawn from the prior: torch's normal draws, as before the prior was a choice, or
    infer_onnx's for gennorm4."""
    if prior == "normal":
        return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(prior_codes(prior, n, latent_dim, seed)).float()


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)), elementwise (broadcasting), in nats."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def log_prior(z: torch.Tensor, prior: str = "normal") -> torch.Tensor:
    """log p(z_d), elementwise, in nats."""
    if prior == "normal":
        return -0.5 * (math.log(2 * math.pi) + z.pow(2))
    return -GENNORM_LOG_NORM - (z / GENNORM_SCALE).pow(4)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor, prior: str = "normal") -> torch.Tensor:
    """Closed-form KL(N(mu, sigma^2) || p) per sample and latent dim, (B, D), in nats."""
    if prior == "normal":
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    var = logvar.exp()
    fourth_moment = mu.pow(4) + 6 * mu.pow(2) * var + 3 * var.pow(2)  # E z^4 under N(mu, var)
    entropy = 0.5 * (math.log(2 * math.pi) + 1 + logvar)
    return GENNORM_LOG_NORM + fourth_moment / GENNORM_SCALE ** 4 - entropy


def log_importance_weights(batch: int, n_data: int, estimator: str) -> torch.Tensor:
    """(B, B) log w_ij of the estimate q(z_i) ~ sum_j w_ij q(z_i | x_j) from a batch; each row sums to 1.

    mws, minibatch-weighted sampling: 1/B each. Chen et al. print 1/(B N); that extra constant 1/N leaves
    every gradient as it is but would shift the logged MI, TC and dimension-wise KL by multiples of log N.
    mss, minibatch-stratified sampling (their appendix): x_i itself 1/N, the next sample (N - M)/(N M) and
    the other M - 1 samples 1/M each, where M = B - 1 and N is the training set's size.
    """
    if estimator == "mws" or batch == 1:
        return torch.full((batch, batch), -math.log(batch), dtype=torch.float64)
    if n_data < batch:
        raise ValueError(f"mss needs the training set's size N >= the batch ({batch}), got {n_data}")
    m, rows = batch - 1, torch.arange(batch)
    weights = torch.full((batch, batch), 1 / m, dtype=torch.float64)
    weights[rows, rows] = 1 / n_data
    weights[rows, (rows + 1) % batch] = (n_data - m) / (n_data * m)
    return weights.log()


def kl_decomposition(z, mu, logvar, log_weights: torch.Tensor, prior: str = "normal") -> dict[str, torch.Tensor]:
    """Chen et al.'s split of the KL averaged over the data, estimated on a batch of z_i ~ q(z|x_i):
    index-code mutual information, total correlation and dimension-wise KL, each a mean over the batch
    in nats. They add up to the Monte Carlo KL, mean_i [log q(z_i|x_i) - log p(z_i)], exactly."""
    log_weights = log_weights.to(z.device, z.dtype)
    pairs = log_normal(z[:, None], mu[None], logvar[None])                           # (B, B, D): log q(z_id | x_j)
    log_q_zx = log_normal(z, mu, logvar).sum(1)                                      # (B,) log q(z_i | x_i)
    log_qz = torch.logsumexp(pairs.sum(2) + log_weights, dim=1)                      # (B,) log q(z_i)
    log_marginals = torch.logsumexp(pairs + log_weights[:, :, None], dim=1).sum(1)   # (B,) sum_d log q(z_id)
    log_pz = log_prior(z, prior).sum(1)                                              # (B,) log p(z_i)
    return {"mi": (log_q_zx - log_qz).mean(), "tc": (log_qz - log_marginals).mean(),
            "dwkl": (log_marginals - log_pz).mean()}


def recon_loss(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over channels and pixels, averaged over the batch."""
    if kind == "bce":  # from logits: log-sigmoid never takes log(0)
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    return per_pixel.flatten(1).sum(1).mean()


def loss_terms(logits, x, mu, logvar, z=None, *, recon: str = "mse", beta: float = 1.0, free_bits: float = 0.0,
               capacity: Optional[float] = None, gamma: float = 1000.0, objective: str = "kl",
               tc_estimator: str = "mws", n_data: int = 0, warm: float = 1.0,
               prior: str = "normal") -> dict[str, torch.Tensor]:
    """recon, the true KL, per-dim KL, with a sampled z the KL's parts mi, tc and dwkl (estimated on the
    batch), and the objective `total` that training minimises.

    KL is summed over latent dims and averaged over the batch. Free bits clamp each dim's batch-mean
    KL from below at `free_bits` nats (Kingma et al. 2016) in the objective only. total is
    recon + beta * KL, or recon + gamma * |KL - capacity| when a capacity is given (Burgess et al. 2018),
    or under objective "tc" recon + warm * (KL + (beta - 1) * TC) = recon + warm * (MI + beta * TC +
    dimension-wise KL) with the closed-form KL standing in for the estimated sum of its parts (same mean,
    less noise); warm < 1 during a warm-up. With a capacity, "tc" is recon + gamma * |KL - capacity| +
    (beta - 1) * TC: the KL is held at the capacity and beta - 1 more weight falls on its total correlation.
    Free bits clamp the KL's dims under either objective.
    """
    rec = recon_loss(logits, x, recon)
    kl_dims = kl_per_dim(mu, logvar, prior).mean(0)  # (D,) batch means
    kl = kl_dims.sum()
    parts = {"recon": rec, "kl": kl, "kl_per_dim": kl_dims}
    if z is not None:
        parts.update(kl_decomposition(z, mu, logvar, log_importance_weights(len(z), n_data, tc_estimator), prior))
    kl_objective = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    if objective == "tc":
        kl_term = kl_objective if capacity is None else gamma * (kl_objective - capacity).abs()
        total = rec + warm * (kl_term + (beta - 1) * parts["tc"])
    elif capacity is None:
        total = rec + beta * kl_objective
    else:
        total = rec + gamma * (kl_objective - capacity).abs()
    return {**parts, "total": total}


TC_SAMPLING = {"mws": "minibatch-weighted sampling", "mss": "minibatch-stratified sampling"}


def describe_loss(cfg: Config, n_data: int) -> str:
    """The reductions, printed at the start of training: beta means nothing without them."""
    error = "squared error" if cfg.recon == "mse" else "Bernoulli cross-entropy (from logits)"
    pixels = f"{cfg.channels}x{IMAGE_SIZE}x{IMAGE_SIZE}"
    kl = "KL" if cfg.free_bits == 0 else f"sum_d max(KL_d, {cfg.free_bits:g})"
    warm = f", rising from 0 over {cfg.kl_warmup} epochs" if cfg.kl_warmup else ""
    if cfg.objective == "tc":
        split = "" if cfg.free_bits else "MI + beta*TC + dimension-wise KL"  # the parts of the true KL
        terms = f"{kl} + (beta-1)*TC" + (split and f" = recon + {split}")
        if cfg.kl_warmup:  # the warm-up weights the whole KL term (loss_settings)
            terms = (f"w*({kl} + (beta-1)*TC)" + (split and f" = recon + w*({split})")
                     + f", w rising from 0 to 1 over {cfg.kl_warmup} epochs")
        elif cfg.capacity is not None:
            terms = (f"{cfg.gamma:g}*|{kl} - C| + (beta-1)*TC, C rising from 0 to {cfg.capacity:g} nats over "
                     f"{cfg.capacity_epochs} epochs (Burgess et al.'s capacity control)")
        objective = (f"recon + {terms}, beta {cfg.beta:g} "
                     f"on the total correlation only (Chen et al. 2018); TC estimated on each batch of "
                     f"{cfg.batch_size} by {TC_SAMPLING[cfg.tc_estimator]} (N = {n_data:,} training images)")
    elif cfg.capacity is None:
        objective = f"recon + beta*{kl}, beta {cfg.beta:g}{warm}"
    else:
        objective = (f"recon + {cfg.gamma:g}*|{kl} - C|, C rising from 0 to {cfg.capacity:g} nats over "
                     f"{cfg.capacity_epochs} epochs")
    prior = "" if cfg.prior == "normal" else f" to the prior p(z_d) = {GENNORM}"
    return (f"loss: recon = {error} summed over {pixels} pixels, mean over the batch; KL{prior} = closed form "
            f"summed over {cfg.latent_dim} latent dims, mean over the batch\n"
            f"objective: {objective}")


# ----------------------------------------------------------------------------------------------------
# Training helpers: device, seeding, checkpoints.

def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; an explicit choice must be available."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(n for n in ("cuda", "mps", "cpu") if available[n])
    if not available[name]:
        raise UserError(f"--device {name} is not available on this machine")
    torch.backends.cudnn.benchmark = True  # images are always 64x64: let cuDNN time and keep its fastest kernels
    return torch.device(name)


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile for fixed shapes: a batch of another size (an epoch's last) compiles once more instead of
    tracing symbolic sizes, which the sampling of the reparameterisation noise does not support."""
    return torch.compile(model, dynamic=False)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last trains faster on CPU and CUDA (measured: docs/performance.md); MPS keeps the default."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states(sampler: torch.Generator) -> dict:
    """Every random state a run consumes, as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
              "torch": torch.get_rng_state(), "sampler": sampler.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, sampler: torch.Generator) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    sampler.set_state(states["sampler"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path, device="cpu") -> dict:
    """The checkpoint's contents, or one clear UserError; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for bad files; all mean the same to a user
        if "Unsupported global" in str(e):  # the weights-only unpickler met a Python class
            raise UserError(f"{path} holds pickled Python objects, not a betavae checkpoint; refusing to load it")
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint")
    if not isinstance(state, dict) or state.get("format") != "betavae":
        raise UserError(f"{path} was not written by betavae")
    return state


def config_from_dict(stored: dict, path) -> Config:
    known = {f.name for f in fields(Config)}
    unknown = set(stored) - known
    if unknown:
        raise UserError(f"{path} has settings this betavae {__version__} does not know: {sorted(unknown)}")
    return Config(**stored)


def model_from_state(state: dict, path, device="cpu") -> tuple[BetaVAE, Config]:
    """Rebuild the model of a read checkpoint from its stored config: (model in eval mode, Config)."""
    cfg = config_from_dict(state["config"], path)
    model = BetaVAE(cfg.latent_dim, cfg.channels, cfg.arch)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} holds a model of another architecture ({first})")
    return model.to(device).eval(), cfg


def load_checkpoint(path, device="cpu") -> tuple[BetaVAE, Config]:
    """Rebuild the model from a checkpoint alone: (model in eval mode, its Config)."""
    return model_from_state(read_checkpoint(path, device), path, device)


# ----------------------------------------------------------------------------------------------------
# Training.

# what an epoch line, history.csv and TensorBoard report of the loss: the terms, then the KL's three parts
LOGGED_TERMS = ("recon", "kl", "total", "mi", "tc", "dwkl")


def logged_terms(parts: dict) -> torch.Tensor:
    """The LOGGED_TERMS of loss_terms' output as one vector, for running sums."""
    return torch.stack([parts[name] for name in LOGGED_TERMS]).detach()


def loss_settings(cfg: Config, beta: float, capacity, n_data: int) -> dict:
    """loss_terms' keyword arguments for a run at this point of its schedule (n_data: training images).
    Under --objective tc a warm-up (beta_eff < beta) weights the whole KL term by beta_eff / beta, as it
    does under kl: ramping the TC's weight alone would leave the early epochs a plain VAE's, which
    collapses as easily, and would reward dependence while beta_eff < 1."""
    if cfg.objective == "tc":
        beta, warm = cfg.beta, beta / cfg.beta if cfg.beta else 1.0
    else:
        warm = 1.0
    return dict(recon=cfg.recon, beta=beta, free_bits=cfg.free_bits, capacity=capacity, gamma=cfg.gamma,
                objective=cfg.objective, tc_estimator=cfg.tc_estimator, n_data=n_data, warm=warm, prior=cfg.prior)


def train_step(model, optimizer, x, cfg: Config, beta: float, capacity, n_data: int = 0) -> dict[str, torch.Tensor]:
    """One Adam step on a batch. It does not look at the loss's value, which would make the host wait for
    the device every step: train_epoch checks for NaN/inf every CHECK_EVERY steps instead."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        outputs = model(x)
    logits, mu, logvar, z = (t.float() for t in outputs)  # the loss's sums and exp in float32
    parts = loss_terms(logits, x, mu, logvar, z, **loss_settings(cfg, beta, capacity, n_data))
    optimizer.zero_grad(set_to_none=True)
    parts["total"].backward()
    if cfg.clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return parts


def val_batch_size(cfg: Config) -> int:
    """The TC objective is estimated on a batch, so it validates at the training batch size: the number
    ReduceLROnPlateau watches must be the training objective."""
    return cfg.batch_size if cfg.objective == "tc" else 256


@torch.no_grad()
def validate(model, loader, cfg: Config, beta: float, capacity, device, n_data: int = 0) -> dict:
    """The epoch's training objective on validation data (eval mode, fixed noise), its terms, per-dim KL."""
    was_training = model.training
    model.eval()
    broadcast_buffers(model)  # every rank validates the model the checkpoint stores: rank 0's
    generator = torch.Generator(device).manual_seed(0)  # same noise every epoch: losses compare
    n_terms = len(LOGGED_TERMS)
    sums = torch.zeros(n_terms + cfg.latent_dim + 1, device=device)  # the terms, per-dim KL, images
    codes = []
    for x in loader:
        x = x.to(device).contiguous(memory_format=memory_format(device))
        logits, mu, logvar, z = model(x, generator)
        parts = loss_terms(logits, x, mu, logvar, z, **loss_settings(cfg, beta, capacity, n_data))
        sums += torch.cat([logged_terms(parts), parts["kl_per_dim"], torch.ones(1, device=device)]) * len(x)
        codes.append(mu.double().cpu())
    model.train(was_training)
    sums = all_sum(sums)  # under torchrun each rank validated its share
    means = (sums[:-1] / sums[-1]).tolist()
    return {**dict(zip(LOGGED_TERMS, means)), "kl_per_dim": means[n_terms:], "codes": torch.cat(codes).numpy()}


def item_factors(data: Dataset) -> Optional[tuple[np.ndarray, tuple]]:
    """((N, K) factor classes of every item, the factor names) of a dataset with ground-truth factors, or of
    (nested) Subsets of one; None for data without factors."""
    data, indices = base_items(data)
    return (data.factors(indices).numpy(), data.factor_names) if hasattr(data, "factors") else None


def validation_factors(codes: np.ndarray, val_set: Dataset) -> Optional[list[list]]:
    """dim_factors() of validation codes (a fixed sample, in the loader's order); None without factors."""
    known = item_factors(val_set)
    return None if known is None else dim_factors(codes, *known)


def active_dims(kl_dims: list[float], threshold: float = 0.01) -> int:
    """Latent dims whose mean KL exceeds `threshold` nats: the ones that carry information."""
    return sum(k > threshold for k in kl_dims)


@torch.no_grad()
def save_epoch_images(model, val_images, sample_z, out: Path, epoch: int, writer=None) -> None:
    """Originals above their reconstructions (decoded from mu), and prior samples at fixed z."""
    model.eval()
    recon = model.decode(model.encode(val_images)[0])
    samples = model.decode(sample_z)
    model.train()
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    save_image(torch.cat([val_images, recon]).cpu(), folder / f"recon_e{epoch:03d}.png", nrow=len(val_images))
    save_image(samples.cpu(), folder / f"samples_e{epoch:03d}.png", nrow=8)
    if writer is not None:
        writer.add_images("images/reconstruction", torch.cat([val_images, recon]).cpu(), epoch)
        writer.add_images("images/samples", samples.cpu(), epoch)


HISTORY_FIELDS = ["epoch", *(f"{split}_{name}" for split in ("train", "val") for name in LOGGED_TERMS),
                  "beta_eff", "capacity", "lr", "active_dims", "img_per_s", "elapsed_s"]


METRIC_NAMES = ["mig", "sap", "modularity", "dci_disentanglement", "dci_completeness", "dci_informativeness",
                "beta_vae_score", "factor_vae_score"]


def write_history(history: list[dict], path: Path) -> None:
    """history.csv: one row per epoch, the metrics where --eval-every computed them, and the per-dim
    validation KL in columns kl_dim0, kl_dim1, ..."""
    n_dims = len(history[0]["kl_per_dim"])
    metrics = [m for m in METRIC_NAMES if any(m in row for row in history)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HISTORY_FIELDS + metrics + [f"kl_dim{d}" for d in range(n_dims)])
        for row in history:
            values = ["" if row.get(k) is None else row[k] for k in HISTORY_FIELDS + metrics]
            w.writerow(values + [f"{k:.6g}" for k in row["kl_per_dim"]])


def pyplot():
    """matplotlib's pyplot, imported on first use: it is slow to import and only the charts need it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_loss_curves(axes, history: list[dict]) -> None:
    """Train vs validation recon, KL and total per epoch (rows), on linear and log axes (columns); then
    the KL's three parts (MI, TC, dimension-wise KL), train on the left, validation on the right."""
    epochs = [row["epoch"] for row in history]
    for ax, split in zip(axes[3], ("train", "val")):
        for term, label in (("mi", "index-code MI"), ("tc", "total correlation"), ("dwkl", "dimension-wise KL")):
            ax.plot(epochs, [r.get(f"{split}_{term}", math.nan) for r in history], "o-", label=label)
        ax.set(title=f"the KL's parts, {'validation' if split == 'val' else split} (nats)", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax_row, term in zip(axes, ("recon", "kl", "total")):
        for ax, scale in zip(ax_row, ("linear", "log")):
            ax.plot(epochs, [r[f"train_{term}"] for r in history], "o-", label="train")
            ax.plot(epochs, [r[f"val_{term}"] for r in history], "s--", label="validation")
            ax.set_yscale(scale)
            ax.set_ylabel({"recon": "recon", "kl": "KL (nats)", "total": "objective"}[term])
            ax.set_title(f"{term}, {scale} scale")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0][0].legend()


def draw_metrics(ax, history: list[dict]) -> None:
    """MIG and FactorVAE score over the epochs where --eval-every measured them."""
    for name in ("mig", "factor_vae_score", "dci_disentanglement"):
        points = [(r["epoch"], r[name]) for r in history if r.get(name) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=name)
    ax.set(title="disentanglement (train --eval-every)", xlabel="epoch", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()


def plot_loss_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()
    has_metrics = any(r.get("mig") is not None for r in history)
    fig, axes = plt.subplots(4 + has_metrics, 2, figsize=(10, 12 + 3 * has_metrics), squeeze=False)
    draw_loss_curves(axes, history)
    if has_metrics:
        draw_metrics(axes[4][0], history)
        axes[4][1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def tensorboard_writer(cfg: Config, out: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(out / "tensorboard")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what `kill` or a job scheduler sends


class StopOnCtrlC:
    """The first Ctrl-C (or SIGTERM) asks training to stop at the next step boundary, where state is consistent."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.requested:  # a second one means: stop now, without saving
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: saving last.pt after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def given_flags(argv: list[str]) -> set[str]:
    """Config fields the user typed on the command line (abbreviations are disabled)."""
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def prepare_run(args) -> tuple[Config, Optional[dict]]:
    """The run's Config and, with --resume, the checkpoint to continue from."""
    cfg = config_from_args(args)
    cfg.out = cfg.out or f"runs/{cfg.dataset}-beta{cfg.beta:g}"
    last = Path(cfg.out) / "last.pt"
    if not args.resume:
        if last.exists():
            raise UserError(f"{cfg.out} already holds a run; add --resume to continue it, or choose another --out")
        return cfg, None
    if not last.exists():
        raise UserError(f"nothing to resume: {last} does not exist")
    state = read_checkpoint(last)
    stored = config_from_dict(state["config"], last)
    for name in (args.given & {f.name for f in fields(Config)}) - RESUMABLE_FLAGS:
        if getattr(cfg, name) != getattr(stored, name):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the run being "
                            f"resumed ({getattr(stored, name)}); start a new run with another --out")
    for name in RESUMABLE_FLAGS:
        setattr(stored, name, getattr(cfg, name))
    return stored, state


def make_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror}")


def format_duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def format_epoch(row: dict, cfg: Config, eta: float) -> str:
    """One line per epoch: losses, the KL's three parts, schedule, active dims, lr, speed and time."""
    schedule_part = f"beta {row['beta_eff']:.3g}" if row["capacity"] is None else f"C {row['capacity']:.3g}"
    return (f"epoch {row['epoch']:3d}/{cfg.epochs} | train recon {row['train_recon']:.2f} kl {row['train_kl']:.2f} "
            f"total {row['train_total']:.2f} | val recon {row['val_recon']:.2f} kl {row['val_kl']:.2f} "
            f"total {row['val_total']:.2f} | val mi {row['val_mi']:.2f} tc {row['val_tc']:.2f} "
            f"dwkl {row['val_dwkl']:.2f} | {schedule_part} | active {row['active_dims']}/{cfg.latent_dim} | "
            f"lr {row['lr']:.1e} | {row['img_per_s']:.0f} img/s | {format_duration(row['elapsed_s'])} "
            f"elapsed, ETA {format_duration(eta)}")


def recon_stalled(history: list[dict], patience: int) -> bool:
    """Neither the training nor the validation recon of the last `patience` epochs beat the best before
    them by 0.1 % (the validation recon alone wanders by a few % while the training recon still falls)."""
    def stalled(key: str) -> bool:
        before = min(r[key] for r in history[:-patience])
        return min(r[key] for r in history[-patience:]) > before * 0.999
    return len(history) > patience and stalled("val_recon") and stalled("train_recon")


def warn_if_stuck(history: list[dict], cfg: Config, patience: int = 5) -> None:
    """Warn about the two failures the tutorial's debugging guide names: collapse and a stalled recon
    (once, when the stall begins: a long run's plateaus would otherwise repeat it every epoch)."""
    last = history[-1]
    if last["epoch"] >= 2 and last["val_kl"] < 0.1 and (last["beta_eff"] > 0 or last["capacity"]):
        print(f"warning: validation KL is {last['val_kl']:.3f} nats: the posterior has collapsed onto the prior "
              f"(lower --beta, or try --kl-warmup / --capacity)")
    if recon_stalled(history, patience) and not recon_stalled(history[:-1], patience):
        print(f"warning: the reconstruction has not improved for {patience} epochs "
              f"(lr is {last['lr']:.1e}; docs/training.md lists the remedies)")


def log_tensorboard(writer, row: dict) -> None:
    for split in ("train", "val"):
        for term in LOGGED_TERMS:
            writer.add_scalar(f"loss/{term}_{split}", row[f"{split}_{term}"], row["epoch"])
    writer.add_scalar("schedule/beta_eff", row["beta_eff"], row["epoch"])
    if row["capacity"] is not None:
        writer.add_scalar("schedule/capacity", row["capacity"], row["epoch"])
    writer.add_scalar("schedule/lr", row["lr"], row["epoch"])
    writer.add_scalar("latent/active_dims", row["active_dims"], row["epoch"])
    writer.add_scalar("speed/img_per_s", row["img_per_s"], row["epoch"])


# steps between the moments the host waits for the device: to check the losses for NaN/inf and, under
# torchrun, to agree on Ctrl-C (a GPU runs ahead of Python in between)
CHECK_EVERY = 50


def add_checked_steps(pending: list, run: dict) -> Optional[int]:
    """Add the pending steps' (losses x images, images) to the run's sums in step order, with one wait for
    the device; returns the epoch step number of the first non-finite loss (not added), else None."""
    if not pending:
        return None
    values = torch.stack([terms for terms, _ in pending]).cpu()
    for terms, (_, n) in zip(values, pending):
        if not torch.isfinite(terms[LOGGED_TERMS.index("total")]):
            return run["step"] + 1
        run["sums"] += terms
        run["seen"] += n
        run["step"] += 1
    pending.clear()
    return None


def check_steps(pending: list, run: dict, stop: StopOnCtrlC, epoch: int, cfg: Config, device) -> bool:
    """Add the pending steps to the run; stop every process with one line on a NaN/inf loss (its weights
    are never saved: last.pt keeps the last good epoch); True when any process had Ctrl-C."""
    bad = add_checked_steps(pending, run)
    bad_anywhere, stop.requested = agree_on(bad is not None, stop.requested, device=device)
    if bad_anywhere:
        where = f"step {bad}" if bad else "a step of another process"
        raise UserError(f"the loss became NaN/inf at epoch {epoch} {where}; stopped. {cfg.out}/last.pt keeps "
                        f"the last good epoch (try a lower --lr or --clip-grad)", code=1)
    return stop.requested


def warm_lr(cfg: Config, epoch: int, step: int, steps: int) -> float:
    """The lr of 0-based step `step` of the epoch's `steps` under --lr-warmup: cfg.lr times the fraction of
    the warm-up done after the step, reaching cfg.lr at the last step of epoch cfg.lr_warmup."""
    return cfg.lr * min(1.0, (epoch - 1 + (step + 1) / steps) / cfg.lr_warmup)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_epoch(model, optimizer, loader, cfg: Config, epoch: int, beta: float, capacity, n_data: int, run: dict,
                stop: StopOnCtrlC, device) -> tuple[int, float]:
    """Train on the epoch's remaining batches, adding the losses to `run` every CHECK_EVERY steps (on a GPU
    the loop never waits for the device in between); stops early between steps after Ctrl-C (alone, at the
    next step; under torchrun, at the next check). Returns (images seen, seconds)."""
    model.train()
    fmt, tty, alone = memory_format(device), sys.stdout.isatty(), not torch.distributed.is_initialized()
    t0, images, total_steps, pending = time.perf_counter(), 0, run["step"] + len(loader), []
    for x in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        if epoch <= cfg.lr_warmup:
            set_lr(optimizer, warm_lr(cfg, epoch, run["step"] + len(pending), total_steps))
        parts = train_step(model, optimizer, x, cfg, beta, capacity, n_data)
        pending.append((logged_terms(parts) * len(x), len(x)))
        images += len(x)
        if tty and (run["step"] + len(pending)) % 10 == 0:
            print(f"\r  epoch {epoch}: {run['step'] + len(pending)}/{total_steps} steps, "
                  f"{images / (time.perf_counter() - t0):.0f} img/s", end="", flush=True)
        if (len(pending) == CHECK_EVERY or stop.requested and alone) and check_steps(pending, run, stop, epoch,
                                                                                      cfg, device):
            break
    check_steps(pending, run, stop, epoch, cfg, device)
    if tty:
        print("\r" + " " * 60 + "\r", end="")
    return images, time.perf_counter() - t0


# a tenth of `evaluate`'s sample: DCI's 100 boosted trees per factor class dominate the time
EVAL_EVERY_SAMPLE = {"n": 1000, "points": (1000, 500)}


def training_metrics(model: BetaVAE, cfg: Config, device) -> dict[str, float]:
    """The disentanglement metrics during training (--eval-every), on the smaller EVAL_EVERY_SAMPLE."""
    dataset = full_dataset(cfg)
    if not hasattr(dataset, "render"):
        return {}
    metrics = disentanglement_metrics(encoder_representation(model, dataset, device),
                                      FactorSampler.of_dataset(dataset), seed=0, **EVAL_EVERY_SAMPLE)
    model.train()
    return metrics


def train(args) -> None:
    """Train a Beta-VAE: Adam + ReduceLROnPlateau, a checkpoint every epoch, exact resume; under torchrun,
    DistributedDataParallel with rank 0 alone printing and writing."""
    cfg, resumed = prepare_run(args)
    ranks, device = start_ranks(cfg)
    try:
        train_ranks(cfg, resumed, args, ranks, device)
    finally:
        if torch.distributed.is_initialized():
            gc.collect()  # free the DDP wrapper (held in reference cycles) while its process group lives
            torch.distributed.destroy_process_group()


@dataclass
class Training:
    """What one process of a training run holds: the settings, the data, the model and its optimiser, and
    `run`, the progress a checkpoint stores beyond the weights."""
    cfg: Config
    ranks: Ranks
    device: torch.device
    out: Path
    train_set: Dataset
    val_set: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    sampler_rng: torch.Generator  # the same on every rank: they share one epoch order
    run: dict
    writer: object = None
    clock: float = 0.0  # when the time not yet added to run["elapsed"] began


def new_progress(sampler_rng: torch.Generator) -> dict:
    """A run's progress: epochs and steps done, the current epoch's loss sums, the history, the best
    validation objective, the training time, and the sampler state at the current epoch's start."""
    return {"epoch": 0, "step": 0, "sums": torch.zeros(len(LOGGED_TERMS)), "seen": 0, "history": [],
            "best": math.inf, "elapsed": 0.0, "epoch_sampler": sampler_rng.get_state()}


def start_training(cfg: Config, resumed: Optional[dict], args, ranks: Ranks, device: torch.device) -> Training:
    """Seed, load the data, make the output folder, build the model, optimiser and scheduler; from the
    checkpoint when resuming."""
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    seed_everything(cfg.seed + ranks.rank)  # each rank its own reparameterisation noise
    if cfg.amp and device.type not in ("cpu", "cuda"):
        raise UserError(f"--amp (bfloat16 autocast) runs on the CPU or CUDA, not {device.type}")
    if not ranks.main:
        torch.distributed.barrier()  # wait while rank 0 alone fetches --download files
    train_set, val_set = make_datasets(cfg, download=args.download)
    out = Path(cfg.out)
    if ranks.main:
        make_output_folder(out)
        if ranks.world > 1:
            torch.distributed.barrier()
    model = BetaVAE(cfg.latent_dim, cfg.channels, cfg.arch).to(device, memory_format=memory_format(device))
    if cfg.mean_init and not resumed:
        model.decoder.init_output_bias(mean_intensity(train_set).to(device))
    if cfg.sync_bn:  # same parameters and state_dict keys: checkpoints load into a plain BetaVAE
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                           patience=cfg.lr_patience)
    sampler_rng = torch.Generator().manual_seed(cfg.seed)
    t = Training(cfg, ranks, device, out, train_set, val_set, model, optimizer, scheduler, sampler_rng,
                 new_progress(sampler_rng), tensorboard_writer(cfg, out) if ranks.main else None)
    if resumed:
        resume(t, resumed)
    return t


def resume(t: Training, resumed: dict) -> None:
    """Continue from a checkpoint: weights, optimiser, scheduler, progress and every random state."""
    t.model.load_state_dict(resumed["model"])
    t.optimizer.load_state_dict(resumed["optimizer"])
    t.scheduler.load_state_dict(resumed["scheduler"])
    t.scheduler.patience = t.cfg.lr_patience  # the stored state holds the old patience; --resume may change it
    t.run = resumed["run"]
    # a run begun before the KL's parts were logged summed 3 terms: its current epoch starts them at 0
    t.run["sums"] = torch.cat([t.run["sums"], torch.zeros(len(LOGGED_TERMS) - len(t.run["sums"]))])
    rngs = resumed.get("rng_ranks", [resumed["rng"]])
    if len(rngs) != t.ranks.world:
        raise UserError(f"{t.out} was trained by {len(rngs)} process(es); resume it with as many")
    set_rng_states(rngs[t.ranks.rank], t.sampler_rng)
    if not t.ranks.main:  # the checkpoint's partial epoch sums are already the total over the ranks
        t.run.update(sums=torch.zeros(len(LOGGED_TERMS)), seen=0)


def save_run(t: Training, *paths: Path) -> None:
    """Checkpoint the run into `paths` (rank 0 writes; every rank hands over its random state)."""
    rngs = all_gather(rng_states(t.sampler_rng))  # every rank's noise state, for an exact resume
    last = t.run["history"][-1] if t.run["history"] else {}
    for path in paths if t.ranks.main else ():
        save_checkpoint(path, {
            "format": "betavae", "version": __version__, "config": asdict(t.cfg),
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "run": t.run, "rng": rngs[0],
            **({"rng_ranks": rngs} if t.ranks.world > 1 else {}),
            # the latest validation KL of every dim: the figures rank the latent dims by it
            "kl_per_dim": last.get("kl_per_dim"),
            # the factor each dim carries most, on the same validation images: the traversal's labels
            "dim_factors": last.get("dim_factors")})


def print_start(t: Training, workers: int, defaults_used: Optional[str], resumed: bool) -> None:
    """The run's first lines: data, device, size, the dataset's defaults, the loss and its reductions."""
    cfg, n_params = t.cfg, sum(p.numel() for p in t.model.parameters())
    processes = f" | {t.ranks.world} processes, global batch {cfg.batch_size * t.ranks.world}" if t.ranks.world > 1 else ""
    print(f"betavae {__version__} | device {t.device}{processes} | {cfg.dataset}: {len(t.train_set):,} train / "
          f"{len(t.val_set):,} val images, {cfg.channels}x{IMAGE_SIZE}x{IMAGE_SIZE} | {n_params:,} parameters")
    if defaults_used:
        print(defaults_used)
    print(describe_loss(cfg, len(t.train_set)))
    lr, batch = default_lr_batch(cfg.dataset)
    by_rule = cfg.lr == lr and cfg.batch_size != batch
    print(f"seed {cfg.seed} | {data_path(t.train_set, t.device, workers)} | {cfg.epochs} epochs of "
          f"{cfg.epoch_size or len(t.train_set):,} images, batch {cfg.batch_size}, lr {cfg.lr:g}"
          + (f" ({LR_RULE})" if by_rule else "")
          + f" | writing {t.out}" + (" (resumed)" if resumed else ""))


def take_time(t: Training) -> float:
    """Add the time since the last call to the run's training time; returns now."""
    now = time.perf_counter()
    t.run["elapsed"] += now - t.clock
    t.clock = now
    return now


def train_epoch_batches(t: Training, trained, epoch: int, beta: float, capacity, loader, batches: EpochBatches,
                        stop: StopOnCtrlC) -> tuple[int, float]:
    """Draw the epoch's order (replayed from its start when resuming inside it), train on this rank's
    remaining batches and total the losses over the ranks; after Ctrl-C inside the epoch, save and stop."""
    if t.run["step"]:  # resuming inside this epoch: replay its order from the epoch's start
        t.sampler_rng.set_state(t.run["epoch_sampler"])
    t.run["epoch_sampler"] = t.sampler_rng.get_state()
    epoch_order = rank_batches(epoch_batches(t.train_set, t.cfg, t.sampler_rng), t.ranks)
    batches.batches = epoch_order[t.run["step"]:]
    images, seconds = train_epoch(trained, t.optimizer, loader, t.cfg, epoch, beta, capacity, len(t.train_set),
                                  t.run, stop, t.device)
    totals = all_sum(torch.cat([t.run["sums"], torch.tensor([float(t.run["seen"])])]).to(t.device)).cpu()
    t.run.update(sums=totals[:-1], seen=int(totals[-1]))
    if stop.requested and t.run["step"] < len(epoch_order):
        take_time(t)
        save_run(t, t.out / "last.pt")
        raise UserError(f"interrupted at epoch {epoch} step {t.run['step']}: saved {t.out / 'last.pt'}; "
                        f"continue with --resume", code=130)
    return images, seconds


def epoch_row(t: Training, epoch: int, beta: float, capacity, val: dict, val_share: Dataset, images: int,
              seconds: float) -> dict:
    """The epoch's line of the history: losses and their parts, schedule, lr, active dims, speed, time,
    per-dim KL and factor labels, and with --eval-every the disentanglement metrics."""
    row = {"epoch": epoch, **{f"train_{name}": value for name, value in
                              zip(LOGGED_TERMS, (t.run["sums"] / t.run["seen"]).tolist())},
           **{f"val_{name}": val[name] for name in LOGGED_TERMS},
           "beta_eff": beta, "capacity": capacity, "lr": t.optimizer.param_groups[0]["lr"],
           "active_dims": active_dims(val["kl_per_dim"]), "img_per_s": images * t.ranks.world / max(seconds, 1e-9),
           "elapsed_s": t.run["elapsed"] + time.perf_counter() - t.clock, "kl_per_dim": val["kl_per_dim"],
           "dim_factors": validation_factors(val["codes"], val_share) if t.ranks.main else None}
    if t.ranks.main and t.cfg.eval_every and (epoch % t.cfg.eval_every == 0 or epoch == t.cfg.epochs):
        row.update(training_metrics(t.model, t.cfg, t.device))
    return row


def record_epoch(t: Training, row: dict, val_total: float, previews: tuple) -> None:
    """Keep the epoch: history, pictures, charts and TensorBoard (rank 0), then last.pt and, when its
    validation objective is the lowest so far, best.pt; then the epoch's line."""
    t.run["history"].append(row)
    t.run.update(epoch=row["epoch"], step=0, sums=torch.zeros(len(LOGGED_TERMS)), seen=0)
    if t.ranks.main:
        save_epoch_images(t.model, *previews, t.out, row["epoch"], t.writer)
        write_history(t.run["history"], t.out / "history.csv")
        plot_loss_curves(t.run["history"], t.out / "loss_curves.png")
    if t.writer is not None:
        log_tensorboard(t.writer, row)
    # under warm-up or capacity annealing the objective changes each epoch: compare final ones only
    is_best = val_total < t.run["best"] or not schedule_done(t.cfg, row["epoch"])
    if schedule_done(t.cfg, row["epoch"]):
        t.run["best"] = min(t.run["best"], val_total)
    take_time(t)
    save_run(t, t.out / "last.pt", *([t.out / "best.pt"] if is_best else []))
    print(format_epoch(row, t.cfg, row["elapsed_s"] / row["epoch"] * (t.cfg.epochs - row["epoch"])), flush=True)
    if "mig" in row:
        print("  metrics (n 1000): " + ", ".join(f"{m} {row[m]:.3f}" for m in METRIC_NAMES))
    warn_if_stuck(t.run["history"], t.cfg)


def train_ranks(cfg: Config, resumed: Optional[dict], args, ranks: Ranks, device: torch.device) -> None:
    """The training loop of one process: epochs of Adam steps, each validated, recorded and checkpointed."""
    t = start_training(cfg, resumed, args, ranks, device)
    if t.run["epoch"] >= cfg.epochs:
        print(f"{t.out} has already trained {t.run['epoch']} epochs; pass a larger --epochs to continue")
        return
    if ranks.main:
        (t.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    # DDP copies rank 0's weights to every rank, then averages the gradients in backward
    trained = t.model if ranks.world == 1 else nn.parallel.DistributedDataParallel(
        t.model, device_ids=[device.index] if device.type == "cuda" else None)
    trained = compiled(trained) if cfg.compile else trained  # shares its parameters with `model`
    loader, batches, workers = train_loader(t.train_set, cfg, device)
    val_share = t.val_set if ranks.world == 1 else Subset(t.val_set, range(ranks.rank, len(t.val_set), ranks.world))
    val_loader = DataLoader(val_share, batch_size=val_batch_size(cfg), num_workers=workers,
                            persistent_workers=workers > 0, generator=torch.Generator())  # its own generator too
    previews = (preview_images(t.val_set, 8).to(device),  # fixed images and codes drawn every epoch
                prior_sample(cfg.prior, 64, cfg.latent_dim, 0).to(device))
    print_start(t, workers, None if resumed else describe_defaults(cfg, args.given), resumed is not None)

    t.clock = time.perf_counter()
    with StopOnCtrlC() as stop:
        for epoch in range(t.run["epoch"] + 1, cfg.epochs + 1):
            beta, capacity = schedule(cfg, epoch)
            images, seconds = train_epoch_batches(t, trained, epoch, beta, capacity, loader, batches, stop)
            val = validate(t.model, val_loader, cfg, beta, capacity, device, len(t.train_set))
            t.scheduler.step(val["total"])
            record_epoch(t, epoch_row(t, epoch, beta, capacity, val, val_share, images, seconds), val["total"],
                         previews)
            if agree_on(stop.requested, device=device)[0]:
                raise UserError(f"interrupted after epoch {epoch}: saved {t.out / 'last.pt'}; continue with --resume",
                                code=130)
    if t.writer is not None:
        t.writer.close()
    check_replicas(t.model, ranks)
    print(f"done: {t.out / 'best.pt'} (best validation objective), {t.out / 'last.pt'}, {t.out / 'history.csv'}")


# ----------------------------------------------------------------------------------------------------
# Visualisation: the tutorial's pictures, each made from a checkpoint alone and decoded in one batch.

def newest_checkpoint() -> Path:
    found = sorted(Path("runs").glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError("no checkpoint in runs/*/best.pt: train one first, or pass --checkpoint")
    return found[-1]


def open_checkpoint(args) -> tuple[BetaVAE, Config, dict, Path, torch.device]:
    """The figure commands' common start: the checkpoint (given or newest), its model and device."""
    path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
    device = pick_device(args.device)
    state = read_checkpoint(path, device)
    model, cfg = model_from_state(state, path, device)
    return model, cfg, state, path, device


def output_path(args, run: Path, name: str) -> Path:
    """--out, or `name` in the run's folder; its folder is made and checked writable."""
    path = Path(args.out) if args.out else run / name
    make_output_folder(path.parent)
    return path


def checkpoint_validation(model: BetaVAE, cfg: Config, device) -> dict:
    """validate() for a loaded checkpoint: its validation data at the run's final beta_eff / capacity.
    `device` may be a name ("cpu"), as export.py passes it."""
    device = torch.device(device)
    train_set, val_set = make_datasets(cfg)
    loader = DataLoader(val_set, batch_size=val_batch_size(cfg), generator=torch.Generator())
    return validate(model, loader, cfg, *schedule(cfg, cfg.epochs), device, len(train_set))


def kl_ranking(state: dict, model: BetaVAE, cfg: Config, device) -> list[tuple[int, float]]:
    """(dim, mean validation KL) pairs, most informative first: stored at the end of every epoch,
    measured now for a checkpoint saved by Ctrl-C inside its first epoch."""
    kl = state.get("kl_per_dim") or checkpoint_validation(model, cfg, device)["kl_per_dim"]
    return sorted(enumerate(kl), key=lambda pair: -pair[1])


def factor_labels(state: dict, model: BetaVAE, cfg: Config, device) -> Optional[list[list]]:
    """Per latent dim [factor, normalised MI] on the validation images: stored at the end of every epoch,
    measured now for an older checkpoint; None for data without ground-truth factors."""
    if state.get("dim_factors") is not None:
        return state["dim_factors"]
    _, val_set = make_datasets(cfg)
    if item_factors(val_set) is None:
        return None
    return validation_factors(checkpoint_validation(model, cfg, device)["codes"], val_set)


def dataset_images(cfg: Config, indices: list[int]) -> torch.Tensor:
    """Items of the checkpoint's dataset, (N, C, 64, 64)."""
    dataset = full_dataset(cfg)
    for i in indices:
        if not 0 <= i < len(dataset):
            raise UserError(f"--index {i} is outside {cfg.dataset}'s {len(dataset):,} images (0 to {len(dataset) - 1})")
    return torch.stack([dataset[i] for i in indices])


def to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().cpu().numpy()


def base_code(args, model: BetaVAE, cfg: Config, device) -> torch.Tensor:
    """The code the traversal starts from: the prior mean 0 with --prior, else mu of --image, of
    --index, or of the dataset item in the middle of every factor (for shapes: a centred ellipse; the
    middle item for a dataset without factors)."""
    if args.prior:
        return torch.zeros(cfg.latent_dim, device=device)
    if args.image:
        x = torch.from_numpy(read_image(args.image, cfg.channels, IMAGE_SIZE))
    else:
        dataset = full_dataset(cfg)
        sizes = getattr(dataset, "factor_sizes", None)
        middle = int(np.ravel_multi_index([s // 2 for s in sizes], sizes)) if sizes else len(dataset) // 2
        x = dataset_images(cfg, [middle if args.index is None else args.index])
    return model.encode(x.to(device))[0][0]


@torch.no_grad()
def traverse(args) -> None:
    """Latent traversal: each row sweeps one latent dim from -range to +range, the others held fixed."""
    values = traversal_values(args.range, args.steps)
    model, cfg, state, path, device = open_checkpoint(args)
    shown = select_dims(kl_ranking(state, model, cfg, device), args.dims)
    dims = [d for d, _ in shown]
    codes = traversal_codes(base_code(args, model, cfg, device).cpu().numpy(), dims, values)
    images = to_numpy(model.decode(torch.from_numpy(codes).to(device)))
    rows, columns = traversal_labels(shown, values, factor_labels(state, model, cfg, device))
    out = output_path(args, path.parent, "traverse.png")
    save_figure(labelled(image_grid(images, args.steps), IMAGE_SIZE + PADDING, rows, columns), out, "traversal")
    if args.gif:
        traversal_gif(images, dims, out.with_suffix(".gif"))


@torch.no_grad()
def interpolate(args) -> None:
    """Rows of decoded codes between two images' mu, with the two originals at the ends."""
    model, cfg, _, path, device = open_checkpoint(args)
    if args.images:
        x = torch.from_numpy(np.concatenate([read_image(p, cfg.channels, IMAGE_SIZE) for p in args.images]))
    elif args.index:
        if len(args.index) % 2:
            raise UserError("--index takes pairs of indices: A B [C D ...]")
        x = dataset_images(cfg, args.index)
    else:
        pick = torch.Generator().manual_seed(args.seed)
        x = dataset_images(cfg, torch.randint(len(full_dataset(cfg)), (2 * args.pairs,), generator=pick).tolist())
    mu = to_numpy(model.encode(x.to(device))[0])
    codes = np.concatenate([interpolation_codes(mu[i], mu[i + 1], args.steps, args.slerp) for i in range(0, len(x), 2)])
    decoded = to_numpy(model.decode(torch.from_numpy(codes).to(device)))
    save_figure(interpolation_figure(to_numpy(x), decoded), output_path(args, path.parent, "interpolate.png"), "interpolation")


@torch.no_grad()
def sample(args) -> None:
    """Images decoded from z drawn from the model's prior (--prior), scaled by the temperature."""
    if args.n < 1 or args.temperature <= 0:
        raise UserError("--n must be >= 1 and --temperature > 0")
    model, cfg, _, path, device = open_checkpoint(args)
    z = prior_sample(cfg.prior, args.n, cfg.latent_dim, args.seed) * args.temperature
    images = to_numpy(model.decode(z.to(device)))
    save_figure(image_grid(images, math.ceil(math.sqrt(args.n))), output_path(args, path.parent, "samples.png"),
                f"{args.n} samples")


@torch.no_grad()
def reconstruct(args) -> None:
    """Validation images above their reconstructions from mu, each labelled with its error."""
    if args.n < 1:
        raise UserError("--n must be >= 1")
    model, cfg, _, path, device = open_checkpoint(args)
    _, val_set = make_datasets(cfg)
    x = preview_images(val_set, args.n).to(device)
    logits = model.decoder.logits(model.encode(x)[0])
    errors = [recon_loss(logits[i:i + 1], x[i:i + 1], cfg.recon).item() for i in range(len(x))]
    originals, recon = to_numpy(x), to_numpy(torch.sigmoid(logits))
    blocks = []
    for start in range(0, len(x), 8):  # blocks of 8 columns: errors, originals, reconstructions
        part = slice(start, start + 8)
        grid = image_grid(np.concatenate([originals[part], recon[part]]), len(originals[part]))
        blocks.append(labelled(grid, IMAGE_SIZE + PADDING, column_labels=[f"{cfg.recon} {e:.1f}" for e in errors[part]]))
    save_figure(stack_vertically(blocks), output_path(args, path.parent, "reconstruct.png"),
                f"{len(x)} reconstructions (mean {cfg.recon} {sum(errors) / len(errors):.2f})")


def read_history(path: Path) -> list[dict]:
    """history.csv back into the rows train() wrote."""
    if not path.is_file():
        raise UserError(f"no history.csv in {path.parent}")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{"epoch": int(r["epoch"]), "capacity": float(r["capacity"]) if r["capacity"] else None,
                 # a run begun before the KL's parts were logged has no mi, tc, dwkl columns: nan, a gap in charts
                 **{k: float(r.get(k) or "nan") for k in HISTORY_FIELDS if k not in ("epoch", "capacity")},
                 **{m: float(r[m]) for m in METRIC_NAMES if r.get(m)},
                 "kl_per_dim": [float(r[k]) for k in r if k.startswith("kl_dim")]} for r in rows]
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path} is not a betavae history.csv")


def plot(args) -> None:
    """The run's loss curves, its final per-dim KL (sorted), its beta_eff / capacity / lr schedule, and the
    disentanglement metrics when it was trained with --eval-every."""
    run = Path(args.run) if args.run else newest_checkpoint().parent
    history = read_history(run / "history.csv")
    if not history:
        raise UserError(f"{run / 'history.csv'} has no epochs yet")
    plt = pyplot()
    has_metrics = any("mig" in r for r in history)
    fig, axes = plt.subplots(5 + has_metrics, 2, figsize=(11, 15 + 3 * has_metrics))
    draw_loss_curves(axes[:4], history)
    if has_metrics:
        draw_metrics(axes[5][0], history)
        axes[5][1].axis("off")
    kl = sorted(history[-1]["kl_per_dim"], reverse=True)
    axes[4][0].bar(range(len(kl)), kl)
    axes[4][0].set(title=f"KL per latent dim after epoch {history[-1]['epoch']}, sorted "
                         f"({active_dims(kl)} active)", xlabel="latent dims, most informative first", ylabel="nats")
    epochs = [r["epoch"] for r in history]
    ax = axes[4][1]
    if history[-1]["capacity"] is None:
        ax.plot(epochs, [r["beta_eff"] for r in history], "o-", label="beta_eff")
    else:
        ax.plot(epochs, [r["capacity"] for r in history], "o-", label="capacity C (nats)")
    ax.set(title="schedule", xlabel="epoch")
    lr_axis = ax.twinx()
    lr_axis.plot(epochs, [r["lr"] for r in history], "r--", label="lr")
    lr_axis.set_yscale("log")
    lr_axis.set_ylabel("learning rate")
    ax.legend(loc="upper left")
    lr_axis.legend(loc="upper right")
    fig.tight_layout()
    out = output_path(args, run, "plot.png")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote plots: {out}")


# ----------------------------------------------------------------------------------------------------
# Command line: one subcommand per function; parsing happens only in main().

def add_config_flags(parser: argparse.ArgumentParser, names: Optional[list[str]] = None) -> None:
    """One --flag per Config field (or per field in `names`), with the field's default and help."""
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            per_dataset = {}  # value -> datasets whose defaults differ from the field's
            for dataset, (defaults, _) in DATASET_DEFAULTS.items():
                if f.name in defaults:
                    per_dataset.setdefault(defaults[f.name], []).append(dataset)
            others = "".join(f"; {', '.join(names)}: {value}" for value, names in per_dataset.items())
            shown = f" (default: {f.default}{others})" if f.default not in (None, "") else ""
            parser.add_argument(flag, type=f.metadata.get("type", type(f.default)), default=f.default,
                                choices=f.metadata.get("choices"), help=f.metadata["help"] + shown)


def metric_groups(text: str) -> tuple[str, ...]:
    """--metrics mig,factor_vae -> ("mig", "factor_vae"), in METRIC_GROUPS order."""
    chosen = set(text.split(","))
    if not chosen <= set(METRIC_GROUPS):
        raise argparse.ArgumentTypeError(f"choose from {','.join(METRIC_GROUPS)}")
    return tuple(g for g in METRIC_GROUPS if g in chosen)


def build_parser() -> Parser:
    parser = Parser(prog="betavae.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"betavae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    add_train_command(commands)
    add_picture_commands(commands)
    add_measuring_commands(commands)
    return parser


def add_train_command(commands) -> None:
    p = commands.add_parser("train", help="train a Beta-VAE", description=train.__doc__, allow_abbrev=False)
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--download", action="store_true", help="fetch the dataset's files into --data-dir if missing")
    p.set_defaults(func=train)


def checkpoint_options() -> Parser:
    """The options every command that reads a checkpoint shares."""
    figure = Parser(add_help=False)
    figure.add_argument("--checkpoint", help="checkpoint to read (default: the newest runs/*/best.pt)")
    figure.add_argument("--out", help="file to write (default: one in the checkpoint's folder)")
    figure.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run the model (default: auto)")
    return figure


def add_picture_commands(commands) -> None:
    """traverse, interpolate, sample and reconstruct: each draws one figure from a checkpoint."""
    figure = checkpoint_options()

    p = commands.add_parser("traverse", parents=[figure], help="latent traversal grid", description=traverse.__doc__)
    base = p.add_mutually_exclusive_group()
    base.add_argument("--image", help="base code: mu of this image file")
    base.add_argument("--index", type=int, help="base code: mu of this item of the checkpoint's dataset "
                      "(default: the item in the middle of every factor)")
    base.add_argument("--prior", action="store_true", help="base code: the prior mean 0")
    p.add_argument("--dims", default="auto", help="auto (active dims, at most 10), a count K, or 3,17,40 (default: auto)")
    p.add_argument("--range", type=float, default=3.0, help="sweep each dim from -range to +range (default: 3)")
    p.add_argument("--steps", type=int, default=11, help="values per dim (default: 11)")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF sweeping every shown dim")
    p.set_defaults(func=traverse)

    p = commands.add_parser("interpolate", parents=[figure], help="interpolate between images",
                            description=interpolate.__doc__)
    pair = p.add_mutually_exclusive_group()
    pair.add_argument("--index", type=int, nargs="+", help="dataset items, in pairs: A B [C D ...]")
    pair.add_argument("--images", nargs=2, metavar=("A", "B"), help="two image files")
    p.add_argument("--pairs", type=int, default=4, help="random dataset pairs when no images are given (default: 4)")
    p.add_argument("--steps", type=int, default=10, help="decoded points per row (default: 10)")
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--seed", type=int, default=0, help="picks the random pairs (default: 0)")
    p.set_defaults(func=interpolate)

    p = commands.add_parser("sample", parents=[figure], help="decode samples of the prior", description=sample.__doc__)
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="scales the prior's std (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of z (default: 0)")
    p.set_defaults(func=sample)

    p = commands.add_parser("reconstruct", parents=[figure], help="validation images and their reconstructions",
                            description=reconstruct.__doc__)
    p.add_argument("--n", type=int, default=16, help="number of images (default: 16)")
    p.set_defaults(func=reconstruct)


def add_measuring_commands(commands) -> None:
    """evaluate, bench, study and plot: numbers and charts."""
    p = commands.add_parser("evaluate", parents=[checkpoint_options()], help="validation losses and disentanglement metrics",
                            description=evaluate.__doc__)
    p.add_argument("--n", type=int, default=10_000, help="factor draws for MIG, SAP, DCI, modularity, and for "
                   "FactorVAE's variance estimate (default: 10000)")
    p.add_argument("--points", type=int, nargs=2, default=[10_000, 5_000], metavar=("TRAIN", "EVAL"),
                   help="beta-VAE and FactorVAE training and evaluation points (default: 10000 5000)")
    p.add_argument("--seed", type=int, default=0, help="results repeat exactly with the same seed (default: 0)")
    p.add_argument("--metrics", type=metric_groups, default=METRIC_GROUPS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(METRIC_GROUPS)} (default: all; dci is the slow one)")
    p.set_defaults(func=evaluate)

    p = commands.add_parser("bench", help="throughput of the loader, training step, encoder and decoder",
                            description=bench.__doc__)
    add_config_flags(p, BENCH_FLAGS)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repetition (default: 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions after warm-up (default: 5)")
    p.add_argument("--options", action="store_true",
                   help="also time each option of the training step (channels_last, fused Adam, --amp, --compile), "
                        "alone and together, against the plain loop")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=bench)

    p = commands.add_parser("study", help="time to disentangle: metrics against minutes for many settings",
                            description=study.__doc__)
    p.add_argument("--variants", type=lambda text: text.split(","), default=list(STUDY_VARIANTS), metavar="LIST",
                   help=f"comma-separated, from {','.join(STUDY_VARIANTS)} (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per variant (default: 0)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default: 20)")
    p.add_argument("--eval-epochs", type=int, default=2, help="score every this many epochs (default: 2)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="runs side by side, sharing the CPU cores (default: half the cores)")
    p.add_argument("--n", type=int, default=5000, help="factor draws for MIG (default: 5000)")
    p.add_argument("--points", type=int, nargs=2, default=[200, 100], metavar=("TRAIN", "EVAL"),
                   help="FactorVAE training and evaluation points (default: 200 100)")
    p.add_argument("--common", default="", help='train flags added to every variant, e.g. "--epoch-size 10000"')
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(default: auto)")
    p.add_argument("--out", default="runs/study", help="study folder (default: runs/study)")
    p.add_argument("--collect", action="store_true",
                   help="train and score nothing: tabulate the stages already scored, as after a stopped study")
    p.set_defaults(func=study)

    p = commands.add_parser("plot", help="charts of a run's history.csv", description=plot.__doc__)
    p.add_argument("--run", help="run folder (default: the newest runs/* with a best.pt)")
    p.add_argument("--out", help="PNG to write (default: RUN/plot.png)")
    p.set_defaults(func=plot)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    report_errors(args.func, args)


# ====================================================================================================
# The extended machinery: real-data loaders, disentanglement metrics, several processes, benchmark and
# study. The core above is the whole Beta-VAE; what follows feeds it real data, measures it and scales it.
# ====================================================================================================


# ----------------------------------------------------------------------------------------------------
# Real data. Nothing is fetched unless `train --download` asks for it; each loader names the files it
# expects. Every dataset yields (C, 64, 64) float images in [0, 1].

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".tif", ".tiff"}
DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + DSPRITES_FILE
DSPRITES_FACTORS = ("color", "shape", "scale", "orientation", "pos_x", "pos_y")


def to_model_size(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, h, w) -> float (B, C, 64, 64) in [0, 1]."""
    x = images.float() / 255
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


class ArrayImages(Dataset):
    """Images held in memory as uint8 (N, C, h, w), scaled to 64x64 a batch at a time."""

    def __init__(self, images: torch.Tensor):
        self.images, self.channels = images, images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(to_model_size(self.images[indices]))


class DSprites(Dataset):
    """DeepMind's dSprites npz (or a subset saved in the same format) with its ground-truth factors."""

    channels = 1

    def __init__(self, path: Path):
        try:
            with np.load(path) as npz:  # never unpickles: 'metadata' (a pickled dict) is not read
                images, classes = npz["imgs"], npz["latents_classes"]
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path} is not a dSprites npz with 'imgs' and 'latents_classes' ({e})")
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(classes) != len(images):
            raise UserError(f"{path}: expected imgs (N, 64, 64) and latents_classes (N, K), got "
                            f"{images.shape} and {classes.shape}")
        names = DSPRITES_FACTORS[-classes.shape[1]:]
        varying = [k for k in range(classes.shape[1]) if np.unique(classes[:, k]).size > 1]  # drops colour
        self.factor_names = tuple(names[k] for k in varying)
        self.classes = classes[:, varying].astype(np.int64)
        self.factor_sizes = tuple(int(c.max()) + 1 for c in self.classes.T)
        self.packed = np.packbits(images.astype(bool), axis=-1)  # (N, 64, 8): binary images, 8x smaller
        self.rows = np.full(math.prod(self.factor_sizes), -1, dtype=np.int64)  # factor grid point -> row
        self.rows[np.ravel_multi_index(self.classes.T, self.factor_sizes)] = np.arange(len(self.classes))

    def __len__(self) -> int:
        return len(self.classes)

    def factors(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.classes[np.asarray(indices)])

    def images(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.unpackbits(self.packed[rows], axis=-1)).float().unsqueeze(1)

    def render(self, factors) -> torch.Tensor:
        """The images with the given factor classes, looked up in the file."""
        rows = self.rows[np.ravel_multi_index(np.asarray(factors).T, self.factor_sizes)]
        if (rows < 0).any():
            raise UserError("this dSprites file lacks some factor combinations asked for")
        return self.images(rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images(np.array([index]))[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self.images(np.asarray(indices)))


class ImageFiles(Dataset):
    """Every image below a folder, recursively: centre-cropped to a square and resized to 64x64."""

    def __init__(self, root: Path, channels: int = 0):
        from PIL import Image
        if not root.is_dir():
            raise UserError(f"--data-dir {root} is not a folder")
        candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.files, bad, grey = [], [], True
        for path in candidates:
            try:
                with Image.open(path) as image:
                    grey &= image.mode in ("1", "L", "LA", "I", "I;16", "F")
                    image.verify()
                self.files.append(path)
            except Exception:  # PIL raises many types for a broken file; all mean "skip it"
                bad.append(path.name)
        if bad:
            print(f"warning: skipped {len(bad)} unreadable image(s) in {root}: {', '.join(bad[:5])}"
                  + (" ..." if len(bad) > 5 else ""))
        if not self.files:
            raise UserError(f"no readable image ({', '.join(sorted(IMAGE_SUFFIXES))}) below {root}")
        self.channels = channels or (1 if grey else 3)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image
        with Image.open(self.files[index]) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            w, h = image.size
            side = min(w, h)
            image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
            array = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float32) / 255
        return torch.from_numpy(array.reshape(IMAGE_SIZE, IMAGE_SIZE, self.channels)).permute(2, 0, 1)


class FirstItem(Dataset):
    """The image of a torchvision dataset that yields (image, target) pairs."""

    def __init__(self, base: Dataset, channels: int):
        self.base, self.channels = base, channels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.base[index][0]


def load_dsprites(cfg: Config, download: bool):
    path = Path(cfg.data_dir) / DSPRITES_FILE
    if not path.is_file() and download:
        from torchvision.datasets.utils import download_url
        try:
            download_url(DSPRITES_URL, cfg.data_dir, DSPRITES_FILE)
        except Exception as e:  # urllib raises many types when offline
            raise UserError(f"could not download {DSPRITES_URL} ({e.__class__.__name__}); offline? "
                            f"place {DSPRITES_FILE} in {cfg.data_dir} by hand")
    if not path.is_file():
        raise UserError(f"dsprites needs {path} (from github.com/deepmind/dsprites-dataset); add --download "
                        f"to fetch it, or pass --data-dir")
    return DSprites(path), None


def load_mnist(cfg: Config, download: bool):
    """MNIST or Fashion-MNIST from torchvision's raw IDX layout; the official test split validates."""
    from torchvision import datasets
    kind = datasets.MNIST if cfg.dataset == "mnist" else datasets.FashionMNIST
    try:
        train, test = (kind(cfg.data_dir, train=split, download=download) for split in (True, False))
    except (RuntimeError, OSError):  # torchvision's "Dataset not found", or every mirror failed
        raw = Path(cfg.data_dir) / kind.__name__ / "raw"
        files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
        if download:
            raise UserError(f"could not download {cfg.dataset} (offline?); place {files} in {raw} by hand")
        raise UserError(f"{cfg.dataset} needs {files} in {raw}; add --download to fetch them")
    return ArrayImages(train.data[:, None]), ArrayImages(test.data[:, None])


def load_celeba(cfg: Config, download: bool):
    """CelebA's aligned faces, centre crop 148 then 64x64 (the usual VAE preprocessing); official splits."""
    from torchvision import datasets, transforms
    prepare = transforms.Compose([transforms.CenterCrop(148), transforms.Resize(IMAGE_SIZE), transforms.ToTensor()])
    try:
        train, valid = (datasets.CelebA(cfg.data_dir, split=split, target_type=[], transform=prepare,
                                        download=download) for split in ("train", "valid"))
    except Exception:  # missing files, a failed integrity check, or Google Drive's quota error
        raise UserError(f"celeba needs {Path(cfg.data_dir) / 'celeba'}/img_align_celeba/ and its list_*.txt and "
                        f"identity_CelebA.txt files; --download often hits Google Drive's quota: download them from "
                        f"mmlab.ie.cuhk.edu.hk/projects/CelebA.html and place them there by hand")
    return FirstItem(train, 3), FirstItem(valid, 3)


def load_folder(cfg: Config, download: bool):
    return ImageFiles(Path(cfg.data_dir), cfg.channels), None


# name -> loader(cfg, download) returning (the dataset, its official validation split or None)
DATASETS = {"shapes": load_shapes, "dsprites": load_dsprites, "mnist": load_mnist, "fashion-mnist": load_mnist,
            "celeba": load_celeba, "folder": load_folder}


# ----------------------------------------------------------------------------------------------------
# Evaluation: disentanglement metrics with the conventions of disentanglement_lib (Locatello et al.
# 2019), so the numbers compare with published ones. codes: (N, D) posterior means; factors: (N, K)
# integer factor classes. The first four take arrays; the last two sample images with chosen factors.

N_BINS = 20  # disentanglement_lib's histogram discretizer for MIG and modularity


def discretize(codes: np.ndarray, bins: int = N_BINS) -> np.ndarray:
    """Each code dim into `bins` equal-width bins over its own observed range: np.histogram's edges,
    labels from np.digitize against the left edges (so the labels run 1..bins)."""
    labels = np.zeros(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram(codes[:, d], bins)[1]
        labels[:, d] = np.digitize(codes[:, d], edges[:-1])
    return labels


def mutual_information(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(D, K) mutual information in nats between each discretised code dim and each factor."""
    from sklearn.metrics import mutual_info_score
    binned = discretize(np.asarray(codes, dtype=np.float64))
    return np.array([[mutual_info_score(factors[:, k], binned[:, d]) for k in range(factors.shape[1])]
                     for d in range(binned.shape[1])])


def factor_entropy(factors: np.ndarray) -> np.ndarray:
    """(K,) empirical entropy of each factor in nats (not the log of its number of values)."""
    from sklearn.metrics import mutual_info_score
    return np.array([mutual_info_score(f, f) for f in factors.T])


def mig_per_factor(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(K,) Mutual Information Gap of each factor (Chen et al. 2018): (top MI - second MI) / H(factor)."""
    top = np.sort(mutual_information(codes, factors), axis=0)[::-1]
    return (top[0] - top[1]) / factor_entropy(factors)


def mig(codes: np.ndarray, factors: np.ndarray) -> float:
    """MIG: the factors' gaps averaged, unweighted."""
    return float(np.mean(mig_per_factor(codes, factors)))


def dim_factors(codes: np.ndarray, factors: np.ndarray, names) -> list[list]:
    """Per latent dim, [the factor it informs most, the normalised MI MI(dim, factor) / H(factor)], binned as
    for MIG: ["scale", 0.71] reads "this dim holds 71 % of scale's information"."""
    scores = mutual_information(codes, factors) / factor_entropy(factors)  # (D, K)
    return [[names[k], float(scores[d, k])] for d, k in enumerate(scores.argmax(axis=1))]


def modularity(codes: np.ndarray, factors: np.ndarray) -> float:
    """Ridgeway & Mozer 2018: how much each code dim's MI concentrates on one factor, averaged over dims."""
    squared = mutual_information(codes, factors) ** 2
    top = squared.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 1 - (squared.sum(axis=1) - top) / (top * (squared.shape[1] - 1))
    return float(np.mean(np.where(top == 0, 0.0, score)))  # a dim with no information scores 0


def train_test_split(n: int) -> int:
    """The first ceil(0.8 n) rows train, the rest test, in the given order."""
    return math.ceil(0.8 * n)


def sap(codes: np.ndarray, factors: np.ndarray, seed: int = 0) -> float:
    """Separated Attribute Predictability (Kumar et al. 2018) for discrete factors: held-out accuracy of a
    linear SVM on each single code dim; per factor the gap between the two best dims; mean over factors."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC
    n = train_test_split(len(codes))
    scores = np.zeros((codes.shape[1], factors.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # C=0.01 often stops early, as in the reference
        for d in range(codes.shape[1]):
            for k in range(factors.shape[1]):
                svm = LinearSVC(C=0.01, class_weight="balanced", random_state=seed)
                svm.fit(codes[:n, d:d + 1], factors[:n, k])
                scores[d, k] = np.mean(svm.predict(codes[n:, d:d + 1]) == factors[n:, k])
    top = np.sort(scores, axis=0)
    return float(np.mean(top[-1] - top[-2]))


def importance_score(importance: np.ndarray) -> float:
    """sum over rows of (row's share of the total) * (1 - entropy of the row, in base = row length)."""
    p = importance + 1e-11  # as disentanglement_lib: empty rows count as uniform
    p = p / p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(p)).sum(axis=1) / np.log(importance.shape[1])
    weights = importance.sum(axis=1) / importance.sum() if importance.sum() > 0 else \
        np.full(len(importance), 1 / len(importance))
    return float(np.sum(weights * (1 - entropy)))


def dci(codes: np.ndarray, factors: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Disentanglement, completeness, informativeness (Eastwood & Williams 2018) from one gradient-boosted
    classifier per factor on all codes."""
    from joblib import Parallel, delayed  # installed with scikit-learn
    n = train_test_split(len(codes))
    # the factors' classifiers are independent and slow (100 trees per class): fit them in parallel
    fits = Parallel(n_jobs=min(factors.shape[1], os.cpu_count() or 1))(
        delayed(boosted_trees)(codes[:n], factors[:n, k], codes[n:], factors[n:, k], seed)
        for k in range(factors.shape[1]))
    importance = np.stack([imp for imp, _ in fits], axis=1)  # (D, K)
    return {"disentanglement": importance_score(importance), "completeness": importance_score(importance.T),
            "informativeness": float(np.mean([acc for _, acc in fits]))}


def boosted_trees(x_train, y_train, x_test, y_test, seed: int) -> tuple[np.ndarray, float]:
    """(absolute feature importances, test accuracy) of a default gradient-boosted classifier."""
    from sklearn.ensemble import GradientBoostingClassifier
    # the reference leaves random_state unset; fixing it only makes tie-breaking repeatable
    model = GradientBoostingClassifier(random_state=seed).fit(x_train, y_train)
    return np.abs(model.feature_importances_), float(np.mean(model.predict(x_test) == y_test))


def sample_factors(sizes, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, K) factor classes drawn uniformly and independently."""
    return rng.integers(0, np.asarray(sizes), size=(n, len(sizes)))


MIN_SHARING = 64  # images that must share each factor value to fill a beta-VAE / FactorVAE batch of 64


class FactorSampler:
    """Where the metrics draw factor classes from: the full grid (independent uniform factors), or, for a
    file that holds only part of it (a labelled dSprites subset), the items it holds, with the images that
    share a fixed factor's value drawn among those."""

    def __init__(self, sizes, held: Optional[np.ndarray] = None):
        self.sizes = tuple(sizes)
        self.held = None if held is None or len(held) == math.prod(self.sizes) else np.asarray(held)
        if self.held is not None:  # per factor, per value: the rows that hold it
            self.by_value = [[np.flatnonzero(self.held[:, k] == v) for v in range(size)]
                             for k, size in enumerate(self.sizes)]

    @classmethod
    def of(cls, space) -> FactorSampler:
        """A sampler, or the full grid of factor sizes."""
        return space if isinstance(space, FactorSampler) else cls(space)

    @classmethod
    def of_dataset(cls, dataset) -> FactorSampler:
        """The built-in grid, or a dSprites file's factor classes (the full grid or part of it)."""
        return cls(dataset.factor_sizes, getattr(dataset, "classes", None))

    def require_sharing(self) -> None:
        """The beta-VAE and FactorVAE scores fix one factor per batch: every value must fill a batch."""
        if self.held is None:
            return
        k, v = min(((k, v) for k in range(len(self.sizes)) for v in range(self.sizes[k])),
                   key=lambda kv: len(self.by_value[kv[0]][kv[1]]))
        if len(self.by_value[k][v]) < MIN_SHARING:
            raise UserError(f"only {len(self.by_value[k][v])} images have factor {k} = {v} (fewer than {MIN_SHARING}): "
                            f"too few for the beta-VAE and FactorVAE scores; choose the others with --metrics")

    def describe(self) -> str:
        if self.held is None:
            return "the full factor grid"
        return (f"the {len(self.held):,} images the file holds (of {math.prod(self.sizes):,} factor combinations); "
                f"beta-VAE and FactorVAE batches share the fixed factor's value among them")

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, K) factor classes."""
        if self.held is None:
            return sample_factors(self.sizes, n, rng)
        return self.held[rng.integers(len(self.held), size=n)]

    def fix(self, factors: np.ndarray, ks: np.ndarray, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Items like `factors` whose factor ks[i] has the value values[i]: on the grid the same items with
        that factor set; from a partial file, items it holds with that value."""
        factors = factors.copy()
        if self.held is None:
            factors[np.arange(len(factors)), ks] = values
            return factors
        for k, v in {(int(k), int(v)) for k, v in zip(ks, values)}:
            wanted, rows = (ks == k) & (values == v), self.by_value[k][v]
            factors[wanted] = self.held[rows[rng.integers(len(rows), size=int(wanted.sum()))]]
        return factors


def beta_vae_score(representation, space, rng: np.random.Generator, n_train: int = 10_000, n_eval: int = 5_000,
                   batch_size: int = 64, seed: int = 0) -> float:
    """Higgins et al. 2017: each point fixes one factor k across pairs of samples; the feature is the
    mean |z1 - z2| over the pairs, the label k; accuracy of a logistic regression on held-out points.
    `representation` maps (B, K) factor classes to (B, D) codes; `space`: factor sizes or a FactorSampler."""
    from sklearn.linear_model import LogisticRegression
    sampler = FactorSampler.of(space)
    sampler.require_sharing()

    def points(n):
        labels = rng.integers(len(sampler.sizes), size=n)
        first, second = sampler.draw(n * batch_size, rng), sampler.draw(n * batch_size, rng)
        fixed = labels[np.repeat(np.arange(n), batch_size)]
        second = sampler.fix(second, fixed, first[np.arange(n * batch_size), fixed], rng)
        difference = np.abs(representation(first) - representation(second))
        return difference.reshape(n, batch_size, -1).mean(axis=1), labels

    x_train, y_train = points(n_train)
    x_eval, y_eval = points(n_eval)
    model = LogisticRegression(random_state=seed, max_iter=1000).fit(x_train, y_train)
    return float(model.score(x_eval, y_eval))


def factor_vae_score(representation, space, rng: np.random.Generator, n_train: int = 10_000, n_eval: int = 5_000,
                     batch_size: int = 64, n_variance: int = 10_000, prune: float = 0.05) -> float:
    """Kim & Mnih 2018: codes scaled by their global std (ddof 1); dims with std < `prune` dropped; in a
    batch that fixes one factor, the dim of least scaled variance votes for that factor; accuracy of the
    majority-vote classifier (each dim predicts the factor it got most votes for) on held-out votes.
    `space`: factor sizes or a FactorSampler."""
    sampler = FactorSampler.of(space)
    sampler.require_sharing()
    sizes = sampler.sizes
    scale = representation(sampler.draw(n_variance, rng)).std(axis=0, ddof=1)
    active = np.flatnonzero(scale >= prune)
    if len(active) == 0:
        return 0.0

    def votes(n):
        counts = np.zeros((len(sizes), len(active)), dtype=np.int64)
        fixed = rng.integers(len(sizes), size=n)
        factors = sampler.draw(n * batch_size, rng).reshape(n, batch_size, len(sizes))
        anchors = np.repeat(factors[np.arange(n), 0, fixed], batch_size)  # each batch shares its first item's value
        factors = sampler.fix(factors.reshape(-1, len(sizes)), np.repeat(fixed, batch_size), anchors, rng)
        codes = representation(factors).reshape(n, batch_size, -1)[:, :, active]
        least = np.argmin(codes.var(axis=1, ddof=1) / scale[active] ** 2, axis=1)
        np.add.at(counts, (fixed, least), 1)
        return counts

    classifier = np.argmax(votes(n_train), axis=0)  # the factor each active dim stands for
    held_out = votes(n_eval)
    return float(held_out[classifier, np.arange(len(active))].sum() / held_out.sum())


def encoder_representation(model: BetaVAE, dataset, device, batch: int = 512):
    """factors -> codes: render the images with those factors and encode them to mu (float64)."""
    model.eval()

    @torch.no_grad()
    def representation(factors: np.ndarray) -> np.ndarray:
        parts = np.array_split(factors, max(1, math.ceil(len(factors) / batch)))
        return torch.cat([model.encode(dataset.render(torch.from_numpy(part)).to(device))[0].double().cpu()
                          for part in parts]).numpy()
    return representation


METRIC_GROUPS = ("mig", "sap", "modularity", "dci", "beta_vae", "factor_vae")  # --metrics choices


def disentanglement_metrics(representation, space, n: int, seed: int, points: tuple[int, int],
                            groups=METRIC_GROUPS) -> dict:
    """The metrics in `groups` for one representation: MIG, SAP, DCI and modularity on n random factor
    draws, the beta-VAE and FactorVAE scores on points = (train, eval) batches of 64. Each sampled part
    has its own generator, so a metric scores the same alone or among the others. `space`: factor sizes
    or a FactorSampler."""
    results, sampler = {}, FactorSampler.of(space)
    if {"mig", "sap", "modularity", "dci"} & set(groups):
        factors = sampler.draw(n, np.random.default_rng([seed, 0]))
        codes = representation(factors)
        if "mig" in groups:
            gaps = mig_per_factor(codes, factors)
            results["mig"], results["mig_per_factor"] = float(np.mean(gaps)), gaps.tolist()
        if "modularity" in groups:
            results["modularity"] = modularity(codes, factors)
        if "sap" in groups:
            results["sap"] = sap(codes, factors, seed)
        if "dci" in groups:
            results.update({f"dci_{k}": v for k, v in dci(codes, factors, seed).items()})
    if "beta_vae" in groups:
        results["beta_vae_score"] = beta_vae_score(representation, sampler, np.random.default_rng([seed, 1]),
                                                   *points, seed=seed)
    if "factor_vae" in groups:
        results["factor_vae_score"] = factor_vae_score(representation, sampler, np.random.default_rng([seed, 2]),
                                                       *points, n_variance=n)
    return results


def evaluate(args) -> None:
    """Reconstruction, KL and active dims on validation data, and the six disentanglement metrics where
    the dataset has ground-truth factors; prints a table and writes JSON."""
    if args.n < 10 or min(args.points) < 1:
        raise UserError("--n must be >= 10 and --points >= 1")
    model, cfg, _, path, device = open_checkpoint(args)
    start = time.perf_counter()
    val = checkpoint_validation(model, cfg, device)
    results = {"checkpoint": str(path), "dataset": cfg.dataset, "seed": args.seed, "n": args.n,
               "points": list(args.points), "val_recon": val["recon"], "val_kl": val["kl"],
               "active_dims": active_dims(val["kl_per_dim"]), "kl_per_dim": val["kl_per_dim"]}
    dataset = full_dataset(cfg)
    if hasattr(dataset, "render"):
        sampler = FactorSampler.of_dataset(dataset)
        results["factors_drawn_from"] = sampler.describe()
        if sampler.held is not None:
            print(f"note: factors drawn from {sampler.describe()}")
        results.update(disentanglement_metrics(encoder_representation(model, dataset, device), sampler, args.n,
                                               args.seed, args.points, args.metrics))
    else:
        print(f"note: {cfg.dataset} has no ground-truth factors: MIG, SAP, DCI, modularity, beta-VAE and "
              f"FactorVAE scores need them")
    results["seconds"] = time.perf_counter() - start
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:>28}  {value:.4f}")
    if "mig_per_factor" in results:  # which factors the code has separated, and which it mixes
        results["mig_per_factor"] = dict(zip(dataset.factor_names, results["mig_per_factor"]))
        print(f"{'MIG per factor':>28}  " + ", ".join(f"{k} {v:.3f}" for k, v in results["mig_per_factor"].items()))
    out = output_path(args, path.parent, "metrics.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote metrics: {out}")


# ----------------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node N betavae.py train ...` starts one process (rank) per
# device; DistributedDataParallel averages their gradients, so every rank holds the same weights.

@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_ranks(cfg: Config) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1; the training device."""
    ranks = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    device = pick_device(cfg.device)
    if cfg.sync_bn and (ranks.world == 1 or device.type != "cuda"):
        raise UserError("--sync-bn needs torchrun with CUDA (PyTorch's SyncBatchNorm runs on GPUs only)")
    if ranks.world == 1:
        return ranks, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun training runs on CPU (gloo) or CUDA (nccl), not {device.type}")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (a no-op in a single process); on the training device, as nccl needs."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_gather(value) -> list:
    """Every rank's `value` (a picklable object), in rank order."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def agree_on(*flags: bool, device) -> list[bool]:
    """Each flag, true when it is true on any rank (one all-reduce): all of them must stop at the same step."""
    if not torch.distributed.is_initialized():
        return list(flags)
    return [total > 0 for total in all_sum(torch.tensor(flags, dtype=torch.float32, device=device)).tolist()]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank (DDP copies them only at the next forward)."""
    buffers = list(model.buffers())
    if torch.distributed.is_initialized() and buffers:  # Burgess et al.'s network has no BatchNorm, no buffers
        flat = torch.cat([b.flatten().double() for b in buffers])  # one message; counts are exact in float64
        torch.distributed.broadcast(flat, 0)
        for buffer, values in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(values.view_as(buffer))


def rank_batches(batches: list, ranks: Ranks) -> list:
    """This rank's share of the epoch's batches, dealt round-robin; every rank gets the same number, as
    DDP needs (at most world - 1 batches of the epoch go unused)."""
    usable = len(batches) // ranks.world * ranks.world
    if usable == 0:
        raise UserError(f"an epoch of {len(batches)} batches cannot feed {ranks.world} processes: "
                        f"raise --epoch-size or lower --batch-size")
    return batches[ranks.rank:usable:ranks.world]


def check_replicas(model: nn.Module, ranks: Ranks) -> None:
    """After training, every rank must hold bit-identical weights; otherwise the run is not DDP."""
    if ranks.world == 1:
        return
    flat = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
    fingerprints = all_gather((flat.sum().item(), flat.square().sum().item(), flat[::97].tolist()))
    if any(f != fingerprints[0] for f in fingerprints):
        raise UserError("the processes ended with different weights: the distributed run is broken", code=1)
    print(f"weights identical on all {ranks.world} processes")


# ----------------------------------------------------------------------------------------------------
# Benchmark: is the data path fast enough, and how fast is each part of a step on this machine?

def training_flops(step) -> int:
    """FLOPs of one call of `step` (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_peak(device, n: int = 2048) -> float:
    """This device's achievable fp32 GFLOP/s: a large square matmul, median of 5 after warm-up."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def product():
        a @ b
        synchronize(device)
    return 2 * n ** 3 / time_calls(product, 5) / 1e9


BENCH_FLAGS = ["dataset", "data_dir", "batch_size", "latent_dim", "arch", "objective", "tc_estimator", "recon", "workers", "channels", "amp", "compile", "device"]


# bench --options: each option of the training step alone, then together, against the plain loop
STEP_OPTIONS = {"plain loop": {}, "channels_last": {"channels_last": True}, "fused Adam": {"fused": True},
                "--amp": {"amp": True}, "--compile": {"compile": True},
                "channels_last, fused Adam, --amp": {"channels_last": True, "fused": True, "amp": True},
                "all four": {"channels_last": True, "fused": True, "amp": True, "compile": True}}


def step_loop(cfg: Config, device, x: torch.Tensor, n_data: int, steps: int, channels_last=False, fused=False,
              amp=False, compile=False):
    """A function running `steps` training steps of a fresh model on the batch x with the given options;
    all off is the plain loop (NCHW, float32, eager, Adam's default implementation)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = BetaVAE(cfg.latent_dim, cfg.channels, cfg.arch).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused or None)
    trained, step_cfg, x = compiled(model) if compile else model, replace(cfg, amp=amp), x.contiguous(memory_format=fmt)
    beta, capacity = schedule(cfg, cfg.epochs)

    def run():
        for _ in range(steps):
            train_step(trained, optimizer, x, step_cfg, beta, capacity, n_data)
        synchronize(device)
    return run


def synchronize(device) -> None:
    """Wait for the device's queued work (timings on a GPU must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call over `repeats` rounds that run every call once in turn (after three
    warm-up rounds), so the drift of a shared machine falls on all of them alike."""
    times = {name: [] for name in calls}
    for round_ in range(3 + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench(args) -> None:
    """Images per second on this device: the data loader alone, the full training step (data included),
    the bare model step on data already in memory, the plain loop of the same model, the encoder and the
    decoder; with --options, each option of the step against the plain loop. Medians of --repeats."""
    cfg = config_from_args(args)
    device = pick_device(cfg.device)
    train_set, _ = make_datasets(cfg)
    loader, batches, workers = train_loader(train_set, cfg, device)
    fmt, steps, n_data = memory_format(device), args.steps, len(train_set)
    x = torch.stack([train_set[i % n_data] for i in range(cfg.batch_size)]).to(device)
    order = torch.Generator().manual_seed(0)

    def data(step_fn=None):
        batches.batches = [torch.randint(n_data, (cfg.batch_size,), generator=order).tolist()
                           for _ in range(steps)]
        for batch in loader:
            if step_fn:
                step_fn(batch.to(device, non_blocking=True).contiguous(memory_format=fmt))
        synchronize(device)

    # the training step as `train` runs it: channels_last on CPU and CUDA, --amp and --compile as given
    model = BetaVAE(cfg.latent_dim, cfg.channels, cfg.arch).to(device, memory_format=fmt)
    optimizer, trained = torch.optim.Adam(model.parameters(), lr=cfg.lr), compiled(model) if cfg.compile else model
    beta, capacity = schedule(cfg, cfg.epochs)
    x_train = x.contiguous(memory_format=fmt)

    def step(batch):
        train_step(trained, optimizer, batch, cfg, beta, capacity, n_data)

    def model_steps():
        for _ in range(steps):
            step(x_train)
        synchronize(device)

    seconds = time_in_turns({"data loader": data, "train step, data included": lambda: data(step),
                             "train step, data in memory": model_steps,
                             "plain loop, data in memory": step_loop(cfg, device, x, n_data, steps)}, args.repeats)
    big, z = x_train.repeat(256 // cfg.batch_size + 1, 1, 1, 1)[:256], torch.randn(256, cfg.latent_dim, device=device)

    @torch.no_grad()
    def encode_decode(part):
        for _ in range(steps):
            model.encode(big) if part == "encoder" else model.decode(z)
        synchronize(device)

    model.eval()
    seconds.update(time_in_turns({"encoder (eval, batch 256)": lambda: encode_decode("encoder"),
                                  "decoder (eval, batch 256)": lambda: encode_decode("decoder")}, args.repeats))
    model.train()
    options = time_in_turns({name: step_loop(cfg, device, x, n_data, steps, **flags)
                             for name, flags in STEP_OPTIONS.items()}, args.repeats) if args.options else {}
    rates = {name: (256 * steps if "256" in name else steps * cfg.batch_size) / s for name, s in seconds.items()}
    # counted in eager mode (compiled code hides its operations from the counter)
    step_flops = training_flops(lambda: train_step(model, optimizer, x_train, cfg, beta, capacity, n_data))
    report_bench(args, cfg, device, train_set, workers, rates, step_flops,
                 step_flops * steps / seconds["train step, data in memory"] / 1e9,
                 {name: steps * cfg.batch_size / s for name, s in options.items()})


def report_bench(args, cfg: Config, device, train_set: Dataset, workers: int, rates: dict[str, float],
                 step_flops: int, achieved: float, option_rates: dict[str, float]) -> None:
    """bench's table: the rates, their ratios and the achieved GFLOP/s against the device's matmul peak,
    then each option's rate against the plain loop; with --json also a file."""
    peak = matmul_peak(device)
    options = "".join(f", --{name}" for name in ("amp", "compile") if getattr(cfg, name))
    print(f"betavae {__version__} bench | {device} | {cfg.dataset}, {cfg.arch} network, batch {cfg.batch_size}{options}, "
          f"{data_path(train_set, device, workers)}, {torch.get_num_threads()} threads | median of {args.repeats} x {args.steps} steps")
    for name, rate in rates.items():
        print(f"{name:>28}  {rate:10,.0f} img/s")
    print(f"{'loader / full step':>28}  {rates['data loader'] / rates['train step, data included']:10.1f} x")
    print(f"{'full step / model step':>28}  {rates['train step, data included'] / rates['train step, data in memory']:10.0%}")
    print(f"{'full step / plain loop':>28}  {rates['train step, data included'] / rates['plain loop, data in memory']:10.2f} x")
    print(f"{'model step':>28}  {achieved:10.1f} GFLOP/s ({step_flops / cfg.batch_size / 1e9:.2f} GFLOP per image), "
          f"{achieved / peak:.0%} of this device's fp32 matmul peak ({peak:.0f} GFLOP/s)")
    if option_rates:
        print("the training step's options, data in memory, against the plain loop of this run's model:")
    for name, rate in option_rates.items():
        print(f"{name:>34}  {rate:10,.0f} img/s  {rate / option_rates['plain loop']:5.2f} x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "dataset": cfg.dataset, "arch": cfg.arch,
                                               "workers": workers, "batch_size": cfg.batch_size, "amp": cfg.amp,
                                               "compile": cfg.compile, "img_per_s": rates, "options_img_per_s": option_rates,
                                               "gflop_per_s": achieved,
                                               "matmul_peak_gflop_per_s": peak}, indent=2) + "\n")
        print(f"wrote {args.json}")


# ----------------------------------------------------------------------------------------------------
# Study: how fast does each setting disentangle? Every variant is a list of `train` flags on top of the
# tutorial's settings. A run trains in stages through the CLI (resume is exact, so the stages add up to
# one run) and `evaluate` scores each stage; a rerun skips the stages already scored.

# the tutorial's settings, typed out: the sprites' own defaults differ (DATASET_DEFAULTS)
STUDY_BASE = "--arch tutorial --latent-dim 128 --recon mse --objective kl --lr 1e-4 --batch-size 32"
STUDY_VARIANTS = {
    "tutorial": "",
    "lr5e-4": "--lr 5e-4",
    "lr1e-3": "--lr 1e-3",
    "batch64": "--batch-size 64",
    "batch128": "--batch-size 128",
    "latent10": "--latent-dim 10",
    "bce": "--recon bce",
    "warmup": "--kl-warmup 3",
    "capacity": "--capacity 25 --capacity-epochs 5",
    "amp": "--amp",
    "10d-lr1e-3-b64": "--latent-dim 10 --lr 1e-3 --batch-size 64",
    "10d-bce-lr1e-3-b64": "--latent-dim 10 --recon bce --lr 1e-3 --batch-size 64",
    "10d-beta8": "--latent-dim 10 --beta 8",
    "10d-beta16": "--latent-dim 10 --beta 16",
}
# the disentangling recipe of disentanglement_lib (Burgess et al.'s network, Bernoulli, lr 5e-4, batch 64,
# 10-d), with beta on the whole KL or on the total correlation alone, and one change at a time
RECIPE = "--arch burgess --latent-dim 10 --recon bce --lr 5e-4 --batch-size 64"
STUDY_VARIANTS.update({
    "recipe-kl-beta4": f"{RECIPE} --beta 4",
    **{f"recipe-tc-beta{beta}": f"{RECIPE} --objective tc --beta {beta}" for beta in (4, 6, 10)},
    "recipe-tc-beta4-tutorial-arch": f"{RECIPE} --objective tc --beta 4 --arch tutorial",
    "recipe-tc-beta4-mse": f"{RECIPE} --objective tc --beta 4 --recon mse",
    **{f"recipe-tc-beta4-lr{lr}": f"{RECIPE} --objective tc --beta 4 --lr {lr}" for lr in ("1e-4", "1e-3")},
    **{f"recipe-tc-beta4-batch{b}": f"{RECIPE} --objective tc --beta 4 --batch-size {b}" for b in (256, 512)},
    # large batches at Adam's square-root lr, which lost to keeping the lr (LR_RULE)
    **{f"recipe-tc-beta4-batch{b}-sqrt-lr": f"{RECIPE} --objective tc --beta 4 --batch-size {b} --lr {lr}"
       for b, lr in ((256, "1e-3"), (512, "1.41e-3"))},
    "recipe-tc-beta4-amp": f"{RECIPE} --objective tc --beta 4 --amp",
    # the whole KL term rising over 3 epochs (--kl-warmup), against the early collapse of large batches
    "recipe-tc-beta4-batch256-warmup": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --kl-warmup 3",
    # at batch 256: the leave-one-out (stratified) estimate of log q(z), and a stronger beta on the TC
    "recipe-tc-beta4-batch256-mss": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --tc-estimator mss",
    "recipe-tc-beta10-batch256": f"{RECIPE} --objective tc --beta 10 --batch-size 256",
    "recipe-tc-beta6-batch256": f"{RECIPE} --objective tc --beta 6 --batch-size 256",
    # fewer dims than the recipe's 10 for the 5 factors: less room to split one factor over two dims
    "recipe-tc-beta4-batch256-latent6": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --latent-dim 6",
    # the decoder's output bias starting at the data's mean, against the early collapse
    "recipe-tc-beta4-batch256-mean-init": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --mean-init",
    # Burgess et al.'s capacity under the TC objective: the information grows a nat per epoch
    "recipe-tc-beta4-batch256-capacity": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --capacity 15 "
                                         "--capacity-epochs 15",
    # both: the decoder starts at the mean, so the capacity can admit information from the first step
    "recipe-tc-beta4-batch256-mean-init-capacity": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --mean-init "
                                                   "--capacity 15 --capacity-epochs 15",
    # a stronger beta on the TC with the decoder started at the mean (no collapse to leave)
    "recipe-tc-beta10-batch256-mean-init": f"{RECIPE} --objective tc --beta 10 --batch-size 256 --mean-init",
    # the flat-topped prior, which tells axis-aligned codes from rotated ones; also with the decoder at the mean
    "recipe-tc-beta4-batch256-gennorm4": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --prior gennorm4",
    "recipe-tc-beta4-batch256-gennorm4-mean-init": f"{RECIPE} --objective tc --beta 4 --batch-size 256 "
                                                   "--prior gennorm4 --mean-init",
    # the lr rising over the first epochs: do Adam's first steps, as large as any, cause the early collapse?
    **{f"recipe-tc-beta4-batch256-lr-warmup{e}": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --lr-warmup {e}"
       for e in (1, 3)},
    # free bits under the TC objective: a dim's KL below the floor costs nothing, so no dim is pushed to collapse
    **{f"recipe-tc-beta4-batch256-free-bits{bits}": f"{RECIPE} --objective tc --beta 4 --batch-size 256 "
       f"--free-bits {bits}" for bits in ("0.5", "1")},
    # Watters et al.'s spatial broadcast decoder: a position is a shift against axis-aligned coordinate channels
    "recipe-tc-beta4-batch256-broadcast": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --arch broadcast",
    # Higgins et al.'s objective at the shapes default's settings: the two objectives side by side
    "recipe-kl-beta4-batch256-broadcast": f"{RECIPE} --beta 4 --batch-size 256 --arch broadcast",
})
STUDY_FIELDS = ["variant", "seed", "epoch", "images", "minutes", "threads", "mig", "factor_vae_score",
                "val_recon", "val_kl", "active_dims", "mig_per_factor"]


def run_cli(argv: list[str], log: Path, threads: int) -> None:
    """Run `python betavae.py ARGV` with `threads` CPU threads (passive OpenMP waiting: runs side by side
    share the cores), appending its output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "a") as f:
        f.write("$ betavae.py " + " ".join(argv) + "\n")
        f.flush()
        done = subprocess.run([sys.executable, __file__, *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise UserError(f"betavae.py {argv[0]} failed (exit {done.returncode}); see {log}")


def study_stages(args, variant: str, seed: int, threads: int, out: Path) -> list[int]:
    """Train one variant with one seed in stages of --eval-epochs epochs, scoring each stage into out
    (skipping the stages already scored); the stages' epochs."""
    out.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(STUDY_BASE) + shlex.split(STUDY_VARIANTS[variant]) + shlex.split(args.common)
    stages = sorted({*range(args.eval_epochs, args.epochs + 1, args.eval_epochs), args.epochs})
    trained = len(read_history(out / "history.csv")) if (out / "history.csv").exists() else 0
    # a stage the run has trained past without scoring it (an earlier call's other --eval-epochs) is gone
    stages = [epoch for epoch in stages if epoch >= trained or (out / f"metrics_e{epoch:03d}.json").exists()]
    for epoch in stages:
        scores = out / f"metrics_e{epoch:03d}.json"
        if scores.exists():
            continue
        resume = ["--resume"] if (out / "last.pt").exists() else []
        run_cli(["train", *flags, "--seed", str(seed), "--epochs", str(epoch), "--device", args.device,
                 "--out", str(out), *resume], out / "log.txt", threads)
        run_cli(["evaluate", "--checkpoint", str(out / "last.pt"), "--metrics", "mig,factor_vae",
                 "--n", str(args.n), "--points", *map(str, args.points), "--device", args.device,
                 "--out", str(scores)], out / "log.txt", threads)
    return stages


def study_run(args, variant: str, seed: int, threads: int) -> list[dict]:
    """One variant and seed's rows: its stages trained and scored, or with --collect only those already
    scored."""
    out = Path(args.out) / f"{variant}-seed{seed}"
    if not args.collect:
        stages = study_stages(args, variant, seed, threads, out)
    elif (out / "config.json").exists():
        stages = sorted(int(path.stem.removeprefix("metrics_e")) for path in out.glob("metrics_e*.json"))
    else:
        return []
    history = {row["epoch"]: row for row in read_history(out / "history.csv")}
    epoch_size = json.loads((out / "config.json").read_text())["epoch_size"]
    rows = []
    for epoch in stages:
        scores, row = json.loads((out / f"metrics_e{epoch:03d}.json").read_text()), history[epoch]
        rows.append({"variant": variant, "seed": seed, "epoch": epoch, "images": epoch * epoch_size,
                     "minutes": row["elapsed_s"] / 60, "mig": scores["mig"],
                     "threads": "" if args.collect else threads,  # a collected run's are not on record
                     "factor_vae_score": scores["factor_vae_score"], "val_recon": row["val_recon"],
                     "mig_per_factor": " ".join(f"{k}={v:.3f}" for k, v in scores["mig_per_factor"].items()),
                     "val_kl": row["val_kl"], "active_dims": int(row["active_dims"])})
    return rows


def study_summary(rows: list[dict]) -> list[dict]:
    """Per variant, at its last stage: medians over the seeds, and the spread of MIG."""
    summary = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        last = max(r["epoch"] for r in rows if r["variant"] == variant)
        final = [r for r in rows if r["variant"] == variant and r["epoch"] == last]
        migs = [r["mig"] for r in final]
        summary.append({"variant": variant, "seeds": len(final), "images": final[0]["images"],
                        "minutes": float(np.median([r["minutes"] for r in final])),
                        "mig": float(np.median(migs)), "mig_min": min(migs), "mig_max": max(migs),
                        "factor_vae_score": float(np.median([r["factor_vae_score"] for r in final])),
                        "flags": STUDY_VARIANTS[variant] or "(the tutorial's)"})
    return summary


def plot_study(rows: list[dict], path: Path) -> None:
    """MIG against images seen and against minutes, FactorVAE against minutes: one colour per variant,
    a line per seed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # distinct hues first
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        seeds = sorted({r["seed"] for r in rows if r["variant"] == variant})
        for j, seed in enumerate(seeds):
            run = [r for r in rows if r["variant"] == variant and r["seed"] == seed]
            label = variant if j == 0 else None
            for ax, (x, y) in zip(axes, [("images", "mig"), ("minutes", "mig"), ("minutes", "factor_vae_score")]):
                ax.plot([r[x] for r in run], [r[y] for r in run], "o-", color=colours[i % 20], label=label,
                        markersize=3, alpha=0.8)
    for ax, (x, y) in zip(axes, [("images seen", "MIG"), ("training minutes", "MIG"),
                                 ("training minutes", "FactorVAE score")]):
        ax.set(xlabel=x, ylabel=y, ylim=(0, 1 if y != "MIG" else None))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def study(args) -> None:
    """Time to disentangle: MIG and FactorVAE score against images seen and minutes, per variant and seed.
    Writes study.csv, study.png and a summary table in --out."""
    unknown = [v for v in args.variants if v not in STUDY_VARIANTS]
    if unknown:
        raise UserError(f"unknown variant {unknown[0]}; choose from {', '.join(STUDY_VARIANTS)}")
    if args.jobs < 1 or args.epochs < 1 or args.eval_epochs < 1:
        raise UserError("--jobs, --epochs and --eval-epochs must be >= 1")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    out = Path(args.out)
    make_output_folder(out)
    runs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    if args.collect:
        print(f"study: tabulating the stages already scored of {len(runs)} runs in {out}, training nothing")
    else:
        print(f"study: {len(runs)} runs of {args.epochs} epochs, {args.jobs} at a time with {threads} threads "
              f"each, scored every {args.eval_epochs} epochs (MIG on n {args.n}, FactorVAE on "
              f"{args.points[0]}/{args.points[1]} points) | writing {out}")
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: the work runs in the subprocesses
        results = list(pool.map(lambda run: study_run(args, *run, threads), runs))
    rows = [row for result in results for row in result]
    if not rows:
        raise UserError(f"no scored stages in {out} for these variants and seeds: nothing to tabulate")
    with open(out / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, STUDY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot_study(rows, out / "study.png")
    summary = study_summary(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'variant':<20} {'seeds':>5} {'images':>8} {'minutes':>7}   {'MIG (min-max)':<21} {'FactorVAE':>9}")
    for s in summary:
        print(f"{s['variant']:<20} {s['seeds']:>5} {s['images']:>8,} {s['minutes']:>7.1f}   "
              f"{s['mig']:.3f} ({s['mig_min']:.3f}-{s['mig_max']:.3f})   {s['factor_vae_score']:>9.3f}")
    print(f"wrote {out / 'study.csv'}, {out / 'study.png'}, {out / 'summary.json'}")


if __name__ == "__main__":
    main()
