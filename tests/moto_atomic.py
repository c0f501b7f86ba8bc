"""Make moto's conditional PUTs atomic, as S3's are.

moto 5.2 checks ``If-None-Match: *`` / ``If-Match`` and then stores the object in two steps
(``moto/s3/responses.py``, ``S3Response.put_object``), so under its threaded server two concurrent
conditional PUTs of the same key can both succeed. delta-rs' S3 log store relies on that check being
atomic (each ``_delta_log/<version>.json`` is written with ``If-None-Match: *``); on AWS S3 it is.
The 8-process / 1,000-shard run of ``benchmarks/ledger.py`` lost one commit to this race before the
patch. Conditional PUTs are serialised with one lock; other requests are untouched.
"""
from __future__ import annotations

import threading

_LOCK = threading.Lock()


def atomic_conditional_puts() -> None:
    """Patch moto's S3 ``put_object`` handler in this process (idempotent). Call before starting a
    ``ThreadedMotoServer``."""
    from moto.s3.responses import S3Response

    orig = S3Response.put_object
    if getattr(orig, "_atomic_conditional", False):
        return

    def put_object(self, *args, **kwargs):
        if self.headers.get("If-None-Match") or self.headers.get("If-Match"):
            with _LOCK:
                return orig(self, *args, **kwargs)
        return orig(self, *args, **kwargs)

    put_object._atomic_conditional = True
    S3Response.put_object = put_object
