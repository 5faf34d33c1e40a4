"""The time-to-disentangle study: how fast does each setting separate the factors of the built-in shapes?

    python study.py --variants recipe-tc-beta4-batch256-broadcast --seeds 0 4 5 --epochs 38 --eval-epochs 2
    python study.py --variants tutorial,lr5e-4 --epochs 10 --common "--epoch-size 10000"
    python study.py --collect                 # tabulate the stages already scored, as after a stopped study
    python study.py --halves 150000           # the default's decoder, then encoder, alone on the true factors
    python study.py --tc-angle runs/x/last.pt --n 8192   # the TC estimate as the x/y plane turns

Every variant is a list of `betavae.py train` flags on top of the tutorial's settings. A run trains in
stages through the CLI (resume is exact, so the stages add up to one run) and `betavae.py evaluate` scores
each stage (MIG and FactorVAE score); a rerun skips the stages already scored. Writes study.csv, study.png
and summary.json in --out; docs/study.md reads the results.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import betavae as bv
import measure
import metrics
from infer_onnx import Parser, UserError, report_errors

# the tutorial's settings, typed out: the sprites' own defaults differ (DATASET_DEFAULTS)
STUDY_BASE = "--arch tutorial --latent-dim 128 --recon mse --objective kl --lr 1e-4 --batch-size 32 --kl-delay 0"
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
    "bf16": "--precision bf16",
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
    # large batches at Adam's square-root lr, which lost to keeping the lr (docs/study.md)
    **{f"recipe-tc-beta4-batch{b}-sqrt-lr": f"{RECIPE} --objective tc --beta 4 --batch-size {b} --lr {lr}"
       for b, lr in ((256, "1e-3"), (512, "1.41e-3"))},
    "recipe-tc-beta4-bf16": f"{RECIPE} --objective tc --beta 4 --precision bf16",
    # the whole KL term rising over 3 epochs (--kl-warmup), against the early collapse of large batches
    "recipe-tc-beta4-batch256-warmup": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --kl-warmup 3",
    "recipe-tc-beta10-batch256": f"{RECIPE} --objective tc --beta 10 --batch-size 256",
    "recipe-tc-beta6-batch256": f"{RECIPE} --objective tc --beta 6 --batch-size 256",
    # fewer dims than the recipe's 10 for the 5 factors: less room to split one factor over two dims
    "recipe-tc-beta4-batch256-latent6": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --latent-dim 6",
    # Burgess et al.'s capacity under the TC objective: the information grows a nat per epoch
    "recipe-tc-beta4-batch256-capacity": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --capacity 15 "
                                         "--capacity-epochs 15",
    # free bits under the TC objective: a dim's KL below the floor costs nothing, so no dim is pushed to collapse
    **{f"recipe-tc-beta4-batch256-free-bits{bits}": f"{RECIPE} --objective tc --beta 4 --batch-size 256 "
       f"--free-bits {bits}" for bits in ("0.5", "1")},
    # Watters et al.'s spatial broadcast decoder: a position is a shift against axis-aligned coordinate channels
    "recipe-tc-beta4-batch256-broadcast": f"{RECIPE} --objective tc --beta 4 --batch-size 256 --arch broadcast",
    # Higgins et al.'s objective at the shapes default's settings: the two objectives side by side
    "recipe-kl-beta4-batch256-broadcast": f"{RECIPE} --beta 4 --batch-size 256 --arch broadcast",
})
# the shapes default before its --kl-delay (the recipe's batch 64, β 4 on the TC, the broadcast decoder), typed
# out: the default-* variants are one change from it, named as docs/study.md and assets/study_shape.csv name them
DEFAULT = f"{RECIPE} --objective tc --beta 4 --arch broadcast"
# the default before the shape study (batch 256), from which its first changes were made, one at a time
B256 = f"{DEFAULT} --batch-size 256"
STUDY_VARIANTS.update({
    "default": DEFAULT,
    # at each precision: does bfloat16 cost anything at equal images?
    **{f"default-{p}": f"{DEFAULT} --precision {p}" for p in ("fp32", "bf16")},
    # a weaker pull on the code: β on the TC, or the plain ELBO (β 1 on the whole KL), or below it
    **{f"default-tc-beta{beta}": f"{DEFAULT} --beta {beta}" for beta in (2, 6)},
    **{f"b256-kl-beta{beta}": f"{B256} --objective kl --beta {beta}" for beta in (1, 0.25)},
    "b256-lr1e-3": f"{B256} --lr 1e-3",
    "default-latent16": f"{DEFAULT} --latent-dim 16",
    "default-width2": f"{DEFAULT} --width 2",  # about 4x the compute a step
    # the whole KL term rising from 0 over 10 or 20 epochs: even a small weight kept the angle out (docs/study.md)
    **{f"default-warmup{epochs}": f"{DEFAULT} --kl-warmup {epochs}" for epochs in (10, 20)},
    # no KL term for the first 12 epochs (240,000 images): an autoencoder finds the angles first (docs/study.md)
    "default-delay12": f"{DEFAULT} --kl-delay 12",
    # a longer autoencoder: a run whose outlines were not in by epoch 12 lost them when the KL term entered;
    # the study's last change, today's shapes default (betavae.SPRITES)
    "default-delay16": f"{DEFAULT} --kl-delay 16",
    # one change from that default: more dims, where the shape and the angle might part; a larger batch
    "default-delay16-latent16": f"{DEFAULT} --kl-delay 16 --latent-dim 16",
    "default-delay16-batch128": f"{DEFAULT} --kl-delay 16 --batch-size 128",
    # the lr halved sooner: the default's first halving (after 1.1-1.3 M images) took 3 nats off the recon
    "default-delay16-patience2": f"{DEFAULT} --kl-delay 16 --lr-patience 2",
    # twice the channels in every layer (about 4x a step's compute): does the autoencoder find the outlines sooner?
    "default-delay16-width2": f"{DEFAULT} --kl-delay 16 --width 2",
    # the same with a weaker or stronger pull on the TC after the delay: does it turn x and y onto the axes?
    **{f"default-delay12-beta{beta}": f"{DEFAULT} --kl-delay 12 --beta {beta}" for beta in (2, 6)},
    # twice the lr: the x/y plane turns onto the axes by a gradient of 0.01 nats a degree; does it turn sooner?
    "default-delay12-lr1e-3": f"{DEFAULT} --kl-delay 12 --lr 1e-3",
})
STUDY_FIELDS = ["variant", "seed", "epoch", "images", "minutes", "threads", "mig", "factor_vae_score",
                "shape_accuracy", "val_recon", "val_kl", "active_dims", "mig_per_factor"]


def run_cli(argv: list[str], log: Path, threads: int) -> None:
    """Run `python betavae.py ARGV` with `threads` CPU threads (passive OpenMP waiting: runs side by side
    share the cores), appending its output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "a") as f:
        f.write("$ betavae.py " + " ".join(argv) + "\n")
        f.flush()
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("betavae.py")), *argv], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise UserError(f"betavae.py {argv[0]} failed (exit {done.returncode}); see {log}")


def stages_to_score(epochs: int, every: int, trained: int, scored: set[int]) -> list[int]:
    """The epochs a run is scored at: every `every` and the last, but for a stage the run has trained past
    without scoring it (an earlier call's other --eval-epochs): that model is gone."""
    stages = sorted({*range(every, epochs + 1, every), epochs})
    return [epoch for epoch in stages if epoch >= trained or epoch in scored]


def study_stages(args, variant: str, seed: int, threads: int, out: Path) -> list[int]:
    """Train one variant with one seed in stages of --eval-epochs epochs, scoring each stage into out
    (skipping the stages already scored); the stages' epochs."""
    out.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(STUDY_BASE) + shlex.split(STUDY_VARIANTS[variant]) + shlex.split(args.common)
    trained = len(bv.read_history(out / "history.csv")) if (out / "history.csv").exists() else 0
    scored = {int(path.stem.removeprefix("metrics_e")) for path in out.glob("metrics_e*.json")}
    stages = stages_to_score(args.epochs, args.eval_epochs, trained, scored)
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


def study_run(args, variant: str, seed: int, threads: int, collect: bool) -> list[dict]:
    """One variant and seed's rows: its stages trained and scored, or when collecting only those already
    scored."""
    out = Path(args.out) / f"{variant}-seed{seed}"
    if not collect:
        stages = study_stages(args, variant, seed, threads, out)
    else:  # a run not yet scored (or not yet started) has no rows
        stages = sorted(int(path.stem.removeprefix("metrics_e")) for path in out.glob("metrics_e*.json"))
    if not stages:
        return []
    history = {row["epoch"]: row for row in bv.read_history(out / "history.csv")}
    epoch_size = json.loads((out / "config.json").read_text())["epoch_size"]
    rows = []
    for epoch in stages:
        scores, row = json.loads((out / f"metrics_e{epoch:03d}.json").read_text()), history[epoch]
        rows.append({"variant": variant, "seed": seed, "epoch": epoch, "images": epoch * epoch_size,
                     "minutes": row["elapsed_s"] / 60, "mig": scores["mig"],
                     "threads": "" if collect else threads,  # a collected run's are not on record
                     "factor_vae_score": scores["factor_vae_score"], "val_recon": row["val_recon"],
                     "shape_accuracy": scores.get("shape_accuracy", float("nan")),  # not measured before
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
                        "shape_accuracy": float(np.median([r["shape_accuracy"] for r in final])),
                        "val_recon": float(np.median([r["val_recon"] for r in final])),
                        "flags": STUDY_VARIANTS[variant] or "(the tutorial's)"})
    return summary


def plot_study(rows: list[dict], path: Path) -> None:
    """MIG against images seen and against minutes, FactorVAE against minutes: one colour per variant,
    a line per seed."""
    import matplotlib  # imported here: it is slow to import and only the chart needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    bv.make_output_folder(out)
    runs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    if args.collect:
        print(f"study: tabulating the stages already scored of {len(runs)} runs in {out}, training nothing")
    else:
        print(f"study: {len(runs)} runs of {args.epochs} epochs, {args.jobs} at a time with {threads} threads "
              f"each, scored every {args.eval_epochs} epochs (MIG on n {args.n}, FactorVAE on "
              f"{args.points[0]}/{args.points[1]} points) | writing {out}")
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: the work runs in the subprocesses
        results = list(pool.map(lambda run: study_run(args, *run, threads, args.collect), runs))
    # the table holds every seed in --out of these variants, also those an earlier call trained
    others = sorted({(variant, int(seed)) for variant in args.variants for path in out.glob(f"{variant}-seed*")
                     if (seed := path.name.removeprefix(f"{variant}-seed")).isdigit()} - set(runs))
    results += [study_run(args, *run, threads, True) for run in others]
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
    print(f"{'variant':<20} {'seeds':>5} {'images':>9} {'minutes':>7}   {'MIG (min-max)':<21} {'FactorVAE':>9} "
          f"{'shape acc':>9} {'recon':>6}")
    for s in summary:
        print(f"{s['variant']:<20} {s['seeds']:>5} {s['images']:>9,} {s['minutes']:>7.1f}   "
              f"{s['mig']:.3f} ({s['mig_min']:.3f}-{s['mig_max']:.3f})   {s['factor_vae_score']:>9.3f} "
              f"{s['shape_accuracy']:>9.3f} {s['val_recon']:>6.1f}")
    print(f"wrote {out / 'study.csv'}, {out / 'study.png'}, {out / 'summary.json'}")


# ====================================================================================================
# The halves alone (--halves): each half of the default network trained on the true factors in place of the
# other half. How many images does the decoder need to draw the outlines from a perfect code, and the encoder
# to read the shape and orientation from an image? What a whole model needs beyond that is finding a code.

SYMMETRY = torch.tensor([4.0, 2.0, 1.0])  # a square, an ellipse, a heart look alike after 1/4, 1/2, 1 turn


def true_code(factors: torch.Tensor) -> torch.Tensor:
    """(B, 5) factor classes -> (B, 8), a code a perfect encoder could give: the shape one-hot, then the scale,
    the cos and sin of the angle as the image shows it (times the shape's symmetry), x and y, each of the last
    three standardised over its classes (mean 0, standard deviation 1)."""
    angle = 2 * math.pi * factors[:, 2] / bv.FACTOR_SIZES[2] * SYMMETRY[factors[:, 0]]
    sizes = torch.tensor(bv.FACTOR_SIZES)[[1, 3, 4]]
    standard = (factors[:, [1, 3, 4]] - (sizes - 1) / 2) / ((sizes**2 - 1) / 12).sqrt()
    return torch.cat([F.one_hot(factors[:, 0], bv.FACTOR_SIZES[0]), standard[:, :1], torch.cos(angle)[:, None],
                      torch.sin(angle)[:, None], standard[:, 1:]], dim=1).float()


def half_loss(net, half: str, factors: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The decoder's Bernoulli loss on the true code; the encoder's cross-entropy on the shape (mu's first
    three) plus squared error on the rest of the true code."""
    if half == "decoder":
        return bv.recon_loss(net.logits(true_code(factors)), images, "bce")
    mu = net(images)[0]
    return F.cross_entropy(mu[:, :3], factors[:, 0]) + (mu[:, 3:] - true_code(factors)[:, 3:]).pow(2).sum(1).mean()


@torch.no_grad()
def half_scores(net, half: str, factors: torch.Tensor, images: torch.Tensor, candidates) -> dict:
    """The decoder's recon (nats) and shape accuracy (measure.shape_accuracy's, on its drawings); the encoder's
    shape accuracy (its class) and median angle error in degrees of the shape's own turn."""
    if half == "decoder":
        logits = net.logits(true_code(factors))
        hits = metrics.shape_hits(torch.sigmoid(logits)[:, 0].numpy(), *candidates, factors[:, 0].numpy())
        return {"recon": bv.recon_loss(logits, images, "bce").item(), "shape accuracy": hits.mean()}
    mu, code, turn = net(images)[0], true_code(factors), 2 * math.pi / SYMMETRY[factors[:, 0]]
    error = torch.atan2(mu[:, 5], mu[:, 4]) - torch.atan2(code[:, 5], code[:, 4])  # in the symmetric angle
    degrees = (error / SYMMETRY[factors[:, 0]] + turn / 2) % turn - turn / 2  # wrapped to a shape's own turn
    return {"shape accuracy": (mu[:, :3].argmax(1) == factors[:, 0]).float().mean().item(),
            "angle error (deg)": degrees.abs().median().item() * 180 / math.pi}


def held_factors() -> torch.Tensor:
    """The 1,000 fixed grid points (factor classes) the halves are scored on."""
    shapes = bv.Shapes()
    return shapes.factors(torch.randint(len(shapes), (1000,), generator=torch.Generator().manual_seed(1234)))


def blur_floor(factors: torch.Tensor, images: torch.Tensor, unknown: list[int]) -> float:
    """The Bernoulli loss (nats an image) of drawing each image as its mean over every class of the `unknown`
    factors: the least a decoder that knows all but those can reach (its best guess is that mean)."""
    classes = torch.cartesian_prod(*[torch.arange(bv.FACTOR_SIZES[k]) for k in unknown]).view(-1, len(unknown))
    drawn = torch.zeros_like(images)  # how many of the variants cover each pixel: a count, exact in float32
    for values in classes:
        varied = factors.clone()
        varied[:, unknown] = values
        drawn += bv.render_shapes(varied)
    # the image itself is one of the variants, so no pixel it covers has mean 0: no log(0) is taken
    return F.binary_cross_entropy(drawn / len(classes), images, reduction="sum").item() / len(images)


def train_half(half: str, images: int, seed: int, held: torch.Tensor, held_images: torch.Tensor,
               every: int = 25_600) -> list[dict]:
    """Train the default network's decoder or encoder alone (8-d, its lr and batch) for `images` images on
    the true factors, scoring the held factors and their images every `every` images; prints, returns the rows."""
    torch.manual_seed(seed)
    net = bv.Decoder(8, 1, bv.SPRITES["arch"]) if half == "decoder" else bv.Encoder(8, 1, bv.SPRITES["arch"])
    optimizer, batch = torch.optim.Adam(net.parameters(), lr=bv.SPRITES["lr"]), bv.SPRITES["batch_size"]
    shapes, draws, candidates = bv.Shapes(), torch.Generator().manual_seed(seed), measure.shape_candidates(held)
    rows, start = [], time.perf_counter()
    for step in range(1, images // batch + 1):
        factors = shapes.factors(torch.randint(len(shapes), (batch,), generator=draws))
        loss = half_loss(net, half, factors, bv.render_shapes(factors))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step * batch % every < batch or step == images // batch:
            rows.append({"images": step * batch, "seconds": time.perf_counter() - start,
                         **half_scores(net, half, held, held_images, candidates)})
            print(f"{half} alone | {rows[-1]['images']:>9,} images {rows[-1]['seconds']:>6.0f} s | "
                  + " | ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k not in ("images", "seconds")),
                  flush=True)
    return rows


def halves(args) -> None:
    """--halves: what a decoder that misses the orientation, or the shape too, reaches at best; then the
    decoder alone and the encoder alone, each on the true factors."""
    if args.halves < bv.SPRITES["batch_size"]:
        raise UserError(f"--halves must be at least one batch ({bv.SPRITES['batch_size']} images)")
    held = held_factors()
    held_images = bv.render_shapes(held)  # rendered once: the floors and both halves score these
    for unknown, what in [([2], "the orientation"), ([0, 2], "the shape and the orientation")]:
        floor = blur_floor(held, held_images, unknown)
        print(f"a decoder that knows all but {what} reaches at best recon {floor:.1f} (nats an image)")
    for half in ("decoder", "encoder"):
        train_half(half, args.halves, args.seeds[0], held, held_images)


# ====================================================================================================
# The turned position plane (--tc-angle): a run can hold x and y in two dims turned a few degrees off the
# axes. The closed-form KL does not change as that plane turns; the TC estimate is the one term that does.

def plane_turn(codes: torch.Tensor, xy: torch.Tensor) -> tuple[int, int, float]:
    """The two dims that hold x and y most (R^2 of a least-squares fit on both) and the angle in degrees,
    in [-45, 45), by which that plane is turned off the axes."""
    design = torch.cat([xy, torch.ones(len(xy), 1, dtype=xy.dtype)], dim=1)
    fit = torch.linalg.lstsq(design, codes).solution  # (3, D): each dim from x, y and a constant
    r2 = 1 - (codes - design @ fit).var(0) / codes.var(0)
    a, b = r2.topk(2).indices.tolist()
    u, _, vh = torch.linalg.svd(fit[:2][:, [a, b]])  # the nearest orthogonal map from (x, y) to the plane
    x_to = (u @ vh)[0]  # where a unit step of x points in the (a, b) plane
    return a, b, (math.degrees(math.atan2(x_to[1], x_to[0])) + 45) % 90 - 45


def turned(codes: torch.Tensor, a: int, b: int, degrees: float) -> torch.Tensor:
    """The codes with their (a, b) plane turned by `degrees` (counter-clockwise from a towards b)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    out = codes.clone()
    out[:, [a, b]] = codes[:, [a, b]] @ torch.tensor([[c, s], [-s, c]], dtype=codes.dtype)
    return out


def batch_tc(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor, batch: int) -> float:
    """The training's TC estimate (betavae.kl_decomposition) at this batch size, averaged over the batches."""
    z = mu + (0.5 * logvar).exp() * noise
    return float(np.mean([bv.kl_decomposition(z[i:i + batch], mu[i:i + batch], logvar[i:i + batch])["tc"].item()
                          for i in range(0, len(mu) - batch + 1, batch)]))


# (batch, posterior sds times) of the --tc-angle table: the training's batch, larger ones, wider posteriors
TC_ANGLE_ROWS = [(64, 1), (256, 1), (1024, 1), (4096, 1), (64, 4), (64, 16)]


def tc_angle(args) -> None:
    """--tc-angle: how far a checkpoint's x/y plane is turned, and the TC estimate as it turns from the axes,
    at several batch sizes and posterior widths (the plane's two sds are about equal: turning keeps them)."""
    smallest = min(batch for batch, _ in TC_ANGLE_ROWS)
    if args.n < smallest:
        raise UserError(f"--tc-angle needs --n of at least {smallest}: one batch of its table's smallest")
    model, cfg = bv.load_checkpoint(args.tc_angle)
    if cfg.dataset not in bv.DATASET_DEFAULTS or cfg.latent_dim < 2:  # the sprites' models, with a plane to find
        raise UserError(f"{args.tc_angle} is a {cfg.latent_dim}-d model of {cfg.dataset}: --tc-angle needs one of "
                        f"the sprites with at least 2 latent dims")
    shapes, draws = bv.Shapes(), torch.Generator().manual_seed(0)
    factors = shapes.factors(torch.randint(len(shapes), (args.n,), generator=draws))
    with torch.no_grad():
        encoded = [model.encode(bv.render_shapes(chunk)) for chunk in factors.split(512)]
    mu, logvar = (torch.cat(parts).double() for parts in zip(*encoded))
    a, b, turn = plane_turn(mu, true_code(factors)[:, 6:].double())
    sds = (0.5 * logvar[:, [a, b]]).exp().median(0).values.tolist()
    print(f"dims {a} and {b} hold x and y, turned {turn:.1f} degrees off the axes; posterior sds {sds[0]:.3f}, "
          f"{sds[1]:.3f} (median)")
    noise, offsets = torch.randn(mu.shape, generator=draws, dtype=torch.float64), (0, 1, 2, 5, 10, 20, 45)
    print("TC estimate (nats) with the plane turned from the axes by " + " / ".join(map(str, offsets))
          + " degrees | as trained")
    for batch, wider in TC_ANGLE_ROWS:
        if batch <= args.n:
            wide = logvar + 2 * math.log(wider)
            tcs = [batch_tc(turned(mu, a, b, offset - turn), wide, noise, batch) for offset in offsets]
            print(f"  batch {batch:>4}" + (f", sds x {wider}" if wider > 1 else "") + ": "
                  + " / ".join(f"{tc:.3f}" for tc in tcs) + f" | {batch_tc(mu, wide, noise, batch):.3f}")


def main(argv=None) -> None:
    p = Parser(prog="study.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--variants", type=lambda text: text.split(","), default=list(STUDY_VARIANTS), metavar="LIST",
                   help=f"comma-separated, from {','.join(STUDY_VARIANTS)} (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per variant (default: 0)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default: 20)")
    p.add_argument("--eval-epochs", type=int, default=2, help="score every this many epochs (default: 2)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="runs side by side, sharing the CPU cores (default: half the cores)")
    p.add_argument("--n", type=int, default=5000, help="factor draws for MIG and --tc-angle (default: 5000)")
    p.add_argument("--points", type=int, nargs=2, default=[200, 100], metavar=("TRAIN", "EVAL"),
                   help="FactorVAE training and evaluation points (default: 200 100)")
    p.add_argument("--common", default="", help='train flags added to every variant, e.g. "--epoch-size 10000"')
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(default: auto)")
    p.add_argument("--out", default="runs/study", help="study folder (default: runs/study)")
    p.add_argument("--collect", action="store_true",
                   help="train and score nothing: tabulate the stages already scored, as after a stopped study")
    p.add_argument("--halves", type=int, metavar="IMAGES",
                   help="instead: train the default's decoder, then its encoder, alone on the true factors for "
                        "IMAGES images each (first seed), printing how fast each learns the outlines")
    p.add_argument("--tc-angle", metavar="CHECKPOINT",
                   help="instead: how far the checkpoint's x/y plane is turned off the axes, and the TC estimate "
                        "as the plane turns (on --n grid points)")
    args = p.parse_args(argv)
    report_errors(halves if args.halves is not None else tc_angle if args.tc_angle else study, args)


if __name__ == "__main__":
    main()
