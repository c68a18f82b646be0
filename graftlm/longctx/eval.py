"""Run long-context samples under several attention settings of one loaded model and report.

A setting is a name and block-sparse attention settings (`graftlm.ops.attention.sparse`): the
model is loaded once with the sparse operator on its attention layers, and each setting is
switched in with `configure_sparse` before its samples run (`enabled=false` is exact dense
attention). A setting may take its KV budget from the length: `budget=8` sizes the local window
and `topk` so that initial + local + topk * block_size is about length / 8.

A model loaded without the operator runs only dense settings (as they are, with its own attention).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from graftlm.errors import GraftError
from graftlm.longctx.score import score
from graftlm.longctx.tasks import Sample

log = logging.getLogger(__name__)

BUDGET_FRACTION = 8  # the default and ladder sparse settings keep about 1/8 of the context
_FALSE = ("0", "false", "no", "off")


def sparse_api() -> ModuleType | None:
    """The block-sparse attention module, or None in a build without it (checked at call time)."""
    try:
        module = importlib.import_module("graftlm.ops.attention.sparse")
    except ImportError:
        return None
    return module if hasattr(module, "configure_sparse") and hasattr(module, "SparseSettings") else None


def _require_api() -> ModuleType:
    api = sparse_api()
    if api is None:
        raise GraftError(
            "block-sparse attention (graftlm.ops.attention.sparse) is not available in this build"
        )
    return api


def _spec_items(spec: str) -> dict[str, str]:
    """The keys of "key=value,..." (normalized as SparseSettings.parse does) and their raw values."""
    items = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        items[key.strip().replace("-", "_")] = value.strip()
    return items


@dataclass(frozen=True)
class Setting:
    """A named attention setting: `spec` ("key=value,...") over the defaults, or over the settings
    sized to 1/`budget` of the length when `budget` is given."""

    name: str
    spec: str = ""
    budget: int | None = None

    @property
    def dense(self) -> bool:
        return _spec_items(self.spec).get("enabled", "true").lower() in _FALSE

    def resolve(self, length: int) -> Any:
        """The SparseSettings this setting runs at `length`."""
        api = _require_api()
        try:
            given = api.SparseSettings.parse(self.spec)
            if self.budget is None:
                return given
            base = budget_settings(length, self.budget, api.SparseSettings())
            return base.replace(**{k: getattr(given, k) for k in _spec_items(self.spec)})
        except ValueError as exc:
            raise GraftError(f"setting {self.name!r}: {exc}") from exc

    def describe(self, length: int) -> str:
        """The settings that differ from the defaults, as "key=value,..."."""
        if self.dense:
            return "dense attention"
        settings, defaults = self.resolve(length), _require_api().SparseSettings()
        changed = [
            f"{f.name}={getattr(settings, f.name)}"
            for f in dataclasses.fields(settings)
            if getattr(settings, f.name) != getattr(defaults, f.name)
        ]
        return ",".join(changed) or "defaults"


def parse_setting(text: str) -> Setting:
    """A setting from NAME=key=value,... : SparseSettings fields, plus `budget=N` to size the
    block size, local window and topk to 1/N of each length first (NAME alone: the defaults)."""
    name, _, spec = text.partition("=")
    if not name.strip():
        raise GraftError(f"setting {text!r}: give it a name, as NAME=key=value,...")
    items = _spec_items(spec)
    budget = None
    if "budget" in items:
        raw = items.pop("budget")
        if not raw.isdigit() or int(raw) < 1:
            raise GraftError(
                f"setting {name.strip()!r}: budget takes a whole fraction N (1/N of the length), got {raw!r}"
            )
        budget = int(raw)
    setting = Setting(name.strip(), ",".join(f"{k}={v}" for k, v in items.items()), budget)
    if sparse_api() is not None and not setting.dense:
        setting.resolve(4096)  # a bad key is an error now, before the model loads
    return setting


def budget_settings(length: int, fraction: int, base: Any) -> Any:
    """`base` with block_size, local_window and topk chosen so that initial blocks + local window
    + topk blocks is about length / fraction (at least one block each; blocks of 16 to base's size)."""
    budget = max(1, length // fraction)
    block = base.block_size
    while block > 16 and 4 * block > budget:
        block //= 2
    local = max(block, min(base.local_window, budget // 4))
    topk = max(1, (budget - base.initial_blocks * block - local) // block)
    return base.replace(block_size=block, local_window=local, topk=topk)


def default_settings() -> list[Setting]:
    """Dense, and sparse at a 1/8 budget (dense only in a build without sparse attention)."""
    dense = Setting("dense", "enabled=false")
    if sparse_api() is None:
        log.warning("block-sparse attention is not available in this build: running dense only")
        return [dense]
    return [dense, Setting(f"sparse-1/{BUDGET_FRACTION}", budget=BUDGET_FRACTION)]


def ladder_settings() -> list[Setting]:
    """The standard ladder at a 1/8 budget: dense; sparse choosing blocks at every token;
    + SnapKV-style preselection of prompt blocks; + the first full-attention layer dense."""
    b = BUDGET_FRACTION
    return [
        Setting("dense", "enabled=false"),
        Setting("sparse", "", budget=b),
        Setting("sparse+preselect", "preselect=true", budget=b),
        Setting("sparse+preselect+dense1", "preselect=true,dense_layers=1", budget=b),
    ]


def needs_sparse(settings: list[Setting]) -> bool:
    """Whether the model must be loaded with the sparse operator; an error in a build without it."""
    sparse = [s.name for s in settings if not s.dense]
    if sparse and sparse_api() is None:
        raise GraftError(
            f"setting {sparse[0]!r} needs block-sparse attention (graftlm.ops.attention.sparse), "
            "which this build does not have"
        )
    return bool(sparse)


def prompt_budget(length: int, context: int | None, max_new_tokens: int) -> int:
    """Prompt tokens a sample of `length` may take: `length`, less what the answer needs beyond
    the model's context. A length past the context is an error."""
    if context is None:
        return length
    if length > context:
        raise GraftError(
            f"length {length} is longer than the model's context ({context} tokens, "
            "config.max_position_embeddings): use a shorter --length"
        )
    return min(length, context - max_new_tokens)


def model_context(llm: Any) -> int | None:
    config = llm.config
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    return getattr(config, "max_position_embeddings", None)


# -- running -------------------------------------------------------------------------------------


@dataclass
class Result:
    """One sample under one setting."""

    setting: str
    length: int
    depth: float
    index: int
    prompt_tokens: int
    needle_depth: float
    answers: list[str]
    prediction: str
    score: float
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float


@dataclass
class SettingReport:
    name: str
    spec: str
    sparse: dict[int, str] = field(default_factory=dict)  # length -> the settings that ran, described
    results: list[Result] = field(default_factory=list)
    attended: int = 0  # keys the sparse decode steps attended to, over every layer and step
    context: int = 0  # keys those steps had in their cache

    @property
    def kv_read(self) -> float | None:
        """Percent of the cached keys that sparse decode steps attended to; None without any."""
        return 100.0 * self.attended / self.context if self.context else None

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float | None:
        """Mean score in percent of the results at `length` and `depth` (None: all); None if none."""
        scores = [
            r.score
            for r in self.results
            if (length is None or r.length == length) and (depth is None or r.depth == depth)
        ]
        return 100.0 * sum(scores) / len(scores) if scores else None

    @property
    def prefill_tok_s(self) -> float:
        seconds = sum(r.prefill_seconds for r in self.results)
        return sum(r.prompt_tokens for r in self.results) / seconds if seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (the first new token comes from the prefill)."""
        seconds = sum(r.decode_seconds for r in self.results)
        steps = sum(max(r.generated_tokens - 1, 0) for r in self.results)
        return steps / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        lengths = sorted({r.length for r in self.results})
        depths = sorted({r.depth for r in self.results})
        return {
            "name": self.name,
            "spec": self.spec,
            "sparse": {str(k): v for k, v in self.sparse.items()},
            "accuracy": {str(n): self.accuracy(n) for n in lengths},
            "accuracy_by_depth": {
                str(n): {str(d): self.accuracy(n, d) for d in depths if self.accuracy(n, d) is not None}
                for n in lengths
            },
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "sparse_kv_read_percent": self.kv_read,
            "samples": [dataclasses.asdict(r) for r in self.results],
        }


def evaluate(
    llm: Any,
    samples: list[Sample],
    settings: list[Setting],
    max_new_tokens: int,
    on_result: Callable[[Result], None] | None = None,
) -> list[SettingReport]:
    """Run every sample under every setting, greedily; `on_result` sees each result as it comes.

    Settings whose prompt pass is the same computation (`SparseSettings.prefill_key`) share one prefill per
    sample: decoding starts from a copy of its cache, and each result reports that prefill's time.
    """
    api = sparse_api()
    has_operator = api is not None and bool(api.sparse_modules(llm.model))
    for s in settings:
        if not s.dense and not has_operator:
            raise GraftError(
                f"setting {s.name!r} needs block-sparse attention, but the model has no attention.sparse "
                "operator (load it with sparse=...; rules=None loads no operators)"
            )
    reports = {s.name: SettingReport(s.name, s.spec) for s in settings}
    for length in dict.fromkeys(s.length for s in samples):
        resolved = {s.name: s.resolve(length) for s in settings} if has_operator else {}
        for s in settings:
            reports[s.name].sparse[length] = _described(s, resolved.get(s.name), length)
        for sample in (s for s in samples if s.length == length):
            for group in _prefill_groups(settings, resolved):
                prefilled, seconds = None, None
                if len(group) > 1:  # one prefill, under the settings that shape the cache
                    api.configure_sparse(llm.model, resolved[group[0].name])
                    start = time.perf_counter()
                    prefilled = llm.engine.prefill(sample.ids)
                    seconds = time.perf_counter() - start
                for setting in group:
                    if has_operator:
                        api.configure_sparse(llm.model, resolved[setting.name])
                    shared = None if prefilled is None else (prefilled[0], copy.deepcopy(prefilled[1]))
                    report = reports[setting.name]
                    result = _run(
                        llm, api if has_operator else None, report, sample, max_new_tokens, shared, seconds
                    )
                    if on_result is not None:
                        on_result(result)
    return list(reports.values())


def _described(setting: Setting, resolved: Any, length: int) -> str:
    if resolved is None:
        return "dense attention (the model's own)"
    return setting.describe(length) if resolved.enabled else "dense attention"


def _run(
    llm: Any,
    api: ModuleType | None,
    report: SettingReport,
    sample: Sample,
    max_new_tokens: int,
    prefilled: tuple | None,
    prefill_seconds: float | None,
) -> Result:
    """One sample under the configured setting, from `prefilled` when given; added to `report`."""
    before = _kv_stats(llm.model, api) if api is not None else (0, 0)
    out = llm.generate(sample.ids, max_new_tokens=max_new_tokens, temperature=0.0, prefilled=prefilled)
    if api is not None:
        after = _kv_stats(llm.model, api)
        report.attended += after[0] - before[0]
        report.context += after[1] - before[1]
    result = Result(
        setting=report.name,
        length=sample.length,
        depth=sample.depth,
        index=sample.index,
        prompt_tokens=len(sample.ids),
        needle_depth=round(sample.needle_depth, 4),
        answers=sample.answers,
        prediction=out.text,
        score=score(sample.task, out.text, sample.answers),
        generated_tokens=len(out.token_ids),
        prefill_seconds=out.prefill_seconds if prefill_seconds is None else prefill_seconds,
        decode_seconds=out.decode_seconds,
    )
    report.results.append(result)
    return result


def _prefill_groups(settings: list[Setting], resolved: dict[str, Any]) -> list[list[Setting]]:
    """Settings that can share a prefill, in order; the first of a group shapes its cache.

    Sparse settings group by `SparseSettings.prefill_key`. A dense setting reads any block layout,
    so it joins the first group with its cache dtype. Without the operator every setting runs alone.
    """
    if not resolved:
        return [[s] for s in settings]
    groups: dict[tuple, list[Setting]] = {}
    for s in (s for s in settings if resolved[s.name].enabled):
        groups.setdefault(resolved[s.name].prefill_key(), []).append(s)
    for s in (s for s in settings if not resolved[s.name].enabled):
        kv_dtype = resolved[s.name].kv_dtype
        key = next((k for k, g in groups.items() if resolved[g[0].name].kv_dtype == kv_dtype), None)
        if key is None:
            key = ("dense", kv_dtype)
            groups[key] = []
        groups[key].append(s)
    return list(groups.values())


def _kv_stats(model: Any, api: ModuleType) -> tuple[int, int]:
    """(keys attended, keys cached) summed over the sparse decode steps of every operator so far."""
    modules = api.sparse_modules(model)
    stats = [getattr(m, "stats", {}) for m in modules]
    return sum(s.get("attended", 0) for s in stats), sum(s.get("context", 0) for s in stats)


# -- output --------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(reports: list[SettingReport], lengths: list[int], by_depth: bool = False) -> str:
    """Accuracy (%) per setting and length, prefill and decode tok/s, and the share of the cached
    keys that sparse decode steps read ("-": no sparse step); per depth on request."""
    width = max([len("setting")] + [len(r.name) for r in reports])
    cols = [str(n) for n in lengths]
    colw = [max(len(c), 6) for c in cols]
    lines = [
        "  ".join([f"{'setting':<{width}}", *(f"{c:>{w}}" for c, w in zip(cols, colw))])
        + "  prefill tok/s  decode tok/s  kv read %"
    ]
    for r in reports:
        accs = [f"{_pct(r.accuracy(n)):>{w}}" for n, w in zip(lengths, colw)]
        lines.append(
            "  ".join([f"{r.name:<{width}}", *accs])
            + f"  {r.prefill_tok_s:>13.1f}  {r.decode_tok_s:>12.1f}  {_pct(r.kv_read):>9}"
        )
    if by_depth:
        depths = sorted({res.depth for r in reports for res in r.results})
        lines += ["", "accuracy by depth (%)"]
        lines.append(
            "  ".join([f"{'setting':<{width}}", "depth", *(f"{c:>{w}}" for c, w in zip(cols, colw))])
        )
        for r in reports:
            for d in depths:
                accs = [f"{_pct(r.accuracy(n, d)):>{w}}" for n, w in zip(lengths, colw)]
                lines.append("  ".join([f"{r.name:<{width}}", f"{d:>5.2f}", *accs]))
    lines += ["", "settings:"]
    for r in reports:
        described = sorted(set(r.sparse.values()))
        if len(described) == 1:
            lines.append(f"  {r.name}: {described[0]}")
        else:
            lines += [f"  {r.name} @{n}: {d}" for n, d in r.sparse.items()]
    return "\n".join(lines)
