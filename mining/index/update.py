"""Nightly update of the patch index: add the committed shards the current version does not include.

Split from :mod:`mining.index.build` (which it calls to retrain) to keep each file to one job:
``build.py`` builds a version from scratch, this module grows one. The policy (frozen codebooks;
retrain on growth, drift or an old format; sharded versions delegated to
:func:`mining.index.stream.update_sharded`) is in :func:`update_index`'s docstring.
"""
from __future__ import annotations

import logging
import os
import time

import faiss
import numpy as np

from mining.index import core, publish, sizing
from mining.index.build import (DRIFT_RATIO, DRIFT_SAMPLE, GROWTH_RETRAIN, QUERIES_FILE, TRUTH_FILE,
                                _fill_tune_publish, _resolve_ray, build_index)
from mining.index.source import check_unique_patch_ids, committed_records, sample_vectors
from mining.index.search import TRAINED_FILE, open_index
from mining.store import dataset_info

log = logging.getLogger(__name__)


def update_index(data_root: str, out_root: str, *, growth_factor: float = GROWTH_RETRAIN,
                 drift_ratio: float = DRIFT_RATIO, force_retrain: bool = False, use_ray: bool | None = None,
                 n_parts: int | None = None, recall_target: float | None = None, seed: int = 0,
                 verbose: bool = True, uniqueness: bool = True, compact: bool = True,
                 compaction_policy: dict | None = None, **build_kw) -> dict:
    """Nightly: add committed shards not yet in the current version, with FROZEN codebooks.

    - nothing new: returns the current manifest with ``changed=False`` (no new version);
    - no version yet: ``build_index`` from scratch;
    - retrain (a new ``build_index`` version, ``manifest["retrained"]`` = "growth" | "drift" |
      "forced" | "format" (an ivfpq-refine version of the older vectors.npy layout)) when N_total >= ``growth_factor`` x the N the codebooks were trained for, or the
      quantisation error (mean squared, unit vectors) of up to 4096 new vectors exceeds
      ``drift_ratio`` x the error measured at training time;
    - else a new version = current index + new shards (``retrained=None``, ``trained_version``
      unchanged), re-tuned on the stored held-out queries whose exact ground truth is updated
      with the new vectors.
    Every new version gets ``uniqueness.parquet`` for ALL its patches (``uniqueness=False`` skips it).
    The previous version stays readable until :func:`drop_version`.
    A **sharded** current version (``"layout": "sharded"``) is updated by :func:`mining.index.stream.update_sharded`:
    the new fragments become a new shard, old shard files are not rewritten, and ``compact`` runs the
    compaction policy (:func:`mining.index.stream.compaction_plan`; ``compaction_policy`` overrides its
    keyword arguments).

    Returns: the manifest (new or current).  Raises: as :func:`build_index`.
    """
    log_fn = print if verbose else log.info
    cur = publish.current_version(out_root)
    if cur is None:
        return build_index(data_root, out_root, seed=seed, use_ray=use_ray, n_parts=n_parts, verbose=verbose,
                           recall_target=recall_target or 0.95, uniqueness=uniqueness, **build_kw)
    cur_man = publish.read_manifest(out_root, cur)
    if cur_man.get("layout") == "sharded":
        from mining.index import stream

        return stream.update_sharded(data_root, out_root, cur_man, growth_factor=growth_factor, drift_ratio=drift_ratio,
                                     force_retrain=force_retrain, use_ray=use_ray, compact=compact,
                                     recall_target=recall_target, seed=seed, verbose=verbose, uniqueness=uniqueness,
                                     **(compaction_policy or {}))
    t0 = time.perf_counter()
    old = open_index(out_root, cur)
    man = old.manifest
    records = committed_records(data_root)
    included = set(man["shards"])
    new = [r for r in records if r["shard"] not in included]
    if not new:
        log_fn(f"index {cur}: no new committed shards")
        return {**man, "changed": False}
    check_unique_patch_ids(data_root, records)
    dataset_info(data_root, warn=True)
    recall_target = recall_target if recall_target is not None else man.get("recall_target", 0.95)
    n_new = sum(r["num_patches"] for r in new)
    n_total = man["n"] + n_new
    vdir = publish.version_dir(out_root, cur)
    trained = faiss.read_index(os.path.join(vdir, TRAINED_FILE))
    reason = "forced" if force_retrain else None
    if reason is None and man.get("refine") == "store":
        reason = "format"  # a version from before the fp16 refine file (IVF labels = patch_ids): rebuild
    if reason is None and n_total >= growth_factor * man["n_trained"]:
        reason = "growth"
    drift = None
    if reason is None and man.get("quant_error", 0) > 0:
        xs = sample_vectors(data_root, new, DRIFT_SAMPLE, seed=seed + 7)
        drift = core.quantization_error(trained, xs)
        if drift > drift_ratio * man["quant_error"]:
            reason = "drift"
    if reason:
        log_fn(f"index {cur}: retraining ({reason}; N {man['n_trained']} -> {n_total}, "
               f"quant error {man.get('quant_error')} -> {drift})")
        kw = {"kind": man.get("requested_kind", man["kind"]), "memory_budget_bytes": man.get("memory_budget_bytes"),
              **build_kw}
        return build_index(data_root, out_root, recall_target=recall_target, seed=seed, use_ray=use_ray,
                           n_parts=n_parts, verbose=verbose, uniqueness=uniqueness, **kw,
                           extra_manifest={"retrained": reason, "drift_quant_error": drift, "parent_version": cur})

    use_ray = _resolve_ray(use_ray)
    plan = sizing.IndexPlan(**man["plan"])
    queries = np.load(os.path.join(vdir, QUERIES_FILE))
    tr = np.load(os.path.join(vdir, TRUTH_FILE))
    truth = (tr["scores"], tr["ids"])
    extra = {k: man.get(k) for k in ("requested_kind", "n_trained", "n_train_sample", "quant_error", "train_s",
                                     "trained_version", "memory_budget_bytes", "seed")}
    extra.update(retrained=None, parent_version=cur, drift_quant_error=drift, added_shards=sorted(r["shard"] for r in new))
    if man.get("ondisk"):
        # an on-disk index's lists live in the old version's file: re-add everything with the frozen codebooks
        base, recs = None, records
        extra["_base_shards"] = []
        truth = (np.full_like(truth[0], core.MISSING_SCORE), np.full_like(truth[1], -1))
        merge = "ondisk"
    else:
        base, recs = old.index, new
        extra["_base_shards"] = list(man["shards"])
        extra["_base_meta"] = old.metadata()
        if plan.kind == "ivfpq-refine":
            extra["_base_vectors"] = old._vectors
        merge = "memory"
    m = _fill_tune_publish(data_root, out_root, plan=plan, trained=trained, records=recs, base=base,
                           queries=queries, truth=truth, manifest_extra=extra, recall_target=recall_target,
                           use_ray=use_ray, n_parts=n_parts, merge=merge,
                           memory_budget_bytes=man.get("memory_budget_bytes"), t_start=t0, log_fn=log_fn,
                           uniqueness=uniqueness)
    return m
