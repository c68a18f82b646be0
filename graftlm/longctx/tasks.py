"""Synthetic long-context tasks, generated from a seed and fitted to a length in the model's tokens.

- `passkey`, `number_string`, `kv_retrieval`: InfiniteBench's retrieval tasks (its prompts, its
  filler, its needles), generated instead of downloaded.
- `niah`: RULER's single needle in a haystack, with Python's own documentation
  (`pydoc_data.topics`) as the essay haystack.

A task draws a sample's random values (the key, the number, the JSON pairs) from its own
`random.Random`, then renders its text for a given amount of haystack ("units": filler sentences,
JSON pairs or words) with the needle at a given depth. `build_sample` finds the most units whose
prompt, as token ids of the model's own tokenizer (chat template and answer prefix included), is
not longer than the target: it measures the tokens per unit once, then corrects its guess from
exact counts (a few tokenizations per sample, usually one or two once a length has been fitted).
"""

from __future__ import annotations

import functools
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graftlm.errors import GraftError

# InfiniteBench's passkey and number_string haystack: these sentences, repeated.
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
# RULER's keys are words; a fixed list of ordinary nouns that Python's documentation never uses.
NIAH_WORDS = (
    "aardvark", "bamboo", "cactus", "dolphin", "ember", "falcon", "glacier", "harbor", "iris", "jasmine",
    "kettle", "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "tundra",
    "umbrella", "violet", "walrus", "yarrow", "zephyr", "marble", "cobalt", "thistle", "walnut", "lantern",
)  # fmt: skip
DEFAULT_DEPTHS = tuple(i / 10 for i in range(10))  # 0 .. 0.9: a needle right before the question is easy


class TaskError(GraftError):
    """An unknown task, or a length the task cannot be fitted to."""


@dataclass(frozen=True)
class Rendered:
    """A task's text (the user message), its answers, and where its needle sits in the haystack
    (a fraction of the haystack's characters before the needle: 0 = start)."""

    text: str
    answers: list[str]
    needle_depth: float


class Draft:
    """One sample's random values; renders the sample's text for any amount of haystack."""

    answer_prefix: str = ""

    def render(self, units: int, depth: float) -> Rendered:
        raise NotImplementedError


class Task:
    """A task: its name, scoring family, default answer length and how it draws samples."""

    name: ClassVar[str]
    max_new_tokens: ClassVar[int]
    min_units: ClassVar[int] = 0  # the least haystack a prompt can have

    def draw(self, rng: random.Random) -> Draft:
        raise NotImplementedError


# -- InfiniteBench: passkey and number_string --------------------------------------------------


def _offsets(parts: list[str]) -> list[int]:
    """Where each part starts in `" ".join(parts)`, and (last) the joined length + 1."""
    out, at = [], 0
    for p in parts:
        out.append(at)
        at += len(p) + 1
    return [*out, at]


def _nearest(offsets: list[int], depth: float, among: list[int] | None = None) -> int:
    """The part index (0..len) whose start is nearest `depth` of the joined text's characters."""
    target = depth * max(offsets[-1] - 1, 0)
    return min(among if among else range(len(offsets)), key=lambda i: (abs(offsets[i] - target), i))


def _insert(parts: list[str], needle: str, k: int) -> tuple[str, float]:
    """`parts` joined by spaces with `needle` before part `k`, and the needle's depth."""
    before, after = " ".join(parts[:k]), " ".join(parts[k:])
    context = " ".join(p for p in (before, needle, after) if p)
    start = len(before) + (1 if before else 0)
    haystack = len(context) - len(needle)
    return context, start / haystack if haystack else 0.0


class _FillerDraft(Draft):
    def __init__(self, preamble: str, needle: str, question: str, answer: str, answer_prefix: str):
        self.preamble, self.needle, self.question, self.answer = preamble, needle, question, answer
        self.answer_prefix = answer_prefix

    def render(self, units: int, depth: float) -> Rendered:
        filler = [FILLER[i % len(FILLER)] for i in range(units)]
        context, needle_depth = _insert(filler, self.needle, _nearest(_offsets(filler), depth))
        return Rendered(f"{self.preamble}\n\n{context}\n\n{self.question}", [self.answer], needle_depth)


class Passkey(Task):
    name = "passkey"
    max_new_tokens = 16

    def draw(self, rng: random.Random) -> Draft:
        key = str(rng.randint(10_000, 99_999))
        return _FillerDraft(
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
            "I will quiz you about the important information there.",
            f"The pass key is {key}. Remember it. {key} is the pass key.",
            "What is the pass key?",
            key,
            "The pass key is",
        )


class NumberString(Task):
    name = "number_string"
    max_new_tokens = 16

    def draw(self, rng: random.Random) -> Draft:
        num = str(rng.randint(10**9, 10**10 - 1))
        return _FillerDraft(
            "There is an important info hidden inside a lot of irrelevant text. Find it. "
            "I will quiz you about the important information there.",
            f"The sequence of digits is {num}. Remember it. {num} is the sequence of digits.",
            "What is the sequence of digits?",
            num,
            "The sequence of digits is",
        )


# -- InfiniteBench: kv_retrieval -----------------------------------------------------------------


class _KVDraft(Draft):
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pairs: list[tuple[str, str]] = []

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def render(self, units: int, depth: float) -> Rendered:
        while len(self.pairs) < units:  # pair i is the same whatever `units` the fit tries first
            self.pairs.append((self._uuid(), self._uuid()))
        pairs = self.pairs[:units]
        q = min(round(depth * units), units - 1)
        key, value = pairs[q]
        data = json.dumps(dict(pairs), ensure_ascii=False)
        text = (
            "Extract the value corresponding to the specified key in the JSON object below.\n\n"
            f'JSON data:\n{data}\n\nKey: "{key}"\nThe value associated with the specified key is: '
        )
        return Rendered(text, [value], data.index(f'"{key}"') / len(data))


class KVRetrieval(Task):
    name = "kv_retrieval"
    max_new_tokens = 48
    min_units = 1

    def draw(self, rng: random.Random) -> Draft:
        return _KVDraft(rng)


# -- RULER: niah_single (essay haystack) ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def haystack_words() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Python's documentation topics, sorted by name and read as prose (whitespace collapsed):
    its words, and the indices of the words that start a sentence."""
    from pydoc_data.topics import topics

    words = tuple(" ".join(topics[name] for name in sorted(topics)).split())
    starts = tuple(i for i in range(len(words)) if i == 0 or words[i - 1].endswith("."))
    return words, starts


class _NiahDraft(Draft):
    def __init__(self, rng: random.Random):
        self.word = rng.choice(NIAH_WORDS)
        self.number = str(rng.randint(10**6, 10**7 - 1))
        words, starts = haystack_words()
        self.start = rng.choice(starts)
        self.answer_prefix = f"The special magic number for {self.word} mentioned in the provided text is"

    def render(self, units: int, depth: float) -> Rendered:
        words, _ = haystack_words()
        chunk = [words[(self.start + i) % len(words)] for i in range(units)]
        # RULER puts the needle between sentences: the sentence start nearest the depth, when one
        # is near (code listings in the documentation run long without a full stop), else a word.
        offsets = _offsets(chunk)
        at = _nearest(offsets, depth)
        near = max(80, offsets[-1] // 100)
        sentences = [
            i
            for i in range(units + 1)
            if (i in (0, units) or chunk[i - 1].endswith(".")) and abs(offsets[i] - offsets[at]) <= near
        ]
        k = _nearest(offsets, depth, sentences) if sentences else at
        needle = f"One of the special magic numbers for {self.word} is: {self.number}."
        context, needle_depth = _insert(chunk, needle, k)
        text = (
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the numbers afterwards.\n{context}\n"
            f"What is the special magic number for {self.word} mentioned in the provided text?"
        )
        return Rendered(text, [self.number], needle_depth)


class Niah(Task):
    name = "niah"
    max_new_tokens = 24

    def draw(self, rng: random.Random) -> Draft:
        return _NiahDraft(rng)


TASKS: dict[str, Task] = {t.name: t for t in (Passkey(), NumberString(), KVRetrieval(), Niah())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


# -- prompts -------------------------------------------------------------------------------------


class PromptFormat:
    """Turns a task's text into token ids: one user message through the chat template when
    `encode_chat` is given (RULER style: the answer prefix follows the generation prompt),
    else the raw text with the tokenizer's special tokens and the answer prefix after a blank line."""

    def __init__(
        self,
        tokenizer: Any,
        encode_chat: Callable[[list[dict]], list[int]] | None = None,
        answer_prefix: bool = True,
    ):
        self.tokenizer = tokenizer
        self.encode_chat = encode_chat
        self.answer_prefix = answer_prefix

    @property
    def chat(self) -> bool:
        return self.encode_chat is not None

    def ids(self, text: str, prefix: str = "") -> list[int]:
        prefix = prefix if self.answer_prefix else ""
        if self.encode_chat is None:
            full = f"{text}\n\n{prefix}" if prefix else text
            return list(self.tokenizer(full, add_special_tokens=True)["input_ids"])
        ids = list(self.encode_chat([{"role": "user", "content": text}]))
        if prefix:
            ids += self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return ids


# -- samples -------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One prompt: the token ids fitted to `length`, the answers, and where the needle went."""

    task: str
    length: int  # the target: len(ids) <= length
    depth: float  # the depth asked for
    index: int
    seed: int
    ids: list[int] = field(repr=False)
    text: str = field(repr=False)
    answers: list[str]
    units: int  # haystack units (filler sentences, JSON pairs, words)
    needle_depth: float  # where the needle landed, as a fraction of the haystack's characters


@dataclass
class FitHint:
    """What fitting one sample learned, to start the next sample of the same length from."""

    units: int
    tokens_per_unit: float


PROBE_UNITS = 64  # haystack units tokenized to measure the tokens per unit


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """The sample's own generator: the same for the same seed, task, length and index."""
    return random.Random(f"graftlm-longctx:{seed}:{task}:{length}:{index}")


def build_sample(
    task: Task | str,
    fmt: PromptFormat,
    length: int,
    depth: float,
    *,
    seed: int = 0,
    index: int = 0,
    hint: FitHint | None = None,
    max_tokens: int | None = None,
) -> tuple[Sample, FitHint]:
    """The sample `index` of `task` at `length` tokens (at most `max_tokens` when given: room
    left for the answer), and a hint for the next sample of this length."""
    task = get_task(task) if isinstance(task, str) else task
    if not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth {depth} is outside 0..1")
    draft = task.draw(sample_rng(seed, task.name, length, index))
    cache: dict[int, tuple[Rendered, list[int]]] = {}

    def measure(units: int) -> int:
        if units not in cache:
            rendered = draft.render(units, depth)
            cache[units] = rendered, fmt.ids(rendered.text, draft.answer_prefix)
        return len(cache[units][1])

    target = length if max_tokens is None else min(length, max_tokens)
    first = task.min_units
    if hint is None:
        base = measure(first)
        if base > target:
            raise _too_small(task, length, base + length - target)
        rate = max((measure(first + PROBE_UNITS) - base) / PROBE_UNITS, 1e-3)
        guess = first + int((target - base) / rate)
    else:
        rate, guess = hint.tokens_per_unit, hint.units
    units = _fit(measure, target, first, max(first, guess), rate)
    if units is None:
        raise _too_small(task, length, measure(first) + length - target)
    rendered, ids = cache[units]
    sample = Sample(
        task=task.name,
        length=length,
        depth=depth,
        index=index,
        seed=seed,
        ids=ids,
        text=rendered.text,
        answers=list(rendered.answers),
        units=units,
        needle_depth=rendered.needle_depth,
    )
    return sample, FitHint(units, rate)


def _too_small(task: Task, length: int, minimum: int) -> TaskError:
    return TaskError(
        f"length {length} is too small for {task.name}: its instructions, needle and question alone need "
        f"a length of {minimum} tokens of this model's tokenizer; use a length of at least {minimum}"
    )


def _fit(measure: Callable[[int], int], target: int, first: int, guess: int, rate: float) -> int | None:
    """The most units (or within one unit's tokens of it) whose prompt fits `target` tokens.

    Token counts grow with the units almost linearly: step from the guess at the rate (the
    secant through the last two counts once there are two), aiming half a unit below the target,
    then interpolate inside the bracket [most fitting, fewest overshooting] until it closes.
    """
    below: int | None = None  # most units known to fit
    above: int | None = None  # fewest units known not to fit
    n, last = guess, None
    for _ in range(40):
        count = measure(n)
        if count <= target:
            below = n if below is None else max(below, n)
        else:
            above = n if above is None else min(above, n)
        if above == first:
            return None
        if below is not None and (
            (above is not None and above - below <= 1) or target - measure(below) < max(rate, 1.0)
        ):
            return below
        if last is not None and last != n and measure(last) != count:
            rate = max((count - measure(last)) / (n - last), 1e-3)
        last = n
        aim = target - rate / 2
        if below is not None and above is not None:
            lo, hi = measure(below), measure(above)
            step = round((aim - lo) * (above - below) / max(hi - lo, 1))
            n = below + min(max(step, 1), above - below - 1)
        else:
            step = round((aim - count) / rate)
            n = max(first, n + (max(step, 1) if count <= target else min(step, -1)))
            if above is not None:
                n = min(n, above - 1)
    return below


def sample_depths(depths: list[float] | tuple[float, ...], samples: int) -> list[float]:
    """The depth of each of `samples` samples: every depth in turn, or an even spread of them
    when there are fewer samples than depths."""
    if not depths:
        raise TaskError("no depths given")
    d = len(depths)
    if samples >= d:
        return [depths[i % d] for i in range(samples)]
    return [depths[i * d // samples] for i in range(samples)]


def build_samples(
    task: Task | str,
    fmt: PromptFormat,
    lengths: list[int],
    depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS,
    samples: int | None = None,
    seed: int = 0,
    max_tokens: dict[int, int] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """Every sample of a run: `samples` per length (default: one per depth), spread over the depths;
    `max_tokens` caps a length's prompts below the length (to leave room for the answer)."""
    task = get_task(task) if isinstance(task, str) else task
    out: list[Sample] = []
    for length in lengths:
        hint = None
        for index, depth in enumerate(sample_depths(depths, samples or len(depths))):
            sample, hint = build_sample(
                task,
                fmt,
                length,
                depth,
                seed=seed,
                index=index,
                hint=hint,
                max_tokens=(max_tokens or {}).get(length),
            )
            out.append(sample)
            if on_sample is not None:
                on_sample(sample)
    return out
