"""Prefill and decode speed of a loaded model, with the bytes of weights a decoded token reads.

A decoded token reads every weight once, except: an embedding table (one row), and routed
experts (only the top-k of E: the expected share k/E of their bytes). Achieved GB/s is those bytes
times decode tokens/s. Medians over repeats; peak RSS from the kernel's high-water mark, and
where CUDA was used, the peak of torch's CUDA allocator on each GPU.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from graftlm.engine.generate import Engine
from graftlm.errors import GraftError


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int  # asked for
    threads: int
    repeat: int
    prefill_tok_s: float
    decode_tok_s: float
    prefill_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)
    bytes_per_token: int = 0
    bytes_by_device: dict[str, int] = field(default_factory=dict)  # the same bytes, by device
    decode_gb_s: float = 0.0
    peak_rss_mib: float = 0.0
    peak_gpu_mib: list[float] = field(default_factory=list)  # per CUDA device, when CUDA was used
    load_seconds: float = 0.0
    mmap: bool = True  # False: the weights were read into RAM (--no-mmap)
    machine: str = ""
    generated_tokens: int = 0  # generated per run (fewer than gen_tokens where the context ends first)

    def to_dict(self) -> dict:
        return asdict(self)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.is_meta else t.numel() * t.element_size()


def _matrix_device(m: object) -> str:
    """Where a packed matrix lives: its weight tensor's device (GPU layouts), else the CPU."""
    w = getattr(m, "weight", None)
    return str(w.device) if isinstance(w, torch.Tensor) else "cpu"


def _own_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of a module's own weights by device: its parameters and buffers, or its packed matrices."""
    out: dict[str, int] = {}
    own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
    for t in own:
        if t.numel() > 1 and not t.is_meta:
            out[str(t.device)] = out.get(str(t.device), 0) + _tensor_bytes(t)
    packed = getattr(module, "packed", None)  # linear.cpu, linear.gpu
    matrices = (
        ([packed] if packed is not None else [])
        + list(getattr(module, "gate_up", []))
        + list(getattr(module, "down", []))
    )  # experts.cpu, experts.gpu
    for m in matrices:
        out[_matrix_device(m)] = out.get(_matrix_device(m), 0) + m.nbytes
    return out


def weight_bytes_by_device(model: nn.Module) -> dict[str, int]:
    """Bytes of weights one decoded token reads (see the module docstring), by device."""
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    total: dict[str, int] = {}

    def add(device: str, n: int) -> None:
        total[device] = total.get(device, 0) + n

    for module in model.modules():
        n_experts = getattr(module, "num_experts", None)
        if isinstance(module, nn.Embedding):
            add(str(module.weight.device), module.embedding_dim * module.weight.element_size())
        elif hasattr(module, "row_bytes"):  # embedding.cpu: one stored row
            add("cpu", module.row_bytes)
        elif n_experts and k and (hasattr(module, "gate_up_proj") or hasattr(module, "gate_up")):
            for device, n in _own_bytes(module).items():
                add(device, n * k // n_experts)
        else:
            for device, n in _own_bytes(module).items():
                add(device, n)
    return {d: n for d, n in total.items() if n}


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads, on all devices together."""
    return sum(weight_bytes_by_device(model).values())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_gpu_mib() -> list[float]:
    """torch's CUDA allocator high-water mark per device; empty when CUDA was never initialized."""
    if not torch.cuda.is_initialized():
        return []
    return [torch.cuda.max_memory_allocated(i) / 2**20 for i in range(torch.cuda.device_count())]


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from graftlm.kernels.cpu import qblocks

    amx = ("+amx" if qblocks.amx() else "") + ("+amx-bf16" if qblocks.amx_bf16() else "")
    vnni = ("+vnni" if qblocks.vnni() else "") + ("+bf16" if qblocks.bf16() else "")
    kernels = f"graftlm C kernels {qblocks.isa()}{vnni}{amx}" if qblocks.available() else "torch kernels only"
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_initialized()
        else []
    )
    gpu = f"; {', '.join(gpus)}" if gpus else ""
    return f"{cpu}; torch {torch.__version__}; {torch.backends.cpu.get_cpu_capability()}; {kernels}{gpu}"


def run_bench(
    engine: Engine, prompt_tokens: int = 512, gen_tokens: int = 128, repeat: int = 3, seed: int = 0
) -> BenchResult:
    """Median prefill and decode tok/s over `repeat` runs of a random prompt (after one warm-up run
    of the whole prompt, as llama-bench warms up).

    The first generated token comes from the prefill's logits, so a decode rate needs at least two;
    where the context leaves room for fewer, this raises (a rate of 0 would read as a measurement)."""
    if prompt_tokens < 1 or gen_tokens < 2 or repeat < 1:
        raise GraftError(
            f"bench needs prompt_tokens >= 1, gen_tokens >= 2 (the first token comes from the prefill) "
            f"and repeat >= 1; got {prompt_tokens}, {gen_tokens}, {repeat}"
        )
    vocab = engine.vocab_size or 1000
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 1, (prompt_tokens,), generator=gen).tolist()
    # Warm-up: the whole prompt once, as llama-bench's warm-up runs its prompt test once; a short one
    # left the first timed prefill paying for first touches of the weights it had not used (the
    # memory map's page faults: an MoE's 16-token warm-up reaches about half its experts).
    engine.generate(ids, max_new_tokens=2, ignore_eos=True)
    prefill, decode, generated = [], [], []
    for _ in range(repeat):
        r = engine.generate(ids, max_new_tokens=gen_tokens, ignore_eos=True, stop_token_ids=[])
        if len(r.token_ids) < 2:
            raise GraftError(
                f"the context ({engine.max_context} tokens) leaves room for {len(r.token_ids)} token(s) "
                f"after a {prompt_tokens}-token prompt: no decode step to time; use fewer --prompt-tokens"
            )
        generated.append(len(r.token_ids))
        prefill.append(prompt_tokens / r.prefill_seconds)
        # The first new token comes from the prefill's logits; the rest each cost one decode step.
        decode.append((len(r.token_ids) - 1) / r.decode_seconds)
        time.sleep(0)
    by_device = weight_bytes_by_device(engine.model)
    bpt = sum(by_device.values())
    dec = statistics.median(decode)
    return BenchResult(
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        threads=torch.get_num_threads(),
        repeat=repeat,
        prefill_tok_s=statistics.median(prefill),
        decode_tok_s=dec,
        prefill_runs=prefill,
        decode_runs=decode,
        bytes_per_token=bpt,
        bytes_by_device=by_device,
        decode_gb_s=bpt * dec / 1e9,
        peak_rss_mib=peak_rss_mib(),
        peak_gpu_mib=peak_gpu_mib(),
        machine=machine_description(),
        generated_tokens=min(generated),
    )
