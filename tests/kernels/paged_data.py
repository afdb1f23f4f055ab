"""Random paged-KV test data shared by the attention kernel tests."""
from __future__ import annotations

import torch


def make_cache(num_blocks: int, page: int, hkv: int, d: int, dtype: torch.dtype,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    return k, v


def scattered_tables(lens: list[int], page: int, gen: torch.Generator, extra_cols: int = 1,
                     first_block: int = 0) -> tuple[torch.Tensor, int]:
    """Block tables with each sequence's blocks at random, distinct places (padded with 0 and
    extra_cols unused columns); returns (tables, blocks used incl. first_block)."""
    need = [-(-n // page) for n in lens]
    total = sum(need)
    perm = (torch.randperm(total, generator=gen) + first_block).tolist()
    width = max(need) + extra_cols
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [0] * (width - n))
        i += n
    return torch.tensor(rows, dtype=torch.int32), first_block + total
