"""``--where`` metadata filters: SQL boolean expressions over the frames' sidecar metadata, run by DuckDB.

The columns a ``where`` expression can use are the store's ``images`` table columns (``image_id``,
``image_uri``, ``shard``, ``date``, ``width``, ``height``) plus every key of the frames' sidecar JSON
(``camera``, ``timestamp``, ``vehicle``, ...; types inferred by pyarrow's JSON reader), plus ``hour``
(0-23, UTC) derived from ``timestamp`` (ISO-8601 text or epoch seconds) when the sidecar has no ``hour``.
Example: ``camera = 'front' and hour >= 20``.

The expression is never parsed by hand: DuckDB's relational API parses it as one expression
(``con.from_arrow(frames).filter(where)``: no second statement, no UNION can be smuggled in) and runs it
over an Arrow table of those columns (the ``images`` scan reads only those columns), on a connection
with external access disabled (no file or network access from inside the expression).
The result is the set of matching image ids; the query engine keeps the hits of those frames.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

IMAGE_COLUMNS = ("image_id", "image_uri", "shard", "date", "width", "height")


class WhereError(ValueError):
    """A ``--where`` expression DuckDB cannot run here (syntax, unknown column, types). One line."""


def _hour(ts) -> int | None:
    import datetime as dt

    try:
        if isinstance(ts, dt.datetime):  # pyarrow's JSON reader infers ISO-8601 text as timestamps (UTC)
            return (ts.astimezone(dt.timezone.utc) if ts.tzinfo else ts).hour
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).hour
        if isinstance(ts, str) and ts:
            d = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
            return (d.astimezone(dt.timezone.utc) if d.tzinfo else d).hour
    except (ValueError, OverflowError, OSError):
        return None
    return None


def frames_table(data_root: str) -> pa.Table:
    """Arrow table of the frames: images columns + flattened sidecar metadata (+ derived ``hour``)."""
    from mining.store import open_images

    t = open_images(data_root).to_table(columns=list(IMAGE_COLUMNS) + ["metadata"])
    t = t.filter(pa.compute.is_valid(t.column("image_id")))
    metas = [m if m and m.strip().startswith("{") else "{}" for m in t.column("metadata").to_pylist()]
    base = t.drop_columns(["metadata"])
    if not metas or all(m.strip() == "{}" for m in metas):
        return base
    import pyarrow.json as pj

    try:
        side = pj.read_json(io.BytesIO(("\n".join(json.dumps(json.loads(m)) for m in metas) + "\n").encode()))
    except (pa.ArrowInvalid, ValueError):  # mixed types across frames: fall back to text columns
        rows = [json.loads(m) for m in metas]
        keys = sorted({k for r in rows for k in r})
        side = pa.table({k: pa.array([None if r.get(k) is None else str(r.get(k)) for r in rows], pa.string())
                         for k in keys})
    for name in side.column_names:
        col = side.column(name)
        if pa.types.is_struct(col.type) or pa.types.is_list(col.type):
            continue  # nested values: not filterable here
        if name in base.column_names:
            name = "meta_" + name
        base = base.append_column(name, col)
    if "timestamp" in base.column_names and "hour" not in base.column_names:
        hours = [_hour(v) for v in base.column("timestamp").to_pylist()]
        base = base.append_column("hour", pa.array(hours, pa.int32()))
    return base


def matching_image_ids(frames: pa.Table, where: str) -> list[str]:
    """Image ids of the rows of ``frames`` where the SQL expression ``where`` is true (DuckDB).

    Raises:
        WhereError: empty expression, several statements, or a DuckDB parse / binder / type error.
    """
    import duckdb

    if not isinstance(where, str) or not where.strip():
        raise WhereError("--where is empty: give a SQL condition, e.g. \"camera = 'front' and hour >= 20\"")
    con = duckdb.connect(config={"enable_external_access": False})
    try:
        # the relational API parses ``where`` as ONE expression: "1=1) UNION SELECT ..." or "...; DROP"
        # are parse errors, not extra statements
        rows = con.from_arrow(frames).filter(where).project("image_id").fetchall()
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        raise WhereError(f"bad --where {where!r}: {msg} (columns: {', '.join(frames.column_names)})") from None
    finally:
        con.close()
    return [r[0] for r in rows]


def image_dict_mask(data_root: str | None, where: str, image_dict: pa.Array) -> np.ndarray:
    """(len(image_dict),) bool: which image ids of an index's dictionary satisfy ``where``.

    Raises:
        WhereError: no data root (the index manifest records none) or a bad expression.
    """
    import pyarrow.compute as pc

    if not data_root:
        raise WhereError("--where needs the mining store (the index manifest records no data_root)")
    try:
        frames = frames_table(data_root)
    except FileNotFoundError as e:
        raise WhereError(f"--where: cannot read the frames of {data_root!r}: {e}") from None
    ids = matching_image_ids(frames, where)
    mask = np.zeros(len(image_dict), bool)
    if ids:
        pos = pc.index_in(image_dict, value_set=pa.array(ids, pa.string()))
        mask = pos.is_valid().to_numpy(zero_copy_only=False)
    return mask
