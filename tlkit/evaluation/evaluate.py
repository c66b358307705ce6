"""`evaluate`: metrics on held-out images, multi-crop test-time averaging, and ensembles.

Every image is decoded once; its test-time views (views.py: a crop set, or dense) go through each
model in one batched pass, and softmax probabilities are averaged over views, then over
members (weighted: equal, or fitted on the validation split). Each member's views follow what it
was trained on, or are chosen on its validation split (`--multicrop auto`). The single-crop
figures come free from a crop set's pass: its centre view at the eval scale is exactly the eval
transform. Members fine-tuned from the same backbone and weights with a common frozen prefix run
that prefix once per batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tlkit.core.calibration import ECE_BINS, expected_calibration_error, log_loss, reliability_bins
from tlkit.core.choices import (
    AUTO,
    check_folder_name,
)
from tlkit.core.errors import ConfigError, DataError, RunError
from tlkit.core.fsutil import safe_name
from tlkit.core.progress import progress
from tlkit.core.runs import Run, load_run
from tlkit.core.settings import check_fields, setting
from tlkit.data.datasets import Example, load_class_folders, load_dataset, split_folders
from tlkit.data.decode import Need, decode_for
from tlkit.data.views_seen import views_seen
from tlkit.evaluation.views import (
    AUTO_ORDER,
    CROP_SETS,
    candidates,
    center_index,
    choose_by,
    crop_views,
    dense_input,
    subset,
    unseen,
    val_scorer,
    views_need,
)

if TYPE_CHECKING:
    from tlkit.models.distribute import Placement

log = logging.getLogger("tlkit")


@dataclass(frozen=True)
class EvalConfig:
    runs: tuple[str, ...] = ()  # empty: the newest run under runs/
    data: str | None = None  # None: the first run's own data folder
    split: str | None = setting("split")  # None: test, else val
    multicrop: str = setting("multicrop")
    ensemble_weights: str = setting("ensemble_weights")  # equal, val, greedy or auto
    name: str | None = None
    batch_size: int = setting("batch_size")
    workers: int | None = setting("workers")
    overwrite: bool = False
    strategy: str = setting("strategy")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.name is not None:
            check_folder_name("--name", self.name)


def load_members(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    runs = [load_run(p) for p in paths] if paths else [load_run(None)]
    first = runs[0].classes
    for run in runs[1:]:
        if run.classes != first:
            missing = sorted(set(first) - set(run.classes))
            extra = sorted(set(run.classes) - set(first))
            raise ConfigError(
                f"{run.path}: its class map differs from {runs[0].path} (missing {missing}, "
                f"extra {extra}, order {'differs' if not missing and not extra else 'n/a'}); "
                "ensemble members must be trained on the same classes"
            )
    return runs


def _local(root: str) -> str:
    """A tfds source as the folder it is written to; any other DATA as it is."""
    if root.startswith("tfds:"):
        from tlkit.data.tfds_source import materialize

        return str(materialize(root))
    return root


def default_name(runs: Sequence[Run], data: str | None, split: str, multicrop: str) -> str:
    """RUN/eval/<name> without --name: the split and the crops, for an ensemble the number of
    members and a hash of which runs they are, and for DATA other than the first run's own
    its name and a hash of where it is: scoring two datasets or two ensembles never collides,
    while scoring the same again still asks for --overwrite."""
    name = f"{split}-crops{multicrop}"
    if len(runs) > 1:
        members = "\n".join(str(r.path.resolve()) for r in runs)
        name += f"-ensemble{len(runs)}-{hashlib.sha256(members.encode()).hexdigest()[:6]}"
    run = runs[0]
    own = str(run.record.data["root"])
    if data is None or _where(data) == _where(own):
        return name
    label = safe_name(data.removeprefix("tfds:") if data.startswith("tfds:") else Path(data).name)
    return f"{label[:40]}-{hashlib.sha256(_where(data).encode()).hexdigest()[:6]}-{name}"


def _where(data: str) -> str:
    return data if data.startswith("tfds:") else str(Path(data).resolve())


class EvalSet(NamedTuple):
    """The images to evaluate, labelled through a run's class map, and where they come from."""

    examples: list[Example]
    root: str
    split: str  # "train", "val", "test", or "all" for a plain folder of classes

    @property
    def source(self) -> str:
        """What the records and messages show: `root (split)`."""
        return f"{self.root} ({self.split})"


def eval_examples(run: Run, data: str | None, split: str | None) -> EvalSet:
    """The images to evaluate, labelled through the run's class map."""
    root = _local(data or run.record.data["root"])
    is_folder = data is not None and not root.lower().endswith(".csv")
    dirs = split_folders(root) if is_folder else {}
    if is_folder and not dirs:
        candidates, split = load_class_folders(root), "all"  # a plain folder: every image
    elif is_folder and "train" not in dirs:  # held-out splits only, e.g. DATA/test/
        split = split or ("test" if "test" in dirs else "val")
        if split not in dirs:
            raise DataError(f"{root}: has no {split} folder (it has {', '.join(dirs)})")
        candidates = load_class_folders(dirs[split])
    else:
        folder = load_dataset(root, run.record.val_fraction)
        if split is None:
            split = "test" if "test" in folder.splits else "val"
        if split not in folder.splits:
            raise DataError(f"{root}: has no {split} split (it has {', '.join(folder.splits)})")
        candidates = list(folder.splits[split])
    index = {c: i for i, c in enumerate(run.classes)}
    out = []
    for e in candidates:
        if e.class_name not in index:
            raise DataError(
                f"{e.path}: class {e.class_name!r} is unknown to the model "
                f"{run.path} (classes: {', '.join(run.classes)})"
            )
        out.append(Example(e.path, e.relpath, index[e.class_name], e.class_name))
    if not out:
        raise DataError(f"{root}: the {split} split has no images")
    return EvalSet(out, root, split)


def check_same_split(runs: Sequence[Run]) -> None:
    """Ensemble members must share their train/val split: scored on the first member's split,
    another member's "val" images would otherwise be its training images."""
    first = runs[0].record.split_signature()
    for run in runs[1:]:
        sig = run.record.split_signature()
        differ = [k for k in sorted(set(first) | set(sig)) if first.get(k) != sig.get(k)]
        if differ:
            raise ConfigError(
                f"{run.path}: trained on other data or another split than "
                f"{runs[0].path} (they differ in {', '.join(differ)}); ensemble "
                "members must be trained on the same data with the same split"
            )


def own_split_paths(run: Run) -> dict[str, set[str]] | None:
    """{split: real paths} of the data the run was trained on; None when it is not here."""
    try:
        folder = load_dataset(_local(run.record.data["root"]), run.record.val_fraction)
    except DataError:
        return None
    return {s: {os.path.realpath(e.path) for e in ex} for s, ex in folder.splits.items()}


def leakage_notes(scored: Sequence[Example], own: dict[str, set[str]] | None) -> list[str]:
    """What makes a figure optimistic: scoring images the model trained on, or the validation
    images that chose its checkpoint (and stopped its head)."""
    if own is None:
        return [
            "the run's training data is not where it was trained: whether these images "
            "were used in training could not be checked"
        ]
    paths = {os.path.realpath(e.path) for e in scored}
    notes = []
    if n := len(paths & own.get("train", set())):
        notes.append(
            f"{n} of these images are training images of the model: the figure is "
            "optimistic; evaluate held-out images"
        )
    if n := len(paths & own.get("val", set())):
        notes.append(
            f"{n} of these images are the validation split that chose the "
            "checkpoint: the figure is optimistic; a test split (DATA/test/) gives an "
            "unbiased one"
        )
    return notes


class Member:
    """One run of an ensemble, loaded: its model, the view geometry it was trained at, and the
    views its saved weights saw in training."""

    def __init__(self, run: Run):
        self.run, self.model = run, run.load_model()
        self.size, self.crop = run.input_size, float(run.record.crop_fraction)
        self.seen = views_seen(run.record)

    @property
    def runs_dense(self) -> bool:
        """Whether it can see the whole image (one backbone run fully convolutional); an
        ensemble of several (`--preset best`) cannot."""
        from tlkit.models.model import one_backbone

        return bool(one_backbone(self.model))


# a batch decoded ahead: the crop sets' views by (size, crop, mode); dense members' whole images
_Decoded = tuple[dict[Any, np.ndarray], dict[int, list[np.ndarray]]]


def _shared_groups(members: list[Member]) -> list[tuple[Any, list[Any], list[int]]]:
    """[(trunk or None, per-member models or tails, member indices)]: sharing where possible."""
    from tlkit.features.cache import weights_digest
    from tlkit.models.cut import build_tail, build_trunk, resolve_cut
    from tlkit.models.model import backbone_of, compute_dtypes

    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(members):
        r = m.run.record
        sig = (
            r.backbone,
            m.size,
            r.preprocessing,
            r.weights["sha256"],
            tuple(compute_dtypes(m.model)),
        )  # a float16 trunk gives other activations
        groups.setdefault(sig if r.n_frozen > 0 else (i,), []).append(i)
    out = []
    for idx in groups.values():
        if len(idx) > 1:
            first = members[idx[0]]
            n = min(members[i].run.record.n_frozen for i in idx)
            cut = resolve_cut(backbone_of(first.model), n)  # n >= 1: a cut
            trunks = [build_trunk(members[i].model, cut) for i in idx] if cut else []
            digests = {weights_digest(t.get_weights()) for t in trunks}
            if cut is not None and len(digests) == 1:
                out.append((trunks[0], [build_tail(members[i].model, cut) for i in idx], idx))
                continue
        out.extend((None, [members[i].model], [i]) for i in idx)
    return out


def _batches(paths: Sequence[str], modes: list[str | None], batch_size: int) -> list[Sequence[str]]:
    """The images of each batch: as many as make batch_size views of the largest crop set."""
    most = max((len(CROP_SETS[m]) for m in modes if m not in (None, "dense")), default=1)
    per = max(1, batch_size // most)
    return [paths[s : s + per] for s in range(0, len(paths), per)]


class ViewRunner:
    """The members' forward passes over test-time views. Built once per evaluation: shared
    trunks are cut once, and every model (trunk, tail, dense variant) has one traced function,
    reused for every split, batch and view set."""

    def __init__(self, members: list[Member], predictor: Any = None, workers: int | None = None):
        from tlkit.models.distribute import traced_predictor

        self.members, self.workers = members, workers or os.cpu_count() or 1
        self.predictor = predictor or traced_predictor
        self.groups = [
            (trunk and self.predictor(trunk), [self.predictor(m) for m in models], idx)
            for trunk, models, idx in _shared_groups(members)
        ]
        self._dense: dict[int, Any] = {}

    def dense(self, i: int) -> Any:
        if i not in self._dense:
            from tlkit.models.model import dense_model

            self._dense[i] = self.predictor(dense_model(self.members[i].model))
        return self._dense[i]

    def probs(
        self,
        paths: Sequence[str],
        modes: str | Sequence[str | None],
        batch_size: int,
        reduce: Callable[[int, np.ndarray], np.ndarray] | None = None,
    ) -> list[np.ndarray | None]:
        """Per member, (N, K, C) probabilities of its K views of every image (None where its
        mode is None): a crop set's views in CROP_SETS order, or dense: the whole image, and
        its mirror when training mirrored. The next batch is decoded and cut into views while
        the models run on this one. A batch holds batch_size views, not images (10-crop: 3
        images of 10), and no forward pass takes more rows (or dense: more pixels) than
        batch_size crops: its activations, not the views per image, set the peak memory.
        `reduce(member, (B, K, C))` shrinks each batch as it comes (the mean over views...),
        called for each member's batches in order, so what is kept need not grow with K."""
        members = self.members
        modes = [modes] * len(members) if isinstance(modes, str) else list(modes)
        max_pixels = max(m.run.max_pixels for m in members)  # the limit they were trained under
        keys = {
            (members[i].size, members[i].crop, mode)
            for i, mode in enumerate(modes)
            if mode not in (None, "dense")
        }
        dense = [i for i, mode in enumerate(modes) if mode == "dense"]
        if not keys and not dense:
            return [None] * len(members)  # nothing asked: no image is decoded
        out: list[list[np.ndarray]] = [[] for _ in members]
        needs = [views_need(*key) for key in keys]
        needs += [views_need(members[i].size, members[i].crop, "dense") for i in dense]
        need = Need(shorter=max(n.shorter for n in needs))

        def prepare(chunk: Sequence[str]) -> _Decoded:
            images = list(pool.map(lambda path: decode_for(path, need, max_pixels).image, chunk))
            views = {
                key: np.stack(list(pool.map(lambda im, k=key: crop_views(im, *k), images)))
                for key in keys
            }
            wholes = {
                i: list(pool.map(lambda im, m=members[i]: dense_input(im, m.size, m.crop), images))
                for i in dense
            }
            return views, wholes

        chunks = _batches(paths, modes, batch_size)
        with (
            ThreadPoolExecutor(max_workers=self.workers) as pool,
            ThreadPoolExecutor(max_workers=1) as ahead,
            progress(len(paths), "evaluating") as advance,
        ):
            pending = [ahead.submit(prepare, chunk) for chunk in chunks[:1]]
            for n, chunk in enumerate(chunks):
                views, wholes = pending.pop().result()
                if n + 1 < len(chunks):
                    pending.append(ahead.submit(prepare, chunks[n + 1]))
                self._crops(views, modes, out, reduce, batch_size)
                for i in dense:
                    p = self._dense_probs(i, wholes[i], batch_size)
                    out[i].append(reduce(i, p) if reduce else p)
                advance(len(chunk))
        return [np.concatenate(parts) if parts else None for parts in out]

    def _crops(
        self,
        views: dict[Any, np.ndarray],
        modes: list[str | None],
        out: list[list[np.ndarray]],
        reduce: Callable[[int, np.ndarray], np.ndarray] | None,
        rows: int,
    ) -> None:
        """Each group's views through its models, `rows` at a time (a shared trunk once)."""
        for trunk, models, idx in self.groups:
            by_mode: dict[str, list[int]] = {}
            for j, i in enumerate(idx):
                mode = modes[i]
                if mode is not None and mode != "dense":
                    by_mode.setdefault(mode, []).append(j)
            for mode, js in by_mode.items():
                m = self.members[idx[js[0]]]
                v = views[(m.size, m.crop, mode)]
                b, k = v.shape[:2]
                flat = v.reshape(b * k, *v.shape[2:])
                parts: list[list[np.ndarray]] = [[] for _ in js]
                for s in range(0, b * k, rows):
                    x = trunk(flat[s : s + rows]) if trunk is not None else flat[s : s + rows]
                    for part, j in zip(parts, js, strict=True):
                        part.append(np.asarray(models[j](x), dtype=np.float64))
                for part, j in zip(parts, js, strict=True):
                    p = np.concatenate(part).reshape(b, k, -1)
                    out[idx[j]].append(reduce(idx[j], p) if reduce else p)

    def view_count(self, i: int, mode: str) -> int:
        """How many views member `i` averages under `mode`."""
        if mode == "dense":
            return 2 if self.members[i].seen.mirror else 1
        return len(CROP_SETS[mode])

    def _dense_probs(self, i: int, inputs: list[np.ndarray], rows: int) -> np.ndarray:
        """(B, K, C): images of one shape go through together (one trace serves every shape),
        at most the pixels of `rows` crops per pass."""
        m = self.members[i]
        passes = [False, True] if m.seen.mirror else [False]
        probs = np.empty((len(inputs), len(passes), len(m.run.classes)))
        shapes: dict[tuple[int, ...], list[int]] = {}
        for j, x in enumerate(inputs):
            shapes.setdefault(x.shape, []).append(j)
        for shape, js in shapes.items():
            per = max(1, rows * m.size * m.size // (shape[0] * shape[1]))
            for s in range(0, len(js), per):
                batch = np.stack([inputs[j] for j in js[s : s + per]])
                for k, mirrored in enumerate(passes):
                    probs[js[s : s + per], k] = np.asarray(
                        self.dense(i)(batch[:, :, ::-1] if mirrored else batch), dtype=np.float64
                    )
        return probs


@dataclass(frozen=True)
class ViewChoice:
    """The views one member is evaluated with, and why."""

    views: str
    why: str
    outside_training: str | None = None  # an explicit view set beyond what training showed
    candidates: tuple[dict[str, Any], ...] = ()  # --multicrop auto: each one's val scores

    def as_dict(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "why": self.why,
            "outside_training": self.outside_training,
            "candidates": list(self.candidates),
        }


def resolve_views(runner: ViewRunner, requested: str, batch_size: int) -> list[ViewChoice]:
    """Per member (the rule is applied to each member on its own): the view set asked for, or
    with `auto` the one chosen on the run's validation split among those training showed."""
    members = runner.members
    if requested != AUTO:
        return [_asked_for(m, requested) for m in members]
    options = [
        [o for o in candidates(m.seen, m.crop) if o != "dense" or m.runs_dense] for m in members
    ]
    chosen: list[ViewChoice | None] = [
        ViewChoice("1", f"the only views training showed ({m.seen.why})") if opts == ["1"] else None
        for m, opts in zip(members, options, strict=True)
    ]
    if all(chosen):
        return chosen  # type: ignore[return-value]
    try:
        val = eval_examples(members[0].run, None, "val").examples
    except DataError as e:
        log.warning(
            "--multicrop auto chooses on the run's validation split, which could not be "
            "read (%s): single crop",
            e,
        )
        return [
            c or ViewChoice("1", "the validation split to choose on is not here") for c in chosen
        ]
    return _choose_on(
        runner,
        val,
        [None if c else o for c, o in zip(chosen, options, strict=True)],
        batch_size,
        chosen,
    )


def _asked_for(member: Member, requested: str) -> ViewChoice:
    """The view set asked for, with a warning when it holds views training never showed."""
    if requested == "dense" and not member.runs_dense:
        raise ConfigError(
            f"{member.run.path}: --multicrop dense runs one backbone over the whole image, and "
            "this run is an ensemble of several; use a crop set (1, 2, 5, 10, multiscale)"
        )
    outside = unseen(requested, member.seen, member.crop)
    if outside:
        log.warning(
            "%s: --multicrop %s includes %s; %s. The bare --multicrop (auto) uses only views "
            "the model saw, chosen on its validation split",
            member.run.path,
            requested,
            outside,
            member.seen.why,
        )
    return ViewChoice(requested, "asked for", outside)


def _chosen(choice: ViewChoice | None) -> ViewChoice:
    if choice is None:
        raise RuntimeError("a member with neither views chosen nor views to choose")  # a bug
    return choice


def _every(probs: list[np.ndarray | None]) -> list[np.ndarray]:
    """`ViewRunner.probs` where every member had a mode: none is None."""
    out = [p for p in probs if p is not None]
    if len(out) != len(probs):
        raise RuntimeError("a member without a view mode")  # a bug
    return out


def _choose_on(
    runner: ViewRunner,
    val: list[Example],
    options: list[list[str] | None],
    batch_size: int,
    chosen: list[ViewChoice | None],
) -> list[ViewChoice]:
    """Each member with `options` scores them all on `val` in one pass (its largest crop set
    holds the smaller ones) and keeps `choose`'s pick; the others keep `chosen`."""
    paths, labels = [e.path for e in val], np.array([e.label for e in val])
    crops = [
        max((o for o in opts if o != "dense"), key=lambda o: len(CROP_SETS[o])) if opts else None
        for opts in options
    ]
    scored = {o for opts in options if opts for o in opts}
    log.info(
        "--multicrop auto: scoring %s on the %d validation images",
        ", ".join(o for o in AUTO_ORDER if o in scored),
        len(paths),
    )
    sets = [
        [(o, subset(c, o)) for o in opts if o != "dense"] if c and opts else []
        for c, opts in zip(crops, options, strict=True)
    ]
    crop_kept = runner.probs(paths, crops, batch_size, reduce=val_scorer(labels, sets))
    dense = ["dense" if opts and "dense" in opts else None for opts in options]
    dense_sets = [[("dense", None)] if d else [] for d in dense]
    dense_kept = runner.probs(paths, dense, batch_size, reduce=val_scorer(labels, dense_sets))
    out = []
    for i, (m, opts) in enumerate(zip(runner.members, options, strict=True)):
        if not opts:
            out.append(_chosen(chosen[i]))
            continue
        losses, hits = {}, {}
        for kept, named in ((crop_kept[i], sets[i]), (dense_kept[i], dense_sets[i])):
            if kept is None:  # its member had no such views: `named` is empty
                continue
            for n, (o, _) in enumerate(named):
                losses[o], hits[o] = kept[:, 2 * n], kept[:, 2 * n + 1] > 0
        best, rows = choose_by({o: losses[o] for o in opts}, {o: hits[o] for o in opts})
        why = (
            f"chosen on the validation split ({len(paths)} images) among the views training "
            f"showed ({m.seen.why})"
        )
        out.append(ViewChoice(best, why, candidates=tuple(rows)))
    return out


def fit_member_weights(probs: list[np.ndarray], labels: np.ndarray, steps: int = 500) -> np.ndarray:
    """Weights on the simplex minimising the ensemble's log loss (exponentiated gradient)."""
    m = len(probs)
    w = np.full(m, 1.0 / m)
    p_true = _true_class_probs(probs, labels)
    for _ in range(steps):
        mix = np.clip(p_true @ w, 1e-12, None)
        grad = -(p_true / mix[:, None]).mean(axis=0)
        w = w * np.exp(-0.5 * grad)
        w /= w.sum()
    return w


def _true_class_probs(probs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(N, M): each member's probability of each image's true class, what member weights are
    fitted on; a member whose probabilities are not finite is one line (its run is damaged)."""
    p_true = np.stack([p[np.arange(len(labels)), labels] for p in probs], axis=1)
    if bad := [i for i in range(p_true.shape[1]) if not np.isfinite(p_true[:, i]).all()]:
        raise RunError(
            f"ensemble member {bad[0] + 1}: its probabilities on the validation split are not "
            "finite (NaN or infinite), so no weights can be fitted; its run is damaged: "
            "evaluate without it, or train it again"
        )
    return p_true


GREEDY_ROUNDS = 25  # Caruana et al.'s selection rounds (AutoGluon's default ensemble size)


def greedy_member_weights(
    probs: list[np.ndarray], labels: np.ndarray, rounds: int = GREEDY_ROUNDS
) -> np.ndarray:
    """Ensemble selection with replacement (Caruana et al., ICML 2004): start empty, each round
    add the member whose addition gives the lowest log loss on these images (the first of
    equals), and keep the rounds' prefix that scored lowest; weights are each member's share of
    the picks. Rounds that lower nothing are dropped, so an ensemble of copies is its first
    member alone."""
    p_true = _true_class_probs(probs, labels)
    counts, total = np.zeros(len(probs), int), np.zeros(len(labels))
    best_loss, best_counts = np.inf, counts.copy()
    for n in range(1, rounds + 1):
        losses = -np.log(np.clip((total[:, None] + p_true) / n, 1e-12, None)).mean(axis=0)
        pick = int(np.argmin(losses))
        counts[pick] += 1
        total += p_true[:, pick]
        if losses[pick] < best_loss - 1e-12:
            best_loss, best_counts = float(losses[pick]), counts.copy()
    return np.asarray(best_counts / best_counts.sum(), np.float64)


WEIGHT_FOLDS = 5  # --ensemble-weights auto: greedy scored out of fold, on 4/5 of val each time


def out_of_fold_losses(
    probs: list[np.ndarray], labels: np.ndarray, fit: Callable[..., np.ndarray]
) -> np.ndarray:
    """Each image's log loss under the member weights `fit` finds on the other folds: how the
    fitted weights do on images they were not fitted on."""
    from tlkit.core.calibration import per_image_log_loss

    order = np.random.default_rng(0).permutation(len(labels))
    out = np.empty(len(labels))
    for k in range(min(WEIGHT_FOLDS, len(labels))):
        held, rest = order[k::WEIGHT_FOLDS], np.sort(np.setdiff1d(order, order[k::WEIGHT_FOLDS]))
        w = fit([p[rest] for p in probs], labels[rest])
        mixed = sum(wi * p[held] for wi, p in zip(w, probs, strict=True))
        out[held] = per_image_log_loss(np.asarray(mixed), labels[held])
    return out


def member_weights(
    probs: list[np.ndarray], labels: np.ndarray, rule: str
) -> tuple[np.ndarray, str]:
    """(the members' weights, the rule that set them) from their probabilities on the
    validation split: equal; val (the lowest log loss); greedy (Caruana's selection); auto:
    greedy where its out-of-fold log loss beats equal weights' by more than one standard
    error (the rule every `auto` uses), else equal, since selection on a small split follows
    its noise."""
    from tlkit.core.calibration import per_image_log_loss
    from tlkit.core.selection import one_se_choice

    equal = np.full(len(probs), 1.0 / len(probs))
    if rule == "equal":
        return equal, rule
    if rule != AUTO:
        fit = greedy_member_weights if rule == "greedy" else fit_member_weights
        return fit(probs, labels), rule
    mixed = np.asarray(sum(w * p for w, p in zip(equal, probs, strict=True)))
    greedy = out_of_fold_losses(probs, labels, greedy_member_weights)
    chosen, _ = one_se_choice([per_image_log_loss(mixed, labels), greedy])
    log.info(
        "--ensemble-weights auto: %s (validation log loss %.4f with equal weights, %.4f with "
        "greedy selection out of fold)",
        ("equal", "greedy")[chosen],
        float(per_image_log_loss(mixed, labels).mean()),
        float(greedy.mean()),
    )
    if chosen == 0:
        return equal, "equal"
    return greedy_member_weights(probs, labels), "greedy"


def _missing_class_notes(cm: np.ndarray, classes: Sequence[str], empty: list[int]) -> list[str]:
    """A folder may lack classes the model knows: left out of the averages, unless predicted
    (then scored 0, as in scikit-learn)."""
    notes = []
    if left_out := [classes[k] for k in empty if not cm[:, k].sum()]:
        notes.append(
            f"no images of class {', '.join(left_out)} in this set: left out of the averages"
        )
    for k in empty:
        if n := int(cm[:, k].sum()):
            notes.append(
                f"no images of class {classes[k]} in this set, yet predicted "
                f"{n} time{'s' if n > 1 else ''}: it counts as 0 in the macro "
                "averages (as in scikit-learn)"
            )
    return notes


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    n, c = probs.shape
    pred = probs.argmax(axis=1)
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    out: dict[str, Any] = {"images": int(n), "top1": float((pred == labels).mean())}
    if c > 5:
        top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        out["top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    out["log_loss"] = log_loss(probs, labels)
    per_class = {}
    present = sorted(set(labels.tolist()) | set(pred.tolist()))
    for k in present:
        tp = cm[k, k]
        precision = tp / cm[:, k].sum() if cm[:, k].sum() else 0.0
        recall = tp / cm[k, :].sum() if cm[k, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[classes[k]] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(cm[k, :].sum()),
        }
    support = np.array([v["support"] for v in per_class.values()], dtype=np.float64)
    for avg, weights in (("macro", np.ones_like(support)), ("weighted", support)):
        total = weights.sum() or 1.0
        out[avg] = {
            key: float(
                sum(w * v[key] for w, v in zip(weights, per_class.values(), strict=True)) / total
            )
            for key in ("precision", "recall", "f1")
        }
    out["per_class"] = per_class
    empty = [k for k in range(c) if not cm[k, :].sum()]
    out["classes_without_images"] = [classes[k] for k in empty]
    out["notes"] = _missing_class_notes(cm, classes, empty)
    out["confusion_matrix"] = cm.tolist()
    off = [
        (int(cm[i, j]), classes[i], classes[j])
        for i in range(c)
        for j in range(c)
        if i != j and cm[i, j] > 0
    ]
    out["most_confused"] = [
        {"true": t, "predicted": p, "count": k}
        for k, t, p in sorted(off, key=lambda x: (-x[0], x[1], x[2]))[:10]
    ]
    return out


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate one run or an ensemble; write RUN/eval/<name>/ and return the metrics.

    Args:
        config: the settings (EvalConfig): the runs (several: an ensemble, their probabilities
            averaged), the data and split, the test-time views, the member weights.

    Under a multi-worker strategy every worker calls this and gets the metrics; the chief
    writes."""
    from tlkit.models.distribute import make_placement

    placement = make_placement(config.strategy)  # before any other TensorFlow work
    if placement.replicas > 1:
        log.info("strategy: %s", placement.describe())
    with placement.strategy.scope():
        return _evaluate(config, placement)


def weights_split(runs: Sequence[Run], scored: EvalSet, how: str = "val") -> EvalSet:
    """The images --ensemble-weights val / greedy fits on: the members' own validation split,
    never any of the images being scored (the figure would then be fitted, not measured)."""
    fit_on = eval_examples(runs[0], None, "val")
    paths = {os.path.realpath(e.path) for e in scored.examples}
    if n := sum(os.path.realpath(e.path) in paths for e in fit_on.examples):
        raise ConfigError(
            f"{scored.source}: --ensemble-weights {how} fits the member weights on "
            f"{fit_on.source}, and {n} of the images scored are among them; score a "
            "test split or another folder, or use --ensemble-weights equal"
        )
    return fit_on


def crop_comparison(
    names: Sequence[str],
    single: Sequence[np.ndarray],
    multi: Sequence[np.ndarray],
    weights: np.ndarray,
    labels: np.ndarray,
) -> list[dict[str, Any]]:
    """Single-crop vs multi-crop top-1 of each member, and of the ensemble when there is one."""

    def top1(p: np.ndarray) -> float:
        return float((p.argmax(1) == labels).mean())

    rows = [
        {"model": n, "single_crop_top1": top1(s), "multicrop_top1": top1(m)}
        for n, s, m in zip(names, single, multi, strict=True)
    ]
    if len(names) > 1:
        rows.append(
            {
                "model": "ensemble",
                "single_crop_top1": top1(sum(w * p for w, p in zip(weights, single, strict=True))),
                "multicrop_top1": top1(sum(w * p for w, p in zip(weights, multi, strict=True))),
            }
        )
    return rows


def _member_probs(
    runner: ViewRunner,
    paths: list[str],
    modes: list[str],
    batch_size: int,
    fit_on: EvalSet | None,
    how: str = "val",
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, str]:
    """(each member's single-crop probabilities, its probabilities averaged over its views,
    the members' weights: equal, or fitted on `fit_on`'s images as `how` says: val, greedy,
    auto; the rule that set them)."""
    dense = [m == "dense" for m in modes]
    centres = [0 if d else center_index(m) for m, d in zip(modes, dense, strict=True)]

    def mean_and_centre(i: int, p: np.ndarray) -> np.ndarray:
        """(B, K, C) -> (B, 2, C): kept memory is N x C per member, whatever the views."""
        return np.stack([p.mean(axis=1), p[:, centres[i]]], axis=1)

    view_probs = _every(runner.probs(paths, modes, batch_size, reduce=mean_and_centre))
    multi = [p[:, 0] for p in view_probs]
    extra = (
        runner.probs(paths, ["1" if d else None for d in dense], batch_size)
        if any(dense)
        else [None] * len(modes)
    )  # dense has no crop: single-crop runs too
    # a dense member's single crop is its extra pass (the only one not None)
    single = [p[:, 1] if e is None else e[:, 0] for p, e in zip(view_probs, extra, strict=True)]
    weights, used = np.full(len(modes), 1.0 / len(modes)), "equal"
    if fit_on is not None:
        val_probs = _every(
            runner.probs(
                [e.path for e in fit_on.examples], modes, batch_size, reduce=mean_and_centre
            )
        )
        labels = np.array([e.label for e in fit_on.examples])
        weights, used = member_weights([p[:, 0] for p in val_probs], labels, how)
        used = f"auto: {used}" if how == AUTO else used
    return single, multi, weights, used


def _notes(run: Run, examples: Sequence[Example], chose_views: bool) -> list[str]:
    """What makes the figures optimistic: images the run trained or chose on."""
    own = own_split_paths(run)
    notes = leakage_notes(examples, own)
    if chose_views and own and own.get("val", set()) & {os.path.realpath(e.path) for e in examples}:
        notes.append(
            "--multicrop auto chose the views on the validation split, which these "
            "images include: the multi-crop figure is optimistic"
        )
    return notes


def _calibration(ensemble: np.ndarray, labels: np.ndarray, runs: list[Run]) -> dict[str, Any]:
    """ECE and reliability bins of the scored probabilities, beside each member's --calibrate
    (its temperature, and the validation ECE before and after)."""
    return {
        "ece": expected_calibration_error(ensemble, labels),
        "bins": ECE_BINS,
        "reliability": reliability_bins(ensemble, labels),
        "temperatures": [(r.record.calibration or {}).get("temperature") for r in runs],
        "fitted": [r.record.calibration for r in runs],
    }


def _write(
    out_dir: Path,
    overwrite: bool,
    metrics: dict[str, Any],
    examples: list[Example],
    ensemble: np.ndarray,
    first: Member,
) -> None:
    """metrics.json, predictions.csv, the figures and report.html, published whole."""
    from tlkit.core.fsutil import incomplete_dir, publish_dir
    from tlkit.evaluation.explain import explain_paths, no_maps
    from tlkit.evaluation.report import write_outputs

    def explain(paths: Sequence[str], top: Sequence[int]) -> list[np.ndarray]:
        return explain_paths(first.model, paths, top, first.size, first.crop, first.run.max_pixels)

    why = no_maps(first.model)
    maps = why is None
    if why:
        metrics["notes"].append(why)
    tmp = incomplete_dir(out_dir, "evaluation", clean=True)
    write_outputs(
        tmp, metrics, examples, ensemble, first.run.classes, explain=explain if maps else None
    )
    publish_dir(tmp, out_dir, overwrite=overwrite)


def _evaluate(config: EvalConfig, placement: Placement) -> dict[str, Any]:
    from tlkit.core.fsutil import refuse_overwrite

    runs = load_members(config.runs)
    check_same_split(runs)
    scored = eval_examples(runs[0], config.data, config.split)
    examples, source, split = scored.examples, scored.source, scored.split
    ensemble_of = len(runs) if len(runs) > 1 else 0
    how = config.ensemble_weights
    fit_on = weights_split(runs, scored, how) if how != "equal" and ensemble_of else None
    name = config.name or default_name(runs, config.data, split, config.multicrop)
    out_dir = runs[0].path / "eval" / name
    if placement.is_chief:
        refuse_overwrite(out_dir, config.overwrite, "pass --name or --overwrite", kind="evaluation")
    members = [Member(r) for r in runs]
    paths = [e.path for e in examples]
    labels = np.array([e.label for e in examples])
    runner = ViewRunner(members, placement.predictor, config.workers)
    choices = resolve_views(runner, config.multicrop, config.batch_size)
    single, multi, weights, used = _member_probs(
        runner, paths, [c.views for c in choices], config.batch_size, fit_on, how
    )
    ensemble = sum(w * p for w, p in zip(weights, multi, strict=True))
    classes = runs[0].classes
    metrics = classification_metrics(ensemble, labels, classes)
    comparison = crop_comparison([str(r.path) for r in runs], single, multi, weights, labels)
    if len(runs) > 1:
        tops = np.stack([p.argmax(1) for p in multi])
        metrics["member_disagreement"] = float((tops != tops[0]).any(axis=0).mean())
    metrics.update(
        {
            "source": source,
            "split": split,
            "multicrop": config.multicrop,
            "views": [
                {"run": str(r.path), "count": runner.view_count(i, c.views), **c.as_dict()}
                for i, (r, c) in enumerate(zip(runs, choices, strict=True))
            ],
            "views_rule": "each member on its own",  # auto: its own val scores
            "members": [str(r.path) for r in runs],
            "member_weights": [float(w) for w in weights],
            "member_weights_fitted_on": fit_on.source if fit_on else None,
            "member_weights_rule": used,
            "comparison": comparison,
        }
    )
    metrics["notes"] += _notes(runs[0], examples, any(c.candidates for c in choices))
    metrics["calibration"] = _calibration(ensemble, labels, runs)
    metrics["strategy"] = {
        "strategy": placement.name,
        "replicas": placement.replicas,
        "workers": placement.workers,
    }
    if not placement.is_chief:
        return metrics  # the chief writes the outputs
    _write(out_dir, config.overwrite, metrics, examples, ensemble, members[0])
    metrics["output"] = str(out_dir)
    return metrics
