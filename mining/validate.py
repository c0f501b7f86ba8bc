"""Fail-fast checks of a mining run's settings, in the driver, before Ray starts any actor.

Each check raises :class:`mining.errors.SettingsError` (or ``mining.embed.WeightsError``) with a
one-line message naming the option; the jobs print it and exit with code 2.
"""
from __future__ import annotations

import os
import threading
import uuid

from mining.errors import SettingsError

S3_PROBE_TIMEOUT_S = float(os.environ.get("MINING_S3_PROBE_TIMEOUT_S", "10"))


def check_positive(**values) -> None:
    """Each given number (None = its default) must be >= 1.

    Raises:
        SettingsError: names the first offending option, e.g. ``--batch-size must be >= 1 (got 0)``.
    """
    for name, v in values.items():
        if v is not None and v < 1:
            raise SettingsError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")


def check_date(date: str | None, option: str = "--date") -> None:
    """``date`` (None = today) is an ISO calendar date YYYY-MM-DD; it becomes a path component of the
    store's data files, so nothing else is accepted (no ``..``, slashes, or 2026-13-45).

    Raises:
        SettingsError: one line naming the option.
    """
    import datetime as _dt
    import re

    if date is None:
        return
    ok = isinstance(date, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date) is not None
    if ok:
        try:
            _dt.date.fromisoformat(date)
        except ValueError:
            ok = False
    if not ok:
        raise SettingsError(f"{option} must be an ISO date YYYY-MM-DD (got {date!r})")


def check_path_component(value: str, option: str) -> None:
    """A user-supplied string used as one path component: non-empty, no separators, not . or .., no
    control characters.

    Raises:
        SettingsError: one line naming the option.
    """
    if (not value or value in (".", "..") or any(c in value for c in "/\\") or any(ord(c) < 32 for c in value)):
        raise SettingsError(f"{option} {value!r} cannot be a path component (no '/', '\\', '.', '..' or control characters)")


def check_dir_path(root: str | None, option: str) -> None:
    """A local output path (None: not given) must be a directory or not exist yet; s3:// prefixes pass.

    Raises:
        SettingsError: it is a file.
    """
    if root is None or "://" in root and not root.startswith("file://"):
        return
    p = os.path.abspath(os.path.expanduser(root.removeprefix("file://")))
    if os.path.exists(p) and not os.path.isdir(p):
        raise SettingsError(f"{option} {root!r} is a file, not a directory")


def check_selection(cfg) -> None:
    """Selector, preset and saliency backend names exist (``cfg``: a resolved MineConfig).

    Raises:
        SettingsError: unknown name; the message lists the known ones.
    """
    from mining import selection
    from mining.saliency.base import available_backends

    if cfg.selector not in ("saliency", "ltrp", "kpp"):
        raise SettingsError(f"unknown --selector {cfg.selector!r}; use saliency, ltrp or kpp")
    if cfg.preset not in selection.PRESETS:
        raise SettingsError(f"unknown --preset {cfg.preset!r}; known: {', '.join(sorted(selection.PRESETS))}")
    if cfg.selector == "saliency" and cfg.saliency not in available_backends():
        raise SettingsError(f"unknown --saliency {cfg.saliency!r}; known: {', '.join(sorted(available_backends()))}")
    if cfg.select_impl not in (None, "torch", "numpy"):
        raise SettingsError(f"unknown select_impl {cfg.select_impl!r}; use torch, numpy or None")
    if not 0 < float(cfg.kpp_ratio) <= 1:
        raise SettingsError(f"--kpp-ratio must be in (0, 1] (got {cfg.kpp_ratio})")


def check_epitome(cfg) -> None:
    """``--epitome`` (when given) is a readable epitome model file; the bootstrap settings are >= 1.

    Raises:
        SettingsError: missing file, not an epitome file, or a bootstrap setting < 1.
    """
    check_positive(epitome_bootstrap_frames=cfg.epitome_bootstrap_frames,
                   epitome_bootstrap_steps=cfg.epitome_bootstrap_steps)
    if cfg.epitome:
        from mining.epitome.model import load_epitome

        try:
            load_epitome(cfg.epitome)
        except FileNotFoundError:
            raise SettingsError(f"--epitome {cfg.epitome!r} does not exist") from None
        except Exception as e:  # noqa: BLE001 - not a model file, unreadable, newer format
            raise SettingsError(f"--epitome {cfg.epitome!r} is not a usable epitome model: {e}") from None


def check_weights(cfg) -> None:
    """CLIP weights resolve (see :func:`mining.embed.check_weights`); a bad model name is a SettingsError.

    Raises:
        mining.embed.WeightsError: weights missing.
        SettingsError: unknown model / toy model without random init.
    """
    from mining.embed import ClipSpec, WeightsError, check_weights as _check

    try:
        _check(ClipSpec(cfg.clip_model, cfg.clip_pretrained, cfg.clip_random_init))
    except WeightsError:
        raise
    except ValueError as e:
        raise SettingsError(str(e)) from None


def _with_timeout(fn, timeout_s: float, what: str):
    """Run ``fn()`` in a daemon thread; SettingsError if it takes longer than ``timeout_s`` seconds."""
    box: dict = {}

    def run():
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["e"] = e

    t = threading.Thread(target=run, daemon=True, name="probe")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise SettingsError(f"{what}: no answer within {timeout_s:.0f} s")
    if "e" in box:
        raise box["e"]
    return box.get("v")


def check_output(root: str, timeout_s: float = S3_PROBE_TIMEOUT_S) -> None:
    """``--output`` is a writable directory (created if missing) or a reachable, writable s3:// prefix.

    S3: one small object is PUT under ``<prefix>/_probe/`` and deleted again, with connect/read
    timeouts of ``timeout_s`` seconds and no retries (an unreachable endpoint fails in seconds).

    Raises:
        SettingsError: a file, not writable, unsupported scheme, or S3 unreachable / denied.
    """
    if root.startswith(("s3://", "s3a://")):
        import s3fs

        from mining.fs import s3_storage_options

        opts = s3_storage_options()
        opts["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                 "retries": {"max_attempts": 1, "mode": "standard"}}
        path = root.split("://", 1)[1].rstrip("/")
        key = f"{path}/_probe/{uuid.uuid4().hex}"

        def probe():
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
            fs.pipe(key, b"probe")
            fs.rm(key)

        try:
            _with_timeout(probe, 3 * timeout_s + 5, f"--output {root!r} is not reachable")
        except SettingsError:
            raise
        except Exception as e:  # noqa: BLE001 - endpoint down, no bucket, access denied
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise SettingsError(f"--output {root!r} is not reachable or not writable: {type(e).__name__}: {first}") from None
        return
    if "://" in root and not root.startswith("file://"):
        raise SettingsError(f"--output {root!r}: unsupported scheme; use a local directory or s3://bucket/prefix")
    p = os.path.abspath(os.path.expanduser(root.removeprefix("file://")))
    if os.path.exists(p) and not os.path.isdir(p):
        raise SettingsError(f"--output {root!r} is a file, not a directory")
    try:
        os.makedirs(p, exist_ok=True)
    except OSError as e:
        raise SettingsError(f"--output {root!r} cannot be created: {e.strerror or e}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise SettingsError(f"--output {root!r} is not writable")


def list_input(input_spec: str, images_per_dir_shard: int) -> list:
    """The input's shards (:func:`mining.shards.list_shards`), at least one.

    Raises:
        SettingsError: nothing there, no shards or images, or an unsupported path.
    """
    from mining.shards import list_shards

    try:
        refs = list_shards(input_spec, images_per_dir_shard=images_per_dir_shard)
    except (FileNotFoundError, ValueError) as e:
        raise SettingsError(f"--input: {e}") from None
    except OSError as e:
        raise SettingsError(f"--input {input_spec!r} cannot be listed: {type(e).__name__}: {e}") from None
    if not refs:
        raise SettingsError(f"--input {input_spec!r} holds no shards (.tar, .parquet) or images")
    return refs


def check_mine_settings(cfg, output_root: str, *, num_actors=None, cpus_per_actor=None, max_attempts=1,
                        images_per_dir_shard=1, startup_timeout=None) -> None:
    """All driver-side checks except the input listing, cheapest first (``cfg``: a resolved MineConfig).

    Raises:
        SettingsError / mining.embed.WeightsError: the first problem found, as one line.
    """
    check_date(cfg.date)
    check_path_component(cfg.run_id, "--run-id")
    check_positive(batch_size=cfg.batch_size, decode_threads=cfg.decode_threads, frame_batch=cfg.frame_batch,
                   actors=num_actors, cpus_per_actor=cpus_per_actor, max_attempts=max_attempts,
                   images_per_shard=images_per_dir_shard)
    if startup_timeout is not None and startup_timeout <= 0:
        raise SettingsError(f"--startup-timeout must be > 0 seconds (got {startup_timeout})")
    check_selection(cfg)
    check_epitome(cfg)
    check_weights(cfg)
    check_output(output_root)
