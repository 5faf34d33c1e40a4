"""Throughput of betavae on this machine: is the data path fast enough, and how fast is each part of a step?

    python bench.py                          # the default model on the built-in shapes
    python bench.py --options                # also each option of the training step against the plain loop
    python bench.py --arch tutorial --latent-dim 128 --batch-size 32 --json bench.json

Images per second of the data loader alone, the full training step (data included), the model step on a
batch in memory, the plain loop (NCHW, float32, eager, Adam's default implementation), the step at float32, the
encoder and the decoder; the model step's GFLOP/s against this device's matmul peak in the step's precision
(the fp32 and bf16 peaks are both printed). Medians of --repeats rounds that
run every call once in turn, so the drift of a shared machine falls on all of them alike.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import betavae as bv
from infer_onnx import Parser, report_errors, time_calls

# the train flags that define what a step computes
FLAGS = ["dataset", "data_dir", "batch_size", "latent_dim", "arch", "width", "objective", "recon", "precision", "device"]
# --options: each option of the training step alone, then together, against the plain loop
STEP_OPTIONS = {"plain loop": {}, "channels_last": {"channels_last": True}, "fused Adam": {"fused": True},
                "bf16 autocast": {"bf16": True}, "torch.compile": {"compile": True},
                "channels_last, fused Adam, bf16": {"channels_last": True, "fused": True, "bf16": True},
                "all four": {"channels_last": True, "fused": True, "bf16": True, "compile": True}}


def synchronize(device) -> None:
    """Wait for the device's queued work (timings on a GPU must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call over `repeats` rounds that run every call once in turn, after three
    warm-up rounds."""
    times = {name: [] for name in calls}
    for round_ in range(3 + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def step_loop(cfg: bv.Config, device, x: torch.Tensor, steps: int, channels_last=False, fused=False, bf16=False,
              compile=False):
    """A function running `steps` training steps of a fresh model on the batch x with the given options;
    all off is the plain loop."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = bv.BetaVAE.of(cfg).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused or None)
    # fixed shapes: a batch of another size compiles once more instead of tracing symbolic sizes
    trained, x = torch.compile(model, dynamic=False) if compile else model, x.contiguous(memory_format=fmt)
    settings = bv.loss_settings(cfg, cfg.epochs)

    def run():
        for _ in range(steps):
            bv.train_step(trained, optimizer, x, settings, bf16)
        synchronize(device)
    return run


def training_flops(step) -> int:
    """FLOPs of one call of `step` (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_peak(device, dtype=torch.float32, n: int = 2048) -> float:
    """This device's achievable GFLOP/s in `dtype`: a large square matmul, median of 5 after warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def product():
        a @ b
        synchronize(device)
    return 2 * n ** 3 / time_calls(product, 5) / 1e9


def bench(args) -> None:
    """Time the data path, the training step as `train` runs it, the plain loop, the encoder and the decoder."""
    cfg = bv.config_from_args(args)
    device = bv.pick_device(cfg.device)
    train_set, _ = bv.make_datasets(cfg)
    loader, batches, data_path = bv.train_loader(train_set, cfg, device)
    fmt, steps, n_data = bv.memory_format(device), args.steps, len(train_set)
    x = torch.stack([train_set[i % n_data] for i in range(cfg.batch_size)]).to(device).contiguous(memory_format=fmt)
    order = torch.Generator().manual_seed(0)
    model = bv.BetaVAE.of(cfg).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    settings, bf16 = bv.loss_settings(cfg, cfg.epochs), bv.uses_bf16(cfg.precision, device)

    def step(batch):
        bv.train_step(model, optimizer, batch, settings, bf16)

    def data(step_fn=None):
        batches[:] = [torch.randint(n_data, (cfg.batch_size,), generator=order).tolist() for _ in range(steps)]
        for batch in loader:
            if step_fn:
                step_fn(batch.to(device, non_blocking=True).contiguous(memory_format=fmt))
        synchronize(device)

    def model_steps():
        for _ in range(steps):
            step(x)
        synchronize(device)

    seconds = time_in_turns({"data loader": data, "train step, data included": lambda: data(step),
                             "train step, data in memory": model_steps,
                             "plain loop, data in memory": step_loop(cfg, device, x, steps),
                             "fp32 step, data in memory": step_loop(cfg, device, x, steps, fmt == torch.channels_last,
                                                                    device.type in ("cpu", "cuda"))}, args.repeats)
    seconds.update(time_inference(model, x, cfg, device, steps, args.repeats))
    rates = {name: (256 if "256" in name else cfg.batch_size) * steps / s for name, s in seconds.items()}
    step_flops = training_flops(lambda: step(x))
    options = time_in_turns({name: step_loop(cfg, device, x, steps, **flags) for name, flags in STEP_OPTIONS.items()},
                            args.repeats) if args.options else {}
    achieved = step_flops * steps / seconds["train step, data in memory"] / 1e9
    report(args, cfg, device, bf16, data_path, rates, step_flops, achieved,
           {name: steps * cfg.batch_size / s for name, s in options.items()})


def time_inference(model, x, cfg: bv.Config, device, steps: int, repeats: int) -> dict[str, float]:
    """Seconds of `steps` encoder and decoder calls on batches of 256, in eval mode."""
    big, z = x.repeat(256 // cfg.batch_size + 1, 1, 1, 1)[:256], torch.randn(256, cfg.latent_dim, device=device)

    @torch.no_grad()
    def run(part):
        for _ in range(steps):
            model.encode(big) if part == "encoder" else model.decode(z)
        synchronize(device)

    model.eval()
    seconds = time_in_turns({"encoder (eval, batch 256)": lambda: run("encoder"),
                             "decoder (eval, batch 256)": lambda: run("decoder")}, repeats)
    model.train()
    return seconds


def report(args, cfg: bv.Config, device, bf16: bool, data_path: str, rates: dict[str, float], step_flops: int,
           achieved: float, option_rates: dict[str, float]) -> None:
    """The table: the rates, their ratios and the achieved GFLOP/s against the matmul peak of the precision the
    step runs, then each option's rate against the plain loop; with --json also a file."""
    native = bv.native_bf16(device)  # an emulated bf16 matmul runs at ~1 GFLOP/s: time a small one there
    peaks = {"fp32": matmul_peak(device), "bf16": matmul_peak(device, torch.bfloat16, 2048 if native else 512)}
    precision = "bf16" if bf16 else "fp32"
    print(f"betavae {bv.__version__} bench | {device} | {cfg.dataset}, {bv.network_name(cfg)}, batch {cfg.batch_size}, "
          f"{precision}, {data_path}, {torch.get_num_threads()} threads | median of {args.repeats} x {args.steps} steps")
    for name, rate in rates.items():
        print(f"{name:>28}  {rate:10,.0f} img/s")
    full, in_memory = rates["train step, data included"], rates["train step, data in memory"]
    print(f"{'loader / full step':>28}  {rates['data loader'] / full:10.1f} x")
    print(f"{'full step / model step':>28}  {full / in_memory:10.0%}")
    print(f"{'full step / plain loop':>28}  {full / rates['plain loop, data in memory']:10.2f} x")
    print(f"{'model step / fp32 step':>28}  {in_memory / rates['fp32 step, data in memory']:10.2f} x")
    print(f"{'matmul peak':>28}  fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s "
          f"({'native' if native else 'emulated'})")
    print(f"{'model step':>28}  {achieved:10.1f} GFLOP/s ({step_flops / cfg.batch_size / 1e9:.2f} GFLOP per image), "
          f"{achieved / peaks[precision]:.0%} of the {precision} peak")
    if option_rates:
        print("the training step's options, data in memory, against the plain loop of this run's model:")
    for name, rate in option_rates.items():
        print(f"{name:>34}  {rate:10,.0f} img/s  {rate / option_rates['plain loop']:5.2f} x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": str(device), "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
            "batch_size": cfg.batch_size, "precision": precision, "img_per_s": rates, "options_img_per_s": option_rates,
            "gflop_per_image": step_flops / cfg.batch_size / 1e9, "gflop_per_s": achieved,
            "matmul_peak_gflop_per_s": peaks, "bf16_native": native}, indent=2) + "\n")
        print(f"wrote {args.json}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="bench.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    bv.add_config_flags(parser, FLAGS)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed repetition (default: 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after warm-up (default: 5)")
    parser.add_argument("--options", action="store_true", help="also time each option of the training step "
                        "(channels_last, fused Adam, bf16 autocast, torch.compile), alone and together, against the "
                        "plain loop")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    args.given = bv.given_flags(argv)
    report_errors(bench, args)


if __name__ == "__main__":
    main()
