"""`mlp.cpu`: the gated MLP of the Llama family and DeepSeek, down(act(gate(x)) * up(x)), with the
gate and up projections in one C call.

It replaces a dense MLP module (each layer's `mlp` in dense models, DeepSeek's first dense layers,
the shared experts of Qwen2-MoE and DeepSeek) and adopts `gate_proj`, `up_proj`, `down_proj` and
`act_fn` under their HF names, so linear rules still reach the projections. Where both projections
are `linear.cpu` matrices on GGUF blocks and the input is a few fp32 rows (decode), they run as one
`matmul_many` call: x is quantized once, and one parallel region covers both matrices. Otherwise each
projection runs as its own module. For one row (a decode step) all three run as `MLPProgram`: fixed
direct C calls into one scratch buffer, without module calls between them. The result is exactly
what the modules compute one by one (the same kernels, the same rounding of x).

Other classes are refused by name: a module with fused gate-up weights (Phi-3) or another form
needs its own operator.
"""

from __future__ import annotations

import torch
from torch import nn

from graftlm.kernels.cpu import fused, qblocks
from graftlm.ops.base import InjectedModule, gated
from graftlm.ops.linear_cpu import add_biases, aligned, direct_specs, fused_linears, runs_direct

SUPPORTED = frozenset(
    {
        "LlamaMLP",
        "MistralMLP",
        "Qwen2MLP",
        "Qwen2MoeMLP",
        "Qwen3MLP",
        "Qwen3MoeMLP",
        "Gemma3MLP",
        "DeepseekV2MLP",
        "DeepseekV3MLP",
    }
)
CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")


class MLPCPU(InjectedModule, name="mlp.cpu"):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)), gate and up in one call when they can."""

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.adopt_known(orig_module, SUPPORTED, CHILDREN)
        self._program: MLPProgram | bool | None = None  # program()'s answer, worked out after load

    def load(self) -> None:
        """Nothing of its own: the adopted projections load their weights."""
        self._program = None

    def unload(self) -> None:
        self._program = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        program = self._program if self._program is not None else self.program()
        if program and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() == program.hidden:
            scratch, row = torch.empty(program.size, dtype=torch.float32), x.contiguous()  # (kept alive)
            out = program.run(scratch, 0, row.data_ptr())
            return scratch[out : out + program.hidden].view(x.shape)
        both = fused_linears([self.gate_proj, self.up_proj], x)
        gate, up = both if both is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(gated(self.act_fn, gate, up))

    def program(self) -> MLPProgram | bool:
        """The one-row forward as direct C calls (MLPProgram), or False where the projections do
        not all run on the file's blocks; worked out once per load."""
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        hidden, inter = getattr(gate, "in_features", 0), getattr(gate, "out_features", 0)
        self._program = (
            MLPProgram(self)
            if qblocks.available()
            and runs_direct([gate, up], hidden)
            and runs_direct([down], inter)
            and up.out_features == inter
            and down.out_features == hidden
            else False
        )
        return self._program


def act_kind(act: nn.Module) -> int | None:
    """The C kernel `act_mul`'s kind for an MLP's activation module: 0 SiLU, 1 the tanh-approximated
    GELU; None for any other (the module then runs)."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return 0
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation") or (
        isinstance(act, nn.GELU) and act.approximate == "tanh"
    ):
        return 1
    return None


class MLPProgram:
    """mlp.cpu's forward for one fp32 row as fixed direct C calls into a caller's scratch buffer: gate
    and up in one `matmul_many`, the activation and the product with up as the module's torch
    operations, down in one call; the same kernels and operations as the modules, so the same bits.
    A one-token step runs it without module calls, checks or an allocation per projection
    (decoder.cpu runs it inside its own scratch buffer)."""

    def __init__(self, mlp: MLPCPU) -> None:
        self.mlp = mlp
        self.hidden, self.inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.biases = [m.bias for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        self.size = 2 * aligned(self.inter) + aligned(self.hidden)  # floats: gate, up, down
        self.act_kind = act_kind(mlp.act_fn)

    def run(self, scratch: torch.Tensor, start: int, x: int) -> int:
        """The MLP of the row at address x, computed in scratch[start : start + size]; returns the
        output's offset in scratch."""
        kernels, mlp, inter, threads = qblocks._qkernels, self.mlp, self.inter, torch.get_num_threads()
        g_off, u_off, d_off = start, start + aligned(inter), start + 2 * aligned(inter)
        base = scratch.data_ptr()
        gate, up, down = base + 4 * g_off, base + 4 * u_off, base + 4 * d_off
        kernels.matmul_many(
            self.hidden, x, 1, threads, direct_specs([mlp.gate_proj, mlp.up_proj], [gate, up])
        )
        add_biases(self.biases[:2], [gate, up])
        if self.act_kind is not None and fused.C_ACTIVATION:  # in place in gate (float rounding apart)
            kernels.act_mul(gate, up, inter, self.act_kind)
            kernels.matmul_many(inter, gate, 1, threads, direct_specs([mlp.down_proj], [down]))
        else:  # the module's torch operations (`hidden` stays alive for the call)
            hidden = mlp.act_fn(scratch[g_off : g_off + inter]).mul_(scratch[u_off : u_off + inter])
            kernels.matmul_many(inter, hidden.data_ptr(), 1, threads, direct_specs([mlp.down_proj], [down]))
        add_biases(self.biases[2:], [down])
        return d_off
