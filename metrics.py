"""Disentanglement metrics on arrays, with the conventions of disentanglement_lib (Locatello et al. 2019), so
the numbers compare with published ones. numpy and scikit-learn only: no torch, no model.

MIG (Chen et al. 2018), SAP (Kumar et al. 2018), DCI (Eastwood & Williams 2018) and modularity (Ridgeway &
Mozer 2018) take codes (N, D), the posterior means, and factors (N, K), integer factor classes. The beta-VAE
(Higgins et al. 2017) and FactorVAE (Kim & Mnih 2018) scores take a `representation`, a function from
(B, K) factor classes to (B, D) codes, because they sample images with chosen factors. betavae.py's
`evaluate` passes its encoder as that function, wrapped in a CodeTable that encodes each combination once,
and scores the reconstructions' outlines with shape_hits:

    python betavae.py evaluate --checkpoint runs/shapes-beta4/best.pt
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from infer_onnx import UserError


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
    information, entropy = mutual_information(codes, factors), factor_entropy(factors)
    # a factor constant on these items (a tiny validation set) has no information to hold: it scores 0
    scores = np.divide(information, entropy, out=np.zeros_like(information), where=entropy > 0)  # (D, K)
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
    accuracy = [acc for _, acc in fits]  # per factor: what the code holds of it (chance 1 / its classes)
    return {"disentanglement": importance_score(importance), "completeness": importance_score(importance.T),
            "informativeness": float(np.mean(accuracy)), "informativeness_per_factor": accuracy}


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


def shape_hits(recon: np.ndarray, candidates: np.ndarray, corners: np.ndarray, shapes: np.ndarray,
               shift: int = 2) -> np.ndarray:
    """Does each reconstruction fit its own shape best? recon (N, H, W) in [0, 1]; candidates (N, K, S, side,
    side): the K shapes drawn at the image's orientation and position, each at S sizes, in the window whose
    top-left pixel is corners (N, 2) (x, y); shapes (N,) the true shape. Each candidate is also shifted by up to
    `shift` pixels; the shape whose best size and shift has the least squared error wins. Free size and shift
    leave the outline alone to decide: the area and the centroid (a heart's lies off its box's centre) would
    tell the shapes apart in a round blob."""
    n, k, s, side, _ = candidates.shape
    flat = candidates.reshape(n, k * s, side * side).astype(np.float32)
    # squared error over the image = |recon|^2 + |c|^2 - 2 recon.c: the first term is the same for every c
    energy, best = (flat * flat).sum(axis=2), np.full((n, k * s), np.inf, dtype=np.float32)
    padded = np.pad(recon.astype(np.float32), ((0, 0), (side + shift,) * 2, (side + shift,) * 2))
    span, items = np.arange(side), np.arange(n)[:, None, None]
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            ys = corners[:, 1, None] + dy + side + shift + span  # (N, side) rows of the shifted window
            xs = corners[:, 0, None] + dx + side + shift + span
            window = padded[items, ys[:, :, None], xs[:, None, :]].reshape(n, side * side, 1)
            best = np.minimum(best, energy - 2 * (flat @ window)[:, :, 0])
    return best.reshape(n, k, s).min(axis=2).argmin(axis=1) == shapes


class Progress:
    """What evaluate shows on the way: each metric as it starts and the seconds it took, and while images are
    encoded, how many and the time left (rewritten in place on a terminal, a line every 30 s in a log).
    Progress(quiet=True) shows nothing."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.tty, self.metric, self.started, self.shown = quiet, sys.stdout.isatty(), None, 0.0, 0.0

    def show(self, line: str, final: bool = True) -> None:
        if not self.quiet:
            end = "\n" if final or not self.tty else ""
            print(f"\r{line:<78}" if self.tty else line, end=end, flush=True)

    def start(self, metric: Optional[str]) -> None:
        """`metric` begins (None: the last one has ended)."""
        if self.metric:
            self.show(f"  {self.metric}: {time.perf_counter() - self.started:.0f} s")
        self.metric, self.started = metric, time.perf_counter()

    def encoded(self, done: int, new: int, drawn: int, since: float) -> None:
        now = time.perf_counter()
        if done < new and now - self.shown < (0.5 if self.tty else 30):
            return
        self.shown, left = now, (now - since) / done * (new - done)
        self.show(f"  {self.metric}: encoded {done:,}/{new:,} new images of {drawn:,} drawn, {left:.0f} s left",
                  final=False)


class CodeTable:
    """A representation that encodes each factor combination once and keeps its code: the beta-VAE and
    FactorVAE scores draw about 3 M images, from the shapes' 737,280 combinations. `encode` maps (B, K) factor
    classes to (B, D) codes and is called on at most `batch` new combinations at a time."""

    def __init__(self, encode, sizes, batch: int = 512, progress: Optional[Progress] = None):
        self.encode, self.sizes, self.batch = encode, tuple(sizes), batch
        self.progress = progress or Progress(quiet=True)
        self.known, self.codes = np.zeros(math.prod(self.sizes), dtype=bool), None

    def __call__(self, factors: np.ndarray) -> np.ndarray:
        rows = np.ravel_multi_index(tuple(np.asarray(factors).T), self.sizes)
        new, since = np.unique(rows[~self.known[rows]]), time.perf_counter()
        for start in range(0, len(new), self.batch):
            part = new[start:start + self.batch]
            codes = self.encode(np.stack(np.unravel_index(part, self.sizes), axis=1))
            if self.codes is None:  # np.empty maps memory that only written rows use
                self.codes = np.empty((len(self.known), codes.shape[1]), dtype=np.float32)
            self.codes[part], self.known[part] = codes, True
            self.progress.encoded(start + len(part), len(new), len(rows), since)
        return self.codes[rows].astype(np.float64)


METRIC_GROUPS = ("mig", "sap", "modularity", "dci", "beta_vae", "factor_vae")  # --metrics choices


def disentanglement_metrics(representation, space, n: int, seed: int, points: tuple[int, int],
                            groups=METRIC_GROUPS, progress: Optional[Progress] = None) -> dict:
    """The metrics in `groups` for one representation: MIG, SAP, DCI and modularity on the codes of the same
    n random factor draws, the beta-VAE and FactorVAE scores on points = (train, eval) batches of 64. Each
    sampled part has its own generator, so a metric scores the same alone or among the others. `space`:
    factor sizes or a FactorSampler; `progress` hears as each group starts."""
    results, sampler, codes = {}, FactorSampler.of(space), None
    for group in groups:
        if progress:
            progress.start(group)
        if group in ("mig", "sap", "modularity", "dci") and codes is None:
            factors = sampler.draw(n, np.random.default_rng([seed, 0]))
            codes = representation(factors)
        if group == "mig":
            gaps = mig_per_factor(codes, factors)
            results["mig"], results["mig_per_factor"] = float(np.mean(gaps)), gaps.tolist()
        elif group == "modularity":
            results["modularity"] = modularity(codes, factors)
        elif group == "sap":
            results["sap"] = sap(codes, factors, seed)
        elif group == "dci":
            results.update({f"dci_{k}": v for k, v in dci(codes, factors, seed).items()})
        elif group == "beta_vae":
            results["beta_vae_score"] = beta_vae_score(representation, sampler, np.random.default_rng([seed, 1]),
                                                       *points, seed=seed)
        elif group == "factor_vae":
            results["factor_vae_score"] = factor_vae_score(representation, sampler,
                                                           np.random.default_rng([seed, 2]), *points, n_variance=n)
    if progress:
        progress.start(None)
    return results

METRIC_NAMES = ["mig", "sap", "modularity", "dci_disentanglement", "dci_completeness", "dci_informativeness",
                "beta_vae_score", "factor_vae_score"]  # the numbers disentanglement_metrics returns
SCORE_NAMES = [*METRIC_NAMES, "shape_accuracy"]  # and the reconstructions' shape accuracy: what evaluate records
# the per-factor scores, by name once evaluate has named the factors: separated (MIG), and held at all (DCI's
# classifier accuracy: near 1 over a factor's classes, the code holds nothing of it)
PER_FACTOR_SCORES = {"mig_per_factor": "MIG per factor", "dci_informativeness_per_factor": "held per factor"}


def per_factor_text(scores: dict) -> str:
    """{"shape": 0.21, ...} -> "shape 0.210, ..."."""
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def metric_groups(text: str) -> tuple[str, ...]:
    """--metrics mig,factor_vae -> ("mig", "factor_vae"), in METRIC_GROUPS order."""
    chosen = set(text.split(","))
    if not chosen <= set(METRIC_GROUPS):
        raise argparse.ArgumentTypeError(f"choose from {','.join(METRIC_GROUPS)}")
    return tuple(g for g in METRIC_GROUPS if g in chosen)
