"""`KernelOptions`: every setting of the fused head kernels, as one frozen value.

The kernels take the options as an argument (`linear_logprobs(..., options=...)`,
`sequence_logprobs(..., options=...)`, and each backend's forward / backward), so two
settings can be used side by side in one process (a benchmark comparing block budgets,
a test forcing a chunking axis) and nothing is read from module state. The trainer
builds its options from the config's ``kernels:`` group (`caldpo.train.config.KernelsConfig`)
and `caldpo.train.model.LogProbModel` passes them on every call.

Through the `torch.library` custom ops the options travel as a short string
(`encode` / `decode`): custom ops take only tensors and plain scalars.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

# Bytes of fp32 logits per block when `block_bytes` is None. CPU: large enough that a
# Pythia-sized vocabulary is a handful of blocks (one GEMM and one fused row pass each, so a
# few parallel regions per step, which is what keeps the step fast when other processes share
# the cores; benchmarks/results/cpu_20261130_*), small against the [N, V] logits (16 MiB is
# 1/12 of them at 1024 tokens and V = 50304). CUDA: [M, Cv] blocks of 128 MiB (Cv = 4096
# columns at 8192 tokens), so each GEMM hides the launches of the passes between them.
CPU_BLOCK_BYTES = 16 << 20
CUDA_BLOCK_BYTES = 128 << 20

BACKEND_CHOICES = ("auto", "reference", "torch", "triton", "native")
FORMS = ("fused", "gemm")
AXES = ("auto", "vocab", "tokens")
GEMM_RULES = ("auto", "fp32", "input")


@dataclass(frozen=True)
class KernelOptions:
    """Settings of the fused log-prob kernels (hashable, immutable; `replace` makes variants).

    backend: "auto" (Triton on CUDA; on CPU the native C++ extension when it builds, else the
        chunked torch path), "native", "torch", "triton" or "reference" (materialised logits).
    block_bytes: bytes of fp32 logits per block (torch, native, and the GEMM forms of triton);
        None: CPU_BLOCK_BYTES on CPU, CUDA_BLOCK_BYTES on CUDA. Larger blocks mean fewer GEMMs
        and parallel regions at the price of that many bytes of peak memory.
    min_block: the narrowest block edge in rows or columns (GEMM efficiency); a block budget
        below `min_block` rows or columns is rounded up to it.
    axis: torch backend: chunk over the "vocab" (blocks [M, Cv]) or the "tokens" ([C, V]);
        "auto" picks vocab when tokens <= vocab.
    gemm: torch backend, 16-bit inputs: "auto" (GEMMs in the input dtype on CUDA, fp32 on
        CPU), "fp32" or "input" (one rule everywhere; tests run the CUDA rule on CPU).
    forward_form / backward_form: triton backend, 16-bit inputs: "fused" (one Triton kernel)
        or "gemm" (cuBLAS GEMMs into fp32 blocks + a Triton pass); fp32 inputs always take the
        fused kernels. Measured defaults: caldpo/kernels/triton_logprobs.py.

    Raises ValueError naming the field for a value outside these choices.
    """

    backend: str = "auto"
    block_bytes: int | None = None
    min_block: int = 256
    axis: str = "auto"
    gemm: str = "auto"
    forward_form: str = "fused"
    backward_form: str = "gemm"

    def __post_init__(self):
        for name, choices in (("backend", BACKEND_CHOICES), ("axis", AXES), ("gemm", GEMM_RULES),
                              ("forward_form", FORMS), ("backward_form", FORMS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"KernelOptions.{name}={getattr(self, name)!r}: expected one of {choices}")
        if self.block_bytes is not None and (not isinstance(self.block_bytes, int) or self.block_bytes < 1):
            raise ValueError(f"KernelOptions.block_bytes={self.block_bytes!r}: expected a positive int or None")
        if not isinstance(self.min_block, int) or self.min_block < 1:
            raise ValueError(f"KernelOptions.min_block={self.min_block!r}: expected an int >= 1")

    def budget(self, cuda: bool) -> int:
        """The block budget in bytes on this device kind."""
        if self.block_bytes is not None:
            return self.block_bytes
        return CUDA_BLOCK_BYTES if cuda else CPU_BLOCK_BYTES

    def replace(self, **changes) -> KernelOptions:
        """A copy with `changes` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def encode(self) -> str:
        """The options as a string for the custom ops (`decode` inverts it)."""
        return ";".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


DEFAULT = KernelOptions()


@functools.lru_cache(maxsize=64)
def decode(text: str) -> KernelOptions:
    """`KernelOptions.encode`'s inverse."""
    kw: dict = {}
    for item in text.split(";"):
        key, value = item.split("=", 1)
        if key in ("block_bytes", "min_block"):
            kw[key] = None if value == "None" else int(value)
        else:
            kw[key] = value
    return KernelOptions(**kw)


def get(options: KernelOptions | None) -> KernelOptions:
    """`options`, or the defaults when None; raises TypeError for anything else."""
    if options is None:
        return DEFAULT
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a caldpo.kernels.KernelOptions, got {type(options).__name__}")
    return options


def from_config(section) -> KernelOptions:
    """KernelOptions from the config's ``kernels`` group (a mapping or attribute object with
    some of the fields; the rest keep their defaults). Raises ValueError naming a bad field."""
    names = [f.name for f in dataclasses.fields(KernelOptions)]
    get_value = section.get if hasattr(section, "get") else (lambda k, d=None: getattr(section, k, d))
    kw = {k: get_value(k, None) for k in names}
    return KernelOptions(**{k: v for k, v in kw.items() if v is not None or k == "block_bytes"})
