"""Beam search for our models with fewer and cheaper operations per step than fairseq's ``SequenceGenerator``.

fairseq-generate, fairseq-interactive and the hub decode through ``SequenceGenerator._generate``; ``install``
makes that method hand a search to :func:`beam_search` when every model of the ensemble is one of our
encoder-decoder models (translation, summarization, speech) and the search is plain beam search (no prefix tokens,
constraints, language-model fusion, ``--match-source-len``, sampling or another search strategy, no alignment
printing: those, language models and models not ours stay with fairseq). The result is the one fairseq's loop gives: the same
hypotheses in the same order with the same scores, positional scores and attention (tests/test_search.py compares
them, ties between exactly equal scores aside, which torch's top-k orders arbitrarily in both). What differs is the
cost of a step, which on a CPU is mostly operations over the whole vocabulary and copies of state that did not
change (benchmarks/bench_cpu_decoding.py ``--breakdown``: "rest"):

* the best ``2 x beam`` candidates of a sentence come from :func:`top_candidates` (the vocabulary's rows in
  chunks: the chunks' maxima first, then the elements of the best chunks) instead of a top-k over all of it;
* non-finite log-probabilities become -inf with one ``nan_to_num_`` instead of a comparison and a masked write;
* the beams' tokens, scores and attention, the decoder's saved state and the encoder output are reordered only when
  the order changed (never at beam 1 until a sentence ends);
* a beam continuing its parent stays in its parent's row (:func:`stay_in_place`), so fewer rows of the decoder's
  saved keys and values are copied when the beams change places.

``B2T_FAST_SEARCH=off`` (0/false/no) leaves every search to fairseq.
"""
import logging
import math
from typing import Dict, List

import torch
from torch import Tensor

from b2t_fairseq.fast_paths.switches import switched_on

ENV = "B2T_FAST_SEARCH"
CHUNK = 64
logger = logging.getLogger(__name__)
_ANNOUNCED = []


def top_candidates(x: Tensor, k: int, chunk: int = CHUNK):
    """``torch.topk(x, k, dim=1)`` of a 2-d ``x`` (values, indices, best first). Each row is split into chunks of
    ``chunk`` elements; the k best elements of a row lie in the k chunks with the largest maxima (plus the
    remainder that fills no chunk), so the top-k runs over those few elements only. Exactly equal values may come
    in another order than torch's (which orders them arbitrarily too)."""
    rows, n = x.shape
    whole = n - n % chunk
    if whole // chunk <= k:
        return torch.topk(x, k, dim=1)
    chunks = x[:, :whole].view(rows, whole // chunk, chunk)
    best = torch.topk(chunks.amax(dim=2), k, dim=1).indices.sort(dim=1).values  # in index order
    picked = chunks.gather(1, best.unsqueeze(2).expand(rows, k, chunk)).view(rows, k * chunk)
    where = (best.unsqueeze(2) * chunk + torch.arange(chunk, device=x.device)).view(rows, k * chunk)
    if whole < n:
        picked = torch.cat([picked, x[:, whole:]], dim=1)
        where = torch.cat([where, torch.arange(whole, n, device=x.device).expand(rows, n - whole)], dim=1)
    values, position = torch.topk(picked, k, dim=1)
    return values, where.gather(1, position)


def handles(generator, sample, prefix_tokens, constraints) -> bool:
    """Whether :func:`beam_search` gives what fairseq's loop would for this call."""
    from fairseq import search
    from fairseq.sequence_generator import EnsembleModel

    from b2t_fairseq.fast_paths.decoding import FastDecoding

    model = generator.model
    return (
        switched_on(ENV, "our beam search")
        and prefix_tokens is None
        and constraints is None
        and type(generator.search) is search.BeamSearch
        and type(model) is EnsembleModel
        and model.has_encoder()
        and model.has_incremental_states()
        and all(isinstance(m, FastDecoding) for m in model.models)
        and generator.lm_model is None
        and not generator.match_source_len
        and not generator.should_set_src_lengths
        and "src_tokens" in sample["net_input"]
    )


def _wrapped_generate(fairseqs):
    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        if handles(self, sample, prefix_tokens, constraints):
            if not _ANNOUNCED:
                _ANNOUNCED.append(True)
                logger.info(f"beam search: b2t_fairseq's (fast_paths/search.py; {ENV}=off leaves it to fairseq)")
            return beam_search(self, sample, bos_token)
        return fairseqs(self, sample, prefix_tokens, constraints, bos_token)

    _generate.__wrapped__ = fairseqs
    return _generate


def install():
    """Route fairseq's ``SequenceGenerator._generate`` through :func:`handles` (idempotent)."""
    from fairseq.sequence_generator import SequenceGenerator

    if not hasattr(SequenceGenerator._generate, "__wrapped__"):
        SequenceGenerator._generate = _wrapped_generate(SequenceGenerator._generate)


class _Hypotheses:
    """The finished hypotheses of a batch, as fairseq's generator returns them."""

    def __init__(self, generator, bsz, beam, max_len):
        self.generator, self.beam, self.max_len = generator, beam, max_len
        self.found: List[List[Dict[str, Tensor]]] = [[] for _ in range(bsz)]

    def add(self, step, rows, final_scores, sentences, tokens, scores, attn):
        """Hypotheses ending at ``step`` in ``rows`` (of the current batch) with cumulative ``final_scores``, for
        the batch's ``sentences``; returns which of those sentences are done."""
        g = self.generator
        ended = tokens.index_select(0, rows)[:, 1 : step + 2]
        ended[:, step] = g.eos
        per_token = scores.index_select(0, rows)[:, : step + 1]
        per_token[:, step] = final_scores
        per_token[:, 1:] = per_token[:, 1:] - per_token[:, :-1]
        if g.normalize_scores:
            final_scores /= (step + 1) ** g.len_penalty
        attention = attn.index_select(0, rows)[:, :, 1 : step + 2] if attn is not None else None
        done = []
        for i, sentence in enumerate(sentences):
            found = self.found[sentence]
            if len(found) < self.beam:
                found.append({
                    "tokens": ended[i],
                    "score": final_scores[i],
                    "attention": attention[i] if attention is not None else torch.empty(0),
                    "alignment": torch.empty(0),
                    "positional_scores": per_token[i],
                })  # fmt: skip
            if (len(found) == self.beam or step == self.max_len) and sentence not in done:
                done.append(sentence)
        return done

    def best_first(self):
        for sentence, found in enumerate(self.found):
            order = torch.sort(torch.tensor([float(h["score"].item()) for h in found]), descending=True).indices
            self.found[sentence] = [found[i] for i in order]
        return self.found


def stay_in_place(parents: Tensor) -> Tensor:
    """Where each sentence's next beams go: ``parents`` (sentences x beam) holds the beam each continues, in the
    search's order; returns, per sentence and row, which of them that row takes. A beam stays in its parent's row
    where it is that parent's first continuation, so the decoder's saved keys and values move only for the others,
    which take the rows left free in order. The beams of a sentence are the same set in another order, and a
    step's numbers for a row do not depend on where the row sits (int8 products are exact integer sums; norms,
    attention and the float products give each row the same sums wherever it is, which tests/test_search.py checks
    bitwise against fairseq's loop for every method, norm type, int8 and ensembles), so the hypotheses are fairseq's."""
    bsz, beam = parents.shape
    index = torch.arange(beam, device=parents.device)
    earlier_sibling = (parents.unsqueeze(2) == parents.unsqueeze(1)) & (index.unsqueeze(1) > index.unsqueeze(0))
    first = ~earlier_sibling.any(2)
    kept = torch.zeros(bsz, beam + 1, dtype=torch.bool, device=parents.device)
    kept.scatter_(1, torch.where(first, parents, beam), True)
    free = torch.sort(torch.where(kept[:, :beam], beam, index), dim=1).values  # free rows first, ascending
    rank = (torch.cumsum((~first).to(torch.long), dim=1) - 1).clamp(min=0)
    row = torch.where(first, parents, free.gather(1, rank))
    return torch.empty_like(row).scatter_(1, row, index.expand(bsz, beam))


def _log_probs(generator, lprobs, step, max_len):
    """fairseq's rules for a step's log-probabilities, in place: non-finite -> -inf, never pad, the unk penalty,
    only EOS at the last step, no EOS before ``min_len``, suppressed tokens."""
    g = generator
    torch.nan_to_num_(lprobs, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    lprobs[:, g.pad] = -math.inf
    lprobs[:, g.unk] -= g.unk_penalty
    if step >= max_len:
        lprobs[:, : g.eos] = -math.inf
        lprobs[:, g.eos + 1 :] = -math.inf
    if step < g.min_len:
        lprobs[:, g.eos] = -math.inf
    if g.token_indices_to_suppress is not None:
        lprobs[:, g.token_indices_to_suppress] = -math.inf


@torch.no_grad()
def beam_search(generator, sample, bos_token=None):
    """fairseq's beam search over ``generator.model`` (an EnsembleModel) for ``sample``; see the module's text."""
    g, model = generator, generator.model
    src_tokens = sample["net_input"]["src_tokens"]
    device = src_tokens.device
    bsz, src_len = src_tokens.size()[:2]
    beam, vocab = g.beam_size, g.vocab_size
    max_len = min(int(g.max_len_a * src_len + g.max_len_b), g.max_len - 1)
    assert g.min_len <= max_len, "min_len cannot be larger than max_len, please adjust these!"

    encoder_outs = model.forward_encoder(sample["net_input"])
    encoder_outs = model.reorder_encoder_out(encoder_outs, torch.arange(bsz, device=device).repeat_interleave(beam))
    states: List[Dict[str, Dict[str, Tensor]]] = [{} for _ in range(model.models_size)]
    tokens = torch.full((bsz * beam, max_len + 2), g.pad, dtype=torch.long, device=device)
    tokens[:, 0] = g.eos if bos_token is None else bos_token
    scores = torch.zeros(bsz * beam, max_len + 1, device=device)
    attn = None
    hypotheses = _Hypotheses(g, bsz, beam, max_len)
    sentences = list(range(bsz))  # the original index of each sentence still searched
    state_order = None  # the rows of the decoder's state (and encoder output) that the next step continues

    for step in range(max_len + 1):
        if state_order is not None:
            model.reorder_incremental_state(states, state_order)
            encoder_outs = model.reorder_encoder_out(encoder_outs, state_order)
        lprobs, avg_attn = model.forward_decoder(tokens[:, : step + 1], encoder_outs, states, g.temperature)
        _log_probs(g, lprobs, step, max_len)
        if avg_attn is not None:
            if attn is None:
                attn = torch.empty(bsz * beam, avg_attn.size(1), max_len + 2).to(scores)
            attn[:, :, step + 1].copy_(avg_attn)
        scores = scores.type_as(lprobs)
        if g.repeat_ngram_blocker is not None:
            lprobs = g.repeat_ngram_blocker(tokens, lprobs, bsz, beam, step)

        # the best 2 x beam continuations of each sentence (from its first beam at step 0: all beams are equal)
        lprobs = lprobs.view(bsz, beam, vocab)
        if step == 0:
            lprobs = lprobs[:, :1, :]
        else:
            lprobs.add_(scores.view(bsz, beam, -1)[:, :, step - 1].unsqueeze(-1))
        flat = lprobs.reshape(bsz, -1)
        cand_scores, cand = top_candidates(flat, min(2 * beam, flat.size(1) - 1))
        cand_beams = torch.div(cand, vocab, rounding_mode="trunc")
        cand_tokens = cand.fmod(vocab)
        offsets = torch.arange(bsz, device=device).unsqueeze(1) * beam
        cand_rows = cand_beams + offsets
        ends = cand_tokens.eq(g.eos) & cand_scores.ne(-math.inf)

        # hypotheses ending among the best beam candidates are finished
        done = []
        first = ends[:, :beam]
        ending = torch.masked_select(cand_rows[:, :beam], first)
        if ending.numel() > 0:
            final_scores = torch.masked_select(cand_scores[:, :beam], first)
            of = [sentences[i] for i in torch.div(ending, beam, rounding_mode="trunc").tolist()]
            done = hypotheses.add(step, ending, final_scores, of, tokens, scores, attn)
        if len(done) == len(sentences):
            break
        assert step < max_len, f"{step} < {max_len}"

        old_offsets = offsets
        if done:  # sentences with beam hypotheses leave the batch
            keep = [i for i, s in enumerate(sentences) if s not in done]
            sentences = [sentences[i] for i in keep]
            kept = torch.tensor(keep, device=device)
            ends, cand_beams, cand_tokens, cand_scores = (t[kept] for t in (ends, cand_beams, cand_tokens, cand_scores))
            tokens = tokens.view(bsz, -1)[kept].view(len(keep) * beam, -1)
            scores = scores.view(bsz, -1)[kept].view(len(keep) * beam, -1)
            if attn is not None:
                attn = attn.view(bsz, -1)[kept].view(len(keep) * beam, attn.size(1), -1)
            bsz = len(keep)
            old_offsets = kept.unsqueeze(1) * beam
            offsets = torch.arange(bsz, device=device).unsqueeze(1) * beam

        # each sentence continues with its first beam candidates that do not end (stable: in candidate order)
        active = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :beam]
        if beam > 1:
            active = active.gather(1, stay_in_place(cand_beams.gather(1, active)))
        chosen_beams = cand_beams.gather(1, active)
        rows = (chosen_beams + offsets).view(-1)
        if done or not torch.equal(rows, torch.arange(bsz * beam, device=device)):
            tokens[:, : step + 1] = tokens[:, : step + 1].index_select(0, rows)
            if step > 0:
                scores[:, :step] = scores[:, :step].index_select(0, rows)
            if attn is not None:
                attn[:, :, : step + 2] = attn[:, :, : step + 2].index_select(0, rows)
            state_order = (chosen_beams + old_offsets).view(-1)
        else:
            state_order = None
        tokens.view(bsz, beam, -1)[:, :, step + 1] = cand_tokens.gather(1, active)
        scores.view(bsz, beam, -1)[:, :, step] = cand_scores.gather(1, active)
    return hypotheses.best_first()
