"""Turning a query into search directions: CLIP text / image encoding, examples, raw embeddings.

Design decisions:

- **The same CLIP model as the index.** A query is encoded with the model the index was built
  with (:func:`spec_from_manifest` reads it from the index manifest): the text tower for text, the
  image tower for an image crop. Embeddings are L2-normalised, so inner product = cosine.
- **Images are decoded exactly as the mining job decodes frames** (:func:`decode_image`: EXIF
  orientation, 16-bit, CMYK, pixel limit), so a query box refers to the same upright frame as the
  mined boxes. Image URIs are read only under the allowed prefixes
  (:func:`mining.query.validation.uri_allowed`), and never more than ``max_image_bytes``.
- **Text cache**: repeated text queries are served from an LRU cache of text embeddings keyed by
  (model id, stripped text); it is cleared when the model changes.
- **One resolve path** (:meth:`QueryEncoder._resolve_query`): text, image, raw-embedding and
  multi-example queries all become one :class:`EncodedQuery` -- (q, D) directions, a scoring mode,
  negatives and a description. Exactly one kind is given; the same "exactly one of" rule
  (:func:`mining.query.validation.exactly_one`) checks each multi-example :class:`Example`. A router
  can resolve a query once and send the directions to every shard.

Multi-example queries (thesis §4.3):

- ``mean``: q = normalise(mean_i z_i) -- Eq. 4.1 (the mean of the normalised example embeddings;
  the final re-normalisation does not change the ranking, it only makes the scores cosines);
- ``max`` / ``sum``: every example is searched on its own, the union of the candidates is scored
  exactly against every example and the per-example scores are combined with max or sum
  (:func:`mining.query.engine.make_scorer`);
- negatives: ``mean`` uses q = normalise(mean(pos) - w * mean(neg)); ``max``/``sum`` subtract
  ``w * max_j cos(neg_j, x)`` from the combined score (w = ``negative_weight``, default 0.5).
- The image crops of all examples go through the image tower in ONE batch.
"""
from __future__ import annotations

import collections
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mining.query.validation import MODES, QueryError, exactly_one, parse_box, uri_allowed

if TYPE_CHECKING:
    from mining.query.result import _Timer
    from mining.query.snapshot import IndexSnapshot

EXAMPLE_FIELDS = ("text", "image", "uri", "embedding")
_UNSET = object()  # "not given" where None is a value (text=None is an empty text query)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm: (..., D) -> (..., D) float32 (zero rows stay ~zero)."""
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def decode_image(data: bytes, what: str = "query image") -> np.ndarray:
    """Encoded image bytes (JPEG/PNG/...) -> (H, W, 3) uint8 RGB, decoded exactly as the mining job
    decodes frames (:func:`mining.decode.decode_image`: EXIF orientation, 16-bit, CMYK, pixel limit),
    so a query box refers to the same upright frame as the mined boxes.

    Raises:
        QueryError: empty, undecodable or oversized bytes.
    """
    from mining.decode import DecodeError
    from mining.decode import decode_image as _decode

    if not data:
        raise QueryError(f"{what} is empty (0 bytes)")
    try:
        return _decode(data)
    except DecodeError as e:
        raise QueryError(f"{what} is unreadable: {e.reason}") from None


def spec_from_manifest(manifest: Mapping[str, Any], clip_model: str | None = None,
                       clip_pretrained: str | None = None, clip_random_init: bool = False):
    """The CLIP spec a query must use: derived from the index manifest unless given explicitly.

    The manifest records the model id (``ClipSpec.model_id``), e.g. ``ViT-B-16/openai``,
    ``tiny-test-random/random-init`` or ``ViT-B-16/file:ckpt.pt`` (a local checkpoint, whose
    path must then be given as ``clip_pretrained``).

    Returns:
        ``mining.embed.ClipSpec``.
    Raises:
        ValueError: the manifest names several models and none was given, or a checkpoint
            file is needed.
    Warns:
        UserWarning: ``clip_model`` given and not among the manifest's models.
    """
    from mining.embed import ClipSpec

    models = manifest.get("models") or ([manifest["model"]] if manifest.get("model") else [])
    if isinstance(models, str):
        models = [models]
    models = sorted(set(models))
    if clip_model:
        if clip_random_init:
            spec = ClipSpec(clip_model, None, True)
        else:
            spec = ClipSpec(clip_model, clip_pretrained)
        if models and spec.model_id not in models:
            warnings.warn(f"querying with CLIP {spec.model_id} but the index was built with {models}: "
                          f"scores are only meaningful with the same model", UserWarning, stacklevel=2)
        return spec
    if not models:
        raise ValueError("the index manifest records no CLIP model: pass --clip-model/--clip-pretrained")
    if len(models) > 1:
        raise ValueError(f"the index mixes CLIP models {models}: pass --clip-model/--clip-pretrained explicitly")
    name, _, src = models[0].partition("/")
    if src == "random-init":
        return ClipSpec(name, None, True)
    if src.startswith("file:"):
        if not clip_pretrained:
            raise ValueError(f"the index was built with CLIP {name} from the checkpoint file {src[5:]!r}: "
                             f"pass --clip-pretrained /path/to/{src[5:]}")
        return ClipSpec(name, clip_pretrained)
    return ClipSpec(name, clip_pretrained or src or None)


@dataclass
class Example:
    """One example of a multi-example query: exactly one of ``text``, ``image`` (bytes),
    ``uri`` (an allowed URI) or ``embedding`` ((D,) float); ``box`` optional for images."""

    text: str | None = None
    image: bytes | None = None
    uri: str | None = None
    box: Any = None
    embedding: Any = None

    @classmethod
    def coerce(cls, x: Any) -> "Example":
        """Text -> ``text``, bytes -> ``image``, ndarray -> ``embedding``, a mapping of the fields,
        or an Example as is. Raises QueryError (unknown field or type)."""
        if isinstance(x, Example):
            return x
        if isinstance(x, (bytes, bytearray, memoryview)):
            return cls(image=bytes(x))
        if isinstance(x, str):
            return cls(text=x)
        if isinstance(x, Mapping):
            unknown = set(x) - {"text", "image", "uri", "box", "embedding"}
            if unknown:
                raise QueryError(f"unknown example field(s) {sorted(unknown)}; use text, image, uri, box or embedding")
            return cls(**dict(x))
        if isinstance(x, np.ndarray):
            return cls(embedding=x)
        raise QueryError(f"an example must be text, image bytes, a dict or an Example, got {type(x).__name__}")

    @classmethod
    def checked(cls, x: Any) -> tuple["Example", str]:
        """:meth:`coerce` + the "exactly one of text, image, uri, embedding" check.

        Returns:
            (example, the name of the field given).
        Raises:
            QueryError: bad type / field, or not exactly one of the four given.
        """
        ex = cls.coerce(x)
        return ex, exactly_one({n: getattr(ex, n) for n in EXAMPLE_FIELDS}, "an example")


@dataclass(frozen=True)
class EncodedQuery:
    """A query resolved to search directions: all the ANN search and the scoring need.

    Attributes:
        Q: (q, D) float32 L2-normalised directions; q = 1 unless ``mode`` is max / sum.
        mode: ``single`` (score = cosine to ``Q[0]``), ``max`` / ``sum`` (combine the cosines to
            every row of ``Q``).
        desc: JSON-able description of the query (result metadata ``query``).
        neg: (m, D) float32 negatives of a max / sum query, else None. neg_weight: their weight.
    """

    Q: np.ndarray
    mode: str
    desc: dict
    neg: np.ndarray | None = None
    neg_weight: float = 0.0


class QueryEncoder:
    """The encoding half of :class:`mining.query.QueryEngine` (a mixin).

    Expects on ``self``: ``config`` (:class:`~mining.query.validation.QueryConfig`), ``embedder``
    (a ``ClipEmbedder`` or None, loaded on first need) and ``_snap`` (the current
    :class:`~mining.query.snapshot.IndexSnapshot`); :meth:`_init_encoder` sets the rest.
    """

    config: Any
    embedder: Any
    _snap: "IndexSnapshot"

    def _init_encoder(self, clip: Any, device: str | None) -> None:
        self._clip_arg = clip
        self._device = device
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ the model
    def _check_dim(self, embedder, snap: "IndexSnapshot") -> None:
        if int(embedder.dim) != snap.dim:
            raise ValueError(f"CLIP {embedder.model_id} embeds to dim {embedder.dim} but index version {snap.version} "
                             f"has dim {snap.dim}: query with the model the index was built with "
                             f"({snap.manifest.get('models') or snap.manifest.get('model')})")

    def _load_embedder(self, snap: "IndexSnapshot") -> None:
        from mining.embed import ClipEmbedder

        spec = self._clip_arg or spec_from_manifest(snap.manifest)
        if self.embedder is None or self.embedder.spec != spec:
            emb = ClipEmbedder(spec, device=self._device)
            self._check_dim(emb, snap)
            self.embedder = emb
            with self._lock:
                self._cache.clear()
        self.clip = spec

    def _need_embedder(self):
        if self.embedder is None:
            self._load_embedder(self._snap)
        return self.embedder

    # ------------------------------------------------------------------ one query vector
    def encode_text(self, text: str, timer: "_Timer | None" = None) -> np.ndarray:
        """Text -> (D,) float32 normalised embedding, from the LRU cache when seen before.

        Raises:
            QueryError: not a string, empty or blank.
        """
        if not isinstance(text, str) or not text.strip():
            raise QueryError("text query is empty: give a non-empty phrase, e.g. 'a road narrows sign'")
        emb = self._need_embedder()
        key = (emb.model_id, text.strip())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                if timer:
                    timer.cache_hit = True
                return hit
        try:
            z = emb.embed_texts([text.strip()])[0].astype(np.float32)
        except ValueError as e:
            raise QueryError(f"text query rejected: {e}") from None
        with self._lock:
            self.cache_misses += 1
            if self.config.text_cache_size > 0:
                self._cache[key] = z
                while len(self._cache) > self.config.text_cache_size:
                    self._cache.popitem(last=False)
        return z

    def read_uri(self, uri: str) -> bytes:
        """Read an image URI that lies under ``config.allowed_prefixes``.

        Raises:
            QueryError: URI outside the allowed prefixes, missing, unreadable or too large.
        """
        if not uri_allowed(uri, self.config.allowed_prefixes):
            allowed = list(self.config.allowed_prefixes) or "none (image URIs are disabled; send the image bytes)"
            raise QueryError(f"image URI {uri!r} is outside the allowed prefixes: {allowed}")
        from mining.fs import get_fs

        try:
            fs, path = get_fs(uri)
            size = fs.size(path)
            if size is not None and size > self.config.max_image_bytes:
                raise QueryError(f"image {uri!r} is {size} bytes, above the {self.config.max_image_bytes} limit")
            with fs.open(path, "rb") as f:
                return f.read()
        except QueryError:
            raise
        except Exception as e:
            raise QueryError(f"cannot read image {uri!r}: {type(e).__name__}: {e}") from None

    def encode_image(self, image: bytes | str | np.ndarray, box: Any = None) -> np.ndarray:
        """Image (encoded bytes, an allowed URI, or an (H, W, 3) uint8 RGB array) + optional box
        -> (D,) float32 normalised embedding of the crop (whole frame when box is None).

        Raises:
            QueryError: unreadable image, box outside the image, URI not allowed.
        """
        arr, b = self._load_image(image, box)
        return self._need_embedder().embed_crops(arr, np.asarray([b], np.int64))[0].astype(np.float32)

    def encode_embedding(self, vector: Any) -> np.ndarray:
        """Raw embedding -> (D,) float32 normalised.

        Raises:
            QueryError: wrong dim, non-finite values or zero vector.
        """
        try:
            v = np.asarray(vector, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise QueryError("embedding must be a 1-D array of floats") from None
        d = self._snap.dim
        if v.shape[0] != d:
            raise QueryError(f"embedding has dim {v.shape[0]}, the index has dim {d}")
        if not np.all(np.isfinite(v)):
            raise QueryError("embedding has NaN or inf values")
        if float(np.linalg.norm(v)) < 1e-12:
            raise QueryError("embedding is the zero vector")
        return l2_normalize(v)

    def _load_image(self, image: bytes | str | np.ndarray, box: Any) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Decode/validate an image query -> ((H, W, 3) uint8 RGB, box inside it)."""
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise QueryError(f"image array must be (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
        elif isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) > self.config.max_image_bytes:
                raise QueryError(f"query image is {len(image)} bytes, above the {self.config.max_image_bytes} limit")
            arr = decode_image(bytes(image))
        elif isinstance(image, str):
            arr = decode_image(self.read_uri(image), what=f"image {image!r}")
        else:
            raise QueryError(f"image must be bytes, an allowed URI or an RGB array, got {type(image).__name__}")
        h, w = arr.shape[:2]
        b = parse_box(box)
        if b is None:
            b = (0, 0, w, h)
        elif b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
            raise QueryError(f"box {b} is outside the {w}x{h} image (x1/y1 exclusive, at most {w},{h})")
        return arr, b

    # ------------------------------------------------------------------ examples
    def encode_example(self, ex: Any, timer: "_Timer | None" = None) -> np.ndarray:
        """One :class:`Example` (or text / bytes / dict) -> (D,) float32 normalised.

        Raises:
            QueryError: a bad example (see :meth:`Example.checked`) or a bad text / image / embedding.
        """
        ex, kind = Example.checked(ex)
        if kind == "text":
            return self.encode_text(ex.text, timer)
        if kind == "embedding":
            return self.encode_embedding(ex.embedding)
        return self.encode_image(ex.image if kind == "image" else ex.uri, ex.box)

    def encode_examples(self, items: Sequence[Any], timer: "_Timer | None" = None, what: str = "example") -> np.ndarray:
        """Several examples -> (n, D) float32 normalised; image crops go through the image tower
        in ONE batch. Raises QueryError naming the bad example (``"example 2: ..."``)."""
        import torch

        out: list[np.ndarray | None] = [None] * len(items)
        crops, where = [], []
        for i, e in enumerate(items):
            try:
                ex, kind = Example.checked(e)
                if kind in ("text", "embedding"):
                    out[i] = self.encode_example(ex, timer)
                else:
                    arr, b = self._load_image(ex.image if kind == "image" else ex.uri, ex.box)
                    t = torch.from_numpy(arr).permute(2, 0, 1)
                    crops.append(self._need_embedder().crops_from_image(t, np.asarray([b], np.int64)))
                    where.append(i)
            except QueryError as err:
                raise QueryError(f"{what} {i}: {err}") from None
        if crops:
            z = self._need_embedder().embed_pixels(torch.cat(crops))
            for j, i in enumerate(where):
                out[i] = z[j].astype(np.float32)
        return np.stack(out).astype(np.float32)

    # ------------------------------------------------------------------ the one resolve path
    def _resolve_query(self, timer: "_Timer", *, text: Any = _UNSET, image: Any = _UNSET, box: Any = None,
                       examples: Any = _UNSET, embedding: Any = _UNSET, mode: str = "mean",
                       negatives: Sequence[Any] | None = None, negative_weight: float | None = None) -> EncodedQuery:
        """Exactly one of ``text``, ``image`` (+ ``box``), ``examples`` (+ ``mode``, ``negatives``,
        ``negative_weight``) or ``embedding`` -> :class:`EncodedQuery`.

        Raises:
            QueryError: not exactly one kind given, or the query itself is bad (see the encoders;
                for examples: unknown mode, no examples, the examples cancel out).
        """
        kind = exactly_one({"text": text, "image": image, "examples": examples, "embedding": embedding},
                           "a query", missing=_UNSET)
        if kind == "text":
            return EncodedQuery(self.encode_text(text, timer)[None], "single", {"type": "text", "text": text})
        if kind == "image":
            z = self.encode_image(image, box)
            return EncodedQuery(z[None], "single", {"type": "image", "uri": image if isinstance(image, str) else None,
                                                    "box": list(parse_box(box)) if box is not None else None})
        if kind == "embedding":
            return EncodedQuery(self.encode_embedding(embedding)[None], "single", {"type": "embedding"})
        return self._resolve_examples(timer, examples, mode, negatives, negative_weight)

    def _resolve_examples(self, timer: "_Timer", examples: Sequence[Any], mode: str,
                          negatives: Sequence[Any] | None, negative_weight: float | None) -> EncodedQuery:
        if mode not in MODES:
            raise QueryError(f"unknown multi-example mode {mode!r}; use one of {list(MODES)}")
        if examples is None or isinstance(examples, (str, bytes)) or len(examples) == 0:
            raise QueryError("a multi-example query needs a non-empty list of examples")
        w = self.config.negative_weight if negative_weight is None else float(negative_weight)
        pos = self.encode_examples(examples, timer, "example")
        neg = self.encode_examples(negatives, timer, "negative") if negatives else None
        desc = {"type": "examples", "mode": mode, "n": len(pos), "negatives": 0 if neg is None else len(neg),
                "negative_weight": w}
        if mode != "mean":
            return EncodedQuery(pos, mode, desc, neg, w)
        q = pos.mean(axis=0)  # Eq. 4.1
        if neg is not None:
            q = q - w * neg.mean(axis=0)
        if float(np.linalg.norm(q)) < 1e-9:
            raise QueryError("the examples cancel out (mean embedding is ~0)")
        return EncodedQuery(l2_normalize(q)[None], "single", desc)
