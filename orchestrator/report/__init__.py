"""What `orchestrator report`, `status`, `cost` and `jobs list` show, one job per module; read-only on the store.

- `labels`: the human names of societies, methods, metrics and backends, their order and plot styles, what an
  evaluation debate's name says, and the shared spellings of numbers and times.
- `data`: the plain dicts `--json` prints; `terminal`: the rich tables drawn from them.
- `model`: the report as data, built once from the store, with `comparison` (the paper's Table 1), `series`
  (accuracy and diversity per iteration), `samples` (sample debates) and `plots` (SVG and PNG).
- `html` and `markdown`: the two files, each from its template in `templates/`; `write`: writes them.
"""
