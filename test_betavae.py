"""Tests for betavae: the math against independent oracles, the renderer's factors, and the CLI end to end.

    pytest test_betavae.py
"""
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# OpenMP busy-waiting makes 2-thread torch several times slower on a shared machine; set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributions import Normal, kl_divergence  # noqa: E402

import betavae as bv  # noqa: E402
import bench  # noqa: E402
import export  # noqa: E402
import measure  # noqa: E402
import infer_onnx as onnx_tool  # noqa: E402
import metrics  # noqa: E402
import real_datasets  # noqa: E402
import study  # noqa: E402

HERE = Path(__file__).resolve().parent
# a model small enough to train for a few steps in a test: 3 steps of 16 images per epoch
# --kl-delay 0: the shapes' default delay (16 epochs) would make every few-epoch run a plain autoencoder
TINY = ["--epoch-size", "48", "--batch-size", "16", "--val-size", "16", "--latent-dim", "4", "--kl-delay", "0"]


def run_cli(*args, cwd=None):
    """Run betavae.py in a subprocess, as a user would."""
    return subprocess.run([sys.executable, str(HERE / "betavae.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def train_in_process(out, *args):
    """Run `betavae.py train` on the CPU in this process (so tests can patch it); returns the exit code."""
    try:
        bv.main(["train", *TINY, "--device", "cpu", "--out", str(out), *map(str, args)])
    except SystemExit as e:
        return e.code
    return 0


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def read_rows(path, *columns):
    """The given columns of every row of a CSV file, as strings."""
    with open(path, newline="") as f:
        return [tuple(row[c] for c in columns) for row in csv.DictReader(f)]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# set once per process by pytest, scikit-learn's OpenMP set-up and torch's compiler on first use, not by a test
OWN_ENV = {"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TORCHINDUCTOR_CACHE_DIR",
           "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}


def global_state() -> dict:
    """What one test could leave changed for the next: torch's threads, default dtype and compiler config,
    the environment, the Ctrl-C and SIGTERM handlers, the working directory."""
    state = {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(),
             "env": {k: v for k, v in os.environ.items() if k not in OWN_ENV}, "sigint": signal.getsignal(signal.SIGINT),
             "sigterm": signal.getsignal(signal.SIGTERM), "cwd": os.getcwd()}
    if "torch._inductor.config" in sys.modules:  # loaded by the first compile; its config is process-wide
        state["inductor"] = sys.modules["torch._inductor.config"].get_config_copy()
    return state


@pytest.fixture(autouse=True)
def leaves_global_state_as_found():
    """Every test must leave the process as it found it: a leak turns a later test red, but only in a suite."""
    before = global_state()
    yield
    after = global_state()
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"the test left global state changed: {changed}"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny training run through the CLI, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("train", *TINY, "--epochs", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


# ---------------------------------------------------------------------------------------------------
# Loss: hand computations and oracles

def sigmoid(v):
    return 1 / (1 + math.exp(-v))


LOGITS = torch.tensor([[[[0.3, -1.2]]], [[[2.0, 0.1]]]])  # (B=2, C=1, H=1, W=2)
X = torch.tensor([[[[1.0, 0.0]]], [[[0.25, 1.0]]]])
MU = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
LOGVAR = torch.tensor([[0.0, -0.5], [1.0, 0.2]])


def hand_kl_dims():
    """Batch-mean KL of each latent dim, from the formula, in plain Python."""
    return [sum(-0.5 * (1 + LOGVAR[b, d].item() - MU[b, d].item() ** 2 - math.exp(LOGVAR[b, d].item()))
                for b in range(2)) / 2 for d in range(2)]


def hand_recon(kind):
    total = 0.0
    for b in range(2):
        for w in range(2):
            p, x = sigmoid(LOGITS[b, 0, 0, w].item()), X[b, 0, 0, w].item()
            total += (p - x) ** 2 if kind == "mse" else -(x * math.log(p) + (1 - x) * math.log(1 - p))
    return total / 2  # summed over pixels, mean over the batch of 2


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_loss_equals_hand_computation(kind):
    parts = bv.loss_terms(LOGITS, X, MU, LOGVAR, recon=kind, beta=4.0)
    kl = sum(hand_kl_dims())
    assert parts["recon"].item() == pytest.approx(hand_recon(kind), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["kl_per_dim"].tolist() == pytest.approx(hand_kl_dims(), rel=1e-5)
    assert parts["total"].item() == pytest.approx(hand_recon(kind) + 4.0 * kl, rel=1e-5)


def test_free_bits_clamp_each_dim_in_the_objective_only():
    dims = hand_kl_dims()
    free = (min(dims) + max(dims)) / 2  # clamps the smaller dim, leaves the larger one
    parts = bv.loss_terms(LOGITS, X, MU, LOGVAR, beta=2.0, free_bits=free)
    assert parts["kl"].item() == pytest.approx(sum(dims), rel=1e-5)
    assert parts["total"].item() == pytest.approx(hand_recon("mse") + 2.0 * (max(dims) + free), rel=1e-5)


def test_capacity_objective():
    parts = bv.loss_terms(LOGITS, X, MU, LOGVAR, capacity=0.5, gamma=100.0)
    assert parts["total"].item() == pytest.approx(hand_recon("mse") + 100.0 * abs(sum(hand_kl_dims()) - 0.5),
                                                  rel=1e-5)


def test_warmup_and_capacity_schedules():
    warm = bv.Config(beta=4.0, kl_warmup=4)
    assert [bv.schedule(warm, e)[0] for e in range(1, 7)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert [bv.schedule_done(warm, e) for e in (3, 4)] == [False, True]
    cap = bv.Config(capacity=20.0, capacity_epochs=4)
    assert [bv.schedule(cap, e)[1] for e in (1, 2, 4, 9)] == [5.0, 10.0, 20.0, 20.0]
    assert bv.schedule(bv.Config(beta=3.0), 1) == (3.0, None)
    # --kl-delay: beta 0 for its epochs (an autoencoder), then the warm-up's rise, or the full beta at once
    delayed = bv.Config(beta=4.0, kl_delay=2, kl_warmup=2)
    assert [bv.schedule(delayed, e)[0] for e in range(1, 6)] == [0.0, 0.0, 2.0, 4.0, 4.0]
    assert [bv.schedule_done(delayed, e) for e in (3, 4)] == [False, True]
    assert [bv.schedule(bv.Config(beta=4.0, kl_delay=1), e)[0] for e in (1, 2)] == [0.0, 4.0]
    assert [bv.schedule_done(bv.Config(beta=4.0, kl_delay=2), e) for e in (2, 3)] == [False, True]
    assert bv.schedule_done(bv.Config(beta=0.0, kl_delay=2), 1)  # a plain autoencoder's objective never changes
    assert [bv.schedule_done(cap, e) for e in (3, 4)] == [False, True]


def test_kl_delay_trains_an_autoencoder_first_and_halves_the_lr_on_final_objectives_only(tmp_path, capsys):
    assert train_in_process(tmp_path / "run", "--kl-delay", "1", "--epochs", "3") == 0
    assert "w 0 for 1 epochs, then 1" in capsys.readouterr().out
    rows = [tuple(map(float, r)) for r in read_rows(tmp_path / "run/history.csv", "beta_eff", "train_recon",
                                                    "train_total")]
    assert [r[0] for r in rows] == [0.0, 4.0, 4.0] and rows[0][1] == pytest.approx(rows[0][2])  # total = recon
    assert rows[1][2] > rows[1][1]  # then the KL term counts
    # ReduceLROnPlateau saw the final objective only: epochs 2 and 3 (the autoencoder's lower one is no bar to
    # beat), and best.pt is one of them
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["scheduler"]["last_epoch"] == 2
    assert torch.load(tmp_path / "run/best.pt", weights_only=True)["run"]["epoch"] >= 2


def test_closed_form_kl_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    closed = bv.kl_per_dim(mu, logvar)
    torch.testing.assert_close(closed, kl_divergence(q, p))
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(closed, monte_carlo, atol=0.03, rtol=0.02)


def test_prior_codes_follow_the_prior():
    codes = onnx_tool.prior_codes(100_000, 2, seed=0)
    kurtosis = (codes ** 4).mean(0) / (codes ** 2).mean(0) ** 2
    assert codes.mean(0) == pytest.approx([0, 0], abs=0.015) and codes.var(0) == pytest.approx([1, 1], abs=0.015)
    assert kurtosis == pytest.approx([3.0, 3.0], abs=0.05)  # the normal's
    assert np.array_equal(onnx_tool.prior_codes(5, 2, seed=1), onnx_tool.prior_codes(5, 2, seed=1))


# The KL's parts (Chen et al. 2018): index-code MI, total correlation, dimension-wise KL

def brute_force_decomposition(z, mu, logvar, weight):
    """MI, TC and dimension-wise KL with every log density written out in plain Python, over all pairs."""
    def log_normal(v, m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (v - m) ** 2 / math.exp(lv))
    b, d = z.shape
    mi = tc = dwkl = 0.0
    for i in range(b):
        log_q_zx = sum(log_normal(z[i, k], mu[i, k], logvar[i, k]) for k in range(d))
        log_qz = math.log(sum(weight(i, j) * math.exp(sum(log_normal(z[i, k], mu[j, k], logvar[j, k])
                                                          for k in range(d))) for j in range(b)))
        log_marginals = sum(math.log(sum(weight(i, j) * math.exp(log_normal(z[i, k], mu[j, k], logvar[j, k]))
                                         for j in range(b))) for k in range(d))
        log_pz = sum(log_normal(z[i, k], 0.0, 0.0) for k in range(d))
        mi, tc, dwkl = mi + log_q_zx - log_qz, tc + log_qz - log_marginals, dwkl + log_marginals - log_pz
    return mi / b, tc / b, dwkl / b


def test_kl_decomposition_matches_a_brute_force_computation():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    z = mu + torch.randn(5, 3, generator=g, dtype=torch.float64) * (0.5 * logvar).exp()
    parts = bv.kl_decomposition(z, mu, logvar)
    expected = brute_force_decomposition(z.numpy(), mu.numpy(), logvar.numpy(), lambda i, j: 1 / 5)  # 1/B each
    assert [parts[k].item() for k in ("mi", "tc", "dwkl")] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_kl_parts_add_up_to_the_monte_carlo_kl():
    g = torch.Generator().manual_seed(4)
    mu, logvar = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(64, 6, generator=g, dtype=torch.float64)
    q = Normal(mu, (0.5 * logvar).exp())
    z = q.sample()
    monte_carlo = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(1).mean()
    parts = bv.kl_decomposition(z, mu, logvar)
    assert (parts["mi"] + parts["tc"] + parts["dwkl"]).item() == pytest.approx(monte_carlo.item(), abs=1e-10)


def sampled_codes(correlation: float, n: int = 4000, sigma: float = 0.5):
    """Posterior means mu ~ N(0, [[1, c], [c, 1]]), each posterior N(mu, sigma^2 I), one z from each: the
    aggregate posterior is N(0, [[1 + s^2, c], [c, 1 + s^2]]), whose TC is -1/2 log(1 - r^2),
    r = c / (1 + s^2). Returns (z, mu, logvar, analytic TC)."""
    g = torch.Generator().manual_seed(5)
    cov = torch.tensor([[1.0, correlation], [correlation, 1.0]], dtype=torch.float64)
    mu = torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    logvar = torch.full_like(mu, 2 * math.log(sigma))
    z = mu + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)
    r = correlation / (1 + sigma ** 2)
    return z, mu, logvar, -0.5 * math.log(1 - r ** 2)


@pytest.mark.parametrize("correlation", [0.0, 0.9])
def test_total_correlation_estimate_matches_the_gaussian_value(correlation):
    """A batch of 4,000 that is the whole data set (N = B): the estimate's bias is below 0.03 nats here."""
    z, mu, logvar, analytic = sampled_codes(correlation)
    tc = bv.kl_decomposition(z, mu, logvar)["tc"].item()
    assert tc == pytest.approx(analytic, abs=0.03)
    assert analytic == 0 or analytic > 0.3  # the correlated case is far from 0: the test tells them apart


def test_tc_objective_weights_only_the_total_correlation():
    g = torch.Generator().manual_seed(6)
    mu, logvar = torch.randn(2, 2, generator=g), torch.randn(2, 2, generator=g)
    z = mu + torch.randn(2, 2, generator=g) * (0.5 * logvar).exp()
    plain = bv.loss_terms(LOGITS, X, MU, LOGVAR, z, beta=1.0)
    tc1 = bv.loss_terms(LOGITS, X, MU, LOGVAR, z, beta=1.0, objective="tc")
    tc4 = bv.loss_terms(LOGITS, X, MU, LOGVAR, z, beta=4.0, objective="tc")
    assert tc1["total"].item() == pytest.approx(plain["total"].item(), rel=1e-6)  # beta 1: a plain VAE either way
    kl, tc = sum(hand_kl_dims()), tc4["tc"].item()
    # recon + MI + 4 TC + dimension-wise KL, with the closed-form KL for MI + TC + dimension-wise KL
    assert tc4["total"].item() == pytest.approx(hand_recon("mse") + kl + 3 * tc, rel=1e-5)
    assert tc4["recon"].item() == pytest.approx(hand_recon("mse"), rel=1e-5)
    # a warm-up weights the whole KL term, not the TC's share alone: a third of the way, a third of it
    tc4_warm = bv.loss_terms(LOGITS, X, MU, LOGVAR, z, beta=4.0, objective="tc", warm=1 / 3)
    assert tc4_warm["total"].item() == pytest.approx(hand_recon("mse") + (kl + 3 * tc) / 3, rel=1e-5)
    cfg = bv.Config(objective="tc", beta=4.0, kl_warmup=3)
    assert bv.loss_settings(cfg, 1) | {"warm": 0} == bv.loss_settings(cfg, 3) | {"warm": 0}  # the TC keeps its beta,
    assert bv.loss_settings(cfg, 1)["warm"] == pytest.approx(1 / 3)  # ... w ramps
    assert bv.loss_settings(bv.Config(beta=4.0, kl_warmup=3), 1)["beta"] == 4 / 3  # kl: beta_eff
    assert "w*(KL + (beta-1)*TC)" in bv.describe_loss(cfg) and "over 3 epochs" in bv.describe_loss(cfg)
    # a delay weighs the whole KL term 0: the objective is the reconstruction alone
    delayed = bv.Config(objective="tc", beta=4.0, kl_delay=2)
    assert bv.loss_settings(delayed, 2)["warm"] == 0
    assert "w 0 for 2 epochs, then 1" in bv.describe_loss(delayed)
    # with a capacity the whole KL is held at C and the TC weighs beta - 1 more: recon + 100 |KL - C| + 3 TC
    held = bv.loss_terms(LOGITS, X, MU, LOGVAR, z, beta=4.0, objective="tc", capacity=0.5, gamma=100.0)
    assert held["total"].item() == pytest.approx(hand_recon("mse") + 100 * abs(kl - 0.5) + 3 * tc, rel=1e-5)
    # free bits clamp the KL's dims and leave the TC's weight: recon + max(KL_0, f) + max(KL_1, f) + 3 TC
    dims = hand_kl_dims()
    free = (min(dims) + max(dims)) / 2
    freed = bv.loss_terms(LOGITS, X, MU, LOGVAR, z, beta=4.0, objective="tc", free_bits=free)
    assert freed["total"].item() == pytest.approx(hand_recon("mse") + max(dims) + free + 3 * tc, rel=1e-5)
    assert "sum_d max(KL_d, 0.5) + (beta-1)*TC," in bv.describe_loss(bv.Config(objective="tc", free_bits=0.5))
    capped = bv.Config(objective="tc", beta=4.0, capacity=15.0, capacity_epochs=15)
    assert "1000*|KL - C| + (beta-1)*TC, C rising from 0 to 15 nats over 15 epochs" in bv.describe_loss(capped)


def test_gradients_reach_mu_and_logvar_through_the_sample():
    model = bv.BetaVAE(latent_dim=3)
    mu = torch.tensor([[0.2, -0.4, 1.0]], requires_grad=True)
    logvar = torch.tensor([[0.1, -0.3, 0.5]], requires_grad=True)
    z = model.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    z.sum().backward()
    eps = torch.randn(1, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mu.grad, torch.ones(1, 3))  # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * eps * torch.exp(0.5 * logvar.detach()))  # dz/dlogvar


def test_warnings_for_collapse_and_a_stalled_reconstruction(capsys):
    def row(epoch, recon, kl, train_recon=None, beta=4.0):
        return {"epoch": epoch, "val_recon": recon, "val_kl": kl, "beta_eff": beta, "capacity": None, "lr": 1e-4,
                "train_recon": recon if train_recon is None else train_recon}
    cfg = bv.Config()
    bv.warn_if_stuck([row(1, 90, 0.01), row(2, 80, 0.02)], cfg)
    assert "posterior has collapsed" in capsys.readouterr().out
    improving = [row(e, 100 - e, 5.0) for e in range(1, 8)]
    bv.warn_if_stuck(improving, cfg)
    assert capsys.readouterr().out == ""
    stalled = [row(e, 50.0, 5.0) for e in range(1, 9)]
    said = []
    for epoch in range(1, 9):  # as training calls it: after every epoch, on the history so far
        bv.warn_if_stuck(stalled[:epoch], cfg)
        said.append("has not improved for 5 epochs" in capsys.readouterr().out)
    assert said == [False] * 5 + [True, False, False]  # once, when the stall begins
    bv.warn_if_stuck(stalled + [row(9, 40.0, 5.0)] + [row(e, 45.0, 5.0) for e in range(10, 15)], cfg)
    assert "has not improved" in capsys.readouterr().out  # a new stall after an improvement is said again
    # after a delay the recon is worse than the autoencoder's: no stall while it improves under the KL term
    delayed = [row(e, 40.0, 60.0, beta=0.0) for e in range(1, 4)] + [row(e, 80.0 - e, 12.0) for e in range(4, 12)]
    for epoch in range(1, 12):
        bv.warn_if_stuck(delayed[:epoch], cfg)
    assert capsys.readouterr().out == ""
    # a validation recon that wanders while the training recon still falls is not a stall
    wandering = [row(e, 50.0 + e % 2, 5.0, train_recon=100.0 - e) for e in range(1, 12)]
    for epoch in range(1, 12):
        bv.warn_if_stuck(wandering[:epoch], cfg)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------
# Model

@pytest.mark.parametrize("arch", ["tutorial", "burgess", "broadcast"])
@pytest.mark.parametrize("channels", [1, 3])
def test_model_shapes_and_range(channels, arch):
    model = bv.BetaVAE(latent_dim=6, channels=channels, arch=arch).eval()
    x = torch.rand(2, channels, 64, 64)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 6)
    image = model.decode(torch.randn(5, 6) * 10)
    assert image.shape == (5, channels, 64, 64)
    assert image.min() >= 0 and image.max() <= 1
    logits, _, _, _ = model(x)
    z = torch.randn(3, 6)
    torch.testing.assert_close(model.decode(z), torch.sigmoid(model.decoder.logits(z)))
    assert logits.shape == (2, channels, 64, 64)


@pytest.mark.parametrize("arch", ["tutorial", "burgess", "broadcast"])
def test_width_multiplies_every_hidden_layer(arch):
    one, two = (bv.BetaVAE(latent_dim=6, arch=arch, width=w) for w in (1, 2))
    kept = {1, 6, 6 + 2}  # the image's channels, the latent dims, and the broadcast grid's (z and 2 coordinates)
    layers = [(a.weight.shape, b.weight.shape) for a, b in zip(one.modules(), two.modules())
              if isinstance(a, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert len(layers) >= 8
    for narrow, wide in layers:
        assert wide == (*(n if n in kept else 2 * n for n in narrow[:2]), *narrow[2:])
    assert two.decode(torch.randn(3, 6)).shape == (3, 1, 64, 64)
    assert bv.BetaVAE.of(bv.Config(latent_dim=6, arch=arch, width=2)).state_dict().keys() == two.state_dict().keys()


def test_broadcast_decoder_gives_every_cell_all_of_z_and_its_own_coordinates(tmp_path):
    model = bv.BetaVAE(latent_dim=4, arch="broadcast").eval()
    seen = []
    model.decoder.net[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    z = torch.randn(3, 4)
    assert model.decode(z).shape == (3, 1, 64, 64)
    grid = seen[0]
    assert grid.shape == (3, 6, 16, 16)
    torch.testing.assert_close(grid[:, :4], z[:, :, None, None].expand(3, 4, 16, 16))
    x, y = grid[1, 4], grid[1, 5]
    assert (x[:, 0] == -1).all() and (x[:, -1] == 1).all() and (x.diff(dim=1) > 0).all() and (x.diff(dim=0) == 0).all()
    assert (y[0] == -1).all() and (y[-1] == 1).all() and (y.diff(dim=0) > 0).all() and (y.diff(dim=1) == 0).all()
    # the tiling and the coordinate channels survive the ONNX export, at any batch size
    import onnxruntime as ort
    export.export_module(model.decoder, torch.randn(2, 4), tmp_path / "decoder.onnx", "z", ["image"], 18)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        z = torch.randn(n, 4)
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {"z": z.numpy()})[0], model.decode(z).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The shapes renderer: each factor does what it says

def render(shape=0, scale=5, angle=0, x=16, y=16):
    return bv.render_shapes(torch.tensor([[shape, scale, angle, x, y]]))[0, 0]


def centroid(image):
    rows, cols = torch.nonzero(image, as_tuple=True)
    return cols.float().mean().item(), rows.float().mean().item()


def test_renderer_is_deterministic_and_binary():
    factors = bv.Shapes().factors(torch.arange(0, 737_280, 7919))
    a, b = bv.render_shapes(factors), bv.render_shapes(factors)
    assert torch.equal(a, b)
    assert a.shape == (len(factors), 1, 64, 64)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert (a.flatten(1).sum(1) > 0).all()  # every shape is visible


def test_training_batches_are_rendered_on_the_device_as_the_dataset_renders_them():
    # the training path (RenderedBatches: sampler indices -> grid points of the split -> device render)
    # must give exactly the dataset's own items, in the sampler's order
    train_set, _ = bv.split_validation(bv.Shapes(), 1000)
    loader, batches, where = bv.train_loader(train_set, bv.Config(), torch.device("cpu"))
    order = [torch.randint(len(train_set), (64,), generator=torch.Generator().manual_seed(k)).tolist() for k in range(4)]
    batches[:] = order
    rendered = list(loader)
    assert where == "shapes drawn on cpu"
    assert len(rendered) == 4
    for batch, images in zip(order, rendered):
        assert torch.equal(images, torch.stack([train_set[i] for i in batch]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by .ci/gpu)")
def test_shapes_render_bit_for_bit_the_same_on_cuda():
    factors = bv.Shapes().factors(torch.randperm(737_280, generator=torch.Generator().manual_seed(0))[:50_000])
    assert torch.equal(bv.render_shapes(factors, "cuda").cpu(), bv.render_shapes(factors))


def test_position_moves_the_centroid_monotonically():
    xs = [centroid(render(x=i))[0] for i in range(32)]
    ys = [centroid(render(y=i))[1] for i in range(32)]
    assert all(b > a for a, b in zip(xs, xs[1:]))
    assert all(b > a for a, b in zip(ys, ys[1:]))
    assert {round(centroid(render(x=i))[1], 3) for i in range(32)} == {round(centroid(render())[1], 3)}


def test_scale_grows_the_area():
    for shape in range(3):
        areas = [render(shape=shape, scale=s).sum().item() for s in range(6)]
        assert all(b > a for a, b in zip(areas, areas[1:]))
        # area grows with the square of the scale (0.5 -> 1.0 is 4x), up to pixelation
        assert areas[-1] / areas[0] == pytest.approx(4.0, rel=0.15)


def test_orientation_rotates_and_shapes_differ():
    ellipse = render(shape=1, angle=0)
    rows, cols = torch.nonzero(ellipse, as_tuple=True)
    assert cols.max() - cols.min() > 1.5 * (rows.max() - rows.min())  # wide at 0 degrees
    rows, cols = torch.nonzero(render(shape=1, angle=10), as_tuple=True)
    assert rows.max() - rows.min() > 1.5 * (cols.max() - cols.min())  # tall at 90 degrees
    square = [render(shape=0, angle=a) for a in range(40)]
    assert not torch.equal(square[0], square[5])  # 45 degrees: a diamond
    areas = torch.stack([s.sum() for s in square])
    assert (areas.max() - areas.min()) / areas.mean() < 0.08  # rotation keeps the area
    shapes = [render(shape=s) for s in range(3)]
    assert not torch.equal(shapes[0], shapes[1]) and not torch.equal(shapes[1], shapes[2])


def test_every_shape_stays_inside_the_frame():
    # a shape cut by the border would lose area; compare the extreme positions with the centre
    for shape in range(3):
        for angle in range(0, 40, 3):
            centre = render(shape=shape, angle=angle).sum()
            for x, y in [(0, 0), (31, 31), (0, 31), (31, 0)]:
                corner = render(shape=shape, angle=angle, x=x, y=y)
                assert abs(corner.sum() - centre) / centre < 0.05
                assert corner[0].sum() + corner[-1].sum() + corner[:, 0].sum() + corner[:, -1].sum() == 0


def test_dataset_grid_and_batched_access():
    ds = bv.Shapes()
    assert len(ds) == 3 * 6 * 40 * 32 * 32 == 737_280
    assert ds.factors([0]).tolist() == [[0, 0, 0, 0, 0]]
    assert ds.factors([len(ds) - 1]).tolist() == [[2, 5, 39, 31, 31]]
    assert ds.factors([1, 32, 1024]).tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0]]
    batch = ds.__getitems__([5, 77_777, 600_000])
    for i, image in zip([5, 77_777, 600_000], batch):
        assert torch.equal(image, ds[i])


def test_validation_split_is_fixed_and_disjoint():
    train_a, val_a = bv.split_validation(bv.Shapes(), 100)
    train_b, val_b = bv.split_validation(bv.Shapes(), 100)
    assert val_a.indices == val_b.indices and len(val_a) == 100
    assert not set(val_a.indices) & set(train_a.indices)
    assert len(train_a) + len(val_a) == 737_280


def test_validation_batches_mix_the_factors_as_training_batches_do():
    """The split is sorted by grid index (shape first): validating it in that order put one shape in each batch,
    and the TC, estimated from the batch, came out a third low. The loader visits it in a fixed shuffled order."""
    cfg = bv.Config(objective="tc", batch_size=64)
    _, val_set = bv.split_validation(bv.Shapes(), 5000)
    loaders = [bv.val_loader(val_set, cfg), bv.val_loader(val_set, cfg)]
    data, order = bv.base_items(loaders[0].dataset)
    assert order.tolist() == bv.base_items(loaders[1].dataset)[1].tolist()  # the same batches every epoch
    assert sorted(order.tolist()) == val_set.indices and loaders[0].batch_size == 64
    first_batch = data.factors(order[:64])
    assert set(first_batch[:, 0].tolist()) == {0, 1, 2} and len(set(first_batch[:, 1].tolist())) == 6
    assert set(data.factors(val_set.indices[:64])[:, 0].tolist()) == {0}  # in the split's own order: squares
    assert bv.val_loader(val_set, bv.Config(objective="kl", batch_size=64)).batch_size == 256  # no batch term


# ---------------------------------------------------------------------------------------------------
# Training through the CLI

def test_train_cli_writes_every_file(tiny_run):
    out, result = tiny_run
    for name in ["config.json", "history.csv", "last.pt", "best.pt", "loss_curves.png",
                 "images/recon_e001.png", "images/recon_e002.png", "images/samples_e002.png"]:
        assert (out / name).is_file(), name
    assert "summed over 1x64x64 pixels, mean over the batch" in result.stdout
    assert "summed over 4 latent dims, mean over the batch" in result.stdout
    assert result.stdout.count("epoch ") >= 2
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"kl_dim0", "kl_dim3", "active_dims", "lr", "img_per_s", "beta_eff"} <= set(rows[0])
    for r in rows:  # validation reports exactly the objective: recon + beta * KL
        assert float(r["val_total"]) == pytest.approx(float(r["val_recon"]) + 4 * float(r["val_kl"]), rel=1e-4)
        assert float(r["val_kl"]) == pytest.approx(sum(float(r[f"kl_dim{d}"]) for d in range(4)), rel=1e-3)


def test_checkpoint_rebuilds_the_model(tiny_run):
    out, _ = tiny_run
    model, cfg = bv.load_checkpoint(out / "best.pt")
    assert cfg.latent_dim == 4 and cfg.channels == 1 and not model.training
    assert model.decode(torch.zeros(1, 4)).shape == (1, 1, 64, 64)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["run"]["epoch"] == 2 and len(state["kl_per_dim"]) == 4


def test_help_lists_every_option_with_its_default(capsys):
    result = cli_in_process(capsys, "train", "--help")
    assert result.returncode == 0
    for f in bv.fields(bv.Config):
        if "help" in f.metadata:
            assert "--" + f.name.replace("_", "-") in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps the help at the terminal's width
    assert "(default: 0.0001; shapes, dsprites: 0.0005)" in text and "(default: 20000)" in text


def test_same_seed_repeats_bit_for_bit_and_another_seed_differs(tmp_path):
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        assert train_in_process(tmp_path / name, "--epochs", "1", "--seed", seed) == 0
    assert_same_weights(weights(tmp_path / "a/last.pt"), weights(tmp_path / "b/last.pt"))
    assert not torch.equal(weights(tmp_path / "a/last.pt")["encoder.fc_mu.weight"],
                           weights(tmp_path / "c/last.pt")["encoder.fc_mu.weight"])


def test_resume_after_an_epoch_is_exact(tmp_path):
    assert train_in_process(tmp_path / "straight", "--epochs", "2") == 0
    assert train_in_process(tmp_path / "split", "--epochs", "1") == 0
    state = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert state["run"]["machines"] == [bv.machine(torch.device("cpu"))]
    state["run"]["machines"] = ["the first machine"]  # as if resumed elsewhere: the model card names both
    torch.save(state, tmp_path / "split/last.pt")
    assert train_in_process(tmp_path / "split", "--epochs", "2", "--resume") == 0
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "split/last.pt"))
    run = torch.load(tmp_path / "split/last.pt", weights_only=True)["run"]
    assert [row["epoch"] for row in run["history"]] == [1, 2]
    assert run["machines"] == ["the first machine", bv.machine(torch.device("cpu"))]


@pytest.mark.parametrize("patience, lrs", [(0, [1e-7, 5e-8, 2.5e-8]), (1, [1e-7, 1e-7, 5e-8])])
def test_lr_is_halved_after_patience_epochs_without_a_better_objective(tmp_path, patience, lrs):
    # at lr 1e-7 the weights barely move: no epoch beats the first one's validation objective by 0.01 %
    assert train_in_process(tmp_path, "--epochs", "3", "--lr", "1e-7", "--lr-patience", patience) == 0
    history = torch.load(tmp_path / "last.pt", weights_only=True)["run"]["history"]
    assert [row["lr"] for row in history] == pytest.approx(lrs, rel=1e-6)


# Ctrl-C, or `kill` / a job scheduler; and Ctrl-C inside a KL warm-up, whose beta depends on the epoch
@pytest.mark.parametrize("stop, flags", [(signal.SIGINT, ["--kl-warmup", "2"]), (signal.SIGTERM, [])])
def test_ctrl_c_saves_and_resume_mid_epoch_is_exact(tmp_path, monkeypatch, stop, flags):
    assert train_in_process(tmp_path / "straight", "--epochs", "2", *flags) == 0
    calls, real_step = [], bv.train_step

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        parts = real_step(*args, **kwargs)
        if len(calls) == 5:  # in the middle of epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), stop)
        return parts

    monkeypatch.setattr(bv, "train_step", step_then_ctrl_c)
    assert train_in_process(tmp_path / "split", "--epochs", "2", *flags) == 130
    stopped = torch.load(tmp_path / "split/last.pt", weights_only=True)["run"]
    assert (stopped["epoch"], stopped["step"]) == (1, 2)
    monkeypatch.setattr(bv, "train_step", real_step)
    assert train_in_process(tmp_path / "split", "--epochs", "2", "--resume", *flags) == 0
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "split/last.pt"))


def nan_at_training_step(monkeypatch, n: int, then=None):
    """Make the n-th training step's loss NaN (and call `then` right after it)."""
    calls, real_terms = [], bv.loss_terms

    def poisoned(*args, **kwargs):
        parts = real_terms(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps only
            calls.append(1)
            if len(calls) == n:
                parts["total"] = parts["total"] * float("nan")
                if then:
                    then()
        return parts
    monkeypatch.setattr(bv, "loss_terms", poisoned)


def assert_stopped_on_nan_keeping_epoch_one(out, capsys, where, before=()):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(before) + 1 and "NaN" in err[-1] and where in err[-1], err
    assert all(line in said for line, said in zip(before, err))
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["run"]["epoch"] == 1 and state["run"]["step"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    nan_at_training_step(monkeypatch, 4)  # the first step of epoch 2 (3 steps per epoch)
    assert train_in_process(tmp_path / "run", "--epochs", "3") == 1
    assert_stopped_on_nan_keeping_epoch_one(tmp_path / "run", capsys, "epoch 2 step 1")


def test_nan_mid_epoch_is_caught_at_the_next_check_and_never_saved(tmp_path, monkeypatch, capsys):
    # 6 steps per epoch, checked every 2: a NaN at step 3 of epoch 2 is seen at step 4, after the weights
    # took two poisoned Adam steps; they must never reach a checkpoint, and the message names step 3
    monkeypatch.setattr(bv, "CHECK_EVERY", 2)
    nan_at_training_step(monkeypatch, 9)
    assert train_in_process(tmp_path / "run", "--epochs", "3", "--batch-size", "8") == 1
    assert_stopped_on_nan_keeping_epoch_one(tmp_path / "run", capsys, "epoch 2 step 3")
    # Ctrl-C right after the poisoned step: the save it asks for must not write the poisoned weights
    monkeypatch.setattr(bv, "CHECK_EVERY", 50)
    nan_at_training_step(monkeypatch, 9, then=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert train_in_process(tmp_path / "ctrl-c", "--epochs", "3", "--batch-size", "8") == 1
    assert_stopped_on_nan_keeping_epoch_one(tmp_path / "ctrl-c", capsys, "epoch 2 step 3", before=["Ctrl-C"])


def test_checking_every_step_or_every_50_trains_the_same(tmp_path, monkeypatch):
    histories = []
    for every in (1, 50):
        monkeypatch.setattr(bv, "CHECK_EVERY", every)
        assert train_in_process(tmp_path / f"every{every}", "--epochs", "1", "--batch-size", "8") == 0
        histories.append(read_rows(tmp_path / f"every{every}/history.csv", "train_total", "train_tc", "val_total"))
    assert histories[0] == histories[1]  # the same sums, added in the same order
    assert_same_weights(weights(tmp_path / "every1/last.pt"), weights(tmp_path / "every50/last.pt"))


def test_under_a_process_group_ctrl_c_is_agreed_at_checks_not_every_step(tmp_path, monkeypatch):
    # a one-process gloo group takes the torchrun code path: Ctrl-C at step 3 stops at the check of step 4
    monkeypatch.setattr(bv, "CHECK_EVERY", 4)
    agreements, real_agree = [], bv.agree_on
    monkeypatch.setattr(bv, "agree_on", lambda *flags, device: agreements.append(1) or real_agree(*flags, device=device))
    calls, real_step = [], bv.train_step

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(bv, "train_step", step_then_ctrl_c)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    assert train_in_process(tmp_path / "run", "--epochs", "2", "--batch-size", "8") == 130
    assert not torch.distributed.is_initialized()  # train() leaves the group it found closed, as under torchrun
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["run"]["step"] == 4 and len(calls) == 4
    assert len(agreements) == 2  # the check at step 4, and the end of the loop; not one per step


def test_tensorboard_logs_or_says_what_is_missing(tmp_path, capsys):
    result = cli_in_process(capsys, "train", *TINY, "--epochs", "1", "--tensorboard", "--device", "cpu",
                            "--out", tmp_path / "tb")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert result.returncode == 2
        assert result.stderr.strip() == "error: --tensorboard needs the tensorboard package: pip install tensorboard"
    else:
        assert result.returncode == 0, result.stderr
        assert list((tmp_path / "tb/tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_scalars_include_the_kls_parts():
    logged = {}

    class Writer:  # records what train would send to TensorBoard
        def add_scalar(self, tag, value, step):
            logged[tag] = (value, step)

    row = {"epoch": 3, "beta_eff": 4.0, "capacity": None, "lr": 1e-4, "active_dims": 5, "img_per_s": 100.0,
           **{f"{split}_{term}": float(i) for i, (split, term) in
              enumerate((s, t) for s in ("train", "val") for t in bv.LOGGED_TERMS)}}
    bv.log_tensorboard(Writer(), row)
    for split in ("train", "val"):
        for term in ("recon", "kl", "total", "mi", "tc", "dwkl"):
            assert logged[f"loss/{term}_{split}"] == (row[f"{split}_{term}"], 3)


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line, a non-zero exit, never a traceback

class NotAllowed:
    pass


def test_checkpoint_loading_refuses_bad_files(tmp_path, tiny_run):
    out, _ = tiny_run
    cases = {}
    torch.save({"format": "betavae", "payload": NotAllowed()}, tmp_path / "pickled.pt")
    cases["pickled.pt"] = "pickled Python objects"
    (tmp_path / "truncated.pt").write_bytes((out / "best.pt").read_bytes()[:2000])
    cases["truncated.pt"] = "truncated or not a PyTorch checkpoint"
    (tmp_path / "text.pt").write_text("hello")
    cases["text.pt"] = "truncated or not a PyTorch checkpoint"
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = "not written by betavae"
    state = torch.load(out / "best.pt", weights_only=True)
    state["config"]["latent_dim"] = 7
    torch.save(state, tmp_path / "other_arch.pt")
    cases["other_arch.pt"] = "another architecture"
    state = torch.load(out / "best.pt", weights_only=True)
    state["config"]["arch"] = "tutorial" if state["config"]["arch"] != "tutorial" else "burgess"
    torch.save(state, tmp_path / "other_network.pt")
    cases["other_network.pt"] = "another architecture"
    state = torch.load(out / "best.pt", weights_only=True)
    state["config"]["prior"] = "gennorm4"  # a setting this version no longer has
    torch.save(state, tmp_path / "removed_setting.pt")
    cases["removed_setting.pt"] = r"settings this betavae .* does not know: \['prior'\]"
    cases["missing.pt"] = "no checkpoint at"
    for name, message in cases.items():
        with pytest.raises(bv.UserError, match=message):
            bv.load_checkpoint(tmp_path / name)
    # betavae 0.2 stored --amp; its runs load with the --precision it meant
    state = torch.load(out / "best.pt", weights_only=True)
    for amp, precision in ((True, "bf16"), (False, "fp32")):
        state["config"] = {k: v for k, v in state["config"].items() if k != "precision"} | {"amp": amp}
        torch.save(state, tmp_path / "amp.pt")
        assert bv.load_checkpoint(tmp_path / "amp.pt")[1].precision == precision


@pytest.mark.parametrize("flags, message", [
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--latent-dim", "0"], "--latent-dim must be >= 1"),
    (["--width", "0"], "--width must be >= 1"),
    (["--val-size", "-1"], "--val-size must be >= 0"),
    (["--beta", "nan"], "must be a finite number"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--capacity", "20", "--kl-warmup", "3"], "pick one"),
    (["--capacity", "20", "--kl-delay", "3"], "pick one"),
    (["--kl-delay", "-1"], "--kl-delay must be >= 0"),
    (["--lr-patience", "-1"], "--lr-patience must be >= 0"),
    (["--objective", "tc", "--batch-size", "1"], "--batch-size must be >= 2"),
    (["--arch", "resnet"], "invalid choice: 'resnet'"),
    (["--val-size", "737280"], "leaves no training data"),
    (["--prior", "gennorm4"], "unrecognized arguments: --prior"),
    (["--out", "__FILE__/run"], "cannot write to"),
])
def test_bad_flags_give_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("")
    flags = [f.replace("__FILE__", str(tmp_path / "file")) for f in flags]
    out = [] if "--out" in flags else ["--out", tmp_path / "run"]
    assert_one_line_error(cli_in_process(capsys, "train", *TINY, *out, *flags), message)


def cli_in_process(capsys, *args, main=bv.main):
    """betavae.py's command line (or another tool's `main`) run in this process (seconds faster than
    run_cli, which imports torch anew): its exit code and output, as run_cli's result has them. Any
    exception but the exit escapes."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def assert_one_line_error(result, message):
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_existing_runs_are_protected_and_resume_must_match(tiny_run, capsys):
    out, _ = tiny_run
    again = cli_in_process(capsys, "train", *TINY, "--out", out)
    assert again.returncode == 2 and "already holds a run; add --resume" in again.stderr
    changed = cli_in_process(capsys, "train", *TINY, "--out", out, "--resume", "--beta", "8")
    assert changed.returncode == 2 and "--beta 8.0 differs from the run being resumed (4.0)" in changed.stderr
    config = (out / "config.json").read_text()
    for epochs in ("2", "1"):  # a finished run trains no more, and its config.json keeps its 2 epochs
        done = cli_in_process(capsys, "train", *TINY, "--out", out, "--resume", "--epochs", epochs)
        assert done.returncode == 0 and "already trained 2 epochs" in done.stdout
    assert (out / "config.json").read_text() == config


# ---------------------------------------------------------------------------------------------------
# Pictures: traverse, interpolate, sample, reconstruct, plot

def png(path):
    from PIL import Image
    return Image.open(path)


CELL = 64 + onnx_tool.PADDING  # one image of a grid with its padding
LABEL_WIDTH, HEADER_HEIGHT = onnx_tool.LABEL_WIDTH, onnx_tool.HEADER_HEIGHT


def tile(image, row, col, left=0, top=0):
    """The 64x64 cell (row, col) of a figure, as floats in [0, 1] (first colour channel)."""
    x, y = left + 2 + col * CELL, top + 2 + row * CELL
    return torch.from_numpy(np.asarray(image.convert("L").crop((x, y, x + 64, y + 64)), dtype=np.float32)) / 255


def grid_size(columns, rows):
    return columns * CELL + 2, rows * CELL + 2


def test_every_picture_command_writes_an_image_of_the_expected_size(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    ckpt = ["--checkpoint", out / "best.pt"]
    cases = [
        (["traverse", "--dims", "3", "--steps", "5", "--gif"], (LABEL_WIDTH, HEADER_HEIGHT), grid_size(5, 3)),
        (["interpolate", "--index", "0", "1", "2", "3", "--steps", "4"], (0, HEADER_HEIGHT), grid_size(6, 2)),
        (["sample", "--n", "10"], (0, 0), grid_size(4, 3)),
        (["reconstruct", "--n", "10"], (0, 2 * HEADER_HEIGHT + grid_size(2, 2)[1]), grid_size(8, 2)),
    ]
    for args, (extra_w, extra_h), (w, h) in cases:
        target = tmp_path / f"{args[0]}.png"
        result = cli_in_process(capsys, *args, *ckpt, "--out", target)
        assert result.returncode == 0, result.stderr
        assert str(target) in result.stdout
        assert png(target).size == (w + extra_w, h + extra_h), args[0]
    gif = png(tmp_path / "traverse.gif")
    assert gif.n_frames == 2 * 5 - 2 and gif.size == (grid_size(3, 1)[0], HEADER_HEIGHT + grid_size(3, 1)[1])
    result = cli_in_process(capsys, "plot", "--run", out, "--out", tmp_path / "plot.png")
    assert result.returncode == 0, result.stderr
    assert png(tmp_path / "plot.png").size == (880, 1200)  # 5 rows: losses, the KL's parts, KL per dim


def test_figures_default_to_the_newest_run_folder(tiny_run, tmp_path, capsys, monkeypatch):
    out, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    os.symlink(out, tmp_path / "runs" / "tiny")
    result = cli_in_process(capsys, "sample", "--n", "4")
    assert result.returncode == 0, result.stderr
    assert (out / "samples.png").is_file() and str(Path("runs/tiny/samples.png")) in result.stdout
    result = cli_in_process(capsys, "plot")
    assert result.returncode == 0 and (out / "plot.png").is_file()
    # no run: the shipped model, whose folder is left as shipped (pictures go to runs/pretrained)
    shipped = tmp_path / "assets" / "model.pt"
    shipped.parent.mkdir()
    shutil.copy(out / "best.pt", shipped)
    monkeypatch.setattr(bv, "SHIPPED", shipped)
    os.unlink(tmp_path / "runs" / "tiny")
    result = cli_in_process(capsys, "sample", "--n", "4")
    assert result.returncode == 0, result.stderr
    assert f"using {Path('assets/model.pt')}, the shipped model (no run in runs/)" in result.stdout
    assert (tmp_path / "runs/pretrained/samples.png").is_file() and os.listdir(shipped.parent) == ["model.pt"]
    result = cli_in_process(capsys, "reconstruct", "--checkpoint", "assets/model.pt", "--n", "2")  # named, relative
    assert result.returncode == 0 and os.listdir(shipped.parent) == ["model.pt"], result.stderr
    export.main(["--checkpoint", "assets/model.pt"])  # its ONNX file goes to runs/pretrained too
    assert os.listdir(shipped.parent) == ["model.pt"] and (tmp_path / "runs/pretrained/decoder.onnx").is_file()
    shipped.unlink()
    assert_one_line_error(cli_in_process(capsys, "sample"), "no checkpoint in runs/*/best.pt: train one first")


def test_dims_are_chosen_in_kl_order():
    ranking = [(2, 3.0), (0, 1.5), (3, 0.2), (1, 0.001)]
    assert bv.select_dims(ranking, "auto") == ranking[:3]  # active dims only
    assert bv.select_dims(ranking, "2") == ranking[:2]
    assert bv.select_dims(ranking, "1,2") == [(2, 3.0), (1, 0.001)]
    for bad in ["5", "0", "4,1", "x"]:
        with pytest.raises(bv.UserError):
            bv.select_dims(ranking, bad)


def test_traversal_rows_follow_kl_and_change_only_their_dim(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    result = cli_in_process(capsys, "traverse", "--checkpoint", out / "best.pt", "--dims", "4", "--steps", "3", "--index", "12345",
                     "--out", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    model, cfg = bv.load_checkpoint(out / "best.pt")
    state = torch.load(out / "best.pt", weights_only=True)
    ranking = bv.kl_ranking(state, model, cfg, "cpu")
    assert [kl for _, kl in ranking] == sorted(state["kl_per_dim"], reverse=True)
    dims = [d for d, _ in ranking]
    with torch.no_grad():
        base = model.encode(bv.Shapes()[12345][None])[0][0].numpy()
        values = np.array([-3.0, 0.0, 3.0], dtype=np.float32)
        codes = bv.traversal_codes(base, dims, values)
        for i, d in enumerate(dims):  # each row moves its own dim and nothing else
            row = codes[i * 3:(i + 1) * 3]
            others = [k for k in range(4) if k != d]
            assert np.array_equal(row[:, others], np.tile(base[others], (3, 1)))
            assert np.array_equal(row[:, d], values)
        images = model.decode(torch.from_numpy(codes))
    figure = png(tmp_path / "t.png")
    for i in range(4):
        for j in range(3):
            torch.testing.assert_close(tile(figure, i, j, LABEL_WIDTH, HEADER_HEIGHT), images[i * 3 + j, 0],
                                       atol=1.5 / 255, rtol=0)


def test_interpolation_ends_are_the_decoded_means(tiny_run, tmp_path, capsys):
    a, b = np.array([1.0, 0.0, 2.0], np.float32), np.array([0.0, 3.0, -1.0], np.float32)
    for slerp in (False, True):
        codes = bv.interpolation_codes(a, b, 5, slerp)
        assert np.array_equal(codes[0], a) and np.array_equal(codes[-1], b)
    np.testing.assert_allclose(bv.interpolation_codes(a, b, 3, False)[1], (a + b) / 2)
    unit_a, unit_b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    slerped = bv.interpolation_codes(unit_a, unit_b, 5, True)  # slerp keeps the norm on a circle
    np.testing.assert_allclose(np.linalg.norm(slerped, axis=1), np.ones(5), rtol=1e-6)
    np.testing.assert_allclose(slerped[2], np.array([1, 1]) / np.sqrt(2), rtol=1e-6)

    out, _ = tiny_run
    result = cli_in_process(capsys, "interpolate", "--checkpoint", out / "best.pt", "--index", "7", "654321", "--steps", "5",
                     "--out", tmp_path / "i.png")
    assert result.returncode == 0, result.stderr
    model, _ = bv.load_checkpoint(out / "best.pt")
    x = torch.stack([bv.Shapes()[7], bv.Shapes()[654321]])
    with torch.no_grad():
        ends = model.decode(model.encode(x)[0])
    figure = png(tmp_path / "i.png")
    torch.testing.assert_close(tile(figure, 0, 0, top=HEADER_HEIGHT), x[0, 0])  # original A
    torch.testing.assert_close(tile(figure, 0, 1, top=HEADER_HEIGHT), ends[0, 0], atol=1.5 / 255, rtol=0)
    torch.testing.assert_close(tile(figure, 0, 5, top=HEADER_HEIGHT), ends[1, 0], atol=1.5 / 255, rtol=0)
    torch.testing.assert_close(tile(figure, 0, 6, top=HEADER_HEIGHT), x[1, 0])  # original B


def test_images_of_another_size_and_mode_are_converted(tiny_run, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (100, 80), (255, 255, 255)).save(tmp_path / "wide.png")
    out, _ = tiny_run
    result = cli_in_process(capsys, "traverse", "--checkpoint", out / "best.pt", "--image", tmp_path / "wide.png",
                     "--out", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    assert "converted RGB to L" in result.stdout and "resized 100x80 to 64x64" in result.stdout
    x = bv.read_image(tmp_path / "wide.png", 1, 64)
    assert x.shape == (1, 1, 64, 64) and np.array_equal(x, np.ones_like(x))


def test_picture_commands_reject_bad_input(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "truncated.pt").write_bytes((out / "best.pt").read_bytes()[:5000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    ckpt = ["--checkpoint", out / "best.pt"]
    cases = [
        (["traverse", "--checkpoint", tmp_path / "missing.pt"], "no checkpoint at"),
        (["sample", "--checkpoint", tmp_path / "truncated.pt"], "truncated or not a PyTorch checkpoint"),
        (["reconstruct", "--checkpoint", tmp_path / "foreign.pt"], "not written by betavae"),
        (["traverse", *ckpt, "--dims", "9"], "the model has 4 latent dims"),
        (["traverse", *ckpt, "--dims", "1,4"], "[4] out of range"),
        (["traverse", *ckpt, "--image", tmp_path / "notes.png"], "cannot read"),
        (["interpolate", *ckpt, "--images", tmp_path / "notes.png", tmp_path / "notes.png"], "cannot read"),
        (["traverse", *ckpt, "--index", "737280"], "--index 737280 is outside shapes"),
        (["interpolate", *ckpt, "--index", "1", "2", "3"], "pairs"),
        (["sample", *ckpt, "--n", "0"], "--n must be >= 1"),
        (["plot", "--run", tmp_path], "no history.csv"),
    ]
    for args, message in cases:
        assert_one_line_error(cli_in_process(capsys, *args, "--out", tmp_path / "x.png"), message)


# ---------------------------------------------------------------------------------------------------
# Ship the decoder: export.py and infer_onnx.py

def run_script(script, *args, env=None):
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="session")
def exported(tiny_run):
    """decoder.onnx and encoder.onnx of the tiny run, written by export.py."""
    out, _ = tiny_run
    result = run_script("export.py", "--checkpoint", out / "best.pt", "--encoder")
    assert result.returncode == 0, result.stderr
    return out, result


def test_infer_onnx_uses_the_newest_run_else_the_shipped_model(exported, tmp_path, capsys, monkeypatch):
    out, _ = exported
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(onnx_tool, "SHIPPED", out)
    result = cli_in_process(capsys, "sample", "--n", "4", main=onnx_tool.main)
    assert result.returncode == 0, result.stderr
    shipped = os.path.relpath(out / "decoder.onnx")
    assert f"using {shipped}, the shipped model (none in runs/); --model picks another" in result.stdout
    (tmp_path / "runs").mkdir()
    os.symlink(out, tmp_path / "runs" / "tiny")
    result = cli_in_process(capsys, "traverse", "--dims", "2", "--steps", "3", main=onnx_tool.main)
    assert result.returncode == 0, result.stderr
    assert f"using {Path('runs/tiny/decoder.onnx')}, the newest export in runs/ (and its encoder)" in result.stdout
    os.unlink(tmp_path / "runs" / "tiny")
    monkeypatch.setattr(onnx_tool, "SHIPPED", tmp_path / "nothing")
    assert_one_line_error(cli_in_process(capsys, "sample", main=onnx_tool.main), "no decoder.onnx in runs/*/")


@pytest.fixture
def no_torch_env(tmp_path):
    """An environment in which `import torch` fails, as on a machine with only onnxruntime."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def test_export_matches_pytorch_at_batch_1_and_7(exported):
    import onnxruntime as ort
    out, result = exported
    assert "max |onnxruntime - PyTorch|" in result.stdout and "opset 18" in result.stdout
    model, cfg = bv.load_checkpoint(out / "best.pt")
    decoder = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        z = torch.randn(n, cfg.latent_dim)
        x = bv.render_shapes(bv.Shapes().factors(torch.arange(n) * 9973))
        with torch.no_grad():
            image, (mu, logvar) = model.decode(z), model.encode(x)
        np.testing.assert_allclose(decoder.run(None, {"z": z.numpy()})[0], image.numpy(), atol=1e-5)
        got_mu, got_logvar = encoder.run(None, {"image": x.numpy()})
        np.testing.assert_allclose(got_mu, mu.numpy(), atol=1e-4)
        np.testing.assert_allclose(got_logvar, logvar.numpy(), atol=1e-4)
    assert decoder.get_outputs()[0].name == "image" and encoder.get_outputs()[1].name == "logvar"
    ops = {node.op_type for node in __import__("onnx").load(str(out / "encoder.onnx")).graph.node}
    assert not ops & {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}


def test_burgess_network_trains_the_tc_objective_exports_and_draws(tmp_path, capsys):
    """The second network and the TC objective end to end: the checkpoint names them, every tool rebuilds
    the model, ONNX matches it, both tools sample the prior N(0, I) with their seeds."""
    out = tmp_path / "burgess"
    result = cli_in_process(capsys, "train", *TINY, "--epochs", "1", "--arch", "burgess", "--objective", "tc",
                            "--recon", "bce", "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "beta 4 on the total correlation only" in result.stdout and "minibatch-weighted" in result.stdout
    model, cfg = bv.load_checkpoint(out / "best.pt")
    assert (cfg.arch, cfg.objective, cfg.recon) == ("burgess", "tc", "bce")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # the logged validation objective is recon + KL + 3 TC, recomputed from the logged parts
    row = next(csv.DictReader(open(out / "history.csv")))
    assert float(row["val_total"]) == pytest.approx(float(row["val_recon"]) + float(row["val_kl"])
                                                    + 3 * float(row["val_tc"]), rel=1e-5)
    assert all(math.isfinite(float(row[f"{split}_{part}"])) for split in ("train", "val") for part in ("mi", "tc", "dwkl"))
    # and it is what validate() computes again from the checkpoint: batches of the training size
    assert bv.checkpoint_validation(model, cfg, torch.device("cpu"))["total"] == pytest.approx(float(row["val_total"]), rel=1e-5)
    assert cli_in_process(capsys, "--checkpoint", out / "best.pt", main=export.main).returncode == 0
    import onnxruntime as ort
    z = torch.randn(3, cfg.latent_dim)
    decoded = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"z": z.numpy()})[0]
    codes = {"onnx.png": torch.from_numpy(onnx_tool.prior_codes(4, cfg.latent_dim, 0)).float(),  # numpy's draws
             "torch.png": torch.randn(4, cfg.latent_dim, generator=torch.Generator().manual_seed(0))}  # torch's
    with torch.no_grad():
        np.testing.assert_allclose(decoded, model.decode(z).numpy(), atol=1e-5)
        # at temperature 8 the tiny decoder's images tell one set of codes from another by many levels
        expected = {name: np.asarray(onnx_tool.image_grid(model.decode(8 * c).numpy(), 2), dtype=int)
                    for name, c in codes.items()}
    assert np.abs(expected["onnx.png"] - expected["torch.png"]).max() > 4
    assert cli_in_process(capsys, "sample", "--model", out / "decoder.onnx", "--n", "4", "--temperature", "8",
                          "--out", tmp_path / "onnx.png", main=onnx_tool.main).returncode == 0
    assert cli_in_process(capsys, "sample", "--checkpoint", out / "best.pt", "--n", "4", "--temperature", "8",
                   "--out", tmp_path / "torch.png").returncode == 0
    for picture in ("onnx.png", "torch.png"):  # each drew its own prior codes of seed 0 (within a level of rounding)
        assert np.abs(np.asarray(png(tmp_path / picture), dtype=int) - expected[picture]).max() <= 1, picture
    for command in ("traverse", "reconstruct"):
        assert cli_in_process(capsys, command, "--checkpoint", out / "best.pt").returncode == 0, command
    result = cli_in_process(capsys, "evaluate", "--checkpoint", out / "best.pt", "--metrics", "mig", "--n", "100")
    assert result.returncode == 0 and "mig" in json.loads((out / "metrics.json").read_text())


def test_export_metadata_round_trip(exported):
    import onnx
    out, _ = exported
    props = {p.key: p.value for p in onnx.load(str(out / "decoder.onnx")).metadata_props}
    model, cfg = bv.load_checkpoint(out / "best.pt")
    state = torch.load(out / "best.pt", weights_only=True)
    ranking = bv.kl_ranking(state, model, cfg, "cpu")
    assert (props["latent_dim"], props["channels"], props["height"], props["width"]) == ("4", "1", "64", "64")
    assert [d for d, _ in json.loads(props["dims_by_kl"])] == [d for d, _ in ranking]
    assert [kl for _, kl in json.loads(props["dims_by_kl"])] == pytest.approx([kl for _, kl in ranking], abs=1e-6)
    assert props["beta"] == "4.0" and props["dataset"] == "shapes" and props["epoch"] == "2"
    assert props["betavae_version"] == bv.__version__ and props["role"] == "decoder"
    decoder = onnx_tool.Decoder(out / "decoder.onnx")
    assert (decoder.latent_dim, decoder.channels, decoder.size) == (4, 1, 64)
    # the factor labels: measured on the validation images at the last epoch, stored, exported, read back
    assert len(state["dim_factors"]) == 4 and all(name in bv.FACTOR_NAMES for name, _ in state["dim_factors"])
    assert decoder.factors == state["dim_factors"]
    # measured again as a checkpoint saved inside its first epoch needs them: the same labels
    assert bv.factor_labels({"dim_factors": None}, model, cfg, torch.device("cpu")) == state["dim_factors"]


def test_export_measures_the_factor_labels_of_a_checkpoint_saved_in_its_first_epoch(tiny_run, tmp_path, capsys):
    """A checkpoint saved by Ctrl-C inside its first epoch has no labels yet: export.py measures them on the
    validation images, the same as training stores them."""
    import onnx
    out, _ = tiny_run
    state = torch.load(out / "best.pt", weights_only=True)
    stored, state["dim_factors"], state["kl_per_dim"] = state["dim_factors"], None, None
    torch.save(state, tmp_path / "first_epoch.pt")
    result = cli_in_process(capsys, "--checkpoint", tmp_path / "first_epoch.pt", main=export.main)
    assert result.returncode == 0, result.stderr
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "decoder.onnx")).metadata_props}
    assert json.loads(props["dim_factors"]) == stored


def test_infer_onnx_runs_without_torch(exported, no_torch_env, tmp_path):
    out, _ = exported
    check = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env, capture_output=True, text=True)
    assert check.returncode != 0 and "torch is not installed here" in check.stderr
    model = ["--model", out / "decoder.onnx"]
    result = run_script("infer_onnx.py", "sample", *model, "--n", "10", "--out", tmp_path / "s.png", env=no_torch_env)
    assert result.returncode == 0, result.stderr
    assert png(tmp_path / "s.png").size == grid_size(4, 3)
    result = run_script("infer_onnx.py", "traverse", *model, "--dims", "3", "--steps", "5", "--gif",
                        "--threads", "1", "--out", tmp_path / "t.png", env=no_torch_env)
    assert result.returncode == 0, result.stderr
    w, h = grid_size(5, 3)
    assert png(tmp_path / "t.png").size == (w + LABEL_WIDTH, h + HEADER_HEIGHT)
    assert png(tmp_path / "t.gif").n_frames == 8
    for name, index in [("a", 0), ("b", 500_000)]:  # two dataset images as files, padded like a grid
        onnx_tool.image_grid(bv.Shapes()[index][None].numpy(), 1).save(tmp_path / f"{name}.png")
    result = run_script("infer_onnx.py", "interpolate", *model, "--encoder", out / "encoder.onnx",
                        "--images", tmp_path / "a.png", tmp_path / "b.png", "--steps", "4",
                        "--out", tmp_path / "i.png", env=no_torch_env)
    assert result.returncode == 0, result.stderr
    assert png(tmp_path / "i.png").size == (grid_size(6, 1)[0], grid_size(6, 1)[1] + HEADER_HEIGHT)
    result = run_script("infer_onnx.py", "bench", *model, "--repeats", "2", env=no_torch_env)
    assert result.returncode == 0 and "latency, batch 1" in result.stdout and "batch 256" in result.stdout


# the explorer: infer_onnx.py explore, over HTTP and in a real browser

@pytest.fixture
def explorer(exported, no_torch_env):
    """`infer_onnx.py explore` on the tiny exported model, without torch, in a subprocess on a free port:
    (its base URL, the process). Stopped with Ctrl-C afterwards, which must end it cleanly."""
    out, _ = exported
    process = subprocess.Popen([sys.executable, str(HERE / "infer_onnx.py"), "explore", "--model", str(out / "decoder.onnx"),
                                "--encoder", str(out / "encoder.onnx"), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=no_torch_env,
                               # Ctrl-C works as in a terminal, even when pytest was started in the background
                               # with SIGINT ignored (which a child would inherit)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    start = process.stdout.readline()
    assert "serving http://127.0.0.1:" in start and "this machine only" in start, start + process.stderr.read()
    yield start.split("serving ")[1].split()[0], process
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and "explorer stopped" in stdout and "Traceback" not in stderr, stderr


def http(url, path, body=None, method=None):
    """(status, content type, body bytes) of one request; the path is sent as given, `..` included."""
    import http.client
    from urllib.parse import urlsplit
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    try:
        try:
            connection.request(method or ("POST" if body is not None else "GET"), path, body=body)
        except (BrokenPipeError, ConnectionResetError):  # refused by its headers, before the body was read
            pass
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def decoded_png(decoder, z):
    """The explorer's PNG for z as pixels, computed here with infer_onnx's decoder: (H, W) or (H, W, C) uint8."""
    return np.round(np.clip(decoder(np.array([z], np.float32))[0], 0, 1) * 255).astype(np.uint8).squeeze(0)


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image
    import io
    return np.asarray(Image.open(io.BytesIO(data)))


def test_explorer_serves_its_page_and_decodes_as_infer_onnx_does(explorer, exported):
    url, _ = explorer
    out, _ = exported
    decoder = onnx_tool.Decoder(out / "decoder.onnx")
    status, kind, page = http(url, "/")
    assert status == 200 and kind.startswith("text/html") and b"<title>betavae explorer</title>" in page
    info = json.loads(http(url, "/info")[2])
    assert info["latent_dim"] == 4 and info["examples"] == 16 and info["encoder"]
    active = [d for d, kl in decoder.ranking if kl > 0.01]
    assert [s["dim"] for s in info["sliders"]] == (active or [d for d, _ in decoder.ranking])  # in KL order
    assert info["sliders"][0]["label"][0].startswith(f"dim {info['sliders'][0]['dim']} · ")  # "dim 3 · scale 0.71"
    for z in ([0, 0, 0, 0], [1.5, -2, 0.25, 9.5]):
        status, kind, png = http(url, "/decode", json.dumps({"z": z}).encode())
        assert status == 200 and kind == "image/png"
        assert np.array_equal(png_pixels(png), decoded_png(decoder, z))
    # an example, and an uploaded image: their code is the encoder's mu, the image comes back with it
    encoder = onnx_tool.Encoder(out / "encoder.onnx", decoder)
    example = json.loads(http(url, "/example?i=3")[2])
    np.testing.assert_allclose(example["z"], encoder(encoder.examples[3][None])[0], rtol=1e-6, atol=1e-6)
    image = bv.Shapes()[123_456].numpy()
    status, _, answer = http(url, "/encode", onnx_tool.png_bytes(image))
    assert status == 200
    np.testing.assert_allclose(json.loads(answer)["z"], encoder(image[None])[0], rtol=1e-6, atol=1e-6)


def test_explorer_refuses_bad_requests_in_one_line_and_keeps_serving(explorer, exported):
    url, _ = explorer
    good = json.dumps({"z": [0.5, 0, 0, 0]}).encode()
    cases = [("/decode", b'{"z": [0, 0]}', 400, "exactly 4 numbers"),
             ("/decode", b'{"z": [0, 0, 0, NaN]}', 400, "finite numbers"),
             ("/decode", b'{"z": [0, 0, 0, 1e9]}', 400, "within -10 to 10"),
             ("/decode", b'{"z": [0, 0, "a", 0]}', 400, "finite numbers"),
             ("/decode", b"z=1,2,3,4", 400, "send JSON"),
             ("/decode", b"0" * (65 * 1024), 413, "over 65,536 bytes"),
             ("/encode", b"GIF89a this is not an image", 400, "cannot read the upload as an image"),
             ("/encode", b"\0" * (4 * 2 ** 20 + 1), 413, "over 4,194,304 bytes"),
             ("/example?i=16", None, 400, "i must be 0 to 15"),
             ("/../../etc/passwd", None, 404, "no such page"),
             ("/%2e%2e/infer_onnx.py", None, 404, "no such page"),
             ("/decoder.onnx", None, 404, "no such page")]
    for path, body, status, message in cases:
        got, kind, answer = http(url, path, body)
        assert (got, kind) == (status, "text/plain; charset=utf-8"), (path, got, answer)
        assert message in answer.decode() and len(answer.decode().strip().splitlines()) == 1, answer
        assert http(url, "/decode", good)[0] == 200  # still serving
    # concurrent requests each get their own image
    from concurrent.futures import ThreadPoolExecutor
    decoder = onnx_tool.Decoder(exported[0] / "decoder.onnx")
    codes = [[i / 4, -i / 8, 1.0, 0.0] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda z: http(url, "/decode", json.dumps({"z": z}).encode()), codes))
    for z, (status, _, png) in zip(codes, answers):
        assert status == 200 and np.array_equal(png_pixels(png), decoded_png(decoder, z))


def test_explorer_refuses_bad_flags_and_a_busy_port_in_one_line(exported):
    import socket
    out, _ = exported
    model = ["explore", "--model", out / "decoder.onnx"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["--port", "99999"], "--port must be 0 to 65535"), (["--range", "20"], "--range must be > 0 and <= 10"),
                 (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                 (["--encoder", out / "best.pt"], "is not a usable ONNX model")]
        for flags, message in cases:
            assert_one_line_error(run_script("infer_onnx.py", *model, *flags), message)


def browser_or_fail():
    """Debian's chromium and Playwright: a test without them is skipped with the reason, and fails in CI
    (.ci/run sets CI and installs both)."""
    path = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [name for name, found in (("chromium (apt-get install -y chromium)", path),
                                        ("playwright (pip install -r requirements.txt)", sync_playwright)) if not found]
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the browser test needs {' and '.join(missing)}")
    return path, sync_playwright


def test_explorer_in_a_real_browser_moves_a_slider_and_shows_the_decoders_image(explorer, exported):
    path, sync_playwright = browser_or_fail()
    url, _ = explorer
    decoder = onnx_tool.Decoder(exported[0] / "decoder.onnx")
    idle = "() => window.explorer.shownZ !== null && !window.explorer.inFlight && !window.explorer.queued"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function(idle)  # it starts at the first example's code
            before = page.get_attribute("#decoded", "src")
            dim = json.loads(http(url, "/info")[2])["sliders"][0]["dim"]
            page.fill(f"#dim{dim}", "2.5")
            page.wait_for_function(f"() => ({idle})() && window.explorer.shownZ[{dim}] === 2.5")
            after = page.get_attribute("#decoded", "src")
            assert after != before and after.startswith("data:image/png;base64,")
            z = page.evaluate("() => window.explorer.shownZ")
            assert np.array_equal(png_pixels(__import__("base64").b64decode(after.split(",")[1])), decoded_png(decoder, z))
            assert page.text_content("#status").startswith("decoded in")
            # the random button draws from the prior N(0, I); the page's sampler has its moments
            page.click("#random")
            page.wait_for_function(f"() => ({idle})() && window.explorer.shownZ[{dim}] !== 2.5")
            draws = np.array(page.evaluate("() => Array.from({ length: 40000 }, gaussian)"))
            assert draws.mean() == pytest.approx(0, abs=0.03) and draws.var() == pytest.approx(1, abs=0.03)
            assert (draws ** 4).mean() / draws.var() ** 2 == pytest.approx(3.0, abs=0.1)
        finally:
            browser.close()


def test_onnx_pictures_match_pytorch_pictures(exported, tmp_path, capsys):
    out, _ = exported
    assert cli_in_process(capsys, "traverse", "--checkpoint", out / "best.pt", "--prior", "--dims", "2", "--steps", "3",
                   "--out", tmp_path / "torch.png").returncode == 0
    assert run_script("infer_onnx.py", "traverse", "--model", out / "decoder.onnx", "--dims", "2", "--steps", "3",
                      "--out", tmp_path / "onnx.png").returncode == 0
    a = np.asarray(png(tmp_path / "torch.png"), dtype=np.int16)
    b = np.asarray(png(tmp_path / "onnx.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # same layout, labels and pixels up to rounding


def test_same_seed_same_samples(exported, tmp_path):
    out, _ = exported
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        result = run_script("infer_onnx.py", "sample", "--model", out / "decoder.onnx", "--n", "4", "--seed", seed,
                            "--out", tmp_path / f"{name}.png")
        assert result.returncode == 0, result.stderr
    read = [(tmp_path / f"{name}.png").read_bytes() for name in "abc"]
    assert read[0] == read[1] and read[0] != read[2]


def test_model_without_metadata_needs_latent_dim(exported, tmp_path):
    import onnx
    out, _ = exported
    bare = onnx.load(str(out / "decoder.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    result = run_script("infer_onnx.py", "sample", "--model", tmp_path / "bare.onnx", "--out", tmp_path / "s.png")
    assert_one_line_error(result, "has no betavae metadata: pass --latent-dim")
    result = run_script("infer_onnx.py", "traverse", "--model", tmp_path / "bare.onnx", "--latent-dim", "4",
                        "--steps", "3", "--out", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    w, h = grid_size(3, 4)  # no KL known: every dim, in index order
    assert png(tmp_path / "t.png").size == (w + LABEL_WIDTH, h + HEADER_HEIGHT)
    result = run_script("infer_onnx.py", "sample", "--model", tmp_path / "bare.onnx", "--latent-dim", "5")
    assert_one_line_error(result, "takes 4-dim codes, not 5")


def test_onnx_tools_reject_bad_input(exported, tmp_path, capsys):
    import onnxruntime as ort
    out, _ = exported
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "notes.png").write_text("not an image")
    rgb = bv.BetaVAE(latent_dim=4, channels=3).eval()  # an encoder for colour images
    import export
    export.export_module(rgb.encoder, torch.rand(2, 3, 64, 64), tmp_path / "rgb_encoder.onnx", "image",
                         ["mu", "logvar"], 18)
    model = ["--model", out / "decoder.onnx"]
    cases = [
        (["sample", "--model", tmp_path / "notes.txt"], "is not a usable ONNX model"),
        (["sample", "--model", tmp_path / "missing.onnx"], "no model at"),
        (["sample", *model, "--n", "0"], "--n must be >= 1"),
        (["traverse", *model, "--dims", "5"], "the model has 4 latent dims"),
        (["traverse", *model, "--encoder", out / "encoder.onnx", "--image", tmp_path / "notes.png"], "cannot read"),
        (["traverse", *model, "--image", tmp_path / "notes.png"], "--image needs --encoder"),
        (["interpolate", *model, "--encoder", tmp_path / "rgb_encoder.onnx", "--images", "a.png", "b.png"],
         "takes 3x64x64 images but the decoder makes 1x64x64"),
    ]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append((["sample", *model, "--device", "cuda"], "needs onnxruntime-gpu"))
    for args, message in cases:
        assert_one_line_error(run_script("infer_onnx.py", *args, "--out", tmp_path / "x.png"), message)
    assert_one_line_error(cli_in_process(capsys, "--checkpoint", tmp_path / "notes.txt", main=export.main),
                          "not a PyTorch checkpoint")


# ---------------------------------------------------------------------------------------------------
# Disentanglement metrics: analytic cases with known answers

def factor_grid(sizes):
    """Every combination of factor classes once: the factors are exactly independent."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, len(sizes))


def binned_entropy_ratio(size, bins=20):
    """H(factor after 20 equal-width bins over 0..size-1) / H(factor), for a uniform factor, by hand."""
    width = (size - 1) / bins
    counts = np.bincount([min(int(v // width), bins - 1) for v in range(size)])
    p = counts[counts > 0] / size
    return float(-(p * np.log(p)).sum() / np.log(size))


def test_mig_of_perfect_codes_is_the_binned_entropy_ratio():
    sizes = (4, 40, 32)  # no bin edge falls on a factor value, so the tiny noise never changes a bin
    factors = factor_grid(sizes)
    codes = factors + np.random.default_rng(0).normal(0, 1e-6, factors.shape)
    expected = np.mean([binned_entropy_ratio(s) for s in sizes])  # 20 bins merge neighbouring values
    assert 0.5 < expected < 1
    assert metrics.mig(codes, factors) == pytest.approx(expected, abs=1e-9)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    assert metrics.mig(codes @ rotation, factors) < expected - 0.3
    assert metrics.mig(np.random.default_rng(2).normal(size=codes.shape), factors) < 0.02
    copied = np.concatenate([codes, codes[:, 1:2]], axis=1)  # factor 1 in two dims: its gap closes
    top = np.sort(metrics.mutual_information(copied, factors), axis=0)[::-1]
    assert top[0, 1] - top[1, 1] == pytest.approx(0, abs=1e-9)
    gaps = [binned_entropy_ratio(4), 0, binned_entropy_ratio(32)]
    assert metrics.mig_per_factor(copied, factors) == pytest.approx(gaps, abs=1e-9)  # the copied factor's gap alone closes
    assert metrics.mig(copied, factors) == pytest.approx(np.mean(gaps))


def test_each_dim_is_labelled_with_the_factor_it_carries():
    sizes = (4, 40, 32)
    factors = factor_grid(sizes)
    rng = np.random.default_rng(0)
    # dim 0 holds factor 2, dim 1 factor 0, dim 2 is noise, dim 3 holds factor 1 and a little of factor 0
    codes = np.stack([factors[:, 2], factors[:, 0], rng.normal(size=len(factors)),
                      factors[:, 1] + 0.01 * factors[:, 0]], axis=1) + rng.normal(0, 1e-6, (len(factors), 4))
    labels = metrics.dim_factors(codes, factors, ("a", "b", "c"))
    assert [name for name, _ in labels[:2]] == ["c", "a"] and labels[3][0] == "b"
    assert [score for _, score in labels[:2]] == pytest.approx([binned_entropy_ratio(32), binned_entropy_ratio(4)],
                                                                abs=1e-9)
    assert labels[2][1] < 0.02  # noise informs no factor


def test_traversal_labels_name_the_factor_and_the_kl():
    rows, columns = bv.traversal_labels([(3, 1.234), (0, None)], np.array([-1.0, 1.0]),
                                        [["pos_x", 0.5], ["shape", 0.1], ["x", 0], ["scale", 0.714]])
    assert rows == ["dim 3 · scale 0.71\n1.23 nats", "dim 0 · pos_x 0.50"] and columns == ["-1.0", "+1.0"]
    assert bv.traversal_labels([(3, 1.234)], np.array([0.0]))[0] == ["dim 3\n1.23 nats"]


def test_metrics_rank_perfect_rotated_and_noise_codes():
    rng = np.random.default_rng(0)
    sizes = (3, 4, 5)
    factors = metrics.sample_factors(sizes, 600, rng)
    perfect = factors + rng.normal(0, 0.01, factors.shape)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    noise = rng.normal(size=factors.shape)
    scores, held = {}, {}
    for name, codes in [("perfect", perfect), ("rotated", perfect @ rotation), ("noise", noise)]:
        d = metrics.dci(codes, factors)
        held[name] = d["informativeness_per_factor"]
        scores[name] = [metrics.mig(codes, factors), d["disentanglement"], d["completeness"],
                        metrics.modularity(codes, factors), d["informativeness"]]
    assert scores["perfect"][1:3] == pytest.approx([1, 1], abs=0.02)
    assert scores["perfect"][3] > 0.98 and scores["perfect"][4] > 0.95
    for p, r, n in zip(scores["perfect"][:4], scores["rotated"][:4], scores["noise"][:4]):
        assert p > r + 0.05 and p > n + 0.05
    # informativeness measures information, not its layout: a rotation keeps it, noise has none
    assert scores["rotated"][4] > 0.8 and scores["noise"][4] < 0.5
    assert scores["noise"][0] < 0.05 and max(scores["noise"][1:3]) < 0.1
    # per factor: the perfect code holds every factor, noise none above its chance (1/3, 1/4, 1/5) by much
    assert min(held["perfect"]) > 0.95 and np.mean(held["perfect"]) == pytest.approx(scores["perfect"][4])
    assert all(accuracy < 1 / size + 0.15 for accuracy, size in zip(held["noise"], sizes))


def test_modularity_counts_a_code_informing_two_factors_as_zero():
    factors = factor_grid((2, 2)).repeat(25, axis=0)  # balanced binary factors
    mixed = 2 * factors[:, 0] + factors[:, 1]  # one dim knows both factors equally
    codes = np.stack([mixed, factors[:, 0]], 1).astype(float)  # the other knows only factor 0
    assert metrics.modularity(codes, factors) == pytest.approx(0.5, abs=1e-9)


def test_sap_gap_is_exact_for_binary_factors():
    factors = np.tile(factor_grid((2, 2)), (25, 1))  # every block of 4 rows is balanced, test rows too
    codes = factors + np.random.default_rng(0).normal(0, 0.01, factors.shape)
    # each dim predicts its own factor perfectly and the other at chance (exactly 0.5 on balanced rows)
    assert metrics.sap(codes, factors) == pytest.approx(0.5, abs=1e-9)
    assert metrics.sap(codes[:, ::-1].copy(), factors) == pytest.approx(0.5, abs=1e-9)
    assert metrics.sap(np.repeat(codes[:, :1], 2, axis=1), factors) == pytest.approx(0, abs=1e-9)


def test_beta_vae_and_factor_vae_scores():
    sizes = (3, 6, 10, 8, 8)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))[0]
    noise_rng = np.random.default_rng(2)
    cases = {"perfect": lambda f: f + noise_rng.normal(0, 0.01, f.shape),
             "rotated": lambda f: (f + noise_rng.normal(0, 0.01, f.shape)) @ rotation,
             "noise": lambda f: noise_rng.normal(size=f.shape)}
    scores = {name: (metrics.beta_vae_score(rep, sizes, np.random.default_rng(0), 300, 150),
                     metrics.factor_vae_score(rep, sizes, np.random.default_rng(0), 300, 150, n_variance=1000))
              for name, rep in cases.items()}
    assert scores["perfect"] == (1.0, 1.0)
    assert max(scores["rotated"]) < 0.95
    assert max(scores["noise"]) < 0.35  # chance is 1/5
    constant = metrics.factor_vae_score(lambda f: np.zeros(f.shape), sizes, np.random.default_rng(0), 10, 10)
    assert constant == 0.0  # every dim pruned


def test_metrics_on_a_labelled_subset_draw_from_the_images_it_holds():
    sizes = (3, 6, 10, 8, 8)
    grid = factor_grid(sizes)
    held = grid[np.sort(np.random.default_rng(7).choice(len(grid), 7000, replace=False))]  # 61 % of the grid
    sampler = metrics.FactorSampler(sizes, held)
    rng = np.random.default_rng(0)
    keys = {tuple(row) for row in held.tolist()}
    drawn = sampler.draw(500, rng)
    ks, values = rng.integers(5, size=500), rng.integers(0, 3, size=500)
    fixed = sampler.fix(drawn, ks, values, rng)
    assert all(tuple(row) in keys for row in np.concatenate([drawn, fixed]).tolist())  # only what the file holds
    assert np.array_equal(fixed[np.arange(500), ks], values)  # each with its fixed factor's value
    perfect = lambda f: f + np.random.default_rng(1).normal(0, 0.01, f.shape)
    assert metrics.beta_vae_score(perfect, sampler, np.random.default_rng(0), 300, 150) == 1.0
    assert metrics.factor_vae_score(perfect, sampler, np.random.default_rng(0), 300, 150, n_variance=1000) == 1.0
    assert metrics.FactorSampler(sizes, grid).held is None  # a file with the whole grid is sampled as the grid
    few = metrics.FactorSampler(sizes, held[:500])  # about 60 images per position value: too few for a batch of 64
    with pytest.raises(bv.UserError, match="too few"):
        metrics.beta_vae_score(perfect, few, np.random.default_rng(0), 10, 5)


def test_evaluate_scores_a_labelled_dsprites_subset(tmp_path, capsys):
    rows = np.sort(np.random.default_rng(3).choice(192, 90, replace=False))  # 90 of the 192 combinations
    write_fake_dsprites(tmp_path / real_datasets.DSPRITES_FILE, rows=rows)
    assert train_in_process(tmp_path / "run", "--epochs", "1", "--dataset", "dsprites", "--data-dir", tmp_path,
                            "--val-size", "22") == 0
    result = cli_in_process(capsys, "evaluate", "--checkpoint", tmp_path / "run/best.pt", "--metrics", "mig,sap,modularity,dci",
                     "--n", "200", "--out", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    assert "note: factors drawn from the 90 images the file holds (of 192" in result.stdout
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["factors_drawn_from"].startswith("the 90 images") and 0 <= scores["mig"] <= 1
    held = scores["dci_informativeness_per_factor"]  # per factor, by name, printed as evaluate shows it
    assert list(held) == list(scores["mig_per_factor"]) and "held per factor" in result.stdout
    assert np.mean(list(held.values())) == pytest.approx(scores["dci_informativeness"])
    assert_one_line_error(cli_in_process(capsys, "evaluate", "--checkpoint", tmp_path / "run/best.pt", "--metrics", "factor_vae",
                                  "--n", "200", "--points", "10", "5"), "too few for the beta-VAE and FactorVAE")


def test_evaluate_cli_writes_metrics_and_repeats(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    args = ["evaluate", "--checkpoint", out / "best.pt", "--n", "100", "--points", "20", "10",
            "--metrics", "mig,sap,modularity,beta_vae,factor_vae"]
    first = cli_in_process(capsys, *args, "--out", tmp_path / "a.json")
    assert first.returncode == 0, first.stderr
    second = cli_in_process(capsys, *args, "--out", tmp_path / "b.json")
    assert second.returncode == 0, second.stderr
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    keys = {"mig", "sap", "modularity", "beta_vae_score", "factor_vae_score", "val_recon", "val_kl", "active_dims",
            "kl_per_dim", "shape_accuracy"}
    assert keys <= set(a)
    a.pop("seconds"), b.pop("seconds")
    assert a == b  # the same seed repeats exactly
    assert all(0 <= a[k] <= 1 for k in keys - {"val_recon", "val_kl", "active_dims", "kl_per_dim"})
    assert "mig" in first.stdout and str(tmp_path / "a.json") in first.stdout
    assert list(a["mig_per_factor"]) == list(bv.FACTOR_NAMES)  # each shapes factor's gap, by name
    assert np.mean(list(a["mig_per_factor"].values())) == pytest.approx(a["mig"])
    assert "MIG per factor" in first.stdout and "pos_x" in first.stdout
    # the accuracy of each shape present among the validation images: their mean, weighted by count, is the whole's
    data, items = bv.base_items(bv.make_datasets(bv.load_checkpoint(out / "best.pt")[1])[1])
    counts = np.bincount(data.factors(measure.spread(items, 2000))[:, 0].numpy(), minlength=3)
    per_shape = a["shape_accuracy_per_shape"]
    assert list(per_shape) == [name for name, c in zip(measure.SHAPE_NAMES, counts) if c]
    assert sum(per_shape[name] * c for name, c in zip(measure.SHAPE_NAMES, counts) if c) / counts.sum() == \
        pytest.approx(a["shape_accuracy"])
    assert "shape accuracy per shape" in first.stdout


def test_shape_accuracy_counts_outlines_not_area_or_centroid():
    factors = bv.Shapes().factors(torch.arange(0, 737_280, 3_001)[:240])  # 80 or so of each shape
    images, shapes = bv.render_shapes(factors)[:, 0].numpy(), factors[:, 0].numpy()
    candidates, corners = measure.shape_candidates(factors)
    assert metrics.shape_hits(images, candidates, corners, shapes).all()  # the identity reconstruction scores 1
    other = factors.clone()
    other[:, 0] = (other[:, 0] + 1) % 3  # every sprite drawn as the next shape: 0
    assert not metrics.shape_hits(bv.render_shapes(other)[:, 0].numpy(), candidates, corners, shapes).any()
    moved = np.roll(images, (2, -2), axis=(1, 2))  # shifted by 2 pixels: still its shape
    assert metrics.shape_hits(moved, candidates, corners, shapes).all()
    # a round blob of the sprite's area and centroid: about chance (1/3), where the true factors alone would
    # give the shape away through them
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    discs = np.stack([(ys - ys[m].mean()) ** 2 + (xs - xs[m].mean()) ** 2 <= m.sum() / np.pi
                      for m in images > 0.5]).astype(np.float32)
    assert 0.2 < metrics.shape_hits(discs, candidates, corners, shapes).mean() < 0.5
    # the images scored: about a third of each shape among the shapes' 5,000 validation images (sorted by grid
    # index, whose slowest factor is the shape: the first 2,000 held no heart)
    data, items = bv.base_items(bv.make_datasets(parse_train())[1])
    assert np.bincount(data.factors(measure.spread(items, 2000))[:, 0].numpy(), minlength=3).min() > 600
    # ... the same images in the validation loader's shuffled order: the score does not depend on the order
    assert np.array_equal(measure.spread(np.random.default_rng(0).permutation(items), 2000), measure.spread(items, 2000))


def test_a_metric_scores_the_same_alone_or_among_the_others():
    sizes = (3, 6, 10, 8, 8)
    rep = lambda f: f + np.sin(7.0 * np.arange(f.size).reshape(f.shape))  # deterministic "noise"
    every = metrics.disentanglement_metrics(rep, sizes, n=300, seed=3, points=(30, 15))
    assert set(every) == set(metrics.METRIC_NAMES) | {"mig_per_factor", "dci_informativeness_per_factor"}
    assert len(every["mig_per_factor"]) == len(sizes) and np.mean(every["mig_per_factor"]) == pytest.approx(every["mig"])
    for group, keys in [("mig", ["mig", "mig_per_factor"]), ("factor_vae", ["factor_vae_score"]),
                        ("beta_vae", ["beta_vae_score"])]:
        assert metrics.disentanglement_metrics(rep, sizes, n=300, seed=3, points=(30, 15), groups=(group,)) == \
            {key: every[key] for key in keys}
    assert metrics.metric_groups("factor_vae,mig") == ("mig", "factor_vae")


def test_the_code_table_encodes_each_combination_once_and_changes_no_metric(capsys):
    sizes, weights = (3, 6, 10, 8, 8), np.array([1.0, 0.5, 0.1, 2.0, 3.0])
    code = lambda f: (f * weights + np.cos(f @ [1, 3, 7, 11, 13])[:, None]).astype(np.float32)  # a function of the row
    batches = []
    table = metrics.CodeTable(lambda f: batches.append(len(f)) or code(f), sizes, batch=100,
                              progress=metrics.Progress())
    drawn = 300 + 45 * 64 * 2 + 300 + 45 * 64  # MIG; the beta-VAE pairs (a call per side: 30 * 64); FactorVAE
    groups = ("mig", "modularity", "beta_vae", "factor_vae")  # SAP and DCI read the same codes as MIG
    assert metrics.disentanglement_metrics(table, sizes, 300, 3, (30, 15), groups, table.progress) == \
        metrics.disentanglement_metrics(lambda f: code(f).astype(np.float64), sizes, 300, 3, (30, 15), groups)
    assert sum(batches) == table.known.sum() < min(drawn, np.prod(sizes)) and max(batches) <= 100  # each once
    shown = capsys.readouterr().out
    for group in groups:
        assert re.search(rf"^  {group}: \d+ s$", shown, re.M)  # each metric as it ends
    assert re.search(r"beta_vae: encoded [\d,]+/[\d,]+ new images of 1,920 drawn, \d+ s left", shown)


def test_evaluate_computes_only_the_metrics_asked_for(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    result = cli_in_process(capsys, "evaluate", "--checkpoint", out / "best.pt", "--n", "100", "--points", "10", "5",
                     "--metrics", "mig,factor_vae", "--out", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "m.json").read_text())
    assert "mig" in scores and "factor_vae_score" in scores and "sap" not in scores and "dci_completeness" not in scores
    bad = cli_in_process(capsys, "evaluate", "--checkpoint", out / "best.pt", "--metrics", "mig,gap")
    assert bad.returncode == 2 and "choose from mig,sap" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_every_adds_the_metrics_to_history_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(bv, "EVAL_EVERY_SAMPLE", {"n": 60, "points": (10, 5)})  # tiny, for speed
    assert train_in_process(tmp_path / "run", "--epochs", "2", "--eval-every", "2") == 0
    rows = list(csv.DictReader(open(tmp_path / "run/history.csv")))
    assert set(metrics.SCORE_NAMES) <= set(rows[0])
    assert rows[0]["mig"] == "" and all(0 <= float(rows[1][m]) <= 1 for m in metrics.SCORE_NAMES)
    assert png(tmp_path / "run/loss_curves.png").size == (880, 1440)  # a sixth row: the metrics
    bv.main(["plot", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "plot.png")])
    assert png(tmp_path / "plot.png").size == (880, 1440)


# ---------------------------------------------------------------------------------------------------
# Real data from local files (fixtures written by the tests; nothing is downloaded)

def write_fake_dsprites(path, with_colour=True, rows=None):
    """An npz in the official layout: imgs (N, 64, 64) uint8, latents_classes (N, 6), latents_values,
    and metadata (a pickled dict, as in DeepMind's file, which the loader must never unpickle)."""
    sizes = (1, 3, 2, 2, 4, 4)  # colour never varies, as in dSprites
    classes = factor_grid(sizes)
    images = (np.random.default_rng(0).random((len(classes), 64, 64)) > 0.9).astype(np.uint8)
    if rows is not None:
        classes, images = classes[rows], images[rows]
    if not with_colour:
        classes = classes[:, 1:]
    np.savez(path, imgs=images, latents_classes=classes, latents_values=classes.astype(float),
             metadata=np.array({"description": "fake"}, dtype=object))
    return images, classes


def write_idx(path, array):
    """An uncompressed IDX file, as torchvision's MNIST reads from MNIST/raw/."""
    import struct
    code = 0x08  # unsigned byte
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_fake_mnist(root, folder="MNIST"):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 40), ("t10k", 12)]:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))


def write_image_folder(root):
    from PIL import Image
    (root / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "nested" / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)).save(root / "nested" / "deeper" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(root / "tall.bmp")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image at all")


def test_dsprites_npz_loads_with_its_factors(tmp_path):
    images, classes = write_fake_dsprites(tmp_path / real_datasets.DSPRITES_FILE)
    ds = real_datasets.DSprites(tmp_path / real_datasets.DSPRITES_FILE)
    assert ds.factor_names == ("shape", "scale", "orientation", "pos_x", "pos_y")  # colour dropped
    assert ds.factor_sizes == (3, 2, 2, 4, 4) and len(ds) == 192 and ds.channels == 1
    assert torch.equal(ds[17][0], torch.from_numpy(images[17]).float())
    assert ds.factors([17]).tolist() == [classes[17, 1:].tolist()]
    batch = ds.__getitems__([3, 100])
    assert torch.equal(batch[1], ds[100])
    assert torch.equal(ds.render(ds.factors([100, 3])), torch.stack([ds[100], ds[3]]))


def test_dsprites_subset_without_colour_loads(tmp_path):
    rows = np.sort(np.random.default_rng(3).choice(192, 150, replace=False))  # fewer rows, colour removed
    images, classes = write_fake_dsprites(tmp_path / "subset.npz", with_colour=False, rows=rows)
    ds = real_datasets.DSprites(tmp_path / "subset.npz")
    assert ds.factor_sizes == (3, 2, 2, 4, 4) and len(ds) == 150
    assert torch.equal(ds[5][0], torch.from_numpy(images[5]).float())
    assert torch.equal(ds.render(classes[[7]]), ds[7][None])
    dropped = factor_grid((3, 2, 2, 4, 4))[np.setdiff1d(np.arange(192), rows)[:1]]
    with pytest.raises(bv.UserError, match="lacks some factor combinations"):
        ds.render(dropped)


def test_mnist_idx_files_load_in_torchvision_layout(tmp_path):
    write_fake_mnist(tmp_path)
    cfg = bv.Config(dataset="mnist", data_dir=str(tmp_path))
    train, val = bv.make_datasets(cfg)
    assert (len(train), len(val), cfg.channels) == (40, 12, 1)  # the official test split validates
    x = train.__getitems__([0, 1])
    assert x[0].shape == (1, 64, 64) and 0 <= x[0].min() and x[0].max() <= 1


def test_image_folder_skips_and_reports_broken_files(tmp_path, capsys):
    write_image_folder(tmp_path)
    ds = real_datasets.ImageFiles(tmp_path)
    assert sorted(p.name for p in ds.files) == ["grey.png", "photo.jpg", "tall.bmp", "wide.png"]
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and "skipped 1 unreadable image" in warning[0] and "broken.png" in warning[0]
    assert ds.channels == 3 and all(ds[i].shape == (3, 64, 64) for i in range(len(ds)))
    grey = tmp_path / "nested" / "deeper"
    assert real_datasets.ImageFiles(grey).channels == 1  # every image grey: one channel


def test_missing_or_empty_data_gives_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [(["--dataset", "folder", "--data-dir", tmp_path / "empty"], "no readable image"),
             (["--dataset", "folder", "--data-dir", tmp_path / "missing"], "is not a folder"),
             (["--dataset", "dsprites", "--data-dir", tmp_path], "add --download to fetch it"),
             (["--dataset", "mnist", "--data-dir", tmp_path], "train-images-idx3-ubyte"),
             (["--dataset", "fashion-mnist", "--data-dir", tmp_path], "FashionMNIST/raw"),
             (["--dataset", "celeba", "--data-dir", tmp_path], "place them there by hand")]
    for flags, message in cases:
        assert_one_line_error(cli_in_process(capsys, "train", *TINY, "--out", tmp_path / "run", *flags), message)


def test_train_one_tiny_epoch_on_each_local_dataset(tmp_path, capsys):
    write_fake_dsprites(tmp_path / real_datasets.DSPRITES_FILE)
    write_fake_mnist(tmp_path)
    write_fake_mnist(tmp_path, "FashionMNIST")
    write_image_folder(tmp_path / "pictures")
    for name, data_dir, channels in [("dsprites", tmp_path, 1), ("mnist", tmp_path, 1),
                                     ("fashion-mnist", tmp_path, 1), ("folder", tmp_path / "pictures", 3)]:
        out = tmp_path / f"run-{name}"
        code = train_in_process(out, "--epochs", "1", "--dataset", name, "--data-dir", data_dir, "--val-size", "2")
        assert code == 0, name
        model, cfg = bv.load_checkpoint(out / "best.pt")
        assert cfg.channels == channels and cfg.dataset == name
    result = cli_in_process(capsys, "traverse", "--checkpoint", tmp_path / "run-folder/best.pt", "--index", "1", "--dims", "2",
                     "--out", tmp_path / "t.png")  # figures read the checkpoint's dataset again
    assert result.returncode == 0, result.stderr
    result = cli_in_process(capsys, "evaluate", "--checkpoint", tmp_path / "run-dsprites/best.pt", "--n", "100",
                     "--points", "10", "5", "--out", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    assert "mig" in json.loads((tmp_path / "m.json").read_text())


def test_loader_workers_give_the_same_training(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "pictures")
    common = ["--epochs", "1", "--dataset", "folder", "--data-dir", tmp_path / "pictures", "--val-size", "1"]
    for workers in (0, 2):
        monkeypatch.setattr(bv, "loader_workers", lambda cfg: workers)
        assert train_in_process(tmp_path / f"w{workers}", *common) == 0
    assert_same_weights(weights(tmp_path / "w0/last.pt"), weights(tmp_path / "w2/last.pt"))


def test_bench_reports_every_rate(tmp_path, capsys):
    write_image_folder(tmp_path / "pictures")
    for flags in [["--dataset", "folder", "--data-dir", tmp_path / "pictures"], []]:
        result = cli_in_process(capsys, "--batch-size", "4", "--latent-dim", "4", "--steps", "1", "--repeats", "1",
                                "--json", tmp_path / "bench.json", *flags, main=bench.main)
        assert result.returncode == 0, result.stderr
        rates = json.loads((tmp_path / "bench.json").read_text())["img_per_s"]
        assert set(rates) == {"data loader", "train step, data included", "train step, data in memory",
                              "plain loop, data in memory", "fp32 step, data in memory", "encoder (eval, batch 256)",
                              "decoder (eval, batch 256)"}
        assert all(rate > 0 for rate in rates.values())
        numbers = json.loads((tmp_path / "bench.json").read_text())
        peaks = numbers["matmul_peak_gflop_per_s"]
        assert numbers["gflop_per_s"] > 0 and set(peaks) == {"fp32", "bf16"} and min(peaks.values()) > 0
        assert numbers["precision"] == ("bf16" if numbers["bf16_native"] else "fp32")  # auto: bf16 where native
        assert "loader / full step" in result.stdout and "full step / plain loop" in result.stdout
    # --width 2 doubles every hidden layer's channels: about 4x the FLOPs of the shapes' step (c_in x c_out a layer)
    one = numbers["gflop_per_image"]
    result = cli_in_process(capsys, "--batch-size", "4", "--latent-dim", "4", "--steps", "1", "--repeats", "1",
                            "--width", "2", "--json", tmp_path / "bench.json", main=bench.main)
    assert result.returncode == 0 and "broadcast network at 2x the width" in result.stdout, result.stderr
    assert 3 < json.loads((tmp_path / "bench.json").read_text())["gflop_per_image"] / one < 4


def test_bench_options_are_timed_in_turns_against_the_plain_loop(tmp_path, monkeypatch):
    order = []
    seconds = bench.time_in_turns({name: lambda name=name: order.append(name) for name in "abc"}, repeats=2)
    assert order == list("abc") * 5 and set(seconds) == set("abc")  # 3 warm-up rounds, 2 timed, each in turn
    # every option but torch.compile (a minute of compiling) through the command line
    monkeypatch.setattr(bench, "STEP_OPTIONS", {k: v for k, v in bench.STEP_OPTIONS.items() if "compile" not in v})
    bench.main(["--options", "--batch-size", "4", "--latent-dim", "4", "--steps", "1", "--repeats", "1",
             "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    rates = json.loads((tmp_path / "bench.json").read_text())["options_img_per_s"]
    assert set(rates) == {"plain loop", "channels_last", "fused Adam", "bf16 autocast",
                          "channels_last, fused Adam, bf16"}
    assert all(rate > 0 for rate in rates.values())


def test_export_bench_compares_onnxruntime_with_pytorch(tiny_run, tmp_path):
    out, _ = tiny_run
    result = run_script("export.py", "--checkpoint", out / "best.pt", "--out", tmp_path / "decoder.onnx",
                        "--bench", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "onnxruntime" in line and "PyTorch eager" in line)
    assert header and "latency, batch 1" in result.stdout and "throughput, batch 64" in result.stdout


def one_step(bf16=False, channels_last=False):
    """(recon, KL, gradient) of one training step of a fixed model on fixed images with fixed noise."""
    x = bv.render_shapes(bv.Shapes().factors(torch.arange(8) * 91_111))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = bv.BetaVAE(latent_dim=4).to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.manual_seed(1)  # the same reparameterisation noise in every step
    settings = bv.loss_settings(bv.Config(latent_dim=4), 1)
    parts = bv.train_step(model, optimizer, x.contiguous(memory_format=fmt), settings, bf16)
    return parts["recon"].item(), parts["kl"].item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_channels_last_changes_a_step_by_float_noise_only():
    recon, kl, grads = one_step()
    recon2, kl2, grads2 = one_step(channels_last=True)
    assert recon2 == pytest.approx(recon, rel=1e-5) and kl2 == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert torch.allclose(grads2, grads, rtol=1e-3, atol=1e-3 * grads.abs().max().item())


def test_bf16_step_matches_float32_within_bfloat16_precision(tmp_path):
    (recon32, kl32, g32), (recon16, kl16, g16) = one_step(), one_step(bf16=True)
    assert recon16 == pytest.approx(recon32, rel=1e-2) and kl16 == pytest.approx(kl32, rel=5e-2, abs=1e-3)
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99  # the same descent direction
    # the flag trains, through an epoch whose last batch is smaller (20 = 16 + 4)
    assert train_in_process(tmp_path / "fast", "--epochs", "1", "--epoch-size", "20", "--precision", "bf16") == 0


def test_precision_auto_takes_bf16_only_where_the_device_computes_it(monkeypatch, tmp_path, capsys):
    cpu = torch.device("cpu")
    for flags, native in (({"avx2": True}, False), ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags, raising=False)
        assert bv.native_bf16(cpu) is native and bv.uses_bf16("auto", cpu) is native
        assert bv.uses_bf16("fp32", cpu) is False and bv.uses_bf16("bf16", cpu) is True
    with pytest.raises(bv.UserError, match="--precision bf16 runs on the CPU or CUDA"):
        bv.uses_bf16("bf16", torch.device("mps"))
    # the start line names the precision; the optimiser is fused Adam on the CPU
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True}, raising=False)
    assert train_in_process(tmp_path / "run", "--epochs", "1", "--epoch-size", "8") == 0
    assert "device cpu, float32 |" in capsys.readouterr().out
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["config"]["precision"] == "auto" and state["optimizer"]["param_groups"][0]["fused"] is True


# ---------------------------------------------------------------------------------------------------
# Time to disentangle: per-dataset defaults and the study that chose them

def test_dataset_defaults_apply_unless_a_flag_overrides():
    assert set(bv.DATASET_DEFAULTS) == {"shapes", "dsprites"} and bv.DATASET_DEFAULTS["dsprites"] == bv.SPRITES
    defaults = bv.SPRITES
    cfg = parse_train("--dataset", "dsprites")
    assert all(getattr(cfg, name) == value for name, value in defaults.items())
    untouched = {f.name for f in bv.fields(bv.Config)} - set(defaults) - {"dataset"}
    assert all(getattr(cfg, name) == getattr(bv.Config(), name) for name in untouched)
    note = bv.describe_defaults(cfg, {"dataset"})
    assert note.startswith("dsprites defaults: ") and bv.SPRITES_WHY in note
    assert all(f"--{name.replace('_', '-')} " in note for name in defaults if defaults[name] != getattr(bv.Config(), name))
    # every flag still overrides, and a typed flag is not reported as a default
    choices = {f.name: f.metadata.get("choices") for f in bv.fields(bv.Config)}
    other = {name: next(c for c in choices[name] if c != value) if isinstance(value, str) else
             value * 2 if isinstance(value, float) else value + 3 for name, value in defaults.items()}
    overridden = parse_train(*[a for name, value in other.items() for a in (f"--{name.replace('_', '-')}", str(value))])
    assert all(getattr(overridden, name) == value for name, value in other.items())
    assert bv.describe_defaults(overridden, {"dataset", *other}) is None
    # the other datasets train with the tutorial's settings, and say nothing about defaults
    mnist = parse_train("--dataset", "mnist")
    assert mnist == bv.Config(dataset="mnist") and bv.describe_defaults(mnist, {"dataset"}) is None


def test_capacity_replaces_the_default_delay_and_a_run_inside_the_delay_says_it_trains_an_autoencoder(tmp_path, capsys):
    assert parse_train().kl_delay == bv.SPRITES["kl_delay"] == 16
    assert parse_train("--capacity", "20").kl_delay == 0  # not refused: the delay was the dataset's, not typed
    with pytest.raises(bv.UserError, match="pick one"):
        parse_train("--capacity", "20", "--kl-delay", "3")
    bv.main(["train", *TINY[:-2], "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "note: --kl-delay 16 covers all 1 epochs: this run trains an autoencoder" in out
    assert read_rows(tmp_path / "run/history.csv", "beta_eff") == [("0.0",)]
    bv.main(["train", *TINY, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run0")])
    assert "note: --kl-delay" not in capsys.readouterr().out


def parse_train(*flags):
    argv = ["train", *flags]
    args = bv.build_parser().parse_args(argv)
    args.given = bv.given_flags(argv)
    return bv.config_from_args(args)


def test_a_larger_batch_keeps_the_default_lr():
    assert parse_train().lr == parse_train("--batch-size", "512").lr == 5e-4  # shapes: 5e-4 at batch 64
    assert parse_train("--dataset", "mnist", "--batch-size", "128").lr == 1e-4  # the tutorial's, at 32
    assert parse_train("--batch-size", "256", "--lr", "3e-4").lr == 3e-4  # a typed lr wins


def test_train_prints_the_defaults_it_used(tmp_path, capsys):
    bv.main(["train", "--epoch-size", "16", "--batch-size", "16", "--val-size", "16", "--epochs", "1",
             "--device", "cpu", "--out", str(tmp_path / "run")])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("shapes defaults:"))
    assert line.startswith("shapes defaults: --latent-dim 10, --arch broadcast, --recon bce, --lr 0.0005, "
                           "--objective tc, --kl-delay 16 (the tutorial's: 128, tutorial, mse, 0.0001, kl, 0)")
    assert "--epochs" not in line and "--batch-size" not in line  # typed, so not defaults
    assert bv.SPRITES_WHY in line and "total correlation" in line
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["latent_dim"] == 10 and config["epochs"] == 1


def test_every_study_variant_is_a_valid_train_command():
    for variant, flags in study.STUDY_VARIANTS.items():
        flags = shlex.split(study.STUDY_BASE) + shlex.split(flags)
        cfg = parse_train(*flags)  # an unknown flag or a refused combination exits here
        # the last value typed wins, as on the command line: a variant changes what it names
        typed = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(len(flags) - 1)
                 if flags[i].startswith("--") and not flags[i + 1].startswith("--")}
        assert all(getattr(cfg, name) == type(getattr(cfg, name))(value) for name, value in typed.items()), variant
    # the base is the tutorial's settings, whatever the sprites' defaults
    assert all(getattr(parse_train(*shlex.split(study.STUDY_BASE)), name) == getattr(bv.Config(), name)
               for name in bv.SPRITES if name != "epochs")
    # and the study's last change, default-delay16, typed out, is the sprites' defaults
    default = parse_train(*shlex.split(study.STUDY_BASE), *shlex.split(study.STUDY_VARIANTS["default-delay16"]))
    assert all(getattr(default, name) == value for name, value in bv.SPRITES.items() if name != "epochs")


def test_study_runs_end_to_end_and_skips_finished_stages(tmp_path, capsys):
    args = ["--variants", "latent10", "--epochs", "2", "--eval-epochs", "1", "--jobs", "1",
            "--n", "100", "--points", "10", "5", "--common", "--epoch-size 64 --val-size 16 --batch-size 32",
            "--device", "cpu", "--out", tmp_path / "study"]
    result = cli_in_process(capsys, *args, main=study.main)  # its trainings and scorings run the command line
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "study/study.csv")))
    assert [(r["variant"], r["epoch"], r["images"]) for r in rows] == [("latent10", "1", "64"), ("latent10", "2", "128")]
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("mig", "factor_vae_score", "shape_accuracy"))
    assert [part.split("=")[0] for part in rows[0]["mig_per_factor"].split()] == list(bv.FACTOR_NAMES)
    assert float(rows[1]["minutes"]) > float(rows[0]["minutes"]) > 0
    assert json.loads((tmp_path / "study/latent10-seed0/config.json").read_text())["latent_dim"] == 10
    assert png(tmp_path / "study/study.png").size[0] > 0
    summary = json.loads((tmp_path / "study/summary.json").read_text())
    assert [s["variant"] for s in summary] == ["latent10"] and "latent10" in result.stdout
    # a rerun scores nothing again: every stage is on disk
    log = (tmp_path / "study/latent10-seed0/log.txt").read_text()
    assert log.count("$ betavae.py train") == 2 and log.count("--resume") == 1
    assert study.main([str(a) for a in args]) is None and (tmp_path / "study/latent10-seed0/log.txt").read_text() == log
    # --collect rewrites the table from the scored stages alone (a stopped study writes none), training nothing
    (tmp_path / "study/study.csv").unlink()
    study.main([str(a) for a in args] + ["--collect"])
    assert list(csv.DictReader(open(tmp_path / "study/study.csv"))) == [{**r, "threads": ""} for r in rows]
    assert (tmp_path / "study/latent10-seed0/log.txt").read_text() == log
    # a call for another seed tabulates the seeds earlier calls trained too, not those begun and not yet scored
    shutil.copytree(tmp_path / "study/latent10-seed0", tmp_path / "study/latent10-seed7")
    (tmp_path / "study/latent10-seed8").mkdir()
    (tmp_path / "study/latent10-seed8/config.json").write_text("{}")
    study.main([str(a) for a in args] + ["--collect", "--seeds", "7"])
    assert [r["seed"] for r in csv.DictReader(open(tmp_path / "study/study.csv"))] == ["7", "7", "0", "0"]
    # a stage the run trained past unscored (as after a call with another --eval-epochs) is not scored on a
    # later model: it is left out, and the run goes on from where it is
    assert study.stages_to_score(3, 1, trained=2, scored={2}) == [2, 3]
    assert study.stages_to_score(5, 2, trained=0, scored=set()) == [2, 4, 5]  # every 2 epochs and the last
    assert study.stages_to_score(5, 2, trained=4, scored={2}) == [2, 4, 5]  # 4 is the model on disk


def test_study_refuses_unknown_variants_and_an_empty_collection(tmp_path, capsys):
    for args, message in [(["--variants", "tutorial,fastest"], "unknown variant fastest"),
                          (["--variants", "tutorial", "--collect"], "no scored stages")]:
        with pytest.raises(SystemExit) as stop:
            study.main([*args, "--out", str(tmp_path / "none")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert list((tmp_path / "none").iterdir()) == []



def test_true_code_is_what_an_image_shows_of_the_factors():
    every = bv.Shapes().factors(torch.arange(len(bv.Shapes())))
    code = study.true_code(every)
    assert torch.equal(code[:, :3].argmax(1), every[:, 0]) and torch.all(code[:, :3].sum(1) == 1)
    standard = code[:, [3, 6, 7]]  # scale, x, y over the whole grid
    assert torch.allclose(standard.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(standard.std(0, unbiased=False), torch.ones(3), atol=1e-5)
    # a square a quarter turn on, an ellipse a half turn on: the same image and the same code; a heart a half
    # turn on is another image, at the opposite angle
    turned = torch.tensor([[0, 2, 3, 5, 7], [0, 2, 13, 5, 7], [1, 2, 3, 5, 7], [1, 2, 23, 5, 7],
                           [2, 2, 3, 5, 7], [2, 2, 23, 5, 7]])
    images, codes = bv.render_shapes(turned), study.true_code(turned)
    for a, b in [(0, 1), (2, 3)]:
        assert torch.allclose(codes[a], codes[b], atol=1e-5)
        assert (images[a] != images[b]).sum() <= 2  # up to rounding at the edge
    assert torch.allclose(codes[5, 4:6], -codes[4, 4:6], atol=1e-5) and (images[4] != images[5]).sum() > 20


def test_tc_angle_finds_a_turned_position_plane_and_the_estimate_is_lowest_on_the_axes(tiny_run, tmp_path, capsys):
    # x and y of grid points in dims 2 and 0, turned 12 degrees; dim 1 the scale; sharp posteriors
    factors = bv.Shapes().factors(torch.randint(737280, (2048,), generator=torch.Generator().manual_seed(0)))
    code = study.true_code(factors).double()
    codes = torch.stack([code[:, 7], code[:, 3], code[:, 6]], dim=1)  # y, scale, x
    codes = study.turned(codes, 2, 0, 12.0)
    a, b, turn = study.plane_turn(codes, code[:, 6:])
    assert {a, b} == {0, 2} and abs(turn) == pytest.approx(12.0, abs=1e-6)
    aligned = study.turned(codes, a, b, -turn)
    assert study.plane_turn(aligned, code[:, 6:])[2] == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(aligned[:, [a, b]].abs().sort(1).values, code[:, 6:].abs().sort(1).values, atol=1e-9)
    # the TC estimate is lowest with the plane on the axes (x and y independent), and rises as it turns
    logvar, noise = torch.full_like(codes, 2 * math.log(0.02)), torch.randn(codes.shape, dtype=torch.float64)
    tcs = [study.batch_tc(study.turned(aligned, a, b, degrees), logvar, noise, 256) for degrees in (0, 2, 10, 45)]
    assert tcs == sorted(tcs) and tcs[-1] - tcs[0] > 0.2
    # the command on a checkpoint prints the turn and a row per batch size that --n holds
    out, _ = tiny_run
    study.main(["--tc-angle", str(out / "best.pt"), "--n", "300"])
    printed = capsys.readouterr().out
    assert re.search(r"dims \d and \d hold x and y, turned -?\d+\.\d degrees off the axes", printed)
    assert re.search(r"batch   64: (-?\d+\.\d{3} / ){6}-?\d+\.\d{3} \| -?\d+\.\d{3}", printed)
    assert "batch  256:" in printed and "batch 1024" not in printed and "batch   64, sds x 16" in printed
    # a model of other data has no x/y plane to find: one line
    state = torch.load(out / "best.pt", weights_only=True)
    torch.save({**state, "config": {**state["config"], "dataset": "mnist"}}, tmp_path / "mnist.pt")
    with pytest.raises(SystemExit) as stop:
        study.main(["--tc-angle", str(tmp_path / "mnist.pt")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("model of mnist: --tc-angle needs one of the sprites with at "
                                                    "least 2 latent dims")
    with pytest.raises(SystemExit):
        study.main(["--tc-angle", str(out / "best.pt"), "--n", "10"])
    assert "needs --n of at least 64" in capsys.readouterr().err


def test_half_scores_of_perfect_halves_and_training_the_halves(capsys, monkeypatch):
    factors = bv.Shapes().factors(torch.arange(0, 737280, 7919))  # 94 points spread over the grid
    images, candidates = bv.render_shapes(factors), measure.shape_candidates(factors)
    perfect_encoder = lambda x: (study.true_code(factors), None)  # noqa: E731 (reads the factors, not x)
    perfect_decoder = SimpleNamespace(logits=lambda code: (2 * images - 1) * 30)  # draws every image exactly
    encoded = study.half_scores(perfect_encoder, "encoder", factors, images, candidates)
    assert encoded == {"shape accuracy": 1.0, "angle error (deg)": pytest.approx(0, abs=1e-3)}
    decoded = study.half_scores(perfect_decoder, "decoder", factors, images, candidates)
    assert decoded["shape accuracy"] == 1 and decoded["recon"] < 1e-6 * 4096
    # an encoder with the angle a quarter of the shape's own turn off is 90 / 45 / 22.5 degrees off
    off = study.true_code(factors)
    off[:, 4:6] = torch.stack([-off[:, 5], off[:, 4]], 1)  # the symmetric angle plus 90 degrees
    error = study.half_scores(lambda x: (off, None), "encoder", factors, images, candidates)["angle error (deg)"]
    assert error == pytest.approx(float(np.median(90 / study.SYMMETRY[factors[:, 0]].numpy())), abs=1e-3)
    # the best a decoder can do without the orientation: each pixel's loss is -log of the share of the 40
    # turned drawings that agree with the image there
    one = factors[:2]
    turned = bv.render_shapes(one.repeat_interleave(40, 0).index_put_((torch.arange(80), torch.tensor(2)),
                                                                       torch.arange(40).repeat(2)))
    agree = (turned.view(2, 40, -1) == bv.render_shapes(one).view(2, 1, -1)).double().mean(1)
    floor = study.blur_floor(one, bv.render_shapes(one), [2])
    assert floor == pytest.approx(-agree.log().sum().item() / 2, rel=1e-4) and floor > 5
    assert study.blur_floor(one, bv.render_shapes(one), [0, 2]) > floor
    # the command prints those floors, trains each half a few steps and prints its scores (on 50 of its 1,000
    # held points: the floors draw each point 160 times); too few images is one clear line
    assert len(study.held_factors()) == 1000
    monkeypatch.setattr(study, "held_factors", lambda: factors[:50])
    study.main(["--halves", "128", "--seeds", "0"])
    out = capsys.readouterr().out
    assert re.search(r"all but the orientation reaches at best recon \d+\.\d", out)
    assert re.search(r"decoder alone \|\s+128 images .* recon [0-9.]+ \| shape accuracy 0\.\d+", out)
    assert re.search(r"encoder alone \|\s+128 images .* shape accuracy 0\.\d+ \| angle error \(deg\) \d", out)
    with pytest.raises(SystemExit) as stop:
        study.main(["--halves", "10"])
    assert stop.value.code == 2 and "--halves must be at least one batch" in capsys.readouterr().err

# ---------------------------------------------------------------------------------------------------
# Several processes: torchrun with gloo on the CPU

def torchrun(*args):
    """Start `torchrun --nproc_per_node 2 betavae.py train ...` on the CPU; .result() waits for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                str(HERE / "betavae.py"), "train", *TINY, "--epoch-size", "64", "--device", "cpu",
                                *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def result():
        stdout, stderr = process.communicate(timeout=600)
        return SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)
    return SimpleNamespace(result=result)


def test_rank_batches_deal_equal_shares():
    batches = [[i] for i in range(7)]
    shares = [bv.rank_batches(batches, bv.Ranks(rank, 3)) for rank in range(3)]
    assert shares == [[[0], [3]], [[1], [4]], [[2], [5]]]  # 7 // 3 * 3 = 6 batches used, none twice
    with pytest.raises(bv.UserError, match="cannot feed 3 processes"):
        bv.rank_batches(batches[:2], bv.Ranks(0, 3))


def test_torchrun_two_processes_agree_write_once_and_resume_exactly(tmp_path, capsys):
    # three independent runs side by side: the tutorial's network (its BatchNorm statistics are what the ranks
    # must agree on) for 2 epochs and for 3, and the default for shapes (the broadcast decoder's coordinate
    # buffer, no BatchNorm; TC on each rank's batch)
    started = [torchrun("--epochs", "2", "--arch", "tutorial", "--out", tmp_path / "a"),
               torchrun("--epochs", "3", "--arch", "tutorial", "--out", tmp_path / "b"),
               torchrun("--epochs", "1", "--out", tmp_path / "d")]
    first, straight, default = (run.result() for run in started)
    assert first.returncode == 0, first.stderr
    assert "2 processes, global batch 32" in first.stdout
    assert first.stdout.count("done:") == 1 and first.stdout.count("epoch   2/2") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "a").glob("*.pt")) == ["best.pt", "last.pt"]
    assert len(list(csv.DictReader(open(tmp_path / "a/history.csv")))) == 2
    state = torch.load(tmp_path / "a/last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["run"]["step"] == 0
    # the validation KL (noise-free) was summed over both ranks' shares, with rank 0's BatchNorm statistics
    model, cfg = bv.load_checkpoint(tmp_path / "a/last.pt")
    one_process = bv.checkpoint_validation(model, cfg, torch.device("cpu"))
    logged = state["run"]["history"][-1]
    assert logged["val_kl"] == pytest.approx(one_process["kl"], rel=1e-5)
    assert logged["kl_per_dim"] == pytest.approx(one_process["kl_per_dim"], rel=1e-5, abs=1e-7)
    # resuming the 2-process run equals training it without a break
    resumed = torchrun("--epochs", "3", "--out", tmp_path / "a", "--resume").result()
    assert resumed.returncode == 0, resumed.stderr
    assert straight.returncode == 0, straight.stderr
    assert_same_weights(weights(tmp_path / "a/last.pt"), weights(tmp_path / "b/last.pt"))
    # a different process count cannot continue it
    alone = cli_in_process(capsys, "train", *TINY, "--epoch-size", "64", "--epochs", "4", "--device", "cpu",
                           "--out", tmp_path / "a", "--resume")
    assert alone.returncode == 2 and "trained by 2 process(es)" in alone.stderr
    assert default.returncode == 0, default.stderr
    assert "total correlation" in default.stdout and default.stdout.count("epoch   1/1") == 1


def test_importing_betavae_waits_passively_unless_told_and_leaves_torchvision_for_data_on_disk():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    # torchvision takes seconds to import and only real_datasets needs it
    probe = "import os, sys, betavae; print(os.environ['OMP_WAIT_POLICY'], 'torchvision' in sys.modules)"
    cases = [({}, "PASSIVE False"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE False")]
    probes = [subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=HERE, env={**env, **extra}) for extra, _ in cases]  # side by side
    for process, (_, expected) in zip(probes, cases):
        stdout, stderr = process.communicate(timeout=120)
        assert stdout.strip() == expected, stderr


# ---------------------------------------------------------------------------------------------------
# The shipped model: assets/model, made by assets/remake.py

SHIPPED_FILES = ["MODEL_CARD.md", "decoder.onnx", "encoder.onnx", "history.csv", "metrics.json", "model.pt"]


def check_shipped(folder: Path) -> None:
    """What a shipped model must hold: weights that load with today's code, an ONNX decoder equal to them, ONNX
    metadata matching the config, and a model card quoting metrics.json."""
    assert sorted(os.listdir(folder)) == SHIPPED_FILES
    state = torch.load(folder / "model.pt", weights_only=True)
    assert not {"optimizer", "scheduler", "rng"} & set(state)  # weights and config only
    model, cfg = bv.load_checkpoint(folder / "model.pt")  # a change of format fails here, not for a user
    z = torch.randn(16, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.decode(z).numpy()
    assert np.abs(onnx_tool.Decoder(folder / "decoder.onnx")(z.numpy()) - expected).max() <= 1e-4
    for role in ("decoder", "encoder"):
        props = {p.key: p.value for p in __import__("onnx").load(str(folder / f"{role}.onnx")).metadata_props}
        assert (int(props["latent_dim"]), int(props["channels"]), float(props["beta"]), props["dataset"],
                props["recon"], int(props["epoch"])) == (cfg.latent_dim, cfg.channels, cfg.beta, cfg.dataset,
                                                         cfg.recon, state["run"]["epoch"])
        assert json.loads(props["dim_factors"]) == state["dim_factors"] and props["role"] == role
    scores, card = json.loads((folder / "metrics.json").read_text()), (folder / "MODEL_CARD.md").read_text()
    quoted = dict(re.findall(r"^\| (\w+) \| ([-\d.]+) \|$", card, re.M))
    assert quoted and {name: float(value) for name, value in quoted.items()} == \
        {name: pytest.approx(scores[name], abs=5e-5) for name in quoted}
    assert {"val_recon", "mig", "factor_vae_score"} <= set(quoted)
    assert f"Shape accuracy per shape: {metrics.per_factor_text(scores['shape_accuracy_per_shape'])}" in card
    assert f"{len(bv.read_history(folder / 'history.csv')) * cfg.epoch_size:,} images" in card
    assert all(f"; {part}" in card for part in export.kl_schedule(cfg))  # how the KL term entered
    if "machines" in state["run"]:  # what trained it, not what exported it (older checkpoints lack it)
        assert f" of training on {' then '.join(state['run']['machines'])} |" in card


def test_the_model_card_names_how_the_kl_term_entered():
    assert export.kl_schedule(bv.Config()) == []
    assert export.kl_schedule(bv.Config(kl_delay=12, kl_warmup=3)) == ["no KL term for the first 12 epochs",
                                                                      "β rising from 0 over 3 epochs"]
    assert export.kl_schedule(bv.Config(capacity=25.0)) == ["capacity rising to 25 nats over 10 epochs (γ 1000)"]


def test_the_shipped_model_loads_and_its_files_agree():
    check_shipped(HERE / "assets" / "model")
    # it is the default run's: a change of the sprites' defaults needs `python assets/remake.py`
    _, cfg = bv.load_checkpoint(HERE / "assets" / "model" / "model.pt")
    assert {name: getattr(cfg, name) for name in bv.SPRITES} == bv.SPRITES and cfg.dataset == "shapes"
    assert sum(f.stat().st_size for f in (HERE / "assets").rglob("*") if f.is_file()) <= 6e6


def test_remake_trains_evaluates_ships_and_draws_the_pictures(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("remake", HERE / "assets" / "remake.py")
    remake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remake)
    tiny = [*TINY, "--epochs", "2", "--device", "cpu"]
    remake.remake(tmp_path / "run", tmp_path / "assets", tiny, ["--n", "100", "--points", "10", "5", "--metrics",
                                                                "mig,factor_vae"])
    check_shipped(tmp_path / "assets" / "model")
    shipped = torch.load(tmp_path / "assets" / "model" / "model.pt", weights_only=True)
    assert shipped["run"]["machines"] == [bv.machine(torch.device("cpu"))]
    drawn = {"traverse.png", "traverse.gif", "interpolate.png", "sample.png", "reconstruct.png", "plot.png",
             "reconstructions.png"} | ({"explorer.png"} if shutil.which("chromium") else set())
    assert drawn <= set(os.listdir(tmp_path / "assets"))
    assert "explorer" in capsys.readouterr().out
