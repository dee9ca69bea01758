"""Beam search inside the batched decoder: transformers' rules, each question's beams as adjacent rows.

Input: a prefilled batch (`attention.SharedPrefixBatch` or `generate.PaddedRowsBatch`, one row per question)
and its next-token logits. Output: each question's best finished beam. The bookkeeping is transformers'
`GenerationMixin._beam_search` (5.x) step for step, vectorized over questions instead of a batch: log-softmax
scores summed along a beam; the top max(2, 1 + stop tokens) x N candidates; a candidate that ends in a stop
token or reaches `max_new_tokens` is finished with score sum / length ** length_penalty (length counts the
generated tokens, stop token included); the best N unfinished ones run on; `early_stopping=False`'s rule
decides when a question is done. A question leaves the batch when it is done, so its beams equal
`model.generate(num_beams=N, early_stopping=False, ...)` on its prompt alone (tested). With `spans`
(`constraints.SpanTrie` per question) each beam's log-probabilities outside its context's spans are -inf, as
transformers' `prefix_allowed_tokens_fn` does.
"""
from __future__ import annotations

import torch

from .constraints import restrict

_DROPPED = -1.0e9  # transformers' score for a candidate that may not be chosen


class BeamSearch:
    """The beams of Q questions, N each: running beams, finished hypotheses and when each question is done."""

    def __init__(self, questions: int, num_beams: int, max_new_tokens: int, stop_ids: torch.Tensor, device,
                 length_penalty: float = 1.0):
        q, n = questions, num_beams
        self.num_beams, self.max_new_tokens, self.length_penalty = n, max_new_tokens, length_penalty
        self.stop_ids = stop_ids.to(device)
        self.candidates = max(2, 1 + len(stop_ids)) * n
        self.length = 0  # tokens generated so far, the same for every running beam
        self.live = torch.arange(q, device=device)  # the question of each group of N rows still decoding
        self.running = torch.zeros((q, n, max_new_tokens), dtype=torch.long, device=device)
        self.running_scores = torch.zeros((q, n), device=device)
        self.running_scores[:, 1:] = _DROPPED  # every beam starts as the same prompt: expand the first one only
        self.finished = torch.zeros((q, n, max_new_tokens), dtype=torch.long, device=device)
        self.finished_lengths = torch.zeros((q, n), dtype=torch.long, device=device)
        self.finished_scores = torch.full((q, n), _DROPPED, device=device)
        self.is_finished = torch.zeros((q, n), dtype=torch.bool, device=device)
        self.improvable = torch.ones((q, 1), dtype=torch.bool, device=device)
        self.best: list[list[int] | None] = [None] * q

    def beam_tokens(self) -> list[list[int]]:
        """Each running row's tokens so far (rows are question-major, N per question)."""
        return self.running[:, :, :self.length].reshape(len(self.live) * self.num_beams, self.length).tolist()

    def advance(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from the running rows' next-token log-probabilities (Q*N, V): returns, for the rows that go
        on (questions not done), the current row each continues and its new token, both (Q'*N,)."""
        q, n, t = len(self.live), self.num_beams, self.length
        vocab = log_probs.shape[-1]
        scores = (log_probs.view(q, n, vocab) + self.running_scores[:, :, None]).reshape(q, n * vocab)
        top_scores, top_index = torch.topk(scores, k=self.candidates)  # (Q, K)
        parents, tokens = top_index // vocab, top_index % vocab
        sequences = torch.take_along_dim(self.running, parents[:, :, None], dim=1)  # (Q, K, T)
        sequences[:, :, t] = tokens
        stops = torch.isin(tokens, self.stop_ids) | (t + 1 >= self.max_new_tokens)  # (Q, K)

        # the best N candidates that did not stop run on
        running_scores = top_scores + stops.to(torch.float32) * _DROPPED
        keep = torch.topk(running_scores, k=n)[1]
        self.running = torch.take_along_dim(sequences, keep[:, :, None], dim=1)
        self.running_scores = torch.take_along_dim(running_scores, keep, dim=1)
        rows = torch.take_along_dim(parents, keep, dim=1)  # (Q, N) beam each continues

        # among the top N candidates, those that stopped join the finished hypotheses if good enough
        just_finished = stops & (torch.arange(self.candidates, device=stops.device) < n)[None, :]
        finished_scores = top_scores / ((t + 1) ** self.length_penalty)
        finished_scores += (~self.improvable).to(torch.float32) * _DROPPED
        finished_scores += (~just_finished) * _DROPPED
        merged_scores = torch.cat((self.finished_scores, finished_scores), dim=1)
        best = torch.topk(merged_scores, k=n)[1]
        self.finished = torch.take_along_dim(torch.cat((self.finished, sequences), dim=1), best[:, :, None], dim=1)
        self.finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
        lengths = torch.cat((self.finished_lengths, torch.full_like(tokens, t + 1)), dim=1)
        self.finished_lengths = torch.take_along_dim(lengths, best, dim=1)
        self.is_finished = torch.take_along_dim(torch.cat((self.is_finished, just_finished), dim=1), best, dim=1)

        # early_stopping=False: done once no running beam, scored at the current length, beats a finished one
        self.length = t + 1
        best_possible = self.running_scores[:, :1] / (self.length ** self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True)[0], _DROPPED)
        self.improvable = self.improvable & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)
        done = ~self.improvable[:, 0] | stops.all(dim=-1)

        for i in torch.nonzero(done)[:, 0].tolist():
            self.best[int(self.live[i])] = self.finished[i, 0, :int(self.finished_lengths[i, 0])].tolist()
        going = ~done
        rows = (rows + torch.arange(q, device=rows.device)[:, None] * n)[going].reshape(-1)
        tokens = self.running[going][:, :, t].reshape(-1)
        for name in ("running", "running_scores", "finished", "finished_lengths", "finished_scores",
                     "is_finished", "improvable", "live"):
            setattr(self, name, getattr(self, name)[going])
        return rows, tokens


def decode_beams(batch, logits: torch.Tensor, *, num_beams: int, max_new_tokens: int, stop_ids: torch.Tensor,
                 spans: list | None = None, work: dict | None = None) -> list[list[int]]:
    """Each question's best beam (its tokens, the stop token included) from a prefilled `batch` with one row
    per question and its next-token `logits` (Q, V); `spans` (a `SpanTrie` per question) constrains them."""
    questions = len(logits)
    index = torch.arange(questions, device=logits.device).repeat_interleave(num_beams)
    batch.keep(index)
    logits = logits[index]
    search = BeamSearch(questions, num_beams, max_new_tokens, stop_ids, logits.device)
    while True:
        log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
        if spans is not None:
            owners = search.live.repeat_interleave(num_beams).tolist()
            log_probs = restrict(log_probs, [spans[q].allowed_ids(tokens, log_probs.device)
                                             for q, tokens in zip(owners, search.beam_tokens())])
        rows, tokens = search.advance(log_probs)
        if not len(rows):
            return search.best
        batch.keep(rows)
        logits = batch.step(tokens)
        if work is not None:
            work["decode_steps"] += 1
            work["steps_by_rows"][len(rows)] = work["steps_by_rows"].get(len(rows), 0) + 1
