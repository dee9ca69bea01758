"""Stage 1, data: SQuAD files -> records, seeded subsets and held-out articles -> prompt + answer token ids
(prompt labels IGNORE_INDEX) -> padded or shared-context training batches. `assets` fetches what the rest reads."""
