"""The flash backend: tensor-core forward and backward, fp16 and bf16.

Forward: kernels_cu/flash_fwd_hopper.cu (wgmma, a persistent grid) on
Hopper; kernels_cu/flash_fwd.cu (mma.sync) on sm80+ elsewhere.
Backward: kernels_cu/flash_bwd_hopper.cu (wgmma) on Hopper, the
deterministic mode included; kernels_cu/flash_bwd.cu (mma.sync)
elsewhere; head dims 32 to 128.

The fast path: causal in both alignments, sliding windows, GQA/MQA, Lq != Lk,
LSE, head dims 32 to 256 (and head_dim_v != head_dim for the forward on
Hopper at HEAD_DIMS_V_DIFFERING); no bias, no dropout.
"""
from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass, replace

import torch

from ..cuda import loader, structs, tensor_map
from . import capabilities, tiled

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
CAPABILITIES = capabilities.Capabilities(
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    max_head_dim=256,
    head_dims=HEAD_DIMS,
    min_compute_capability=(8, 0),
    window=True,
    head_dim_v_differs=True,  # some pairs, on Hopper: reasons()
    backward=True,
)
log = logging.getLogger("varattn")
STORAGE_TYPES = {torch.float16: "half_t", torch.bfloat16: "bf16_t"}
_INT32 = struct.Struct("<i")
_NO_MAP = bytes(tensor_map.SIZE)  # the output map's argument where there is none (out_by_tma 0)


@dataclass(frozen=True)
class Kernel:
    """One forward instance and how to launch it."""
    family: str              # kernels_cu/<family>.cu, and the kernel's name there
    head_dim: int
    head_dim_v: int
    block_m: int
    block_n: int
    threads: int
    shared_mem: int          # dynamic shared memory, bytes
    ctas_per_sm: int = 0     # persistent: a grid of this many CTAs per SM loops over the tiles; 0: a CTA per tile
    packed: bool = False     # Hopper: packed GQA, a tile's rows span the query heads of one key/value head
    staged_out: bool = False  # Hopper: the output goes through shared memory and the copy engine where it can

    def instance(self, dtype) -> str:
        if self.family == "flash_fwd":
            return f"flash_fwd<{STORAGE_TYPES[dtype]}, {self.head_dim}, {self.block_m}, {self.block_n}>"
        return (f"flash_fwd_hopper<{STORAGE_TYPES[dtype]}, {self.head_dim}, {self.head_dim_v}, {self.block_n}, "
                f"{self.block_m // 64}, {str(self.packed).lower()}, {str(self.staged_out).lower()}>")

    @property
    def plan(self) -> str:
        """Its plan kernel's instance (kernels_cu/tile_plan.cuh)."""
        return f"flash_plan<{self.block_m}, PACKED_QUERY_ROWS>" if self.packed else f"flash_plan<{self.block_m}>"


def _mma_sync(head_dim, block_m, block_n):
    # Q + K + V tiles, rows padded by 16 bytes (kernels_cu/flash_fwd.cu)
    return Kernel("flash_fwd", head_dim, head_dim, block_m, block_n, 128, (block_m + 2 * block_n) * (head_dim + 8) * 2)


# Shared memory of an sm_90 SM and the most one CTA may have; what the driver
# keeps of it per CTA; the Hopper forward's static shared memory (its 12 mbarriers).
SM90_SHARED, SM90_SHARED_PER_CTA, SM90_RESERVED_PER_CTA, HOPPER_STATIC_SHARED = 228 * 1024, 227 * 1024, 1024, 96


def _wgmma(head_dim, block_n, warpgroups=2, head_dim_v=None):
    # Q + 2 K + 3 V tiles of whole 64-column swizzle atoms, plus 1 KB to align
    # them; consumer warpgroups and one producer warpgroup, 2 / warpgroups
    # CTAs per SM; and a 64-row staging tile of the output per consumer
    # warpgroup where that still fits those CTAs on an SM
    # (kernels_cu/flash_fwd_hopper.cu: HopperShared::BYTES)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    block_m, width, width_v = 64 * warpgroups, -(-head_dim // 64) * 64, -(-head_dim_v // 64) * 64
    ctas_per_sm = 2 // warpgroups
    shared_mem = ((block_m + 2 * block_n) * width + 3 * block_n * width_v) * 2 + 1024
    staged = shared_mem + warpgroups * 64 * width_v * 2
    staged_out = (staged + HOPPER_STATIC_SHARED <= SM90_SHARED_PER_CTA
                  and ctas_per_sm * (staged + HOPPER_STATIC_SHARED + SM90_RESERVED_PER_CTA) <= SM90_SHARED)
    return Kernel("flash_fwd_hopper", head_dim, head_dim_v, block_m, block_n, 128 * (warpgroups + 1),
                  staged if staged_out else shared_mem, ctas_per_sm=ctas_per_sm, staged_out=staged_out)


# The largest tiles that keep S and O in registers without spilling; the
# tables at the top of the two .cu files say why.
MMA_SYNC = {32: _mma_sync(32, 128, 64), 64: _mma_sync(64, 128, 64), 96: _mma_sync(96, 128, 32),
            128: _mma_sync(128, 128, 32), 192: _mma_sync(192, 64, 64), 256: _mma_sync(256, 64, 64)}
# Hopper, by (head_dim, head_dim_v): kernels_cu/flash_fwd_hopper.cu says why these tiles.
WGMMA = {(32, 32): _wgmma(32, 128, 1), (64, 64): _wgmma(64, 128, 1), (96, 96): _wgmma(96, 128),
         (128, 128): _wgmma(128, 128), (192, 192): _wgmma(192, 64), (256, 256): _wgmma(256, 64),
         (192, 128): _wgmma(192, 64, head_dim_v=128)}
HEAD_DIMS_V_DIFFERING = tuple(dims for dims in WGMMA if dims[0] != dims[1])
# Hopper, where every query sequence fits in SHORT_QUERIES rows (decode,
# many short sequences): one consumer warpgroup of 64 rows, so that two CTAs
# share an SM and half of a 128-row tile is not idle.
SHORT_QUERIES = 64
WGMMA_SHORT = {(128, 128): _wgmma(128, 64, 1)}


def kernel_for(head_dim: int, head_dim_v: int, arch: str, max_seqlen_q: int | None = None) -> Kernel:
    """wgmma on Hopper (sm_90a), mma.sync elsewhere (head_dim_v == head_dim
    only); max_seqlen_q: the longest query sequence, which picks the
    short-query tiles at or below SHORT_QUERIES."""
    if arch == "sm_90a":
        if max_seqlen_q is not None and max_seqlen_q <= SHORT_QUERIES and (head_dim, head_dim_v) in WGMMA_SHORT:
            return WGMMA_SHORT[head_dim, head_dim_v]
        if (head_dim, head_dim_v) in WGMMA:
            return WGMMA[head_dim, head_dim_v]
    return MMA_SYNC[head_dim]


def out_map(kernel: Kernel, out: torch.Tensor, group: int) -> bytes | None:
    """The tensor map through which `kernel` (a Hopper instance with staged
    output) stores `out`: boxes of one consumer warpgroup's 64 rows (packed:
    64 / group queries x `group` heads). None where it cannot: a group that
    does not divide 64, an `out` that is not packed rows (the strides
    write_rows assumes, structs.attn_params) or that the copy engine cannot
    walk; the kernel then writes every row from registers."""
    rows, heads = (64 // group, group) if kernel.packed else (64, 1)
    if not kernel.staged_out or rows * heads != 64 or not out.is_contiguous():
        return None
    try:
        return tensor_map.rows(out, rows, heads)
    except tensor_map.TensorMapError as error:
        log.info("varattn: %s; the output is written from registers", error)
        return None


def packs_gqa(kernel: Kernel, group: int) -> bool:
    """Whether a call whose query heads come `group` to a key/value head
    runs `kernel` with packed GQA: on Hopper, where the group divides the
    tile's rows (a tile then holds whole queries)."""
    return kernel.family == "flash_fwd_hopper" and group > 1 and kernel.block_m % group == 0


# every Hopper instance: as tabled, and packed
HOPPER_KERNELS = [k for base in (*WGMMA.values(), *WGMMA_SHORT.values()) for k in (base, replace(base, packed=True))]
for _family, _kernels in (("flash_fwd", MMA_SYNC.values()), ("flash_fwd_hopper", HOPPER_KERNELS)):
    loader.register_family(_family, sorted({k.instance(t) for k in _kernels for t in STORAGE_TYPES}
                                           | {k.plan for k in _kernels}))


def reasons(params) -> list[str]:
    found = capabilities.reasons(CAPABILITIES, params)
    if params.block_table is not None:  # (said above; the rest reads k and v as packed rows)
        return found
    differing = params.head_dim_v != params.head_dim
    if params.requires_grad:
        if params.head_dim not in BACKWARD_HEAD_DIMS:
            found.append(f"the backward takes head_dim in {BACKWARD_HEAD_DIMS}, got {params.head_dim}")
        if differing:
            found.append(f"the backward needs head_dim_v == head_dim, got {params.head_dim_v} and {params.head_dim}")
    if differing and (params.head_dim, params.head_dim_v) not in HEAD_DIMS_V_DIFFERING:
        found.append(f"(head_dim, head_dim_v) ({params.head_dim}, {params.head_dim_v}) differ: the forward takes "
                     f"{', '.join(map(str, HEAD_DIMS_V_DIFFERING))} only")
    if params.device.type != "cuda":
        return found
    if differing and loader.arch_of(params.device) != "sm_90a":
        found.append("head_dim_v != head_dim runs on Hopper (sm_90a) only")
    missing = loader.cupy_missing_reason()
    if missing:
        found.append(missing)
    if params.scale <= 0:
        found.append(f"scale must be positive (the softmax folds it into its max), got {params.scale}")
    found += tiled.alignment_reasons(params)
    return found


@functools.lru_cache(maxsize=None)
def _forward_kernels(dtype: torch.dtype, head_dim: int, head_dim_v: int, device_index: int, short: bool, group: int,
                     wgmma: bool = True):
    """(Kernel, its plan kernel, its forward kernel) for the call's dtype,
    head dims, device, whether its queries are short and its query heads
    per key/value head: kernel_for's choice, packed where packs_gqa says
    so, or mma.sync when not `wgmma`."""
    device = torch.device("cuda", device_index)
    chosen = (kernel_for(head_dim, head_dim_v, loader.arch_of(device), SHORT_QUERIES if short else None) if wgmma
              else MMA_SYNC[head_dim])
    if packs_gqa(chosen, group):
        chosen = replace(chosen, packed=True)
    return (chosen, loader.kernel(chosen.family, chosen.plan, device),
            loader.kernel(chosen.family, chosen.instance(dtype), device, dynamic_shared_mem=chosen.shared_mem))


def forward(params):
    """(out, lse): out `params.new_out()`, which the kernel fills; lse None
    when neither the caller nor a backward needs it."""
    out = params.new_out()
    lse = params.new_lse() if params.return_lse or params.requires_grad else None
    q, k, v = params.q, params.k, params.v
    batch = params.cu_seqlens_q.shape[0] - 1
    if q.shape[0] == 0 or batch == 0:
        return out, lse
    head_dim, head_dim_v, index = q.shape[2], v.shape[2], q.get_device()
    short, group = params.max_seqlen_q <= SHORT_QUERIES, q.shape[1] // max(k.shape[1], 1)
    chosen, plan_kernel, fwd_kernel = _forward_kernels(q.dtype, head_dim, head_dim_v, index, short, group)
    maps = ()
    if chosen.family == "flash_fwd_hopper":
        try:
            q_map = (tensor_map.rows(q, chosen.block_m // group, group) if chosen.packed
                     else tensor_map.rows(q, chosen.block_m))
            maps = (q_map, tensor_map.rows(k, chosen.block_n),
                    tensor_map.rows(v, chosen.block_n))
        except tensor_map.TensorMapError as error:  # strides the copy engine cannot walk
            if head_dim_v != head_dim:  # no mma.sync kernel to fall back on
                raise
            log.info("varattn: %s; using the mma.sync kernel", error)
            chosen, plan_kernel, fwd_kernel = _forward_kernels(q.dtype, head_dim, head_dim_v, index, short, group, False)
    if maps:
        stored = out_map(chosen, out, group)
        maps += (stored or _NO_MAP, _INT32.pack(stored is not None))
    packed = structs.attn_params(params, out, lse)
    stream = loader.current_stream(fwd_kernel)
    plan, plan_args = tiled.launch_plan(plan_kernel, packed, params, stream)
    rows, heads = (q.shape[0] * group, k.shape[1]) if chosen.packed else (q.shape[0], q.shape[1])
    grid = tiled.tiles_upper_bound(rows, chosen.block_m, batch) * heads
    if chosen.ctas_per_sm:
        grid = min(grid, chosen.ctas_per_sm * loader.multiprocessors(index))
    loader.launch(fwd_kernel, (grid,), (chosen.threads,), loader.Args(packed, *plan_args, *maps),
                  shared_mem=chosen.shared_mem, stream=stream)
    return out, lse


# The backward: kernels_cu/flash_bwd.cu (mma.sync, 64 x 64 tiles, head dims up
# to 128), and on Hopper kernels_cu/flash_bwd_hopper.cu (wgmma, 128-key tiles,
# head dims up to 128); each has a deterministic instance.
BACKWARD_HEAD_DIMS = (32, 64, 96, 128)
BACKWARD_BLOCK, BACKWARD_THREADS = 64, 128
HOPPER_BACKWARD_HEAD_DIMS, HOPPER_BACKWARD_BLOCK_N = (32, 64, 96, 128), 128
HOPPER_BACKWARD_THREADS = 384
loader.register_family("flash_bwd", [f"flash_bwd<{t}, {d}, {str(deterministic).lower()}>" for t in STORAGE_TYPES.values()
                                     for d in BACKWARD_HEAD_DIMS for deterministic in (False, True)]
                       + [f"flash_bwd_delta<{t}>" for t in STORAGE_TYPES.values()]
                       + [f"flash_plan<{BACKWARD_BLOCK}, KEY_ROWS>"])
loader.register_family("flash_bwd_hopper", [f"flash_bwd_hopper<{t}, {d}, {str(deterministic).lower()}>"
                                            for t in STORAGE_TYPES.values() for d in HOPPER_BACKWARD_HEAD_DIMS
                                            for deterministic in (False, True)]
                       + [f"flash_bwd_hopper_dq<{t}, {d}>" for t in STORAGE_TYPES.values()
                          for d in HOPPER_BACKWARD_HEAD_DIMS]
                       + [f"flash_plan<{HOPPER_BACKWARD_BLOCK_N}, KEY_ROWS>"])
DQ_THREADS = 256  # flash_bwd_hopper_dq


def backward_shared_mem(head_dim: int) -> int:
    # K, V, Q, dO tiles with rows padded by 16 bytes; dS^T (64 x 72); lse and delta
    return 4 * BACKWARD_BLOCK * (head_dim + 8) * 2 + BACKWARD_BLOCK * (BACKWARD_BLOCK + 8) * 2 + 2 * BACKWARD_BLOCK * 4


def hopper_backward_width(head_dim: int) -> int:
    """head_dim padded to whole 64-column swizzle atoms, as the Hopper backward's tiles hold it."""
    return -(-head_dim // 64) * 64


def hopper_backward_block_m(head_dim: int) -> int:
    """Query rows per step of the Hopper backward: 128 / atoms (kernels_cu/flash_bwd_hopper.cu: BwdHopperShared)."""
    return 128 // (hopper_backward_width(head_dim) // 64)


def hopper_backward_shared_mem(head_dim: int) -> int:
    # K, V; two stages of Q and dO; two dS^T buffers (block_n x block_m);
    # dQ staging (two 64 x 64 float blocks); two stages of lse and delta;
    # 1 KB to align (kernels_cu/flash_bwd_hopper.cu: BwdHopperShared::BYTES)
    width, block_m, block_n = hopper_backward_width(head_dim), hopper_backward_block_m(head_dim), HOPPER_BACKWARD_BLOCK_N
    return (2 * block_n * width * 2 + 2 * 2 * block_m * width * 2 + 2 * block_n * block_m * 2
            + 2 * 64 * 64 * 4 + 2 * 2 * block_m * 4 + 1024)


def hopper_dq_rows(head_dim: int) -> int:
    """Query rows per CTA of flash_bwd_hopper_dq: 4 columns per lane, up to 32 lanes a row."""
    return DQ_THREADS // min(32, hopper_backward_width(head_dim) // 4)


@dataclass(frozen=True)
class _BackwardKernel:
    """The main pass of one backward call and how to launch it; dq_name: the
    kernel of `family` that turns its dQ accumulator into dQ (None: a cast)."""
    family: str
    name: str
    block_n: int
    threads: int
    shared_mem: int
    tensor_maps: tuple = ()
    dq_name: str | None = None


def _backward_kernel(params, grad_out) -> _BackwardKernel:
    dtype, head_dim, deterministic = STORAGE_TYPES[params.dtype], params.head_dim, str(params.deterministic).lower()
    if head_dim in HOPPER_BACKWARD_HEAD_DIMS and loader.arch_of(params.device) == "sm_90a":
        try:
            block_m = hopper_backward_block_m(head_dim)
            maps = (tensor_map.rows(params.q, block_m), tensor_map.rows(params.k, HOPPER_BACKWARD_BLOCK_N),
                    tensor_map.rows(params.v, HOPPER_BACKWARD_BLOCK_N), tensor_map.rows(grad_out, block_m))
            return _BackwardKernel("flash_bwd_hopper", f"flash_bwd_hopper<{dtype}, {head_dim}, {deterministic}>",
                                   HOPPER_BACKWARD_BLOCK_N, HOPPER_BACKWARD_THREADS,
                                   hopper_backward_shared_mem(head_dim), maps,
                                   f"flash_bwd_hopper_dq<{dtype}, {head_dim}>")
        except tensor_map.TensorMapError as error:  # strides the copy engine cannot walk
            log.info("varattn: %s; using the mma.sync backward", error)
    return _BackwardKernel("flash_bwd", f"flash_bwd<{dtype}, {head_dim}, {deterministic}>",
                           BACKWARD_BLOCK, BACKWARD_THREADS, backward_shared_mem(head_dim))


def backward(params, out, lse, grad_out, grad_lse, bias_grad):
    """(dq, dk, dv, None) of the call `params` whose forward gave `out` and
    `lse`; grad_lse (H, total_q), or None, is the gradient reaching lse."""
    if not tiled.rows_aligned(grad_out):
        grad_out = grad_out.contiguous()
    q, k = params.q, params.k
    holes_k = params.seqused_k is not None
    dk = (torch.zeros_like if holes_k else torch.empty_like)(k, memory_format=torch.contiguous_format)
    dv = (torch.zeros_like if holes_k else torch.empty_like)(params.v, memory_format=torch.contiguous_format)
    batch, device = params.batch_size, params.device
    if params.total_q == 0 or params.total_k == 0 or batch == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_(), None
    main = _backward_kernel(params, grad_out)
    # Query-tile slots per head (kernels_cu/bwd_params.cuh: query_tile_slot).
    tiles_per_head = params.total_q // BACKWARD_BLOCK + batch + 1
    accum_shape = ((params.num_heads * tiles_per_head * BACKWARD_BLOCK * hopper_backward_width(params.head_dim),)
                   if main.dq_name else q.shape)
    dq_accum = torch.zeros(accum_shape, dtype=torch.float32, device=device)
    delta = torch.empty(params.num_heads, params.total_q, dtype=torch.float32, device=device)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    delta_kernel = loader.kernel("flash_bwd", f"flash_bwd_delta<{STORAGE_TYPES[params.dtype]}>", device)
    plan_kernel = loader.kernel(main.family, f"flash_plan<{main.block_n}, KEY_ROWS>", device)
    bwd_kernel = loader.kernel(main.family, main.name, device, dynamic_shared_mem=main.shared_mem)
    packed = structs.attn_params(params, out, lse)
    turns = (torch.zeros(params.num_heads * tiles_per_head, dtype=torch.int32, device=device)
             if params.deterministic else None)
    grads = structs.BWD_PARAMS.pack(grad_out.data_ptr(), dq_accum.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                  delta.data_ptr(), 0 if grad_lse is None else grad_lse.data_ptr(),
                                  0 if turns is None else turns.data_ptr(), grad_out.stride(0), grad_out.stride(1),
                                  tiles_per_head)
    stream = loader.current_stream(bwd_kernel)
    tiled.launch_delta(delta_kernel, packed, grads, params.total_q, stream)
    plan, plan_args = tiled.launch_plan(plan_kernel, packed, params, stream)
    tiles = tiled.tiles_upper_bound(params.total_k, main.block_n, batch)
    loader.launch(bwd_kernel, (tiles * params.num_heads_kv,), (main.threads,),
                  loader.Args(packed, *plan_args, grads, *main.tensor_maps), shared_mem=main.shared_mem, stream=stream)
    if main.dq_name is None:
        return dq_accum.to(q.dtype), dk, dv, None
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    loader.launch(loader.kernel(main.family, main.dq_name, device),
                  (-(-params.total_q // hopper_dq_rows(params.head_dim)),), (DQ_THREADS,),
                  loader.Args(packed, grads, loader.pointer(dq)), stream=stream)
    return dq, dk, dv, None
