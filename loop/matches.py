"""Per-image match statistics of one evaluation pass (`ImageMatches`) and Ultralytics' box
metrics recomputed from them (`box_metrics`). Pure numpy; no I/O, no Ultralytics.

`ImageMatches` holds what Ultralytics' ``DetectionValidator`` accumulates per image: for each
predicted box its confidence, class and whether it is a true positive at each of the 10 IoU
thresholds 0.50:0.05:0.95; for each true box its class. Every metric here is Ultralytics' own
definition, recomputed from those statistics:

- AP per class and IoU threshold: COCO 101-point interpolation of the precision envelope
  (``ultralytics.utils.metrics.ap_per_class`` / ``compute_ap``); mAP50 = mean over the classes
  that have true boxes of AP at IoU 0.50, mAP50-95 = mean over those classes and the 10 IoUs;
- precision and recall: per class at the confidence that maximises the smoothed mean F1, then
  averaged over the classes that have true boxes.

So `box_metrics` of an evaluation equals the figures Ultralytics reports for it (a test checks
this on a real evaluation). ``counts`` weigh the images (an image drawn k times by a bootstrap
replicate contributes its boxes k times), so `loop.evaluation` resamples without expanding them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loop.errors import EvaluationError

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_AP_X = np.linspace(0, 1, 101)  # COCO 101-point recall grid (Ultralytics' compute_ap)
_CONF_X = np.linspace(0, 1, 1000)  # confidence grid of the P/R/F1 curves (ap_per_class)
_EPS = 1e-16

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


# ====================================================================== match statistics


@dataclass(frozen=True, eq=False)
class ImageMatches:
    """Per-image match statistics of one evaluation pass, concatenated over images.

    ``keys``: ``(N,)`` unique image ids (the sha256 for exported dataset versions), in the order
    the evaluation saw them. Predicted boxes ``(P,)``: ``tp`` ``(P, 10)`` bool (true positive at
    each of `IOU_THRESHOLDS`), ``conf`` (float32 or float64, kept as given so that sorting breaks
    ties exactly as Ultralytics does), ``pred_cls`` class ids, ``pred_image`` index into ``keys``.
    True boxes ``(T,)``: ``target_cls``, ``target_image``. Raises `EvaluationError` on
    inconsistent arrays.
    """

    keys: tuple[str, ...]
    num_classes: int
    tp: npt.NDArray[np.bool_]
    conf: np.ndarray
    pred_cls: IntArray
    pred_image: IntArray
    target_cls: IntArray
    target_image: IntArray
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = tuple(str(k) for k in self.keys)
        if len(set(keys)) != len(keys):
            raise EvaluationError("image keys must be unique: each test image counts once")
        if self.num_classes < 1:
            raise EvaluationError(f"num_classes must be >= 1, got {self.num_classes}")
        tp = np.asarray(self.tp)
        if tp.dtype != np.bool_ or tp.ndim != 2 or tp.shape[1] != len(IOU_THRESHOLDS):
            raise EvaluationError(
                f"tp must be a (P, {len(IOU_THRESHOLDS)}) bool array, got {tp.dtype} {tp.shape}"
            )
        conf = np.asarray(self.conf)
        if not np.issubdtype(conf.dtype, np.floating):
            raise EvaluationError(f"conf must hold floats, got {conf.dtype}")
        arrays = {
            "pred_cls": np.asarray(self.pred_cls, dtype=np.int64).reshape(-1),
            "pred_image": np.asarray(self.pred_image, dtype=np.int64).reshape(-1),
            "target_cls": np.asarray(self.target_cls, dtype=np.int64).reshape(-1),
            "target_image": np.asarray(self.target_image, dtype=np.int64).reshape(-1),
        }
        p = tp.shape[0]
        if (
            conf.shape != (p,)
            or arrays["pred_cls"].shape != (p,)
            or arrays["pred_image"].shape != (p,)
        ):
            raise EvaluationError(
                f"tp, conf, pred_cls and pred_image must describe the same {p} predictions"
            )
        if arrays["target_cls"].shape != arrays["target_image"].shape:
            raise EvaluationError("target_cls and target_image must have the same length")
        if not np.all(np.isfinite(conf)) or (p and (conf.min() < 0 or conf.max() > 1)):
            raise EvaluationError("conf must lie within [0, 1]")
        n = len(keys)
        for name in ("pred_image", "target_image"):
            a = arrays[name]
            if a.size and (a.min() < 0 or a.max() >= n):
                raise EvaluationError(f"{name} must index the {n} image keys")
        for name in ("pred_cls", "target_cls"):
            a = arrays[name]
            if a.size and (a.min() < 0 or a.max() >= self.num_classes):
                raise EvaluationError(f"{name} must be class ids within [0, {self.num_classes})")
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "tp", _ro(tp))
        object.__setattr__(self, "conf", _ro(conf))
        for name, a in arrays.items():
            object.__setattr__(self, name, _ro(a))

    @classmethod
    def from_images(
        cls,
        images: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
        num_classes: int,
    ) -> ImageMatches:
        """Build from ``(key, tp (p, 10), conf (p,), pred_cls (p,), target_cls (t,))`` per image,
        in evaluation order (Ultralytics' per-image ``stats`` entries)."""
        keys: list[str] = []
        tps, confs, pcls, pimg, tcls, timg = [], [], [], [], [], []
        for i, (key, tp, conf, pred_cls, target_cls) in enumerate(images):
            keys.append(key)
            tp_a = np.asarray(tp, dtype=bool).reshape(-1, len(IOU_THRESHOLDS))
            tps.append(tp_a)
            confs.append(np.asarray(conf).reshape(-1))
            pcls.append(np.asarray(pred_cls).reshape(-1).astype(np.int64))
            pimg.append(np.full(tp_a.shape[0], i, dtype=np.int64))
            t = np.asarray(target_cls).reshape(-1).astype(np.int64)
            tcls.append(t)
            timg.append(np.full(t.shape[0], i, dtype=np.int64))
        if not keys:
            raise EvaluationError("no images: an evaluation needs at least one test image")
        conf_dtype = np.result_type(*[c.dtype for c in confs]) if confs else np.float64
        return cls(
            tuple(keys),
            num_classes,
            np.concatenate(tps) if tps else np.zeros((0, 10), dtype=bool),
            np.concatenate(confs).astype(conf_dtype, copy=False),
            np.concatenate(pcls),
            np.concatenate(pimg),
            np.concatenate(tcls),
            np.concatenate(timg),
        )

    @property
    def n_images(self) -> int:
        return len(self.keys)

    def n_targets(self) -> IntArray:
        """``(num_classes,)`` true boxes per class."""
        return np.bincount(self.target_cls, minlength=self.num_classes).astype(np.int64)

    def take(self, indices: Sequence[int] | np.ndarray) -> ImageMatches:
        """The statistics of the images at ``indices`` (no repeats), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise EvaluationError("take() needs at least one image")
        if len(np.unique(idx)) != idx.size or idx.min() < 0 or idx.max() >= self.n_images:
            raise EvaluationError("take() needs distinct image indices within range")
        new_pos = np.full(self.n_images, -1, dtype=np.int64)
        new_pos[idx] = np.arange(idx.size)
        # Predictions keep evaluation order within an image; images follow ``indices``.
        pmask = new_pos[self.pred_image] >= 0
        porder = np.flatnonzero(pmask)
        porder = porder[np.argsort(new_pos[self.pred_image[porder]], kind="stable")]
        tmask = new_pos[self.target_image] >= 0
        torder = np.flatnonzero(tmask)
        torder = torder[np.argsort(new_pos[self.target_image[torder]], kind="stable")]
        return ImageMatches(
            tuple(self.keys[i] for i in idx.tolist()),
            self.num_classes,
            self.tp[porder],
            self.conf[porder],
            self.pred_cls[porder],
            new_pos[self.pred_image[porder]],
            self.target_cls[torder],
            new_pos[self.target_image[torder]],
        )

    def select(self, keys: Sequence[str]) -> ImageMatches:
        """The statistics of the images named ``keys``, in that order; `EvaluationError` names
        the keys this evaluation does not have."""
        pos = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in pos]
        if missing:
            raise EvaluationError(
                f"{len(missing)} image(s) were not evaluated here, e.g. {missing[0]!r}: "
                "evaluate both models on the same test split"
            )
        return self.take([pos[k] for k in keys])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``); `from_arrays` reverses it."""
        return {
            "keys": np.asarray(self.keys, dtype=str),
            "num_classes": np.asarray(self.num_classes),
            "tp": np.asarray(self.tp),
            "conf": np.asarray(self.conf),
            "pred_cls": np.asarray(self.pred_cls),
            "pred_image": np.asarray(self.pred_image),
            "target_cls": np.asarray(self.target_cls),
            "target_image": np.asarray(self.target_image),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ImageMatches:
        try:
            return cls(
                tuple(str(k) for k in np.asarray(arrays["keys"]).tolist()),
                int(np.asarray(arrays["num_classes"])),
                np.asarray(arrays["tp"]),
                np.asarray(arrays["conf"]),
                np.asarray(arrays["pred_cls"]),
                np.asarray(arrays["pred_image"]),
                np.asarray(arrays["target_cls"]),
                np.asarray(arrays["target_image"]),
            )
        except KeyError as exc:
            raise EvaluationError(f"match statistics lack the array {exc}") from exc

    def _per_class(self) -> list[_ClassStats]:
        """Per class, its predictions in descending confidence (Ultralytics' ``np.argsort(-conf)``
        order, ties included) and their segment tables; computed once."""
        cached = self._cache.get("per_class")
        if cached is None:
            order = np.argsort(-self.conf)
            cls_sorted = self.pred_cls[order]
            cached = [
                _ClassStats.build(self, order[cls_sorted == c]) for c in range(self.num_classes)
            ]
            self._cache["per_class"] = cached
        return list(cached)


@dataclass(frozen=True, eq=False)
class _ClassStats:
    """One class's predictions, sorted by descending confidence (``k`` of them).

    ``tp0`` ``(k,)``: true positive at IoU 0.50; ``conf``, ``neg_conf``, ``image`` ``(k,)``. For the AP of each
    IoU threshold ``j`` the sorted predictions fall into alternating segments: a run of false
    positives, one true positive, a run of false positives, ... Within a segment the recall or
    the precision envelope is constant, so the precision-recall curve of ANY multiset of the
    images (a bootstrap replicate, where a prediction appears as often as its image was drawn)
    is fixed by the first and the last copy in each segment: `box_metrics` builds it from these
    tables without expanding the copies. ``seg_start``/``seg_end`` ``(10, S)``: index into the
    running count of copies (0 = before the first prediction) just before and at the end of each
    segment; ``seg_tp``: the segment is a true positive. Rows are padded with empty segments.
    """

    tp0: npt.NDArray[np.uint8]
    conf: np.ndarray
    neg_conf: FloatArray  # -conf as float64 (what np.interp compares against)
    image: IntArray
    seg_start: IntArray
    seg_end: IntArray
    seg_tp: npt.NDArray[np.bool_]

    @classmethod
    def build(cls, m: ImageMatches, sel: IntArray) -> _ClassStats:
        tp = m.tp[sel]  # (k, 10)
        k = tp.shape[0]
        rows = []
        for j in range(tp.shape[1]):
            t = np.flatnonzero(tp[:, j])
            # Segment ends (0-based, inclusive): FP run before t1, t1, FP run, t2, ..., FP run.
            ends = np.empty(2 * len(t) + 1, dtype=np.int64)
            ends[0:-1:2] = t - 1
            ends[1::2] = t
            ends[-1] = k - 1
            rows.append(ends)
        width = max(len(r) for r in rows)
        seg_end = np.full((tp.shape[1], width), k, dtype=np.int64)  # +1 applied below
        seg_tp = np.zeros((tp.shape[1], width), dtype=bool)
        for j, ends in enumerate(rows):
            seg_end[j, : len(ends)] = ends + 1
            seg_tp[j, 1 : len(ends) : 2] = True
        seg_start = np.empty_like(seg_end)
        seg_start[:, 0] = 0
        seg_start[:, 1:] = seg_end[:, :-1]
        return cls(
            np.ascontiguousarray(tp[:, 0], dtype=np.uint8),
            m.conf[sel],
            -m.conf[sel].astype(np.float64),
            m.pred_image[sel],
            seg_start,
            seg_end,
            seg_tp,
        )


# ====================================================================== Ultralytics' metrics


@dataclass(frozen=True, eq=False)
class BoxMetrics:
    """Ultralytics' box metrics of one image set (see the module docstring).

    ``ap50``/``ap50_95``: ``(num_classes,)``, NaN for a class without true boxes (it is left out
    of the means). ``n_targets``: true boxes per class (float: weighted counts in a replicate).
    """

    map50: float
    map50_95: float
    precision: float
    recall: float
    ap50: FloatArray
    ap50_95: FloatArray
    n_targets: FloatArray


def _smooth(y: FloatArray, f: float = 0.05) -> FloatArray:
    """Ultralytics' box filter of width ``f`` of the length (``utils.metrics.smooth``)."""
    nf = round(len(y) * f * 2) // 2 + 1
    p = np.ones(nf // 2)
    yp = np.concatenate((p * y[0], y, p * y[-1]), 0)
    out: FloatArray = np.convolve(yp, np.ones(nf) / nf, mode="valid")
    return out


def _ap_rows(recall: FloatArray, precision: FloatArray) -> FloatArray:
    """Ultralytics' ``compute_ap`` of every row of ``(J, k)`` recall/precision curves (``k >= 1``
    predictions in descending confidence) -> ``(J,)`` APs."""
    cols, k = recall.shape  # k >= 1
    mrec = np.empty((cols, k + 3))
    mrec[:, 0] = 0.0
    mrec[:, 1 : k + 1] = recall
    mrec[:, k + 1] = recall[:, -1]
    mrec[:, k + 2] = 1.0
    # The precision envelope (the highest precision at this recall or beyond), built reversed
    # so that the running maximum walks contiguous memory.
    rev = np.empty((cols, k + 3))
    rev[:, :2] = 0.0
    rev[:, 2 : k + 2] = precision[:, ::-1]
    rev[:, k + 2] = 1.0
    np.maximum.accumulate(rev, axis=1, out=rev)
    mpre = rev[:, ::-1]
    y = np.empty((cols, len(_AP_X)))
    for j in range(cols):
        y[j] = np.interp(_AP_X, mrec[j], mpre[j])
    d = np.diff(_AP_X)
    out: FloatArray = (d * (y[:, 1:] + y[:, :-1]) / 2.0).sum(axis=1)
    return out


def _segment_curves(
    st: _ClassStats, copies: IntArray, n_targets: float
) -> tuple[FloatArray, FloatArray]:
    """``(10, 2S)`` recall and precision at the first and the last copy of each segment (see
    `_ClassStats`), which is all of the expanded curve that `_ap_rows` can see: repeated
    points and the copies in between change no interpolated value."""
    before = copies[st.seg_start]  # copies before the segment
    end = copies[st.seg_end]  # copies up to its end
    n = end - before
    tp_n = np.where(st.seg_tp, n, 0)
    tp_end = np.cumsum(tp_n, axis=1)
    tp_before = tp_end - tp_n
    present = n > 0
    rank = np.empty((before.shape[0], 2 * before.shape[1]), dtype=np.int64)
    tpc = np.empty_like(rank)
    # An empty segment repeats the last copy before it.
    rank[:, 0::2] = np.where(present, before + 1, end)
    tpc[:, 0::2] = np.where(present, tp_before + st.seg_tp, tp_end)
    rank[:, 1::2] = end
    tpc[:, 1::2] = tp_end
    if rank[:, 0].min() == 0:
        # Leading empty segments (no copy yet) repeat the first real point instead.
        first = np.argmax(rank > 0, axis=1)
        rows = np.arange(rank.shape[0])
        lead = np.arange(rank.shape[1])[None, :] < first[:, None]
        rank[lead] = np.broadcast_to(rank[rows, first][:, None], rank.shape)[lead]
        tpc[lead] = np.broadcast_to(tpc[rows, first][:, None], tpc.shape)[lead]
    return tpc / (n_targets + _EPS), tpc / rank


def _pr_at_grid(
    st: _ClassStats, rep: IntArray, copies: IntArray, n_targets: float
) -> tuple[FloatArray, FloatArray]:
    """Precision and recall (IoU 0.50) against confidence at the 1000 grid points, for a
    replicate in which prediction ``i`` appears ``rep[i]`` times: what
    ``np.interp(-x, -conf, curve)`` of Ultralytics gives on the expanded predictions, without
    expanding them. Each grid point reads only the two points around it: the last copy of the
    last drawn prediction at or above its confidence, and the first copy of the next one."""
    neg = st.neg_conf
    tp_copies = np.zeros(len(rep) + 1, dtype=np.int64)
    np.cumsum(rep * st.tp0, out=tp_copies[1:])
    q = -_CONF_X
    j = np.searchsorted(neg, q, side="right")  # predictions at or above each confidence
    n = copies[j]  # copies up to there (0: no point yet -> the "left" value)
    total = copies[-1]
    a = np.searchsorted(copies, n, side="left") - 1  # the last drawn prediction among them
    b = np.searchsorted(copies, n, side="right") - 1  # the next drawn one
    has_a, has_b = n > 0, n < total
    a_ = np.where(has_a, a, 0)
    b_ = np.where(has_b, b, 0)
    tp_a = tp_copies[j]
    tp_b = tp_a + st.tp0[b_]
    rank_a = np.maximum(n, 1)
    out = []
    for left, val_a, val_b in (
        (1.0, tp_a / rank_a, tp_b / (n + 1)),  # precision
        (0.0, tp_a / (n_targets + _EPS), tp_b / (n_targets + _EPS)),  # recall
    ):
        xa, xb = neg[a_], neg[b_]
        exact = q == xa
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (val_b - val_a) / (xb - xa)
            lin = slope * (q - xa) + val_a
        res = np.where(has_b & ~exact, lin, val_a)
        out.append(np.where(has_a, res, left))
    return out[0], out[1]


def box_metrics(m: ImageMatches, counts: np.ndarray | None = None) -> BoxMetrics:
    """Ultralytics' metrics of ``m``; with ``counts`` ``(N,)`` (non-negative ints), of the image
    multiset in which image ``i`` appears ``counts[i]`` times (one bootstrap replicate)."""
    nc = m.num_classes
    w: IntArray | None = None
    n_l: FloatArray
    if counts is None:
        n_l = np.bincount(m.target_cls, minlength=nc).astype(np.float64, copy=False)
    else:
        w = np.asarray(counts, dtype=np.int64).reshape(-1)
        if w.shape != (m.n_images,) or (w.size and w.min() < 0):
            raise EvaluationError(f"counts must be {m.n_images} non-negative image multiplicities")
        weights = w[m.target_image].astype(np.float64)
        n_l = np.bincount(m.target_cls, weights=weights, minlength=nc).astype(np.float64)
    present = np.flatnonzero(n_l > 0)
    ap = np.zeros((len(present), len(IOU_THRESHOLDS)))
    p_curve = np.zeros((len(present), len(_CONF_X)))
    r_curve = np.zeros((len(present), len(_CONF_X)))
    per_class = m._per_class()
    for ci, c in enumerate(present.tolist()):
        st = per_class[c]
        rep = np.ones(len(st.conf), dtype=np.int64) if w is None else w[st.image]
        copies = np.zeros(len(rep) + 1, dtype=np.int64)
        np.cumsum(rep, out=copies[1:])
        if copies[-1] == 0:
            continue  # no prediction of this class in the image set: AP 0, P 0, R 0
        if w is None:
            # Ultralytics: tpc = tp.cumsum(0), fpc = (1 - tp).cumsum(0), precision = tpc /
            # (tpc + fpc); tpc + fpc is exactly the 1-based rank, so the floats are identical.
            tpc0 = np.cumsum(st.tp0, dtype=np.int64)
            neg_conf = -st.conf
            r_curve[ci] = np.interp(-_CONF_X, neg_conf, tpc0 / (n_l[c] + _EPS), left=0)
            p_curve[ci] = np.interp(
                -_CONF_X, neg_conf, tpc0 / np.arange(1, len(tpc0) + 1, dtype=np.int64), left=1
            )
        else:
            p_curve[ci], r_curve[ci] = _pr_at_grid(st, rep, copies, n_l[c])
        ap[ci] = _ap_rows(*_segment_curves(st, copies, n_l[c]))
    f1 = 2 * p_curve * r_curve / (p_curve + r_curve + _EPS)
    i = int(_smooth(f1.mean(0), 0.1).argmax()) if len(present) else 0
    p, r = p_curve[:, i], r_curve[:, i]
    ap50 = np.full(nc, np.nan)
    ap50_95 = np.full(nc, np.nan)
    ap50[present] = ap[:, 0]
    ap50_95[present] = ap.mean(1)
    has = len(present) > 0
    return BoxMetrics(
        map50=float(ap[:, 0].mean()) if has else 0.0,
        map50_95=float(ap.mean()) if has else 0.0,
        precision=float(p.mean()) if has else 0.0,
        recall=float(r.mean()) if has else 0.0,
        ap50=ap50,
        ap50_95=ap50_95,
        n_targets=n_l,
    )
