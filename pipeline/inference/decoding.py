"""The continuous-batching engine's two halves: the rows in the model (`Batch`: one KV cache,
a mask, positions) and the choice of their next tokens (`Selection`: greedy or beam search).

Requests (one per page and task) join and leave between decode steps, so a finished row
costs nothing after its last token. The choice of tokens reproduces transformers'
`generate()` for the settings the engine uses, request by request: greedy is the argmax of
the processed logits; beam search is `GenerationMixin._beam_search` (transformers 5.x: the
top max(2, 1 + end tokens) x beams continuations of the log-probabilities, the best unfinished
`beams` continue, finished hypotheses scored by length with penalty 1.0, `early_stopping`
False), vectorised over requests that each keep their own step count. A request stops when
transformers would stop changing its best hypothesis: its early-stop heuristic holds or all
its candidates hit an end (transformers keeps computing such a request while others in its
batch run, without changing that request's answer).

Logits processors, in transformers' order: `min_new_tokens` (end tokens barred before),
the family's repetition penalty over the answer's own tokens (and its start ids;
pipeline.inference.generation), then a score hook (benchmarks and tests force output
lengths with it; none in production).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.inference import kvcache

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from pipeline.inference.adapters import InputBuilder

# A hook on each step's scores: (rows' (page, key) tags, tokens generated so far per row, scores) -> scores.
ScoreHook = Callable[[Sequence[Any], torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Request:
    """One (page, task) row: where its answer goes and when it must stop."""

    slot: Any  # the caller's handle, e.g. (page index, task key)
    tag: Any  # what the score hook sees (the page and key)
    limit: int  # max new tokens
    min_new: int = 0  # end tokens barred before this many tokens


# ---------------------------------------------------------------------------------------
# the rows in the model
# ---------------------------------------------------------------------------------------


class ModelCall:
    """One forward pass of the model over rows with a cache: the last position's logits."""

    def __init__(self, model: PreTrainedModel, builder: InputBuilder) -> None:
        self.model = model
        self.builder = builder
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor, text_positions: torch.Tensor,
                 deltas: torch.Tensor, cache: Any, positions: torch.Tensor | None = None,
                 **extra: Any) -> tuple[torch.Tensor, Any]:
        if positions is None:
            positions = self.builder.position_ids(text_positions, deltas)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: cache}, **extra)
        returned = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        logits = out.logits[:, -1, :].to(dtype=torch.float32)
        return logits, returned


@dataclass
class Batch:
    """Rows in the model: their KV cache (rows left-padded to one width), the mask of its
    columns, each row's next text position and rope offset, and the token it feeds next."""

    cache: Any
    mask: torch.Tensor  # (rows, columns) long, 1 = a real position
    positions: torch.Tensor  # (rows,) text position of the next token
    deltas: torch.Tensor  # (rows,) rope offset of text after the image (Qwen2-VL mrope), else 0
    last: torch.Tensor | None = None  # (rows,) the next input token

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order, repeats allowed), then drop all-padding columns."""
        kvcache.select(self.cache, index)
        index = index.to(self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.deltas = self.deltas.index_select(0, index)
        if self.last is not None:
            self.last = self.last.index_select(0, index)
        self.trim()

    def reorder_beams(self, source: torch.Tensor, generated: torch.Tensor) -> None:
        """Beam search's reorder, in place: beam j of group g (row g * beams + j) continues beam
        source[g, j]. Only the rows that continue another beam change, and only their columns
        of generated tokens (`generated` (groups,): tokens chosen so far, the newest not yet in
        the cache): before those, a group's beams hold the same prompt."""
        groups, beams = source.shape
        changed = source != torch.arange(beams, device=source.device)[None, :]
        if not bool(changed.any()):
            return
        g, j = changed.nonzero(as_tuple=True)
        columns = int((generated.to(g.device)[g] - 1).max())
        kvcache.copy_rows(self.cache, g * beams + j, g * beams + source[g, j], columns)

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row."""
        if self.rows == 0:
            return
        first = int(self.mask.argmax(dim=1).min())  # leading zeros of the least padded row
        if first > 0:
            kvcache.trim_left(self.cache, first)
            self.mask = self.mask[:, first:]

    def step(self, call: ModelCall) -> torch.Tensor:
        """One decode step: feed every row its `last` token; the next-token logits (rows, vocab)."""
        assert self.last is not None
        ones = self.mask.new_ones((self.rows, 1))
        mask = torch.cat((self.mask, ones), dim=1)
        logits, self.cache = call(self.last[:, None], mask, self.positions[:, None], self.deltas, self.cache)
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """All rows of `batches`, in order, left-padded to one width, in growing cache layers
        (pipeline.inference.kvcache; the first batch's cache object is reused)."""
        if len(batches) == 1:
            kvcache.growing(batches[0].cache)
            return batches[0]
        width = max(int(b.mask.shape[1]) for b in batches)
        masks = [torch.nn.functional.pad(b.mask, (width - int(b.mask.shape[1]), 0)) for b in batches]
        cache = kvcache.concat([b.cache for b in batches])
        lasts = [b.last for b in batches]
        return Batch(
            cache=cache,
            mask=torch.cat(masks),
            positions=torch.cat([b.positions for b in batches]),
            deltas=torch.cat([b.deltas for b in batches]),
            last=torch.cat(lasts) if all(t is not None for t in lasts) else None,  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------------------
# choosing tokens
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """What every request of an engine shares: beams, penalty, end tokens, the score hook."""

    num_beams: int
    repetition_penalty: float
    eos_ids: tuple[int, ...]  # as transformers is given them (sorted)
    start_ids: tuple[int, ...] = ()  # counted by the repetition penalty besides the answer's own
    hook: ScoreHook | None = None


class Selection:
    """Decoding state of a set of requests ("groups" of `num_beams` rows, in request order):
    tokens generated so far, steps, limits and, for beams, running and finished hypotheses."""

    def __init__(self, decoding: Decoding, requests: Sequence[Request], device: Any) -> None:
        self.d = decoding
        self.k = decoding.num_beams
        self.requests = list(requests)
        g = len(self.requests)
        width = max(r.limit for r in self.requests) if self.requests else 1
        self.device = device
        self.eos = torch.tensor(decoding.eos_ids, dtype=torch.long, device=device)
        self.tokens = torch.zeros((g, self.k, width), dtype=torch.long, device=device)
        self.count = torch.zeros(g, dtype=torch.long, device=device)
        self.limit = torch.tensor([r.limit for r in self.requests], dtype=torch.long, device=device)
        self.min_new = torch.tensor([r.min_new for r in self.requests], dtype=torch.long, device=device)
        if self.k > 1:
            self.scores = torch.zeros((g, self.k), dtype=torch.float32, device=device)
            self.scores[:, 1:] = -1e9  # only the first beam's continuations at the first step, as transformers
            self.fin_tokens = torch.zeros_like(self.tokens)
            self.fin_scores = torch.full((g, self.k), -1e9, dtype=torch.float32, device=device)
            self.fin_done = torch.zeros((g, self.k), dtype=torch.bool, device=device)
            self.fin_len = torch.zeros((g, self.k), dtype=torch.long, device=device)
            self.open = torch.ones(g, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return len(self.requests)

    _PER_GROUP = ("tokens", "count", "limit", "min_new", "scores", "fin_tokens", "fin_scores", "fin_done", "fin_len",
                  "open")

    def _fields(self) -> list[str]:
        return [f for f in self._PER_GROUP if hasattr(self, f)]

    def keep(self, index: torch.Tensor) -> None:
        """Keep groups `index` (in that order)."""
        index = index.to(self.device)
        for name in self._fields():
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.requests = [self.requests[i] for i in index.tolist()]

    def extend(self, other: Selection) -> None:
        """Append `other`'s groups after this one's."""
        width = max(self.tokens.shape[-1], other.tokens.shape[-1])
        for name in self._fields():
            a, b = getattr(self, name), getattr(other, name)
            if name in ("tokens", "fin_tokens"):
                a = torch.nn.functional.pad(a, (0, width - a.shape[-1]))
                b = torch.nn.functional.pad(b, (0, width - b.shape[-1]))
            setattr(self, name, torch.cat((a, b)))
        self.requests.extend(other.requests)

    # ---- the logits processors --------------------------------------------------------------
    def _process(self, scores: torch.Tensor, tokens: torch.Tensor, count: torch.Tensor, min_new: torch.Tensor,
                 tags: Sequence[Any]) -> torch.Tensor:
        """scores (rows, vocab) of rows whose generated tokens are tokens[:, :count]."""
        barred = count < min_new
        if bool(barred.any()):
            scores[barred.nonzero().squeeze(1)[:, None], self.eos[None, :]] = float("-inf")
        if self.d.repetition_penalty != 1.0:
            scores = self._penalise(scores, tokens, count)
        if self.d.hook is not None:
            scores = self.d.hook(tags, count, scores)
        return scores

    def _penalise(self, scores: torch.Tensor, tokens: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """CTRL's penalty on every token the row has produced (and the start ids), once each."""
        rows, vocab = scores.shape
        width = tokens.shape[1]
        spare = torch.full((rows, 1), vocab, dtype=torch.long, device=scores.device)
        ids = torch.where(torch.arange(width, device=scores.device)[None, :] < count[:, None], tokens, spare)
        if self.d.start_ids:
            start = torch.tensor(self.d.start_ids, dtype=torch.long, device=scores.device).expand(rows, -1)
            ids = torch.cat((start, ids), dim=1)
        seen = torch.zeros((rows, vocab + 1), dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :vocab]
        penalised = torch.where(scores < 0, scores * self.d.repetition_penalty, scores / self.d.repetition_penalty)
        return torch.where(seen, penalised, scores)

    # ---- one step ------------------------------------------------------------------------
    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Choose the next token of every row from `logits` (rows = groups x beams, group-major).

        Returns (beam sources, done): for beams, the row (0..beams-1 within its group) each new
        beam continues, (groups, beams), else None; and which groups are finished (groups,).
        """
        if self.k == 1:
            return None, self._greedy(logits)
        return self._beams(logits)

    def _tags(self) -> list[Any]:
        return [r.tag for r in self.requests for _ in range(self.k)]

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        scores = self._process(logits.clone(), self.tokens[:, 0], self.count, self.min_new, self._tags())
        chosen = scores.argmax(dim=-1)
        self.tokens[:, 0].scatter_(1, self.count[:, None], chosen[:, None])
        self.count = self.count + 1
        return torch.isin(chosen, self.eos) | (self.count >= self.limit)

    def _beams(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, k, vocab = len(self.requests), self.k, logits.shape[-1]
        width = self.tokens.shape[-1]
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        log_probs = self._process(log_probs, self.tokens.reshape(g * k, width), self.count.repeat_interleave(k),
                                  self.min_new.repeat_interleave(k), self._tags())
        log_probs = (log_probs.view(g, k, vocab) + self.scores[:, :, None]).view(g, k * vocab)
        keep = max(2, 1 + len(self.d.eos_ids)) * k
        top_lp, top_idx = torch.topk(log_probs, keep)
        source = top_idx // vocab
        token = top_idx % vocab
        top_seq = torch.take_along_dim(self.tokens, source[:, :, None], dim=1)
        top_seq.scatter_(2, self.count.view(g, 1, 1).expand(g, keep, 1), token[:, :, None])
        length = self.count + 1
        hits = torch.isin(token, self.eos) | (length >= self.limit)[:, None]

        # the best `k` continuations that did not end carry on
        running_lp = top_lp + hits.to(torch.float32) * -1.0e9
        chosen = torch.topk(running_lp, k).indices
        self.tokens = torch.take_along_dim(top_seq, chosen[:, :, None], dim=1)
        self.scores = torch.take_along_dim(running_lp, chosen, dim=1)
        beam_source = torch.take_along_dim(source, chosen, dim=1)

        # ended continuations among the top `k` may enter the finished hypotheses
        top_k = torch.arange(keep, device=logits.device) < k
        just = hits & top_k[None, :]
        scored = top_lp / length.to(torch.float32)[:, None]  # length_penalty 1.0
        scored = scored + (~self.open).to(torch.float32)[:, None] * -1.0e9
        scored = scored + (~just).to(torch.float32) * -1.0e9
        merged_scores = torch.cat((self.fin_scores, scored), dim=1)
        best = torch.topk(merged_scores, k).indices
        self.fin_tokens = torch.take_along_dim(torch.cat((self.fin_tokens, top_seq), dim=1), best[:, :, None], dim=1)
        self.fin_scores = torch.take_along_dim(merged_scores, best, dim=1)
        self.fin_done = torch.take_along_dim(torch.cat((self.fin_done, just), dim=1), best, dim=1)
        self.fin_len = torch.take_along_dim(
            torch.cat((self.fin_len, length[:, None].expand(g, keep)), dim=1), best, dim=1)

        # transformers' early-stop heuristic (early_stopping=False)
        self.count = length
        best_running = self.scores[:, :1] / length.to(torch.float32)[:, None]
        worst_finished = torch.where(self.fin_done, self.fin_scores.min(dim=1, keepdim=True).values, -1.0e9)
        self.open = self.open & (best_running > worst_finished).any(dim=-1)
        return beam_source, ~self.open | hits.all(dim=-1)

    # ---- results ---------------------------------------------------------------------------
    def last_tokens(self) -> torch.Tensor:
        """Each row's newest token (rows = groups x beams), the next input."""
        index = (self.count - 1).clamp(min=0).view(-1, 1, 1).expand(-1, self.k, 1)
        return torch.gather(self.tokens, 2, index).reshape(-1)

    def result(self, group: int) -> list[int]:
        """The answer of a finished group: its generated ids, the end token included when it ended on one."""
        if self.k == 1:
            return self.tokens[group, 0, : int(self.count[group])].tolist()
        if not bool(self.fin_done[group, 0]):
            return []
        return self.fin_tokens[group, 0, : int(self.fin_len[group, 0])].tolist()


def rows_of(groups: torch.Tensor, beams: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """Batch rows (group-major) of `groups`, each group's rows in the order of `source` (their
    beam sources, (groups, beams)) or as they are."""
    base = groups[:, None] * beams
    within = source if source is not None else torch.arange(beams, device=groups.device)[None, :].expand(len(groups), -1)
    return (base + within).reshape(-1)


__all__ = ["Batch", "Decoding", "ModelCall", "Request", "ScoreHook", "Selection", "rows_of"]
