"""Fast-scan inverted lists (``BlockInvertedLists``): appending codes safely.

Why this module: in faiss 1.15 ``BlockInvertedLists::add_entries`` appends packed blocks with one
``memcpy`` of the list's total block bytes at the old end whenever the old list size is a multiple
of ``block_size``, so appending to a list that already holds ``block_size`` (2,048 for PQ128x4fs)
or another nonzero multiple of entries writes past the buffer (seen as ``malloc(): corrupted top
size`` in the 5M-vector merge task of issue 18).  Every append here rebuilds the list once: its
entries are unpacked (``CodePacker.unpack_all``), the new ones concatenated, all packed again
(``pack_all``) and added to the emptied list, where ``add_entries`` copies whole blocks.
Used by the merge of encoded parts (:func:`merge_block_lists`) and by the score-aware encoder
(:mod:`mining.index.anisotropic`), which chooses codes itself and must put them into the lists.
"""
from __future__ import annotations

import faiss
import numpy as np


def _unpack_list(inv, packer, lno: int) -> np.ndarray:
    """(m, code_size) uint8 codes of list ``lno`` of a BlockInvertedLists, unpacked from its blocks."""
    m = inv.list_size(lno)
    npb, bs, cs = int(packer.nvec), int(packer.block_size), int(packer.code_size)
    nb = (m + npb - 1) // npb
    blocks = faiss.rev_swig_ptr(inv.get_codes(lno), nb * bs)  # a view: unpack_all copies out of it
    flat = np.empty((nb * npb, cs), np.uint8)
    for b in range(nb):
        packer.unpack_all(faiss.swig_ptr(blocks[b * bs:(b + 1) * bs]), faiss.swig_ptr(flat[b * npb:(b + 1) * npb]))
    return flat[:m]


def _list_entries(inv, lno: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (m,) int64, flat codes (m, code_size) uint8) of list ``lno`` of a BlockInvertedLists, copied out."""
    m = inv.list_size(lno)
    if not m:
        return np.empty(0, np.int64), np.empty((0, int(inv.packer.code_size)), np.uint8)
    return faiss.rev_swig_ptr(inv.get_ids(lno), m).copy(), _unpack_list(inv, inv.packer, lno)


def merge_block_lists(dst: faiss.Index, srcs: list[faiss.Index]) -> int:
    """Append the inverted lists of fast-scan IVF indexes ``srcs`` to ``dst``'s, list by list; sources are emptied.

    Instead of ``faiss.merge_into``, which overflows (module docstring; reproduced with 14-20 parts of
    5,000 vectors on IVF64,PQ32x4fs): each destination list is rebuilt once from its entries and every
    source's. Cost: one unpack + one pack per 32-vector block (about 2 Python calls per block).
    Returns: entries added. Raises: TypeError when ``dst`` does not have BlockInvertedLists.
    """
    div = faiss.extract_index_ivf(dst)
    dinv = faiss.downcast_InvertedLists(div.invlists)
    if not isinstance(dinv, faiss.BlockInvertedLists):
        raise TypeError("merge_block_lists needs a fast-scan IVF index (BlockInvertedLists)")
    packer = dinv.packer
    sinvs = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(s).invlists) for s in srcs]
    added = 0
    for lno in range(div.nlist):
        parts = [(inv, inv.list_size(lno)) for inv in [dinv, *sinvs]]
        if sum(m for inv, m in parts if inv is not dinv) == 0:
            continue
        entries = [_list_entries(inv, lno) for inv, m in parts if m]
        ids = np.concatenate([e[0] for e in entries])
        codes = np.concatenate([e[1] for e in entries])
        added += len(ids) - dinv.list_size(lno)
        _rebuild_list(dinv, packer, lno, ids, codes)
    for s, inv in zip(srcs, sinvs):
        for lno in range(div.nlist):
            inv.resize(lno, 0)
        faiss.extract_index_ivf(s).ntotal = 0
        s.ntotal = 0
    div.ntotal += added
    dst.ntotal = div.ntotal
    return added


def _rebuild_list(inv, packer, lno: int, ids: np.ndarray, codes: np.ndarray) -> None:
    """Replace list ``lno`` of ``inv`` by ``ids`` ((m,) int64) and flat ``codes`` ((m, code_size) uint8)."""
    npb, bs = int(packer.nvec), int(packer.block_size)
    n = len(ids)
    nb = (n + npb - 1) // npb
    flat = np.zeros((nb * npb, codes.shape[1]), np.uint8)
    flat[:n] = codes
    packed = np.zeros(nb * bs, np.uint8)
    for b in range(nb):
        packer.pack_all(faiss.swig_ptr(flat[b * npb:(b + 1) * npb]), faiss.swig_ptr(packed[b * bs:(b + 1) * bs]))
    ids = np.ascontiguousarray(ids, np.int64)  # bound: swig_ptr does not keep its array alive
    inv.resize(lno, 0)
    inv.add_entries(lno, n, faiss.swig_ptr(ids), faiss.swig_ptr(packed))


def append_entries(ivf, lists: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> int:
    """Append entries with given codes to the inverted lists of an IVF index (``ivf.ntotal`` updated).

    Args:
        ivf: a downcast ``faiss.IndexIVF`` (fast-scan ``BlockInvertedLists`` or ``ArrayInvertedLists``).
        lists: (n,) int64 list numbers; ids: (n,) int64 labels; codes: (n, code_size) uint8 flat codes.
    Returns: n. Raises: ValueError on mismatched lengths or code size; TypeError for other list types.
    """
    lists = np.asarray(lists, np.int64)
    ids = np.ascontiguousarray(ids, np.int64)
    codes = np.ascontiguousarray(codes, np.uint8)
    n = len(lists)
    if not (len(ids) == n == len(codes)):
        raise ValueError(f"append_entries: {n} list numbers, {len(ids)} ids, {len(codes)} codes")
    inv = faiss.downcast_InvertedLists(ivf.invlists)
    if codes.ndim != 2 or codes.shape[1] != int(ivf.code_size):
        raise ValueError(f"append_entries: codes of {codes.shape} for code_size {ivf.code_size}")
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(ivf.nlist + 1))
    block = isinstance(inv, faiss.BlockInvertedLists)
    if not block and not isinstance(inv, faiss.ArrayInvertedLists):
        raise TypeError(f"append_entries: unsupported inverted lists {type(inv).__name__}")
    for lno in np.flatnonzero(np.diff(bounds)):
        sel = order[bounds[lno]:bounds[lno + 1]]
        if block:
            old_ids, old = _list_entries(inv, int(lno))
            _rebuild_list(inv, inv.packer, int(lno), np.concatenate([old_ids, ids[sel]]),
                          np.concatenate([old, codes[sel]]))
        else:
            sel_ids, sel_codes = ids[sel], codes[sel]  # bound: swig_ptr does not keep its array alive
            inv.add_entries(int(lno), len(sel), faiss.swig_ptr(sel_ids), faiss.swig_ptr(sel_codes))
    ivf.ntotal += n
    return n
