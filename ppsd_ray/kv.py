"""KV caches that batch: each sequence's cache, and one forward over many sequences.

A stage holds a `SeqKV` per sequence: per layer, a preallocated key and value buffer
that grows in steps of GROW positions. Appending a call's entries writes in place (no
copy of the whole cache per token, as a concatenating cache does), attention reads a
view, and a rollback only shortens the valid length (`crop`).

One stage step runs the ready calls of several sequences as ONE forward of
transformers' own model class: their tokens are packed into one row [1, sum n, H],
each with its own positions. The model's linear layers, norms and MLPs see the packed
row; only attention must keep the sequences apart. A `PackedBatch` is what the model
is handed as its cache: `update` appends each call's slice of the new keys and values
to that sequence's SeqKV and returns the per-sequence views, and the attention
function registered here ("ppsd_packed") attends each call to its own sequence only,
with the family's own attention kernel (sdpa, or the family's eager function where
the family needs it: Gemma 2's soft-capping). Sliding windows are applied here, in the
mask, so every layer keeps its full KV and a rollback past the window finds it.

Why every forward, alone too, goes through this path: a request's tokens must not
depend on what else is in the batch. Attention runs per sequence on that sequence's
own shapes, and every linear layer runs with a kernel whose reduction order does not
follow the row count (`batch_invariant`). MKL's matmuls change their order with the
number of rows and with how the rows split between threads; oneDNN's linear on a packed
weight kept one order for every row count from 1 to 512 on an Intel Xeon, so a stage
takes it where a probe at start says so (`packed_linear`): one product for the whole
batch, a lone row unpadded. Elsewhere the row counts that keep one order are measured
(`invariant_tiling`) and a batch runs in tiles of them, a short tile padded to the next
(a lone row to 4 rows on AMD EPYC), in the weight's layout that needs fewer tiles
(`batch_layout`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import sys
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "ppsd_packed"
GROW = 256     # positions a sequence's buffers grow by


# ---- one sequence's cache


class SeqKV:
    """One sequence's keys and values on a stage: per layer a buffer [1, kv_heads, capacity, d]
    of which the first `length` positions are valid. Layers fill one after another within a
    call, so each keeps its own length (a call stopped between layers leaves them uneven)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def crop(self, keep: int) -> None:
        """Keeps positions [0, keep) of every layer (an absolute length)."""
        if keep < 0:
            raise ValueError(f"crop: keep must be >= 0, got {keep}")
        self.lengths = [min(n, keep) for n in self.lengths]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends key/value [1, kv_heads, n, d]; returns views of every valid position."""
        start, n = self.lengths[layer], key.shape[2]
        end = start + n
        buf = self.keys[layer]
        if buf is None or buf.shape[2] < end:
            capacity = -(-end // GROW) * GROW
            self.keys[layer] = _grown(buf, key, capacity, start)
            self.values[layer] = _grown(self.values[layer], value, capacity, start)
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]



def _grown(old: torch.Tensor | None, like: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
    new = torch.empty(shape, dtype=like.dtype, device=like.device)
    if old is not None and keep:
        new[:, :, :keep] = old[:, :, :keep]
    return new


class KVManager:
    """The caches a stage holds: per sequence its layers' SeqKV, and, for an exit head
    that attends, the head's own. A call at `pos` gets the sequence's cache holding
    exactly positions < pos: later entries (rolled back, or left by a call stopped
    between layers) are dropped first; that drop is the rollback."""

    def __init__(self, num_layers: int, head_layers: int = 0):
        self.num_layers, self.head_layers = num_layers, head_layers
        self.layers: dict[str, SeqKV] = {}
        self.heads: dict[str, SeqKV] = {}

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self.layers

    def at(self, seq_id: str, pos: int, where: str = "") -> tuple[SeqKV, int]:
        """(the sequence's cache cut to pos, how many positions were dropped)."""
        cache = self.layers.get(seq_id)
        if cache is None:
            cache = self.layers[seq_id] = SeqKV(self.num_layers)
        return cache, _cut(cache, pos, where)

    def head_at(self, seq_id: str, pos: int, where: str = "") -> SeqKV:
        cache = self.heads.get(seq_id)
        if cache is None:
            cache = self.heads[seq_id] = SeqKV(self.head_layers)
        _cut(cache, pos, where + " exit head")
        return cache

    def release(self, seq_id: str) -> None:
        self.layers.pop(seq_id, None)
        self.heads.pop(seq_id, None)


def _cut(cache: SeqKV, pos: int, where: str) -> int:
    held = max(cache.lengths) if cache.lengths else 0
    if held > pos:
        cache.crop(pos)
        return held - pos
    if cache.lengths and min(cache.lengths) < pos:
        raise RuntimeError(f"{where}: call at position {pos} but only {min(cache.lengths)} positions cached")
    return 0


# ---- one forward over many sequences


class PerSequence(list):
    """Per-sequence key or value views, with how many of each sequence's positions are new
    in this call (its query count)."""

    def __init__(self, views, sizes):
        super().__init__(views)
        self.sizes = sizes


@dataclass
class PackedBatch:
    """What the model is handed as its cache for one packed forward: the calls' caches and
    token counts, in the order their tokens are packed."""
    caches: list[SeqKV]
    sizes: list[int]

    def update(self, key, value, layer_idx, *args, **kwargs):
        """Each call's new entries into its own sequence's cache; the per-sequence views back."""
        keys, values = [], []
        for cache, k, v in zip(self.caches, key.split(self.sizes, dim=2), value.split(self.sizes, dim=2)):
            k_all, v_all = cache.update(layer_idx, k, v)
            keys.append(k_all)
            values.append(v_all)
        return PerSequence(keys, self.sizes), PerSequence(values, self.sizes)


def packed_attention(module, query, keys: PerSequence, values: PerSequence, attention_mask, scaling=None,
                     dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """Each call's queries attend to its own sequence's keys only (see PackedBatch.update):
    causal within the call, the whole cache before it, the sliding window if the layer has
    one. The family's own kernel does the arithmetic, one sequence at a time."""
    inner = module.config.ppsd_inner_attention
    kernel = (sdpa_attention_forward if inner == "sdpa"
              else sys.modules[type(module).__module__].eager_attention_forward)
    extra = {"softcap": softcap} if softcap is not None else {}
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outs = []
    for q, k, v in zip(query.split(keys.sizes, dim=2), keys, values):
        n, total = q.shape[2], k.shape[2]
        mask = None
        if n == 1 and sliding_window and total > sliding_window:  # decode past the window: its keys only
            k, v = k[:, :, -sliding_window:], v[:, :, -sliding_window:]
        elif n > 1 and (total > n or sliding_window or inner != "sdpa"):
            mask = _mask(n, total, sliding_window, inner, q.dtype, q.device)
        if n == 1 and inner == "sdpa" and k.shape[-1] <= 256:  # a decode row: the call sdpa_attention_forward makes, without its
            # per-call checks and copy (measured: 16 rows, 30 layers, 3.4 ms of a 90 ms step)
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa))
        else:
            out, _ = kernel(module, q, k, v, mask, scaling=scaling, dropout=dropout, **extra)
            outs.append(out.transpose(1, 2))  # [1, heads, n, d], as sdpa gives it
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def _mask(n: int, total: int, window: int | None, inner: str, dtype, device) -> torch.Tensor:
    """[1, 1, n, total]: query i (at absolute position total - n + i) sees key j when j <= its
    position and, with a window, j > its position - window. Boolean for sdpa, additive for eager."""
    q_pos = torch.arange(total - n, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    if inner == "sdpa":
        return allowed[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[None, None]


AttentionInterface.register(ATTENTION, packed_attention)


def use_packed_attention(model: nn.Module) -> None:
    """Makes a transformers model attend through packed_attention, keeping its own kernel inside."""
    config = model.config
    if getattr(config, "ppsd_inner_attention", None) is None:
        config.ppsd_inner_attention = "sdpa" if config._attn_implementation == "sdpa" else "eager"
        config._attn_implementation = ATTENTION


# ---- linear layers whose rows do not depend on the batch


_threads = threading.local()


def use_torch_threads() -> None:
    """Gives this thread's OpenMP team torch's thread count (torch.set_num_threads, said once per
    process). A thread's team otherwise keeps OpenMP's default, every core, whatever torch says:
    measured (AMD EPYC, 2 cores), a one-thread stage's loop thread ran its matmuls on two
    threads, so two stages ran four on two cores, and the kernels took other reduction orders."""
    n = torch.get_num_threads()
    if getattr(_threads, "n", None) != n:
        torch.set_num_threads(n)
        _threads.n = n


@contextlib.contextmanager
def torch_threads(n: int):
    """Within: torch computes on n threads; after, on what it had, so that the caller's own work
    (a calibration's caller, a process that runs a stage in-process beside its own torch) keeps
    its threads. Sets nothing when torch has n already: in-process decoding enters it every token."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_passing_thread(fn, *args):
    """fn(*args), run on a thread that ends when it returns: for torch work on a thread that stays
    but does not run the stage's forwards (an actor's constructor or method threads). libgomp
    keeps an OpenMP pool for each thread that ran a parallel region, for as long as that thread
    lives, and once its pools hold more threads than there are cores, every idle worker sleeps
    after 100 spins instead of 300,000: each small parallel region of a step then waits for a
    wake-up. Measured (Intel Xeon, 2 cores, 16 decode rows): a step on another thread than the
    one that built the Stage 97 -> 145 ms (sdpa 23 -> 98 us a call), 97 ms once that thread ended."""
    out: list = []

    def run():
        try:
            out.append((True, fn(*args)))
        except BaseException as e:
            out.append((False, e))

    thread = threading.Thread(target=run, name="ppsd-passing")
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def keep_freed_memory() -> None:
    """Makes glibc keep freed tensors' memory for the next ones. By default a block of more than
    its mmap threshold (128 KB at first) comes fresh from the kernel, zeroed page by page on
    first touch, and goes back when freed: a prefill step's activations (a few MB each) then
    spend as long in page faults as in arithmetic (measured, Intel Xeon: silu over 539 x 1536
    took 3.5 ms in a step, 0.3 ms on warm memory; 8 prompts' prefill 568 -> 463 ms; transformers'
    own forward gains as much). For a CPU stage's process; elsewhere than glibc, nothing."""
    if (libc := _glibc()) is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest
        libc.mallopt(m_trim_threshold, 1 << 30)


def release_freed_memory() -> None:
    """Gives what every thread's heap holds freed back to the system (glibc's malloc_trim), once
    a stage's kernels are probed: with keep_freed_memory the probes' passing memory would stay
    held for good, in the heaps of the threads that probed (measured, Intel Xeon, a 15-layer
    stage with packed kernels built in a stage's process: 1540 MB anonymous memory, 866 MB
    after the trim; Ray's memory monitor killed stages of a load sweep for it)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


OPEN_ROWS = 512  # the most rows a batch runs in one matmul, where measured alike (the default max_batch_tokens)
MAX_PAD = 4  # the most rows a lone row is padded to: 4 rows cost 1.3x one row on AMD EPYC (no more than 2), 1.7x on Intel


@dataclass(frozen=True)
class Tiling:
    """The row counts a matmul with one weight may have so that each row's result is the same in
    all of them, wherever the row sits: every tile of a batch has one of these counts."""
    sizes: tuple[int, ...]  # ascending; at least the upper half of the range up to the largest
    transposed: bool = False  # measured with the weight stored transposed (see batch_layout)
    open_to: int = 0  # where the class runs on past the largest size: every count up to this one is in it
    stacked: bool = False  # single rows (sizes (1,)) as one bmm of 1-row products (see one_row_tiling)

    def whole(self, m: int) -> bool:
        """Whether m rows, a batch of any calls, run as one matmul."""
        return m in self.sizes or self.sizes[0] <= m <= self.open_to

    def pad(self, n: int) -> int:
        """The rows a tile of n rows is run with (zero rows appended)."""
        return next(s for s in self.sizes if s >= n)

    def split(self, m: int) -> list[int]:
        """m rows as near-equal tiles of at most the largest count (each more than half of it)."""
        k = -(-m // self.sizes[-1])
        base, extra = divmod(m, k)
        return [base + (i < extra) for i in range(k)]


def batch_layout(weight: torch.Tensor, limit: int = 32, open_to: int = 0) -> Tiling:
    """The tiling of the weight's better layout in memory: as stored, or stored transposed ([in,
    out] in memory, the same shape and values: `stored_transposed`) where that runs a batch of
    `limit` rows in fewer tiles. A weight stored transposed takes another kernel path (measured
    on an Intel Xeon, torch 2.13's MKL: its rows agree from 2 rows to 32, and with the stored
    layout's 16+, where the stored layout's class of 2 rows ends at 15, or at 3 for 576x576 with
    two threads). Where the stored layout batches as well, it stays."""
    tiling = invariant_tiling(weight, limit, open_to)
    if len(tiling.split(limit)) > 1:
        flipped = invariant_tiling(stored_transposed(weight), limit, open_to)
        if len(flipped.split(limit)) < len(tiling.split(limit)):
            return dataclasses.replace(flipped, transposed=True)
    return tiling


def stored_transposed(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] tensor with its memory laid out as [in, out]."""
    return weight.t().contiguous().t()


def invariant_tiling(weight: torch.Tensor, limit: int = 32, open_to: int = 0) -> Tiling:
    """The tiling a stage's matmuls with this weight use, measured, because CPU kernels pick their
    reduction order by row count and thread split (see the module doc). Of the classes of row
    counts that give one result, the one of the large counts (a batch's) if it starts at MAX_PAD
    rows or fewer, else the one of 2 rows (a lone row padded to 2), else single rows. With
    `open_to`, whether that class goes on to open_to rows (`Tiling.open_to`; probed at every
    count to 2 * limit and at every 16th beyond, at two offsets): then a batch with prompt
    chunks in it runs as one matmul, not one per chunk (Intel Xeon, 9 chunks of 57 rows: 25%
    less time as one).

    Measured on a thread of its own, with torch's thread count as the stage's forwards have it:
    once the process's main thread has run a multi-threaded matmul, its OpenMP team slows every
    later matmul on the stage loop's thread about 4x (measured: 143 against 35 us for 576x1536)."""
    return on_passing_thread(_probed, _invariant_tiling, weight, limit, open_to)


def _probed(measure, *args):
    use_torch_threads()
    return measure(*args)


def one_row_tiling(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Tiling:
    """The tiling of a stage that expects one sequence at a time: each row with the 1-row kernel,
    the one transformers computes a lone token with, so a lone decode row pays no padded tile
    (measured, AMD EPYC, 2 threads: 4 rows cost 2.5-3x one row, 576x1536 and 1536x576; a 1-row
    stage ran one stream at 13.3 tokens/s where a padded one ran 7.5). Rows of several sequences
    still get their results alone: as one bmm of 1-row products, where that gives each row what
    F.linear gives it (probed here), else one F.linear per row. That costs several rows more
    than a tile would (16 rows, 576x576: 350 us against 151), so a stage planned for load
    (PipelineConfig.concurrency > 1) takes the measured tiles instead."""
    return on_passing_thread(_probed, _one_row_tiling, weight, bias)


def _one_row_tiling(weight: torch.Tensor, bias: torch.Tensor | None) -> Tiling:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, weight.shape[1], generator=g).to(weight.dtype).to(weight.device)
    alone = torch.cat([F.linear(x[i:i + 1], weight, bias) for i in range(len(x))])
    stacked = all(torch.equal(_stacked_rows(x[s:s + m], weight, bias), alone[s:s + m]) for s, m in ((0, 2), (2, 5)))
    return Tiling((1,), stacked=stacked)


def _stacked_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Each row's 1-row product, all in one torch.bmm (the weight expanded, not copied)."""
    m, w = rows.shape[0], weight.t()
    w = w.expand(m, *w.shape)
    if bias is None:
        return torch.bmm(rows.unsqueeze(1), w).squeeze(1)
    return torch.baddbmm(bias.expand(m, 1, -1), rows.unsqueeze(1), w).squeeze(1)


def _invariant_tiling(weight: torch.Tensor, limit: int, open_to: int) -> Tiling:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(2 * limit, open_to + 3), weight.shape[1], generator=g).to(weight.dtype).to(weight.device)

    def same(m: int, ref: torch.Tensor) -> bool:  # m rows, at two offsets, give the reference's rows
        return all(torch.equal(F.linear(x[s:s + m], weight), ref[s:s + m]) for s in (0, 3))

    ref = F.linear(x[:2 * limit], weight)  # a batch's class: as many rows as a tile may have, and more
    large = [m for m in range(1, limit + 1) if same(m, ref)]
    if large and large[0] <= MAX_PAD and set(range(limit // 2, limit + 1)) <= set(large):
        probes = [*range(limit + 1, 2 * limit + 1), *range(2 * limit + 16, open_to + 1, 16), open_to]
        opened = open_to > limit and all(same(m, whole) for whole in [F.linear(x, weight)] for m in probes)
        return Tiling(tuple(large), open_to=open_to if opened else 0)
    pairs = torch.cat([F.linear(x[i:i + 2], weight) for i in range(0, 2 * limit, 2)])  # the class of 2 rows
    sizes = []
    for m in range(2, limit + 1):
        if not same(m, pairs):
            break
        sizes.append(m)
    return Tiling(tuple(sizes) or (1,))


# the longest inner dimension oneDNN's packed linear reduced in one order at every row count
# (Intel Xeon, torch 2.13's oneDNN 3.12; 1536 did not)
MAX_PACKED_K = 1024


class PackedLinear:
    """F.linear through oneDNN, the weight reordered once into oneDNN's blocked layout and its
    inner dimension cut into parts of at most MAX_PACKED_K whose products are summed in order.
    Where `packed_linear` probed it, each row's result is the one it gets alone at every row
    count up to `rows` (more rows run in pieces of `rows`): no tiles, no padding, and a batch of
    any calls, prompt chunks too, is one product. Measured on an Intel Xeon (2 threads, weights
    cycled from memory, us a matmul, 1 / 16 / 32 rows): 576x576 105 / 146 / 188 against the
    transposed tiles' 87 (a lone row padded to 2) / 110 / 125, 1536x576 211 / 283 / 384 against
    227 / 324 / 429, the LM head 4.6 / 7.3 / 10.0 ms against 6.4 / 10.1 / 13.4."""

    def __init__(self, weight: torch.Tensor, rows: int):
        pieces = weight.tensor_split(-(-weight.shape[1] // MAX_PACKED_K), dim=1)
        self.cuts = [p.shape[1] for p in pieces]
        self.parts = [torch.ops.mkldnn._reorder_linear_weight(p.contiguous(), None) for p in pieces]
        self.rows = rows

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = (self.product(rows, bias) if len(rows) <= self.rows
               else torch.cat([self.product(piece, bias) for piece in rows.split(self.rows)]))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def product(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = None
        for piece, part in zip(rows.split(self.cuts, dim=1), self.parts):
            y = torch.ops.mkldnn._linear_pointwise(piece.contiguous(), part, bias if out is None else None,
                                                   "none", [], "")
            out = y if out is None else out.add_(y)
        return out


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, limit: int = 32,
                  open_to: int = 0) -> PackedLinear | None:
    """The weight's PackedLinear where every row count from 1 to 2 * limit, and every 16th to
    open_to, gives each row its result alone (at two offsets, every row compared), else None:
    not a CPU tensor, no oneDNN kernel for it, or a kernel whose reduction order follows the
    row count (then the stage tiles, batch_layout). Probed as invariant_tiling is, on a thread
    of its own with torch's thread count."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    return on_passing_thread(_probed, _packed_linear, weight, bias, limit, open_to)


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, limit: int, open_to: int) -> PackedLinear | None:
    rows = max(2 * limit, open_to)
    try:
        kernel = PackedLinear(weight, rows)
    except RuntimeError:  # oneDNN has no kernel for this dtype here
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows + 3, weight.shape[1], generator=g).to(weight.dtype)
    alone = torch.cat([kernel.product(x[i:i + 1], bias) for i in range(len(x))])
    counts = sorted({*range(1, 2 * limit + 1), *range(2 * limit + 16, open_to + 1, 16), rows})
    same = all(torch.equal(kernel.product(x[s:s + m], bias), alone[s:s + m]) for m in counts for s in (0, 3))
    return kernel if same else None


_calls = threading.local()


@contextlib.contextmanager
def call_rows(sizes: list[int]):
    """Within: the rows the matmuls see are these calls' rows, packed in this order."""
    _calls.sizes = sizes
    try:
        yield
    finally:
        _calls.sizes = None


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiling: Tiling) -> torch.Tensor:
    """F.linear so that each row's result is the one it gets alone (see invariant_tiling): the
    rows of small calls (at most the largest tile each) together in tiles of the tiling's counts,
    and a larger call (a prompt chunk) in a matmul of its own, the same shape whatever else is in
    the batch. The calls are those of call_rows; without it, one call."""
    m = x.numel() // x.shape[-1]
    if tiling.whole(m):  # a batch that is a tile already: the common case, kept lean
        return F.linear(x, weight, bias)
    sizes = getattr(_calls, "sizes", None)
    if not sizes or sum(sizes) != m:
        sizes = [m]
    rows = x.reshape(m, x.shape[-1])
    out, small = [], []
    for call, n in zip(rows.split(sizes), sizes):
        if n > tiling.sizes[-1]:
            out += _tiles(torch.cat(small), weight, bias, tiling) if small else []
            out.append(F.linear(call, weight, bias))
            small = []
        else:
            small.append(call)
    out += _tiles(torch.cat(small), weight, bias, tiling) if small else []
    return torch.cat(out).reshape(*x.shape[:-1], weight.shape[0])


def _tiles(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiling: Tiling) -> list[torch.Tensor]:
    if tiling.stacked:
        return [_stacked_rows(rows, weight, bias)]
    out = []
    for tile in rows.split(tiling.split(rows.shape[0])):
        n = tile.shape[0]
        pad = tiling.pad(n) - n
        out.append(F.linear(torch.cat([tile, tile.new_zeros(pad, tile.shape[1])]) if pad else tile, weight, bias)[:n])
    return out


def batch_invariant(module: nn.Module, one_row: bool = False) -> nn.Module:
    """Every linear layer in `module` computes so that each row's result is the one it gets alone:
    through oneDNN's packed kernel where its probe holds for the weight's shape (packed_linear),
    else through tiled_linear with the layout and tiling measured for the shape (batch_layout;
    with `one_row`, one_row_tiling). A layer with its own forward around the product,
    families.LMHead, names it `matmul`. A packed layer keeps its weight as loaded (mapped from
    the model's file, not in anonymous memory: measured, dropping it freed none). A layer done
    before keeps its kernel: an exit head installed later shares stage 1's LM head, and
    measuring that again would cost a stage step or more. (A tied LM head stored transposed no
    longer shares the embedding's memory.)"""
    tilings: dict[tuple, Tiling] = {}
    packs: dict[tuple, int] = {}  # per shape: the rows the packed kernel holds for, 0 where it does not
    for m in module.modules():
        if not (hasattr(m, "matmul") or type(m) is nn.Linear):
            continue
        key = (tuple(m.weight.shape), m.weight.dtype, m.weight.device, m.bias is not None, one_row)
        if getattr(m, "_invariant_for", None) == key:  # a copy of another shape is measured anew
            continue
        m._invariant_for = key
        weight, bias = m.weight.detach(), None if m.bias is None else m.bias.detach()
        # an LM head's rows are a step's verified positions, a few: probing it to OPEN_ROWS costs seconds
        open_to = 0 if hasattr(m, "matmul") else OPEN_ROWS
        kernel = None
        if not one_row:  # a lone row costs more packed than with the 1-row kernel (105 against 59 us, 576x576)
            if key not in packs:
                kernel = packed_linear(weight, bias, open_to=open_to)
                packs[key] = kernel.rows if kernel else 0
            elif packs[key]:
                kernel = PackedLinear(weight, packs[key])
        if kernel is not None:
            product = kernel
        else:
            if one_row:  # its bias takes part in the probe: no sharing by shape
                tiling = one_row_tiling(weight, bias)
            else:
                tiling = tilings[key] = tilings.get(key) or batch_layout(weight, open_to=open_to)
            if tiling.transposed:
                m.weight.data = stored_transposed(m.weight.data)
            product = lambda x, b, tiling=tiling, m=m: tiled_linear(x, m.weight, b, tiling)
        if hasattr(m, "matmul"):
            m.matmul = lambda x, w, b, product=product: product(x, b)
        else:
            m.forward = lambda x, m=m, product=product: product(x, m.bias)
    return module
