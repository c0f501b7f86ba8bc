"""Campaign queries: score the index with what a campaign's labels taught (relevance feedback).

``campaign_query(engine, "road-narrows", k=100, method="probe")``:

1. reads the campaign's labels from the store (``<data_root>/labels``, :mod:`mining.labels`;
   ``data_root`` defaults to the index manifest's) and takes the exact embeddings of its positive and
   negative patches from the index (``PatchIndex.reconstruct_exact``);
2. builds the method's search directions and scorer (:func:`mining.probe.search_directions`):
   ``mean`` = thesis Eq. 4.1, ``mean_neg``, ``probe`` = logistic regression on the labels plus
   ``background`` random patches of the index as weak negatives, or ``single`` (first positive);
3. searches the ANN index with every direction for ``candidates`` hits (the union is the candidate
   set: the index gives recall), drops frames the campaign already labeled (campaign exclusion)
   and the other filters, scores the candidates exactly (the probe gives precision), applies the
   per-frame overlap dedup (§3.3.1), grows the candidate set until ``k`` hits survive;
4. returns ``mining.query.RESULT_SCHEMA`` rows. ``score`` is the method's score: a cosine for
   ``single``/``mean``/``mean_neg``, the probe's logit for ``probe``.

Errors: ``mining.query.QueryError`` with one line for the user (no positives yet, a probe without
negatives, bad filters, ...).
"""
from __future__ import annotations

import json
import time

import numpy as np

DEFAULT_CANDIDATES = 2000
DEFAULT_BACKGROUND = 2000
DEFAULT_C = 10.0


def campaign_query(engine, campaign: str, k: int = 16, *, method: str = "probe", data_root: str | None = None,
                   filters=None, dedup: bool = True, candidates: int = DEFAULT_CANDIDATES,
                   background: int = DEFAULT_BACKGROUND, C: float = DEFAULT_C, seed: int = 0):
    """Relevance-feedback query of a campaign (see module docstring).

    Args:
        engine: ``mining.query.QueryEngine``. campaign: campaign name. k: hits (1..k_cap).
        method: one of ``mining.probe.METHODS``. data_root: store root holding the labels (default:
            the index manifest's ``data_root``). filters: engine filters (date range, where, ...).
        candidates: ANN candidates per search direction (first try; grown when too few survive).
        background: random index patches used as weak negatives by the probe. C: probe's inverse L2.
    Returns:
        ``pyarrow.Table`` (``RESULT_SCHEMA``), metadata ``query`` = {"type": "campaign", "campaign",
        "method", "round", "positives", "negatives", ...}.
    Raises:
        QueryError: see module docstring.
    """
    from mining.feedback import positives_negatives
    from mining.labels import campaign_state, check_campaign
    from mining.probe import FeedbackError, search_directions
    from mining.query import QueryEngine, QueryError, _check_k, _Timer, ranked_candidates, validate_filters

    t0 = time.perf_counter()
    cpu0 = time.thread_time()
    k = _check_k(k, engine.config.k_cap)
    snap = engine.snapshot
    root = data_root or snap.manifest.get("data_root")
    if not root:
        raise QueryError("the index manifest records no data_root: pass the store root holding the labels (--data)")
    try:
        check_campaign(campaign)
    except ValueError as e:
        raise QueryError(str(e)) from None
    st = campaign_state(root, campaign)
    pos_ids, neg_ids = positives_negatives(st, snap.patch_ids)
    if len(pos_ids) == 0:
        raise QueryError(f"campaign {campaign!r} has no accepted hit in this index yet: run a seed query "
                         f"(--text/--image) with --campaign {campaign}, label it, then python -m jobs.feedback")
    filters = dict(validate_filters(filters))
    excl = sorted(set(filters.get("exclude_image_ids", [])) | st.image_ids)
    if excl:
        filters["exclude_image_ids"] = excl
    timer = _Timer()
    vec = lambda ids: np.asarray(snap.index.reconstruct_exact(ids), np.float32) if len(ids) else \
        np.zeros((0, snap.dim), np.float32)  # noqa: E731
    P, N = vec(pos_ids), vec(neg_ids)
    B = None
    if method == "probe" and background > 0:
        rng = np.random.default_rng(seed)
        pick = snap.patch_ids[rng.choice(snap.ntotal, min(int(background), snap.ntotal), replace=False)]
        B = vec(np.sort(pick[~np.isin(pick, pos_ids)]))
    try:
        Q, scorer = search_directions(method, P, N if len(N) else None, C=C, background=B)
    except FeedbackError as e:
        raise QueryError(f"campaign {campaign!r}: {e}") from None
    timer.encode_ms = (time.perf_counter() - t0) * 1e3
    fetch = min(snap.ntotal, max(int(candidates), k))
    max_ov = engine.config.dedup_overlap if dedup else None
    rows, scores, keep = ranked_candidates(snap, np.ascontiguousarray(Q, np.float32), k, fetch, filters, max_ov,
                                           timer, lambda ids, _: scorer(vec(ids)).astype(np.float32))
    fetch = timer.fetched
    table = QueryEngine._result(snap, rows[keep], scores[keep])
    timer.extra["non_encoder_cpu_ms"] = round((time.thread_time() - cpu0) * 1e3, 4)
    desc = {"type": "campaign", "campaign": campaign, "method": method, "round": st.rounds + 1,
            "positives": int(len(P)), "negatives": int(len(N)), "background": 0 if B is None else int(len(B)),
            "excluded_frames": len(st.image_ids), "candidates": int(fetch), "k": k,
            "filters": {a: (b if a != "exclude_image_ids" else f"{len(b)} ids") for a, b in filters.items()},
            "dedup_overlap": max_ov}
    md = {b"query": json.dumps(desc, default=str).encode(),
          b"timings": json.dumps(timer.as_dict((time.perf_counter() - t0) * 1e3)).encode(),
          b"index_version": snap.version.encode(),
          b"model": (engine.embedder.model_id if engine.embedder is not None else
                     ",".join(snap.manifest.get("models") or [str(snap.manifest.get("model", ""))])).encode(),
          b"random_init": b"true" if snap.random_init else b"false"}
    return table.replace_schema_metadata(md)
