"""Stage 7, the report: result files (never models) -> placeholder values and generated claims -> the Typst
sources in report/ filled in -> report.pdf."""
