"""Static checks of a checkpoint (config.json, weights, tokenizer) for the mistakes that make implementations
disagree before any forward pass runs: pad == eos, off-by-one sliding windows, activation fields a library
rewrites, untrained embedding rows, a tie flag that contradicts the stored weights, missing BOS, and so on.

    report = lint("path/to/checkpoint")
    print(format_table(report)); report.exit_code  # 0 clean or warnings only, 1 an error-severity check fired

Every check has an id, a severity, an explanation and a fix (CHECKS, in catalog.py). The checks are grouped by
what they read (config_checks, weight_checks, tokenizer_checks); run.py runs them and makes the report. The JSON
document is versioned.
"""

from bughunt.lint.catalog import CHECKS, LINT_SCHEMA, SCHEMA_VERSION, SEVERITIES, Check, Finding
from bughunt.lint.run import RULES, LintReport, extra_section, format_table, html_section, lint

__all__ = ["CHECKS", "LINT_SCHEMA", "RULES", "SCHEMA_VERSION", "SEVERITIES", "Check", "Finding", "LintReport",
           "extra_section", "format_table", "html_section", "lint"]
