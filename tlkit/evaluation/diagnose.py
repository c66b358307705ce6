"""`diagnose`: what is wrong with the data, seen through a trained run's own features.

Every image of every split goes once through the run's model up to its pooling layer. On those
pooled features:
- likely label errors in the training split: out-of-fold probabilities from k softmax
  regressions (each image scored by a head that never saw it), then the confident-learning rule
  (Northcutt et al. 2021): class j's threshold is the mean probability of j over the images
  labelled j; an image is an issue when its given label is below its class's threshold while
  another class is at or above its own. Ranked by the probability of the given label, lowest
  first.
- near-duplicates: pairs whose centred features have cosine similarity at or above a
  threshold, within a class, across classes, and across splits (leakage). Re-encoded, resized or
  slightly cropped copies land there; byte-identical ones are in `check-data` already.
- top losses and most-confused pairs on the held-out splits, by the run's own model.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.core.calibration import per_image_log_loss
from tlkit.core.choices import check_folder_name
from tlkit.core.runs import Run
from tlkit.core.settings import Loader, check_fields, setting
from tlkit.data.datasets import Example
from tlkit.features.rows import pooled_features
from tlkit.models.model import head_of

log = logging.getLogger("tlkit")
DIAGNOSE_SCHEMA = 1


@dataclass(frozen=True)
class DiagnoseConfig:
    run: str | None = None  # None: the newest run
    data: str | None = None  # None: the run's own data
    folds: int = setting("folds")
    duplicate_similarity: float = setting("duplicate_similarity")  # cosine, centred features
    top: int = setting("top")  # rows of each list in the report
    name: str = "diagnose"
    overwrite: bool = False
    batch_size: int = setting("batch_size")
    workers: int | None = setting("workers")
    seed: int = setting("seed")

    def __post_init__(self) -> None:
        check_fields(self)
        check_folder_name("--name", self.name)


def fit_softmax(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    l2: float = 1e-3,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A converged multinomial logistic regression (L-BFGS, L2 on the weights): (W, b)."""
    from scipy.optimize import minimize

    n, d = x.shape
    onehot = np.eye(n_classes)[y]
    w = np.ones(n) if weights is None else weights

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        kernel, bias = theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes :]
        z = x @ kernel + bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        nll = -(w * np.log(np.clip((p * onehot).sum(1), 1e-12, None))).sum() / w.sum()
        g = (p - onehot) * (w / w.sum())[:, None]
        grad = np.concatenate([(x.T @ g + l2 * kernel).ravel(), g.sum(0)])
        return nll + 0.5 * l2 * float((kernel**2).sum()), grad

    theta = np.zeros(d * n_classes + n_classes)
    result = minimize(loss, theta, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return result.x[: d * n_classes].reshape(d, n_classes), result.x[d * n_classes :]


def softmax_probs(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    z = np.asarray(x @ kernel + bias)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return np.asarray(p / p.sum(axis=1, keepdims=True))


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def out_of_fold_probs(
    features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int, seed: int
) -> np.ndarray:
    """(N, C): each row from a head fitted on the other folds (folds drawn per class, so each
    fold holds every class in proportion)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), int)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % folds
    out = np.zeros((len(labels), n_classes))
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        train_x, held_x = standardize(features[~held], features[held])
        kernel, bias = fit_softmax(train_x, labels[~held], n_classes)
        out[held] = softmax_probs(held_x, kernel, bias)
    return out


def label_issues(probs: np.ndarray, labels: np.ndarray) -> list[tuple[int, int, float]]:
    """(index, suggested label, probability of the given label), most likely errors first:
    the off-diagonal of the confident joint. Each image counts for the class, among those whose
    probability reaches their class's threshold, with the highest probability; it is an issue
    when that class is not its given label."""
    n_classes = probs.shape[1]
    thresholds = np.array(
        [probs[labels == c, c].mean() if (labels == c).any() else 1.0 for c in range(n_classes)]
    )
    confident = np.where(probs >= thresholds[None, :], probs, -1.0)
    counted = confident.argmax(axis=1)
    flagged = (confident.max(axis=1) >= 0) & (counted != labels)
    given = probs[np.arange(len(labels)), labels]
    rows = [(int(i), int(counted[i]), float(given[i])) for i in np.flatnonzero(flagged)]
    return sorted(rows, key=lambda r: r[2])


def review_order(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every image, least likely under its given label first: where to look after the flagged
    ones (fastai's top losses, out of fold)."""
    return np.argsort(probs[np.arange(len(labels)), labels], kind="stable")


MAX_PAIRS = 10_000  # near-duplicate pairs kept: a folder of copies has N^2 / 2 of them


def near_duplicates(
    features: np.ndarray, threshold: float, block: int = 2048, limit: int = MAX_PAIRS
) -> tuple[list[tuple[int, int, float]], int]:
    """(the `limit` most similar pairs (i, j, cosine) with i < j and cosine >= threshold, most
    similar first; how many pairs pass in all). Computed in blocks, kept in a bounded heap, so
    memory stays at block x N + limit. The features are centred first (the dataset's mean taken
    away): post-ReLU features share a large common part that makes every pair look alike
    (measured: uncentred, thousands of distinct photos pass 0.99; centred, none pass 0.98 while
    re-encoded, resized and cropped copies all do)."""
    import heapq

    centred = features - features.mean(axis=0)
    unit = centred / (np.linalg.norm(centred, axis=1, keepdims=True) + 1e-12)
    heap: list[tuple[float, int, int]] = []  # (cosine, -i, -j): the least similar on top
    total = 0
    for start in range(0, len(unit), block):
        sims = unit[start : start + block] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        keep = start + rows < cols
        total += int(keep.sum())
        for r, c in zip(rows[keep], cols[keep], strict=True):
            item = (float(sims[r, c]), -(start + int(r)), -int(c))
            if len(heap) < limit:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    pairs = sorted(heap, reverse=True)
    return [(-i, -j, s) for s, i, j in pairs], total


def _examples(run: Run, data: str | None) -> dict[str, list[Example]]:
    """Every split of the data, labelled through the run's class map."""
    from tlkit.core.errors import DataError
    from tlkit.data.datasets import load_dataset

    root = data or run.record.data["root"]
    folder = load_dataset(root, run.record.val_fraction)  # a folder, a CSV or tfds:NAME
    index = {c: i for i, c in enumerate(run.classes)}
    out: dict[str, list[Example]] = {}
    for split, examples in folder.splits.items():
        for e in examples:
            if e.class_name not in index:
                raise DataError(
                    f"{e.path}: class {e.class_name!r} is unknown to the model "
                    f"{run.path} (classes: {', '.join(run.classes)})"
                )
        out[split] = [
            Example(e.path, e.relpath, index[e.class_name], e.class_name) for e in examples
        ]
    if len(out.get("train", [])) < 2:
        raise DataError(f"{root}: no training split to look for label errors in")
    return out


def _label_review(
    config: DiagnoseConfig,
    feats: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    n_classes: int,
) -> tuple[np.ndarray, list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """(out-of-fold probabilities of the training images, the likely label errors, the next
    images worth a look), each as (index among all images, suggested class, given label's
    probability)."""
    y = labels[train_idx]
    oof = out_of_fold_probs(feats[train_idx], y, n_classes, config.folds, config.seed)
    flagged = label_issues(oof, y)
    seen = {i for i, _, _ in flagged}
    rest = [
        (int(i), int(oof[i].argmax()), float(oof[i, y[i]]))
        for i in review_order(oof, y)
        if i not in seen
    ]
    issues = [(int(train_idx[i]), s, p) for i, s, p in flagged]
    review = [(int(train_idx[i]), s, p) for i, s, p in rest[: max(config.top, len(flagged))]]
    return oof, issues, review


def _explain_worst(
    model: Any,
    run: Run,
    every: list[Example],
    held: list[int],
    probs: np.ndarray,
    found: dict[str, Any],
) -> dict[str, Any]:
    """Where the model looked on the top losses the report shows, by relative path (none,
    said once, when the run's head is not one the maps can read)."""
    from tlkit.evaluation.explain import explain_paths, no_maps

    if why := no_maps(model):
        log.warning("%s", why)  # the report shows the top losses without them
        found["activation_maps"] = why
        return {}
    shown = {r["path"] for r in found["top_losses"]}
    worst = [i for i in held if every[i].relpath in shown]
    overlays = explain_paths(
        model,
        [every[i].path for i in worst],
        [int(probs[i].argmax()) for i in worst],
        run.input_size,
        float(run.record.crop_fraction),
        run.max_pixels,
    )
    return dict(zip([every[i].relpath for i in worst], overlays, strict=True))


def diagnose(config: DiagnoseConfig) -> dict[str, Any]:
    """Likely label errors, near-duplicates and top losses; written to RUN/diagnose/<name>/
    (diagnose.json, report.html, relabel.csv) and returned.

    Args:
        config: the settings (DiagnoseConfig): the run whose features are used, the data (its
            own by default), folds, the near-duplicate threshold, rows per list.
    """
    from tlkit.core.fsutil import incomplete_dir, publish_dir, refuse_overwrite
    from tlkit.core.runs import load_run
    from tlkit.evaluation.evaluate import classification_metrics

    run = load_run(config.run)
    run.one_model("diagnose")
    out_dir = run.path / "diagnose" / config.name
    refuse_overwrite(out_dir, config.overwrite, "pass --name or --overwrite", kind="diagnose")
    splits = _examples(run, config.data)
    every = [e for s in splits.values() for e in s]
    split_of = [s for s, x in splits.items() for _ in x]
    model = run.load_model()
    loader = Loader(config.batch_size, config.workers, max_pixels=run.max_pixels)
    crop = float(run.record.crop_fraction)
    feats = pooled_features(model, every, run.input_size, crop, loader)
    images = _Images(every, split_of, np.array([e.label for e in every]))
    train_idx, labels = images.train_indices, images.labels
    oof, issues, review = _label_review(config, feats, labels, train_idx, len(run.classes))
    dups, n_dups = near_duplicates(feats, config.duplicate_similarity)
    probs = np.asarray(head_of(model)(feats), np.float64)  # the run's head, same features
    held = images.held_out
    found = _findings(config, run, images, oof, issues, dups, probs)
    found["near_duplicates_total"] = n_dups  # all pairs over the threshold; the list is capped
    found["review_next"] = [
        {
            "path": every[i].relpath,
            "label": run.classes[labels[i]],
            "suggested": run.classes[s],
            "given_label_probability": p,
        }
        for i, s, p in review
    ]
    if held:
        m = classification_metrics(probs[held], labels[held], run.classes)
        found["held_out"] = {
            "images": len(held),
            "top1": m["top1"],
            "most_confused": m["most_confused"][: config.top],
        }
    looks = _explain_worst(model, run, every, held, probs, found)
    tmp = incomplete_dir(out_dir, "diagnose", clean=True)
    _write(tmp, found, images, issues, run.classes, looks)
    publish_dir(tmp, out_dir, overwrite=config.overwrite)
    found["output"] = str(out_dir)
    return found


@dataclass(frozen=True)
class _Images:
    """The images diagnose looks at, in one order: each example, its split and its label."""

    every: list[Example]
    split_of: list[str]
    labels: np.ndarray

    @property
    def train_indices(self) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.split_of) if s == "train"])

    @property
    def held_out(self) -> list[int]:
        return [i for i, s in enumerate(self.split_of) if s != "train"]


def _findings(
    config: DiagnoseConfig,
    run: Run,
    images: _Images,
    oof: np.ndarray,
    issues: list[tuple[int, int, float]],
    dups: list[tuple[int, int, float]],
    probs: np.ndarray,
) -> dict[str, Any]:
    classes, every, split_of, labels = run.classes, images.every, images.split_of, images.labels
    train_idx, held = images.train_indices, images.held_out

    def item(i: int) -> dict[str, Any]:
        return {"path": every[i].relpath, "split": split_of[i], "label": classes[labels[i]]}

    def kind(i: int, j: int) -> str:
        if split_of[i] != split_of[j]:
            return "across splits"
        return "same class" if labels[i] == labels[j] else "across classes"

    losses = per_image_log_loss(probs, labels)
    worst = sorted(held, key=lambda i: -losses[i])[: config.top]
    oof_acc = float((oof.argmax(1) == labels[train_idx]).mean())
    return {
        "schema": DIAGNOSE_SCHEMA,
        "run": str(run.path),
        "images": len(every),
        "folds": config.folds,
        "out_of_fold_accuracy": oof_acc,
        "label_issues": [
            {**item(i), "suggested": classes[s], "given_label_probability": p} for i, s, p in issues
        ],
        "near_duplicates": [
            {"a": item(i), "b": item(j), "similarity": s, "kind": kind(i, j)} for i, j, s in dups
        ],
        "duplicate_similarity": config.duplicate_similarity,
        "top_losses": [
            {**item(i), "predicted": classes[int(probs[i].argmax())], "loss": float(losses[i])}
            for i in worst
        ],
    }


def _write(
    out: Path,
    found: dict[str, Any],
    images: _Images,
    issues: list[tuple[int, int, float]],
    classes: Sequence[str],
    looks: dict[str, np.ndarray],
) -> None:
    every, split_of, labels = images.every, images.split_of, images.labels
    from tlkit.core.fsutil import atomic_write, atomic_write_json
    from tlkit.evaluation.report import diagnose_html

    atomic_write_json(out / "diagnose.json", found)
    suggested = {i: (classes[s], p) for i, s, p in issues}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label", "split", "suggested_label", "given_label_probability"))
    for i, e in enumerate(every):
        s, p = suggested.get(i, ("", None))
        writer.writerow(
            (e.relpath, classes[labels[i]], split_of[i], s, "" if p is None else f"{p:.4f}")
        )
    atomic_write(out / "relabel.csv", buf.getvalue())
    atomic_write(
        out / "report.html", diagnose_html(found, {e.relpath: e.path for e in every}, looks)
    )


def summary_lines(found: dict[str, Any]) -> list[str]:
    kinds: dict[str, int] = {}
    for d in found["near_duplicates"]:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    lines = [
        f"{found['images']} images; out-of-fold accuracy of the {found['folds']}-fold "
        f"heads on the training split {found['out_of_fold_accuracy']:.4f}",
        f"likely label errors: {len(found['label_issues'])}",
    ]
    lines += [
        f"  {r['path']}: labelled {r['label']}, looks like {r['suggested']} "
        f"(p(label) {r['given_label_probability']:.3f})"
        for r in found["label_issues"][:10]
    ]
    lines.append(
        f"near-duplicates (cosine >= {found['duplicate_similarity']}): "
        f"{len(found['near_duplicates'])}"
        + (" (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")" if kinds else "")
    )
    if "held_out" in found:
        confused = found["held_out"]["most_confused"][:3]
        lines.append(
            f"held-out splits: {found['held_out']['images']} images, top-1 "
            f"{found['held_out']['top1']:.4f}"
            + (
                "; most confused: "
                + ", ".join(f"{c['true']} -> {c['predicted']} ({c['count']})" for c in confused)
                if confused
                else ""
            )
        )
    return lines


def relabel_hint(output: str | os.PathLike[str]) -> str:
    return (
        f"{Path(output) / 'relabel.csv'}: every image with its label and any suggestion; "
        "copy it into DATA/, edit `label` where you agree, then `tlkit finetune "
        "DATA/relabel.csv`"
    )
