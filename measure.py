"""What measures a trained betavae model with torch: the codes the disentanglement metrics read, the
reconstructions' shape accuracy, and `evaluate`, which prints them all. metrics.py holds the math on arrays;
betavae.py calls this module for its `evaluate` command and for `train --eval-every`:

    python betavae.py evaluate --checkpoint runs/shapes-beta4/best.pt
"""
from __future__ import annotations

import json
import math
import time
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

import metrics
from betavae import (FACTOR_SIZES, RADIUS, BetaVAE, Shapes, UserError, active_dims, base_items,
                     checkpoint_validation, draw_shapes, load_dataset, memory_format, native_bf16, open_checkpoint,
                     output_path, render_shapes, shape_geometry, spread_positions)


# the shape accuracy's candidate sizes, x RADIUS (the true ones: 0.5 to 1): a coarser grid lets the area, which
# only the true shape matches exactly on the grid, decide (a disc of the true area scored 0.47 at 9 sizes, 0.41 at 17)
FIT_SIZES = torch.linspace(0.4, 1.2, 17)
FIT_WINDOW = 32  # pixels around a sprite's centre: the largest candidate (radius 12) shifted by 2 fits


def shape_candidates(factors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The three shapes at each image's orientation and position, at every FIT_SIZES size, in the FIT_WINDOW
    window around its centre: (candidates (N, 3, sizes, side, side), the windows' top-left pixels (N, 2))."""
    geometry = shape_geometry(factors)
    corners = geometry[1:3].T.round() - FIT_WINDOW // 2
    n, k, s = geometry.shape[1], FACTOR_SIZES[0], len(FIT_SIZES)
    each = geometry[:, :, None, None].repeat(1, 1, k, s)  # (6, N, shapes, sizes)
    each[0], each[3] = torch.arange(k)[:, None].float(), RADIUS * FIT_SIZES
    drawn = draw_shapes(each.reshape(6, -1), corners.repeat_interleave(k * s, dim=0), FIT_WINDOW)
    return drawn.view(n, k, s, FIT_WINDOW, FIT_WINDOW).numpy(), corners.long().numpy()


SHAPE_NAMES = ("square", "ellipse", "heart")  # the shape factor's classes, as draw_shapes draws them


def spread(items: np.ndarray, n: int) -> np.ndarray:
    """n of the items, evenly spaced across them in grid order, whose slowest factor is the shape: the first 2,000 of
    the shapes' 5,000 validation items would be squares and ellipses, no heart."""
    return np.sort(items)[spread_positions(len(items), n)]


@torch.no_grad()
def shape_fits(model: BetaVAE, val_set: Dataset, device, n: int = 2000) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """For n validation images spread over the set, whether its reconstruction (decoded from mu) fits its own shape
    best among the three, each at its best size and shift (metrics.shape_hits), and its shape: (hits, shapes);
    None for data not drawn by render_shapes."""
    shapes, grid = base_items(val_set)
    if not isinstance(shapes, Shapes):
        return None
    model.eval()
    hits, classes, device = [], [], torch.device(device)
    picked = spread(grid, n)
    for part in np.array_split(picked, math.ceil(len(picked) / 500)):  # ~100 MB of candidates at a time
        factors = shapes.factors(part)
        x = render_shapes(factors, device).contiguous(memory_format=memory_format(device))
        recon = model.decode(model.encode(x)[0])[:, 0].float().cpu().numpy()
        classes.append(factors[:, 0].numpy())
        hits.append(metrics.shape_hits(recon, *shape_candidates(factors), classes[-1]))
    return np.concatenate(hits), np.concatenate(classes)


def shape_accuracy(model: BetaVAE, val_set: Dataset, device, n: int = 2000) -> Optional[float]:
    """The share of shape_fits' hits (chance 1/3; n 2000: +-0.011); None for data not drawn by render_shapes."""
    fits = shape_fits(model, val_set, device, n)
    return None if fits is None else float(fits[0].mean())


def encoder_representation(model: BetaVAE, dataset, device, bf16: bool = False, progress=None):
    """factors -> codes, for the metrics: render the images with those factors and encode them to mu, each
    factor combination once, at the fast settings (no autograd, channels_last, bf16 where native)."""
    model.eval()

    @torch.inference_mode()
    def encode(factors: np.ndarray) -> np.ndarray:
        images = dataset.render(torch.from_numpy(factors), device).contiguous(memory_format=memory_format(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model.encode(images)[0].float().cpu().numpy()
    batch = 4096 if device.type == "cuda" else 512  # a GPU wants large batches; a CPU gains nothing above 512
    return metrics.CodeTable(encode, dataset.factor_sizes, batch, progress)


def evaluate(args) -> None:
    """Reconstruction, KL and active dims on validation data, and the six disentanglement metrics (metrics.py)
    where the dataset has ground-truth factors; prints a table and writes JSON."""
    if args.n < 10 or min(args.points) < 1:
        raise UserError("--n must be >= 10 and --points >= 1")
    model, cfg, _, path, device = open_checkpoint(args)
    start = time.perf_counter()
    val = checkpoint_validation(model, cfg, device)
    results = {"checkpoint": str(path), "dataset": cfg.dataset, "seed": args.seed, "n": args.n,
               "points": list(args.points), "val_recon": val["recon"], "val_kl": val["kl"],
               "active_dims": active_dims(val["kl_per_dim"]), "kl_per_dim": val["kl_per_dim"]}
    if (fits := shape_fits(model, val["val_set"], device)) is not None:
        hits, shapes = fits  # the accuracy of each shape tells which outline the code is missing
        results["shape_accuracy"] = float(hits.mean())
        results["shape_accuracy_per_shape"] = {name: float(hits[shapes == k].mean())
                                               for k, name in enumerate(SHAPE_NAMES) if (shapes == k).any()}
    dataset = load_dataset(cfg)[0]
    if hasattr(dataset, "render"):
        sampler = metrics.FactorSampler.of_dataset(dataset)
        results["factors_drawn_from"] = sampler.describe()
        if sampler.held is not None:
            print(f"note: factors drawn from {sampler.describe()}")
        progress = metrics.Progress()
        bf16 = cfg.precision != "fp32" and native_bf16(device)  # never emulated bf16: 14x slower on an AVX2 CPU
        representation = encoder_representation(model, dataset, device, bf16, progress)
        results.update(metrics.disentanglement_metrics(representation, sampler, args.n, args.seed, args.points,
                                                       args.metrics, progress))
    else:
        print(f"note: {cfg.dataset} has no ground-truth factors: the disentanglement metrics need them")
    results["seconds"] = time.perf_counter() - start
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:>28}  {value:.4f}")
    for key, label in metrics.PER_FACTOR_SCORES.items():  # which factors are separated, which held at all
        if key in results:
            results[key] = dict(zip(dataset.factor_names, results[key]))
            print(f"{label:>28}  {metrics.per_factor_text(results[key])}")
    if "shape_accuracy_per_shape" in results:
        print(f"{'shape accuracy per shape':>28}  {metrics.per_factor_text(results['shape_accuracy_per_shape'])}")
    out = output_path(args, path.parent, "metrics.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote metrics: {out}")
