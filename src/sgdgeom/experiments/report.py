"""``sgdgeom report``: one self-contained HTML page (figures embedded) for a result store.

For every sweep in the store it draws the sweep's figures (from the store alone, see
:mod:`~sgdgeom.experiments.plots`), a table of its runs and a table of the groups (mean ±
std of the best and final test accuracy over seeds). A directory may also hold
``sections.json``, extra sections written by other experiments (``sgdgeom demo`` puts the
diffusion spectrum, the layer temperatures and the geodesic there): a list of
``{"title", "text", "table": [[header...], [row...], ...], "images": [paths]}``, with paths
relative to the directory. Only files inside the directory are embedded.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sgdgeom.errors import InputError, SgdgeomError
from sgdgeom.experiments.plots import group_label, mean_and_error, plot_sweep
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.files import atomic_write_bytes, inside, refuse_links

__all__ = ["SECTIONS", "write_report"]

SECTIONS = "sections.json"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.failed { color: #b00; } .muted { color: #777; }
"""


def _table(rows: list[list[Any]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
        for row in rows[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    """Floats to 4 decimals, or in scientific notation where 4 decimals would hide them
    (``tr D_I / N_I`` of 3e-7 printed as 0.0000 once) or overflow the column."""
    if isinstance(value, float):
        if value != 0 and not 1e-3 <= abs(value) < 1e4:
            return f"{value:.3e}"
        return f"{value:.4f}"
    return "" if value is None else str(value)


IMAGE_LIMIT = 64 * 2**20
"""The largest figure a report embeds (bytes)."""


def _image(path: Path) -> str:
    if not path.is_file():  # a FIFO or a device would block or never end
        raise InputError(f"image {path} is not a regular file")
    if path.stat().st_size > IMAGE_LIMIT:
        raise InputError(f"image {path} is larger than {IMAGE_LIMIT // 2**20} MiB")
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _runs_table(runs: list[dict[str, Any]]) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["run", "status", "epochs", "best acc", "best epoch", "final acc", "final train loss"]
    ]
    for run in runs:
        final = run["final"] or {}
        status = run["status"] if run["status"] != "failed" else f"failed: {run['error']}"
        rows.append(
            [
                run["name"],
                status,
                final.get("epochs"),
                final.get("best_test_acc"),
                final.get("best_epoch"),
                final.get("final_test_acc"),
                final.get("final_train_loss"),
            ]
        )
    return rows


def _groups_table(runs: list[dict[str, Any]]) -> list[list[Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run["status"] == "finished":
            groups[group_label(run["labels"])].append(run["final"])
    rows: list[list[Any]] = [["group", "runs", "best acc (mean ± s.e.)", "final acc (mean ± s.e.)"]]
    for name, finals in sorted(
        groups.items(), key=lambda item: -np.mean([f["best_test_acc"] for f in item[1]])
    ):
        best = mean_and_error([f["best_test_acc"] for f in finals])
        last = mean_and_error([f["final_test_acc"] for f in finals])
        rows.append(
            [
                name,
                len(finals),
                f"{best[0]:.4f} ± {best[1]:.4f}",
                f"{last[0]:.4f} ± {last[1]:.4f}",
            ]
        )
    return rows


def _sweep_section(
    store: ResultStore, sweep: str, plots: list[dict[str, Any]], figures: Path
) -> str:
    runs = store.runs(sweep)
    done = sum(r["status"] == "finished" for r in runs)
    parts = [f"<h2>Sweep {html.escape(sweep)}</h2>", f"<p>{done} of {len(runs)} runs finished.</p>"]
    if done:
        try:
            parts += [_image(p) for p in plot_sweep(store, sweep, plots, figures)]
        except ValueError as err:  # a figure whose runs have not finished yet
            parts.append(f'<p class="muted">figure skipped: {html.escape(str(err))}</p>')
        parts.append("<h3>Groups, best first</h3>" + _table(_groups_table(runs)))
    parts.append("<h3>Runs</h3>" + _table(_runs_table(runs)))
    return "\n".join(parts)


def _extra_sections(directory: Path) -> list[str]:
    path = directory / SECTIONS
    if not path.is_file():
        return []
    try:
        sections = json.loads(path.read_text())
        if not isinstance(sections, list):
            raise TypeError(f"a list of sections, not a {type(sections).__name__}")
        out = []
        for section in sections:
            parts = [f"<h2>{html.escape(str(section['title']))}</h2>"]
            if section.get("text"):
                parts.append(f"<p>{html.escape(str(section['text']))}</p>")
            parts.append(_table(section.get("table") or []))
            parts += [_image(inside(p, directory, "image")) for p in section.get("images", [])]
            out.append("\n".join(parts))
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise InputError(f"{path} is not a list of report sections: {err}") from None
    return out


def write_report(
    source: str | Path,
    out: str | Path | None = None,
    title: str = "",
    figures: str | Path | None = None,
) -> Path:
    """Write the HTML report of a store (a ``results.sqlite`` file or the directory that
    holds it) to ``out`` (default: ``report.html`` beside the store); returns its path.
    The store is only read; the figures are drawn into ``figures`` (a sweep's own
    ``OUT/figures``), or else into a temporary folder, and embedded in the page."""
    source = Path(source)
    store_path = source / STORE if source.is_dir() else source
    if not store_path.is_file():
        raise SgdgeomError(f"no result store at {store_path}: run `sgdgeom sweep` first")
    directory = store_path.parent
    store = ResultStore(store_path, read_only=True)  # a report never writes to its input
    with tempfile.TemporaryDirectory(prefix="sgdgeom-report-") as scratch:
        folder = Path(scratch)
        if figures is not None:  # a sweep's own folder, never through a planted link
            folder = refuse_links(figures, Path(figures).parent, "figures folder")
        body = [
            _sweep_section(store, name, plots, folder) for name, plots in store.sweeps().items()
        ]
    body += _extra_sections(directory)
    heading = html.escape(title or f"sgdgeom report: {directory.name}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{heading}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{heading}</h1>"
        f"<p class='muted'>from {html.escape(str(store_path))}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}</p>" + "\n".join(body) + "</body></html>"
    )
    target = Path(out) if out is not None else directory / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, page.encode())
    return target
