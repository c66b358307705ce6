"""The figures and files `evaluate` and `diagnose` write
(metrics.json, predictions.csv, confusion_matrix.png, report.html).

The HTML report is one self-contained file (figures and thumbnails inlined), so it can be mailed
or archived as it is.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlkit.core.figures import new_figure, png_bytes
from tlkit.core.fsutil import atomic_path, atomic_write, atomic_write_json
from tlkit.data.datasets import Example

WORST = 12


def confusion_png(cm: np.ndarray, classes: Sequence[str]) -> bytes:
    n = len(classes)
    side = min(14.0, 2.0 + 0.45 * n)
    fig = new_figure(side, side)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 8 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if cm[i, j] > top / 2 else "black",
                )
    fig.tight_layout()
    return png_bytes(fig)


def reliability_png(bins: Sequence[dict[str, Any]]) -> bytes:
    """Accuracy against confidence per bin, with the diagonal a calibrated model follows and
    each bin's share of the predictions."""
    fig = new_figure(4.5, 4.5)
    ax = fig.subplots()
    used = [b for b in bins if b["count"]]
    total = sum(b["count"] for b in used) or 1
    ax.bar(
        [(b["lo"] + b["hi"]) / 2 for b in used],
        [b["accuracy"] for b in used],
        width=[b["hi"] - b["lo"] for b in used],
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.plot(
        [(b["lo"] + b["hi"]) / 2 for b in used],
        [b["count"] / total for b in used],
        "o-",
        color="tab:orange",
        markersize=3,
        label="share of images",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _jpeg(image: np.ndarray, side: int = 128) -> str:
    """An RGB array as a base64 JPEG thumbnail, for inline <img>."""
    img = Image.fromarray(image)
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _thumb(path: str) -> str:
    from tlkit.data.decode import decode_image

    return _jpeg(decode_image(path))


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    examples: Sequence[Example],
    probs: np.ndarray,
    classes: Sequence[str],
    explain: Any = None,
) -> None:
    """`explain(paths, classes)`, when given, draws where the model looked (explain.py) for
    the report's worst mistakes."""
    atomic_write_json(out / "metrics.json", metrics)
    k = min(5, len(classes))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "path",
            "true",
            "predicted",
            *[f"top{i + 1}{s}" for i in range(k) for s in ("", "_probability")],
        ]
    )
    for e, row, p in zip(examples, top, probs, strict=True):
        cells = [x for j in row for x in (classes[j], f"{p[j]:.6f}")]
        writer.writerow([e.relpath, e.class_name, classes[row[0]], *cells])
    atomic_write(out / "predictions.csv", buf.getvalue())
    png = confusion_png(np.array(metrics["confusion_matrix"]), classes)
    with atomic_path(out / "confusion_matrix.png") as tmp:
        tmp.write_bytes(png)
    reliability = reliability_png(metrics["calibration"]["reliability"])
    with atomic_path(out / "reliability_diagram.png") as tmp:
        tmp.write_bytes(reliability)
    atomic_write(
        out / "report.html",
        report_html(metrics, examples, probs, classes, png, reliability, explain),
    )


def _summary(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's headline figures, (name, value) rows."""
    summary = [("images", metrics["images"]), ("top-1", f"{metrics['top1']:.4f}")]
    if "top5" in metrics:
        summary.append(("top-5", f"{metrics['top5']:.4f}"))
    summary += [
        ("macro F1", f"{metrics['macro']['f1']:.4f}"),
        ("weighted F1", f"{metrics['weighted']['f1']:.4f}"),
        ("log loss", f"{metrics['log_loss']:.4f}"),
        (f"ECE ({metrics['calibration']['bins']} bins)", f"{metrics['calibration']['ece']:.4f}"),
        ("views per image", ", ".join(f"{v['views']} ({v['count']})" for v in metrics["views"])),
    ]
    if "member_disagreement" in metrics:
        summary.append(("members disagree on", f"{metrics['member_disagreement']:.1%}"))
    return summary


def _mistakes(
    examples: Sequence[Example], probs: np.ndarray, classes: Sequence[str], explain: Any
) -> str:
    """The most confident mistakes as figures: the image, where the model looked, the labels."""
    e = html.escape
    labels = np.array([x.label for x in examples])
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    worst = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:WORST]
    looks = (
        explain([examples[i].path for i in worst], [int(pred[i]) for i in worst])
        if explain is not None
        else [None] * len(worst)
    )
    return "".join(
        f"<figure><img src='data:image/jpeg;base64,{_thumb(examples[i].path)}'>"
        + (f"<img src='data:image/jpeg;base64,{_jpeg(look)}'>" if look is not None else "")
        + f"<figcaption>{e(examples[i].relpath)}<br>true {e(classes[labels[i]])}, predicted "
        f"{e(classes[pred[i]])} ({probs[i, pred[i]]:.1%})</figcaption></figure>"
        for i, look in zip(worst, looks, strict=True)
    )


def report_html(
    metrics: dict[str, Any],
    examples: Sequence[Example],
    probs: np.ndarray,
    classes: Sequence[str],
    confusion: bytes,
    reliability: bytes,
    explain: Any = None,
) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(c['model'])}</td><td>{c['single_crop_top1']:.4f}</td>"
        f"<td>{c['multicrop_top1']:.4f}</td></tr>"
        for c in metrics["comparison"]
    )
    per_class = "".join(
        f"<tr><td>{e(name)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        for name, v in metrics["per_class"].items()
    )
    confused = "".join(
        f"<li>{e(c['true'])} &rarr; {e(c['predicted'])}: {c['count']}</li>"
        for c in metrics["most_confused"]
    )
    mistakes = _mistakes(examples, probs, classes, explain)
    summary_rows = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in _summary(metrics)
    )
    members = "".join(
        f"<li>{e(m)} (weight {w:.3f})</li>"
        for m, w in zip(metrics["members"], metrics["member_weights"], strict=True)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tlkit evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}figure{{display:inline-block;
width:150px;margin:4px;font-size:11px;vertical-align:top}}</style></head><body>
<h1>Evaluation: {e(metrics["source"])}</h1>
<p>multi-crop: {e(metrics["multicrop"])}; members:</p><ul>{members}</ul>
<h2>Test-time views</h2>{_views(metrics["views"])}
{"".join(f"<p><b>Note:</b> {e(n)}</p>" for n in metrics["notes"])}
<h2>Summary</h2><table>{summary_rows}</table>
<h2>Single-crop vs multi-crop vs ensemble (top-1)</h2>
<table><tr><th>model</th><th>single crop</th><th>multi-crop ({e(metrics["multicrop"])})</th></tr>
{rows}</table>
<h2>Reliability</h2><p>{e(_temperatures(metrics))}</p>
<img src="data:image/png;base64,{base64.b64encode(reliability).decode()}">
<h2>Confusion matrix</h2><img src="data:image/png;base64,{base64.b64encode(confusion).decode()}">
<h2>Most confused pairs</h2><ul>{confused or "<li>none</li>"}</ul>
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>
<th>support</th></tr>{per_class}</table>
<h2>Worst mistakes</h2>{mistakes or "<p>none</p>"}
</body></html>
"""


def _views(views: list[dict[str, Any]]) -> str:
    """Each member's views, why, and --multicrop auto's validation scores."""
    from tlkit.evaluation.views import describe

    e = html.escape
    out = []
    for v in views:
        out.append(
            f"<p>{e(v['run'])}: <b>{e(v['views'])}</b> "
            f"({e(describe(v['views'], v['count']))}): {e(v['why'])}"
            + (
                f"; <b>outside training:</b> {e(v['outside_training'])}"
                if v["outside_training"]
                else ""
            )
            + "</p>"
        )
        if v["candidates"]:
            out.append(
                "<table><tr><th>candidate</th><th>val log loss</th><th>val top-1</th>"
                "<th>SE above best</th></tr>"
                + "".join(
                    f"<tr><td>{e(c['views'])}</td><td>{c['val_loss']:.4f}</td>"
                    f"<td>{c['val_top1']:.4f}</td><td>"
                    + (
                        "below single-crop"
                        if c["below_single_crop"]
                        else "above by a constant"
                        if c["se_above_best"] is None
                        else f"{c['se_above_best']:.2f}"
                    )
                    + "</td></tr>"
                    for c in v["candidates"]
                )
                + "</table>"
            )
    return "".join(out)


def _temperatures(metrics: dict[str, Any]) -> str:
    fitted = [f for f in metrics["calibration"].get("fitted", []) if f]
    if not fitted:
        return "Not calibrated (finetune --calibrate fits temperature scaling on val)."
    return (
        "Calibrated by temperature scaling on the validation split: "
        + "; ".join(
            f"T = {f['temperature']:.3f}, validation ECE {f['before']['ece']:.4f} -> "
            f"{f['after']['ece']:.4f}"
            for f in fitted
        )
        + "."
    )


def _figure(path: str, look: np.ndarray | None, name: str, caption: str) -> str:
    """A thumbnail, with where the model looked beside it when known, and a caption."""
    extra = f"<img src='data:image/jpeg;base64,{_jpeg(look)}'>" if look is not None else ""
    return (
        f"<figure><img src='data:image/jpeg;base64,{_thumb(path)}'>{extra}"
        f"<figcaption>{html.escape(name)}<br>{html.escape(caption)}</figcaption></figure>"
    )


def diagnose_html(
    found: dict[str, Any],
    files: dict[str, str],
    looks: dict[str, np.ndarray] | None = None,
    top: int = 50,
) -> str:
    """`diagnose`'s page: likely label errors, near-duplicates and top losses, with thumbnails
    (inline, so the one file travels)."""
    e = html.escape

    def fig(rel: str, caption: str) -> str:
        return _figure(files[rel], (looks or {}).get(rel), rel, caption)

    issues = "".join(
        fig(
            r["path"],
            f"labelled {r['label']}, looks like {r['suggested']} "
            f"(p(label) {r['given_label_probability']:.3f})",
        )
        for r in found["label_issues"][:top]
    )

    def side(x: dict[str, Any]) -> str:
        return fig(x["path"], f"{x['split']} {x['label']}")

    dups = "".join(
        f"<div class='pair'>{side(d['a'])}{side(d['b'])}"
        f"<p>{e(d['kind'])}, cosine {d['similarity']:.4f}</p></div>"
        for d in found["near_duplicates"][:top]
    )
    losses = "".join(
        fig(
            r["path"],
            f"{r['split']}: true {r['label']}, predicted {r['predicted']}, loss {r['loss']:.2f}",
        )
        for r in found["top_losses"][:top]
    )
    confused = "".join(
        f"<li>{e(c['true'])} &rarr; {e(c['predicted'])}: {c['count']}</li>"
        for c in found.get("held_out", {}).get("most_confused", [])
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tlkit diagnose</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}figure{{display:inline-block;
width:150px;margin:4px;font-size:11px;vertical-align:top}}.pair{{display:inline-block;
border:1px solid #ccc;margin:4px;padding:4px}}</style></head><body>
<h1>Diagnose: {e(found["run"])}</h1>
<p>{found["images"]} images; out-of-fold accuracy of the {found["folds"]}-fold heads on the
training split: {found["out_of_fold_accuracy"]:.4f}. Edit <code>relabel.csv</code> to fix
labels.</p>
<h2>Likely label errors ({len(found["label_issues"])})</h2>{issues or "<p>none</p>"}
<h2>Near-duplicates ({len(found["near_duplicates"])}, cosine &ge;
{found["duplicate_similarity"]})</h2>{dups or "<p>none</p>"}
<h2>Top losses on the held-out splits</h2>{losses or "<p>none</p>"}
<h2>Most confused pairs</h2><ul>{confused or "<li>none</li>"}</ul>
</body></html>
"""
