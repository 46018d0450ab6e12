"""The HTML report (``cilearn report``): one self-contained file. Every picture is a PNG inlined
as a ``data:`` URI, the style sheet and the one script are inline, and a Content-Security-Policy
forbids any other source, so the page renders without network access. The script checks that
every image decoded and records it in ``<body data-images="N/M">``.
"""
from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..evaluate import class_forgetting
from ..files import atomic_write
from ..results import METRICS, Group, Run, load_groups, protocol_differences, run_summary, table_rows, unique_labels
from .figures import (TIMINGS, _png, class_names, curves_figure, fig_accuracy, fig_accuracy_matrix,
                      fig_class_forgetting, fig_confusion, fig_memory, fig_old_new, fig_timings, phase_timings)


# ---------------------------------------------------------------- HTML
def img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _num(v: Any, digits: int = 2) -> str:
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:.{digits}f}"


def sec_config(run: "Run") -> str:
    text = (run.path / "config.yaml").read_text() if (run.path / "config.yaml").is_file() else ""
    return f"<pre>{html.escape(text)}</pre>" if text else missing("no config.yaml in this run directory")


def sec_summary(run: "Run") -> str:
    s = run_summary(run.metrics)
    return table(["metric", "value"], [[mt.label, _num(s[mt.key], mt.digits)] for mt in METRICS])


def sec_accuracy(run: "Run") -> str:
    m = run.metrics
    rows = [[str(r["phase"]), str(r["classes_seen"]), _num(r.get("acc")), _num(r.get("acc_nme")), _num(r.get("top5"))]
            for r in m["phases"]]
    return img(fig_accuracy(m), "accuracy curves") + table(["phase", "classes seen", "CNN", "NME", "top-5"], rows)


def sec_matrix(run: "Run") -> str:
    return img(fig_accuracy_matrix(run.metrics), "accuracy matrix")


def sec_forgetting(run: "Run") -> str:
    png = fig_class_forgetting(run.metrics)
    if png is None:
        return missing("not available: a single phase, or metrics.json has no per_class_acc (a run from before "
                       "per-class accuracies were recorded)")
    return img(png, "per-class forgetting")


def sec_classes(run: "Run") -> str:
    """One row per class, in order of arrival: name, data set label, the phase that brought it, its
    accuracy then and after the last phase, its forgetting."""
    m = run.metrics
    acc = [r.get("per_class_acc") for r in m["phases"]]
    if any(a is None for a in acc):
        return missing("not available: metrics.json has no per_class_acc (a run from before per-class accuracies "
                       "were recorded)")
    k = len(acc[-1])
    names, order = class_names(m, k), m.get("class_order") or [None] * k
    first = [next(i for i, a in enumerate(acc) if c < len(a)) for c in range(k)]
    lost = class_forgetting(acc) if len(acc) > 1 else [None] * k
    rows = [[str(c), names[c], "-" if order[c] is None else str(order[c]), str(first[c]), _num(acc[first[c]][c]),
             _num(acc[-1][c]), _num(lost[c])] for c in range(k)]
    body = table(["id", "class", "label", "phase", "acc when learned", "acc last", "forgetting"], rows)
    return body if k <= 50 else f"<details><summary>{k} classes</summary>{body}</details>"


def sec_old_new(run: "Run") -> str:
    rows = [[str(r["phase"]), _num(r.get("acc_old")), _num(r.get("acc_new")), _num(r.get("acc_old_among_old")),
             _num(r.get("acc_new_among_new"))] for r in run.metrics["phases"]]
    return img(fig_old_new(run.metrics), "old and new accuracy per phase") + \
        table(["phase", "old", "new", "old among old", "new among new"], rows)


def sec_confusion(run: "Run") -> str:
    png = fig_confusion(run.metrics)
    return img(png, "confusion matrix of the last phase") if png else \
        missing("not available: metrics.json has no confusion matrix (a run from before it was recorded)")


def sec_memory(run: "Run") -> str:
    mem = run.metrics.get("memory") or {}
    png = fig_memory(run.metrics)
    if png is None:
        return missing("this run keeps no exemplars" if not mem.get("total_images") else
                       f"{mem.get('total_images')} exemplars, {mem.get('total_bytes', 0):,} bytes; the per-class "
                       "counts were not recorded by this run")
    return img(png, "memory per class")


def sec_timings(run: "Run") -> str:
    rows = [phase_timings(r) for r in run.metrics["phases"]]
    keys = [(k, label) for k, label in TIMINGS if any(k in r for r in rows)]
    body = [[str(i)] + [_num(r.get(k), 1) for k, _ in keys] + [_num(p.get("train_images_per_s"), 0)]
            for i, (r, p) in enumerate(zip(rows, run.metrics["phases"]))]
    return img(fig_timings(run.metrics), "timings per phase") + \
        table(["phase"] + [f"{label} s" for _, label in keys] + ["train img/s"], body)


# method-specific pictures written by the run itself: (title, file pattern, how to ask for them)
PICTURES = (("Attention maps (LwM)", "attention-phase*.png", "--save-attention N"),
            ("t-SNE of embeddings and exemplars", "tsne-phase*.png", "--save-tsne"),
            ("Generated samples (DF-GR)", "samples-phase*.png", "--save-samples N"),
            ("Compressed exemplars (CIM)", "compressed-phase*.png", "an exemplar compressor"))


def _phase_of(p: Path) -> int:
    m = re.search(r"phase(\d+)", p.stem)
    return int(m.group(1)) if m else -1


def sec_pictures(run: "Run") -> str:
    parts = []
    for title, pattern, flag in PICTURES:
        files = sorted(run.path.glob(pattern), key=_phase_of)
        if files:
            parts.append(f"<h3>{html.escape(title)}</h3>" + "".join(
                f"<figure>{img(f.read_bytes(), f'{title}, {f.name}')}<figcaption>{html.escape(f.name)}</figcaption>"
                "</figure>" for f in files))
    if not parts:
        return missing("none for this run (they are written with --save-attention N, --save-tsne, --save-samples N)")
    return "".join(parts)


@dataclass(frozen=True)
class Section:
    key: str                 # the HTML id suffix and data-section value
    title: str
    build: Callable[["Run"], str]


SECTIONS: tuple[Section, ...] = (
    Section("config", "Configuration", sec_config),
    Section("summary", "Summary", sec_summary),
    Section("accuracy", "Accuracy per phase (CNN and NME)", sec_accuracy),
    Section("matrix", "Accuracy matrix", sec_matrix),
    Section("forgetting", "Per-class forgetting", sec_forgetting),
    Section("classes", "Per-class accuracy", sec_classes),
    Section("old-new", "Old and new classes per phase", sec_old_new),
    Section("confusion", "Confusion matrix of the last phase", sec_confusion),
    Section("memory", "Memory per class", sec_memory),
    Section("timings", "Timings", sec_timings),
    Section("pictures", "Method-specific pictures", sec_pictures),
)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1.05em}
section.run{margin-top:2.5em}nav a{margin-right:.8em}img{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.8em;max-height:30em}
.missing{color:#777;font-style:italic}.note{color:#a40}figure{margin:0 0 1em 0}figcaption{font-size:.8em;color:#555}
#img-status{font-size:.8em;color:#555}
"""

# Marks <body data-images="N/M"> once the page has loaded: N of its M images decoded (complete, with
# naturalWidth > 0; a broken image has none). Read by the headless-browser test; a person sees the
# same count at the top of the page.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var n = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", n + "/" + imgs.length);
  document.getElementById("img-status").textContent = n + " of " + imgs.length + " images decoded";
});
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def run_title(run: "Run") -> str:
    data = (run.config.get("data") or {}).get("dataset", "?")
    seed = f", seed {run.seed}" if run.seed is not None else ""
    return f"{run.method} on {data}{seed} ({run.path})"


def render_run(run: "Run", index: int) -> str:
    parts = [f'<section class="run" id="run{index}"><h2>{html.escape(run_title(run))}</h2>']
    for s in SECTIONS:
        parts.append(f'<section id="run{index}-{s.key}" data-section="{s.key}"><h3>{html.escape(s.title)}</h3>'
                     f"{s.build(run)}</section>")
    return "".join(parts) + "</section>"


def render_comparison(groups: list["Group"]) -> str:
    """Several runs: the comparison table and the overlaid curves first."""
    groups = unique_labels(groups)
    head, rows = table_rows(groups)
    notes = "".join(f'<p class="note">Note: {html.escape(n)}</p>' for _, n in protocol_differences(groups))
    return (f'<section id="comparison" data-section="comparison"><h2>Comparison</h2>{notes}'
            f"{table(head, rows)}{img(_png(curves_figure(groups)), 'accuracy curves of all runs, mean ± std')}"
            "</section>")


def render_html(groups: list["Group"]) -> str:
    """The whole page for ``groups`` (each group's runs in turn)."""
    runs = [r for g in groups for r in g.runs]
    methods = ", ".join(dict.fromkeys(r.method for r in runs))
    datasets = ", ".join(dict.fromkeys(str((r.config.get("data") or {}).get("dataset", "?")) for r in runs))
    title = f"cilearn report: {methods} on {datasets}"
    nav = "".join(f'<a href="#run{i}">{html.escape(run_title(r).split(" (")[0])}</a>' for i, r in enumerate(runs))
    body = [f"<h1>{html.escape(title)}</h1>", f'<p id="img-status">images not checked yet</p><nav>{nav}</nav>']
    if len(runs) > 1:
        body.append(render_comparison(groups))
    body += [render_run(r, i) for i, r in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f'<body data-images="pending">{"".join(body)}<script>{SCRIPT}</script></body></html>\n')


def html_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """``cilearn report DIR... [--html OUT]``: one self-contained HTML file for the runs of each
    directory (a run, a seed directory of ``cilearn run --seeds``, or a comparison directory of
    ``cilearn compare``: ``results.load_groups``). ``out`` defaults to ``report.html`` in the
    directory (several: in their deepest common parent directory)."""
    if not run_dirs:
        raise ConfigError("cilearn report needs at least one run directory")
    groups = [g for d in run_dirs for g in load_groups(d)]
    path = Path(out) if out is not None else common_parent([Path(d) for d in run_dirs]) / "report.html"
    if path.parent and not path.parent.is_dir():
        raise ConfigError(f"--html {path}: the directory {path.parent} does not exist")
    atomic_write(path, render_html(groups))
    return path


def common_parent(dirs: list[Path]) -> Path:
    """The directory itself for one; for several, the deepest directory holding them all."""
    if len(dirs) == 1:
        return dirs[0]
    return Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
