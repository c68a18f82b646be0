"""The generation engine: prefill in chunks, decode one token at a time with a KV cache, stream text.

The engine knows nothing of files or rules. It drives a module that behaves like a Hugging Face
`*ForCausalLM` (`model(input_ids=, position_ids=, cache=, use_cache=True)` returns
`.logits` [B, T, V]) and an HF tokenizer. Tensors are shaped [B, T]; each call serves one
sequence (B = 1), and a server queues requests.

Context policy: a prompt that leaves no room for one new token is a GraftError naming both
numbers; otherwise `max_new_tokens` is clamped to the room left (logged), and a clamped run
ends with finish_reason "length".
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
import torch

from graftlm.engine.cache import make_cache
from graftlm.engine.detok import IncrementalDetokenizer, StopStringMatcher
from graftlm.engine.sampling import SamplingParams, make_generator, sample_next
from graftlm.errors import GraftError
from graftlm.models.compat import cache_arg, output_cache

log = logging.getLogger(__name__)


class ContextOverflowError(GraftError):
    """The prompt does not fit the model's context."""


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only (stop-string tail removed from text, ids kept up to the stop)
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled"
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second: the first generated token comes from the prefill's logits."""
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


# Special tokens that end a turn in common chat formats. Like llama.cpp's end-of-generation list,
# they stop generation when the tokenizer has them as special tokens, since a GGUF's config often
# names only <eos> (Gemma's <end_of_turn>, ChatML's <|im_end|>, Llama 3's <|eot_id|>).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<EOT>")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def prefill_chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) spans of at most `chunk` tokens, except that a lone last token joins the chunk
    before it: a one-token call is a decode step to attention operators (attention.sparse would
    run its sparse path on a prompt token), so a prompt of two or more tokens never ends with one."""
    spans = [(s, min(s + chunk, length)) for s in range(0, length, chunk)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], length)]
    return spans


class Engine:
    """Generates text from one model and tokenizer; see the module docstring for the context policy."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        max_context: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if prefill_chunk < 1:
            raise GraftError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.prefill_chunk = prefill_chunk
        text_config = _text_config(model.config)
        self.max_context: int | None = max_context or getattr(text_config, "max_position_embeddings", None)
        self.vocab_size: int | None = getattr(text_config, "vocab_size", None)
        self.eos_token_ids: list[int] = self._default_eos_ids()
        # Prefill needs only the last position's logits; asking for all of them costs T x V.
        self._keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_arg = cache_arg(model.forward)

    def _default_eos_ids(self) -> list[int]:
        ids = _as_id_list(getattr(self.tokenizer, "eos_token_id", None))
        ids += _as_id_list(getattr(_text_config(self.model.config), "eos_token_id", None))
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
        ids += self._end_of_turn_ids()
        return sorted(set(ids))

    def _end_of_turn_ids(self) -> list[int]:
        """Ids of END_OF_TURN_TOKENS that the tokenizer has as special (control) tokens."""
        special_ids = set(getattr(self.tokenizer, "all_special_ids", []))
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        special_ids |= {i for i, token in added.items() if getattr(token, "special", False)}
        ids = []
        for name in END_OF_TURN_TOKENS:
            token_id = self.tokenizer.convert_tokens_to_ids(name)
            if (
                isinstance(token_id, int)
                and token_id in special_ids
                and token_id != self.tokenizer.unk_token_id
            ):
                ids.append(token_id)
        return ids

    # -- prompts ---------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of `prompt`, with the special tokens (BOS) the tokenizer adds; ids pass through."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(i) for i in prompt]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def require_chat_template(self) -> None:
        """Raise a GraftError that says what to do when the tokenizer has no chat template."""
        if not self.has_chat_template:
            raise GraftError(
                "this model's tokenizer has no chat template: use a plain prompt (graftlm run, or "
                "/v1/completions when serving), or give one with --chat-template FILE (graftlm chat, "
                "graftlm serve)"
            )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation, rendered with the tokenizer's chat template."""
        self.require_chat_template()
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        except jinja2.TemplateError as exc:
            raise GraftError(f"the chat template rejected the conversation: {exc}") from exc
        return [int(i) for i in ids]

    # -- model calls -----------------------------------------------------------------------

    def new_cache(self) -> Any:
        return make_cache(self.model)

    def forward(self, input_ids: torch.Tensor, cache: Any, start: int) -> tuple[torch.Tensor, Any]:
        """Run tokens [B, T] at positions start..start+T-1; returns (last-position logits [B, V], cache)."""
        input_ids = input_ids.to(self.device)
        batch, length = input_ids.shape
        positions = torch.arange(start, start + length, device=self.device).unsqueeze(0).expand(batch, length)
        kwargs: dict[str, Any] = {}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            kwargs[self._cache_arg] = cache
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, **kwargs)
        new_cache = output_cache(out)
        return out.logits[:, -1, :], cache if new_cache is None else new_cache

    def prefill(
        self, ids: list[int], cache: Any | None = None, should_stop: Callable[[], bool] | None = None
    ) -> tuple[torch.Tensor | None, Any]:
        """Feed the prompt in chunks of `prefill_chunk`; returns (last logits [1, V], cache).

        The logits are None when `should_stop` asked to stop between chunks.
        """
        cache = self.new_cache() if cache is None else cache
        tokens = torch.tensor([ids], dtype=torch.long)
        logits = None
        for start, stop in prefill_chunks(len(ids), self.prefill_chunk):
            if should_stop is not None and should_stop():
                return None, cache
            logits, cache = self.forward(tokens[:, start:stop], cache, start)
        return logits, cache

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        prefilled: tuple[torch.Tensor, Any] | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate a continuation of `prompt`; `on_text` gets text pieces as they complete.

        `prefilled` is `(logits, cache)` as `prefill(ids)` returned them for this prompt: generation
        continues from there (the cache is written to) and the result counts no prefill time.
        """
        ids, params = self._prepare(prompt, params, overrides)
        run = self._run(ids, params, should_stop, prefilled)
        while True:
            try:
                piece = next(run)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(piece)

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, **overrides: Any
    ) -> Iterator[str]:
        """Yield text pieces as they complete; stop iterating to cancel."""
        ids, params = self._prepare(prompt, params, overrides)  # errors now, not at the first next()
        return self._run(ids, params, None)

    def _prepare(
        self, prompt: str | list[int], params: SamplingParams | None, overrides: dict[str, Any]
    ) -> tuple[list[int], SamplingParams]:
        params = (params or SamplingParams()).with_overrides(**overrides)
        ids = self.encode(prompt)
        if not ids:
            raise GraftError("the prompt is empty (and the tokenizer adds no BOS token)")
        if self.vocab_size is not None and not all(0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise GraftError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        if self.max_context is not None:
            room = self.max_context - len(ids)
            if room < 1 and params.max_new_tokens > 0:
                raise ContextOverflowError(
                    f"the prompt has {len(ids)} tokens but the context holds {self.max_context}: "
                    "no room to generate; shorten the prompt"
                )
            if params.max_new_tokens > room:
                log.warning(
                    "prompt (%d tokens) + max_new_tokens (%d) exceeds the context (%d): generating at most %d",
                    len(ids),
                    params.max_new_tokens,
                    self.max_context,
                    room,
                )
                params = params.with_overrides(max_new_tokens=room)
        return ids, params

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_token_ids is not None:
            return set(params.stop_token_ids)
        return set() if params.ignore_eos else set(self.eos_token_ids)

    def _run(
        self,
        ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None,
        prefilled: tuple[torch.Tensor, Any] | None = None,
    ) -> Generator[str, None, GenerationResult]:
        """The loop: yields text pieces, returns the GenerationResult. Time spent in the consumer
        between yields is not counted as decode time."""
        generator = None if params.greedy else make_generator(params.seed)
        stop_ids = self._stop_ids(params)
        detok = IncrementalDetokenizer(self.tokenizer, ids)
        matcher = StopStringMatcher(params.stop)
        out_ids: list[int] = []
        finish = "length"
        prefill_seconds = decode_seconds = 0.0

        if params.max_new_tokens > 0:
            t0 = time.perf_counter()
            logits, cache = prefilled if prefilled is not None else self.prefill(ids, should_stop=should_stop)
            if logits is not None:  # sampling reads them on the CPU; copying here waits for an accelerator,
                logits = logits.to("cpu", torch.float32)  # so its queued prefill counts as prefill time
            mark = time.perf_counter()
            prefill_seconds = mark - t0
            if logits is None:
                finish = "cancelled"
            for step in range(params.max_new_tokens if logits is not None else 0):
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
                token = int(sample_next(logits, params, generator)[0])
                out_ids.append(token)
                if token in stop_ids:
                    finish = "stop"
                    break
                piece = matcher.feed(detok.add(token))
                if piece:
                    decode_seconds += time.perf_counter() - mark
                    yield piece
                    mark = time.perf_counter()
                if matcher.stopped:
                    finish = "stop"
                    break
                if step + 1 < params.max_new_tokens:
                    next_ids = torch.tensor([[token]], dtype=torch.long)
                    logits, cache = self.forward(next_ids, cache, start=len(ids) + step)
            decode_seconds += time.perf_counter() - mark

        tail = matcher.feed(detok.flush()) + matcher.flush()
        if matcher.stopped and finish == "length":
            finish = "stop"  # the last, held-back characters completed a stop string
        if tail:
            yield tail
        result = GenerationResult(
            token_ids=out_ids,
            text=matcher.text,
            finish_reason=finish,
            prompt_tokens=len(ids),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
        )
        log.debug(
            "generated %d tokens (%s): prefill %.1f tok/s, decode %.1f tok/s",
            len(out_ids),
            finish,
            result.prefill_tokens_per_second,
            result.decode_tokens_per_second,
        )
        return result
