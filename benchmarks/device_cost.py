"""FLOPs, bytes and kernel launches of the device mining path, and a labelled H200 projection.

Used by ``benchmarks/throughput.py``; also runnable alone::

    python benchmarks/device_cost.py --data ../shared/data/gtsdb/images --frames 4

Counting (no GPU needed): the device path's torch code runs on CPU under a
``TorchDispatchMode`` that sees every aten op the GPU would run:

* FLOPs of matmuls/convolutions from ``torch.utils.flop_counter`` (2 x multiply-adds);
  FFTs as 5 N log2 N per transform (Cooley-Tukey, complex); every other op (element-wise,
  reductions, gathers, scans) as one FLOP per element of its largest operand;
* bytes = every tensor operand read plus every output written, i.e. the *unfused* DRAM
  traffic, an upper bound (no op fusion, no cache reuse);
* launches = aten ops that produce a tensor (about one CUDA kernel each, unfused).

The projection divides these by H200 figures stated in :data:`H200` (public spec-sheet
peaks times an assumed efficiency) and adds one launch overhead per kernel per batch. It is
a projection, not a measurement: ``benchmarks/gpu_check.sh`` measures the real thing.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

# H200 SXM spec-sheet peaks (dense) and the efficiency assumed for each kind of work.
H200 = {
    "bf16_flops": 989e12,       # tensor-core bf16 dense
    "fp32_flops": 67e12,        # CUDA-core fp32 (non-tensor)
    "hbm_bytes_s": 4.8e12,      # HBM3e bandwidth
    "mfu_vit": 0.45,            # ViT-B/16 bf16 inference at batch >= 256 (typical 40-55 %)
    "eff_elementwise": 0.5,     # share of peak bandwidth / fp32 reached by unfused small ops
    "launch_s": 5e-6,           # per kernel launch (CUDA graphs would cut this)
}

_FFT = {"_fft_c2c", "_fft_r2c", "_fft_c2r"}


class OpCounter(TorchDispatchMode):
    """Counts FLOPs, bytes and launches of every aten op run inside it (see module docstring)."""

    def __init__(self):
        super().__init__()
        self.flops = 0.0
        self.bytes = 0.0
        self.launches = 0
        self.by_op: Counter = Counter()
        self.bytes_by_op: Counter = Counter()
        self.launches_by_op: Counter = Counter()
        self._fc = FlopCounterMode(display=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        if getattr(func, "is_view", False) or name in ("detach", "alias", "lift_fresh"):
            return out  # a view (slice, narrow, permute...): no kernel, no traffic
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        registry = self._fc.flop_registry
        if func.overloadpacket in registry:
            try:
                flops = registry[func.overloadpacket](*args, out_val=out, **kwargs)
            except Exception:  # noqa: BLE001 - signature variants: fall back to element count
                flops = max(t.numel() for t in ins + outs)
        elif name in _FFT:
            x = ins[0]
            dims = args[1] if len(args) > 1 else kwargs.get("dim", list(range(x.dim())))
            n = math.prod(int(x.shape[d]) for d in dims) if dims else 1
            batch = max(x.numel() // max(n, 1), 1)
            flops = 5.0 * n * math.log2(max(n, 2)) * batch
        else:
            flops = max(t.numel() for t in ins + outs)
        self.flops += float(flops)
        self.bytes += float(nbytes)
        self.launches += 1
        self.by_op[name] += float(flops)
        self.bytes_by_op[name] += float(nbytes)
        self.launches_by_op[name] += 1
        return out


def vit_flops_per_patch(model_name: str = "ViT-B-16") -> float:
    """FLOPs of one image-tower forward of an open_clip model (random init), counted by
    ``torch.utils.flop_counter``."""
    import open_clip

    from mining.embed import _register_configs

    _register_configs()
    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_image(torch.zeros(1, 3, size, size))
    counted = float(fc.get_total_flops())
    # the counter misses the fused attention projections of nn.MultiheadAttention's fast path;
    # the analytic count of the same ViT (mining.ranking.flops) is the floor
    v = model.visual
    if hasattr(v, "transformer") and hasattr(v, "conv1"):
        from mining.ranking.flops import vit_block_flops

        width = v.conv1.out_channels
        patch = v.conv1.kernel_size[0]
        tokens = (size // patch) ** 2 + 1
        layers = len(v.transformer.resblocks)
        analytic = layers * vit_block_flops(tokens, width) + 2.0 * (tokens - 1) * 3 * patch * patch * width
        return max(counted, analytic)
    return counted


def project_h200(sel: dict, vit_flops_patch: float, patches_per_frame: float, frames_per_batch: int) -> dict:
    """Projected frames/s and patches/s of one H200 from per-frame counts (a PROJECTION).

    Args:
        sel: per-frame ``flops``, ``bytes`` and ``launches_per_batch`` of decode + saliency +
            selection + crops (the non-model work).
        vit_flops_patch: FLOPs of one image-tower forward.
        patches_per_frame: mean patches per frame.
        frames_per_batch: frames per device batch (launch overhead is paid once per batch).
    Returns:
        dict with seconds per frame per part and the projected rates.
    """
    h = H200
    t_sel = max(sel["flops"] / (h["fp32_flops"] * h["eff_elementwise"]), sel["bytes"] / (h["hbm_bytes_s"] * h["eff_elementwise"]))
    t_launch = sel["launches_per_batch"] * h["launch_s"] / frames_per_batch
    t_vit = vit_flops_patch * patches_per_frame / (h["bf16_flops"] * h["mfu_vit"])
    t = t_sel + t_launch + t_vit
    return {"select_s_per_frame": t_sel, "launch_s_per_frame": t_launch, "vit_s_per_frame": t_vit,
            "frames_per_s": 1.0 / t, "patches_per_s": patches_per_frame / t, "assumptions": dict(h)}
