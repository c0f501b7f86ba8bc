"""SimpleNet saliency (Reddy, Jain, Yarlagadda, Gandhi 2020, "Tidying deep saliency
prediction architectures"), the model of the thesis (§2.2.1).

An encoder-decoder (U-Net-like): an ImageNet encoder (here built with timm) gives five
feature maps at strides 2..32 of a 256 x 256 input; the decoder repeatedly applies
conv3x3 + ReLU + bilinear x2 upsampling, concatenating the encoder map of the same stride
(skip connections), and ends with conv3x3 + ReLU + conv3x3 + sigmoid -> a 256 x 256 map.

Official SALICON checkpoints (the authors' repository, ``salicon_<encoder>.pt``) are
loaded from a path with :func:`load_official_state_dict`, which maps the official
state-dict layout onto this module:

* ``module.`` prefix (the authors save an ``nn.DataParallel``) is stripped;
* the encoder lives under ``resnet.`` (torchvision resnet50), ``vgg.`` (torchvision
  vgg16 ``features``) or ``dense.`` (torchvision densenet161 ``features``) there and under
  ``encoder.`` here (timm ``resnet50`` features / ``vgg16.features`` /
  ``densenet161.features``, whose parameter names match torchvision's);
* the official aliases of the same tensors (``conv_layer1.*`` .. ``conv_layer5.*``) and
  the unused classifier (``resnet.fc.*``) are dropped;
* decoder keys (``deconv_layer0..5.<i>.weight/bias``) are kept as they are.

Supported encoders: ``resnet`` (ResNet-50), ``densenet`` (DenseNet-161), ``vgg``
(VGG-16). The official PNASNet-5 checkpoint uses the authors' own PNASNet code, whose
layout has no timm counterpart; ``encoder="pnas"`` raises NotImplementedError.

Input preprocessing as in the official test loader: resize to 256 x 256, scale to
[0, 1], normalise with mean 0.5 and std 0.5. The output map is resized to the input size
and min-max normalised to [0, 1].
"""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mining.saliency.base import SaliencyBackend, check_image, normalize_map, register_backend

INPUT_SIZE = 256

# encoder name -> (timm model, official state-dict prefix, encoder channels at strides
# 2, 4, 8, 16, 32, decoder output widths deconv_layer0..4 (None = plain upsampling), last width)
_SPECS = {
    "resnet": ("resnet50", "resnet.", (64, 256, 512, 1024, 2048), (1024, 512, 256, 64, 64), 64),
    "densenet": ("densenet161", "dense.", (96, 192, 384, 1056, 2208), (512, 256, 192, 96, 128), 128),
    "vgg": ("vgg16", "vgg.", (128, 256, 512, 512, 512), (None, 512, 256, 128, 128), 128),
}
_ALIASES = {"resnet50": "resnet", "densenet161": "densenet", "vgg16": "vgg"}


def _canonical(encoder: str) -> str:
    enc = _ALIASES.get(encoder.lower(), encoder.lower())
    if enc in ("pnas", "pnasnet", "mobilenet", "mobilenetv2"):
        raise NotImplementedError(
            f"SimpleNet encoder {encoder!r}: the official checkpoint uses a non-timm implementation "
            f"whose layout is not mapped; supported: {sorted(_SPECS)}"
        )
    if enc not in _SPECS:
        raise ValueError(f"unknown SimpleNet encoder {encoder!r}; supported: {sorted(_SPECS)}")
    return enc


def _materialise(module: nn.Module) -> nn.Module:
    """Allocate a meta-device module on the CPU and give it fresh (random) parameters."""
    module = module.to_empty(device="cpu")
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()  # conv: kaiming-uniform; batch norm: weight 1, bias 0, running stats reset
    return module


def _block(cin: int, cout: int) -> nn.Sequential:
    # index 0 = conv, as in the official layout (deconv_layerN.0.weight)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True),
        nn.ReLU(inplace=True),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    )


class SimpleNet(nn.Module):
    """SimpleNet encoder-decoder.

    Args:
        encoder: ``"resnet"``, ``"densenet"`` or ``"vgg"`` (timm encoders, randomly
            initialised; load weights with :func:`load_official_state_dict`).
    Forward:
        (B, 3, 256, 256) float32 normalised images -> (B, 256, 256) float32 in (0, 1).
    Raises:
        NotImplementedError: ``"pnas"`` / ``"mobilenet"``; ValueError: unknown encoder.
    """

    def __init__(self, encoder: str = "resnet"):
        super().__init__()
        import timm

        self.encoder_name = _canonical(encoder)
        timm_name, _, enc_ch, widths, last = _SPECS[self.encoder_name]
        # built on the meta device, then only the encoder is materialised: the classifier
        # heads (VGG-16's is 120M parameters) are never allocated or initialised
        with torch.device("meta"):
            if self.encoder_name == "resnet":
                enc = timm.create_model(timm_name, pretrained=False, features_only=True)
            else:
                enc = timm.create_model(timm_name, pretrained=False).features
        self.encoder = _materialise(enc)
        c1, c2, c3, c4, c5 = enc_ch
        w0, w1, w2, w3, w4 = widths
        x = c5
        if w0 is not None:
            self.deconv_layer0 = _block(c5, w0)
            x = w0
        self.deconv_layer1 = _block(x + c4, w1)
        self.deconv_layer2 = _block(w1 + c3, w2)
        self.deconv_layer3 = _block(w2 + c2, w3)
        self.deconv_layer4 = _block(w3 + c1, w4)
        self.deconv_layer5 = nn.Sequential(
            nn.Conv2d(w4, last, kernel_size=3, padding=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(last, 1, kernel_size=3, padding=1, bias=True),
            nn.Sigmoid(),
        )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder maps at strides 2, 4, 8, 16, 32 (the official split points)."""
        e = self.encoder
        if self.encoder_name == "resnet":
            return list(e(x))
        if self.encoder_name == "vgg":
            return [e[:7](x)] + self._chain(e, x, (7, 12, 19, 24, len(e)))
        # densenet: conv0, norm0(+relu) | pool0, block1, transition1 w/o pool | ...
        out1 = e.norm0(e.conv0(x))
        t1 = e.transition1
        out2 = t1.conv(t1.norm(e.denseblock1(e.pool0(out1))))
        t2 = e.transition2
        out3 = t2.conv(t2.norm(e.denseblock2(t1.pool(out2))))
        t3 = e.transition3
        out4 = t3.conv(t3.norm(e.denseblock3(t2.pool(out3))))
        out5 = e.denseblock4(t3.pool(out4))
        return [out1, out2, out3, out4, out5]

    @staticmethod
    def _chain(e, x, cuts):
        outs, h = [], e[: cuts[0]](x)
        for a, b in zip(cuts[:-1], cuts[1:]):
            h = e[a:b](h)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1, out2, out3, out4, out5 = self.features(x)
        if hasattr(self, "deconv_layer0"):
            y = self.deconv_layer0(out5)
        else:
            y = F.interpolate(out5, scale_factor=2, mode="bilinear", align_corners=True)
        y = self.deconv_layer1(torch.cat([y, out4], 1))
        y = self.deconv_layer2(torch.cat([y, out3], 1))
        y = self.deconv_layer3(torch.cat([y, out2], 1))
        y = self.deconv_layer4(torch.cat([y, out1], 1))
        return self.deconv_layer5(y).squeeze(1)


def map_official_keys(state_dict: dict, encoder: str) -> dict:
    """Rename an official SimpleNet state dict to this module's layout (see module docstring).

    Args:
        state_dict: official checkpoint (optionally wrapped in ``{"state_dict": ...}`` /
            ``{"model": ...}``, keys optionally prefixed ``module.``).
        encoder: ``"resnet"``, ``"densenet"`` or ``"vgg"``.
    Returns:
        a new dict with keys ``encoder.*`` and ``deconv_layer*.*``.
    """
    enc = _canonical(encoder)
    for wrap in ("state_dict", "model"):
        if wrap in state_dict and isinstance(state_dict[wrap], dict):
            state_dict = state_dict[wrap]
    prefix = _SPECS[enc][1]
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith(prefix):
            rest = k[len(prefix):]
            if enc == "resnet" and rest.startswith("fc."):
                continue  # classifier, unused
            out["encoder." + rest] = v
        elif k.startswith("deconv_layer"):
            out[k] = v
        elif k.startswith("conv_layer"):
            continue  # aliases of encoder tensors in the official module
        else:
            out[k] = v  # unknown: reported by load_state_dict(strict=True)
    return out


def load_official_state_dict(model: SimpleNet, source, strict: bool = True):
    """Load an official SALICON checkpoint (path or dict) into ``model``.

    Args:
        model: a :class:`SimpleNet` with the checkpoint's encoder.
        source: file path (``torch.load``-able state dict) or an in-memory state dict.
        strict: passed to ``load_state_dict`` (missing/unexpected keys raise).
    Returns:
        the ``load_state_dict`` result (missing / unexpected keys).
    Raises:
        FileNotFoundError: no such file; RuntimeError: layout mismatch (strict).
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f"SimpleNet checkpoint not found: {source}")
        source = torch.load(source, map_location="cpu", weights_only=True)
    mapped = map_official_keys(source, model.encoder_name)
    return model.load_state_dict(mapped, strict=strict)


@register_backend("simplenet")
class SimpleNetSaliency(SaliencyBackend):
    """SimpleNet as a saliency backend (needs the official SALICON weights).

    Args:
        weights: path to an official checkpoint (``salicon_resnet.pt`` ...); default: the
            environment variable ``MINING_SIMPLENET_WEIGHTS``. Required unless
            ``allow_random=True`` (tests only: random weights give meaningless maps).
        encoder: ``"resnet"``, ``"densenet"`` or ``"vgg"``; must match the file; default:
            ``MINING_SIMPLENET_ENCODER`` or ``"resnet"``.
        device: torch device; default CUDA when available, else CPU.
        batch_size: images per forward pass in :meth:`predict_batch`.
    Raises:
        ValueError: no weights and not ``allow_random``.
    """

    weight_free = False

    def __init__(self, weights: str | None = None, encoder: str | None = None, device=None,
                 batch_size: int = 16, allow_random: bool = False):
        weights = weights or os.environ.get("MINING_SIMPLENET_WEIGHTS") or None
        encoder = encoder or os.environ.get("MINING_SIMPLENET_ENCODER") or "resnet"
        if weights is None and not allow_random:
            raise ValueError(
                "simplenet needs weights=<path to the official SALICON checkpoint> "
                "(or env MINING_SIMPLENET_WEIGHTS); no weights are downloaded"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = SimpleNet(encoder)
        if weights is not None:
            load_official_state_dict(self.model, weights)
        self.model.eval().to(self.device)
        self.batch_size = int(batch_size)

    @staticmethod
    def preprocess(image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, 256, 256) float32, (x/255 - 0.5) / 0.5."""
        small = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        return ((small.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        for im in images:
            check_image(im)
        out = []
        for s in range(0, len(images), self.batch_size):
            chunk = images[s : s + self.batch_size]
            x = torch.from_numpy(np.stack([self.preprocess(im) for im in chunk])).to(self.device)
            maps = self.model(x).float().cpu().numpy()
            for im, m in zip(chunk, maps):
                h, w = im.shape[:2]
                out.append(normalize_map(cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)))
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_batch([image])[0]

    device_native = True

    @torch.no_grad()
    def predict_tensors(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Saliency maps of device-resident images, all in torch on the model's device (issue 13).

        The :meth:`predict_batch` pipeline as torch ops: each image resized to 256 x 256
        (``F.interpolate`` bilinear, ``align_corners=False``: OpenCV's INTER_LINEAR sample
        positions, rounded to uint8 levels as cv2 does), normalised with mean 0.5 / std 0.5,
        one forward per ``batch_size`` images, every map upsampled to its image's size
        (bilinear, ``align_corners=False``) and min-max normalised (a constant map -> zeros).
        Equal to :meth:`predict_batch` up to interpolation rounding.

        Args:
            images: (3, H_i, W_i) uint8 RGB tensors (views are fine), all on one device.
        Returns:
            one (H_i, W_i) float32 tensor in [0, 1] per image, on the images' device.
        Raises:
            ValueError: an image is not a (3, H, W) uint8 tensor with H, W >= 1.
        """
        from mining.saliency import torch_ops as T

        images = list(images)
        for t in images:
            if not torch.is_tensor(t) or t.dim() != 3 or t.shape[0] != 3 or t.dtype != torch.uint8 or min(t.shape) < 1:
                raise ValueError(f"expected (3, H, W) uint8 tensors, got {tuple(getattr(t, 'shape', ()))}")
        if not images:
            return []
        groups = T.group_by_shape(images)
        x = torch.empty((len(images), 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.float32, device=self.device)
        for idx in groups.values():  # one resize per distinct input shape
            batch = torch.stack([images[i] for i in idx]).to(self.device, torch.float32)
            small = F.interpolate(batch, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            x[torch.tensor(idx, device=self.device)] = (small.round_().clamp_(0, 255) / 255.0 - 0.5) / 0.5
        maps = torch.cat([self.model(x[s:s + self.batch_size]).float() for s in range(0, len(images), self.batch_size)])
        out: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        for (h, w), idx in groups.items():  # one upsampling per distinct output shape
            sel = torch.tensor(idx, device=self.device)
            up = F.interpolate(maps[sel][:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            for i, m in zip(idx, T.normalize_maps(up)):
                out[i] = m.to(images[i].device)
        return out
