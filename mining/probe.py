"""Relevance feedback scorers: learn what a campaign is looking for from its labeled hits.

Every scorer turns a campaign's labeled patch embeddings -- positives ``pos`` (P, D) and negatives
``neg`` (N, D), float32, L2-normalised CLIP embeddings -- into a score for candidate embeddings
``X`` (M, D). Higher is more relevant. Four methods (the names used by ``jobs.query --method`` and
``benchmarks/feedback.py``):

- ``single``: cosine to ONE example (the thesis' single-patch query, §3.3.1);
- ``mean``: cosine to the normalised mean of the positives, q = normalise(mean_i z_i)
  (thesis Eq. 4.1, the averaged query of §4.3);
- ``mean_neg``: q = normalise(mean(pos) - w * mean(neg)) (w = 0.5, the engine's
  ``QueryConfig.negative_weight``; a Rocchio-style update);
- ``probe``: a linear probe, L2-regularised logistic regression (scikit-learn
  ``LogisticRegression``, balanced class weights) trained on positives vs labeled negatives plus a
  random background sample of the collection as weak negatives; the score is its decision function
  w . x + b. Because that score is linear, the ANN index can be searched
  with the direction w / |w| itself (maximum inner product): the index gives recall, the probe
  precision (see :mod:`mining.campaign`).

Errors: :class:`FeedbackError` (a ``ValueError``) with a one-line message for the user, e.g. a probe
without any negative.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("single", "mean", "mean_neg", "probe")
DEFAULT_NEGATIVE_WEIGHT = 0.5
BACKGROUND_WEIGHT = 1.0


class FeedbackError(ValueError):
    """Labels that cannot train the requested scorer (no positives, no negatives for a probe, ...)."""


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n < 1e-9:
        raise FeedbackError("the labeled examples cancel out (query vector is ~0)")
    return v / n


def _as2d(a, what: str, dim: int | None = None) -> np.ndarray:
    a = np.asarray(a if a is not None else np.zeros((0, dim or 0)), np.float32)
    if a.ndim == 1:
        a = a[None] if a.size else a.reshape(0, dim or 0)
    if a.ndim != 2 or (dim is not None and len(a) and a.shape[1] != dim):
        raise FeedbackError(f"{what} must be (n, {dim or 'D'}) embeddings, got shape {a.shape}")
    if len(a) and not np.all(np.isfinite(a)):
        raise FeedbackError(f"{what} contain NaN or inf")
    return a


def mean_query(pos: np.ndarray) -> np.ndarray:
    """Thesis Eq. 4.1: normalise(mean of the positive embeddings). (P, D) -> (D,) float32 unit vector."""
    pos = _as2d(pos, "positives")
    if len(pos) == 0:
        raise FeedbackError("no positive examples: label at least one hit as accepted")
    return _unit(pos.mean(axis=0))


def mean_neg_query(pos: np.ndarray, neg: np.ndarray | None, weight: float = DEFAULT_NEGATIVE_WEIGHT) -> np.ndarray:
    """normalise(mean(pos) - weight * mean(neg)) -> (D,) float32 (Eq. 4.1 when there is no negative)."""
    pos = _as2d(pos, "positives")
    if len(pos) == 0:
        raise FeedbackError("no positive examples: label at least one hit as accepted")
    neg = _as2d(neg, "negatives", pos.shape[1])
    q = pos.mean(axis=0)
    if len(neg):
        q = q - float(weight) * neg.mean(axis=0)
    return _unit(q)


@dataclass
class LinearProbe:
    """A fitted linear probe: score(x) = w . x + b (logistic-regression logit).

    Attributes:
        w: (D,) float32 weights. b: bias. n_pos / n_neg: training set sizes. C: inverse L2 strength.
    """

    w: np.ndarray
    b: float
    n_pos: int
    n_neg: int
    C: float
    n_background: int = 0

    @property
    def direction(self) -> np.ndarray:
        """w / |w|, (D,) float32: the ANN search direction that ranks like the probe."""
        return _unit(self.w)

    def score(self, X: np.ndarray) -> np.ndarray:
        """(M, D) embeddings -> (M,) float32 logits."""
        return (np.asarray(X, np.float32) @ self.w + self.b).astype(np.float32)


def fit_probe(pos: np.ndarray, neg: np.ndarray, *, background: np.ndarray | None = None,
              background_weight: float = BACKGROUND_WEIGHT, C: float = 1.0, max_iter: int = 1000) -> LinearProbe:
    """Fit an L2 logistic regression (scikit-learn, lbfgs) on pos vs neg (+ background).

    Args:
        pos: (P, D) positive embeddings, P >= 1. neg: (N, D) labeled negatives (hits the labeler
            rejected), N >= 1 unless ``background`` is given.
        background: (B, D) random embeddings of the collection, used as *weak* negatives: the class is
            rare, so a random patch is almost surely not of it (the positive-unlabeled assumption of
            exemplar-SVM style retrieval). They tell the probe what the bulk of the data looks like, so
            it does not latch onto whatever separates a few labeled negatives from the positives.
        background_weight: their total weight, relative to the labeled negatives' total weight.
            Positives and labeled negatives are weighted to equal totals (balanced classes).
        C: inverse regularisation strength (scikit-learn's C).
    Raises:
        FeedbackError: no positives, no negatives at all, mismatched dims, non-finite values.
    """
    from sklearn.linear_model import LogisticRegression

    pos = _as2d(pos, "positives")
    if len(pos) == 0:
        raise FeedbackError("no positive examples: label at least one hit as accepted")
    neg = _as2d(neg, "negatives", pos.shape[1])
    bg = _as2d(background, "background", pos.shape[1])
    if len(neg) == 0 and len(bg) == 0:
        raise FeedbackError("the linear probe needs at least one rejected hit (negative); "
                            "label some hits as rejected or use --method mean")
    X = np.concatenate([pos, neg, bg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg) + len(bg))]
    # balanced: positives total 1, negatives total 1 (labeled) + background_weight (background)
    w_neg = 1.0 / max(len(neg), 1)
    w_bg = (background_weight if len(neg) else 1.0) / max(len(bg), 1)
    sw = np.r_[np.full(len(pos), 1.0 / len(pos)), np.full(len(neg), w_neg), np.full(len(bg), w_bg)]
    sw *= len(X) / sw.sum()
    clf = LogisticRegression(C=float(C), max_iter=int(max_iter))
    clf.fit(X, y, sample_weight=sw)
    return LinearProbe(w=clf.coef_[0].astype(np.float32), b=float(clf.intercept_[0]), n_pos=len(pos),
                       n_neg=len(neg), C=float(C), n_background=len(bg))


def search_directions(method: str, pos: np.ndarray, neg: np.ndarray | None = None, *,
                      negative_weight: float = DEFAULT_NEGATIVE_WEIGHT, C: float = 1.0,
                      background: np.ndarray | None = None):
    """The ANN query vectors of a method and its candidate scorer.

    Returns:
        (Q, scorer): Q (q, D) float32 unit vectors to search the index with; scorer(X (M, D)) ->
        (M,) float32 final scores. ``single`` uses the first positive; ``probe`` searches with the
        mean query AND the probe direction (the union of both candidate sets is re-ranked);
        ``background`` (random collection embeddings, see :func:`fit_probe`) is used by ``probe`` only.
    Raises:
        FeedbackError: unknown method or labels that cannot train it.
    """
    if method not in METHODS:
        raise FeedbackError(f"unknown feedback method {method!r}; use one of {list(METHODS)}")
    pos = _as2d(pos, "positives")
    if len(pos) == 0:
        raise FeedbackError("no positive examples: label at least one hit as accepted")
    if method == "single":
        q = _unit(pos[0])
    elif method == "mean":
        q = mean_query(pos)
    elif method == "mean_neg":
        q = mean_neg_query(pos, neg, negative_weight)
    else:
        probe = fit_probe(pos, neg, background=background, C=C)
        Q = np.stack([mean_query(pos), probe.direction])
        return Q, probe.score
    return q[None], (lambda X, q=q: (np.asarray(X, np.float32) @ q).astype(np.float32))
