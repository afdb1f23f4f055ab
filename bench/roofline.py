"""A roofline for decode steps, with the ceilings measured on this device in the same run.

Ceilings: copy bandwidth (a large tensor copy: read + write bytes over time) and matmul rate
(a large square mm in the run's dtype; with quantised CPU weights, the faster of that and the
int8 linear at decode rows, which is what the engine multiplies with). A decode step must at least read every weight once
(the embedding excepted: only B rows of it; a tied head reads it in full as the head) and the
KV it attends to. "Must move" counts the unique KV: the k votes of a comparison share their
prompt, so its KV counts once per comparison (what the shared-prefix kernel reads); the CPU
torch backend reads it once per vote, so on CPU the achieved fraction is an underestimate of
the work done. Context lengths are the mean prompt plus half the generation (every vote has the
same fixed length), an approximation stated in the output.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .baselines import Shape, sync


def _best_time(fn, device: torch.device, repeat: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(device: torch.device, mib: int | None = None, repeat: int = 5) -> float:
    """Bytes per second of dst.copy_(src) on a tensor far larger than the caches."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_time(lambda: dst.copy_(src), device, repeat)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, repeat: int = 5) -> float:
    """FLOP/s of an n x n x n mm in dtype."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _best_time(lambda: torch.mm(a, b), device, repeat)


def quant_linear_rate(fmt: str, rows: int = 32, n: int = 4096, k: int = 576, repeat: int = 100) -> float:
    """FLOP/s of the quantised CPU linear (q8_0 / q4_1 blocks, int8 dot products) at decode rows on a
    cache-resident weight (75M multiply-adds: enough for the op to use every thread); 0.0 when the op
    cannot be built here."""
    from rrm_kernels import quant_linear_cpu as ql
    if not ql.available():
        return 0.0
    x, w = torch.randn(rows, k), ql.PackedWeight.from_dense(torch.randn(n, k), fmt)
    return 2 * rows * n * k / _best_time(lambda: ql.quant_linear(x, w), torch.device("cpu"), repeat)


def linear_params(s: Shape) -> int:
    """Parameters a decode step multiplies by (every projection, the norms, the LM head)."""
    qkv = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + (s.heads + 2 * s.kv_heads) * s.head_dim * s.qkv_bias
    per_layer = qkv + s.heads * s.head_dim * s.hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * per_layer + s.hidden + s.vocab * s.hidden


@dataclass
class Roofline:
    decode_steps: int
    seconds: float  # in those steps
    mean_batch: float  # decode rows per step
    bytes_moved: float  # weights + unique KV, summed over the steps
    flops: float
    bandwidth: float  # measured ceiling, B/s
    matmul: float  # measured ceiling, FLOP/s

    @property
    def achieved_bandwidth(self) -> float:
        return self.bytes_moved / self.seconds

    @property
    def achieved_flops(self) -> float:
        return self.flops / self.seconds

    @property
    def fraction(self) -> float:
        """Time the binding ceiling allows over the time taken (1.0 = at the roofline)."""
        return max(self.bytes_moved / self.bandwidth, self.flops / self.matmul) / self.seconds

    @property
    def bound(self) -> str:
        return "memory" if self.bytes_moved / self.bandwidth >= self.flops / self.matmul else "compute"

    def line(self) -> str:
        return (f"roofline (decode steps of c: {self.decode_steps}, mean batch {self.mean_batch:.1f}): "
                f"{self.bytes_moved / self.decode_steps / 1e6:.1f} MB/step must move, "
                f"{self.achieved_bandwidth / 1e9:.2f} of {self.bandwidth / 1e9:.2f} GB/s copy bandwidth; "
                f"{self.flops / self.decode_steps / 1e9:.2f} GFLOP/step, "
                f"{self.achieved_flops / 1e9:.1f} of {self.matmul / 1e9:.1f} GFLOP/s mm rate; "
                f"{self.bound}-bound, {100 * self.fraction:.0f}% of roofline")

    def as_dict(self) -> dict:
        return asdict(self) | {"achieved_bandwidth": self.achieved_bandwidth, "achieved_flops": self.achieved_flops,
                               "fraction": self.fraction, "bound": self.bound}


def decode_roofline(step_log: list[tuple[float, dict]], shape: Shape, elem: int, mean_prompt: float,
                    gen_len: int, votes: int, bandwidth: float, matmul: float,
                    weight_bytes: float | None = None) -> Roofline | None:
    """step_log: (seconds, metric deltas) per engine step; only pure decode steps count.
    weight_bytes: what the served linears occupy when not params x elem (quantised weights)."""
    weights = linear_params(shape) * elem if weight_bytes is None else weight_bytes
    kv_tok = shape.kv_bytes_per_token(elem)
    steps = [(t, d["decode_tokens_computed"]) for t, d in step_log
             if d["prefill_tokens_computed"] == 0 and d["decode_tokens_computed"] > 0]
    if not steps:
        return None
    moved = flops = secs = rows = 0.0
    per_row_params = linear_params(shape)
    for t, b in steps:
        groups = max(1.0, b / votes)
        moved += weights + (groups * mean_prompt + b * gen_len / 2) * kv_tok
        flops += 2 * per_row_params * b + 4 * shape.layers * shape.heads * shape.head_dim * b * (mean_prompt + gen_len / 2)
        secs += t
        rows += b
    return Roofline(len(steps), secs, rows / len(steps), moved, flops, bandwidth, matmul)
