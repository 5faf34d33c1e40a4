"""Remake the shipped model (assets/model/) and every picture the README and docs/ show of the default run,
from scratch, with the README's own commands:

    python assets/remake.py          # about 100 minutes on a 2-core CPU; run it again to resume after a stop

1. `python betavae.py train --beta 4` into runs/shipped (resumed where it stopped),
2. `python betavae.py evaluate` of its best.pt at the defaults (disentanglement_lib's sample),
3. `python export.py --ship assets/model`: model.pt (weights and config), decoder.onnx, encoder.onnx,
   metrics.json, history.csv and MODEL_CARD.md,
4. the pictures: traverse (and its GIF), interpolate, sample, reconstruct, plot, the last epoch's
   reconstructions, and a screenshot of `infer_onnx.py explore` where Chromium and Playwright are installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this script sits in assets/, beside the pictures it remakes
import betavae as bv  # noqa: E402
import export  # noqa: E402


def pictures(checkpoint: Path, run: Path, assets: Path) -> list[list[str]]:
    """The picture commands, each writing into assets/ what the README shows."""
    model = ["--checkpoint", str(checkpoint)]
    return [["traverse", *model, "--gif", "--out", str(assets / "traverse.png")],
            ["interpolate", *model, "--out", str(assets / "interpolate.png")],
            ["sample", *model, "--out", str(assets / "sample.png")],
            ["reconstruct", *model, "--out", str(assets / "reconstruct.png")],
            ["plot", "--run", str(run), "--out", str(assets / "plot.png")]]


def remake(run: Path, assets: Path, train_flags=(), evaluate_flags=()) -> None:
    """Train (or resume) the default run into `run`, evaluate it, ship it into assets/model, draw the pictures.
    The flags are for the tests' tiny version."""
    resume = ["--resume"] if (run / "last.pt").exists() else []
    bv.main(["train", "--beta", "4", "--out", str(run), *resume, *train_flags])
    bv.main(["evaluate", "--checkpoint", str(run / "best.pt"), *evaluate_flags])
    export.main(["--checkpoint", str(run / "best.pt"), "--ship", str(assets / "model")])
    for command in pictures(assets / "model" / "model.pt", run, assets):
        bv.main(command)
    last = max((run / "images").glob("recon_e*.png"))
    shutil.copyfile(last, assets / "reconstructions.png")
    print(f"wrote {assets / 'reconstructions.png'} (the last epoch's, {last.name})")
    screenshot(assets / "model", assets / "explorer.png")


def screenshot(model: Path, out: Path) -> None:
    """The explorer on the shipped model, in Debian's Chromium through Playwright (as the tests drive it)."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not chromium or not sync_playwright:
        print(f"note: {out} not remade: it needs chromium (apt-get install -y chromium) and playwright")
        return
    server = subprocess.Popen([sys.executable, str(ROOT / "infer_onnx.py"), "explore", "--model",
                               str(model / "decoder.onnx"), "--encoder", str(model / "encoder.onnx"), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = next(line.split("serving ")[1].split()[0] for line in server.stdout if "serving http" in line)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 400})
            page.goto(url)  # then wait until it shows the first example's decoded image
            page.wait_for_function("() => window.explorer.shownZ !== null && !window.explorer.inFlight")
            page.screenshot(path=str(out), full_page=True)
            browser.close()
        print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    os.chdir(ROOT)
    remake(Path("runs/shipped"), Path("assets"))
