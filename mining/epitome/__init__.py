"""Epitomes of the fleet's own frames (Malkin, Ortiz & Jojic, ECCV 2020): model, training, saliency.

* :mod:`mining.epitome.model`: the diagonal-Gaussian epitome, Eq. 5 as convolutions, the
  versioned model file;
* :mod:`mining.epitome.fit`: SGD with location promotion and diversification (§3);
* :mod:`mining.epitome.backend`: the ``epitome`` saliency backend and per-box novelty;
* :mod:`mining.epitome.job`: the Ray Train job behind ``python -m jobs.train_epitome``;
* :mod:`mining.epitome.stream`: shard frame streams and the bounded working-resolution reservoir;
* :mod:`mining.epitome.resolve`: which epitome a mining run uses (given, root, bootstrap, fallback).
"""
