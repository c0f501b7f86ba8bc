"""Sizing rules of the patch index: which kind, which FAISS factory string, how many training points.

Every number that decides the shape of an index is written down here, with its reason,
so that a build is reproducible from ``(N, D, kind, memory budget)`` alone.

Rules (sources: FAISS wiki "Guidelines to choose an index", ``faiss/Clustering.h``,
``faiss/VectorTransform.cpp`` (OPQMatrix), ../shared/NOTES.md "FAISS"):

* ``nlist`` (IVF cells) is about ``4 * sqrt(N)``, rounded to the nearest power of two
  (:func:`choose_nlist`), then halved until the training sample gives at least
  :data:`MIN_POINTS_PER_CENTROID` (39, k-means warns below that) points per centroid.
* The training sample is ``TRAIN_POINTS_PER_CENTROID`` (50) points per IVF centroid, but at
  least :data:`PQ_MIN_TRAIN` (256 * 39 = 9984, what one 8-bit PQ sub-quantizer needs) and at
  most ``256 * nlist`` (k-means subsamples above that anyway) and of course at most N.
* PQ with ``M`` sub-quantizers of ``nbits`` bits: ``nbits = 8`` when the sample has
  ``>= 39 * 256`` points, else ``floor(log2(n_train / 39))`` (>= 1).  ``M`` is the largest of
  64, 56, 48, ..., 8, 4 that is ``<= D / 2`` and whose bytes per vector -- code (``M * nbits / 8``)
  + 8 bytes of id in the inverted list + the fixed bytes (OPQ matrix, coarse centroids, codebooks)
  spread over N -- fit the per-vector memory budget (:func:`choose_pq_m`).
* OPQ (a learned rotation before PQ) is used only when the sample has ``>= PQ_MIN_TRAIN``
  points (its inner PQ is always 8-bit); its output dimension is ``min(D, 8 * M)`` rounded down to
  a multiple of ``M`` (so it divides evenly by the PQ size; 8 dims per sub-quantizer):
  ``OPQ64_512`` for D = 512 without a budget, ``OPQ56_448`` at 80 bytes/vector for 1M vectors.
  The thesis used ``OPQ64_128,PQ64`` (dimension cut to 128), which lost most of the precision
  (Table 4.4). Measured here (benchmarks/index.py, 50k clustered vectors, exact re-rank):
  ``OPQ64_256`` (4 dims per sub-quantizer, half the dims dropped) reached recall@16 0.945 at
  nprobe 64 / 256 candidates, ``OPQ64_512`` 0.968 at nprobe 32 / 512 candidates.
* ``ivfpq-refine`` uses **4-bit fast-scan PQ** instead (``OPQ{M}_{4M},IVF{nlist},PQ{M}x4fsr``,
  :func:`choose_fastscan`): M = the largest of 128, 112, ..., 4 with M <= D/4, then nlist, nlist/2
  or nlist/4, whose bytes per vector -- M/2 code + 8 id + (OPQ matrix + centroids + codebooks +
  half a 32-code block of padding per list) / N -- fit the budget: ``OPQ128_512,IVF4096,PQ128x4fsr``
  (85.7 B/vector) without a budget at 1M, ``OPQ128_512,IVF2048,PQ128x4fsr`` (79.4 B/vector) at 80.
  The candidates (k * k_factor) are re-ranked with the exact float16 vectors by faiss'
  ``IndexRefine``.  Measured at 1M (benchmarks/RESULTS.md): the fast scan is what makes 2048
  candidates affordable, and 2048 candidates are what 0.95 recall@16 needs on dense data.
  Fewer than 624 training points (one 4-bit codebook): the 8-bit rule above, still re-ranked.
* ``kind="auto"``: ``N <= AUTO_FLAT_MAX_N`` (50 000, i.e. the vertical slice of 3-300 images)
  -> ``flat`` (exact, nothing to train) if it fits the budget, else ``sq8`` if it fits, else
  ``ivfpq``; larger N -> ``ivfpq-refine`` with the largest ``M`` that fits the budget.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

KINDS = ("flat", "hnsw", "ivfpq", "ivfpq-refine", "sq8")
IVF_KINDS = ("ivfpq", "ivfpq-refine")

MIN_POINTS_PER_CENTROID = 39  # faiss/Clustering.h warns below this
MAX_POINTS_PER_CENTROID = 256  # faiss/Clustering.h subsamples above this
TRAIN_POINTS_PER_CENTROID = 50  # our choice: a little above the minimum, k-means cost is linear in it
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_CENTROID  # 9984: one 8-bit PQ codebook of 256 centroids
AUTO_FLAT_MAX_N = 50_000  # below this, exact search is fast enough (~ms) and needs no training
HNSW_M = 32  # the thesis' HNSW32
ID_BYTES = 8  # int64 id stored per vector (inverted lists / IndexIDMap)
DEFAULT_K_FACTOR = 8  # ivfpq-refine: re-rank k * k_factor PQ candidates with exact vectors
MEMORY_SLACK = 1.05  # 5 % for inverted-list / Python overhead (fixed IVF bytes are counted separately)
PQ_DSUB = 8  # dims per PQ sub-quantizer after OPQ: OPQ{M}_{8M}
PQ_M_CHOICES = (64, 56, 48, 40, 32, 24, 16, 8, 4)
# ivfpq-refine: 4-bit "fast-scan" PQ (faiss IndexIVFPQFastScan, André et al. "Quicker ADC"): 16-entry
# look-up tables held in SIMD registers, codes packed in blocks of 32 vectors.  Scanning is ~5-10x
# faster than 8-bit PQ at the same code size, so the re-rank can afford 2-4x more candidates, which
# is what recall needs on dense data (measured in benchmarks/RESULTS.md).
FS_NBITS = 4
FS_DSUB = 4  # dims per 4-bit sub-quantizer after OPQ: OPQ{M}_{4M}
FS_M_CHOICES = (128, 112, 96, 80, 64, 48, 32, 24, 16, 8, 4)
FS_BLOCK = 32  # vectors per packed block (faiss bbs); a list wastes half a block on average
FS_MIN_TRAIN = (1 << FS_NBITS) * MIN_POINTS_PER_CENTROID  # 624: one 4-bit codebook
FS_NLIST_STEPS = 2  # with a budget, nlist may be halved up to twice to leave room for a bigger code


@dataclass
class IndexPlan:
    """The shape of an index, decided by :func:`plan_index` (all sizes in bytes)."""

    kind: str
    dim: int
    n: int
    factory: str
    n_train: int = 0
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    opq_dout: int = 0
    refine: str | None = None  # "fp16": exact re-rank from the float16 refine file (see mining.index.search)
    fast_scan: bool = False  # 4-bit fast-scan PQ (``PQ{M}x4fsr``)
    bytes_per_vector: float = 0.0  # estimated resident bytes per vector
    rules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_bytes(text: str | int | float | None) -> int | None:
    """'8GiB' / '500MB' / '1e9' / 123 -> bytes (int). None/'' -> None.

    Raises:
        ValueError: unparsable text.
    """
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.I)
    if not m:
        raise ValueError(f"cannot parse a memory size from {text!r} (use e.g. 8GiB, 500MB, 1e9)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** " KMGT".index(unit or " "))


def _pow2_round(x: float) -> int:
    """Nearest power of two to ``x`` in log space (x >= 1)."""
    return 1 << max(0, int(round(math.log2(max(1.0, x)))))


def choose_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: ~4*sqrt(n) as a power of two, with >= 39 points per centroid.

    >>> choose_nlist(1_000_000), choose_nlist(200_000), choose_nlist(3000)
    (4096, 2048, 64)
    """
    if n < 1:
        raise ValueError(f"need at least one vector, got n={n}")
    nlist = _pow2_round(4 * math.sqrt(n))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def choose_n_train(n: int, nlist: int) -> int:
    """Training sample size: 50 points per centroid, >= 9984 (8-bit PQ), <= 256 per centroid, <= n."""
    want = max(TRAIN_POINTS_PER_CENTROID * nlist, PQ_MIN_TRAIN)
    want = min(want, max(MAX_POINTS_PER_CENTROID * nlist, PQ_MIN_TRAIN))
    return int(min(n, want))


def choose_pq_nbits(n_train: int) -> int:
    """8 bits when n_train >= 39*256, else the largest b with 39 * 2**b <= n_train (>= 1)."""
    if n_train >= PQ_MIN_TRAIN:
        return 8
    return max(1, int(math.floor(math.log2(max(2, n_train) / MIN_POINTS_PER_CENTROID))))


def opq_dout(dim: int, m: int, dsub: int = PQ_DSUB) -> int:
    """OPQ output dimension: min(dim, dsub * m) rounded down to a multiple of m (divides evenly by M);
    ``dsub`` dims per sub-quantizer (:data:`PQ_DSUB` for 8-bit PQ, :data:`FS_DSUB` for 4-bit fast-scan)."""
    d = min(dim, dsub * m)
    return max(m, d - d % m)


def ivf_fixed_bytes(dim: int, nlist: int, m: int, nbits: int = 8, opq: bool = True, dsub: int = PQ_DSUB) -> int:
    """Bytes of an IVF-PQ index that do not grow with N: OPQ matrix, coarse centroids, PQ codebooks."""
    dout = opq_dout(dim, m, dsub) if opq else dim
    return 4 * ((dout * dim if opq else 0) + nlist * dout + (1 << nbits) * dout)


def choose_pq_m(dim: int, budget_per_vector: float | None, nbits: int = 8, *, n: int = 0, nlist: int = 0,
                opq: bool = True) -> int:
    """Largest M in :data:`PQ_M_CHOICES` with M <= dim/2 whose bytes per vector fit the budget.

    Bytes per vector = code (M * nbits / 8) + 8 (id) + fixed bytes / n (see :func:`ivf_fixed_bytes`),
    times :data:`MEMORY_SLACK`. Without OPQ, M must divide dim.
    Raises: ValueError when not even M=4 fits.
    """
    for m in PQ_M_CHOICES:
        if m > dim // 2 or (not opq and dim % m):
            continue
        per_vec = (m * nbits / 8 + ID_BYTES) * MEMORY_SLACK
        if n and nlist:
            per_vec += ivf_fixed_bytes(dim, nlist, m, nbits, opq) / n
        if budget_per_vector is None or per_vec <= budget_per_vector:
            return m
    raise ValueError(
        f"no PQ size fits: dim={dim}, budget {budget_per_vector} bytes/vector "
        f"(the smallest code is 4 bytes + {ID_BYTES} bytes of id)"
    )


def fastscan_fixed_bytes(dim: int, nlist: int, m: int, opq: bool = True) -> int:
    """Bytes of an IVF-PQ fast-scan index that do not grow with N: :func:`ivf_fixed_bytes` (4-bit,
    FS_DSUB dims per sub-quantizer) plus the block padding of the inverted lists (half a block of
    FS_BLOCK codes of M/2 bytes per list, on average)."""
    tables = ivf_fixed_bytes(dim, nlist, m, FS_NBITS, opq, FS_DSUB)
    return int(tables + nlist * (FS_BLOCK // 2) * ((m + 1) // 2))


def choose_fastscan(dim: int, budget_per_vector: float | None, *, n: int, nlist: int,
                    opq: bool = True) -> tuple[int, int]:
    """(M, nlist) of the 4-bit fast-scan PQ of ``ivfpq-refine``.

    The largest M in :data:`FS_M_CHOICES` with M <= dim / FS_DSUB (and dividing dim without OPQ),
    then the largest of nlist, nlist/2, nlist/4 (:data:`FS_NLIST_STEPS`), whose bytes per vector --
    code (M/2) + 8 (id) + :func:`fastscan_fixed_bytes` / n -- fit the budget.  No extra slack: the
    block padding, the only per-list overhead of fast-scan lists, is counted.  Code size (candidate
    quality) goes before nlist (scan speed): the re-rank recovers accuracy only from candidates the
    code ranks high enough.
    Raises: ValueError when nothing fits.
    """
    for m in FS_M_CHOICES:
        if m * FS_DSUB > dim or (not opq and dim % m):
            continue
        for step in range(FS_NLIST_STEPS + 1):
            nl = max(1, nlist >> step)
            per_vec = (m + 1) // 2 + ID_BYTES + fastscan_fixed_bytes(dim, nl, m, opq) / max(1, n)
            if budget_per_vector is None or per_vec <= budget_per_vector:
                return m, nl
    raise ValueError(
        f"no 4-bit PQ size fits: dim={dim}, budget {budget_per_vector} bytes/vector "
        f"(the smallest code is 2 bytes + {ID_BYTES} bytes of id + fixed bytes)"
    )


def bytes_per_vector(kind: str, dim: int, pq_m: int = 64, pq_nbits: int = 8) -> float:
    """Estimated resident bytes per vector of each kind (exact-vector file of ivfpq-refine not counted:
    it is memory-mapped from disk, 2*dim bytes/vector)."""
    if kind == "flat":
        return 4 * dim + ID_BYTES
    if kind == "sq8":
        return dim + ID_BYTES
    if kind == "hnsw":
        return 4 * dim + 2 * HNSW_M * 4 * 1.05 + ID_BYTES  # vectors + level-0 links (+ upper levels)
    if kind in IVF_KINDS:
        return pq_m * pq_nbits / 8 + ID_BYTES
    raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS} or 'auto'")


def choose_kind(n: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """The ``auto`` rule (see module docstring). Returns one of :data:`KINDS`.

    Raises:
        ValueError: nothing fits the budget.
    """
    per_vec = None if memory_budget_bytes is None else memory_budget_bytes / max(1, n)

    def fits(kind: str) -> bool:
        return per_vec is None or bytes_per_vector(kind, dim) * MEMORY_SLACK <= per_vec

    if n <= AUTO_FLAT_MAX_N:
        for kind in ("flat", "sq8"):
            if fits(kind):
                return kind
        choose_pq_m(dim, per_vec)  # raises if not even the smallest PQ fits
        return "ivfpq"
    choose_pq_m(dim, per_vec)
    return "ivfpq-refine"


def plan_index(n: int, dim: int, kind: str = "auto", memory_budget_bytes: int | None = None) -> IndexPlan:
    """Decide kind, factory string and training size for ``n`` vectors of dimension ``dim``.

    Args:
        n: number of vectors to index (> 0). dim: their dimension.
        kind: "auto" or one of :data:`KINDS`.
        memory_budget_bytes: resident-memory budget of the index (bytes) or None (no limit).
    Returns:
        an :class:`IndexPlan`; ``plan.factory`` is a FAISS ``index_factory`` string for the
        inner-product metric (``IDMap,...`` for kinds without inverted lists so that
        ``add_with_ids`` works).
    Raises:
        ValueError: unknown kind, n < 1, too few vectors to train the requested kind, or no
        PQ size fits the budget.
    """
    if n < 1:
        raise ValueError(f"cannot index {n} vectors")
    requested = kind
    if kind == "auto":
        kind = choose_kind(n, dim, memory_budget_bytes)
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS} or 'auto'")
    rules = [f"kind={kind} ({'auto rule' if requested == 'auto' else 'requested'}; N={n}, D={dim})"]
    if kind == "flat":
        return IndexPlan(kind, dim, n, "IDMap,Flat", bytes_per_vector=bytes_per_vector(kind, dim), rules=rules)
    if kind == "sq8":
        nt = min(n, 65_536)
        return IndexPlan(kind, dim, n, "IDMap,SQ8", n_train=nt, bytes_per_vector=bytes_per_vector(kind, dim), rules=rules)
    if kind == "hnsw":
        return IndexPlan(kind, dim, n, f"IDMap,HNSW{HNSW_M}", bytes_per_vector=bytes_per_vector(kind, dim), rules=rules)

    if n < 2 * MIN_POINTS_PER_CENTROID:
        raise ValueError(f"{kind} needs at least {2 * MIN_POINTS_PER_CENTROID} vectors to train, got {n}; use kind='flat'")
    nlist = choose_nlist(n)
    n_train = choose_n_train(n, nlist)
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n_train:
        nlist //= 2
    nbits = choose_pq_nbits(n_train)
    per_vec = None if memory_budget_bytes is None else memory_budget_bytes / n
    use_opq = n_train >= PQ_MIN_TRAIN
    if kind == "ivfpq-refine" and n_train >= FS_MIN_TRAIN:
        return _plan_fastscan(kind, dim, n, nlist, n_train, per_vec, use_opq, rules)
    m = choose_pq_m(dim, per_vec, nbits, n=n, nlist=nlist, opq=use_opq)
    rules.append(f"nlist={nlist} (~4*sqrt(N)={4 * math.sqrt(n):.0f} as a power of two, >= {MIN_POINTS_PER_CENTROID} pts/centroid)")
    rules.append(f"n_train={n_train} ({n_train / nlist:.0f} pts/centroid)")
    rules.append(f"PQ{m}x{nbits} ({m * nbits / 8:.0f} B code + {ID_BYTES} B id per vector)")
    factory, dout = _ivf_factory(nlist, m, f"PQ{m}x{nbits}", opq_dout(dim, m), use_opq, rules)
    return IndexPlan(
        kind, dim, n, factory, n_train=n_train, nlist=nlist, pq_m=m, pq_nbits=nbits, opq_dout=dout,
        refine="fp16" if kind == "ivfpq-refine" else None,
        bytes_per_vector=bytes_per_vector(kind, dim, m, nbits) + ivf_fixed_bytes(dim, nlist, m, nbits, use_opq) / n,
        rules=rules,
    )


def _ivf_factory(nlist: int, m: int, code: str, dout: int, use_opq: bool, rules: list[str]) -> tuple[str, int]:
    """``OPQ{m}_{dout},IVF{nlist},{code}`` (or without OPQ) and the OPQ output dim (0 = no OPQ)."""
    if use_opq:
        assert dout % m == 0, "OPQ output dim divides evenly by M"
        rules.append(f"OPQ{m}_{dout}: output dim {dout} = {dout // m} dims per sub-quantizer")
        return f"OPQ{m}_{dout},IVF{nlist},{code}", dout
    rules.append(f"no OPQ: n_train < {PQ_MIN_TRAIN} (OPQ's inner PQ is 8-bit)")
    return f"IVF{nlist},{code}", 0


def _plan_fastscan(kind, dim, n, nlist, n_train, per_vec, use_opq, rules) -> IndexPlan:
    """``ivfpq-refine``: OPQ + IVF + 4-bit fast-scan PQ, re-ranked with the exact float16 vectors."""
    nlist0 = nlist
    m, nlist = choose_fastscan(dim, per_vec, n=n, nlist=nlist, opq=use_opq)
    n_train = min(n_train, max(MAX_POINTS_PER_CENTROID * nlist, PQ_MIN_TRAIN))
    rules.append(f"nlist={nlist} (~4*sqrt(N)={4 * math.sqrt(n):.0f} as a power of two, >= {MIN_POINTS_PER_CENTROID} "
                 f"pts/centroid{'' if nlist == nlist0 else f'; halved from {nlist0} to fit the budget'})")
    rules.append(f"n_train={n_train} ({n_train / nlist:.0f} pts/centroid)")
    rules.append(f"PQ{m}x{FS_NBITS}fsr: 4-bit fast-scan, {(m + 1) // 2} B code + {ID_BYTES} B id per vector "
                 f"+ {fastscan_fixed_bytes(dim, nlist, m, use_opq) / n:.1f} B fixed (centroids, OPQ, block padding)")
    factory, dout = _ivf_factory(nlist, m, f"PQ{m}x{FS_NBITS}fsr", opq_dout(dim, m, FS_DSUB), use_opq, rules)
    rules.append("refine: exact float16 vectors (refine.faiss, memory-mapped), k * k_factor candidates")
    return IndexPlan(
        kind, dim, n, factory, n_train=n_train, nlist=nlist, pq_m=m, pq_nbits=FS_NBITS, opq_dout=dout,
        refine="fp16", fast_scan=True,
        bytes_per_vector=(m + 1) // 2 + ID_BYTES + fastscan_fixed_bytes(dim, nlist, m, use_opq) / n,
        rules=rules,
    )
