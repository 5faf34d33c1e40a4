"""Export a betavae checkpoint's decoder (and, with --encoder, its encoder) to ONNX, checked against PyTorch.

    python export.py --checkpoint runs/shapes-beta4/best.pt                # -> runs/shapes-beta4/decoder.onnx
    python export.py --checkpoint runs/shapes-beta4/best.pt --encoder      # also encoder.onnx
    python export.py --checkpoint runs/shapes-beta4/best.pt --bench        # onnxruntime vs PyTorch speed
    python export.py --checkpoint runs/shipped/best.pt --ship assets/model  # the shipped model (assets/remake.py)

decoder.onnx maps z (N, latent_dim) float32 to image (N, C, 64, 64) in [0, 1]; encoder.onnx maps image to
mu and logvar, with no random ops. Both carry betavae's metadata, so infer_onnx.py needs nothing else;
encoder.onnx also carries 16 validation images, where `infer_onnx.py explore` starts.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch

import betavae as bv
import metrics
from infer_onnx import Decoder, Parser, UserError, decoder_speed, open_model, png_bytes, report_errors, speed_table

PARITY_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| allowed on outputs in [0, 1] or codes


def export_module(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
                  output_names: list[str], opset: int) -> None:
    """Export with the torch.export-based exporter: the maintained path (the TorchScript tracer is
    deprecated since PyTorch 2.9), with the batch axis dynamic."""
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=output_names,
                                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    program.save(str(path))


def metadata(cfg: bv.Config, state: dict, ranking: list[tuple[int, float]], factors, role: str) -> dict[str, str]:
    """What infer_onnx.py needs to use a model without its checkpoint (ONNX metadata values are strings)."""
    labels = {} if factors is None else {"dim_factors": json.dumps(factors)}  # per dim [factor, normalised MI]
    return {**labels, "producer": "betavae", "betavae_version": bv.__version__, "role": role,
            "latent_dim": str(cfg.latent_dim), "channels": str(cfg.channels),
            "height": str(bv.IMAGE_SIZE), "width": str(bv.IMAGE_SIZE),
            "dims_by_kl": json.dumps([[d, round(kl, 6)] for d, kl in ranking]),
            "beta": str(cfg.beta), "dataset": cfg.dataset, "recon": cfg.recon,
            "epoch": str(state["run"]["epoch"])}


EXAMPLES = 16  # validation images stored in encoder.onnx, for infer_onnx.py explore's "next example"


def example_images(cfg: bv.Config) -> dict[str, str]:
    """{"examples": JSON list of base64 PNGs} of EXAMPLES validation images; nothing, with a note, when the
    checkpoint's dataset cannot be read here."""
    try:
        _, val_set = bv.make_datasets(cfg)
    except bv.UserError as e:
        print(f"note: no example images in encoder.onnx ({e})")
        return {}
    images = bv.preview_images(val_set, EXAMPLES).numpy()
    return {"examples": json.dumps([base64.b64encode(png_bytes(image)).decode() for image in images])}


def add_metadata(path: Path, props: dict[str, str]) -> None:
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@torch.no_grad()
def parity(path: Path, module: torch.nn.Module, make_input) -> float:
    """Max |onnxruntime - PyTorch| over every output, on random batches of 1 and 7."""
    session = open_model(path)
    worst = 0.0
    for n in (1, 7):
        x = make_input(n)
        expected = module(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        worst = max([worst] + [float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected)])
    return worst


def export(module, make_input, path: Path, *, input_name: str, output_names: list[str], props: dict[str, str],
           opset: int) -> None:
    """Export (traced on make_input(2)), attach metadata, check the graph and the numbers against PyTorch on
    make_input's batches of 1 and 7; a failed parity removes the file."""
    export_module(module, make_input(2), path, input_name, output_names, opset)
    add_metadata(path, props)
    error = parity(path, module, make_input)
    if error > PARITY_TOLERANCE:
        path.unlink()
        raise UserError(f"{path.name}: onnxruntime differs from PyTorch by {error:.2e} (> {PARITY_TOLERANCE:g}); "
                        f"not written", code=1)
    print(f"wrote {path}: {os.path.getsize(path) / 1e6:.1f} MB, opset {opset}, "
          f"{input_name} -> {', '.join(output_names)}, max |onnxruntime - PyTorch| = {error:.1e} (batches 1 and 7)")


def main(argv=None) -> None:
    parser = Parser(prog="export.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a betavae checkpoint, e.g. runs/NAME/best.pt")
    parser.add_argument("--out", help="decoder file (default: decoder.onnx beside the checkpoint; "
                        "runs/pretrained/ for the shipped model's)")
    parser.add_argument("--encoder", action="store_true", help="also write encoder.onnx beside the decoder")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--ship", metavar="DIR", help="write the model as shipped into DIR: model.pt (weights and config, "
                        "no optimiser), both ONNX files, the run's metrics.json and history.csv, and MODEL_CARD.md")
    parser.add_argument("--bench", action="store_true", help="then time onnxruntime against PyTorch eager")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per batch size for --bench (default: 50)")
    args = parser.parse_args(argv)
    report_errors(run, args)


def run(args) -> None:
    state = bv.read_checkpoint(args.checkpoint)
    model, cfg = bv.model_from_state(state, args.checkpoint)
    ranking = bv.kl_ranking(state, model, cfg, "cpu")
    factors = bv.factor_labels(state, model, cfg, "cpu")
    if args.ship:
        args.out, args.encoder = str(Path(args.ship) / "decoder.onnx"), True
        ship(state, cfg, Path(args.checkpoint), Path(args.ship))
    out = bv.output_path(args, Path(args.checkpoint).parent, "decoder.onnx")
    generator = torch.Generator().manual_seed(0)

    def codes(n):
        return torch.randn(n, cfg.latent_dim, generator=generator)

    def images(n):
        return torch.rand(n, cfg.channels, bv.IMAGE_SIZE, bv.IMAGE_SIZE, generator=generator)

    export(model.decoder, codes, out, input_name="z", output_names=["image"],
           props=metadata(cfg, state, ranking, factors, "decoder"), opset=args.opset)
    if args.encoder:
        export(model.encoder, images, out.parent / "encoder.onnx", input_name="image", output_names=["mu", "logvar"],
               props={**metadata(cfg, state, ranking, factors, "encoder"), **example_images(cfg)}, opset=args.opset)
    if args.ship:
        write_model_card(Path(args.ship), cfg)
    if args.bench:
        decoder = Decoder(out)
        with torch.no_grad():
            results = {"onnxruntime": decoder_speed(decoder, cfg.latent_dim, args.repeats),
                       "PyTorch eager": decoder_speed(lambda z: model.decode(torch.from_numpy(z)),
                                                      cfg.latent_dim, args.repeats)}
        print(f"decoder speed on the CPU ({torch.get_num_threads()} PyTorch threads), median of {args.repeats} calls:")
        print(speed_table(results))


# ----------------------------------------------------------------------------------------------------
# The shipped model: what assets/model/ holds, made by assets/remake.py

SHIPPED_STATE = ("format", "version", "config", "model", "kl_per_dim", "dim_factors")  # no optimiser, no random states


def ship(state: dict, cfg: bv.Config, checkpoint: Path, folder: Path) -> None:
    """model.pt (the checkpoint's weights, config and per-dim labels), and the run's metrics.json and history.csv."""
    missing = [name for name in ("metrics.json", "history.csv") if not (checkpoint.parent / name).is_file()]
    if missing:
        raise UserError(f"{checkpoint.parent} lacks {' and '.join(missing)}: run `betavae.py evaluate` on the "
                        f"checkpoint first")
    bv.make_output_folder(folder)
    slim = {key: state[key] for key in SHIPPED_STATE} | {"run": {key: state["run"][key] for key in ("epoch", "machines")
                                                                 if key in state["run"]}}
    bv.save_checkpoint(folder / "model.pt", slim)
    for name in ("metrics.json", "history.csv"):
        shutil.copyfile(checkpoint.parent / name, folder / name)
    print(f"wrote {folder / 'model.pt'}: {os.path.getsize(folder / 'model.pt') / 1e6:.1f} MB, epoch {state['run']['epoch']}")


def train_command(cfg: bv.Config) -> str:
    """The `train` command line that makes this config: --beta and the flags that differ from the defaults."""
    argv = ["train", "--dataset", cfg.dataset]
    args = bv.build_parser().parse_args(argv)
    args.given = bv.given_flags(argv)
    default, skip = bv.config_from_args(args), {"beta", "out", "channels", "device", "tensorboard", "eval_every"}
    flags = [f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float) else f"--{name.replace('_', '-')} {value}"
             for name, value in asdict(cfg).items() if name not in skip and value != getattr(default, name)]
    return " ".join(["python betavae.py train --beta", f"{cfg.beta:g}", *flags])


def kl_schedule(cfg: bv.Config) -> list[str]:
    """How the KL term entered the training, in words (empty: at full weight from the first step)."""
    parts = [f"no KL term for the first {cfg.kl_delay} epochs"] if cfg.kl_delay else []
    parts += [f"β rising from 0 over {cfg.kl_warmup} epochs"] if cfg.kl_warmup else []
    if cfg.capacity is not None:
        parts.append(f"capacity rising to {cfg.capacity:g} nats over {cfg.capacity_epochs} epochs (γ {cfg.gamma:g})")
    return parts


def write_model_card(folder: Path, cfg: bv.Config) -> None:
    """MODEL_CARD.md from the shipped files: data, command, images, seed, metrics, machine and time."""
    scores = json.loads((folder / "metrics.json").read_text())
    history = bv.read_history(folder / "history.csv")
    run = bv.read_checkpoint(folder / "model.pt")["run"]
    epoch, trained_on = run["epoch"], " then ".join(run.get("machines", ["a machine its checkpoint does not name"]))
    train_set, val_set = bv.make_datasets(cfg)
    epoch_images = cfg.epoch_size or len(train_set)
    show = lambda value: f"{value:.4f}" if isinstance(value, float) else str(value)
    rows = [f"| {name} | {show(scores[name])} |" for name in ("val_recon", "val_kl", "active_dims", *metrics.SCORE_NAMES)
            if name in scores]
    per_factor = [f"{label[0].upper()}{label[1:]}: {metrics.per_factor_text(scores[key])}\n"
                  for key, label in metrics.PER_FACTOR_SCORES.items() if key in scores]
    if "shape_accuracy_per_shape" in scores:  # which outlines the reconstructions keep
        per_factor.append(f"Shape accuracy per shape: {metrics.per_factor_text(scores['shape_accuracy_per_shape'])}\n")
    data = "the built-in shapes" if cfg.dataset == "shapes" else cfg.dataset
    objective = "total correlation" if cfg.objective == "tc" else "KL"
    network = bv.network_name(cfg)
    facts = {"data": f"{data}: {len(train_set):,} training and {len(val_set):,} validation images, "
                     f"{cfg.channels}x64x64",
             "command": f"`{train_command(cfg)}` (seed {cfg.seed})",
             "model": f"{network}, {cfg.latent_dim} latent dims, {cfg.recon} reconstruction, β {cfg.beta:g} "
                      f"on the {objective}" + "".join(f"; {part}" for part in kl_schedule(cfg)),
             "training": f"{len(history) * epoch_images:,} images ({len(history)} epochs of {epoch_images:,}, batch "
                         f"{cfg.batch_size}, lr {cfg.lr:g}); these weights are epoch {epoch}'s, the best validation "
                         f"objective",
             "time": f"{bv.format_duration(history[-1]['elapsed_s'])} of training on {trained_on}",
             "files": "`model.pt` (weights and config, loads with `torch.load(..., weights_only=True)`), "
                      "`decoder.onnx`, `encoder.onnx` (with betavae's metadata), `metrics.json`, `history.csv`",
             "licence": "none chosen yet: the repository has no licence file"}
    card = "\n".join([f"# The shipped model: a β-VAE of {data}", "",
                      f"betavae {bv.__version__}'s default run, remade with every README picture by "
                      f"`python assets/remake.py`.", "", "| | |", "| --- | --- |",
                      *(f"| {name} | {text} |" for name, text in facts.items()), "",
                      f"## `python betavae.py evaluate` (seed {scores['seed']}, --n {scores['n']}, --points "
                      f"{' '.join(map(str, scores['points']))})", "", "| metric | value |", "| --- | --- |", *rows, "",
                      *per_factor])
    (folder / "MODEL_CARD.md").write_text(card)
    print(f"wrote {folder / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
