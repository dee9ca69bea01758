"""Stage 5, evaluation: answers -> the official SQuAD EM/F1 per question, paragraph-bootstrap CIs, paired tests
and failure categories; `evaluate.evaluate` runs a model over a split and writes the evaluation JSON."""
