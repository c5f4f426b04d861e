"""Lookahead decoding (arXiv 2402.02057) for recurrent, hybrid and softmax causal LMs; greedy, exact.

Self-contained (torch and transformers only), so it also runs as a ``custom_generate`` folder:
``model.generate(ids, custom_generate="<folder holding custom_generate/>", trust_remote_code=True)``.

Each step runs ONE batched forward from the committed state (the cache is expanded to one row
per chain, so no custom attention mask is needed and recurrent layers work as they are):

- row 0, the lookahead chain: the last committed token followed by the current Jacobi window
  of W guesses; its argmax predictions become the next window (Jacobi iteration), and n-grams are
  harvested from the last N-1 windows along the diagonal (the paper's 2-D window, by absolute
  position) into a pool keyed by first token, at most G per key;
- rows 1..G, the verification chains: the last committed token followed by a pooled (N-1)-gram.

The row whose guesses match its own argmax predictions longest wins; its accepted tokens and
one more predicted token are committed, the cache keeps that row and is cropped back to the
accepted prefix. Every committed token is the model's own argmax after the committed prefix, so
the output equals plain greedy decoding. Row 0 always commits at least one token.
"""

from __future__ import annotations

import inspect
import operator
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

try:  # transformers' cache classes (5.x); any cache still works through its own batch methods without them
    from transformers.cache_utils import Cache as _Cache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    _DYNAMIC_KV_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
except ImportError:  # pragma: no cover
    _Cache, _DYNAMIC_KV_LAYERS = None, ()


def _cache_argument(model) -> str:
    """The name the model's forward takes the cache under: ``cache`` (transformers >= 5.24) or ``past_key_values``
    (older; removed after 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model, ids: torch.LongTensor, cache, name: str | None = None):
    """model(ids) continuing from ``cache``, passed under ``name`` (default: looked up, see ``_cache_argument``).
    Returns (logits, the cache it returned)."""
    out = model(ids, use_cache=True, **{name or _cache_argument(model): cache})
    returned = out["cache"] if "cache" in out else out.get("past_key_values")
    return out.logits, returned


def _layers_by_view(cache) -> list | None:
    """The cache's layers if its row operations are transformers' per-layer ones (else None: use the cache's)."""
    layers = getattr(cache, "layers", None)
    plain = all(
        getattr(type(cache), name, None) is getattr(_Cache, name, None)
        for name in ("batch_repeat_interleave", "batch_select_indices")
    )
    return layers if layers is not None and _Cache is not None and plain else None


def _is_dynamic_kv(layer) -> bool:
    # exact types only: their update concatenates (never writes in place), so a broadcast view is safe
    return type(layer) in _DYNAMIC_KV_LAYERS and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0


def _repeat_rows(cache, rows: int) -> None:
    """``cache.batch_repeat_interleave(rows)`` from one row; transformers' dynamic key/value layers get a broadcast
    view instead of ``rows`` copies of the whole context (their next update concatenates anyway)."""
    layers = _layers_by_view(cache)
    if layers is None:
        cache.batch_repeat_interleave(rows)
        return
    for layer in layers:
        if _is_dynamic_kv(layer):
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        else:
            layer.batch_repeat_interleave(rows)


def _select_row(cache, row: int, device) -> None:
    """``cache.batch_select_indices([row])``; dynamic key/value layers keep a view of the row (no copy)."""
    layers = _layers_by_view(cache)
    indices = torch.tensor([row], device=device)
    if layers is None:
        cache.batch_select_indices(indices)
        return
    for layer in layers:
        if _is_dynamic_kv(layer):
            layer.keys, layer.values = layer.keys[row : row + 1], layer.values[row : row + 1]
        else:
            layer.batch_select_indices(indices)


@dataclass
class LookaheadStats:
    """Per step (one forward): tokens committed, and which row won (0 = lookahead chain)."""

    committed: list[int] = field(default_factory=list)
    winning_row: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.committed)

    @property
    def mean_tokens_per_step(self) -> float:
        return sum(self.committed) / max(1, self.steps)


class _NgramPool:
    """(N-1)-token continuations keyed by their preceding token; the G most recent per key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        entries = self.pool.setdefault(key, OrderedDict())
        entries.pop(continuation, None)
        entries[continuation] = None
        while len(entries) > self.size:
            entries.popitem(last=False)

    def get(self, key: int) -> list[tuple[int, ...]]:
        return list(reversed(self.pool.get(key, {})))


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if torch.is_tensor(eos_token_id):
        return set(eos_token_id.flatten().tolist())
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.no_grad()
def lookahead_generate(
    model,
    input_ids: torch.LongTensor,
    max_new_tokens: int = 32,
    window: int = 7,
    ngram: int = 5,
    guesses: int = 7,
    eos_token_id: int | list[int] | None = None,
    context_ngrams: bool = True,
    cache=None,
    stats: LookaheadStats | None = None,
) -> torch.LongTensor:
    """Greedy decoding of up to ``max_new_tokens`` tokens after ``input_ids`` [1, T]; returns [1, T + new].

    window (W), ngram (N), guesses (G) as in the paper. With ``context_ngrams``, n-grams of the
    prompt and of the committed text also enter the pool (free guesses for repetitive text such as
    code). ``cache``: an empty cache to use (default: the one the model's forward creates).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"lookahead decoding takes one sequence [1, T]; got shape {tuple(input_ids.shape)}")
    if window < 1 or ngram < 2 or guesses < 0:
        raise ValueError(f"need window >= 1, ngram >= 2, guesses >= 0; got W={window}, N={ngram}, G={guesses}")
    max_new_tokens = _positive_new_tokens(max_new_tokens)
    model.eval()
    name = _cache_argument(model)
    eos = _eos_set(eos_token_id)
    device = input_ids.device
    tokens = input_ids[0].tolist()
    pool = _NgramPool(guesses)
    if context_ngrams:
        for i in range(len(tokens) - ngram + 1):
            pool.add(tokens[i], tuple(tokens[i + 1 : i + ngram]))

    if len(tokens) > 1:
        _, cache = _forward(model, input_ids[:, :-1], cache, name)
    if cache is None:  # a one-token prompt: a forward of nothing is not possible, so start from the first token
        logits, cache = _forward(model, input_ids, None, name)
        first = int(logits[0, -1].argmax())
        tokens.append(first)
        if first in eos or max_new_tokens == 1:
            return torch.tensor([tokens], device=device)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()

    start = input_ids.shape[1]
    # Jacobi window: guesses for the positions after the last token; seeded from the prompt's own tokens
    guess = [tokens[(i * 7919) % len(tokens)] for i in range(window)]
    levels: list[dict[int, int]] = []  # the last N-1 input windows, by absolute position
    while len(tokens) - start < max_new_tokens:
        last, t = tokens[-1], len(tokens) - 1  # position of `last`
        candidates = pool.get(last)[:guesses]
        rows = [[last, *guess[: window - 1]]] + [[last, *c] for c in candidates]
        length = max(len(r) for r in rows)
        batch = torch.tensor([r + [last] * (length - len(r)) for r in rows], device=device)
        if len(rows) > 1:
            _repeat_rows(cache, len(rows))
        pred = _forward(model, batch, cache, name)[0].argmax(-1).tolist()

        # verification: the longest row prefix whose guesses equal the row's own predictions
        best_row, best_accept = 0, 0
        for b, row in enumerate(rows):
            accept = 0
            while accept + 1 < len(row) and row[accept + 1] == pred[b][accept]:
                accept += 1
            if accept > best_accept:
                best_row, best_accept = b, accept
        committed = [*rows[best_row][1 : 1 + best_accept], pred[best_row][best_accept]]
        if len(rows) > 1:
            _select_row(cache, best_row, device)
        cache.crop(-(length - 1 - best_accept))

        # n-gram harvest along the diagonal of the last N-1 input windows (by absolute position):
        # (x^{k-N+2}[s], ..., x^k[s+N-2], y^k[s+N-1]), each token produced after the one before it
        newest = {t + 1 + i: p for i, p in enumerate(pred[0][:window])}
        levels = [*levels, {t + 1 + i: g for i, g in enumerate(guess[: window - 1])}][-(ngram - 1) :]
        if len(levels) == ngram - 1:
            for s in levels[0]:
                gram = [lvl.get(s + j) for j, lvl in enumerate(levels)] + [newest.get(s + ngram - 1)]
                if None not in gram:
                    pool.add(gram[0], tuple(gram[1:]))

        tokens.extend(committed)
        if stats is not None:
            stats.committed.append(len(committed))
            stats.winning_row.append(best_row)
        if context_ngrams:
            for i in range(max(0, len(tokens) - len(committed) - ngram), len(tokens) - ngram + 1):
                pool.add(tokens[i], tuple(tokens[i + 1 : i + ngram]))
        hit = next((i for i, tok in enumerate(committed) if tok in eos), None)
        if hit is not None:
            del tokens[len(tokens) - len(committed) + hit + 1 :]
            break
        shift = len(committed)
        guess = pred[0][shift : shift + window]
        guess += [guess[-1] if guess else tokens[-1]] * (window - len(guess))
    tokens = tokens[: start + max_new_tokens]
    return torch.tensor([tokens], device=device)


def _positive_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` as an int, refused (as generate() does) unless it is at least 1."""
    try:
        value = operator.index(max_new_tokens)
    except TypeError:
        raise ValueError(f"`max_new_tokens` must be an integer, but is {max_new_tokens!r}") from None
    if value <= 0:
        raise ValueError(f"`max_new_tokens` must be greater than 0, but is {value}.")
    return value


def _setting(name: str, kwargs: dict, config):
    """A generate() argument, else the generation config's value (None when neither sets it)."""
    value = kwargs.get(name)
    return value if value is not None else getattr(config, name, None)


def _new_token_budget(kwargs: dict, config, prompt_length: int) -> int:
    """New tokens to generate, by generate()'s rule: ``max_new_tokens`` takes precedence over ``max_length``
    (a total length, prompt included); with neither set, 20 new tokens."""
    max_new_tokens, max_length = _setting("max_new_tokens", kwargs, config), _setting("max_length", kwargs, config)
    if max_new_tokens is not None:
        return _positive_new_tokens(max_new_tokens)
    if max_length is None:
        return 20
    if max_length <= prompt_length:
        raise ValueError(
            f"Input length of input_ids is {prompt_length}, but `max_length` is set to {max_length}: nothing is left "
            "to generate. Increase `max_length` or, better yet, set `max_new_tokens`."
        )
    return max_length - prompt_length


def _check_greedy(generation_config, logits_processor) -> None:
    if generation_config is not None and (generation_config.do_sample or (generation_config.num_beams or 1) > 1):
        raise ValueError("lookahead decoding is greedy: use do_sample=False and num_beams=1")
    if logits_processor:
        names = ", ".join(type(p).__name__ for p in logits_processor)
        raise ValueError(f"lookahead decoding supports plain greedy decoding only; got logits processors: {names}")


def lookahead_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    lookahead_window: int = 7,
    lookahead_ngram: int = 5,
    lookahead_guesses: int = 7,
    lookahead_stats: LookaheadStats | None = None,
    **model_kwargs,
) -> torch.LongTensor:
    """The decoding loop for ``model.generate(ids, custom_generate=lookahead_decoding, ...)`` (callable form).

    transformers has prepared the cache (``cache``; ``past_key_values`` before 5.24) and
    ``generation_config.max_length``. ``lookahead_stats``: a ``LookaheadStats`` to record the steps into.
    """
    _check_greedy(generation_config, logits_processor)
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("lookahead decoding starts from an empty cache")
    return lookahead_generate(
        model, input_ids, max_new_tokens=max_new_tokens, window=lookahead_window, ngram=lookahead_ngram,
        guesses=lookahead_guesses, eos_token_id=generation_config.eos_token_id, cache=cache, stats=lookahead_stats,
    )  # fmt: skip


def generate(
    model,
    inputs: torch.LongTensor | None = None,
    generation_config=None,
    logits_processor=None,
    lookahead_window: int = 7,
    lookahead_ngram: int = 5,
    lookahead_guesses: int = 7,
    **kwargs,
) -> torch.LongTensor:
    """Entry point of the ``custom_generate`` folder form: ``model.generate(ids, custom_generate=FOLDER, ...)``.

    Reads ``max_new_tokens`` / ``max_length`` (generate()'s rule: ``max_new_tokens`` wins; neither: 20 new
    tokens) and ``eos_token_id`` from the arguments or the generation config; other generate arguments that
    change the greedy result are refused.
    """
    config = generation_config or model.generation_config
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if kwargs.get("do_sample") or (kwargs.get("num_beams") or 1) > 1:
        raise ValueError("lookahead decoding is greedy: use do_sample=False and num_beams=1")
    _check_greedy(config, logits_processor)
    max_new_tokens = _new_token_budget(kwargs, config, input_ids.shape[-1])
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    if eos is not None and (_setting("min_new_tokens", kwargs, config) or _setting("min_length", kwargs, config)):
        raise ValueError("lookahead decoding does not support min_new_tokens / min_length (they hold back eos)")
    return lookahead_generate(
        model, input_ids, max_new_tokens=max_new_tokens, window=lookahead_window, ngram=lookahead_ngram,
        guesses=lookahead_guesses, eos_token_id=eos,
    )  # fmt: skip
