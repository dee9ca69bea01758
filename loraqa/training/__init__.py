"""Stage 3, training: settings + model + tokenized rows -> a run directory (adapter or full weights,
run_config.json, metrics.jsonl, summary.json). `run.setup` builds everything, `run.fit` trains."""
