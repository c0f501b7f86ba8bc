"""The nightly incremental run: mine new shards, grow the index, reload the query actor, and
(``refresh=True``) retrain the epitome on the night's shards for the next night (:func:`refresh_epitome`).

Idempotent by construction: shards already committed (the store's ``shards`` table) are skipped, each shard is
committed atomically by the actor that mined it, the index update adds only committed
shards not yet in the current index version, and a second run the same night finds
nothing new and says so.
"""
from __future__ import annotations

import logging
import time

from mining.driver import format_summary, next_command, run_mining
from mining.pipeline import MineConfig

log = logging.getLogger(__name__)

REFRESH_EPITOME_STEPS = 200
"""Optimiser steps of ``--refresh-epitome`` (a short run, starting from the current epitome)."""


def refresh_epitome(input_spec: str, output_root: str, date: str, *, steps: int = REFRESH_EPITOME_STEPS,
                    address: str | None = None, images_per_dir_shard: int = 64) -> dict:
    """Retrain the root's epitome on a night's shards and publish a new version (issue 14 item 2).

    Starts from ``<root>/models/epitome/LATEST`` when there is one (same shape), else from a crop
    of the data with the default :class:`~mining.epitome.model.EpitomeSpec`; runs
    :func:`mining.epitome.job.train_epitome` (the ``jobs.train_epitome`` library function) for
    ``steps`` steps; the new version goes to ``<root>/models/epitome/`` and becomes LATEST, so the
    next night mines with it. A rerun of the same night finds its version and does nothing.

    Returns:
        ``{"model", "from", "steps", "frames_seen", "train_s"}`` or ``{"skipped": reason, "model"}``.
    """
    from mining.epitome.fit import TrainConfig
    from mining.epitome.job import latest_model, train_epitome
    from mining.epitome.model import load_epitome
    from mining.epitome.resolve import model_dir

    mdir = model_dir(output_root)
    current = latest_model(mdir)
    if current is not None:
        meta = load_epitome(current)[1]
        if meta.get("night") == date and meta.get("input") == input_spec:
            return {"skipped": f"already refreshed on the night {date}", "model": current}
    r = train_epitome(input_spec, mdir, cfg=TrainConfig(steps=steps), init=current, address=address,
                      images_per_dir_shard=images_per_dir_shard, extra_meta={"night": date, "input": input_spec})
    return {"model": r["model"], "from": current, "steps": r["steps"], "frames_seen": r["frames_seen"],
            "train_s": r["train_s"]}


def run_nightly(input_spec: str, output_root: str, cfg: MineConfig, *, index_root: str | None = None,
                address: str | None = None, reload_actor: bool = True, index_kwargs: dict | None = None,
                refresh: bool = False, refresh_steps: int = REFRESH_EPITOME_STEPS, **mine_kwargs) -> dict:
    """One night: list shards (fresh listing), mine the uncommitted ones, update the index, reload.

    Args:
        input_spec: the night's shards (prefix, glob, files; see :func:`mining.shards.list_shards`).
        output_root: dataset root (local or s3://).
        cfg: mining configuration (its ``date`` is the partition; default today, UTC).
        index_root: index root to grow (None: no index step).
        reload_actor: tell a running query actor to reload after a new index version.
        refresh: after mining, retrain the epitome on the night's shards (:func:`refresh_epitome`,
            ``refresh_steps`` steps); a failure is reported in the summary, not raised.
    Returns:
        summary dict: the mining summary plus ``new_shards``, ``index`` (manifest summary or None),
        ``index_root``, ``reloaded``, ``nothing_to_do`` and ``epitome_refresh`` (None when not asked).
    """
    t0 = time.perf_counter()
    from mining.validate import check_date, check_dir_path, list_input

    check_date(cfg.date)            # before any work (resolved() would fill in today for None)
    check_dir_path(output_root, "--output")
    check_dir_path(index_root, "--index")
    cfg = cfg.resolved()

    per_shard = mine_kwargs.pop("images_per_dir_shard", 64)
    refs = list_input(input_spec, per_shard)
    summary = run_mining(input_spec, output_root, cfg, address=address, shards=refs, **mine_kwargs)
    summary["new_shards"] = summary["shards_total"] - summary["shards_skipped"]
    summary["nothing_to_do"] = summary["new_shards"] == 0
    summary["index"] = None
    summary["index_root"] = index_root
    summary["reloaded"] = None
    if index_root:
        from mining.index import update_index

        manifest = update_index(output_root, index_root, **(index_kwargs or {}))
        summary["index"] = {k: manifest.get(k) for k in ("version", "kind", "n", "changed", "retrained") if k in manifest}
        if manifest.get("changed") and reload_actor:
            from mining.connect import connect
            from mining.query_actor import reload_actor

            connect(address)
            try:
                summary["reloaded"] = reload_actor(timeout_s=120.0, lookup_timeout_s=0)
            except LookupError:
                summary["reloaded"] = None          # no query actor running: nothing to reload
            except Exception as e:  # noqa: BLE001 - the night's data is committed; report, don't fail
                summary["reloaded"] = {"error": f"{type(e).__name__}: {e}"}
    summary["epitome_refresh"] = None
    if refresh:
        try:
            summary["epitome_refresh"] = refresh_epitome(input_spec, output_root, cfg.date, steps=refresh_steps,
                                                         address=address, images_per_dir_shard=per_shard)
        except Exception as e:  # noqa: BLE001 - the night's data is committed; report, don't fail
            summary["epitome_refresh"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary


def nightly_next_command(s: dict) -> str:
    """The command to run after a night: query the grown index (the night already updated it), or,
    when the night had no ``--index``, build the index as after a mining run."""
    if not s.get("index_root"):
        return next_command(s)
    cmd = f'python -m jobs.query --index {s["index_root"]} --text "<what to find>" --k 16 --out <export dir>'
    if isinstance(s.get("reloaded"), dict) and "error" not in s["reloaded"]:
        cmd += "   (or --address ray://<head>:10001 instead of --index: the query actor serves the new version)"
    return cmd


def format_nightly(s: dict) -> str:
    """Human-readable end-of-night summary; the last line is the next command."""
    if s["nothing_to_do"]:
        head = (f"nothing to do for {s['date']}: all {s['shards_total']} shards are already committed "
                f"(rerun-safe; mine into a new root to re-mine)")
    else:
        head = f"night {s['date']}: {s['new_shards']} new shards"
    lines = [head, format_summary(s, with_next=False)]
    if s.get("index"):
        ix = s["index"]
        lines.append(f"index: version {ix.get('version')} ({ix.get('kind')}, {ix.get('n')} vectors, "
                     f"{'changed' if ix.get('changed') else 'unchanged'}{', retrained' if ix.get('retrained') else ''})")
    if s.get("reloaded") is not None:
        lines.append(f"query actor reload: {s['reloaded']}")
    r = s.get("epitome_refresh")
    if r:
        lines.append(f"epitome refresh: {r['error']}" if "error" in r else
                     f"epitome refresh: {r['skipped']} ({r['model']})" if "skipped" in r else
                     f"epitome refresh: {r['steps']} steps on {r['frames_seen']} frames of the night "
                     f"({r['train_s']:.1f} s) -> {r['model']} (LATEST; the next night mines with it)")
    lines.append(f"night wall time {s['wall_s']:.1f} s")
    lines.append(f"next: {nightly_next_command(s)}")
    return "\n".join(lines)
