"""Two-sample drift statistics for production monitoring: pure numpy/scipy, no I/O.

Every test compares a window of production images with a reference sample and returns a
`TestResult` whose p-value is exact or conservative under the null hypothesis that the window
and the reference are exchangeable (drawn from one distribution):

- `mmd_test`: maximum mean discrepancy, biased V-statistic with a Gaussian kernel whose
  bandwidth is the median pairwise distance of the POOLED sample (so the kernel does not depend
  on which points are the window), p-value from ``permutations`` random relabellings drawn from
  the `numpy.random.Generator` passed in: ``p = (1 + #{MMD_perm >= MMD_obs}) / (1 + B)``.
- `ks_test`: two-sided two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`).
- `category_test`: the chi-square statistic of the 2 x K table of category counts, with a
  permutation p-value (valid for small expected counts, where the chi-square law is not).
- `proportion_test`: Fisher's exact test (two-sided) of two proportions.
- `exceedance_test`: novelty. ``x`` window values exceed the ``j``-th largest reference value;
  under exchangeability ``x`` follows a negative hypergeometric law, whose upper tail is the
  exact p-value (no estimated quantile is trusted).

`bonferroni` turns a family of p-values into one decision: the family-wise false-alarm rate of
a window is at most ``alpha`` when every test is valid.

`image_stats` summarises one grayscale image (brightness, contrast, sharpness, noise); the
embedding helpers (`l2_normalize`, `pca_project`, `nearest_distance`) work on ``(n, d)`` arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from loop.errors import DriftError

FloatArray = npt.NDArray[np.float64]

IMAGE_STATS: tuple[str, ...] = ("brightness", "contrast", "sharpness", "noise")


@dataclass(frozen=True)
class TestResult:
    """One two-sample test. ``statistic``: the test's own statistic; ``p_value`` in (0, 1];
    ``window``/``reference``: a readable summary of each side (e.g. the means)."""

    __test__ = False  # not a pytest test class, whatever its name

    name: str
    statistic: float
    p_value: float
    window: float | None = None
    reference: float | None = None
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "window": self.window,
            "reference": self.reference,
            "method": self.method,
        }


def _finite_1d(a: npt.ArrayLike, what: str) -> FloatArray:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise DriftError(f"{what} is empty; a two-sample test needs values on both sides")
    if not np.all(np.isfinite(x)):
        raise DriftError(f"{what} holds NaN or infinite values")
    return x


def _finite_2d(a: npt.ArrayLike, what: str) -> FloatArray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DriftError(f"{what} must be a non-empty (n, d) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DriftError(f"{what} holds NaN or infinite values")
    return x


def _check_rng(permutations: int, rng: np.random.Generator) -> None:
    if permutations < 1:
        raise DriftError(f"permutations must be >= 1, got {permutations}")
    if not isinstance(rng, np.random.Generator):
        raise DriftError("pass a seeded numpy.random.Generator (np.random.default_rng(seed))")


def _relabellings(n_pool: int, n_first: int, permutations: int, rng: np.random.Generator) -> Any:
    """``(B, n_pool)`` bool masks, each with ``n_first`` random True entries (the window)."""
    base = np.zeros(n_pool, dtype=bool)
    base[:n_first] = True
    return rng.permuted(np.tile(base, (permutations, 1)), axis=1)


# ----------------------------------------------------------------------------- MMD


def pairwise_sq_dists(z: FloatArray) -> FloatArray:
    """``(n, n)`` squared Euclidean distances between the rows of ``z`` (clipped at 0)."""
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def median_bandwidth(d2: FloatArray) -> float:
    """The median heuristic: the median of the positive pairwise distances (square root of the
    squared ones in ``d2``); 0.0 when every point is the same."""
    iu = np.triu_indices(d2.shape[0], k=1)
    d = np.sqrt(d2[iu])
    d = d[d > 0]
    return float(np.median(d)) if d.size else 0.0


def mmd2_biased(kernel: FloatArray, in_x: npt.NDArray[np.bool_]) -> float:
    """Biased MMD² of the points marked ``in_x`` against the rest, from the joint ``kernel``:
    ``mean(Kxx) + mean(Kyy) - 2 mean(Kxy)`` = ``w^T K w`` with ``w = 1/n`` on x, ``-1/m`` on y."""
    n = int(in_x.sum())
    m = in_x.size - n
    if n == 0 or m == 0:
        raise DriftError("both samples need at least one point")
    w = np.where(in_x, 1.0 / n, -1.0 / m)
    return float(w @ kernel @ w)


def mmd_test(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    rng: np.random.Generator,
    permutations: int = 1000,
    bandwidth: float | None = None,
    name: str = "mmd",
) -> TestResult:
    """MMD two-sample test of ``x`` ``(n, d)`` against ``y`` ``(m, d)`` (see the module doc).

    ``bandwidth``: the Gaussian kernel's sigma, ``k(a, b) = exp(-|a - b|² / (2 sigma²))``;
    default the median pairwise distance of the pooled sample. ``statistic`` is the observed
    biased MMD² (0 when every point is identical, with p = 1).
    """
    xs, ys = _finite_2d(x, "window sample"), _finite_2d(y, "reference sample")
    if xs.shape[1] != ys.shape[1]:
        raise DriftError(f"samples differ in dimension: {xs.shape[1]} vs {ys.shape[1]}")
    _check_rng(permutations, rng)
    z = np.vstack([xs, ys])
    d2 = pairwise_sq_dists(z)
    sigma = median_bandwidth(d2) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        if bandwidth is not None:
            raise DriftError(f"bandwidth must be > 0, got {bandwidth}")
        return TestResult(name, 0.0, 1.0, method="MMD (all points identical)")
    kernel = np.exp(-d2 / (2.0 * sigma * sigma))
    n, big_n = xs.shape[0], z.shape[0]
    in_x = np.zeros(big_n, dtype=bool)
    in_x[:n] = True
    observed = mmd2_biased(kernel, in_x)
    exceed = 0
    for start in range(0, permutations, 256):
        masks = _relabellings(big_n, n, min(256, permutations - start), rng)
        w = np.where(masks, 1.0 / n, -1.0 / (big_n - n))
        stats = np.einsum("bi,bi->b", w @ kernel, w)
        # A relabelling equal to the observed one must count: compare with a little slack.
        exceed += int(np.sum(stats >= observed - 1e-12 * max(1.0, abs(observed))))
    p = (1 + exceed) / (1 + permutations)
    return TestResult(
        name,
        observed,
        p,
        method=f"MMD² (Gaussian kernel, sigma {sigma:.4g}), {permutations} permutations",
    )


# ----------------------------------------------------------------------------- 1-d tests


def ks_test(x: npt.ArrayLike, y: npt.ArrayLike, name: str = "ks") -> TestResult:
    """Two-sided two-sample Kolmogorov-Smirnov test of window ``x`` against reference ``y``;
    ``window``/``reference`` are the sample means."""
    from scipy.stats import ks_2samp

    xs, ys = _finite_1d(x, "window sample"), _finite_1d(y, "reference sample")
    res = ks_2samp(xs, ys, alternative="two-sided", method="auto")
    return TestResult(
        name,
        float(res.statistic),
        float(min(1.0, max(res.pvalue, 0.0))),
        float(xs.mean()),
        float(ys.mean()),
        "two-sample Kolmogorov-Smirnov",
    )


def chi2_statistic(table: npt.ArrayLike) -> float:
    """Pearson's chi-square statistic of a contingency table (rows: samples, columns:
    categories); columns that are empty in every row are ignored."""
    t = np.asarray(table, dtype=np.float64)
    t = t[:, t.sum(axis=0) > 0]
    if t.size == 0:
        return 0.0
    expected = t.sum(axis=1, keepdims=True) * t.sum(axis=0, keepdims=True) / t.sum()
    return float(((t - expected) ** 2 / expected).sum())


def category_test(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    n_categories: int,
    rng: np.random.Generator,
    permutations: int = 1000,
    name: str = "categories",
) -> TestResult:
    """Do the categories (ints in ``[0, n_categories)``) of window ``x`` and reference ``y``
    have one distribution? Chi-square statistic of the 2 x K count table, permutation p-value.
    ``window``/``reference``: the share of the category whose share changed most (signed: the
    window's share of it, and the reference's)."""
    xs = np.asarray(x, dtype=np.int64).reshape(-1)
    ys = np.asarray(y, dtype=np.int64).reshape(-1)
    if xs.size == 0 or ys.size == 0:
        raise DriftError("both samples need at least one category")
    for arr in (xs, ys):
        if arr.min() < 0 or arr.max() >= n_categories:
            raise DriftError(
                f"categories must lie in [0, {n_categories}), got {arr.min()}..{arr.max()}"
            )
    _check_rng(permutations, rng)
    cx = np.bincount(xs, minlength=n_categories)
    cy = np.bincount(ys, minlength=n_categories)
    observed = chi2_statistic(np.vstack([cx, cy]))
    pooled = np.concatenate([xs, ys])
    onehot = np.eye(n_categories, dtype=np.float64)[pooled]  # (N, K)
    totals = onehot.sum(axis=0)
    used = totals > 0
    # Row and column totals are the same under every relabelling, so are the expected counts.
    ex = xs.size * totals[used] / pooled.size
    ey = ys.size * totals[used] / pooled.size
    exceed = 0
    for start in range(0, permutations, 256):
        masks = _relabellings(pooled.size, xs.size, min(256, permutations - start), rng)
        counts_x = (masks.astype(np.float64) @ onehot)[:, used]  # (B, K used)
        counts_y = totals[used][None, :] - counts_x
        stats = ((counts_x - ex) ** 2 / ex).sum(axis=1) + ((counts_y - ey) ** 2 / ey).sum(axis=1)
        exceed += int(np.sum(stats >= observed - 1e-9 * max(1.0, observed)))
    p = (1 + exceed) / (1 + permutations)
    share_x, share_y = cx / xs.size, cy / ys.size
    k = int(np.argmax(np.abs(share_x - share_y)))
    return TestResult(
        name,
        observed,
        p,
        float(share_x[k]),
        float(share_y[k]),
        f"chi-square of the 2 x {n_categories} table, {permutations} permutations "
        f"(largest change: category {k})",
    )


def proportion_test(k_x: int, n_x: int, k_y: int, n_y: int, name: str = "proportion") -> TestResult:
    """Fisher's exact two-sided test that ``k_x / n_x`` (window) and ``k_y / n_y`` (reference)
    are one proportion; ``window``/``reference`` are the two proportions."""
    from scipy.stats import fisher_exact

    if n_x < 1 or n_y < 1 or not 0 <= k_x <= n_x or not 0 <= k_y <= n_y:
        raise DriftError(f"need 0 <= k <= n and n >= 1, got {k_x}/{n_x} and {k_y}/{n_y}")
    res = fisher_exact([[k_x, n_x - k_x], [k_y, n_y - k_y]], alternative="two-sided")
    return TestResult(
        name,
        float(k_x / n_x - k_y / n_y),
        float(min(1.0, res.pvalue)),
        k_x / n_x,
        k_y / n_y,
        "Fisher's exact test",
    )


def exceedance_threshold(reference: npt.ArrayLike, quantile: float) -> tuple[float, int]:
    """``(t, j)``: ``t`` is the ``j``-th largest reference value with ``j = max(1,
    ceil((1 - quantile) * m))``, so about ``1 - quantile`` of the reference lies above ``t``."""
    ref = _finite_1d(reference, "reference sample")
    if not 0.0 < quantile < 1.0:
        raise DriftError(f"quantile must lie in (0, 1), got {quantile}")
    j = max(1, math.ceil((1.0 - quantile) * ref.size - 1e-9))
    return float(np.sort(ref)[::-1][j - 1]), j


def exceedance_pvalue(x: int, n: int, m: int, j: int) -> float:
    """P(X >= x) where X counts the window values (``n`` of them) above the ``j``-th largest
    of ``m`` reference values, all ``n + m`` exchangeable and distinct: X is negative
    hypergeometric (the number of window items before the ``j``-th reference item in a random
    order), ``P(X = k) = C(k + j - 1, k) C(n - k + m - j, n - k) / C(n + m, n)``."""
    from scipy.stats import nhypergeom

    if not (1 <= j <= m and n >= 0 and 0 <= x <= n):
        raise DriftError(f"need 1 <= j <= m and 0 <= x <= n, got x={x}, n={n}, m={m}, j={j}")
    if x == 0:
        return 1.0
    return float(min(1.0, max(0.0, nhypergeom.sf(x - 1, n + m, n, j))))


def exceedance_test(
    x: npt.ArrayLike, reference: npt.ArrayLike, quantile: float, name: str = "exceedance"
) -> TestResult:
    """One-sided test that window ``x`` has more values above the reference's ``quantile``
    than chance allows (see `exceedance_pvalue`). ``statistic``/``window``: the share of the
    window above the threshold; ``reference``: the reference's share above it."""
    xs = _finite_1d(x, "window sample")
    ref = _finite_1d(reference, "reference sample")
    t, j = exceedance_threshold(ref, quantile)
    k = int(np.sum(xs > t))
    p = exceedance_pvalue(k, xs.size, ref.size, j)
    return TestResult(
        name,
        k / xs.size,
        p,
        k / xs.size,
        float(np.mean(ref > t)),
        f"exceedances of the reference's {quantile:g} quantile ({t:.4g}), negative hypergeometric",
    )


# ----------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """A family of tests decided together. ``threshold`` = alpha / number of tests;
    ``fired``: names of the tests whose p-value is below it."""

    alpha: float
    threshold: float
    fired: tuple[str, ...] = field(default_factory=tuple)

    @property
    def alert(self) -> bool:
        return bool(self.fired)


def bonferroni(results: Sequence[TestResult], alpha: float) -> Decision:
    """Alert when any p-value is below ``alpha / len(results)``: the chance that a window
    without drift alerts is at most ``alpha`` (each test valid, any dependence between them)."""
    if not 0.0 < alpha < 1.0:
        raise DriftError(f"alpha must lie in (0, 1), got {alpha}")
    if not results:
        raise DriftError("no test results to decide on")
    threshold = alpha / len(results)
    fired = tuple(r.name for r in results if r.p_value < threshold)
    return Decision(alpha, threshold, fired)


# ----------------------------------------------------------------------------- embeddings


def l2_normalize(a: npt.ArrayLike) -> FloatArray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    x = np.asarray(a, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def pca_project(z: npt.ArrayLike, k: int) -> FloatArray:
    """``z`` ``(n, d)`` centred and projected on its first ``min(k, n, d)`` principal axes."""
    x = _finite_2d(z, "sample")
    if k < 1:
        raise DriftError(f"k must be >= 1, got {k}")
    centred = x - x.mean(axis=0, keepdims=True)
    n, d = centred.shape
    k = min(k, n, d)
    # Eigen-decomposition of the smaller Gram matrix: much cheaper than an SVD of x.
    if d <= n:
        _, axes = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        return centred @ axes[:, ::-1][:, :k]
    vals, vecs = np.linalg.eigh(centred @ centred.T)
    return vecs[:, ::-1][:, :k] * np.sqrt(np.maximum(vals[::-1][:k], 0.0))


def _widths(parts: Sequence[int], d: int) -> list[int]:
    widths = [int(w) for w in parts]
    if not widths or any(w < 1 for w in widths) or sum(widths) != d:
        raise DriftError(f"parts {widths} do not split {d} dimensions")
    return widths


def part_scales(x: npt.ArrayLike, parts: Sequence[int]) -> tuple[FloatArray, FloatArray]:
    """``(center, scales)`` of rows ``x`` ``(n, d)`` cut into consecutive ``parts`` (widths
    summing to ``d``): the mean row, and per part the root-mean-square length of the centred
    rows (1.0 for a part that never varies)."""
    z = _finite_2d(x, "embeddings")
    center = z.mean(axis=0)
    c = z - center
    scales = []
    start = 0
    for w in _widths(parts, z.shape[1]):
        rms = math.sqrt(float((c[:, start : start + w] ** 2).sum(axis=1).mean()))
        scales.append(rms if rms > 0 else 1.0)
        start += w
    return center, np.array(scales)


def part_normalize(
    x: npt.ArrayLike, center: npt.ArrayLike, scales: npt.ArrayLike, parts: Sequence[int]
) -> FloatArray:
    """Rows of ``x`` ``(n, d)`` minus ``center``, each of the consecutive ``parts`` divided by
    its scale (`part_scales`) and the whole by ``sqrt(len(parts))``: every part weighs the
    same, and the reference rows have a root-mean-square length of 1. Unlike a per-row unit
    length, this keeps how far a row lies from the centre."""
    z = _finite_2d(x, "embeddings") - np.asarray(center, dtype=np.float64)[None, :]
    widths = _widths(parts, z.shape[1])
    sc = np.asarray(scales, dtype=np.float64).reshape(-1)
    if sc.size != len(widths) or not np.all(sc > 0):
        raise DriftError(f"need one positive scale per part, got {sc.tolist()}")
    return z / np.repeat(sc, widths)[None, :] / math.sqrt(len(widths))


def nearest_distance(
    queries: npt.ArrayLike, neighbours: npt.ArrayLike, metric: str = "euclidean", chunk: int = 1024
) -> FloatArray:
    """Distance from each row of ``queries`` to its nearest row of ``neighbours`` (both
    ``(n, d)``): ``euclidean``, or ``cosine`` (``1 - cos`` of the rows normalised, in [0, 2])."""
    q = _finite_2d(queries, "queries")
    nb = _finite_2d(neighbours, "neighbours")
    if q.shape[1] != nb.shape[1]:
        raise DriftError(f"embeddings differ in dimension: {q.shape[1]} vs {nb.shape[1]}")
    if metric not in ("euclidean", "cosine"):
        raise DriftError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if metric == "cosine":
        q, nb = l2_normalize(q), l2_normalize(nb)
    nb_sq = np.einsum("ij,ij->i", nb, nb)
    out = np.empty(q.shape[0])
    for s in range(0, q.shape[0], chunk):
        block = q[s : s + chunk]
        if metric == "cosine":
            out[s : s + chunk] = 1.0 - (block @ nb.T).max(axis=1)
        else:
            d2 = np.einsum("ij,ij->i", block, block)[:, None] + nb_sq[None, :] - 2 * block @ nb.T
            out[s : s + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return np.clip(out, 0.0, 2.0) if metric == "cosine" else out


# ----------------------------------------------------------------------------- images


def image_stats(gray: npt.ArrayLike) -> FloatArray:
    """``(4,)`` statistics of a grayscale image ``(H, W)`` with values 0..255 (`IMAGE_STATS`):

    - brightness: mean intensity;
    - contrast: standard deviation of the intensities;
    - sharpness: ``log10(1 + variance of the 4-neighbour Laplacian)`` (falls with blur);
    - noise: Immerkær's estimate of the standard deviation of additive Gaussian noise, the mean
      absolute response to the mask ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` times ``sqrt(pi/2) / 6``
      (zero on any linear ramp).
    """
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 3:
        raise DriftError(f"image_stats needs a 2-d image of at least 3 x 3 pixels, got {g.shape}")
    if not np.all(np.isfinite(g)):
        raise DriftError("the image holds NaN or infinite values")
    c = g[1:-1, 1:-1]
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * c
    mask = (
        g[:-2, :-2]
        + g[:-2, 2:]
        + g[2:, :-2]
        + g[2:, 2:]
        - 2.0 * (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:])
        + 4.0 * c
    )
    noise = math.sqrt(math.pi / 2.0) / 6.0 * float(np.abs(mask).mean())
    return np.array(
        [float(g.mean()), float(g.std()), math.log10(1.0 + float(lap.var())), noise],
        dtype=np.float64,
    )


def read_gray(path: Path, max_side: int = 1024) -> FloatArray:
    """An image file as a float64 grayscale ``(H, W)`` array, 0..255; images larger than
    ``max_side`` are reduced by an integer factor first (box filter) to bound the cost."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("L", (max_side, max_side))
        g = im.convert("L")
        factor = max(1, math.ceil(max(g.size) / max_side))
        if factor > 1:
            g = g.reduce(factor)
        return np.asarray(g, dtype=np.float64)


# ----------------------------------------------------------------------------- feature sets


@dataclass(frozen=True)
class FeatureSet:
    """What the monitor keeps of ``n`` scored images, row ``i`` = image ``sha256[i]``.

    ``embedding`` ``(n, d)`` float32: the model's pooled backbone features;
    ``stats`` ``(n, 4)``: `image_stats`; ``max_conf`` ``(n,)``: highest candidate-box
    confidence (0 without boxes); ``uncertainty`` ``(n,)``: the highest per-box entropy (sum of
    binary entropies of the class scores, nats; 0 without boxes); ``top_class`` ``(n,)`` int:
    class id of the most confident box at or above the defect threshold, -1 when there is none
    (a "no defect" image); ``class_counts`` ``(n, C)`` int: boxes at or above the threshold
    per class.
    """

    sha256: tuple[str, ...]
    embedding: npt.NDArray[np.float32]
    stats: FloatArray
    max_conf: FloatArray
    uncertainty: FloatArray
    top_class: npt.NDArray[np.int64]
    class_counts: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        n = len(self.sha256)
        shapes = {
            "embedding": (self.embedding.ndim == 2, self.embedding.shape[:1]),
            "stats": (self.stats.shape[1:] == (len(IMAGE_STATS),), self.stats.shape[:1]),
            "max_conf": (self.max_conf.ndim == 1, self.max_conf.shape),
            "uncertainty": (self.uncertainty.ndim == 1, self.uncertainty.shape),
            "top_class": (self.top_class.ndim == 1, self.top_class.shape),
            "class_counts": (self.class_counts.ndim == 2, self.class_counts.shape[:1]),
        }
        for name, (ok, lead) in shapes.items():
            if not ok or lead != (n,):
                raise DriftError(f"FeatureSet.{name} does not have {n} rows of the right shape")

    def __len__(self) -> int:
        return len(self.sha256)

    @property
    def n_classes(self) -> int:
        return int(self.class_counts.shape[1])

    def subset(self, index: npt.ArrayLike) -> FeatureSet:
        """The rows ``index`` (ints), in that order."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        return FeatureSet(
            tuple(self.sha256[i] for i in idx.tolist()),
            self.embedding[idx],
            self.stats[idx],
            self.max_conf[idx],
            self.uncertainty[idx],
            self.top_class[idx],
            self.class_counts[idx],
        )

    @staticmethod
    def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
        if not parts:
            raise DriftError("nothing to concatenate")
        return FeatureSet(
            tuple(s for p in parts for s in p.sha256),
            np.concatenate([p.embedding for p in parts]),
            np.concatenate([p.stats for p in parts]),
            np.concatenate([p.max_conf for p in parts]),
            np.concatenate([p.uncertainty for p in parts]),
            np.concatenate([p.top_class for p in parts]),
            np.concatenate([p.class_counts for p in parts]),
        )

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The fields as named arrays (for ``np.savez``), names prefixed with ``prefix``."""
        return {
            prefix + "sha256": np.array(self.sha256, dtype="U64"),
            prefix + "embedding": self.embedding,
            prefix + "stats": self.stats,
            prefix + "max_conf": self.max_conf,
            prefix + "uncertainty": self.uncertainty,
            prefix + "top_class": self.top_class,
            prefix + "class_counts": self.class_counts,
        }

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray], prefix: str = "") -> FeatureSet:
        """Inverse of `arrays`."""
        try:
            return FeatureSet(
                tuple(str(s) for s in arrays[prefix + "sha256"].tolist()),
                np.asarray(arrays[prefix + "embedding"], dtype=np.float32),
                np.asarray(arrays[prefix + "stats"], dtype=np.float64),
                np.asarray(arrays[prefix + "max_conf"], dtype=np.float64),
                np.asarray(arrays[prefix + "uncertainty"], dtype=np.float64),
                np.asarray(arrays[prefix + "top_class"], dtype=np.int64),
                np.asarray(arrays[prefix + "class_counts"], dtype=np.int64),
            )
        except KeyError as exc:
            raise DriftError(f"feature arrays lack {exc}") from exc
