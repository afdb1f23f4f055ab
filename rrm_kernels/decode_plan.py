"""The launch plan of one decode step's attention: split-K sizes and the shared-prefix (cascade)
work list, built once per step and read by every layer.

What a plan holds (all layer-independent):
  - split-K of the per-row pass (plain decode, or the cascade's per-row suffix): the grid's split
    count and, on the device, the split length and each row's first key (its suffix start);
  - the cascade's work items: (group, first member, member count, level) with the members of each
    group listed in one array, the groups' block tables and lengths, and per row how many levels
    cover it; one prefix-pass program per (item, kv head, split) reads its group's prefix once for
    all (member, head) rows of the item;
  - the fp32 partial outputs (out, lse) the passes write and the merge reads, reused by every layer.

The host builds it from Python lists (the runner knows every group without asking the device) and
copies it to the device in one transfer: nothing is argsorted, counted or allocated per layer.

CUDA graphs: a graph replays fixed grids over fixed buffers, so StaticDecodePlan keeps the same
layout in buffers of fixed capacity; each step writes its values there (split lengths, items, row
levels, groups) and the captured kernels read them from device memory. Grid sizes come from the
capacity (the padded batch, the model's context); programs past the step's real split count or
item count find an empty range and write an empty part (lse = -inf), so no shape depends on the step.

Partial layout: parts [level_slots * prefix_splits + splits, rows, Hq, D]; part l * prefix_splits + s
is split s of the row's level-l prefix, the rest are the per-row pass's splits. The merge takes a
level part of row r only if l < row_levels[r]: parts are reused, and a level a row lacks is never
written for it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import triton

from .paged_tile import TileConfig, check_tile

# A split covers at least this many tokens: below it the merge costs more than the parallelism gains.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 16
# Aim for about two programs per SM (H100: 132 SMs) before splitting further along the context.
TARGET_PROGRAMS = 264
# Bound on level_slots x prefix_splits x rows of prefix partials (memory, and the merge's reads).
PREFIX_PART_ROWS = 2048
# Levels of a prefix tree the engine builds (system prompt, query, comparison); deeper nodes are
# read by the per-row pass as part of each row's suffix.
MAX_LEVELS = 3


def choose_num_splits(max_seq_len: int, num_seqs: int, num_kv_heads: int) -> int:
    """Enough programs to fill the GPU, but never a split shorter than MIN_SPLIT_TOKENS."""
    by_len = max(1, -(-max_seq_len // MIN_SPLIT_TOKENS))
    by_occupancy = max(1, -(-TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads)))
    return max(1, min(by_len, by_occupancy, MAX_SPLITS))


def split_len_for(max_seq_len: int, num_splits: int, block_n: int) -> int:
    per = -(-max(max_seq_len, 1) // num_splits)
    return -(-per // block_n) * block_n  # whole tiles, so only the last tile of a split is masked


def decode_tile(page: int) -> TileConfig:
    """Decode rows are the g query heads of one kv head (padded to G_PAD), so only BLOCK_N and
    the warps are free: tiles of >= 16 keys (tl.dot) that may cover several small pages. ptxas
    reports no spills for this at sm_90 for head_dim 64 and 128 (tests/test_csrc_build.py)."""
    return TileConfig(block_m=16, block_n=max(16, min(64, page)), num_warps=4)


def prefix_tile(group: int, head_dim: int, page: int, rows: int = 0) -> TileConfig:
    """Rows are (member, head) pairs: 8 votes of g heads fill one block_m tile. 8 warps above
    head_dim 64: at 4, ptxas spills 184 B at the 7B shape (g=7, d=128, block_m 64) on sm_90,
    at 8 none (tests/test_csrc_build.py checks the default shapes). rows: the largest group's
    (member, head) rows; above 64, 128-row tiles halve the programs that re-read its prefix
    (16-key tiles: at d=128 the only 128-row shape ptxas compiles without spills, 255 registers)."""
    if rows > 64:
        return TileConfig(block_m=128, block_n=16, num_warps=8)
    return TileConfig(block_m=max(16, min(64, triton.next_power_of_2(group * 8))), block_n=max(16, min(64, page)),
                      num_warps=8 if head_dim > 64 else 4)


@dataclass
class HostLevel:
    """One level of shared prefixes as host lists (the facts of attention.PrefixLevel)."""
    block_tables: list[list[int]]  # per group, the blocks of its segment
    lens: list[int]  # per group, tokens in its segment (whole blocks)
    seq_group: list[int]  # per row, its group at this level or -1


def host_level(level: Any) -> HostLevel:
    """A HostLevel from a PrefixLevel-like object (its `host` copy when it carries one) or a
    (block_tables, lens, seq_group) tuple of tensors; tensors on a GPU cost a device sync here."""
    if isinstance(level, HostLevel):
        return level
    host = getattr(level, "host", None)
    if host is not None:
        return host
    if isinstance(level, (tuple, list)):
        if len(level) != 3:
            raise ValueError(f"a prefix level tuple must be (block_tables, lens, seq_group), got {len(level)} items")
        tables, lens, seq_group = level
    else:
        tables, lens, seq_group = level.block_tables, level.lens, level.seq_group
    return HostLevel(tables.tolist(), lens.tolist(), seq_group.tolist())


@dataclass
class PlanCapacity:
    """Grid sizes and buffer capacities of a plan: exact for one eager step, upper bounds for a
    CUDA graph (StaticDecodePlan.capacity)."""
    rows: int
    splits: int  # per-row pass splits (grid)
    level_slots: int  # prefix levels with partial slots (0: no cascade)
    prefix_splits: int  # prefix pass splits (grid)
    items: int  # prefix pass work items (grid)
    members: int
    groups: int
    width: int  # blocks per group table row

    @property
    def num_parts(self) -> int:
        return self.level_slots * self.prefix_splits + self.splits

    @property
    def meta_size(self) -> int:
        """int32 entries of the packed metadata, group tables apart (DecodePlan's layout)."""
        return 2 + 2 * self.rows + 4 * self.items + self.members + self.groups


class DecodePlan:
    """Device-side plan of one step (or, for a CUDA graph, views of static buffers) plus the grid
    sizes the launches use. Build it with plan_decode; the kernels only read it."""

    def __init__(self, cap: PlanCapacity, meta: torch.Tensor, group_tables: torch.Tensor, hq: int, d: int,
                 group: int, suffix_tile: TileConfig, tile: TileConfig,
                 parts: tuple[torch.Tensor, torch.Tensor] | None = None, direct: bool = False):
        self.cap, self.hq, self.d, self.group = cap, hq, d, group
        self.suffix_tile, self.tile = suffix_tile, tile
        self.direct = direct  # one split, no levels: the per-row pass writes the output itself
        o = 0

        def take(n: int) -> torch.Tensor:
            nonlocal o
            o += n
            return meta[o - n:o]

        self.split_len = take(2)  # [per-row pass, prefix pass]
        self.kv_start = take(cap.rows)  # first key of each row's per-row pass (its suffix)
        self.row_levels = take(cap.rows)  # levels covering each row
        self.items = take(4 * cap.items).view(max(cap.items, 0), 4)  # (group, first member, count, level)
        self.members = take(cap.members)
        self.group_lens = take(cap.groups)
        self.group_tables = group_tables  # [groups, width]
        self._parts = parts

    @property
    def has_levels(self) -> bool:
        return self.cap.level_slots > 0

    @property
    def prefix_parts(self) -> int:
        return self.cap.level_slots * self.cap.prefix_splits

    def parts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [P, rows, Hq, D], lse [P, rows, Hq]) fp32, allocated on first use and reused by
        every layer: each layer writes every part the merge reads before the merge runs."""
        if self._parts is None:
            p, r = self.cap.num_parts, self.cap.rows
            self._parts = (torch.empty((p, r, self.hq, self.d), dtype=torch.float32, device=device),
                           torch.empty((p, r, self.hq), dtype=torch.float32, device=device))
        return self._parts


@dataclass
class _HostPlan:
    split_len: tuple[int, int]
    kv_start: list[int]
    row_levels: list[int]
    items: list[tuple[int, int, int, int]]
    members: list[int]
    group_lens: list[int]
    group_tables: list[list[int]]
    suffix_bound: int
    max_group_len: int


def _host_plan(rows: int, levels: Sequence[HostLevel], seq_lens: Sequence[int] | None, max_seq_len: int,
               members_per_item: int) -> _HostPlan:
    """Everything but the split counts, from host lists."""
    depth, start = [0] * rows, [0] * rows
    items: list[tuple[int, int, int, int]] = []
    members: list[int] = []
    group_lens: list[int] = []
    tables: list[list[int]] = []
    for li, lv in enumerate(levels):
        if len(lv.seq_group) != rows:
            raise ValueError(f"levels[{li}].seq_group must have {rows} entries, got {len(lv.seq_group)}")
        if len(lv.block_tables) != len(lv.lens):
            raise ValueError(f"levels[{li}]: {len(lv.block_tables)} group tables for {len(lv.lens)} lens")
        by_group: list[list[int]] = [[] for _ in lv.lens]
        for r, g in enumerate(lv.seq_group):
            if g < 0:
                continue
            if g >= len(lv.lens):
                raise ValueError(f"levels[{li}].seq_group must be in [-1, {len(lv.lens)}), got {g} for row {r}")
            if depth[r] != li:
                raise ValueError(f"levels must nest: row {r} has a group at level {li} but none at level {depth[r]}")
            by_group[g].append(r)
        for g, mem in enumerate(by_group):
            ln = lv.lens[g]
            if mem:
                gid = len(group_lens)
                group_lens.append(ln)
                tables.append(list(lv.block_tables[g]))
                for c in range(0, len(mem), members_per_item):
                    items.append((gid, len(members) + c, min(members_per_item, len(mem) - c), li))
                members.extend(mem)
                for r in mem:
                    depth[r] += 1
                    start[r] += ln
    if seq_lens is not None:
        suffix_bound = max((n - s for n, s in zip(seq_lens, start)), default=1)
    else:
        suffix_bound = max_seq_len  # no host lengths: the caller's bound
    return _HostPlan((0, 0), start, depth, items, members, group_lens, tables, max(1, suffix_bound),
                     max(group_lens, default=0))


def _check_level_lens(levels: Sequence[HostLevel], page: int) -> None:
    for i, lv in enumerate(levels):
        for g, ln in enumerate(lv.lens):
            if ln < 0 or ln % page or ln > len(lv.block_tables[g]) * page:
                raise ValueError(f"levels[{i}].lens must be whole blocks of {page} within the group's block table, "
                                 f"got {lv.lens}")


def _pack(host: _HostPlan, cap: PlanCapacity, with_tables: bool) -> torch.Tensor:
    """The packed int32 metadata in DecodePlan's layout (zeros past what the step uses, so unused
    items of a capacity have no members), followed by the [groups, width] tables if asked. One
    Python list, one tensor: this runs once per step on the host."""
    flat: list[int] = []

    def put(values, n: int) -> None:
        flat.extend(values)
        flat.extend([0] * (n - len(values)))

    put(list(host.split_len), 2)
    put(host.kv_start, cap.rows)
    put(host.row_levels, cap.rows)
    put([x for it in host.items for x in it], 4 * cap.items)
    put(host.members, cap.members)
    put(host.group_lens, cap.groups)
    if with_tables:
        put(_flat_tables(host.group_tables, cap.width), cap.groups * cap.width)
    return torch.tensor(flat, dtype=torch.int32)


def _flat_tables(tables: list[list[int]], width: int) -> list[int]:
    flat: list[int] = []
    for blocks in tables:
        flat.extend(blocks)
        flat.extend([0] * (width - len(blocks)))
    return flat


def plan_decode(rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page: int, device: torch.device,
                *, max_seq_len: int, seq_lens: Sequence[int] | None = None, levels: Sequence[Any] = (),
                num_splits: int | None = None, tile: TileConfig | None = None,
                suffix_tile: TileConfig | None = None) -> DecodePlan:
    """The plan of one step over `rows` sequences. max_seq_len: a host bound on their lengths;
    seq_lens (host, optional) tightens the per-row pass's split size when levels cover part of
    each row. levels: PrefixLevel-likes or HostLevels (host lists cost no device sync).
    num_splits forces the per-row pass's split count (plain decode only)."""
    group = num_q_heads // num_kv_heads
    hl = [host_level(lv) for lv in levels]
    _check_level_lens(hl, page)
    if tile is None:
        widest = max((n for lv in hl for g, n in Counter(lv.seq_group).items() if g >= 0), default=0)
        tile = prefix_tile(group, head_dim, page, rows=widest * group)
    tile = check_tile(tile)
    suffix_tile = suffix_tile or decode_tile(page)
    if hl and tile.block_m < group:
        raise ValueError(f"the prefix tile's block_m ({tile.block_m}) must hold one member's {group} query heads")
    host = _host_plan(rows, hl, seq_lens, max_seq_len, max(1, tile.block_m // group))
    splits = num_splits if num_splits is not None else choose_num_splits(host.suffix_bound, rows, num_kv_heads)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    slots = len(hl) if host.items else 0
    prefix_splits = 0
    if slots:
        prefix_splits = min(choose_num_splits(host.max_group_len, len(host.items), num_kv_heads),
                            max(1, PREFIX_PART_ROWS // (slots * rows)))
    host.split_len = (split_len_for(host.suffix_bound, splits, suffix_tile.block_n),
                      split_len_for(host.max_group_len, max(prefix_splits, 1), tile.block_n))
    cap = PlanCapacity(rows, splits, slots, prefix_splits, len(host.items) if slots else 0, len(host.members),
                       len(host.group_lens), max((len(t) for t in host.group_tables), default=0))
    meta = _pack(host, cap, with_tables=True).to(device, non_blocking=True)  # the step's one copy
    tables = meta[cap.meta_size:].view(cap.groups, cap.width)
    return DecodePlan(cap, meta[:cap.meta_size], tables, num_q_heads, head_dim, group, suffix_tile, tile,
                      direct=splits == 1 and not slots)


class StaticDecodePlan:
    """Fixed-capacity plan buffers shared by the CUDA graphs of every padded batch size: `view(p)`
    is the plan a graph of p rows is captured with, `fill(p, ...)` writes a step's values into the
    same buffers before the replay. Capacities: max_levels levels, groups of >= 2 members, contexts
    up to max_seq_len (the model's)."""

    def __init__(self, max_rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page: int,
                 max_seq_len: int, device: torch.device, max_levels: int = MAX_LEVELS, cascade: bool = True):
        self.hq, self.hkv, self.d, self.page = num_q_heads, num_kv_heads, head_dim, page
        self.group = num_q_heads // num_kv_heads
        self.max_seq_len, self.max_levels = max_seq_len, max_levels if cascade else 0
        self.tile, self.suffix_tile = prefix_tile(self.group, head_dim, page), decode_tile(page)
        self.per_item = max(1, self.tile.block_m // self.group)
        self.caps = {}
        self._full = self.capacity(max_rows)
        self.meta = torch.zeros(self._full.meta_size, dtype=torch.int32, device=device)
        self.group_tables = torch.zeros(self._full.groups, self._full.width, dtype=torch.int32, device=device)
        parts = max(self.capacity(p).num_parts * p for p in _pow2_upto(max_rows))
        self.out_parts = torch.empty(parts * num_q_heads * head_dim, dtype=torch.float32, device=device)
        self.lse_parts = torch.empty(parts * num_q_heads, dtype=torch.float32, device=device)
        self._views: dict[int, DecodePlan] = {}

    def capacity(self, p: int) -> PlanCapacity:
        """Grid sizes of the graph for p padded rows (buffer capacities at p = max_rows)."""
        if p not in self.caps:
            levels = self.max_levels
            groups = levels * (p // 2)  # a group has at least two members
            items = levels * (p // 2 + -(-p // self.per_item)) if levels else 0
            prefix_splits = min(MAX_SPLITS, max(1, PREFIX_PART_ROWS // (levels * p))) if levels else 0
            self.caps[p] = PlanCapacity(p, choose_num_splits(self.max_seq_len, p, self.hkv), levels, prefix_splits,
                                        items, levels * p, groups, -(-self.max_seq_len // self.page))
        return self.caps[p]

    def view(self, p: int) -> DecodePlan:
        """The plan for p rows: its grid sizes, the shared buffers' leading entries as its views."""
        if p not in self._views:
            cap = self.capacity(p)
            n = cap.num_parts * p
            parts = (self.out_parts[:n * self.hq * self.d].view(cap.num_parts, p, self.hq, self.d),
                     self.lse_parts[:n * self.hq].view(cap.num_parts, p, self.hq))
            plan = DecodePlan(self._full, self.meta, self.group_tables, self.hq, self.d, self.group,
                              self.suffix_tile, self.tile, parts, direct=cap.splits == 1 and not cap.level_slots)
            # the graph launches over p's capacity, not the buffers' (rows past p are never read)
            plan.cap = cap
            plan.kv_start, plan.row_levels = plan.kv_start[:p], plan.row_levels[:p]
            self._views[p] = plan
        return self._views[p]

    def fill(self, p: int, seq_lens: Sequence[int], levels: Sequence[Any] = ()) -> None:
        """Write one step's plan (real rows first; rows past them are padding without levels)."""
        cap = self.capacity(p)
        hl = [host_level(lv) for lv in levels][:cap.level_slots]
        rows = len(seq_lens)
        hl = [HostLevel(lv.block_tables, lv.lens, list(lv.seq_group) + [-1] * (p - rows)) for lv in hl]
        host = _host_plan(p, hl, list(seq_lens) + [1] * (p - rows), max(seq_lens), self.per_item)
        if len(host.items) > cap.items or len(host.group_lens) > cap.groups:
            raise ValueError(f"plan of {len(host.items)} items / {len(host.group_lens)} groups exceeds the graph's "
                             f"capacity ({cap.items} / {cap.groups}): groups need >= 2 members")
        splits = min(choose_num_splits(host.suffix_bound, p, self.hkv), cap.splits)
        prefix_splits = 0
        if host.items:
            prefix_splits = min(choose_num_splits(host.max_group_len, len(host.items), self.hkv),
                                cap.prefix_splits)
        host.split_len = (split_len_for(host.suffix_bound, splits, self.suffix_tile.block_n),
                          split_len_for(host.max_group_len, max(prefix_splits, 1), self.tile.block_n))
        self.meta.copy_(_pack(host, self._full, with_tables=False), non_blocking=True)
        if host.group_tables:  # only the rows and columns this step uses: the rest is never read
            w = max(len(t) for t in host.group_tables)
            tables = torch.tensor(_flat_tables(host.group_tables, w), dtype=torch.int32).view(-1, w)
            self.group_tables[:tables.shape[0], :w].copy_(tables, non_blocking=True)


def _pow2_upto(n: int) -> list[int]:
    out = [1]
    while out[-1] < n:
        out.append(out[-1] * 2)
    return out
