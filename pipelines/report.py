"""report.html for a pipeline run: every stage's images, the loss curves and the timings.

Images are linked by relative path, so the report folder can be zipped or served as it is.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from dfd_data.atomic import atomic_write_bytes, atomic_write_text
from dfd_data.dataset import read_jsonl

from .runner import MANIFEST

# (title, path relative to the run folder, caption); missing images are left out.
_SECTIONS = [
    ("Faces from rough sketches", "generated/rough/grid.jpg",
     "rough sketch | the sketch after projection onto the training sketches (what the model reads) | face"),
    ("Faces from rough sketches, as drawn", "generated/rough-raw/grid.jpg",
     "the same rough sketches with refine 0: no projection, so the model sees the roughness"),
    ("Faces from the training sketches", "generated/sketches/grid.jpg", "sketch | projected sketch | face"),
    ("Aligned faces", "faces/previews/align.jpg", "green crosses: where the template puts eyes and mouth"),
    ("Synthetic sketches", "faces/previews/sketches-photocopy+simplify.jpg", "photo | photocopy+simplify sketch"),
    ("Component crops", "faces/previews/components-images.jpg", "left eye, right eye, nose, mouth, remainder"),
]


def plot_losses(stats: Path, target: Path) -> bool:
    """Stage 1 and stage 2 loss curves from stats.jsonl into a PNG; False when there are no stats."""
    if not stats.is_file():
        return False
    rows = read_jsonl(stats)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for axis, stage in zip(axes, (1, 2)):
        own = [r for r in rows if r["stage"] == stage]
        for key in (own[0]["losses"] if own else {}):
            axis.plot([r["step"] for r in own], [r["losses"][key] for r in own], label=key)
        axis.set_title(f"stage {stage}: " + ("component auto-encoders (MSE)" if stage == 1 else
                                             "feature decoders + generator"))
        axis.set_xlabel("step")
        axis.set_yscale("log")
        if own:
            axis.legend(fontsize=7)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    from io import BytesIO

    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    atomic_write_bytes(target, buffer.getvalue())
    return True


def _figure(title: str, source: str, caption: str) -> str:
    return (f"<h2>{html.escape(title)}</h2>\n<figure><img src=\"{html.escape(source)}\" alt=\"{html.escape(title)}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def _time_cell(step: dict) -> str:
    """A step's time in the table: the report is written while its own step is still running."""
    if step.get("skipped"):
        return "skipped"
    if step["status"] == "running":
        return "(writing this page)"
    return f"{step.get('seconds')} s{' (some files failed)' if step['status'] == 'partial' else ''}"


def write_report(out: Path, name: str) -> Path:
    """Write out/report.html from what the run folder holds; returns its path."""
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>DeepFaceDrawing {html.escape(name)} run"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%;border:1px solid #ccc}td,th{padding:2px 10px;text-align:left}"
             "figcaption{color:#555;font-size:90%}</style></head><body>",
             f"<h1>DeepFaceDrawing: {html.escape(name)} pipeline</h1>"]
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {"steps": []}
    for title, relpath, caption in _SECTIONS[:3]:
        if (out / relpath).is_file():
            parts.append(_figure(title, relpath, caption))
    run = out / "run"
    if plot_losses(run / "stats.jsonl", out / "report" / "losses.png"):
        parts.append(_figure("Training losses", "report/losses.png", "mean loss per logged interval (log scale)"))
    grids = sorted((run / "grids").glob("*.jpg")) if (run / "grids").is_dir() else []
    for stage, caption in ((1, "validation sketch | auto-encoder reconstruction"),
                           (2, "validation sketch | generated face | real photo")):
        own = [g for g in grids if g.name.startswith(f"stage{stage}-")]
        if own:
            parts.append(_figure(f"Stage {stage} at its last step ({own[-1].stem})",
                                 own[-1].relative_to(out).as_posix(), caption))
    for title, relpath, caption in _SECTIONS[3:]:
        if (out / relpath).is_file():
            parts.append(_figure(title, relpath, caption))
    rows = "".join(f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['description'])}</td>"
                   f"<td>{_time_cell(s)}</td><td><code>{html.escape(s['command'])}</code></td></tr>"
                   for s in manifest["steps"])
    parts.append(f"<h2>Steps and timings</h2><table><tr><th>step</th><th>what</th><th>time</th><th>command</th></tr>"
                 f"{rows}</table></body></html>\n")
    target = out / "report.html"
    atomic_write_text(target, "\n".join(parts))
    return target


__all__ = ["plot_losses", "write_report"]
