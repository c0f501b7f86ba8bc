"""Rare-object search over a patch index: text, image-patch, multi-example and raw-embedding queries.

The thesis' search process (§3.3.1) and averaged query (§4.3, Eq. 4.1), served in this process or by
the query actor (:mod:`mining.query_actor`). The package is split by concern:

- :mod:`~mining.query.validation` -- :class:`QueryError`, :class:`QueryConfig` and the checks that
  run before any work (k, filters, boxes, allowed URIs, "exactly one of");
- :mod:`~mining.query.snapshot` -- :class:`IndexSnapshot`: one immutable index version, its
  memory-mapped metadata and the filter masks; swapped whole by a reload;
- :mod:`~mining.query.encoding` -- the CLIP text / image encoding of queries, :class:`Example`,
  :func:`l2_normalize`, :func:`decode_image`, and the one resolve path of every query kind;
- :mod:`~mining.query.engine` -- :class:`QueryEngine`: search, filters, re-rank, dedup (and the
  seam where a router over shard actors plugs in);
- :mod:`~mining.query.result` -- :data:`RESULT_SCHEMA`, the result table and its metadata,
  :func:`dedup_per_image`, :func:`overlap_larger`, :func:`timings_of`, :func:`query_info`;
- :mod:`~mining.query.shards` -- shard actors and ``ShardSet`` (a sharded version served by them,
  with the ``PatchIndex`` interface); :mod:`~mining.query.router` -- ``RouterEngine``, the engine of
  the query actor: sharded versions through shard actors, atomic reload across shards (issue 18).
  Not imported here (they need Ray).

Everything that was importable from the former ``mining/query.py`` module is re-exported here.
"""
from mining.query.encoding import EXAMPLE_FIELDS, EncodedQuery, Example, QueryEncoder, decode_image, l2_normalize, \
    spec_from_manifest
from mining.query.engine import EXACT_KINDS, QueryEngine, make_scorer, rank_hits, ranked_candidates
from mining.query.result import RESULT_SCHEMA, _Timer, dedup_per_image, overlap_larger, query_info, result_table, \
    timings_of
from mining.query.snapshot import RANDOM_INIT_QUERY_WARNING, IndexSnapshot
from mining.query.validation import FILTER_NAMES, MODES, QueryConfig, QueryError, _check_k, exactly_one, parse_box, \
    uri_allowed, validate_filters

__all__ = [
    "EXACT_KINDS", "EXAMPLE_FIELDS", "FILTER_NAMES", "MODES", "RANDOM_INIT_QUERY_WARNING", "RESULT_SCHEMA",
    "EncodedQuery", "Example", "IndexSnapshot", "QueryConfig", "QueryEncoder", "QueryEngine", "QueryError",
    "_Timer", "_check_k", "decode_image", "dedup_per_image", "exactly_one", "l2_normalize", "make_scorer",
    "overlap_larger", "parse_box", "query_info", "rank_hits", "ranked_candidates", "result_table",
    "spec_from_manifest", "timings_of", "uri_allowed", "validate_filters",
]
