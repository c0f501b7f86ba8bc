"""The nightly incremental run: mine new shards, grow the index, reload the query actor.

Idempotent by construction: shards already in the ledger are skipped, each shard is
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

def run_nightly(input_spec: str, output_root: str, cfg: MineConfig, *, index_root: str | None = None,
                address: str | None = None, reload_actor: bool = True, index_kwargs: dict | None = None,
                **mine_kwargs) -> dict:
    """One night: list shards (fresh listing), mine the uncommitted ones, update the index, reload.

    Args:
        input_spec: the night's shards (prefix, glob, files; see :func:`mining.shards.list_shards`).
        output_root: dataset root (local or s3://).
        cfg: mining configuration (its ``date`` is the partition; default today, UTC).
        index_root: index root to grow (None: no index step).
        reload_actor: tell a running query actor to reload after a new index version.
    Returns:
        summary dict: the mining summary plus ``new_shards``, ``index`` (manifest summary or None),
        ``index_root``, ``reloaded`` and ``nothing_to_do``.
    """
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    from mining.validate import list_input

    refs = list_input(input_spec, mine_kwargs.pop("images_per_dir_shard", 64))
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
                f"(rerun-safe; delete their ledger records to re-mine)")
    else:
        head = f"night {s['date']}: {s['new_shards']} new shards"
    lines = [head, format_summary(s, with_next=False)]
    if s.get("index"):
        ix = s["index"]
        lines.append(f"index: version {ix.get('version')} ({ix.get('kind')}, {ix.get('n')} vectors, "
                     f"{'changed' if ix.get('changed') else 'unchanged'}{', retrained' if ix.get('retrained') else ''})")
    if s.get("reloaded") is not None:
        lines.append(f"query actor reload: {s['reloaded']}")
    lines.append(f"night wall time {s['wall_s']:.1f} s")
    lines.append(f"next: {nightly_next_command(s)}")
    return "\n".join(lines)
