"""LTRP ranking-model training (Luo et al., CVPR 2024, §3.2-3.3) on Ray Train.

CLI: ``python -m jobs.train_ltrp`` (argument parsing only; everything else is here).

Per step, for a batch of images on each worker:

1. draw a random visible set per image at 90% masking (``mask_ratio``), ``n = int(0.1 L)``;
2. frozen MAE (ViT-B, pixel target, Tab. 1a/1i; official "visualize" checkpoint):
   pseudo score of every visible patch = l1 distance between the reconstructions
   with and without it, removal before the decoder (Eq. 2, Tab. 1g), all removals
   in one batched forward;
3. ranking model (ViT-S/16, ``ranker_arch``) sees the visible tokens only
   (sparse design, Tab. 1h) and is trained with ListMLE (Eq. 3, Tab. 1f).

Checkpoints (every ``checkpoint_every`` epochs and at the end) are Ray Train
checkpoint directories holding ``ltrp.pth`` -- official ``irsLu/ltrp`` layout
(``{"model": {"score_net.*"}}``) plus optimizer/scheduler/epoch/step -- and
``losses.jsonl`` (the loss history). ``resume="auto"`` continues from the newest
checkpoint under ``<storage_path>/<name>``; ``resume=PATH`` from a given one.
Loss logging: one JSON line per ``log_every`` steps on stdout, the
``losses.jsonl`` of each checkpoint, and (local storage) ``<storage_path>/<name>/loss_log.jsonl``.

``tiny_random_init``: CI / smoke-test configuration ONLY -- a random tiny MAE and
ranker (arch ``tiny-test``); the pseudo labels of a random MAE are meaningless.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

CKPT_FILE = "ltrp.pth"
LOSS_FILE = "losses.jsonl"
META_FILE = "meta.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")
RANKER_ARCHS = ("vit_small_patch16_224", "vit_tiny_patch16_224", "tiny-test")


@dataclasses.dataclass
class TrainConfig:
    """What each Ray Train worker needs (the CLI's defaults come from here).

    ``lr`` None: ``blr * global_batch / 256``. ``batch_size`` is per worker. ``list_mle_k`` None:
    full ListMLE (Eq. 3). ``pseudo_chunk``: max removal variants per MAE forward (None: all).
    """

    mae_checkpoint: str | None = None
    mae_arch: str = "mae_vit_base_patch16"
    ranker_arch: str = "vit_small_patch16_224"
    ranker_init: str | None = None
    tiny_random_init: bool = False
    mask_ratio: float = 0.9
    removal_phase: str = "decoder"
    list_mle_k: int | None = None
    img_size: int = 224
    epochs: int = 1
    max_steps_per_epoch: int | None = None
    batch_size: int = 64
    blr: float = 1.5e-4
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    pseudo_chunk: int | None = None
    loader_workers: int = 2
    checkpoint_every: int = 1
    log_every: int = 10
    seed: int = 0
    cpus_per_worker: float = 1.0


# --------------------------------------------------------------------------- data
def list_images(sources: list[str]) -> list[str]:
    """Expand directories / globs / files (local or fsspec URIs) into a sorted list of image URIs.

    Raises:
        FileNotFoundError: nothing matched.
    """
    from mining.fs import get_fs, to_uri

    out: list[str] = []
    for src in sources:
        fs, path = get_fs(src)
        if any(c in path for c in "*?["):
            hits = fs.glob(path)
        elif fs.isdir(path):
            hits = [h for h in fs.find(path)]
        else:
            hits = [path]
        out += [to_uri(fs, h) for h in hits if h.lower().endswith(IMAGE_EXTS)]
    out = sorted(set(out))
    if not out:
        raise FileNotFoundError(f"no images found in {sources}")
    return out


class ImageDataset:
    """Images -> ``(3, S, S)`` float32 ImageNet-normalised tensors (MAE pre-training augmentation:
    RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip)."""

    def __init__(self, uris: list[str], img_size: int, train: bool = True):
        self.uris, self.img_size, self.train = list(uris), int(img_size), train
        self._tf = None

    def __len__(self) -> int:
        return len(self.uris)

    def _transform(self):
        if self._tf is None:
            from torchvision import transforms as T

            from mining.ranking.mae import IMAGENET_MEAN, IMAGENET_STD

            aug = ([T.RandomResizedCrop(self.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip()] if self.train else
                   [T.Resize((self.img_size, self.img_size), interpolation=T.InterpolationMode.BICUBIC)])
            self._tf = T.Compose(aug + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return self._tf

    def __getitem__(self, i: int):
        from PIL import Image

        from mining.fs import get_fs

        fs, path = get_fs(self.uris[i])
        with fs.open(path, "rb") as f:
            im = Image.open(f).convert("RGB")
        return self._transform()(im)


# --------------------------------------------------------------------------- one step
def ltrp_step(ranker, mae, optimizer, imgs, mask_ratio: float = 0.9, phase: str = "decoder",
              top_k: int | None = None, generator=None, ids_keep=None, chunk: int | None = None) -> float:
    """One LTRP training step (§3.2-3.3). Returns the ListMLE loss (float, nats per list).

    Args:
        ranker: :class:`~mining.ranking.ltrp.PatchRanker` (or its DDP wrapper), train mode.
        mae: frozen :class:`~mining.ranking.mae.MaskedAutoencoder`.
        optimizer: over the ranker's parameters; ``None`` = just compute the loss.
        imgs: ``(B, 3, S, S)`` float32 normalised images on the device.
        ids_keep: fixed ``(B, n)`` visible ids (tests); default random at ``mask_ratio``.
    """
    import torch

    from mining.ranking.losses import list_mle
    from mining.ranking.mae import random_visible
    from mining.ranking.pseudo import pseudo_scores

    b = imgs.shape[0]
    n_patches = mae.num_patches
    if ids_keep is None:
        n_keep = max(2, int(n_patches * (1.0 - mask_ratio)))
        ids_keep = random_visible(b, n_patches, n_keep, imgs.device, generator)
    y = pseudo_scores(mae, imgs, ids_keep, phase=phase, chunk=chunk)
    with torch.autocast(device_type=imgs.device.type, dtype=torch.bfloat16, enabled=imgs.device.type == "cuda"):
        s = ranker(imgs, ids_keep)
    loss = list_mle(s.float(), y, top_k=top_k)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- Ray worker
def _load_resume_state(config: dict):
    """Training state to resume from: the newer (larger step) of Ray's own checkpoint of this run
    (worker-group restart, or Ray restoring a run of the same name) and ``config['resume_from']``.

    Returns:
        ``(state dict or None, loss history list, source path or None)``.
    """
    import ray.train
    import torch

    from mining.fs import get_fs

    found = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            found.append((torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=True),
                          _read_lines(os.path.join(d, LOSS_FILE)), ckpt.path))
    src = config.get("resume_from")
    if src:
        path = src if src.endswith(".pth") else os.path.join(src, CKPT_FILE)
        fs, p = get_fs(path)
        with fs.open(p, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        loss_path = os.path.join(os.path.dirname(p), LOSS_FILE)
        losses = []
        if fs.exists(loss_path):
            with fs.open(loss_path, "r") as f:
                losses = [json.loads(line) for line in f if line.strip()]
        found.append((state, losses, src))
    if not found:
        return None, [], None
    return max(found, key=lambda t: int(t[0].get("step", -1)))


def _read_lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: builds models, trains, reports metrics and checkpoints (rank 0 writes them)."""
    import ray.train
    import ray.train.torch
    import torch

    from mining.ranking.ltrp import build_ranker, load_ranker, ranker_checkpoint
    from mining.ranking.mae import build_mae

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # frozen MAE in TF32, ranker in bf16 autocast
        torch.backends.cudnn.allow_tf32 = True

    mae = build_mae(config["mae_arch"], checkpoint=config.get("mae_checkpoint"),
                    random_init=config["tiny_random_init"], img_size=config["img_size"]).to(device)
    if config.get("ranker_init"):
        ranker = load_ranker(config["ranker_init"])
    else:
        ranker = build_ranker(config["ranker_arch"], random_init=True, img_size=config["img_size"])
    if ranker.num_patches != mae.num_patches:
        raise ValueError(f"ranker grid ({ranker.num_patches}) != MAE grid ({mae.num_patches})")
    ranker.train()
    core = ranker
    ranker = ray.train.torch.prepare_model(ranker)  # device + DDP when world > 1

    ds = ImageDataset(config["images"], config["img_size"], train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=config["batch_size"], shuffle=True,
                                         drop_last=len(ds) >= config["batch_size"] * world, num_workers=config["loader_workers"],
                                         persistent_workers=False)
    loader = ray.train.torch.prepare_data_loader(loader)
    steps_per_epoch = len(loader)
    if config.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, int(config["max_steps_per_epoch"]))
    total_steps = max(1, steps_per_epoch * config["epochs"])
    warmup = int(config["warmup_epochs"] * steps_per_epoch)

    lr = config["lr"] or config["blr"] * config["batch_size"] * world / 256.0
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=config["weight_decay"])

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    start_epoch, step = 0, 0
    state, history, resumed_from = _load_resume_state(config)
    if state is not None:
        core.vit.load_state_dict({k[len("score_net."):]: v for k, v in state["model"].items()
                                  if k.startswith("score_net.")})
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        for group, base in zip(opt.param_groups, sched.base_lrs):  # the schedule may have been extended
            group["lr"] = base * lr_lambda(sched.last_epoch)
        if rank == 0:
            print(json.dumps({"event": "resumed", "from": str(resumed_from), "epoch": start_epoch, "step": step}),
                  flush=True)

    log_path = config.get("loss_log")
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    for epoch in range(start_epoch, config["epochs"]):
        gen.manual_seed(config["seed"] * 100003 + epoch * 101 + rank)
        if world > 1 and hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        t0, ep_losses = time.time(), []
        for i, imgs in enumerate(loader):
            if i >= steps_per_epoch:
                break
            imgs = imgs.to(device, non_blocking=True)
            loss = ltrp_step(ranker, mae, opt, imgs, config["mask_ratio"], config["removal_phase"],
                             config.get("list_mle_k"), generator=gen, chunk=config.get("pseudo_chunk"))
            sched.step()
            step += 1
            ep_losses.append(loss)
            rec = {"epoch": epoch, "step": step, "loss": loss, "lr": opt.param_groups[0]["lr"],
                   "images_per_s": round(len(ep_losses) * imgs.shape[0] * world / max(1e-9, time.time() - t0), 2)}
            history.append(rec)
            if rank == 0 and (step % config["log_every"] == 0 or i == 0):
                print(json.dumps(rec), flush=True)
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
        metrics = {"epoch": epoch, "step": step, "loss": float(sum(ep_losses) / max(1, len(ep_losses))),
                   "epoch_s": round(time.time() - t0, 3)}
        last = epoch == config["epochs"] - 1
        if (epoch + 1) % config["checkpoint_every"] == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    torch.save(ranker_checkpoint(core, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                                 epoch=epoch, step=step, args=_plain(config)),
                               os.path.join(tmp, CKPT_FILE))
                    with open(os.path.join(tmp, LOSS_FILE), "w") as f:
                        f.writelines(json.dumps(r) + "\n" for r in history)
                    with open(os.path.join(tmp, META_FILE), "w") as f:
                        json.dump({"epoch": epoch, "step": step, "loss": metrics["loss"]}, f)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, type(None)))}


# --------------------------------------------------------------------------- driver
def find_latest_checkpoint(storage_path: str, name: str) -> str | None:
    """Newest (largest step) checkpoint directory with an ``ltrp.pth`` under ``storage_path/name``."""
    from mining.fs import get_fs, join, to_uri

    fs, root = get_fs(join(storage_path, name))
    if not fs.exists(root):
        return None
    best, best_step = None, -1
    for meta in fs.glob(root + "/checkpoint_*/" + META_FILE):
        with fs.open(meta, "r") as f:
            st = int(json.load(f).get("step", -1))
        d = os.path.dirname(meta)
        if st > best_step and fs.exists(d + "/" + CKPT_FILE):
            best, best_step = to_uri(fs, d), st
    return best


def train_ltrp(data: list[str], cfg: TrainConfig, *, storage_path: str, name: str = "ltrp",
               resume: str | None = "none", num_workers: int = 1, use_gpu: bool | None = None,
               keep_checkpoints: int = 3, max_failures: int = 0, address: str | None = None) -> dict[str, Any]:
    """List the images, connect to Ray and run the Ray Train job.

    Args:
        data: image directories, globs or files (local or s3://).
        cfg: per-worker training settings.
        storage_path: absolute path or s3:// URI; the run lives under ``storage_path/name``.
        resume: ``"auto"`` (newest checkpoint of the run), ``"none"``/``""``/None, or a checkpoint
            directory / ``ltrp.pth`` path.
        use_gpu: None: GPUs when the Ray cluster has any.
        max_failures: worker-group restarts (each resumes from the last checkpoint).
        address: Ray address (see :func:`mining.connect.connect`).
    Returns:
        ``{"checkpoint": path, "metrics": {...}}`` of the final result.
    Raises:
        FileNotFoundError: no images in ``data``.
        SystemExit: ``resume`` is "none" but the run already has checkpoints (never restored silently).
    """
    images = list_images(data)
    from mining.connect import connect

    connect(address, quiet=False)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    resume_from = None
    if resume == "auto":
        resume_from = find_latest_checkpoint(storage_path, name)
    elif resume not in ("none", "", None):
        resume_from = resume
    else:
        existing = find_latest_checkpoint(storage_path, name)
        if existing:  # Ray Train would silently restore it; make the choice explicit
            raise SystemExit(f"run {name!r} under {storage_path} already has checkpoints ({existing}); "
                             "pass --resume auto to continue it, or choose a new --name")
    loss_log = None
    if "://" not in storage_path:
        os.makedirs(os.path.join(storage_path, name), exist_ok=True)
        loss_log = os.path.join(storage_path, name, "loss_log.jsonl")
    config = dataclasses.asdict(cfg)
    config.update(images=images, resume_from=resume_from, loss_log=loss_log)
    print(json.dumps({"event": "start", "images": len(images), "use_gpu": use_gpu, "workers": num_workers,
                      "resume_from": resume_from, "tiny_random_init": cfg.tiny_random_init}), flush=True)
    if cfg.tiny_random_init:
        print("WARNING: --tiny-random-init: random tiny MAE and ranker, for smoke tests only; "
              "the resulting ranker is meaningless", file=sys.stderr, flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    out = {"checkpoint": result.checkpoint.path if result.checkpoint else None,
           "metrics": dict(result.metrics or {})}
    print(json.dumps({"event": "done", **out}, default=str), flush=True)
    return out
