"""`tlkit finetune --preset best --time-limit 20m DATA`: the candidates that fit the budget,
scored on the validation split, and their ensemble as one run.

The candidates, in priority order: each backbone of the family with its head alone (cheap, and
already a strong classifier on little data), then each fine-tuned whole (the Keras guide's
recipe, tlkit's defaults), then each with its last stages fine-tuned; every one chooses what
its head reads (`--head-features auto`). Before anything trains, each backbone's rates are
measured here (budget.py), and the plan says which candidates fit and about how long they
take. While they run, the estimates are corrected by what the finished ones took; a candidate
that no longer fits is skipped, and a fine-tune stops before an epoch that would run past its
share of the budget.

The result is one run folder that `eval`, `predict` and `export` take as any run:
- `model.keras`: the members under one averaging model (tlkit.evaluation.ensemble), weighted
  as `--ensemble-weights auto` weighs them on the validation split: greedy selection with
  replacement (Caruana et al., 2004) where it beats equal weights out of fold, else equal;
- `members/<candidate>/`: every candidate trained, each a full tlkit run (one that fails on
  its own is recorded as failed, and the rest go on);
- `leaderboard.csv`: each candidate's validation figures, seconds and ensemble weight;
- `preset.json`: the plan and the budget spent, which `finetune --resume` continues from.
The test-time views of the ensemble are chosen on the validation split among those every
member trained on (`eval --multicrop` makes the same choice) and recorded.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tlkit import _version
from tlkit.core.choices import AUTO, BEST_BACKBONES
from tlkit.core.errors import ConfigError, DataError, RunError
from tlkit.core.fsutil import (
    FolderBusy,
    atomic_path,
    atomic_write,
    atomic_write_json,
    claim,
    file_hash,
    find_incomplete,
    incomplete_dir,
    is_incomplete,
    publish_dir,
    read_json_record,
    refuse_overwrite,
    release,
)
from tlkit.core.runs import RUN_FILE, RUNS_DIR, Run, RunRecord, is_finished_run, load_run
from tlkit.core.settings import check_fields, setting
from tlkit.data.datasets import ImageFolder
from tlkit.models.freezing import FreezeRequest
from tlkit.preset.budget import (
    RUN_OVERHEAD_S,
    Clock,
    Images,
    Rates,
    fine_tune_seconds,
    fits,
    head_seconds,
    measure,
    minutes,
    parse_duration,
    share,
    views_seconds,
)
from tlkit.training.config import FinetuneConfig

log = logging.getLogger("tlkit")
PRESET_FILE = "preset.json"
PRESET_SCHEMA = 1
LEADERBOARD = "leaderboard.csv"
MEMBERS = "members"
TRAINED = "trained"
# priority: every backbone's head first, then each fine-tuned whole, then its last 3 stages
KINDS = ("head", "fine-tune", "last-stages")
LAST = 3  # the stages (the head's included) a last-stages candidate trains
SHARE = 1.5  # a fine-tune may run this far past its estimate, even when later ones then skip
LEADERBOARD_COLUMNS = (
    "candidate",
    "status",
    "val_loss",
    "val_top1",
    "head_features",
    "ensemble_weight",
    "seconds",
    "estimated_seconds",
    "note",
)


@dataclass(frozen=True)
class Candidate:
    """One run the preset may train: a backbone with its head alone, fine-tuned whole, or
    with its last stages fine-tuned."""

    backbone: str
    kind: str  # one of KINDS: "head" | "fine-tune" | "last-stages"

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.kind}"

    def config(self, base: FinetuneConfig, members: Path) -> FinetuneConfig:
        """The user's settings with what this candidate is: its backbone at its own size,
        frozen whole (head), not at all (fine-tune) or up to its last LAST stages, its head
        features chosen on val."""
        from tlkit.models.backbones import get_backbone

        head = self.kind == "head"
        freeze = {
            "head": FreezeRequest(count="all"),
            "fine-tune": FreezeRequest(count="0"),
            "last-stages": FreezeRequest(blocks=len(get_backbone(self.backbone).stages) - LAST),
        }[self.kind]
        return base.replace(
            backbone=self.backbone,
            input_size=None,
            freeze=freeze,
            head_features=AUTO,
            output=str(members / self.name),
            overwrite=False,
            **({"epochs": 0} if head else {}),
        )


@dataclass(frozen=True)
class BestConfig:
    """`--preset best`: the settings every candidate shares (`base`: its backbone, freeze and
    head features are the preset's), the budget, and the backbones to choose among."""

    base: FinetuneConfig
    time_limit: str = setting("time_limit")
    backbones: tuple[str, ...] = BEST_BACKBONES

    def __post_init__(self) -> None:
        check_fields(self)
        parse_duration(self.time_limit)
        from tlkit.models.backbones import get_backbone

        for name in self.backbones:
            get_backbone(name)  # an unknown one is one line, before any work
        if self.base.model.weights not in ("imagenet", "none"):  # a file fits one backbone
            raise ConfigError(
                "--preset best starts every candidate from its backbone's ImageNet weights "
                f"(or none). Received: --weights {self.base.model.weights}"
            )
        if self.base.strategy == "multiworker":
            raise ConfigError(
                "--preset best trains its candidates one after another on this machine; "
                "--strategy multiworker is for one run. Received: --strategy multiworker"
            )
        for candidate in self.candidates():  # a setting no candidate can take: refused now
            candidate.config(self.base, Path(MEMBERS))

    @property
    def limit_s(self) -> float:
        return parse_duration(self.time_limit)

    def candidates(self) -> list[Candidate]:
        """In priority order; last-stages only where the backbone has more stages than that."""
        from tlkit.models.backbones import get_backbone

        return [
            Candidate(b, k)
            for k in KINDS
            for b in self.backbones
            if k != "last-stages" or len(get_backbone(b).stages) > LAST
        ]


def default_run_dir() -> Path:
    return Path(RUNS_DIR) / f"best-{datetime.now():%Y%m%d-%H%M%S}"


def best(
    config: BestConfig | None = None,
    verbose: int | str = "auto",
    resume: str | os.PathLike[str] | None = None,
    force_resume: bool = False,
) -> Run:
    """Train the candidates that fit `config.time_limit`, and keep their ensemble as one run.

    Args:
        config: the preset's settings (BestConfig); None with `resume`.
        verbose: Keras' verbosity for each candidate's training.
        resume: an interrupted `--preset best` run: its finished candidates are kept, an
            interrupted one continues from its checkpoint, and the budget left is what the
            earlier attempts did not spend.
        force_resume: resume an interrupted candidate even though its data or settings
            changed since it began (finetune's `force_resume`).
    """
    if resume is not None:
        tmp, run_dir, state = _reopen(Path(resume))
        config = config_of(state)
        clock = Clock(config.limit_s, state["spent_s"], state["ratios"])
    elif config is None:
        raise TypeError("best() needs a config, or resume= to continue a run")
    else:
        clock = Clock(config.limit_s)
        run_dir, state, folder = _open(config)
        _plan(
            config, state, clock, folder
        )  # a budget too small is refused before any folder exists
        tmp = incomplete_dir(run_dir, "run")
        _save(tmp, state, clock)
        log.info(
            "building the run in %s; if it is interrupted, `tlkit finetune --resume %s` "
            "continues it within what is left of --time-limit %s",
            tmp,
            run_dir,
            config.time_limit,
        )
    try:
        known = {c.name: c for c in config.candidates()}
        for name in state["order"]:  # the plan's, as it started (a resume keeps it)
            _train(known[name], config, (tmp, state), clock, verbose, force_resume)
        return _finish(config, tmp, run_dir, state, clock)
    except BaseException:
        if tmp.is_dir():
            _save(tmp, state, clock)  # what was spent counts against the budget on resume
            release(tmp)
        raise


def _open(config: BestConfig) -> tuple[Path, dict[str, Any], ImageFolder]:
    """A new run: its folder and the data checked, the preset's state begun, the data's
    listing (read once)."""
    from tlkit.data.preflight import check_inputs
    from tlkit.training.train import check_outside_data, local_inputs

    base = config.base
    run_dir = Path(base.output) if base.output else default_run_dir()
    refuse_overwrite(
        run_dir,
        base.overwrite,
        "choose another -o/--output or pass --overwrite",
        "run",
        local_inputs(base),
    )
    check_outside_data(base, run_dir)
    listing = check_inputs(base.data, base.model, base.val_fraction).dataset()  # bad: one line
    state: dict[str, Any] = {
        "schema": PRESET_SCHEMA,
        "preset": "best",
        "time_limit": config.time_limit,
        "backbones": list(config.backbones),
        "base": base.as_dict(),
        "spent_s": 0.0,
        "ratios": [],
        "done": {},
    }
    return run_dir, state, listing


def config_of(state: dict[str, Any]) -> BestConfig:
    """The preset's settings as the run started with them (preset.json)."""
    base = FinetuneConfig.from_dict(state["base"])
    return BestConfig(base, state["time_limit"], tuple(state["backbones"]))


def find_preset(path: str | os.PathLike[str]) -> Path | None:
    """The interrupted `--preset best` run `path` names (its folder, or the `.incomplete-`
    folder being built for it); None when it names no such run."""
    path = Path(path)
    found = [path] if is_incomplete(path) else find_incomplete(path)
    found = [p for p in found if (p / PRESET_FILE).is_file()]
    return found[-1] if found else None


def _reopen(path: Path) -> tuple[Path, Path, dict[str, Any]]:
    from tlkit.core.fsutil import final_path

    if is_finished_run(path):
        raise RunError(f"{path}: this run finished; there is nothing to resume")
    tmp = find_preset(path)
    if tmp is None:
        raise RunError(f"{path}: no interrupted --preset best run is there")
    try:
        claim(tmp)
    except FolderBusy:
        raise RunError(f"{tmp}: another process is training this run right now") from None
    state = read_json_record(tmp / PRESET_FILE, RunError, "the run folder is damaged")
    if state.get("schema") != PRESET_SCHEMA:
        raise RunError(f"{tmp / PRESET_FILE}: not a preset record this tlkit reads")
    log.info(
        "resuming %s: %s of --time-limit %s spent before",
        tmp,
        minutes(state["spent_s"]),
        state["time_limit"],
    )
    return tmp, final_path(tmp), state


def _save(tmp: Path, state: dict[str, Any], clock: Clock) -> None:
    state["spent_s"] = clock.spent
    state["ratios"] = clock.ratios
    atomic_write_json(tmp / PRESET_FILE, state)


def _plan(config: BestConfig, state: dict[str, Any], clock: Clock, listing: ImageFolder) -> None:
    """Each backbone's rates measured here, each candidate priced (its training, and its share
    of the ensemble step after: its validation and test passes there, its load), those that
    fit chosen."""
    from tlkit.models.backbones import get_backbone

    counts = (len(listing.splits.get(s, [])) for s in ("train", "val", "test"))
    images, classes = Images(*counts), len(listing.classes)
    rates = {}
    for name in config.backbones:
        spec = get_backbone(name)
        rates[name] = measure(name, spec.resolve_input_size(None), classes)
    epochs = config.base.fit.epochs
    plan: list[dict[str, Any]] = []
    for c in config.candidates():
        r = rates[c.backbone]
        cost = head_seconds(r, images) if c.kind == "head" else fine_tune_seconds(r, images, epochs)
        plan.append({"candidate": c.name, "estimated_s": cost, "ensemble_s": share(r, images)})
    kept, left = fits(
        [(p["candidate"], p["estimated_s"] + p["ensemble_s"]) for p in plan],
        clock.left - RUN_OVERHEAD_S,
    )
    if not kept:
        cheapest = min(plan, key=lambda p: p["estimated_s"] + p["ensemble_s"])
        need = cheapest["estimated_s"] + cheapest["ensemble_s"] + RUN_OVERHEAD_S
        raise ConfigError(
            f"--time-limit {config.time_limit}: the cheapest candidate "
            f"({cheapest['candidate']}) needs about {minutes(need)} here with the ensemble "
            "step; give more time"
        )
    state.update(
        images=dataclasses.asdict(images),
        rates={k: v.as_dict() for k, v in rates.items()},
        order=[p["candidate"] for p in plan],
        plan=[p for p in plan if p["candidate"] in kept],
        left_out=[p for p in plan if p["candidate"] not in kept],
    )
    kept_s = sum(p["estimated_s"] + p["ensemble_s"] for p in state["plan"])
    total = clock.spent + RUN_OVERHEAD_S + kept_s
    log.info(
        "--preset best: fits %s (about %s of %s)%s",
        ", ".join(kept),
        minutes(total),
        config.time_limit,
        "; left out: " + ", ".join(f"{n} (about {minutes(s)})" for n, s in left) if left else "",
    )


def deadline_callback(deadline: float, tick: Any = None) -> Any:
    """A Keras callback that ends training before an epoch that would finish after
    `deadline` (time.monotonic()), judged by the epoch before; `stopped` says it did. `tick()`
    runs after every epoch (the preset saves the time spent: a killed process loses none)."""
    import keras

    class Deadline(keras.callbacks.Callback):  # type: ignore[misc]
        stopped = False

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._began = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            took = time.monotonic() - self._began
            if time.monotonic() + took > deadline and self.model is not None:
                self.model.stop_training = True
                self.stopped = True
            if tick is not None:
                tick()

    return Deadline()


def _train(
    candidate: Candidate,
    config: BestConfig,
    where: tuple[Path, dict[str, Any]],
    clock: Clock,
    verbose: int | str,
    force_resume: bool,
) -> None:
    """Train one candidate, or skip it when what is left no longer holds it (its training and
    its share of the ensemble step). One the plan left out is tried too, in its turn: earlier
    candidates may have taken less than estimated. A candidate that fails on its own (a
    user-facing error: no finite validation loss...) is recorded and the rest go on."""
    from tlkit.core.errors import Interrupted, TlkitError, first_line

    tmp, state = where  # the run being built and its state
    done, name = state["done"], candidate.name
    if name in done:
        return
    priced = {p["candidate"]: p for p in state["plan"] + state["left_out"]}[name]
    folder = tmp / MEMBERS / name
    estimate = priced["estimated_s"] * clock.correction()
    left = clock.left - _kept_share(state)
    if not is_finished_run(folder) and estimate + priced["ensemble_s"] > left:
        note = f"about {minutes(estimate)}; {minutes(max(0.0, left))} left"
        _outcome(tmp, state, clock, name, {"status": "skipped", "note": note})
        return
    slot = _time_for(name, state, clock, left) - _tail(state, candidate)
    stop = deadline_callback(time.monotonic() + slot, lambda: _save(tmp, state, clock))
    log.info("--preset best: training %s (about %s)", name, minutes(estimate))
    began = time.monotonic()
    try:
        whole = _fit_member(candidate, config.base, folder, (verbose, force_resume), stop)
    except Interrupted:
        raise
    except TlkitError as e:
        _outcome(tmp, state, clock, name, {"status": "failed", "note": first_line(e, 200)})
        return
    finally:
        import keras

        keras.backend.clear_session()  # its model is on disk: nine in one process add up
    took = time.monotonic() - began
    if whole:  # a resumed or found member took less here than it cost: no correction
        clock.record(priced["estimated_s"], took)
    note = "stopped by the budget" if stop.stopped else ""
    _outcome(tmp, state, clock, name, {"status": TRAINED, "seconds": took, "note": note})


def _outcome(
    tmp: Path, state: dict[str, Any], clock: Clock, name: str, outcome: dict[str, Any]
) -> None:
    state["done"][name] = outcome
    if outcome["status"] != TRAINED:
        log.warning("--preset best: %s %s (%s)", name, outcome["status"], outcome["note"])
    _save(tmp, state, clock)


def _fit_member(
    candidate: Candidate,
    base: FinetuneConfig,
    folder: Path,
    how: tuple[int | str, bool],
    stop: Any,
) -> bool:
    """Train the candidate's run into `folder`, or finish its interrupted one; whether it
    trained whole here (False: resumed, or found finished)."""
    from tlkit.training.resume import IDENTITY_FILE
    from tlkit.training.train import finetune

    verbose, force_resume = how
    if is_finished_run(folder):
        return False
    found = [p for p in find_incomplete(folder) if (p / "checkpoints" / IDENTITY_FILE).is_file()]
    if found:
        finetune(None, verbose, found[-1], force_resume, callbacks=[stop])
        return False
    finetune(candidate.config(base, folder.parent), verbose, callbacks=[stop])
    return True


def _kept_share(state: dict[str, Any]) -> float:
    """What the ensemble step will need for the members trained so far, and its fixed part."""
    shares = {p["candidate"]: p["ensemble_s"] for p in state["plan"] + state["left_out"]}
    trained = [n for n, d in state["done"].items() if d["status"] == TRAINED]
    return RUN_OVERHEAD_S + float(sum(shares[n] for n in trained))


def _time_for(name: str, state: dict[str, Any], clock: Clock, left: float) -> float:
    """The seconds candidate `name` may take: whatever the planned candidates after it do not
    need (at their corrected estimates, with their ensemble shares), and at least SHARE times
    its own estimate, never more than is left. A fine-tune is never cut short while the
    budget has room for it and for the plan after it."""
    order, fix = state["order"], clock.correction()
    priced = {p["candidate"]: p for p in state["plan"] + state["left_out"]}
    planned = {p["candidate"] for p in state["plan"]}
    later = [n for n in order[order.index(name) + 1 :] if n in planned and n not in state["done"]]
    rest = sum(priced[n]["estimated_s"] * fix + priced[n]["ensemble_s"] for n in later)
    mine = priced[name]["estimated_s"] * fix
    return float(min(left - priced[name]["ensemble_s"], max(SHARE * mine, left - rest)))


def _tail(state: dict[str, Any], candidate: Candidate) -> float:
    """What a run does after its last epoch: the saved model's val and test scores, records."""
    rates = Rates(**state["rates"][candidate.backbone])
    images = Images(**state["images"])
    return (images.val + images.test) * rates.forward_s + rates.build_s


def _finish(
    config: BestConfig, tmp: Path, run_dir: Path, state: dict[str, Any], clock: Clock
) -> Run:
    """The trained candidates as one model (weighted by `--ensemble-weights auto`), its
    views chosen on val where the budget still holds that, the leaderboard and the run
    record; the folder published whole."""
    from tlkit.core.fsutil import discard
    from tlkit.evaluation.ensemble import build_ensemble

    done = state["done"]
    trained = [n for n in state["order"] if done.get(n, {}).get("status") == TRAINED]
    if not trained:
        discard(tmp)  # nothing to keep, and nothing a resume could add within this limit
        notes = "; ".join(f"{n}: {d['status']} ({d['note']})" for n, d in done.items())
        raise RunError(
            f"no candidate trained within --time-limit {config.time_limit} ({notes}); give "
            "more time"
        )
    began = time.monotonic()
    every = {n: load_run(tmp / MEMBERS / n) for n in trained}
    trained = _distinct(trained, every, state)
    runs = [every[n] for n in trained]
    model, geometry, ensemble = build_ensemble(runs, AUTO)
    ensemble["members"] = [f"{MEMBERS}/{n}" for n in trained]
    for branch, n in zip(ensemble["branches"], trained, strict=True):
        branch["run"] = f"{MEMBERS}/{n}"
    with atomic_path(tmp / "model.keras") as path:
        model.save(path)
    record = _record(config, runs, geometry, ensemble, tmp)
    weighted = [
        state["rates"][r.record.backbone]
        for r, w in zip(runs, ensemble["member_weights"], strict=True)
        if w > 0
    ]
    views_s = views_seconds([Rates(**r) for r in weighted], Images(**state["images"]))
    time_for_views = clock.left - views_s - _kept_share(state) / 2 > 0
    scores = _scores(Run(tmp, record), config.base.loader.batch_size, time_for_views)
    ensemble.update(views=scores.pop("views"), seconds=time.monotonic() - began)
    weights = dict(zip(trained, ensemble["member_weights"], strict=True))
    ensemble["candidates"] = _leaderboard(state, every, weights, ensemble, scores)
    record = dataclasses.replace(
        record,
        results={"best": scores["best"], "test": scores["test"]},
        extra={"ensemble": ensemble, "preset": "best"},
    )
    _save(tmp, state, clock)
    atomic_write(tmp / LEADERBOARD, _csv(ensemble["candidates"]))
    atomic_write_json(tmp / RUN_FILE, record.as_dict())
    try:
        publish_dir(tmp, run_dir, overwrite=config.base.overwrite)
    except FileExistsError:
        raise RunError(
            f"{run_dir}: appeared while training; the finished run is in {tmp}"
        ) from None
    log.info("--preset best: %s in all (--time-limit %s)", minutes(clock.spent), config.time_limit)
    return load_run(run_dir)


def _record(
    config: BestConfig, runs: list[Run], geometry: Any, ensemble: dict[str, Any], tmp: Path
) -> RunRecord:
    """run.json of the one model: what eval, predict and export read (its input view, the
    classes, the data and split its members trained on)."""
    import keras

    first = runs[0].record
    return RunRecord(
        backbone="ensemble",
        weights={"source": "ensemble", "path": None, "sha256": file_hash(tmp / "model.keras")},
        freeze={"request": "--preset best", "n_frozen": 0, "n_layers": 0, "last_frozen": None},
        input_size=geometry.size,
        preprocessing="inside each member",
        crop_fraction=geometry.crop_fraction,
        classes=first.classes,
        config={**config.base.as_dict(), "preset": "best", "time_limit": config.time_limit},
        data=first.data,
        seed=config.base.loader.seed,
        tlkit_version=_version.__version__,
        keras_version=keras.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        views_seen=_common_views([r.record for r in runs], ensemble["member_weights"]),
        extra={"ensemble": ensemble, "preset": "best"},
    )


def _common_views(records: list[RunRecord], weights: list[float]) -> dict[str, Any]:
    """The views every member in the model trained on: its own when they agree, else the eval
    view (mirrored only if every one saw mirrors)."""
    from tlkit.data.views_seen import ViewsSeen, views_seen

    seen = [views_seen(r) for r, w in zip(records, weights, strict=True) if w > 0]
    if all(s.as_dict() == seen[0].as_dict() for s in seen):
        return seen[0].as_dict()
    mirror = all(s.mirror for s in seen)
    why = "its members trained on different views: the eval view" + (
        " and its mirror" if mirror else ""
    )
    return ViewsSeen("center", (1.0, 1.0), (1.0, 1.0), mirror, why).as_dict()


def _scores(run: Run, batch_size: int, views: bool) -> dict[str, Any]:
    """The one model's single-crop validation and test figures, and (`views`: the budget
    holds it) its test-time views chosen on validation, as `eval --multicrop` chooses them."""
    from tlkit.core.calibration import log_loss
    from tlkit.evaluation.evaluate import (
        Member,
        ViewChoice,
        ViewRunner,
        eval_examples,
        resolve_views,
    )

    runner = ViewRunner([Member(run)])
    choice = (
        resolve_views(runner, AUTO, batch_size)[0]
        if views
        else ViewChoice("1", "no time left in --time-limit to score views on validation")
    )
    out: dict[str, Any] = {"views": choice.as_dict(), "test": None}
    for split in ("val", "test"):
        try:
            examples = eval_examples(run, None, split).examples
        except DataError:  # no test split: nothing to report
            continue
        probs = runner.probs([e.path for e in examples], "1", batch_size)[0]
        if probs is None:
            raise RuntimeError("the one model gave no probabilities")  # a bug
        labels = np.array([e.label for e in examples])
        p = probs[:, 0]
        top1, loss = float((p.argmax(1) == labels).mean()), log_loss(p, labels)
        if split == "val":
            out["best"] = {"val_loss": loss, "val_accuracy": top1, "phase": "ensemble", "epoch": 0}
        else:
            out["test"] = {"accuracy": top1, "loss": loss, "images": len(labels), "views": 1}
    return out


def _distinct(trained: list[str], runs: dict[str, Run], state: dict[str, Any]) -> list[str]:
    """The trained candidates that are models of their own. A fine-tune whose best check was
    in its head phase saved the very head its backbone's head-only candidate saved (the same
    seed, features and head training), so it is that model again: it stays on the
    leaderboard, out of the ensemble, where it would double that model's weight."""
    out = []
    for name in trained:
        backbone = runs[name].record.backbone
        head = Candidate(backbone, "head").name
        best: dict[str, Any] = dict(runs[name].record.results.get("best") or {})
        if name != head and head in trained and best.get("phase") == "head":
            state["done"][name]["note"] = f"the same model as {head}: no fine-tune epoch beat it"
            continue
        out.append(name)
    return out


def _leaderboard(
    state: dict[str, Any],
    by_name: dict[str, Run],
    weights: dict[str, float],
    ensemble: dict[str, Any],
    scores: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every candidate's row, best validation loss first, and the ensemble's."""
    estimates = {p["candidate"]: p["estimated_s"] for p in state["plan"] + state["left_out"]}
    rows = []
    for name, estimate in estimates.items():
        done = state["done"].get(name, {"status": "not tried", "note": None})
        row: dict[str, Any] = dict.fromkeys(LEADERBOARD_COLUMNS)
        row.update(candidate=name, status=done["status"], note=done.get("note") or None)
        row["estimated_seconds"] = round(estimate, 1)
        if name in by_name:
            record = by_name[name].record
            chosen: dict[str, Any] = dict(record.results.get("best") or {})
            row.update(
                val_loss=chosen.get("val_loss"),
                val_top1=chosen.get("val_accuracy"),
                head_features=record.head_features.get("used", "last"),
                ensemble_weight=weights.get(name),
                seconds=round(done.get("seconds", 0.0), 1),
            )
        rows.append(row)
    best = scores["best"]
    rows.append(
        {
            **dict.fromkeys(LEADERBOARD_COLUMNS),
            "candidate": "ensemble",
            "status": "kept",
            "val_loss": best["val_loss"],
            "val_top1": best["val_accuracy"],
            "seconds": round(ensemble["seconds"], 1),
            "note": f"weights {ensemble['member_weights_rule']} (chosen on val); views "
            f"{ensemble['views']['views']}",
        }
    )
    scored = sorted((r for r in rows if r["val_loss"] is not None), key=lambda r: r["val_loss"])
    return scored + [r for r in rows if r["val_loss"] is None]


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, LEADERBOARD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def leaderboard_lines(run: Run) -> list[str]:
    """The leaderboard as the CLI prints it."""
    rows = run.record.extra["ensemble"]["candidates"]
    head = f"{'candidate':34} {'val top-1':>9} {'val loss':>8} {'weight':>6} {'seconds':>7}  note"
    lines = [head]
    for r in rows:
        top1 = f"{r['val_top1']:.1%}" if r["val_top1"] is not None else "-"
        loss = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        weight = f"{r['ensemble_weight']:.2f}" if r["ensemble_weight"] is not None else "-"
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        note = r["note"] or r["status"]
        lines.append(f"{r['candidate']:34} {top1:>9} {loss:>8} {weight:>6} {seconds:>7}  {note}")
    return lines
