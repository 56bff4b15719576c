"""The "what to do next" rules: plain-language advice derived from a `ReportData`, most urgent
first (thresholds in `loop.report.data`)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

from loop.evaluation import all_background
from loop.report.data import (
    HIGH_ADDED,
    HIGH_REMOVED,
    LOW_ACCEPTANCE,
    MIN_SUGGESTIONS,
    PLATEAU_GAIN,
    RARE_BOXES,
    RARE_FRACTION,
    Advice,
    Confusion,
    ReportData,
)
from loop.report.text import fmt_ci, fmt_pct, model_name, waiting


def _confused_with(conf: Confusion | None, cls: str) -> tuple[str, int] | None:
    """The other class (or "background") the model most often predicts for true ``cls``."""
    if conf is None or cls not in conf.classes:
        return None
    names = [*conf.classes, "background"]
    j = list(conf.classes).index(cls)
    best: tuple[str, int] | None = None
    for i, row in enumerate(conf.matrix):
        if i == j or i >= len(names) or j >= len(row):
            continue
        n = int(row[j])
        if n > 0 and (best is None or n > best[1]):
            best = (names[i], n)
    return best


def what_to_do_next(data: ReportData) -> list[Advice]:
    """Plain-language advice derived from the numbers, most urgent first (see the thresholds)."""
    if data.round is None:
        return [
            Advice(
                "act",
                "No model has been trained yet: import seed labels "
                "(defect-loop ingest DIR --labels LABELS) and run defect-loop cycle.",
            )
        ]
    act: list[Advice] = []
    watch: list[Advice] = []
    useless = _finds_almost_nothing(data)
    if useless is not None:
        act.append(Advice("act", useless))
    per_class = data.effort.per_class if data.effort is not None else {}
    for row in data.class_rows:
        corr = per_class.get(row.name)
        acc = corr.acceptance if corr is not None and corr.suggestions >= MIN_SUGGESTIONS else None
        if row.worse:
            drop = -(row.delta or 0.0)
            if acc is not None and acc < LOW_ACCEPTANCE:
                act.append(
                    Advice(
                        "act",
                        f"Review the labeling guidelines for '{row.name}': its test AP50-95 fell "
                        f"by {drop:.3f} and labelers accepted only {fmt_pct(acc)} of the model's "
                        f"'{row.name}' suggestions. Inconsistent labels are the usual cause; "
                        "compare the disagreement images below with the guidelines.",
                    )
                )
            else:
                extra = (
                    f" No new '{row.name}' boxes were labeled this round."
                    if row.instances_added is not None and row.instances_added <= 0
                    else ""
                )
                act.append(
                    Advice(
                        "act",
                        f"'{row.name}' got worse: test AP50-95 fell by {drop:.3f}.{extra} "
                        f"Check this round's '{row.name}' labels and label more '{row.name}' "
                        "examples.",
                    )
                )
        elif acc is not None and acc < LOW_ACCEPTANCE:
            partner = _confused_with(data.confusion, row.name)
            if partner is None:
                hint = ""
            elif partner[0] == "background" and partner[0] not in data.classes:
                hint = f" On the test split the model most often misses '{row.name}' entirely "
                hint += f"({partner[1]} boxes)."
            else:
                hint = f" On the test split the model most often calls a true '{row.name}' "
                hint += f"'{partner[0]}' ({partner[1]} boxes)."
            watch.append(
                Advice(
                    "watch",
                    f"Labelers corrected most '{row.name}' suggestions (only {fmt_pct(acc)} "
                    f"accepted): its pre-annotations cost time instead of saving it.{hint}",
                )
            )
        if corr is not None:
            removed = corr.share("removed")
            if (
                removed is not None
                and corr.suggestions >= MIN_SUGGESTIONS
                and removed > HIGH_REMOVED
            ):
                watch.append(
                    Advice(
                        "watch",
                        f"{corr.removed} of {corr.suggestions} '{row.name}' suggestions were "
                        "false alarms that labelers deleted: add defect-free examples, or raise "
                        "select.preannotation_conf so labelers see fewer wrong boxes.",
                    )
                )
            added = corr.share("added")
            if added is not None and corr.added >= MIN_SUGGESTIONS and added > HIGH_ADDED:
                watch.append(
                    Advice(
                        "watch",
                        f"The model missed {corr.added} '{row.name}' defects that labelers had "
                        f"to draw ({fmt_pct(added)} of the final '{row.name}' boxes): it needs more "
                        f"'{row.name}' examples.",
                    )
                )
    too_few = [
        r
        for r in data.class_rows
        if r.train_boxes is not None and r.train_boxes < data.min_train_boxes
    ]
    for row in too_few:
        act.append(
            Advice(
                "act",
                f"'{row.name}' has only {row.train_boxes} training boxes: too few to learn it "
                f"(advice.min_train_boxes is {data.min_train_boxes}). Label more '{row.name}' "
                "images: find them in the pool, or let the selection favour rare classes "
                "(select.strategy: class_balance).",
            )
        )
    act.extend(_split_width_advice(data))
    for row in data.class_rows:
        if row.test_boxes is not None and row.test_boxes < data.min_test_boxes:
            watch.append(
                Advice(
                    "watch",
                    f"'{row.name}' has only {row.test_boxes} test boxes (evaluation."
                    f"min_test_boxes is {data.min_test_boxes}): its test AP cannot be trusted. "
                    f"Add labeled '{row.name}' images to the test split (defect-loop datasets "
                    "add-test).",
                )
            )
    counts = [r.instances for r in data.class_rows if r.instances is not None]
    if counts:
        median = statistics.median(counts)
        for row in data.class_rows:
            if row.instances is None or row in too_few:
                continue
            if row.instances < RARE_BOXES or row.instances < RARE_FRACTION * median:
                planned = data.next_batch.class_mix.get(row.name) if data.next_batch else None
                tail = (
                    f" The next batch holds about {planned} predicted '{row.name}' boxes."
                    if planned is not None
                    else ""
                )
                watch.append(
                    Advice(
                        "watch",
                        f"Only {row.instances} labeled '{row.name}' boxes (median class: "
                        f"{median:g}): find and label more '{row.name}' images.{tail}",
                    )
                )
    noise = _noise_advice(data)
    if noise is not None:
        watch.append(noise)
    elif data.promoted is False:
        watch.append(
            Advice(
                "watch",
                f"This round's model was not promoted ({data.promotion_reason or 'no reason'}). "
                "The champion keeps serving pre-annotations; keep labeling and retrain.",
            )
        )
    if data.preannotation_hidden:
        names = ", ".join(f"'{c}'" for c in data.preannotation_hidden)
        watch.append(
            Advice(
                "watch",
                f"Pre-annotations of {names} are not shown to labelers: the champion's test "
                "AP50 for them is below advice.preannotation_min_ap50 "
                f"({data.preannotation_min_ap50:g}). Labelers draw those boxes from scratch "
                "until a model detects them.",
            )
        )
    watch.extend(_curve_advice(data))
    watch.extend(_review_queue_advice(data))
    out = act + watch
    if not act:
        nb = data.next_batch
        nxt = f"the next batch ({nb.size} images, {nb.strategy})" if nb else "the next batch"
        out.append(Advice("ok", f"No class got worse: label {nxt} and run the next cycle."))
    return out


def _review_queue_advice(data: ReportData) -> list[Advice]:
    """Tasks whose annotators disagreed wait for a lead; their images get no new label."""
    lq = data.label_quality.quality if data.label_quality is not None else None
    if lq is None or not lq.review_tasks:
        return []
    n = len(lq.review_tasks)
    return [
        Advice(
            "watch",
            f"{waiting(n)} in the review queue: {'its' if n == 1 else 'their'} annotators "
            f"disagreed, so {'its image gets' if n == 1 else 'their images get'} no new label "
            "until a lead resolves them in Label Studio (the task links are under "
            '"Label quality").',
        )
    ]


def _finds_almost_nothing(data: ReportData) -> str | None:
    """The "useless model" rule: test recall below ``min_recall``, or a confusion matrix in
    which nothing was predicted as any class."""
    symptoms = []
    r = data.candidate_recall
    if r is not None and r < data.min_recall:
        symptoms.append(
            f"test recall {r:.3f}{fmt_ci(data.candidate_recall_ci)}, below "
            f"advice.min_recall {data.min_recall:g}"
        )
    if data.confusion is not None and all_background(data.confusion.matrix):
        symptoms.append(
            "the confusion matrix is all background: no test box was predicted as any class"
        )
    if not symptoms:
        return None
    epochs = f" (train.epochs is {data.train_epochs})" if data.train_epochs else ""
    return (
        f"This round's model finds almost nothing ({'; '.join(symptoms)}). Do not trust its "
        "suggestions or its ranking yet: start from a pretrained checkpoint instead of from "
        f"scratch, train longer{epochs}, and check that the labels match the images."
    )


def _split_width_advice(data: ReportData) -> list[Advice]:
    hw = data.map50_halfwidth
    if hw is None or hw <= data.max_halfwidth:
        return []
    n = f"{data.test_images} images" if data.test_images is not None else "its images"
    return [
        Advice(
            "act",
            f"The test split ({n}) cannot tell mAP50 differences smaller than ±{hw:.3f} from "
            f"noise ({100 * data.confidence:g}% interval; evaluation.max_halfwidth is "
            f"{data.max_halfwidth:g}), so rounds and the promotion gate cannot see small "
            "progress. Grow it with labeled images the loop never selected: defect-loop "
            "datasets add-test DIR --labels LABELS.",
        )
    ]


def _noise_advice(data: ReportData) -> Advice | None:
    if data.gate_verdict != "noise":
        return None
    prev = model_name(data.previous_version, data.previous_round)
    diff = ""
    if data.gate_difference is not None:
        v, lo, hi = data.gate_difference
        diff = f": test mAP50-95 {v:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    n = f" on the same {data.test_images} test images" if data.test_images else ""
    kept = "" if data.promoted else " The champion keeps serving pre-annotations."
    return Advice(
        "watch",
        f"This round's model is no better than the champion ({prev}) within noise{diff} "
        f"({100 * data.confidence:g}% paired interval{n}).{kept} More labels or longer "
        "training may help; a larger test split resolves smaller differences (defect-loop "
        "datasets add-test).",
    )


def _interp(points: Sequence[tuple[int, float]], x: float) -> float | None:
    """Linear interpolation of ``points`` (sorted by x) at ``x``; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def _curve_advice(data: ReportData) -> list[Advice]:
    """Plateau and random-baseline advice from the rounds up to the report's."""
    pts = [
        p
        for p in data.curve
        if p.test_map50 is not None
        and p.labeled is not None
        and (data.round is None or p.round <= data.round)
    ]
    out: list[Advice] = []
    if len(pts) >= 2:
        a, b = pts[-2], pts[-1]
        gain = (b.test_map50 or 0.0) - (a.test_map50 or 0.0)
        more = (b.labeled or 0) - (a.labeled or 0)
        if more > 0 and gain < PLATEAU_GAIN:
            out.append(
                Advice(
                    "watch",
                    f"Test mAP50 changed by {gain:+.3f} with {more} more labeled images: "
                    "returns are diminishing. Try another selection strategy, or decide whether "
                    "the current accuracy is good enough.",
                )
            )
    if pts and data.baseline:
        last = pts[-1]
        base = _interp(data.baseline, float(last.labeled or 0))
        if base is not None and last.test_map50 is not None:
            if last.test_map50 <= base:
                out.append(
                    Advice(
                        "watch",
                        f"Active selection is not beating random selection at {last.labeled} "
                        f"labeled images (test mAP50 {last.test_map50:.3f} vs {base:.3f} in the "
                        "oracle replay): check the strategy in select.strategy.",
                    )
                )
            else:
                out.append(
                    Advice(
                        "ok",
                        f"Active selection is ahead of random selection by "
                        f"{last.test_map50 - base:.3f} test mAP50 at {last.labeled} labeled images.",
                    )
                )
    return out
