"""Text generation: greedy decoding and sampling (temperature, top-k, top-p), with a KV cache.

:func:`generate` is the book's ``generate`` (chapter 5) with the chapter-4 ``generate_text_simple`` as
its temperature-0 case; :func:`stream_generate` yields each step's new tokens as they are made.

Equivalence with the book
    At ``temperature=0`` the tokens are the argmax of the last position's logits, token for token
    what ``generate_text_simple`` gives. With ``temperature > 0`` and neither ``seed`` nor
    ``generator``, sampling draws from torch's global RNG with one ``torch.multinomial(probs, 1)``
    per step, exactly as the book's ``generate``; so after the same ``torch.manual_seed`` the two
    produce the same tokens (top-k included).

The KV cache and the context window
    With ``use_cache=True`` the (cropped) prompt is run once (prefill) and each new token is then fed
    alone, attending over the cached keys and values. This is exact as long as the whole sequence
    fits the window of ``context_size`` tokens. Once it is longer, the book's loop conditions on the
    last ``context_size`` tokens at positions ``0..context_size-1``: every step shifts every token's
    position, so cached keys are stale. From that step on, each new token is computed by re-running
    the last ``context_size`` tokens without the cache (last position's logits only), exactly what
    the uncached loop does. Outputs therefore equal the uncached path token for token in both
    regimes; the cache speeds up the steps before the window is full and costs nothing after.

Model mode
    Generation never calls ``model.train()`` or ``model.eval()``: the caller chooses, as in the book.
    Put the model in eval mode first (``model.eval()``); a model left in training mode keeps its
    dropout active and a :class:`UserWarning` says so. Computation runs under
    ``torch.inference_mode``; returned and yielded tensors are ordinary tensors.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import GenerationError
from .runtime.decode import decoding_forward

if TYPE_CHECKING:
    from .model import GPTModel

__all__ = ["MAX_SEED", "MIN_TEMPERATURE", "check_sampling_args", "check_seed", "filter_logits", "generate",
           "stream_generate"]

#: The largest seed: torch seeds its generators with a 64-bit unsigned integer.
MAX_SEED = 2**64 - 1
#: The smallest temperature above 0 that sampling accepts. Smaller ones are refused: dividing
#: float32 logits by them overflows (inf - inf = NaN) for ordinary logits, and 1e-6 already makes
#: sampling the argmax wherever the two best logits differ by more than ~1e-4.
MIN_TEMPERATURE = 1e-6


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to ``-inf`` the logits of tokens outside the top-k and then the top-p (nucleus) set.

    ``logits: (..., vocab)``; returns a new tensor of the same shape (the input is not modified).

    - ``top_k``: keep tokens whose logit is at least the k-th largest (the book's rule, so tokens tied
      with the k-th are kept too). ``top_k >= vocab`` keeps everything.
    - ``top_p``: of what remains, keep the smallest set of most probable tokens whose probability
      (softmax over the remaining logits) reaches ``top_p``; the most probable token is always kept.
      ``top_p = 1`` keeps everything.

    Apply it to temperature-scaled logits: the top-k set does not depend on the temperature, the
    nucleus does.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def _next_token(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None, step: int) -> Tensor:
    """The next token ``(b, 1)`` from last-position logits ``(b, vocab)``; ``step`` is its 1-based number.

    Greedy decoding of logits with a NaN or an infinity warns (once per generation, by the caller's
    check) and still takes the argmax; sampling refuses them with a :class:`GenerationError`, since no
    distribution can be drawn from them.
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    if not bool(torch.isfinite(probs).all()):  # one check per step; then find out why
        if not bool(torch.isfinite(logits).all()):
            raise GenerationError(_non_finite_message(logits, step) + "; cannot sample from them")
        raise GenerationError(  # finite logits that the temperature scaling made overflow
            f"temperature {temperature:g} is too small for the model's logits at new token {step} "
            f"(largest |logit| {float(logits.abs().max()):g}): dividing by it overflows; "
            "use a larger temperature, or 0 for greedy decoding"
        )
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _non_finite_message(logits: Tensor, step: int) -> str:
    """``the model's logits for new token N are not finite (...)``, with what was found."""
    nan, inf = int(torch.isnan(logits).sum()), int(torch.isinf(logits).sum())
    return (f"the model's logits for new token {step} are not finite ({nan} NaN, {inf} infinite of "
            f"{logits.numel()}): its weights or activations hold NaN/inf (a diverged training run?)")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise GenerationError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise GenerationError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise GenerationError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` as an int if it is an integer in ``[0, 2**64 - 1]``, else raise :class:`GenerationError`.

    The range is what ``torch.manual_seed`` and ``torch.Generator.manual_seed`` take (a 64-bit
    unsigned seed); modelkit refuses negative seeds, which torch would silently wrap around.
    """
    number = _check_int(name, seed, 0)
    if number > MAX_SEED:
        raise GenerationError(f"{name} must be at most 2**64 - 1 = {MAX_SEED} (torch's seed range), got {number}")
    return number


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenerationError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise GenerationError(f"{name} must be a finite number, got {number}")
    return number


def _check_prompt(idx: object, vocab_size: int, device: torch.device | None) -> Tensor:
    if not isinstance(idx, Tensor):
        raise GenerationError(f"idx must be a LongTensor of token ids (batch, n), got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise GenerationError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2:
        hint = "; add a batch dimension with idx.unsqueeze(0)" if idx.dim() == 1 else ""
        raise GenerationError(f"idx must have shape (batch, n), got {tuple(idx.shape)}{hint}")
    if idx.shape[0] == 0:
        raise GenerationError("idx has an empty batch (shape (0, n)); give at least one prompt")
    if idx.shape[1] == 0:
        raise GenerationError("the prompt is empty (idx has shape (batch, 0)); give at least one token")
    if device is not None and idx.device != device:
        raise GenerationError(f"idx is on {idx.device} but the model is on {device}; move it with idx.to({str(device)!r})")
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise GenerationError(
            f"token id {bad} is outside the model's vocabulary [0, {vocab_size}) (vocab_size {vocab_size})"
        )
    return idx.long()


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None
                        ) -> tuple[float, int | None, float | None]:
    """Return ``(temperature, top_k, top_p)`` normalised, or raise :class:`~modelkit.GenerationError`.

    ``temperature`` must be 0 (greedy) or a finite number >= :data:`MIN_TEMPERATURE` (1e-6): below
    it, logits divided by the temperature overflow for ordinary logits, so such a temperature is
    refused rather than silently turned into greedy decoding. ``top_k`` must be None or an integer
    >= 1, ``top_p`` None or a number in ``(0, 1]``. :func:`generate` calls this; a CLI can call it
    before building a model.
    """
    temperature = _check_float("temperature", temperature)
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise GenerationError(f"temperature {temperature:g} is too small to sample with: use 0 for greedy "
                              f"decoding, or at least {MIN_TEMPERATURE:g}")
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 1)
    if top_p is not None:
        top_p = _check_float("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    return temperature, top_k, top_p


def stream_generate(
    model: GPTModel,
    idx: Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Extend ``idx`` one token at a time, yielding each step's new tokens ``(b, 1)`` as they are made.

    Arguments are :func:`generate`'s, which documents them. All arguments are checked when this is
    called, before the first token: a :class:`~modelkit.GenerationError` is raised at once, not on
    first iteration. Nothing is computed until the iterator is advanced, and each step is computed
    only when the next token is asked for. At most ``max_new_tokens`` tensors are yielded; fewer
    when ``eos_id`` ends every row.
    """
    return _start(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, use_cache,
                  seed, generator)


def _start(model: GPTModel, idx: Tensor, max_new_tokens: int, context_size: int | None, temperature: float,
           top_k: int | None, top_p: float | None, eos_id: int | None, use_cache: bool, seed: int | None,
           generator: torch.Generator | None) -> Iterator[Tensor]:
    """Validate the arguments, warn (at the public caller's line) and return the decoding iterator."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise GenerationError(f"model must be a modelkit GPTModel, got {type(model).__name__}")
    vocab_size, context_length = spec.vocab_size, spec.context_length
    param = next(model.parameters(), None)
    idx = _check_prompt(idx, vocab_size, param.device if param is not None else None)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0)
    if context_size is None:
        context_size = context_length
    context_size = _check_int("context_size", context_size, 1)
    if context_size > context_length:
        raise GenerationError(
            f"context_size {context_size} is larger than the model's context_length {context_length}"
        )
    temperature, top_k, top_p = check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None:
        eos_id = _check_int("eos_id", eos_id, 0)
        if eos_id >= vocab_size:
            raise GenerationError(f"eos_id {eos_id} is outside the model's vocabulary [0, {vocab_size})")
    if seed is not None and generator is not None:
        raise GenerationError("give either seed or generator, not both")
    if seed is not None:
        seed = check_seed(seed)
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise GenerationError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    if idx.shape[1] > context_size:
        warnings.warn(
            f"the prompt has {idx.shape[1]} tokens but the context window is {context_size}: "
            f"only its last {context_size} tokens condition the generation (cropped as in the book)",
            UserWarning,
            stacklevel=3,
        )
    if model.training:
        warnings.warn(
            "the model is in training mode, so dropout is active during generation; "
            "call model.eval() first for the model's actual predictions",
            UserWarning,
            stacklevel=3,
        )
    return _decode(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                   use_cache, generator)


def _decode(model: GPTModel, idx: Tensor, max_new_tokens: int, context_size: int, temperature: float,
            top_k: int | None, top_p: float | None, eos_id: int | None, use_cache: bool,
            generator: torch.Generator | None) -> Iterator[Tensor]:
    """The decoding loop behind :func:`stream_generate` (arguments already validated)."""
    if max_new_tokens == 0:
        return
    # The window: the last ``context_size`` tokens, the model's input once the sequence outgrows it.
    window = idx[:, -context_size:]
    length = window.shape[1]  # tokens in the window (== cached tokens while the cache is valid)
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device) if eos_id is not None else None
    # The model's forward as the runtime's inference steps, checked once for this generation, or the
    # native step where optimize_for_inference(native=True) chose it (modelkit.runtime.decode).
    forward = decoding_forward(model)
    with torch.inference_mode():
        # A prompt that fills the window leaves nothing for a cache to reuse: every later step shifts.
        cache = model.new_cache() if use_cache and length < context_size else None
        logits = forward(window, cache=cache, last_only=True)[:, -1, :]
    warned = False
    for step in range(max_new_tokens):
        with torch.inference_mode():
            token = _next_token(logits, temperature, top_k, top_p, generator, step + 1)
            # argmax picks a NaN or +inf when there is one: checking the chosen logits (b values, not
            # b x vocab) finds them cheaply; sampling has checked its own in _next_token
            if temperature == 0.0 and not warned and not bool(torch.isfinite(logits.gather(-1, token)).all()):
                warned = True
                warnings.warn(_non_finite_message(logits, step + 1) + "; greedy decoding picks arbitrary "
                              "tokens from them", UserWarning, stacklevel=2)
            if finished is not None:
                token = token.masked_fill(finished, eos_id)
                finished = finished | (token == eos_id)
                done = bool(finished.all())
            else:
                done = False
        yield token.clone()  # an ordinary tensor, usable outside inference mode
        if done or step == max_new_tokens - 1:
            return
        with torch.inference_mode():
            if cache is not None and length < context_size:
                # The sequence still fits the window: positions are unchanged, extend the cache.
                logits = forward(token, cache=cache, last_only=True)[:, -1, :]
                window = torch.cat((window, token), dim=1)
                length += 1
            else:
                # Uncached, or the window is full (every position shifts): recompute the window.
                cache = None  # stale from here on; free its memory
                window = torch.cat((window, token), dim=1)[:, -context_size:]
                length = window.shape[1]
                logits = forward(window, last_only=True)[:, -1, :]


def generate(
    model: GPTModel,
    idx: Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend the prompts ``idx: (b, n)`` by up to ``max_new_tokens`` tokens; returns ``(b, n + new)``.

    The result is ``idx`` itself followed by the new tokens (as in the book, the full prompt is
    returned even when only its end conditioned the model).

    - ``context_size``: tokens the model sees at each step (default and maximum: the model's
      ``context_length``). A prompt longer than it is cropped to its last ``context_size`` tokens,
      with a :class:`UserWarning`; as the sequence grows past it, the window slides, as in the book.
    - ``temperature``: 0 is greedy decoding (argmax, ``generate_text_simple``'s tokens; top_k and
      top_p are then irrelevant). Above 0, logits are divided by it, filtered by ``top_k`` then
      ``top_p`` (see :func:`filter_logits`) and one token per row is sampled.
    - ``seed`` or ``generator`` (not both): sample from a private ``torch.Generator``, which leaves the
      global RNG untouched and makes the result reproducible. With neither, sampling draws from
      torch's global RNG in the book's order, so ``torch.manual_seed(s)`` before this call and before
      the book's ``generate`` gives the same tokens.
    - ``eos_id``: a row that produces ``eos_id`` is finished: its sequence ends with that ``eos_id``
      and, while other rows go on, it is padded with ``eos_id``; generation stops as soon as every
      row has finished, so the result may have fewer than ``max_new_tokens`` new tokens. (The book's
      batch-1 ``generate`` stops *without* appending the eos token: its result is ``out[:, :-1]``
      when ``out`` ends with ``eos_id``.)
    - ``use_cache``: decode with a KV cache (see the module docstring for how the window is handled);
      the tokens are the same either way.

    The model's mode is left as it is: call ``model.eval()`` first (a model in training mode keeps
    dropout on; a warning says so). Raises :class:`~modelkit.GenerationError` for an empty prompt,
    ids outside ``[0, vocab_size)``, ``temperature < 0``, ``top_k < 1``, ``top_p`` outside ``(0, 1]``,
    ``context_size`` outside ``[1, context_length]``, ``seed`` outside ``[0, 2**64 - 1]``, a temperature
    between 0 and :data:`MIN_TEMPERATURE` and other invalid arguments.

    Non-finite logits (a model whose weights hold NaN or inf): sampling raises
    :class:`~modelkit.GenerationError` naming the new token whose logits they are; greedy decoding
    warns (:class:`UserWarning`, once) and goes on with the argmax.
    """
    steps = _start(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, use_cache,
                   seed, generator)
    return torch.cat([idx.long(), *steps], dim=1)
