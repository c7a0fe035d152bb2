"""Running the lint checks and the report they make: the terminal table, the versioned JSON document and the HTML section."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bughunt.lint.catalog import CHECKS, LINT_SCHEMA, SCHEMA_VERSION, SEVERITIES, _Context, Finding, _finding, _Skip
from bughunt.lint.config_checks import (check_activation, check_max_position, check_pad_equals_eos, check_rope,
                                        check_sliding_window)
from bughunt.lint.tokenizer_checks import (check_add_bos_flag, check_bos_measured, check_bos_unmeasured, check_chat_template,
                                           check_special_tokens, check_tokenizer_loads, check_tokenizer_size,
                                           check_transformers_config)
from bughunt.lint.weight_checks import (check_dtype, check_nonfinite_weights, check_tied_embeddings, check_untrained_rows,
                                        check_weights_against_config)

RULES: list[tuple[Callable[[_Context], list[Finding]], tuple[str, ...]]] = [
    (check_pad_equals_eos, ("pad-equals-eos",)),
    (check_sliding_window, ("sliding-window-off-by-one", "sliding-window-exceeds-context")),
    (check_max_position, ("max-position-rounded",)),
    (check_activation, ("activation-fields-disagree", "activation-silently-overridden")),
    (check_rope, ("rope-unknown-type", "rope-missing-field", "rope-longrope-factor-length", "rope-original-max-not-below-max")),
    (check_dtype, ("dtype-mismatch",)),
    (check_weights_against_config, ("config-exceeds-weights", "weights-missing", "weights-shape-mismatch", "weights-unexpected")),
    (check_nonfinite_weights, ("weights-nonfinite",)),
    (check_untrained_rows, ("untrained-embedding-rows",)),
    (check_tied_embeddings, ("tied-but-lm-head-differs", "tied-but-lm-head-stored", "untied-but-lm-head-missing",
                             "untied-but-lm-head-equals-embed")),
    (check_transformers_config, ("transformers-rejects-config",)),
    (check_tokenizer_loads, ("tokenizer-unloadable",)),
    (check_bos_measured, ("tokenizer-no-bos", "tokenizer-bos-unwanted")),
    (check_bos_unmeasured, ("tokenizer-bos-unmeasured",)),
    (check_add_bos_flag, ("add-bos-token-disagrees",)),
    (check_chat_template, ("chat-template-double-bos", "chat-template-bos-retokenized", "chat-template-missing-bos")),
    (check_special_tokens, ("special-token-missing", "special-token-mismatch")),
    (check_tokenizer_size, ("tokenizer-vocab-exceeds-model",)),
]


@dataclass
class LintReport:
    checkpoint: str
    family: str
    checks: list[dict]  # id, severity, title, status (passed | fired | skipped), reason
    findings: list[Finding]
    tokenizer_parity: dict | None = None
    versions: dict = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("error") else 0

    def to_dict(self) -> dict:
        return {"schema": LINT_SCHEMA, "version": SCHEMA_VERSION, "checkpoint": self.checkpoint, "family": self.family,
                "versions": self.versions, "summary": {s: self.count(s) for s in SEVERITIES} | {"exit_code": self.exit_code},
                "checks": self.checks, "findings": [asdict(f) for f in self.findings],
                "tokenizer_parity": self.tokenizer_parity}

    def write_json(self, path: Path, protect=()) -> None:
        """Write the document atomically; an existing file is replaced only if it is an earlier lint document."""
        from bughunt.output import write_output_file

        write_output_file(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False, default=_json_default) + "\n",
                          LINT_SCHEMA, protect)

    def fired(self) -> set[str]:
        return {f.check for f in self.findings}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def lint(checkpoint: Path, tokenizers: bool = False) -> LintReport:
    """Run every check on a checkpoint. Bad input (no config.json, an unreadable config) raises BughuntError;
    a check that cannot apply (no tokenizer, no sliding window) is recorded as skipped with its reason."""
    import tokenizers as _tk
    import transformers

    import bughunt

    from bughunt import sources

    ctx = _Context(sources.resolve(checkpoint))
    findings: list[Finding] = []
    checks: list[dict] = []
    for rule, ids in RULES:
        try:
            got = rule(ctx)
            reason = None
        except _Skip as e:
            got, reason = [], str(e)
        findings += got
        fired = {f.check for f in got}
        for cid in ids:
            c = CHECKS[cid]
            status = "skipped" if reason else ("fired" if cid in fired else "passed")
            note = reason or (None if cid in fired else ctx.notes.get(cid))  # a passed check's note: what it measured or assumed
            checks.append({"id": cid, "severity": c.severity, "title": c.title, "status": status, "reason": note})
    parity = None
    if tokenizers:
        from bughunt.tokenizer_parity import tokenizer_parity

        report = tokenizer_parity(ctx.checkpoint)
        parity = report.to_dict()
        c = CHECKS["tokenizer-parity"]
        if len(report.implementations) < 2:
            status, reason = "skipped", "fewer than two tokenizer implementations could run: " + \
                "; ".join(f"{s['name']}: {s['reason']}" for s in report.skipped)
        else:
            status, reason = ("fired" if report.disagreements else "passed"), None
            if report.disagreements:
                names = sorted({d["name"] for d in report.disagreements})
                pairs = sorted({f"{d['reference']} vs {d['candidate']}" for d in report.disagreements})
                findings.append(_finding("tokenizer-parity", f"{'; '.join(pairs)} disagree on {len(names)} of {report.strings} "
                                                             f"strings: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}",
                                         strings=names, bos_differs=any(d.get("bos_differs") for d in report.disagreements)))
        checks.append({"id": c.id, "severity": c.severity, "title": c.title, "status": status, "reason": reason})
    versions = {"bughunt": bughunt.__version__, "transformers": transformers.__version__, "tokenizers": _tk.__version__}
    return LintReport(str(ctx.checkpoint), ctx.spec.family, checks, findings, parity, versions)


def format_table(report: LintReport) -> str:
    """The terminal table: every check with its status, then each finding with its fix."""
    lines = [f"lint · {report.family} · {report.checkpoint} · {report.count('error')} error(s), "
             f"{report.count('warning')} warning(s), {report.count('info')} info"]
    lines.append(f"  {'check':<34} {'severity':<8} {'status':<8} note")
    for c in report.checks:
        note = c["reason"] or ""
        lines.append(f"  {c['id']:<34} {c['severity']:<8} {c['status']:<8} {note[:80]}")
    for f in report.findings:
        lines.append(f"  {f.severity.upper()} [{f.check}] {f.message}")
        lines.append(f"      fix: {f.fix}")
    return "\n".join(lines)


def html_section(report: LintReport) -> str:
    """An HTML fragment (findings, then every check, then tokenizer disagreements), rendered from
    templates/sections/lint.html, for embedding the lint results in a report."""
    from bughunt.report import render_template

    disagreements = [{**d, "text_repr": repr(d["text"])[:80]}
                     for d in ((report.tokenizer_parity or {}).get("disagreements") or [])[:50]]
    return render_template("sections/lint.html", data={"report": report, "disagreements": disagreements,
                                                       "counts": {k: report.count(k) for k in ("error", "warning", "info")}})


def extra_section(report: LintReport) -> dict:
    """The entry to append to result.data['extra_sections'] so report.html shows the lint results."""
    return {"title": "Checkpoint lint", "html": html_section(report)}