"""Generate images with an exported betavae decoder, using only numpy, Pillow and onnxruntime (no torch).

    python infer_onnx.py sample --model runs/shapes-beta4/decoder.onnx --n 64 --out samples.png
    python infer_onnx.py traverse --model runs/shapes-beta4/decoder.onnx --dims auto --out traverse.png
    python infer_onnx.py traverse --model decoder.onnx --encoder encoder.onnx --image x.png
    python infer_onnx.py interpolate --model decoder.onnx --encoder encoder.onnx --images a.png b.png
    python infer_onnx.py bench --model runs/shapes-beta4/decoder.onnx
    python infer_onnx.py explore --model decoder.onnx --encoder encoder.onnx   # sliders in the browser
    python infer_onnx.py explore        # no --model: the newest run's decoder.onnx, else the shipped model's

`export.py` writes decoder.onnx (z -> image) and encoder.onnx (image -> mu, logvar) with betavae's metadata
(latent size, image size, the latent dims ranked by KL). The picture helpers below are torch-free, so
betavae.py draws its figures with them too: both tools make the same pictures.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import statistics
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PADDING = 2  # pixels around every image of a grid, as torchvision's make_grid
LABEL_WIDTH, HEADER_HEIGHT = 168, 22  # the widest row label, "dim 127 · orientation 0.99", fits


class UserError(Exception):
    """A problem with the user's input or files: reported as one line with a non-zero exit."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def report_errors(func, args) -> None:
    """Run a subcommand; a UserError or an OSError becomes one line on stderr and a non-zero exit."""
    try:
        func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.code)
    except OSError as e:  # disk full, permissions, ...: the user's environment, not a bug
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------------
# Picture helpers (numpy and Pillow), shared with betavae.py.

def image_grid(images: np.ndarray, nrow: int) -> Image.Image:
    """(N, C, H, W) floats in [0, 1] -> an RGB grid with `nrow` images per row and white padding."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.ones((rows * (h + PADDING) + PADDING, nrow * (w + PADDING) + PADDING, 3), dtype=np.float32)
    for i, image in enumerate(np.clip(images, 0, 1)):
        y, x = PADDING + (i // nrow) * (h + PADDING), PADDING + (i % nrow) * (w + PADDING)
        grid[y:y + h, x:x + w] = image.transpose(1, 2, 0)  # (H, W, C); one channel broadcasts to RGB
    return Image.fromarray(np.round(grid * 255).astype(np.uint8))


def labelled(grid: Image.Image, cell: int, row_labels=(), column_labels=()) -> Image.Image:
    """The grid with a label column on the left (one or two lines per row) and a header of column labels;
    `cell` is the size of one grid cell (image plus padding)."""
    left = LABEL_WIDTH if row_labels else 0
    top = HEADER_HEIGHT if column_labels else 0
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    for i, label in enumerate(row_labels):
        lines = label.split("\n")
        for k, line in enumerate(lines):
            y = top + PADDING + i * cell + (cell - PADDING) // 2 + (k - (len(lines) - 1) / 2) * 16
            draw.text((6, y), line, fill="black", font=font, anchor="lm")
    for j, label in enumerate(column_labels):
        draw.text((left + PADDING + j * cell + (cell - PADDING) // 2, top // 2), label, fill="black",
                  font=font, anchor="mm")
    return canvas


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    figure = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        figure.paste(image, (0, y))
        y += image.height
    return figure


def save_figure(image: Image.Image, path: Path, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {what}: {path}")


def read_image(path, channels: int, size: int, name=None, quiet: bool = False) -> np.ndarray:
    """An image file (a path, or a file object called `name`) as a (1, C, size, size) float32 array in
    [0, 1]; other sizes and colour modes are centre-cropped, resized and converted, and the user is told
    (unless `quiet`: a training set of photos of every size)."""
    name = name or path
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as e:  # missing, unreadable, not an image, or a bomb
        raise UserError(f"cannot read {name} as an image ({e.__class__.__name__})")
    mode, changes = ("L" if channels == 1 else "RGB"), []
    if image.mode != mode:
        changes.append(f"converted {image.mode} to {mode}")
        image = image.convert(mode)
    if image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        changes.append(f"centre-cropped and resized {w}x{h} to {size}x{size}")
        image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        image = image.resize((size, size), Image.BILINEAR)
    if changes and not quiet:
        print(f"note: {name}: {', '.join(changes)}")
    array = np.asarray(image, dtype=np.float32) / 255
    return array.reshape(size, size, channels).transpose(2, 0, 1)[None]


def select_dims(ranking: list[tuple[int, float]], spec: str) -> list[tuple[int, float]]:
    """--dims: `auto` (the active dims, at most 10), `K` (the top K) or `3,17,40` (those), in KL order.
    A KL of None (a model without metadata) counts as active."""
    n = len(ranking)
    if spec == "auto":
        active = [pair for pair in ranking if pair[1] is None or pair[1] > 0.01][:10]
        if not active:
            print("note: no latent dim carries more than 0.01 nats; showing the top 10")
        return active or ranking[:10]
    try:
        dims = [int(d) for d in spec.split(",")]
    except ValueError:
        raise UserError(f"--dims {spec!r}: give auto, a count like 8, or indices like 3,17,40")
    if "," not in spec:
        if not 1 <= dims[0] <= n:
            raise UserError(f"--dims {spec}: the model has {n} latent dims, so give 1 to {n}")
        return ranking[:dims[0]]
    bad = [d for d in dims if not 0 <= d < n]
    if bad:
        raise UserError(f"--dims {spec}: {bad} out of range; the model's latent dims are 0 to {n - 1}")
    return [pair for pair in ranking if pair[0] in dims]


def prior_codes(n: int, latent_dim: int, seed: int) -> np.ndarray:
    """(n, latent_dim) draws of the prior N(0, I)."""
    return np.random.default_rng(seed).standard_normal((n, latent_dim))


def traversal_values(limit: float, steps: int) -> np.ndarray:
    if steps < 2 or limit <= 0:
        raise UserError("--steps must be >= 2 and --range > 0")
    return np.linspace(-limit, limit, steps, dtype=np.float32)


def traversal_codes(base: np.ndarray, dims: list[int], values: np.ndarray) -> np.ndarray:
    """(len(dims) * len(values), D) codes: row i sweeps dim dims[i] over `values`, the rest stay at base."""
    codes = np.tile(base.astype(np.float32), (len(dims), len(values), 1))  # (rows, columns, D)
    for row, d in enumerate(dims):
        codes[row, :, d] = values
    return codes.reshape(-1, base.shape[-1])


def traversal_labels(shown: list[tuple[int, float]], values: np.ndarray, factors=None) -> tuple[list[str], list[str]]:
    """Row labels (dim, the factor it carries with its normalised MI, and its KL, each when known) and
    column labels (the swept values). factors: per dim [name, score], or None."""
    names = [f"dim {d}" + (f" · {factors[d][0]} {factors[d][1]:.2f}" if factors else "") for d, _ in shown]
    rows = [name if kl is None else f"{name}\n{kl:.2f} nats" for name, (_, kl) in zip(names, shown)]
    return rows, [f"{round(float(v), 1) + 0.0:+.1f}" for v in values]  # + 0.0 turns -0.0 into 0.0


def interpolation_codes(a: np.ndarray, b: np.ndarray, steps: int, slerp: bool) -> np.ndarray:
    """(steps, D) codes from a (t=0) to b (t=1): linear, or spherical (constant angular speed)."""
    if steps < 2:
        raise UserError("--steps must be >= 2")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    t = np.linspace(0, 1, steps)[:, None]
    cosine = a64 @ b64 / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-12)
    omega = np.arccos(np.clip(cosine, -1, 1))
    if not slerp or omega < 1e-4:  # nearly parallel codes: slerp reduces to lerp
        codes = (1 - t) * a64 + t * b64
    else:
        codes = (np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)
    codes = codes.astype(np.float32)
    codes[0], codes[-1] = a, b  # exact ends, whatever the rounding
    return codes


def interpolation_figure(originals: np.ndarray, decoded: np.ndarray) -> Image.Image:
    """Rows of [A, z(t)..., B]: originals (2P, C, H, W) in pairs, decoded (P * steps, C, H, W)."""
    pairs, size = len(originals) // 2, originals.shape[-1]
    steps = len(decoded) // pairs
    rows = np.concatenate([originals[0::2, None], decoded.reshape(pairs, steps, *decoded.shape[1:]),
                           originals[1::2, None]], axis=1)
    columns = ["A"] + [f"t={t:.2f}" for t in np.linspace(0, 1, steps)] + ["B"]
    grid = image_grid(rows.reshape(-1, *decoded.shape[1:]), steps + 2)
    return labelled(grid, size + PADDING, column_labels=columns)


def traversal_gif(images: np.ndarray, dims: list[int], path: Path) -> None:
    """An animation sweeping every shown dim at once, there and back, from the traversal's images."""
    size = images.shape[-1]
    by_value = images.reshape(len(dims), -1, *images.shape[1:]).transpose(1, 0, 2, 3, 4)
    frames = [labelled(image_grid(f, len(dims)), size + PADDING, column_labels=[f"dim {d}" for d in dims])
              for f in by_value]
    frames += frames[-2:0:-1]  # back again, so the loop has no jump
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0)
    print(f"wrote animation: {path}")


# ----------------------------------------------------------------------------------------------------
# Running the exported models with onnxruntime.

def open_model(path, device: str = "cpu", threads: int = 0):
    """An onnxruntime session with full graph optimisation on the chosen device (no silent fallback)."""
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no model at {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
    if provider not in ort.get_available_providers():
        raise UserError(f"--device {device} needs onnxruntime-gpu (pip install onnxruntime-gpu); this "
                        f"onnxruntime offers {', '.join(ort.get_available_providers())}")
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as e:  # onnxruntime raises its own types for unreadable models
        raise UserError(f"{path} is not a usable ONNX model ({str(e).splitlines()[0][:120]})")
    if session.get_providers()[0] != provider:
        raise UserError(f"onnxruntime could not start {provider} for {path}")
    return session


class Decoder:
    """decoder.onnx with its betavae metadata: z (N, latent_dim) -> images (N, C, H, W) in [0, 1]."""

    def __init__(self, path, device="cpu", threads=0, latent_dim: int = 0):
        self.session = open_model(path, device, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.input = self.session.get_inputs()[0].name
        if "latent_dim" in meta:
            self.latent_dim = int(meta["latent_dim"])
            self.channels, self.size = int(meta["channels"]), int(meta["height"])
            self.ranking = [(int(d), float(kl)) for d, kl in json.loads(meta["dims_by_kl"])]
            self.factors = json.loads(meta.get("dim_factors", "null"))  # per dim [factor, normalised MI]
        elif latent_dim:
            self.latent_dim, self.channels, self.size = latent_dim, *self.output_shape()
            self.ranking = [(d, None) for d in range(latent_dim)]  # no KL known: index order
            self.factors = None
        else:
            raise UserError(f"{path} has no betavae metadata: pass --latent-dim")
        declared = self.session.get_inputs()[0].shape[-1]
        if isinstance(declared, int) and declared != self.latent_dim:
            raise UserError(f"{path} takes {declared}-dim codes, not {self.latent_dim}")

    def output_shape(self) -> tuple[int, int]:
        shape = self.session.get_outputs()[0].shape  # (N, C, H, W), N symbolic
        if not all(isinstance(s, int) for s in shape[1:]):
            raise UserError("the decoder's output shape is not fixed; export it with export.py")
        return shape[1], shape[2]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: z.astype(np.float32)})[0]


class Encoder:
    """encoder.onnx: images (N, C, H, W) -> posterior means mu (N, latent_dim); `examples`, the validation
    images export.py stored beside it, (N, C, H, W) (none for older exports)."""

    def __init__(self, path, decoder: Decoder, device="cpu", threads=0):
        self.session = open_model(path, device, threads)
        self.input = self.session.get_inputs()[0].name
        stored = json.loads(self.session.get_modelmeta().custom_metadata_map.get("examples", "[]"))
        self.examples = [read_image(io.BytesIO(base64.b64decode(png)), decoder.channels, decoder.size,
                                    name=f"example {i} of {path}")[0] for i, png in enumerate(stored)]
        shape = self.session.get_inputs()[0].shape[1:]
        expected = [decoder.channels, decoder.size, decoder.size]
        if shape != expected:
            raise UserError(f"{path} takes {'x'.join(map(str, shape))} images but the decoder makes "
                            f"{'x'.join(map(str, expected))}")
        latent = self.session.get_outputs()[0].shape[-1]
        if latent != decoder.latent_dim:
            raise UserError(f"{path} makes {latent}-dim codes but the decoder takes {decoder.latent_dim}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: images.astype(np.float32)})[0]


def load_models(args) -> tuple[Decoder, Encoder | None]:
    decoder = Decoder(args.model, args.device, args.threads, args.latent_dim)
    encoder = Encoder(args.encoder, decoder, args.device, args.threads) if getattr(args, "encoder", None) else None
    return decoder, encoder


# ----------------------------------------------------------------------------------------------------
# Subcommands

def sample(args) -> None:
    """Images decoded from z drawn from the prior N(0, I), scaled by the temperature."""
    if args.n < 1 or args.temperature <= 0:
        raise UserError("--n must be >= 1 and --temperature > 0")
    decoder, _ = load_models(args)
    z = prior_codes(args.n, decoder.latent_dim, args.seed) * args.temperature
    save_figure(image_grid(decoder(z), int(np.ceil(np.sqrt(args.n)))), Path(args.out), f"{args.n} samples")


def traverse(args) -> None:
    """Rows sweep one latent dim each (ranked by KL from the metadata) around 0 or the mu of --image."""
    decoder, encoder = load_models(args)
    values = traversal_values(args.range, args.steps)
    shown = select_dims(decoder.ranking, args.dims)
    if args.image and not encoder:
        raise UserError("--image needs --encoder encoder.onnx to find its code")
    base = encoder(read_image(args.image, decoder.channels, decoder.size))[0] if args.image else \
        np.zeros(decoder.latent_dim, np.float32)
    dims = [d for d, _ in shown]
    images = decoder(traversal_codes(base, dims, values))
    rows, columns = traversal_labels(shown, values, decoder.factors)
    grid = image_grid(images, args.steps)
    out = Path(args.out)
    save_figure(labelled(grid, decoder.size + PADDING, rows, columns), out, "traversal")
    if args.gif:
        traversal_gif(images, dims, out.with_suffix(".gif"))


def interpolate(args) -> None:
    """A row of decoded codes between the mu of two images, the originals at the ends."""
    decoder, encoder = load_models(args)
    x = np.concatenate([read_image(p, decoder.channels, decoder.size) for p in args.images])
    mu = encoder(x)
    decoded = decoder(interpolation_codes(mu[0], mu[1], args.steps, args.slerp))
    save_figure(interpolation_figure(x, decoded), Path(args.out), "interpolation")


def time_calls(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


BENCH_BATCHES = (1, 64, 256)


def decoder_speed(decode, latent_dim: int, repeats: int) -> dict[int, float]:
    """Median seconds per call of `decode` on random codes, for each batch size of BENCH_BATCHES."""
    rng = np.random.default_rng(0)
    return {n: time_calls(lambda z=rng.standard_normal((n, latent_dim)).astype(np.float32): decode(z), repeats)
            for n in BENCH_BATCHES}


def speed_table(results: dict[str, dict[int, float]]) -> str:
    """Latency at batch 1 and throughput at the larger batches, one column per engine."""
    names = list(results)
    lines = [f"{'':>22}" + "".join(f"{name:>18}" for name in names)]
    for n in BENCH_BATCHES:
        if n == 1:
            cells = [f"{results[name][n] * 1e3:.2f} ms" for name in names]
            label = "latency, batch 1"
        else:
            cells = [f"{n / results[name][n]:,.0f} img/s" for name in names]
            label = f"throughput, batch {n}"
        lines.append(f"{label:>22}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def bench(args) -> None:
    """Decoder latency at batch 1 and throughput at batches 64 and 256, and the explorer's work for one
    slider move: decode at batch 1 and write the PNG (medians of --repeats calls)."""
    decoder, _ = load_models(args)
    results = {f"onnxruntime {args.device}": decoder_speed(decoder, decoder.latent_dim, args.repeats)}
    print(f"{args.model}: latent {decoder.latent_dim}, {decoder.channels}x{decoder.size}x{decoder.size} images, "
          f"median of {args.repeats} calls")
    print(speed_table(results))
    z = np.zeros((1, decoder.latent_dim), np.float32)
    update = time_calls(lambda: png_bytes(decoder(z)[0]), args.repeats)
    print(f"{'explorer update':>22}{update * 1e3:>15.2f} ms  (decode at batch 1 + PNG, without HTTP)")


# ----------------------------------------------------------------------------------------------------
# explore: a local web page with one slider per active latent dim; the server decodes each position.
# The standard library's HTTP server and onnxruntime, nothing else. It serves its page and four
# endpoints, never a file from disk, and checks every request: a bad one gets its status and one line.

EXPLORER_PAGE = Path(__file__).with_name("explorer.html")  # the page: HTML, CSS and its script
Z_LIMIT = 10.0  # |z| the server decodes: the prior puts 1.5e-23 of each coordinate beyond; sliders span --range
MAX_UPLOAD = 4 * 2 ** 20  # bytes of an uploaded image (413 above)
MAX_JSON = 64 * 2 ** 10  # bytes of a decode request: 10,000 numbers fit


class BadRequest(Exception):
    """A request the explorer refuses: an HTTP status and one line for the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def png_bytes(image: np.ndarray) -> bytes:
    """One (C, H, W) image in [0, 1] as PNG bytes, rounded as image_grid rounds."""
    array = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[0] if len(array) == 1 else array.transpose(1, 2, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def parse_code(body: bytes, latent_dim: int) -> np.ndarray:
    """A decode request's JSON {"z": [latent_dim finite numbers within +-Z_LIMIT]} as (1, latent_dim)."""
    try:
        z = json.loads(body)["z"]
    except (ValueError, TypeError, KeyError):
        raise BadRequest('send JSON {"z": [numbers]}')
    if not isinstance(z, list) or len(z) != latent_dim:
        raise BadRequest(f"z must hold exactly {latent_dim} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in z):
        raise BadRequest("z must hold finite numbers only")
    if max(abs(v) for v in z) > Z_LIMIT:
        raise BadRequest(f"z must lie within -{Z_LIMIT:g} to {Z_LIMIT:g}")
    return np.array([z], dtype=np.float32)


class Explorer:
    """What the explorer's server does, without HTTP: the page's facts, decoding, encoding."""

    def __init__(self, decoder: Decoder, encoder: Encoder | None, limit: float):
        self.decoder, self.encoder = decoder, encoder
        shown = [pair for pair in decoder.ranking if pair[1] is None or pair[1] > 0.01] or decoder.ranking
        labels, _ = traversal_labels(shown, np.zeros(0), decoder.factors)  # as the traversal labels its rows
        self.info = {"latent_dim": decoder.latent_dim, "range": limit, "z_limit": Z_LIMIT,
                     "size": decoder.size, "channels": decoder.channels, "encoder": encoder is not None,
                     "examples": len(encoder.examples) if encoder else 0, "max_upload": MAX_UPLOAD,
                     "sliders": [{"dim": d, "label": label.split("\n")} for (d, _), label in zip(shown, labels)]}

    def decode(self, body: bytes) -> bytes:
        """POST /decode: the PNG of the decoded code."""
        return png_bytes(self.decoder(parse_code(body, self.decoder.latent_dim))[0])

    def encode(self, body: bytes) -> dict:
        """POST /encode: an uploaded image's code mu, and the image as the model sees it."""
        if not body:
            raise BadRequest("send the image file as the request body")
        try:
            x = read_image(io.BytesIO(body), self.decoder.channels, self.decoder.size, name="the upload")
        except UserError as e:
            raise BadRequest(str(e))
        return self.code_of(x[0])

    def example(self, query: str) -> dict:
        """GET /example?i=N: the code mu of stored example N, and the example."""
        examples = self.encoder.examples if self.encoder else []
        try:
            i = int(parse_qs(query)["i"][0])
        except (KeyError, ValueError):
            raise BadRequest("ask for /example?i=N")
        if not 0 <= i < len(examples):
            raise BadRequest(f"this model has {len(examples)} examples: i must be 0 to {len(examples) - 1}")
        return self.code_of(examples[i])

    def code_of(self, image: np.ndarray) -> dict:
        if self.encoder is None:
            raise BadRequest("this explorer has no encoder: start it with --encoder encoder.onnx")
        z = np.clip(self.encoder(image[None])[0], -Z_LIMIT, Z_LIMIT)
        return {"z": [float(v) for v in z], "image": data_url(image)}


def explorer_handler(explorer: Explorer, page: bytes, log: bool):
    """The request handler class of one explorer: its page, /info, /example, /decode and /encode."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlsplit(self.path)
            routes = {"/": lambda: (page, "text/html; charset=utf-8"),
                      "/info": lambda: (json.dumps(explorer.info).encode(), "application/json"),
                      "/example": lambda: (json.dumps(explorer.example(url.query)).encode(), "application/json")}
            self.answer(routes.get(url.path))

        def do_POST(self):
            routes = {"/decode": lambda: (explorer.decode(self.body(MAX_JSON)), "image/png"),
                      "/encode": lambda: (json.dumps(explorer.encode(self.body(MAX_UPLOAD))).encode(),
                                          "application/json")}
            self.answer(routes.get(urlsplit(self.path).path))

        def body(self, limit: int) -> bytes:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest("the request needs a Content-Length", 411)
            if not 0 <= length <= limit:
                raise BadRequest(f"the request body is over {limit:,} bytes", 413)
            return self.rfile.read(length)

        def answer(self, route) -> None:
            start = time.perf_counter()
            try:
                if route is None:
                    raise BadRequest(f"no such page: {urlsplit(self.path).path[:80]}", 404)
                content, kind, status = *route(), 200
            except BadRequest as e:
                content, kind, status = (str(e) + "\n").encode(), "text/plain; charset=utf-8", e.status
                self.close_connection = True  # an unread body must not be taken for the next request
            except Exception as e:  # a failure of ours: the page gets one line and the server keeps serving
                content, kind, status = f"internal error: {e}\n".encode(), "text/plain; charset=utf-8", 500
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(content)
            if log or status != 200:
                print(f"{self.command} {urlsplit(self.path).path[:80]} {status} "
                      f"{(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)

        def log_message(self, *args):  # the lines above replace http.server's own log
            pass

    return Handler


def explore(args) -> None:
    """Serve a page with one slider per active latent dim, decoding every move with the ONNX decoder."""
    if args.range <= 0 or args.range > Z_LIMIT:
        raise UserError(f"--range must be > 0 and <= {Z_LIMIT:g}")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be 0 to 65535 (0 picks a free one)")
    decoder, encoder = load_models(args)
    explorer = Explorer(decoder, encoder, args.range)
    try:
        server = ThreadingHTTPServer((args.host, args.port), explorer_handler(explorer, EXPLORER_PAGE.read_bytes(), args.log))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
    server.daemon_threads = True  # Ctrl-C does not wait for open connections
    host, port = server.server_address[:2]
    reach = "this machine only; --host 0.0.0.0 shares it with your network" if args.host in ("127.0.0.1", "localhost") \
        else "reachable from other machines: anyone who can reach this port can use it"
    print(f"explorer: {len(explorer.info['sliders'])} sliders of {decoder.latent_dim} latent dims"
          f"{', with an encoder' if encoder else ''} | serving http://{host}:{port}/ ({reach}) | Ctrl-C stops it",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("explorer stopped")
    finally:
        server.server_close()




# ----------------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the full usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="infer_onnx.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    common = Parser(add_help=False)
    common.add_argument("--model", help="decoder.onnx written by export.py (default: the newest runs/*/decoder.onnx, "
                        "else the shipped model's, assets/model/decoder.onnx)")
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda needs onnxruntime-gpu (default: cpu)")
    common.add_argument("--threads", type=int, default=0, help="intra-op threads (default: 0, onnxruntime's choice)")
    common.add_argument("--latent-dim", type=int, default=0, help="latent size, for a model without betavae metadata")

    p = commands.add_parser("sample", parents=[common], help="decode samples of the prior", description=sample.__doc__)
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="scales the prior's std (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of z (default: 0)")
    p.add_argument("--out", default="samples.png", help="PNG to write (default: samples.png)")
    p.set_defaults(func=sample)

    p = commands.add_parser("traverse", parents=[common], help="latent traversal grid", description=traverse.__doc__)
    p.add_argument("--dims", default="auto", help="auto (active dims, at most 10), a count K, or 3,17,40 (default: auto)")
    p.add_argument("--range", type=float, default=3.0, help="sweep each dim from -range to +range (default: 3)")
    p.add_argument("--steps", type=int, default=11, help="values per dim (default: 11)")
    p.add_argument("--image", help="base code: mu of this image (needs --encoder); default: the prior mean 0")
    p.add_argument("--encoder", help="encoder.onnx written by export.py --encoder")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF sweeping every shown dim")
    p.add_argument("--out", default="traverse.png", help="PNG to write (default: traverse.png)")
    p.set_defaults(func=traverse)

    p = commands.add_parser("interpolate", parents=[common], help="interpolate between two images",
                            description=interpolate.__doc__)
    p.add_argument("--encoder", required=True, help="encoder.onnx written by export.py --encoder")
    p.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="two image files")
    p.add_argument("--steps", type=int, default=10, help="decoded points (default: 10)")
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--out", default="interpolate.png", help="PNG to write (default: interpolate.png)")
    p.set_defaults(func=interpolate)

    p = commands.add_parser("explore", parents=[common], help="a local web page: drag the latent dims, see the image",
                            description=explore.__doc__)
    p.add_argument("--encoder", help="encoder.onnx written by export.py --encoder: start from an example or an upload")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--range", type=float, default=3.0, help="each slider spans -range to +range (default: 3)")
    p.add_argument("--log", action="store_true", help="print every request with its time")
    p.set_defaults(func=explore)

    p = commands.add_parser("bench", parents=[common], help="decoder latency and throughput", description=bench.__doc__)
    p.add_argument("--repeats", type=int, default=50, help="timed calls per batch size (default: 50)")
    p.set_defaults(func=bench)
    return parser


SHIPPED = Path(__file__).resolve().parent / "assets" / "model"  # the shipped model (export.py --ship)


def default_model(args) -> None:
    """Without --model: the newest run's decoder.onnx, else the shipped model's, with the encoder beside it where
    the command takes one and none is given; one line says which."""
    if args.model:
        return
    found = sorted(Path("runs").glob("*/decoder.onnx"), key=lambda p: p.stat().st_mtime)
    if not found and not (SHIPPED / "decoder.onnx").is_file():
        raise UserError("no decoder.onnx in runs/*/: export one with export.py, or pass --model")
    path, which = (found[-1], "the newest export in runs/") if found else (SHIPPED / "decoder.onnx", "the shipped model (none in runs/)")
    args.model, encoder = str(path), path.with_name("encoder.onnx")
    takes_encoder = "encoder" in vars(args) and args.encoder is None and encoder.is_file()
    if takes_encoder:
        args.encoder = str(encoder)
    print(f"using {os.path.relpath(path)}, {which}{' (and its encoder)' if takes_encoder else ''}; --model picks another")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    report_errors(run, args)


def run(args) -> None:
    default_model(args)
    args.func(args)


if __name__ == "__main__":
    main()
