"""What a ci run writes for people and CI systems: JUnit XML, the Markdown job summary and the HTML index, all from
the CiRun alone (so a merge of shards writes them the same way)."""

from __future__ import annotations

import html
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from bughunt.ci.outcome import CellOutcome, CiRun


def write_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def junit_xml(run: CiRun) -> str:
    failures = sum(o.status == "fail" for o in run.outcomes)
    errors = sum(o.status == "error" for o in run.outcomes)
    total_time = f"{sum(o.seconds for o in run.outcomes):.3f}"
    suites = ET.Element("testsuites", name="bughunt ci", tests=str(len(run.outcomes)), failures=str(failures), errors=str(errors), time=total_time)
    suite = ET.SubElement(suites, "testsuite", name=f"bughunt ci {run.matrix.source.name}", tests=str(len(run.outcomes)),
                          failures=str(failures), errors=str(errors), time=total_time,
                          skipped=str(sum(o.status == "skipped" for o in run.outcomes)))
    for o in run.outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"bughunt.{o.cell.checkpoint}", name=o.cell.id, time=f"{o.seconds:.3f}")
        if o.status == "fail":
            ET.SubElement(case, "failure", message=o.message, type="regression").text = o.details
        elif o.status == "error":
            ET.SubElement(case, "error", message=o.message, type="failed").text = o.details
        elif o.status == "skipped":
            ET.SubElement(case, "skipped", message=o.message)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _summary_row(o: CellOutcome) -> str:
    status = {"pass": "✅ pass", "fail": "❌ regression", "error": "💥 error", "skipped": "⏭ skipped"}[o.status]
    first, how = "–", "–"
    if o.status == "fail":
        first, how = o.violations[0].point, o.violations[0].detail
    elif o.status in ("error", "skipped"):
        how = o.error or ""
    worst = "–" if o.max_rel_l2 is None else f"{o.max_rel_l2:.1e}"
    if o.max_rel_l2_baseline is not None:
        worst += f" ({o.max_rel_l2_baseline:.1e})"
    return f"| `{o.cell.id}` | {status} | {_md(first)} | {_md(how)} | {worst} |"


def markdown_summary(run: CiRun) -> str:
    """The Markdown page for a CI job summary. It holds no timings and no output paths, so the merge of a sharded
    run's slices (bughunt.ci.shard) reproduces the unsharded run's page exactly; the times are in junit.xml."""
    n, bad = len(run.outcomes), len(run.failed)
    what = "bughunt ci" if run.shard is None else f"bughunt ci, shard {run.shard[0]} of {run.shard[1]}"
    head = f"## {what}: ✅ all {n} cells pass" if not bad else f"## {what}: ❌ {bad} of {n} cells fail"
    if run.shard is not None and not n:
        head = f"## {what}: no cells (each checkpoint and device runs whole in one shard; the matrix has fewer than {run.shard[1]})"
    pkgs = run.packages
    versions = ", ".join(f"{k} {pkgs[k]}" for k in ("bughunt", "torch", "transformers", "numpy", "jax", "keras") if k in pkgs)
    lines = [head, "",
             f"Matrix `{run.matrix.source}`, " + ("baselines recorded now" if run.update_baseline else f"baselines `{run.baseline_dir}`")
             + f". {versions}.", "",
             "| cell | status | first regressed point | by how much | max rel L2 (baseline) |",
             "|---|---|---|---|---|"]
    lines += [_summary_row(o) for o in run.outcomes]
    for o in run.failed:
        lines += ["", f"<details><summary>{html.escape(o.message)}</summary>", "", "```", o.details, "```", "", "</details>"]
    lines += ["", "Thresholds:", *[f"- {t.describe()}" for t in run.matrix.thresholds],
              "", "HTML reports: `index.html` beside this file (one report per checkpoint and device)."]
    if run.stale_baselines:
        lines += ["", f"Baseline files that belong to no cell: {', '.join(f'`{p.name}`' for p in run.stale_baselines)}."]
    return "\n".join(lines) + "\n"


def index_html(run: CiRun) -> str:
    """The HTML index of a run (templates/ci_index.html): the verdict, the matrix and baselines, a row per cell."""
    from bughunt.report import render_template

    verdict = "all cells pass" if not run.failed else f"{len(run.failed)} of {len(run.outcomes)} cells fail"
    if run.shard is not None:
        verdict = f"shard {run.shard[0]} of {run.shard[1]}, {verdict}"
    rows = [{"cell": o.cell.id, "status": o.status, "message": o.message if o.status != "pass" else "", "report": o.report}
            for o in run.outcomes]
    baselines = "baselines recorded now" if run.update_baseline else f"baselines {run.baseline_dir}"
    return render_template("ci_index.html", verdict=verdict, matrix=str(run.matrix.source), baselines=baselines, rows=rows)


def write_outputs(run: CiRun, directory: Path | None = None) -> None:
    """JUnit XML, the Markdown summary and the HTML index, into `directory` (default run.out)."""
    directory = Path(directory) if directory is not None else run.out
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / "junit.xml", junit_xml(run))
    write_file(directory / "summary.md", markdown_summary(run))
    write_file(directory / "index.html", index_html(run))
