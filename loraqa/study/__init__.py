"""Stage 6, the study: a sweep spec -> one train + evaluate pair per run (resumable) -> evaluation_results.json
(selection, main effects, seeds, Holm-corrected paired tests) -> plots."""
