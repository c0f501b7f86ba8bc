"""CLIP patch embeddings with open_clip (thesis §3.2).

Each selected patch is cropped from the *full-resolution* frame, resized to the
model's input (224x224 for ViT-B-16; patches are square, so nothing is warped),
normalised with the model's mean/std, and embedded; the embedding is
L2-normalised so that inner product = cosine similarity (thesis §3.3.1).

Weights (no silent fallback, ever):

- ``pretrained`` is an open_clip tag (e.g. ``openai`` for ViT-B-16, downloaded into
  the Hugging Face / open_clip cache) **or** a local checkpoint path (an open_clip
  ``state_dict`` checkpoint, or OpenAI's original file);
- ``random_init=True`` is the explicit opt-in for smoke runs; it is recorded in
  the output metadata and every later step warns that results are not semantic.

The model ``tiny-test-random`` (``mining/model_configs/tiny-test-random.json``)
is a 2-layer toy config for tests and smoke runs; it only exists randomly initialised.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
TEST_MODEL = "tiny-test-random"
RANDOM_INIT_SEED = 0
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


class WeightsError(RuntimeError):
    """CLIP weights could not be loaded (never falls back to random weights)."""


def _register_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(str(_CONFIG_DIR))
        _registered = True


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_help(model: str) -> str:
    return (
        f"Provide CLIP weights for {model!r} in one of two ways: "
        f"(1) --clip-pretrained <open_clip tag>, e.g. --clip-pretrained {DEFAULT_PRETRAINED} "
        f"(tags for this model: see open_clip.list_pretrained_tags_by_model({model!r}); the weights are "
        f"downloaded once into the Hugging Face cache, so pre-populate HF_HOME on offline clusters), or "
        f"(2) --clip-pretrained /path/to/checkpoint.pt (an open_clip or OpenAI CLIP checkpoint file). "
        f"For smoke runs only, --clip-random-init builds the model with random weights (results are not semantic)."
    )


@dataclass(frozen=True)
class ClipSpec:
    """What to load. ``model`` is an open_clip model name; see module docstring for ``pretrained``."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    random_init: bool = False

    @property
    def model_id(self) -> str:
        """Identifier written to the ``model`` column, e.g. ``ViT-B-16/openai`` or ``tiny-test-random/random-init``."""
        if self.random_init:
            return f"{self.model}/random-init"
        src = self.pretrained or "none"
        if os.path.sep in src or src.endswith((".pt", ".pth", ".bin", ".safetensors")):
            src = "file:" + Path(src).name
        return f"{self.model}/{src}"


def _looks_like_path(p: str) -> bool:
    return os.path.sep in p or p.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _tag_cached(model: str, tag: str) -> bool:
    """True when open_clip's weights for ``model``/``tag`` are in the local HF hub or open_clip URL cache."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo = "/".join(hub.split("/")[:2])
            for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(repo, fn), str):
                    return True
        except Exception:  # noqa: BLE001 - no hub library or a malformed id: not cached
            pass
    url = cfg.get("url") or ""
    if url:
        root = os.environ.get("OPEN_CLIP_CACHE_DIR") or os.path.expanduser("~/.cache/clip")
        if os.path.exists(os.path.join(root, os.path.basename(url))):
            return True
    return False


def check_weights(spec: ClipSpec, offline: bool | None = None) -> None:
    """Fail fast (no model is built) when ``spec``'s weights cannot resolve here.

    Checks: the model name exists; the toy model is random-init only; a checkpoint path exists and
    opens as a torch checkpoint (memory-mapped, not loaded); a tag is one of the model's open_clip
    tags and, when the hub is offline (``HF_HUB_OFFLINE=1``), is in the local cache.

    Raises:
        WeightsError: weights missing (the message names --clip-pretrained and --clip-random-init).
        ValueError: unknown model name, or the toy model without --clip-random-init.
    """
    import open_clip

    _register_configs()
    if spec.model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {spec.model!r} (--clip-model); known e.g. ViT-B-16, ViT-L-14, {TEST_MODEL}")
    if spec.random_init:
        return
    if spec.model == TEST_MODEL:
        raise ValueError(f"{TEST_MODEL} only exists randomly initialised: pass --clip-random-init")
    p = spec.pretrained
    if not p:
        raise WeightsError(f"no CLIP weights given. {weights_help(spec.model)}")
    if _looks_like_path(p):
        if not os.path.isfile(p):
            raise WeightsError(f"CLIP checkpoint {p!r} does not exist. {weights_help(spec.model)}")
        if not p.endswith(".safetensors"):
            try:
                torch.load(p, map_location="cpu", mmap=True, weights_only=False)
            except Exception as e:  # noqa: BLE001 - not a torch checkpoint
                raise WeightsError(f"CLIP checkpoint {p!r} does not open ({type(e).__name__}). "
                                   f"{weights_help(spec.model)}") from None
        return
    if p not in open_clip.list_pretrained_tags_by_model(spec.model):
        raise WeightsError(f"{p!r} is neither a file nor an open_clip tag of {spec.model}. {weights_help(spec.model)}")
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline and not _tag_cached(spec.model, p):
        raise WeightsError(f"CLIP weights {spec.model}/{p} are not in the local cache and HF_HUB_OFFLINE is set. "
                           f"{weights_help(spec.model)}")


class ClipEmbedder:
    """open_clip image and text towers on one device.

    Args:
        spec: model name, weights source, random_init opt-in.
        device: "cuda", "cuda:1", "cpu" or None (auto).
        warn_random: log the random-weights warning (mining actors pass False: the driver warns once).
    Raises:
        WeightsError: weights cannot be loaded; the message names both ways to provide them.
        ValueError: random_init and pretrained given together, or the TEST_MODEL without random_init.
    """

    def __init__(self, spec: ClipSpec = ClipSpec(), device: str | None = None, warn_random: bool = True):
        import open_clip

        _register_configs()
        self.spec = spec
        self.device = pick_device(device)
        if spec.model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {spec.model!r}; known e.g. ViT-B-16, ViT-L-14, {TEST_MODEL}")
        if spec.model == TEST_MODEL and not spec.random_init:
            raise ValueError(f"{TEST_MODEL} only exists randomly initialised: pass --clip-random-init")
        if spec.random_init:
            if warn_random:  # mining actors pass False: the driver warns once per command
                log.warning("CLIP %s is RANDOMLY INITIALISED (--clip-random-init): embeddings are not semantic", spec.model)
            # seeded, so smoke runs (and the rerun-equality tests) are reproducible across processes
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                if not warn_random:  # open_clip's own "initialized randomly" root-logger warning too
                    logging.disable(logging.WARNING)
                try:
                    model = open_clip.create_model(spec.model, pretrained=None, device="cpu")
                finally:
                    if not warn_random:
                        logging.disable(logging.NOTSET)
            model = model.to(self.device)
        else:
            if not spec.pretrained:
                raise WeightsError(f"no CLIP weights given. {weights_help(spec.model)}")
            p = spec.pretrained
            looks_like_path = _looks_like_path(p)
            if looks_like_path and not os.path.exists(p):
                raise WeightsError(f"CLIP checkpoint {p!r} does not exist. {weights_help(spec.model)}")
            if not looks_like_path and p not in open_clip.list_pretrained_tags_by_model(spec.model):
                raise WeightsError(f"{p!r} is neither a file nor an open_clip tag of {spec.model}. {weights_help(spec.model)}")
            try:
                model = open_clip.create_model(spec.model, pretrained=p, device=self.device, weights_only=False)
            except Exception as e:  # network, hub, bad checkpoint, key mismatch
                raise WeightsError(f"could not load CLIP weights {p!r} for {spec.model}: {type(e).__name__}: {e}. "
                                   f"{weights_help(spec.model)}") from e
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self._fwd_s = 0.0          # CPU: seconds spent in encode_image
        self._fwd_events: list = []  # CUDA: (start, end) events, read lazily (no sync in the loop)

    # ------------------------------------------------------------------ helpers
    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def default_batch_size(self) -> int:
        """Patches per forward: from free device memory on GPU (bf16), 64 on CPU."""
        if self.device.type != "cuda":
            return 64
        free, _total = torch.cuda.mem_get_info(self.device)
        width = getattr(self.model.visual, "width", 768) if hasattr(self.model.visual, "width") else 768
        tokens = (self.image_size // 16) ** 2 + 1
        per_sample = tokens * 768 * 2 * 24  # bytes: bf16 activations incl. MLP (4x) and attention buffers
        del width
        return int(max(32, min(2048, 2 ** int(math.log2(max(1, 0.4 * free / per_sample))))))

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def normalize_pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 or float in [0, 255] on device -> normalised float32."""
        return (batch.float() / 255.0 - self._mean) / self._std

    # ------------------------------------------------------------------ crops
    def crops_from_image(self, image: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """Crop boxes from one full-resolution frame and resize each to the model input.

        Args:
            image: (3, H, W) uint8 tensor (any device; moved to this embedder's device).
            boxes: (N, 4) int x0, y0, x1, y1 pixels, x1/y1 exclusive, inside the frame.
        Returns:
            (N, 3, S, S) float32 in [0, 255] on the device, S = model input side.
            Boxes of equal size are resized in one batched ``interpolate`` call
            (bicubic with antialias for downscaling, as CLIP's PIL preprocessing).
        """
        image = image.to(self.device, non_blocking=True)
        n = len(boxes)
        s = self.image_size
        out = torch.empty((n, 3, s, s), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        boxes = np.asarray(boxes, dtype=np.int64)
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (w, h) in enumerate(wh.tolist()):
            groups.setdefault((w, h), []).append(i)
        imf = image.float()
        for (w, h), idx in groups.items():
            stack = torch.stack([imf[:, boxes[i, 1]:boxes[i, 3], boxes[i, 0]:boxes[i, 2]] for i in idx])
            if (h, w) != (s, s):
                stack = F.interpolate(stack, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
            out[torch.as_tensor(idx, device=self.device)] = stack.clamp_(0, 255)
        return out

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Embed resized patches without leaving the device (no host sync on CUDA).

        Args:
            pixels: (N, 3, S, S) float or uint8 in [0, 255], any device.
            batch_size: patches per forward (default :meth:`default_batch_size`).
            dtype: dtype of the result (the L2 normalisation is done in float32 first, so
                ``float16`` here equals ``embed_pixels(...).astype(np.float16)``).
        Returns:
            (N, D) L2-normalised rows of ``dtype`` on this embedder's device.
        """
        bs = batch_size or self.default_batch_size()
        outs = []
        for i in range(0, pixels.shape[0], bs):
            x = self.normalize_pixels(pixels[i:i + bs].to(self.device, non_blocking=True))
            if self.device.type == "cuda":
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
                with self._autocast():
                    z = self.model.encode_image(x)
                ev1.record()
                self._fwd_events.append((ev0, ev1))
            else:
                t0 = time.perf_counter()
                with self._autocast():
                    z = self.model.encode_image(x)
                self._fwd_s += time.perf_counter() - t0
            outs.append(F.normalize(z.float(), dim=-1).to(dtype))
        if not outs:
            return torch.zeros((0, self.dim), dtype=dtype, device=self.device)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def embed_pixels(self, pixels: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Embed resized patches.

        Args:
            pixels: (N, 3, S, S) float or uint8 in [0, 255].
            batch_size: patches per forward (default :meth:`default_batch_size`).
        Returns:
            (N, D) float32, L2-normalised rows (host numpy).
        """
        return self.encode_pixels(pixels, batch_size).cpu().numpy()

    def pop_forward_seconds(self) -> float:
        """Seconds spent in the image tower's forward since the last call (CUDA: from events)."""
        t = self._fwd_s
        if self._fwd_events:
            torch.cuda.synchronize(self.device)
            t += sum(a.elapsed_time(b) for a, b in self._fwd_events) / 1e3
        self._fwd_s, self._fwd_events = 0.0, []
        return t

    def embed_crops(self, image: np.ndarray, boxes: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Crop + resize + embed: (H, W, 3) uint8 RGB frame and (N, 4) boxes -> (N, D) float32 normalised."""
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return self.embed_pixels(self.crops_from_image(t, boxes), batch_size)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text queries -> (N, D) float32 L2-normalised (CLIP tokenizer + text tower).

        Raises:
            ValueError: empty list or an empty/blank string.
        """
        if not texts or any((not isinstance(t, str)) or not t.strip() for t in texts):
            raise ValueError("text query must be a non-empty string")
        tok = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            z = self.model.encode_text(tok)
        return F.normalize(z.float(), dim=-1).cpu().numpy()
