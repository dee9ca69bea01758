import pytest
import torch
from transformers import TopPLogitsWarper

from loraqa.generation.sampling import NucleusFilter, choose


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.9, 0.95])
def test_nucleus_filter_equals_transformers_top_p(top_p):
    """Peaked rows (decided among the top candidates) and flat ones (left to transformers) in one batch."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 5000, generator=g) * torch.tensor([0.5, 2.0, 8.0, 20.0]).repeat(16)[:, None]
    torch.testing.assert_close(NucleusFilter(top_p)(None, scores), TopPLogitsWarper(top_p)(None, scores), rtol=0, atol=0)


def test_sampling_draws_follow_the_distribution():
    probabilities = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    rows = 20_000
    logits = probabilities.log().expand(rows, -1)  # log 0 = -inf: tokens that must never be drawn
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    drawn = choose(lambda ids, scores: scores, logits, generators, range(rows))
    frequencies = torch.bincount(drawn, minlength=5).double() / rows
    torch.testing.assert_close(frequencies, probabilities.double(), rtol=0, atol=0.015)
    assert frequencies[3:].sum() == 0
