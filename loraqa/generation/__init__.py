"""Stage 4, generation: a model, its tokenizer and questions -> answer texts, decoded in batches that encode
each paragraph once (greedy, top-k, top-p, temperature), with early stopping at EOS or a newline."""
