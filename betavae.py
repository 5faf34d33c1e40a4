"""A minimal, readable Beta-VAE in PyTorch, trained on a built-in procedural dSprites.

Beta-VAE (Higgins et al., ICLR 2017) is a VAE whose KL term is weighted by beta > 1: the tighter
information bottleneck pushes each latent dimension towards one factor of variation. Papers: Kingma &
Welling 2013 (VAE), Higgins et al. 2017 (beta-VAE), Burgess et al. 2018 (capacity control and the
disentangling network), Chen et al. 2018 (beta-TCVAE: beta on the total correlation alone, --objective tc),
Watters et al. 2019 (the spatial broadcast decoder).

    python betavae.py train --beta 4                  # train on the built-in shapes data (no download)
    python betavae.py train --beta 4 --resume         # continue runs/shapes-beta4 from its last.pt
    python betavae.py traverse --gif                  # traversal of the newest run's best.pt, else the shipped model
    python betavae.py interpolate / sample / reconstruct / plot
    python betavae.py evaluate                        # MIG, SAP, DCI, modularity, beta-VAE, FactorVAE scores
    python betavae.py train --dataset mnist --data-dir data --download    # or dsprites, celeba, folder
    torchrun --standalone --nproc_per_node 2 betavae.py train --beta 4   # DistributedDataParallel

Beside this file: metrics.py (the disentanglement metrics, on arrays), measure.py (evaluate, the shape
accuracy), bench.py (throughput), study.py (time to disentangle), export.py and infer_onnx.py (the decoder
through ONNX, without torch).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

# OpenMP's default busy-waiting made 2-thread torch 3-5x slower whenever other processes shared the cores
# (docs/performance.md); passive waiting costs little on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset  # noqa: E402

import metrics  # noqa: E402  (torch-free: the disentanglement metrics on arrays)
# run as a script this module is __main__: measure.py's `import betavae` must find it, not load a second copy
sys.modules.setdefault("betavae", sys.modules[__name__])
# torch-free picture helpers shared with infer_onnx.py, so that both tools draw the same pictures
from infer_onnx import (PADDING, Parser, UserError, image_grid, interpolation_codes, interpolation_figure,  # noqa: E402
                        labelled, read_image, report_errors, save_figure, select_dims, stack_vertically,
                        traversal_codes, traversal_gif, traversal_labels, traversal_values)

__version__ = "0.3.0"
IMAGE_SIZE = 64


# ====================================================================================================
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
    val_size: int = option(0, "validation images where there is no official split (0: 5,000 shapes, else 5%%)")
    epoch_size: int = option(20000, "training images drawn per epoch; 0 means a full pass")
    # model
    latent_dim: int = option(128, "number of latent dimensions")
    arch: str = option("tutorial", "network: the tutorial's (3x3 convs, BatchNorm), Burgess et al.'s (4x4 convs, no "
                       "BatchNorm), or theirs with a spatial broadcast decoder (Watters et al. 2019)",
                       choices=["tutorial", "burgess", "broadcast"])
    width: int = option(1, "multiplies the channels of every layer of the network (1: the papers' widths)")
    # loss
    recon: str = option("mse", "reconstruction term: squared error or Bernoulli cross-entropy",
                        choices=["mse", "bce"])
    objective: str = option("kl", "what beta weights: kl, the whole KL (Higgins et al. 2017); tc, only the total "
                            "correlation, the other parts of the KL at weight 1 (beta-TCVAE, Chen et al. 2018)",
                            choices=["kl", "tc"])
    beta: float = option(4.0, "weight of the KL term, or of its total correlation under --objective tc")
    kl_delay: int = option(0, "epochs with no KL term before it enters (or --kl-warmup begins): an autoencoder "
                           "first, which lets the shapes' angles into the code (docs/study.md)")
    kl_warmup: int = option(0, "epochs over which beta rises linearly from 0 (0: off)")
    free_bits: float = option(0.0, "each latent dim's batch-mean KL counts at least this many nats")
    capacity: Optional[float] = option(None, "Burgess et al.: target KL C_max in nats; the objective "
                                       "becomes recon + gamma*|KL - C(t)| (unset: off)", type=float)
    capacity_epochs: int = option(10, "epochs over which the capacity C(t) rises from 0 to C_max")
    gamma: float = option(1000.0, "weight of |KL - C(t)| under --capacity")
    # optimisation
    lr: float = option(1e-4, "Adam learning rate (ReduceLROnPlateau halves it, see --lr-patience)")
    lr_patience: int = option(5, "epochs without a better validation objective before the lr is halved")
    batch_size: int = option(32, "images per optimisation step")
    epochs: int = option(20, "epochs to train (with --resume: the total to reach)")
    precision: str = option("auto", "bf16: bfloat16 autocast for the networks (the loss and weights stay float32); "
                            "auto: bf16 where the device computes it natively, else fp32", choices=["auto", "fp32", "bf16"])
    seed: int = option(0, "seeds python, numpy and torch; a CPU run repeats bit for bit")
    device: str = option("auto", "auto picks CUDA, then MPS, then CPU", choices=["auto", "cpu", "cuda", "mps"])
    eval_every: int = option(0, "every E epochs, the disentanglement metrics on a tenth of evaluate's sample (0: off)")
    # output
    out: str = option("", "run folder (default: runs/<dataset>-beta<beta>)")
    tensorboard: bool = option(False, "also log scalars and images to TensorBoard in the run folder")
    channels: int = 1  # set from the data (not a flag)


# The Config defaults above are the tutorial's settings (for faces). Where the study (study.py,
# docs/study.md) found better ones for a dataset, they are here; any flag overrides them.
SPRITES = {"latent_dim": 10, "epochs": 75, "arch": "broadcast", "recon": "bce", "lr": 5e-4, "batch_size": 64,
           "objective": "tc", "kl_delay": 16}
SPRITES_WHY = ("disentanglement_lib's recipe (Bernoulli loss, lr 5e-4, batch 64, 10-d) with beta on the total "
               "correlation (Chen et al.) and a spatial broadcast decoder: each separated the factors better at equal "
               "images; an autoencoder for 16 epochs first, which lets the shapes into the code (docs/study.md)")
DATASET_DEFAULTS = {"shapes": SPRITES, "dsprites": SPRITES}
# flags that may change when a run is resumed; every other one must match the stored run
RESUMABLE_FLAGS = {"epochs", "device", "tensorboard", "out", "eval_every", "data_dir", "precision"}


def config_from_args(args) -> Config:
    """The Config of a command line: its flags, the dataset's defaults for the others, then the tutorial's."""
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if f.name in vars(args)})
    for name, value in DATASET_DEFAULTS.get(cfg.dataset, {}).items():
        # --capacity schedules the KL term itself, so it replaces the dataset's delay rather than clash with it
        if name not in args.given and not (name == "kl_delay" and cfg.capacity is not None):
            setattr(cfg, name, value)
    check_config(cfg)
    return cfg


def describe_defaults(cfg: Config, given: set[str]) -> Optional[str]:
    """One line naming the dataset defaults a run uses instead of the tutorial's, and why (None if none)."""
    defaults, tutorial = DATASET_DEFAULTS.get(cfg.dataset, {}), Config()
    used = [name for name in defaults if name not in given and defaults[name] != getattr(tutorial, name)]
    if not used:
        return None
    show = lambda value: f"{value:g}" if isinstance(value, float) else str(value)
    ours = ", ".join(f"--{name.replace('_', '-')} {show(defaults[name])}" for name in used)
    theirs = ", ".join(show(getattr(tutorial, name)) for name in used)
    return f"{cfg.dataset} defaults: {ours} (the tutorial's: {theirs}); {SPRITES_WHY}"


def check_config(cfg: Config) -> None:
    """Reject nonsense settings with one clear line, before any work starts."""
    rules = [
        (cfg.beta >= 0, "--beta must be >= 0"),
        (cfg.latent_dim >= 1, "--latent-dim must be >= 1"),
        (cfg.width >= 1, "--width must be >= 1"),
        (cfg.val_size >= 0, "--val-size must be >= 0 (0: automatic)"),
        (cfg.epoch_size >= 0, "--epoch-size must be >= 0 (0 means a full pass)"),
        (cfg.kl_warmup >= 0, "--kl-warmup must be >= 0"),
        (cfg.kl_delay >= 0, "--kl-delay must be >= 0"),
        (cfg.free_bits >= 0, "--free-bits must be >= 0"),
        (cfg.capacity is None or cfg.capacity >= 0, "--capacity must be >= 0"),
        (cfg.capacity_epochs >= 1, "--capacity-epochs must be >= 1"),
        (cfg.gamma > 0, "--gamma must be > 0"),
        (cfg.capacity is None or cfg.kl_warmup == cfg.kl_delay == 0,
         "--capacity and --kl-warmup or --kl-delay are alternatives; pick one"),
        (cfg.objective == "kl" or cfg.batch_size >= 2, "--objective tc estimates the total correlation from the "
                                                        "batch: --batch-size must be >= 2"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.lr_patience >= 0, "--lr-patience must be >= 0"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.epochs >= 1, "--epochs must be >= 1"),
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
    """(beta_eff, capacity C) of a 1-based epoch, constant within it: validation scores that epoch's objective.
    beta_eff is 0 for the --kl-delay epochs, then rises over --kl-warmup's."""
    after = epoch - cfg.kl_delay
    beta_eff = 0.0 if after <= 0 else cfg.beta * min(1.0, after / cfg.kl_warmup) if cfg.kl_warmup else cfg.beta
    capacity = None if cfg.capacity is None else cfg.capacity * min(1.0, epoch / cfg.capacity_epochs)
    return beta_eff, capacity


def schedule_done(cfg: Config, epoch: int) -> bool:
    """True once beta_eff and C have their final values (from then on, objectives compare): with --kl-delay D
    and no warm-up that is epoch D + 1, the first with the KL term."""
    return schedule(cfg, epoch) == schedule(cfg, math.inf)


# ====================================================================================================
# Data: a procedural equivalent of DeepMind's dSprites, rendered on demand.
# Factors (as in dSprites): shape x scale x orientation x position X x position Y = 737,280 images.

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
RADIUS = 10.0  # circumradius in pixels of every shape at scale 1: any rotation fits this circle
MARGIN = RADIUS + 1  # centres stay this far from the border, so no shape touches or leaves the frame


def shape_geometry(factors: torch.Tensor) -> torch.Tensor:
    """(B, 5) factor classes -> (6, B): shape, centre x and y in pixels, size (circumradius), cos and sin of the angle."""
    shape, scale_i, angle_i, x_i, y_i = torch.as_tensor(factors, dtype=torch.long).cpu().T.float()
    scale = 0.5 + 0.1 * scale_i                                  # 6 values, 0.5 to 1
    angle = 2 * math.pi * angle_i / FACTOR_SIZES[2]               # 40 values over a full turn
    centre_x = MARGIN + (IMAGE_SIZE - 2 * MARGIN) * x_i / (FACTOR_SIZES[3] - 1)
    centre_y = MARGIN + (IMAGE_SIZE - 2 * MARGIN) * y_i / (FACTOR_SIZES[4] - 1)
    return torch.stack([shape, centre_x, centre_y, RADIUS * scale, torch.cos(angle), torch.sin(angle)])


def draw_shapes(geometry: torch.Tensor, corner: torch.Tensor, side: int) -> torch.Tensor:
    """(6, B) geometry -> (B, 1, side, side) binary images of the window whose top-left pixel is corner (B, 2)
    (x, y; the whole image: 0 and 64), drawn with +, -, *, / and comparisons, which IEEE 754 rounds alike."""
    shape, centre_x, centre_y, size, cos, sin = geometry[:, :, None, None]
    pixel = torch.arange(side, dtype=torch.float32, device=geometry.device) + 0.5  # pixel centres
    dx = (corner[:, 0, None, None] + pixel[None, None, :] - centre_x) / size
    dy = (corner[:, 1, None, None] + pixel[None, :, None] - centre_y) / size
    p, q = cos * dx + sin * dy, -sin * dx + cos * dy               # (B, side, side) rotated into the shape's frame
    square = (p.abs() <= 1 / math.sqrt(2)) & (q.abs() <= 1 / math.sqrt(2))
    ellipse = p * p + (q / 0.5) * (q / 0.5) <= 1
    hx, hy = 1.25 * p, 0.25 - 1.25 * q                            # heart curve, centred on its circumcircle
    curve = hx * hx + hy * hy - 1
    heart = curve * curve * curve - hx * hx * (hy * hy * hy) <= 0
    image = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))  # 0 square, 1 ellipse, 2 heart
    return image.float().unsqueeze(1)


def render_shapes(factors: torch.Tensor, device=None) -> torch.Tensor:
    """(B, 5) factor classes -> (B, 1, 64, 64) binary images on `device`, bit for bit alike anywhere: the
    geometry is computed on the CPU, and 6 numbers per image cross to the device instead of 4,096 pixels."""
    geometry = shape_geometry(factors).to(device)
    return draw_shapes(geometry, torch.zeros(geometry.shape[1], 2, device=device), IMAGE_SIZE)


class Shapes(Dataset):
    """Every point of the dSprites factor grid; item i is grid point i, rendered when asked for."""

    factor_names, factor_sizes, channels = FACTOR_NAMES, FACTOR_SIZES, 1
    render = staticmethod(render_shapes)  # images with chosen factor classes, for the metrics' controlled pairs

    def __len__(self) -> int:
        return math.prod(FACTOR_SIZES)

    def factors(self, indices) -> torch.Tensor:
        """(B, 5) factor classes of the given item indices."""
        return torch.stack(torch.unravel_index(torch.as_tensor(indices), FACTOR_SIZES), dim=1)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.render(self.factors([index]))[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        # DataLoader calls this with a whole batch: one vectorised render instead of B small ones
        return list(self.render(self.factors(indices)))


def split_validation(dataset: Dataset, val_size: int) -> tuple[Subset, Subset]:
    """A fixed validation subset, the same for every run and seed, so validation losses compare."""
    if val_size >= len(dataset):
        raise UserError(f"a validation set of {val_size} leaves no training data ({len(dataset)} images); "
                        f"lower --val-size")
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


_loaded: dict[tuple, tuple] = {}  # a process loads each dataset once (dSprites takes seconds)


def load_dataset(cfg: Config, download: bool = False) -> tuple[Dataset, Optional[Dataset]]:
    """(the dataset, its official validation split or None), once per process; real data via real_datasets.py."""
    key = (cfg.dataset, cfg.data_dir)
    if key not in _loaded:
        if cfg.dataset == "shapes":
            _loaded[key] = Shapes(), None
        else:
            import real_datasets  # only for data on disk: its loaders import torchvision's datasets
            _loaded[key] = real_datasets.load(cfg.dataset, cfg.data_dir, download)
    return _loaded[key]


def make_datasets(cfg: Config, download: bool = False) -> tuple[Dataset, Dataset]:
    """(train, val): the official split, else a fixed random one of --val-size; sets cfg.channels."""
    dataset, official_val = load_dataset(cfg, download)
    cfg.channels = dataset.channels
    if official_val is not None:
        return dataset, official_val
    automatic = 5000 if cfg.dataset == "shapes" else max(1, round(0.05 * len(dataset)))
    return split_validation(dataset, cfg.val_size or automatic)


def loader_workers(cfg: Config) -> int:
    """DataLoader workers: none for data in memory (docs/datasets.md), half the cores (1-4) for image files."""
    return max(1, min(4, (os.cpu_count() or 2) // 2)) if cfg.dataset in ("folder", "celeba") else 0


class RenderedBatches:
    """The shapes' training batches, in the order of `batches`, drawn on the training device (no DataLoader)."""

    def __init__(self, data: Dataset, device):
        shapes, self.grid = base_items(data)  # the grid points behind the items of a (nested) Subset
        self.factors, self.device, self.batches = shapes.factors, device, []

    def __iter__(self):
        for batch in self.batches:
            yield render_shapes(self.factors(self.grid[batch]), self.device)

    def __len__(self) -> int:
        return len(self.batches)


def train_loader(train_set: Dataset, cfg: Config, device) -> tuple:
    """(loader, the list of the epoch's batches it follows, where they come from): the shapes drawn on the
    device, or a DataLoader with its own generator (the global RNG is the model's). Its workers live for an
    epoch: persistent ones would outlive a run started from Python, and a fork costs milliseconds."""
    if isinstance(base_items(train_set)[0], Shapes):
        loader = RenderedBatches(train_set, device)
        return loader, loader.batches, f"shapes drawn on {device}"
    workers, batches = loader_workers(cfg), []
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())
    return loader, batches, f"{workers} loader workers"


def spread_positions(length: int, n: int) -> list[int]:
    """n positions spread evenly over 0 .. length - 1 (all of them if n >= length)."""
    return torch.linspace(0, length - 1, min(n, length), dtype=torch.float64).round().long().tolist()


def preview_images(val_set: Dataset, n: int) -> torch.Tensor:
    """n validation images spread evenly over the validation set, (n, C, 64, 64)."""
    return torch.stack([val_set[i] for i in spread_positions(len(val_set), n)])


# ====================================================================================================
# Model: a convolutional encoder and a decoder back to the image, in one of three networks: the tutorial's
# (3x3 convs, BatchNorm); Burgess et al. 2018's (4x4 convs, ReLU, no BatchNorm, which would couple the
# samples the total-correlation estimate compares); and `broadcast`, Burgess et al.'s encoder with Watters et
# al. 2019's spatial broadcast decoder: z copied to every cell of a grid beside the cell's own x and y, so a
# position is a shift against those channels rather than a map a fully connected layer must learn.

def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01))


def deconv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01))


def relu_convs(kind, widths: list[int]) -> list[nn.Module]:
    """Burgess et al.'s 4x4 stride-2 (transposed) convolutions, each halving (doubling) the image side."""
    return [layer for c_in, c_out in zip(widths, widths[1:]) for layer in (kind(c_in, c_out, 4, 2, 1), nn.ReLU())]


GRID_CHANNELS = {"tutorial": 256, "burgess": 64}  # of the 4x4 feature map at the bottleneck, at width 1
BROADCAST_SIDE = 16  # the broadcast grid: 16x16 cells, then two upsamplings to 64 (64x64: ~30x the compute)


def coordinate_grid(side: int) -> torch.Tensor:
    """(1, 2, side, side): each cell's x (channel 0, left to right) and y (channel 1, top to bottom) in [-1, 1]."""
    ticks = torch.linspace(-1, 1, side)
    return torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"))[None]


class Encoder(nn.Module):
    """Image (B, C, 64, 64) -> posterior mean mu and log-variance logvar, each (B, latent_dim)."""

    def __init__(self, latent_dim: int, channels: int, arch: str = "tutorial", width: int = 1):
        super().__init__()
        w = width
        if arch in ("burgess", "broadcast"):  # 64 -> 32 -> 16 -> 8 -> 4, then a hidden layer of 256
            self.net = nn.Sequential(*relu_convs(nn.Conv2d, [channels, 32 * w, 32 * w, 64 * w, 64 * w]), nn.Flatten(),
                                     nn.Linear(64 * w * 4 * 4, 256 * w), nn.ReLU())  # (B, 256w)
            features = 256 * w
        else:
            self.net = nn.Sequential(conv_block(channels, 32 * w), conv_block(32 * w, 64 * w),
                                     conv_block(64 * w, 128 * w), conv_block(128 * w, 256 * w), nn.Flatten())
            features = 256 * w * 4 * 4
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_logvar = nn.Linear(features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    """Latent code (B, latent_dim) -> image (B, C, 64, 64) in [0, 1]; `logits` skips the sigmoid."""

    def __init__(self, latent_dim: int, channels: int, arch: str = "tutorial", width: int = 1):
        super().__init__()
        w = width
        # None for broadcast, whose decoder starts from a grid rather than a layer
        self.grid = (GRID_CHANNELS[arch] * w, 4, 4) if arch in GRID_CHANNELS else None
        # burgess and tutorial mirror the encoder's four downsamplings: 4 -> 8 -> 16 -> 32 -> 64
        if arch == "broadcast":  # (latent_dim + 2, 16, 16) -> two 3x3 convs -> 16 -> 32 -> 64
            self.register_buffer("coords", coordinate_grid(BROADCAST_SIDE))
            self.net = nn.Sequential(nn.Conv2d(latent_dim + 2, 64 * w, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(64 * w, 64 * w, 3, padding=1), nn.ReLU(),
                                     *relu_convs(nn.ConvTranspose2d, [64 * w, 32 * w]),
                                     nn.ConvTranspose2d(32 * w, channels, 4, 2, 1))
        elif arch == "burgess":
            self.fc = nn.Sequential(nn.Linear(latent_dim, 256 * w), nn.ReLU(), nn.Linear(256 * w, 64 * w * 4 * 4),
                                    nn.ReLU())
            self.net = nn.Sequential(*relu_convs(nn.ConvTranspose2d, [64 * w, 64 * w, 32 * w, 32 * w]),
                                     nn.ConvTranspose2d(32 * w, channels, 4, 2, 1))
        else:
            self.fc = nn.Linear(latent_dim, 256 * w * 4 * 4)
            self.net = nn.Sequential(deconv_block(256 * w, 128 * w), deconv_block(128 * w, 64 * w),
                                     deconv_block(64 * w, 32 * w), deconv_block(32 * w, 32 * w),
                                     nn.Conv2d(32 * w, channels, 3, padding=1))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.grid is None:  # broadcast: every cell gets all of z and its own coordinates
            tiled = z[:, :, None, None].expand(-1, -1, BROADCAST_SIDE, BROADCAST_SIDE)
            return self.net(torch.cat([tiled, self.coords.expand_as(tiled[:, :2])], dim=1))  # (B, C, 64, 64)
        return self.net(self.fc(z).view(-1, *self.grid))  # (B, C, 64, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


def network_name(cfg: Config) -> str:
    """The network in words, for the bench's header and the model card."""
    return f"{cfg.arch} network" + (f" at {cfg.width}x the width" if cfg.width > 1 else "")


class BetaVAE(nn.Module):
    def __init__(self, latent_dim: int = 128, channels: int = 1, arch: str = "tutorial", width: int = 1):
        super().__init__()
        self.encoder = Encoder(latent_dim, channels, arch, width)
        self.decoder = Decoder(latent_dim, channels, arch, width)

    @classmethod
    def of(cls, cfg: Config) -> "BetaVAE":
        """The network a Config describes."""
        return cls(cfg.latent_dim, cfg.channels, cfg.arch, cfg.width)

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


# ====================================================================================================
# Loss: negative ELBO with a weighted KL (Higgins et al. 2017, eq. 4), Burgess et al.'s capacity form, or
# beta on the total correlation alone (Chen et al. 2018, eq. 4 with alpha = gamma = 1).

def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)), elementwise (broadcasting), in nats."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, sigma^2) || N(0, 1)) per sample and latent dim, (B, D), in nats."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_decomposition(z, mu, logvar) -> dict[str, torch.Tensor]:
    """Chen et al.'s split of the KL on a batch of z_i ~ q(z|x_i): index-code MI, total correlation, dimension-
    wise KL (means in nats, adding up to the Monte Carlo KL), log q(z_i) the batch mean of q(z_i|x_j); Chen et
    al.'s 1/(B N) would shift the logged parts by log N and no gradient."""
    log_weight = torch.tensor(-math.log(len(z)), dtype=torch.float64).to(z)         # log 1/B
    pairs = log_normal(z[:, None], mu[None], logvar[None])                           # (B, B, D): log q(z_id | x_j)
    log_q_zx = log_normal(z, mu, logvar).sum(1)                                      # (B,) log q(z_i | x_i)
    log_qz = torch.logsumexp(pairs.sum(2) + log_weight, dim=1)                       # (B,) log q(z_i)
    log_marginals = torch.logsumexp(pairs + log_weight, dim=1).sum(1)                # (B,) sum_d log q(z_id)
    log_pz = (-0.5 * (math.log(2 * math.pi) + z.pow(2))).sum(1)                      # (B,) log N(z_i; 0, I)
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
               warm: float = 1.0) -> dict[str, torch.Tensor]:
    """recon, the KL (summed over dims, mean over the batch), per-dim KL, with a sampled z its parts mi, tc
    and dwkl, and `total`, the objective: recon + beta*KL; recon + gamma*|KL - C| with a capacity C (Burgess
    et al.); under "tc", recon + warm*(KL + (beta - 1)*TC) = recon + warm*(MI + beta*TC + dimension-wise KL),
    the closed-form KL standing in for its estimated parts (same mean, less noise), warm < 1 in a warm-up.
    Free bits clamp each dim's KL from below in the objective only (Kingma et al. 2016)."""
    rec = recon_loss(logits, x, recon)
    kl_dims = kl_per_dim(mu, logvar).mean(0)  # (D,) batch means
    kl = kl_dims.sum()
    parts = {"recon": rec, "kl": kl, "kl_per_dim": kl_dims, **(kl_decomposition(z, mu, logvar) if z is not None else {})}
    kl_objective = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    if objective == "tc":
        kl_term = kl_objective if capacity is None else gamma * (kl_objective - capacity).abs()
        total = rec + warm * (kl_term + (beta - 1) * parts["tc"])
    elif capacity is None:
        total = rec + beta * kl_objective
    else:
        total = rec + gamma * (kl_objective - capacity).abs()
    return {**parts, "total": total}


def loss_settings(cfg: Config, epoch: int) -> dict:
    """loss_terms' keyword arguments for a 1-based epoch of the schedule. A warm-up under --objective tc weights
    the whole KL term: ramping the TC's weight alone would leave a plain VAE's early epochs, which collapse as
    readily."""
    beta_eff, capacity = schedule(cfg, epoch)
    tc = cfg.objective == "tc"
    warm = beta_eff / cfg.beta if tc and cfg.beta else 1.0
    return dict(recon=cfg.recon, beta=cfg.beta if tc else beta_eff, free_bits=cfg.free_bits,
                capacity=capacity, gamma=cfg.gamma, objective=cfg.objective, warm=warm)


def describe_loss(cfg: Config) -> str:
    """The objective and its reductions, printed at the start of training: beta means nothing without them."""
    error = "squared error" if cfg.recon == "mse" else "Bernoulli cross-entropy (from logits)"
    kl, ramp = "KL" if cfg.free_bits == 0 else f"sum_d max(KL_d, {cfg.free_bits:g})", ""
    if cfg.capacity is not None:  # Burgess et al.: the KL held at a capacity C that rises over the epochs
        kl = f"{cfg.gamma:g}*|{kl} - C|"
        ramp = f", C rising from 0 to {cfg.capacity:g} nats over {cfg.capacity_epochs} epochs"
    elif cfg.objective == "kl":
        kl, ramp = f"beta*{kl}", f", beta {cfg.beta:g}"
    tc = cfg.objective == "tc"
    terms = f"{kl} + (beta-1)*TC" if tc else kl
    parts = "MI + beta*TC + dimension-wise KL" if tc and kl == "KL" else ""  # the true KL's parts, unclamped
    if cfg.kl_warmup or cfg.kl_delay:
        terms, parts = f"w*({terms})", parts and f"w*({parts})"
        delay = f"w 0 for {cfg.kl_delay} epochs, then " if cfg.kl_delay else "w "
        ramp += f", {delay}rising from 0 to 1 over {cfg.kl_warmup} epochs" if cfg.kl_warmup else f", {delay}1"
    objective = f"recon + {terms}" + (parts and f" = recon + {parts}") + ramp
    if tc:
        objective += (f", beta {cfg.beta:g} on the total correlation only (Chen et al. 2018); TC estimated on each "
                      f"batch of {cfg.batch_size} by minibatch-weighted sampling")
    return (f"loss: recon = {error} summed over {cfg.channels}x{IMAGE_SIZE}x{IMAGE_SIZE} pixels, mean over the "
            f"batch; KL = closed form summed over {cfg.latent_dim} latent dims, mean over the batch\n"
            f"objective: {objective}")


# ====================================================================================================
# Training: train(args) sets up, fit() runs the epochs, train_epoch() the steps, train_step() one
# Adam step; save_run() checkpoints and resume() continues exactly where a checkpoint stopped.

LOGGED_TERMS = ("recon", "kl", "total", "mi", "tc", "dwkl")  # the loss's terms, then the KL's three parts
CHECK_EVERY = 50  # steps between waits for the device: check the losses for NaN/inf, agree on Ctrl-C


def train(args) -> None:
    """Train a Beta-VAE: Adam + ReduceLROnPlateau, a checkpoint every epoch, exact resume; under torchrun,
    DistributedDataParallel with rank 0 alone printing and writing."""
    cfg, resumed = prepare_run(args)
    ranks, device = start_ranks(cfg)
    try:
        t = start_training(cfg, resumed, args.download, ranks, device)
        if t.run["epoch"] >= cfg.epochs:
            print(f"{t.out} has already trained {t.run['epoch']} epochs; pass a larger --epochs to continue")
            return
        if ranks.main:  # after the check above: a finished run's config.json stays as it was
            (t.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        print_start(t, None if resumed else describe_defaults(cfg, args.given))
        fit(t)
    finally:
        if torch.distributed.is_initialized():
            gc.collect()  # free the DDP wrapper (held in reference cycles) while its process group lives
            torch.distributed.destroy_process_group()


def fit(t: Training) -> None:
    """The epochs: train, validate, step the lr schedule on the validation objective, record, checkpoint."""
    cfg, device = t.cfg, t.device
    # DDP copies rank 0's weights to every rank, then averages the gradients in backward
    trained = t.model if t.ranks.world == 1 else nn.parallel.DistributedDataParallel(
        t.model, device_ids=[device.index] if device.type == "cuda" else None)
    t.clock = time.perf_counter()
    with StopOnCtrlC() as stop:
        for epoch in range(t.run["epoch"] + 1, cfg.epochs + 1):
            images, seconds = run_epoch(t, trained, epoch, loss_settings(cfg, epoch), stop)
            val = validate(t.model, t.val_loader, cfg, epoch, device)
            if schedule_done(cfg, epoch):  # a rising KL weight is no plateau: halve the lr on final objectives only
                t.scheduler.step(val["total"])
            record_epoch(t, epoch_row(t, epoch, val, images, seconds))
            if agree_on(stop.requested, device=device)[0]:
                raise UserError(f"interrupted after epoch {epoch}: saved {t.out / 'last.pt'}; continue with --resume",
                                code=130)
    if t.writer is not None:
        t.writer.close()
    if t.ranks.main:  # drawn once: 2 s an epoch is 3 % of a CPU run (`plot` draws it any time from history.csv)
        draw_history(t.run["history"], t.out / "loss_curves.png")
    print(f"done: {t.out / 'best.pt'} (best validation objective), {t.out / 'last.pt'}, {t.out / 'history.csv'}")


def run_epoch(t: Training, trained, epoch: int, settings: dict, stop: StopOnCtrlC) -> tuple[int, float]:
    """Draw the epoch's order (replayed when resuming inside it), train on it, total the losses; save on Ctrl-C."""
    if t.run["step"]:  # resuming inside this epoch: replay its order from the epoch's start
        t.sampler_rng.set_state(t.run["epoch_sampler"])
    t.run["epoch_sampler"] = t.sampler_rng.get_state()
    sampler = RandomSampler(t.train_set, num_samples=t.cfg.epoch_size or None, generator=t.sampler_rng)
    epoch_order = rank_batches(list(BatchSampler(sampler, t.cfg.batch_size, drop_last=False)), t.ranks)
    t.batches[:] = epoch_order[t.run["step"]:]
    images, seconds = train_epoch(t, trained, epoch, settings, stop)
    totals = all_sum(torch.cat([t.run["sums"], torch.tensor([float(t.run["seen"])])]).to(t.device)).cpu()
    t.run.update(sums=totals[:-1], seen=int(totals[-1]))
    if stop.requested and t.run["step"] < len(epoch_order):
        take_time(t)
        save_run(t, t.out / "last.pt")
        raise UserError(f"interrupted at epoch {epoch} step {t.run['step']}: saved {t.out / 'last.pt'}; "
                        f"continue with --resume", code=130)
    return images, seconds


def train_epoch(t: Training, trained, epoch: int, settings: dict, stop: StopOnCtrlC) -> tuple[int, float]:
    """Train on the epoch's remaining batches, adding up the losses every CHECK_EVERY steps (a GPU never waits
    in between); stop after Ctrl-C at the next step (under torchrun, the next check). (images, seconds)."""
    trained.train()
    fmt, tty, alone = memory_format(t.device), sys.stdout.isatty(), not torch.distributed.is_initialized()
    t0, images, total_steps, pending = time.perf_counter(), 0, t.run["step"] + len(t.loader), []
    for x in t.loader:
        x = x.to(t.device, non_blocking=True).contiguous(memory_format=fmt)
        parts = train_step(trained, t.optimizer, x, settings, t.bf16)
        pending.append((logged_terms(parts) * len(x), len(x)))
        images += len(x)
        if tty and (t.run["step"] + len(pending)) % 10 == 0:
            print(f"\r  epoch {epoch}: {t.run['step'] + len(pending)}/{total_steps} steps, "
                  f"{images / (time.perf_counter() - t0):.0f} img/s", end="", flush=True)
        if (len(pending) == CHECK_EVERY or stop.requested and alone) and check_steps(t, pending, stop, epoch):
            break
    check_steps(t, pending, stop, epoch)
    if tty:
        print("\r" + " " * 60 + "\r", end="")
    return images, time.perf_counter() - t0


def train_step(model, optimizer, x, settings: dict, amp: bool = False) -> dict[str, torch.Tensor]:
    """One Adam step; it never reads the loss (a GPU would wait): train_epoch checks it every CHECK_EVERY steps."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(x)
    logits, mu, logvar, z = (o.float() for o in outputs)  # the loss's sums and exp in float32
    parts = loss_terms(logits, x, mu, logvar, z, **settings)
    optimizer.zero_grad(set_to_none=True)
    parts["total"].backward()
    optimizer.step()
    return parts


def logged_terms(parts: dict) -> torch.Tensor:
    """The LOGGED_TERMS of loss_terms' output as one vector, for running sums."""
    return torch.stack([parts[name] for name in LOGGED_TERMS]).detach()


def check_steps(t: Training, pending: list, stop: StopOnCtrlC, epoch: int) -> bool:
    """Add the pending steps' losses up in order, with one wait for the device; a NaN/inf loss stops every
    process in one line (its weights are never saved); True when any process had Ctrl-C."""
    bad = None
    values = torch.stack([terms for terms, _ in pending]).cpu() if pending else []
    for terms, (_, n) in zip(values, pending):
        if not torch.isfinite(terms[LOGGED_TERMS.index("total")]):
            bad = t.run["step"] + 1
            break
        t.run["sums"] += terms
        t.run["seen"] += n
        t.run["step"] += 1
    pending.clear()
    bad_anywhere, stop.requested = agree_on(bad is not None, stop.requested, device=t.device)
    if bad_anywhere:
        where = f"step {bad}" if bad else "a step of another process"
        raise UserError(f"the loss became NaN/inf at epoch {epoch} {where}; stopped. {t.cfg.out}/last.pt keeps "
                        f"the last good epoch (try a lower --lr)", code=1)
    return stop.requested


# ----------------------------------------------------------------------------------------------------
# Set-up, checkpoints and exact resume.

@dataclass
class Training:
    """What one process of a run holds: settings, data, model, optimiser, and `run`, the progress it saves."""
    cfg: Config
    ranks: Ranks
    device: torch.device
    bf16: bool  # --precision on this device
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
    loader: object = None
    batches: list = None
    data_path: str = ""
    val_loader: object = None
    previews: tuple = ()


def start_training(cfg: Config, resumed: Optional[dict], download: bool, ranks: Ranks, device) -> Training:
    """Seed, load the data, make the output folder, build the model, optimiser and loaders; resume if asked."""
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    for seed_with in (random.seed, np.random.seed, torch.manual_seed):
        seed_with(cfg.seed + ranks.rank)  # each rank its own reparameterisation noise
    bf16 = uses_bf16(cfg.precision, device)
    if not ranks.main:
        torch.distributed.barrier()  # wait while rank 0 alone fetches --download files
    train_set, val_set = make_datasets(cfg, download)
    out = Path(cfg.out)
    if ranks.main:
        make_output_folder(out)
        if ranks.world > 1:
            torch.distributed.barrier()
    model = BetaVAE.of(cfg).to(device, memory_format=memory_format(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=cfg.lr_patience)
    sampler_rng = torch.Generator().manual_seed(cfg.seed)
    t = Training(cfg, ranks, device, bf16, out, train_set, val_set, model, optimizer, scheduler, sampler_rng,
                 {"epoch": 0, "step": 0, "sums": torch.zeros(len(LOGGED_TERMS)), "seen": 0, "history": [],
                  "best": math.inf, "elapsed": 0.0, "epoch_sampler": sampler_rng.get_state()})
    if cfg.tensorboard and ranks.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
        t.writer = SummaryWriter(out / "tensorboard")
    if resumed:
        resume(t, resumed)
    here = machine(device, ranks.world)  # each machine the run trained on, for the model card
    if here not in t.run.setdefault("machines", []):
        t.run["machines"].append(here)
    t.loader, t.batches, t.data_path = train_loader(train_set, cfg, device)
    val_share = val_set if ranks.world == 1 else Subset(val_set, range(ranks.rank, len(val_set), ranks.world))
    t.val_loader = val_loader(val_share, cfg, loader_workers(cfg))
    t.previews = (preview_images(val_set, 8).to(device),  # fixed images and codes drawn every epoch
                  torch.randn(64, cfg.latent_dim, generator=torch.Generator().manual_seed(0)).to(device))
    return t


def resume(t: Training, resumed: dict) -> None:
    """Continue from a checkpoint: weights, optimiser, scheduler, progress and every random state."""
    t.model.load_state_dict(resumed["model"])
    t.optimizer.load_state_dict(resumed["optimizer"])
    t.scheduler.load_state_dict(resumed["scheduler"])
    t.run = resumed["run"]
    rngs = resumed["rng"]
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
            "scheduler": t.scheduler.state_dict(), "run": t.run, "rng": rngs,
            # the latest validation KL of every dim: the figures rank the latent dims by it
            "kl_per_dim": last.get("kl_per_dim"),
            # the factor each dim carries most, on the same validation images: the traversal's labels
            "dim_factors": last.get("dim_factors")})


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


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; an explicit choice must be available."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(n for n in ("cuda", "mps", "cpu") if available[n])
    if not available[name]:
        raise UserError(f"--device {name} is not available on this machine")
    torch.backends.cudnn.benchmark = True  # images are always 64x64: let cuDNN time and keep its fastest kernels
    return torch.device(name)


def machine(device: torch.device, processes: int = 1) -> str:
    """This machine in words, as the run records it for the model card: CPU (and GPU), PyTorch, threads."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    threads = torch.get_num_threads()
    return (f"{cpu} ({os.cpu_count()} cores{gpu}), PyTorch {torch.__version__}, "
            f"{f'{processes} processes x ' if processes > 1 else ''}{threads} thread{'s' * (threads > 1)}")


def native_bf16(device: torch.device) -> bool:
    """Does the device compute bfloat16 natively? Elsewhere autocast emulates it, 14x slower on an AVX2 CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu.get_capabilities() if device.type == "cpu" and hasattr(torch.cpu, "get_capabilities") else {}
    return bool(cpu.get("amx_bf16") or cpu.get("avx512_bf16"))  # older torch cannot tell: float32


def uses_bf16(precision: str, device: torch.device) -> bool:
    """--precision on this device: True for bfloat16 autocast."""
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise UserError(f"--precision bf16 runs on the CPU or CUDA, not {device.type}")
    return precision == "bf16" or precision == "auto" and native_bf16(device)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last trains faster on CPU and CUDA (measured: docs/performance.md); MPS keeps the default."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


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
    if "amp" in stored:  # betavae 0.2 stored --amp, now --precision
        stored = {k: v for k, v in stored.items() if k != "amp"} | {"precision": "bf16" if stored["amp"] else "fp32"}
    unknown = set(stored) - {f.name for f in fields(Config)}
    if unknown:
        raise UserError(f"{path} has settings this betavae {__version__} does not know: {sorted(unknown)}")
    return Config(**stored)


def model_from_state(state: dict, path, device="cpu") -> tuple[BetaVAE, Config]:
    """Rebuild the model of a read checkpoint from its stored config: (model in eval mode, Config)."""
    cfg = config_from_dict(state["config"], path)
    model = BetaVAE.of(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} holds a model of another architecture ({first})")
    return model.to(device).eval(), cfg


def load_checkpoint(path, device="cpu") -> tuple[BetaVAE, Config]:
    """Rebuild the model from a checkpoint alone: (model in eval mode, its Config)."""
    return model_from_state(read_checkpoint(path, device), path, device)


def make_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror}")


class StopOnCtrlC:
    """Ctrl-C (or SIGTERM, from `kill` or a scheduler) stops at the next step; a second, at once, unsaved."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: saving last.pt after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------
# Validation and what each epoch records: history.csv, pictures, charts, TensorBoard, checkpoints.

def val_loader(val_set: Dataset, cfg: Config, workers: int = 0) -> DataLoader:
    """The validation batches, drawn as training draws its own: the TC is estimated from the batch, so at the training
    batch size and in a fixed shuffled order (the set is sorted, and batches of one shape put the TC a third low)."""
    order = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(0)).tolist()
    # its own generator: iterating a DataLoader would otherwise draw from the training's global random state
    return DataLoader(Subset(val_set, order), batch_size=cfg.batch_size if cfg.objective == "tc" else 256,
                      num_workers=workers, generator=torch.Generator())


@torch.no_grad()
def validate(model, loader, cfg: Config, epoch: int, device) -> dict:
    """The 1-based epoch's objective on validation data (eval mode, fixed noise), its terms, per-dim KL and codes mu."""
    was_training = model.training
    model.eval()
    broadcast_buffers(model)  # every rank validates the model the checkpoint stores: rank 0's
    generator = torch.Generator(device).manual_seed(0)  # same noise every epoch: losses compare
    n_terms, settings = len(LOGGED_TERMS), loss_settings(cfg, epoch)
    sums = torch.zeros(n_terms + cfg.latent_dim + 1, device=device)  # the terms, per-dim KL, images
    codes = []
    for x in loader:
        x = x.to(device).contiguous(memory_format=memory_format(device))
        logits, mu, logvar, z = model(x, generator)
        parts = loss_terms(logits, x, mu, logvar, z, **settings)
        sums += torch.cat([logged_terms(parts), parts["kl_per_dim"], torch.ones(1, device=device)]) * len(x)
        codes.append(mu.double().cpu())
    model.train(was_training)
    sums = all_sum(sums)  # under torchrun each rank validated its share
    means = (sums[:-1] / sums[-1]).tolist()
    return {**dict(zip(LOGGED_TERMS, means)), "kl_per_dim": means[n_terms:], "codes": torch.cat(codes).numpy()}


def validation_factors(codes: np.ndarray, val_set: Dataset) -> Optional[list[list]]:
    """Per latent dim [its factor, normalised MI] on the validation codes; None for data without factors."""
    data, indices = base_items(val_set)
    if not hasattr(data, "factors"):
        return None
    return metrics.dim_factors(codes, data.factors(indices).numpy(), data.factor_names)


def active_dims(kl_dims: list[float], threshold: float = 0.01) -> int:
    """Latent dims whose mean KL exceeds `threshold` nats: the ones that carry information."""
    return sum(k > threshold for k in kl_dims)


def take_time(t: Training) -> None:
    """Add the time since the last call to the run's training time."""
    now = time.perf_counter()
    t.run["elapsed"] += now - t.clock
    t.clock = now


EVAL_EVERY_SAMPLE = {"n": 1000, "points": (1000, 500)}  # a tenth of evaluate's: DCI's boosted trees take the time


def epoch_row(t: Training, epoch: int, val: dict, images: int, seconds: float) -> dict:
    """The epoch's row of the history; with --eval-every also the disentanglement metrics."""
    beta, capacity = schedule(t.cfg, epoch)
    row = {"epoch": epoch, **{f"train_{name}": value for name, value in
                              zip(LOGGED_TERMS, (t.run["sums"] / t.run["seen"]).tolist())},
           **{f"val_{name}": val[name] for name in LOGGED_TERMS},
           "beta_eff": beta, "capacity": capacity, "lr": t.optimizer.param_groups[0]["lr"],
           "active_dims": active_dims(val["kl_per_dim"]), "img_per_s": images * t.ranks.world / max(seconds, 1e-9),
           "elapsed_s": t.run["elapsed"] + time.perf_counter() - t.clock, "kl_per_dim": val["kl_per_dim"],
           "dim_factors": validation_factors(val["codes"], t.val_loader.dataset) if t.ranks.main else None}
    if t.ranks.main and t.cfg.eval_every and (epoch % t.cfg.eval_every == 0 or epoch == t.cfg.epochs):
        import measure  # beside this file, as evaluate
        dataset = load_dataset(t.cfg)[0]
        if hasattr(dataset, "render"):
            row.update(metrics.disentanglement_metrics(measure.encoder_representation(t.model, dataset, t.device),
                                                       metrics.FactorSampler.of_dataset(dataset), seed=0,
                                                       **EVAL_EVERY_SAMPLE))
        if (accuracy := measure.shape_accuracy(t.model, t.val_set, t.device)) is not None:
            row["shape_accuracy"] = accuracy
        t.model.train()
    return row


def record_epoch(t: Training, row: dict) -> None:
    """Keep the epoch: history, pictures, TensorBoard, last.pt (and best.pt if best); print its line."""
    t.run["history"].append(row)
    t.run.update(epoch=row["epoch"], step=0, sums=torch.zeros(len(LOGGED_TERMS)), seen=0)
    if t.ranks.main:
        save_epoch_images(t.model, *t.previews, t.out, row["epoch"], t.writer)
        write_history(t.run["history"], t.out / "history.csv")
    if t.writer is not None:
        log_tensorboard(t.writer, row)
    # under warm-up or capacity annealing the objective changes each epoch: compare final ones only
    val_total, done = row["val_total"], schedule_done(t.cfg, row["epoch"])
    is_best = val_total < t.run["best"] or not done
    if done:
        t.run["best"] = min(t.run["best"], val_total)
    take_time(t)
    save_run(t, t.out / "last.pt", *([t.out / "best.pt"] if is_best else []))
    print(format_epoch(row, t.cfg, row["elapsed_s"] / row["epoch"] * (t.cfg.epochs - row["epoch"])), flush=True)
    if "mig" in row:
        print("  metrics (n 1000): " + ", ".join(f"{m} {row[m]:.3f}" for m in metrics.SCORE_NAMES if m in row))
    warn_if_stuck(t.run["history"], t.cfg)


def print_start(t: Training, defaults_used: Optional[str]) -> None:
    """The run's first lines: data, device, size, the dataset's defaults, the loss and its reductions."""
    cfg, n_params = t.cfg, sum(p.numel() for p in t.model.parameters())
    processes = f" | {t.ranks.world} processes, global batch {cfg.batch_size * t.ranks.world}" if t.ranks.world > 1 else ""
    precision = "bfloat16 autocast" if t.bf16 else "float32"
    print(f"betavae {__version__} | device {t.device}, {precision}{processes} | {cfg.dataset}: {len(t.train_set):,} train / "
          f"{len(t.val_set):,} val images, {cfg.channels}x{IMAGE_SIZE}x{IMAGE_SIZE} | {n_params:,} parameters")
    if defaults_used:
        print(defaults_used)
    print(describe_loss(cfg))
    if cfg.kl_delay >= cfg.epochs:  # (--capacity runs have no delay: check_config)
        print(f"note: --kl-delay {cfg.kl_delay} covers all {cfg.epochs} epochs: this run trains an autoencoder; "
              f"--kl-delay 0 makes a short run a Beta-VAE")
    resumed = " (resumed)" if t.run["epoch"] or t.run["step"] else ""
    print(f"seed {cfg.seed} | {t.data_path} | {cfg.epochs} epochs of {cfg.epoch_size or len(t.train_set):,} images, "
          f"batch {cfg.batch_size}, lr {cfg.lr:g} | writing {t.out}{resumed}")


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
    """Neither the train nor the validation recon of the last `patience` epochs beat the best before by 0.1 %."""
    def stalled(key: str) -> bool:
        return min(r[key] for r in history[-patience:]) > min(r[key] for r in history[:-patience]) * 0.999
    return len(history) > patience and stalled("val_recon") and stalled("train_recon")


def warn_if_stuck(history: list[dict], cfg: Config, patience: int = 5) -> None:
    """Warn of the tutorial's two failures: collapse, and a stalled recon (once, when the stall begins)."""
    last = history[-1]
    if last["epoch"] >= 2 and last["val_kl"] < 0.1 and (last["beta_eff"] > 0 or last["capacity"]):
        print(f"warning: validation KL is {last['val_kl']:.3f} nats: the posterior has collapsed onto the prior "
              f"(lower --beta)")
    # a recon worse than under a smaller KL weight (the autoencoder of a delay) is no stall: this weight's epochs only
    weight, start = lambda row: (row["beta_eff"], row["capacity"]), len(history)
    while start and weight(history[start - 1]) == weight(last):
        start -= 1
    if recon_stalled(history[start:], patience) and not recon_stalled(history[start:-1], patience):
        print(f"warning: the reconstruction has not improved for {patience} epochs "
              f"(lr {last['lr']:.1e}; ReduceLROnPlateau halves it after {cfg.lr_patience} epochs without a better objective)")


@torch.no_grad()
def save_epoch_images(model, val_images, sample_z, out: Path, epoch: int, writer=None) -> None:
    """Originals above their reconstructions (decoded from mu), and prior samples at fixed z."""
    model.eval()
    recon = model.decode(model.encode(val_images)[0])
    samples = model.decode(sample_z)
    model.train()
    (out / "images").mkdir(exist_ok=True)
    pairs, samples = torch.cat([val_images, recon]).cpu(), samples.cpu()
    image_grid(pairs.numpy(), len(val_images)).save(out / "images" / f"recon_e{epoch:03d}.png")
    image_grid(samples.numpy(), 8).save(out / "images" / f"samples_e{epoch:03d}.png")
    if writer is not None:
        writer.add_images("images/reconstruction", pairs, epoch)
        writer.add_images("images/samples", samples, epoch)


HISTORY_FIELDS = ["epoch", *(f"{split}_{name}" for split in ("train", "val") for name in LOGGED_TERMS),
                  "beta_eff", "capacity", "lr", "active_dims", "img_per_s", "elapsed_s"]


def write_history(history: list[dict], path: Path) -> None:
    """history.csv: a row per epoch, the --eval-every metrics, the validation KL per dim (kl_dim0, ...)."""
    columns = HISTORY_FIELDS + [m for m in metrics.SCORE_NAMES if any(m in row for row in history)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns + [f"kl_dim{d}" for d in range(len(history[0]["kl_per_dim"]))])
        for row in history:
            w.writerow(["" if row.get(k) is None else row[k] for k in columns] + [f"{k:.6g}" for k in row["kl_per_dim"]])


def read_history(path: Path) -> list[dict]:
    """history.csv back into the rows train() wrote."""
    if not path.is_file():
        raise UserError(f"no history.csv in {path.parent}")
    try:
        with open(path, newline="") as f:
            return [{"epoch": int(r["epoch"]), "capacity": float(r["capacity"]) if r["capacity"] else None,
                     **{k: float(r[k]) for k in HISTORY_FIELDS if k not in ("epoch", "capacity")},
                     **{m: float(r[m]) for m in metrics.SCORE_NAMES if r.get(m)},
                     "kl_per_dim": [float(r[k]) for k in r if k.startswith("kl_dim")]} for r in csv.DictReader(f)]
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path} is not a betavae history.csv")


def log_tensorboard(writer, row: dict) -> None:
    """The epoch's scalars under namespaced tags: loss/, schedule/, latent/, speed/."""
    scalars = {**{f"loss/{term}_{split}": row[f"{split}_{term}"] for split in ("train", "val") for term in LOGGED_TERMS},
               "schedule/beta_eff": row["beta_eff"], "schedule/capacity": row["capacity"], "schedule/lr": row["lr"],
               "latent/active_dims": row["active_dims"], "speed/img_per_s": row["img_per_s"]}
    for tag, value in scalars.items():
        if value is not None:
            writer.add_scalar(tag, value, row["epoch"])


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
    if torch.distributed.is_initialized() and buffers:
        flat = torch.cat([b.flatten().double() for b in buffers])  # one message; counts are exact in float64
        torch.distributed.broadcast(flat, 0)
        for buffer, values in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(values.view_as(buffer))


def rank_batches(batches: list, ranks: Ranks) -> list:
    """This rank's equal share of the epoch's batches, dealt round-robin (at most world - 1 go unused)."""
    usable = len(batches) // ranks.world * ranks.world
    if usable == 0:
        raise UserError(f"an epoch of {len(batches)} batches cannot feed {ranks.world} processes: "
                        f"raise --epoch-size or lower --batch-size")
    return batches[ranks.rank:usable:ranks.world]


# ====================================================================================================
# Pictures and numbers of a trained model, each made from a checkpoint alone and decoded in one batch.

SHIPPED = Path(__file__).resolve().parent / "assets" / "model" / "model.pt"  # the default run's (assets/remake.py)


def newest_checkpoint() -> Path:
    """The newest run's best.pt, else the shipped model; one line says which."""
    found = sorted(Path("runs").glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found and not SHIPPED.is_file():
        raise UserError("no checkpoint in runs/*/best.pt: train one first, or pass --checkpoint")
    path, which = (found[-1], "the newest run") if found else (SHIPPED, "the shipped model (no run in runs/)")
    print(f"using {os.path.relpath(path)}, {which}; --checkpoint picks another")
    return path


def open_checkpoint(args) -> tuple[BetaVAE, Config, dict, Path, torch.device]:
    """The picture commands' common start: the checkpoint (given or newest), its model and device."""
    path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
    device = pick_device(args.device)
    state = read_checkpoint(path, device)
    model, cfg = model_from_state(state, path, device)
    return model, cfg, state, path, device


def output_path(args, run: Path, name: str) -> Path:
    """--out, or `name` in the run's folder (runs/pretrained for the shipped model, whose files stay as shipped);
    its folder is made and checked writable."""
    path = Path(args.out) if args.out else (Path("runs/pretrained") if run.resolve() == SHIPPED.parent else run) / name
    make_output_folder(path.parent)
    return path


def checkpoint_validation(model: BetaVAE, cfg: Config, device) -> dict:
    """validate() for a loaded checkpoint: its validation data at the run's final beta_eff / capacity."""
    loader = val_loader(make_datasets(cfg)[1], cfg)
    return {**validate(model, loader, cfg, cfg.epochs, torch.device(device)), "val_set": loader.dataset}


def kl_ranking(state: dict, model: BetaVAE, cfg: Config, device) -> list[tuple[int, float]]:
    """(dim, validation KL) pairs, largest first: stored every epoch, measured for a first-epoch Ctrl-C save."""
    kl = state.get("kl_per_dim") or checkpoint_validation(model, cfg, device)["kl_per_dim"]
    return sorted(enumerate(kl), key=lambda pair: -pair[1])


def factor_labels(state: dict, model: BetaVAE, cfg: Config, device) -> Optional[list[list]]:
    """Per latent dim [factor, normalised MI]: stored every epoch, else measured; None without factors."""
    if state.get("dim_factors") is not None or not hasattr(load_dataset(cfg)[0], "factors"):
        return state.get("dim_factors")
    val = checkpoint_validation(model, cfg, device)
    return validation_factors(val["codes"], val["val_set"])


def dataset_images(cfg: Config, indices: list[int]) -> torch.Tensor:
    """Items of the checkpoint's dataset, (N, C, 64, 64)."""
    dataset = load_dataset(cfg)[0]
    for i in indices:
        if not 0 <= i < len(dataset):
            raise UserError(f"--index {i} is outside {cfg.dataset}'s {len(dataset):,} images (0 to {len(dataset) - 1})")
    return torch.stack([dataset[i] for i in indices])


def to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().cpu().numpy()


def base_code(args, model: BetaVAE, cfg: Config, device) -> torch.Tensor:
    """The traversal's base code: 0 with --prior, else mu of --image, of --index, or of the dataset's middle
    item (for shapes: the middle of every factor, a centred ellipse)."""
    if args.prior:
        return torch.zeros(cfg.latent_dim, device=device)
    if args.image:
        x = torch.from_numpy(read_image(args.image, cfg.channels, IMAGE_SIZE))
    else:
        dataset = load_dataset(cfg)[0]
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
        x = dataset_images(cfg, torch.randint(len(load_dataset(cfg)[0]), (2 * args.pairs,), generator=pick).tolist())
    mu = to_numpy(model.encode(x.to(device))[0])
    codes = np.concatenate([interpolation_codes(mu[i], mu[i + 1], args.steps, args.slerp) for i in range(0, len(x), 2)])
    decoded = to_numpy(model.decode(torch.from_numpy(codes).to(device)))
    save_figure(interpolation_figure(to_numpy(x), decoded), output_path(args, path.parent, "interpolate.png"),
                "interpolation")


@torch.no_grad()
def sample(args) -> None:
    """Images decoded from z drawn from the prior N(0, I), scaled by the temperature."""
    if args.n < 1 or args.temperature <= 0:
        raise UserError("--n must be >= 1 and --temperature > 0")
    model, cfg, _, path, device = open_checkpoint(args)
    z = torch.randn(args.n, cfg.latent_dim, generator=torch.Generator().manual_seed(args.seed)) * args.temperature
    images = to_numpy(model.decode(z.to(device)))
    save_figure(image_grid(images, math.ceil(math.sqrt(args.n))), output_path(args, path.parent, "samples.png"),
                f"{args.n} samples")


@torch.no_grad()
def reconstruct(args) -> None:
    """Validation images above their reconstructions from mu, each labelled with its error."""
    if args.n < 1:
        raise UserError("--n must be >= 1")
    model, cfg, _, path, device = open_checkpoint(args)
    x = preview_images(make_datasets(cfg)[1], args.n).to(device)
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


def draw_history(history: list[dict], path: Path) -> None:
    """The run's charts (loss_curves.png at the end, `plot` any time): train and validation losses, the KL's
    parts, the last KL per latent dim, the beta_eff / capacity and lr schedule, and any --eval-every metrics."""
    import matplotlib  # imported here: it is slow to import and only the charts need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    has_metrics = any(r.get("mig") is not None for r in history)
    fig, axes = plt.subplots(5 + has_metrics, 2, figsize=(11, 15 + 3 * has_metrics))
    for ax_row, term in zip(axes, ("recon", "kl", "total")):
        for ax, scale in zip(ax_row, ("linear", "log")):
            ax.plot(epochs, [r[f"train_{term}"] for r in history], "o-", label="train")
            ax.plot(epochs, [r[f"val_{term}"] for r in history], "s--", label="validation")
            ax.set(yscale=scale, title=f"{term}, {scale} scale", xlabel="epoch")
    for ax, split in zip(axes[3], ("train", "val")):
        for term, label in (("mi", "index-code MI"), ("tc", "total correlation"), ("dwkl", "dimension-wise KL")):
            ax.plot(epochs, [r[f"{split}_{term}"] for r in history], "o-", label=label)
        ax.set(title=f"the KL's parts, {'validation' if split == 'val' else split} (nats)", xlabel="epoch")
    kl = sorted(history[-1]["kl_per_dim"], reverse=True)
    axes[4][0].bar(range(len(kl)), kl)
    axes[4][0].set(title=f"KL per latent dim after epoch {epochs[-1]}, sorted ({active_dims(kl)} active)",
                   xlabel="latent dims, most informative first", ylabel="nats")
    by = "beta_eff" if history[-1]["capacity"] is None else "capacity"
    axes[4][1].plot(epochs, [r[by] for r in history], "o-", label=by)
    lr_axis = axes[4][1].twinx()
    lr_axis.plot(epochs, [r["lr"] for r in history], "r--", label="lr")
    lr_axis.set(yscale="log", ylabel="learning rate", title="schedule")
    lr_axis.legend(loc="upper right")
    if has_metrics:
        for name in ("mig", "factor_vae_score", "dci_disentanglement"):
            axes[5][0].plot(*zip(*[(r["epoch"], r[name]) for r in history if name in r]), "o-", label=name)
        axes[5][0].set(title="disentanglement (train --eval-every)", xlabel="epoch", ylim=(0, 1))
        axes[5][1].axis("off")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot(args) -> None:
    """The run's charts from its history.csv (what training draws into loss_curves.png)."""
    run = Path(args.run) if args.run else newest_checkpoint().parent
    history = read_history(run / "history.csv")
    if not history:
        raise UserError(f"{run / 'history.csv'} has no epochs yet")
    out = output_path(args, run, "plot.png")
    draw_history(history, out)
    print(f"wrote plots: {out}")


def evaluate(args) -> None:
    """The validation losses, the shape accuracy and the disentanglement metrics: measure.py."""
    import measure  # beside this file: what measures the model, not the model
    measure.evaluate(args)


# ====================================================================================================
# Command line: one subcommand per function; parsing happens only in main().

def add_config_flags(parser: argparse.ArgumentParser, names: Optional[list[str]] = None) -> None:
    """One --flag per Config field with help (or per field in `names`), showing its defaults."""
    for f in fields(Config):
        if "help" not in f.metadata or names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        ours = {dataset: d[f.name] for dataset, d in DATASET_DEFAULTS.items() if f.name in d}
        others = f"; {', '.join(ours)}: {next(iter(ours.values()))}" if ours else ""
        shown = f" (default: {f.default}{others})" if f.default not in (None, "") else ""
        parser.add_argument(flag, type=f.metadata.get("type", type(f.default)), default=f.default,
                            choices=f.metadata.get("choices"), help=f.metadata["help"] + shown)


def build_parser() -> Parser:
    parser = Parser(prog="betavae.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"betavae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    common = Parser(add_help=False)  # the options of every command that reads a checkpoint
    common.add_argument("--checkpoint", help="checkpoint to read (default: the newest runs/*/best.pt)")
    common.add_argument("--out", help="file to write (default: one in the checkpoint's folder)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run the model (default: auto)")

    def command(name: str, func, help: str, parents=(common,)) -> Parser:
        p = commands.add_parser(name, parents=list(parents), help=help, description=func.__doc__, allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    p = command("train", train, "train a Beta-VAE", parents=())
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--download", action="store_true", help="fetch the dataset's files into --data-dir if missing")
    add_picture_commands(command)
    p = command("evaluate", evaluate, "validation losses and disentanglement metrics")
    p.add_argument("--n", type=int, default=10_000, help="factor draws for MIG, SAP, DCI, modularity, and for "
                   "FactorVAE's variance estimate (default: 10000)")
    p.add_argument("--points", type=int, nargs=2, default=[10_000, 5_000], metavar=("TRAIN", "EVAL"),
                   help="beta-VAE and FactorVAE training and evaluation points (default: 10000 5000)")
    p.add_argument("--seed", type=int, default=0, help="results repeat exactly with the same seed (default: 0)")
    p.add_argument("--metrics", type=metrics.metric_groups, default=metrics.METRIC_GROUPS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(metrics.METRIC_GROUPS)} (default: all; dci is the slow one)")
    return parser


def add_picture_commands(command) -> None:
    """traverse, interpolate, sample, reconstruct and plot, each with its own options."""
    p = command("traverse", traverse, "latent traversal grid")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--image", help="base code: mu of this image file")
    base.add_argument("--index", type=int, help="base code: mu of this item of the checkpoint's dataset "
                      "(default: the item in the middle of every factor)")
    base.add_argument("--prior", action="store_true", help="base code: the prior mean 0")
    p.add_argument("--dims", default="auto", help="auto (active dims, at most 10), a count K, or 3,17,40 (default: auto)")
    p.add_argument("--range", type=float, default=3.0, help="sweep each dim from -range to +range (default: 3)")
    p.add_argument("--steps", type=int, default=11, help="values per dim (default: 11)")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF sweeping every shown dim")

    p = command("interpolate", interpolate, "interpolate between images")
    pair = p.add_mutually_exclusive_group()
    pair.add_argument("--index", type=int, nargs="+", help="dataset items, in pairs: A B [C D ...]")
    pair.add_argument("--images", nargs=2, metavar=("A", "B"), help="two image files")
    p.add_argument("--pairs", type=int, default=4, help="random dataset pairs when no images are given (default: 4)")
    p.add_argument("--steps", type=int, default=10, help="decoded points per row (default: 10)")
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--seed", type=int, default=0, help="picks the random pairs (default: 0)")

    p = command("sample", sample, "decode samples of the prior")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="scales the prior's std (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of z (default: 0)")

    p = command("reconstruct", reconstruct, "validation images and their reconstructions")
    p.add_argument("--n", type=int, default=16, help="number of images (default: 16)")

    p = command("plot", plot, "charts of a run's history.csv", parents=())
    p.add_argument("--run", help="run folder (default: the newest runs/* with a best.pt)")
    p.add_argument("--out", help="PNG to write (default: RUN/plot.png)")


def given_flags(argv: list[str]) -> set[str]:
    """Config fields the user typed on the command line (abbreviations are disabled)."""
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    report_errors(args.func, args)


if __name__ == "__main__":
    main()
