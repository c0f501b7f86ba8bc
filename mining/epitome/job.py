"""Epitome training on a fleet's shards as a Ray Train job (issue 14 item 2; paper §3 at scale).

CLI: ``python -m jobs.train_epitome --input SHARDS --out MODEL_DIR`` (argument parsing only;
everything else is here). :func:`train_epitome` is also what ``jobs.nightly --refresh-epitome``
calls.

**Data** (:mod:`mining.epitome.stream`). Each Ray Train worker reads its own, disjoint part of the
input's shards (round robin by rank over the sorted list of :func:`mining.shards.list_shards`:
image directories, WebDataset tars, Parquet, local or ``s3://``), decodes each frame
(:func:`mining.decode.decode_image`), converts it to the working resolution
(:meth:`Epitome.to_working`) and keeps it, as uint8, in a **reservoir** of at most ``max_frames`` frames (Algorithm R: after t frames each one is in the
reservoir with probability max_frames / t, a uniform sample of the stream so far). Training
starts once the reservoir is full (or the worker's shards are exhausted); before each step
``frames_per_step`` more frames stream in, and the step's K x K patches are drawn from the
reservoir with :func:`mining.epitome.fit.sample_patches`. Once every shard is read, training
goes on with the reservoir as it is.

**Memory bound** per worker: ``max_frames * 3 * ceil(H/scale) * ceil(W/scale)`` bytes, e.g.
256 * 3 * 100 * 170 = 13 MB for 1360 x 800 frames at the default scale 8, plus one native frame
being decoded and one float copy of the batch; checkpoints hold the reservoir too (same size).
Quantising working-resolution pixels to uint8 changes them by at most 1/510, far below the
epitome's smallest standard deviation (sqrt(min_var) = 0.03).

**Data parallel.** Every worker starts from rank 0's initialisation (broadcast), gradients are
averaged with one all-reduce per step (the epitome has no ``forward`` for DDP to hook into; gloo,
on CPU and GPU alike: the payload is 3 grids of N x N, 12 KB per step at N = 32), and
the location-promotion counters add the posteriors of *every* worker's batch (all-reduced
before :meth:`LocationPromotion.update`), so all workers hold the same parameters and block the
same windows.

**Checkpoints and resume.** Every ``checkpoint_every`` steps and at the end each worker adds
``worker-<rank>.pt`` (:meth:`EpitomeTrainer.state_dict`, the reservoir, the stream position, the
reservoir RNG) to one Ray Train checkpoint under ``<out>/_train/<run>``. The run name is a hash of
everything that fixes the trajectory except ``steps`` (spec, training settings, reservoir
settings, workers, input shards): rerunning with the same ``--out`` and settings continues from
the newest checkpoint (more ``--steps`` trains further), other settings start a new run beside
it. On one worker, S steps stopped at S/2 and resumed give the parameters of an uninterrupted run.

**Output.** :func:`publish_model` writes ``<out>/epitome-<YYYYmmddTHHMMSSZ>.pt``
(:func:`mining.epitome.model.save_epitome`) and then replaces ``<out>/LATEST`` (its file name)
atomically; ``--out`` may be local or ``s3://``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import torch

from mining.epitome.fit import EpitomeTrainer, TrainConfig, sample_patches
from mining.epitome.model import Epitome, EpitomeSpec, load_epitome, save_epitome
from mining.epitome.stream import FrameStream, Reservoir, to_working_u8

LATEST = "LATEST"
TRAIN_DIR = "_train"
META_FILE = "meta.json"
DEFAULT_MAX_FRAMES = 256
DEFAULT_CHECKPOINT_EVERY = 50


# --------------------------------------------------------------------------- model directory
def publish_model(model: Epitome, model_dir: str, meta: dict) -> str:
    """Write a new model version into ``model_dir`` and point ``LATEST`` at it.

    Args:
        model: the trained epitome.
        model_dir: local directory (created) or ``s3://`` prefix.
        meta: JSON-able provenance stored in the file (frames seen, steps, shards, ...).
    Returns:
        the URI of the new ``epitome-<YYYYmmddTHHMMSSZ>.pt`` (a ``-<n>`` suffix when that second
        already has a version).
    """
    from mining.fs import get_fs, join, to_uri

    fs, d = get_fs(model_dir)
    fs.makedirs(d, exist_ok=True)
    ts = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = f"epitome-{ts}.pt", 1
    while fs.exists(f"{d}/{name}"):
        name, n = f"epitome-{ts}-{n}.pt", n + 1
    path = to_uri(fs, f"{d}/{name}")
    save_epitome(model, path, {**meta, "created": ts})
    if "://" in model_dir:
        fs.pipe_file(f"{d}/{LATEST}", (name + "\n").encode())  # one PUT: atomic
    else:
        tmp = os.path.join(d, f".{LATEST}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, join(d, LATEST))
    return path


def latest_model(model_dir: str) -> str | None:
    """The model file ``<model_dir>/LATEST`` names, or None (no LATEST, or it names a missing file)."""
    from mining.fs import get_fs, to_uri

    fs, d = get_fs(model_dir)
    try:
        name = fs.cat_file(f"{d}/{LATEST}").decode().strip()
    except (FileNotFoundError, OSError):
        return None
    if not name or not fs.exists(f"{d}/{name}"):
        return None
    return to_uri(fs, f"{d}/{name}")


# --------------------------------------------------------------------------- the worker
class _AllReduceTrainer(EpitomeTrainer):
    """:class:`EpitomeTrainer` whose gradients and promotion posteriors are all-reduced (world > 1)."""

    def __init__(self, model: Epitome, cfg: TrainConfig, world: int):
        super().__init__(model, cfg)
        self.world = world

    def sync_grads(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            grads = [p.grad for p in self.model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def sync_posterior(self, posterior: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return posterior
        import torch.distributed as dist

        total = posterior.sum(0, keepdim=True)
        dist.all_reduce(total)
        return total


def _mean_over_workers(x: float, world: int) -> float:
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def run_worker(config: dict, *, rank: int = 0, world: int = 1, state: dict | None = None, device=None,
               report: Callable[[dict, dict | None], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """One worker's training loop, independent of Ray (the Ray Train loop wraps it).

    Args:
        config: :func:`job_config` output (``spec``, ``train``, ``shards``, ``max_frames``, ...).
        rank, world: this worker and the number of workers (world > 1 needs torch.distributed).
        state: this worker's checkpoint (``worker-<rank>.pt`` content) to resume from, or None.
        device: torch device (default cpu).
        report: ``report(metrics, worker_state | None)`` at every checkpoint step and at the end.
    Returns:
        the final worker state (``{"trainer", "reservoir", "position", "errors", "train_s", ...}``).
    Raises:
        ValueError: this worker's shards hold no frame at least K x K at the working resolution.
    """
    from mining.shards import ShardRef

    dev = torch.device(device or "cpu")
    spec = EpitomeSpec(**config["spec"])
    tcfg = TrainConfig(**{**config["train"], "seed": config["train"]["seed"] + rank})
    model = Epitome(spec).to(dev)
    trainer = _AllReduceTrainer(model, tcfg, world)
    res = Reservoir(config["max_frames"], seed=10_007 + config["train"]["seed"] * 31 + rank)
    refs = [ShardRef(**r) for r in config["shards"]][rank::world]
    stream = FrameStream(refs, max_pixels=config.get("max_pixels"))
    train_s, started = 0.0, time.perf_counter()
    if state is not None and "reservoir" in state:
        trainer.load_state_dict(state["trainer"])
        res.load_state_dict(state["reservoir"], dev)
        stream.position, stream.errors = tuple(state["position"]), int(state["errors"])
        train_s = float(state.get("train_s", 0.0))
    frames = iter(stream)
    if state is None or "reservoir" not in state:
        while len(res.frames) < res.capacity and (im := next(frames, None)) is not None:
            res.add(to_working_u8(model, im, dev))
        if not res.frames:
            raise ValueError(f"worker {rank}: no decodable frame in its {len(refs)} shard(s)")
        if state is not None:  # resumed with another number of workers: rank 0's model, fresh streams
            trainer.load_state_dict({**state["trainer"], "gen": trainer.gen.get_state()})
        elif config.get("init"):
            init, _ = load_epitome(config["init"])
            model.load_state_dict(init.state_dict())
        else:
            trainer.init_from([f.float() / 255 for f in res.frames])
        if world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for p in model.parameters():
                    dist.broadcast(p.data, 0)

    def worker_state() -> dict:
        return {"trainer": trainer.state_dict(), "reservoir": res.state_dict(), "position": list(stream.position),
                "errors": stream.errors, "train_s": train_s + time.perf_counter() - started,
                "spec": dataclasses.asdict(spec), "rank": rank, "world": world}

    def metrics() -> dict:
        recent = trainer.history[-20:]
        nll = _mean_over_workers(sum(recent) / max(1, len(recent)), world)
        return {"step": trainer.step_no, "nll": nll, "frames_seen": res.seen, "resets": trainer.promotion.resets,
                "train_s": round(train_s + time.perf_counter() - started, 3)}

    steps, every, per_step = int(config["train"]["steps"]), int(config["checkpoint_every"]), config["frames_per_step"]
    reported_at = None
    while trainer.step_no < steps:
        for _ in range(per_step):
            im = next(frames, None)
            if im is None:
                break
            res.add(to_working_u8(model, im, dev))
        patches = sample_patches(res.frames, spec.patch, tcfg.batch, trainer.gen).float().div_(255)
        trainer.step(patches)
        if trainer.step_no % every == 0 or trainer.step_no == steps:
            m = metrics()
            if rank == 0:
                log(f"epitome step {m['step']}/{steps}: nll {m['nll']:.2f} nats/patch, {m['frames_seen']} frames "
                    f"seen (worker 0), {m['resets']} promotion resets, {m['train_s']:.1f} s")
            if report is not None:
                report(m, worker_state())
            reported_at = trainer.step_no
    final = worker_state()
    if report is not None and reported_at != trainer.step_no:  # nothing trained this session: report the state
        report(metrics(), final)
    return final


def _read_worker_state(directory: str, rank: int, world: int) -> dict | None:
    """This worker's state in a checkpoint directory; with another number of workers than the
    checkpoint's, rank 0's trainer state only (the model continues, the streams start over)."""
    own = os.path.join(directory, f"worker-{rank}.pt")
    if os.path.exists(own):
        d = torch.load(own, map_location="cpu", weights_only=True)
        if int(d.get("world", 1)) == world:
            return d
    first = os.path.join(directory, "worker-0.pt")
    if os.path.exists(first):
        return {"trainer": torch.load(first, map_location="cpu", weights_only=True)["trainer"]}
    return None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: :func:`run_worker` with Ray's device, ranks, checkpoints and resume."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():  # a GPU resource without a usable GPU
        device = torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    candidates = []
    ckpt = ray.train.get_checkpoint()
    for src in ([ckpt.path] if ckpt is not None else []) + ([config["resume_from"]] if config.get("resume_from") else []):
        from ray.train import Checkpoint

        with Checkpoint(src).as_directory() as d:
            st = _read_worker_state(d, rank, world)
        if st is not None:
            candidates.append(st)
    state = max(candidates, key=lambda s: s["trainer"]["step"]) if candidates else None
    if state is not None and rank == 0:
        print(f"epitome: resuming at step {state['trainer']['step']}", flush=True)

    def report(metrics: dict, wstate: dict | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(wstate, os.path.join(tmp, f"worker-{rank}.pt"))
            if rank == 0:
                with open(os.path.join(tmp, META_FILE), "w") as f:
                    json.dump({"step": metrics["step"], "world": world}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    run_worker(config, rank=rank, world=world, state=state, device=device, report=report,
               log=lambda s: print(s, flush=True))


# --------------------------------------------------------------------------- driver
def job_config(shards: Sequence, spec: EpitomeSpec, cfg: TrainConfig, *, max_frames: int = DEFAULT_MAX_FRAMES,
               frames_per_step: int = 1, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, workers: int = 1,
               init: str | None = None, max_pixels: int | None = None, cpus_per_worker: float = 1.0) -> dict:
    """The plain-dict configuration every worker gets (also the input of :func:`run_name`)."""
    return {"spec": dataclasses.asdict(spec), "train": dataclasses.asdict(cfg),
            "shards": [dataclasses.asdict(r) for r in shards], "max_frames": int(max_frames),
            "frames_per_step": int(frames_per_step), "checkpoint_every": int(checkpoint_every),
            "workers": int(workers), "init": init, "max_pixels": max_pixels, "cpus_per_worker": cpus_per_worker}


def run_name(config: dict) -> str:
    """``train-<12 hex>``: a hash of what fixes the training trajectory (not ``steps``, not logging)."""
    key = {k: v for k, v in config.items() if k not in ("checkpoint_every", "cpus_per_worker", "resume_from")}
    key["train"] = {k: v for k, v in config["train"].items() if k != "steps"}
    return "train-" + hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


def find_latest_checkpoint(run_dir: str) -> str | None:
    """Newest (largest step) checkpoint directory with a ``worker-0.pt`` under ``run_dir``, or None."""
    from mining.fs import get_fs, to_uri

    fs, root = get_fs(run_dir)
    best, best_step = None, -1
    for meta in fs.glob(root + "/checkpoint_*/" + META_FILE) if fs.exists(root) else []:
        with fs.open(meta, "r") as f:
            st = int(json.load(f).get("step", -1))
        d = os.path.dirname(meta)
        if st > best_step and fs.exists(d + "/worker-0.pt"):
            best, best_step = to_uri(fs, d), st
    return best


def _checked(input_spec: str, out: str, spec: EpitomeSpec | None, cfg: TrainConfig, *, workers, max_frames,
             frames_per_step, checkpoint_every, init, images_per_dir_shard):
    """Settings, input and output checks before Ray starts; returns (shards, spec)."""
    from mining.errors import SettingsError
    from mining.validate import check_output, check_positive, list_input

    check_positive(workers=workers, max_frames=max_frames, frames_per_step=frames_per_step,
                   checkpoint_every=checkpoint_every, batch=cfg.batch, steps=cfg.steps)
    if init:
        try:
            init_model, _ = load_epitome(init)
        except (FileNotFoundError, ValueError) as e:
            raise SettingsError(f"--init: {e}") from None
        if spec is not None and spec != init_model.spec:
            raise SettingsError(f"--init {init!r} has {init_model.spec}, not the requested {spec}")
        spec = init_model.spec
    spec = spec or EpitomeSpec()
    try:
        check_output(out)
    except SettingsError as e:
        raise SettingsError(str(e).replace("--output", "--out")) from None
    shards = list_input(input_spec, images_per_dir_shard)
    if workers > len(shards):
        raise SettingsError(f"--workers {workers} > {len(shards)} shard(s) in --input: each worker needs its own "
                            "shards (lower --workers or --images-per-shard)")
    return shards, spec


def train_epitome(input_spec: str, out: str, spec: EpitomeSpec | None = None, cfg: TrainConfig | None = None, *,
                  workers: int = 1, max_frames: int = DEFAULT_MAX_FRAMES, frames_per_step: int = 1,
                  checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, init: str | None = None,
                  use_gpu: bool | None = None, cpus_per_worker: float = 1.0, images_per_dir_shard: int = 64,
                  max_failures: int = 0, address: str | None = None, extra_meta: dict | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or continue training) an epitome on shards with Ray Train and publish it in ``out``.

    Args:
        input_spec: shards (see :func:`mining.shards.list_shards`; local or ``s3://``).
        out: model directory (local or ``s3://``); checkpoints go to ``<out>/_train/<run>``.
        spec: epitome shape (None: ``init``'s, else :class:`EpitomeSpec` defaults).
        cfg: training settings (:class:`TrainConfig`; ``steps`` is the total over resumes).
        workers: Ray Train workers (data parallel, each on its own shards).
        max_frames: reservoir bound per worker (frames at the working resolution).
        frames_per_step: frames streamed into the reservoir before each step.
        checkpoint_every: steps between checkpoints.
        init: start from this model file instead of a crop of the data (the nightly refresh).
        use_gpu: None: GPUs when the Ray cluster has any.
        address: Ray address (:func:`mining.connect.connect`).
        extra_meta: added to the model file's meta (e.g. the nightly refresh's night and input).
    Returns:
        ``{"model", "steps", "frames_seen", "final_nll", "train_s", "run", "checkpoint", "resumed_from"}``.
    Raises:
        mining.errors.SettingsError: bad numbers, ``--init``, ``--out`` or ``--input`` (before Ray starts).
    """
    from mining.fs import join

    cfg = cfg or TrainConfig()
    shards, spec = _checked(input_spec, out, spec, cfg, workers=workers, max_frames=max_frames,
                            frames_per_step=frames_per_step, checkpoint_every=checkpoint_every, init=init,
                            images_per_dir_shard=images_per_dir_shard)
    from mining.connect import connect

    connect(address)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    config = job_config(shards, spec, cfg, max_frames=max_frames, frames_per_step=frames_per_step,
                        checkpoint_every=checkpoint_every, workers=workers, init=init, cpus_per_worker=cpus_per_worker)
    name = run_name(config)
    storage = join(out, TRAIN_DIR) if "://" in out else os.path.abspath(os.path.join(out, TRAIN_DIR))
    config["resume_from"] = find_latest_checkpoint(join(storage, name))
    log(f"epitome: training {spec} for {cfg.steps} steps on {len(shards)} shard(s), {workers} worker(s)"
        f"{' (GPU)' if use_gpu else ''}; run {name}" +
        (f", resuming from {config['resume_from']}" if config["resume_from"] else ""))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        states = [torch.load(os.path.join(d, f), map_location="cpu", weights_only=True)
                  for f in sorted(os.listdir(d)) if f.startswith("worker-")]
    st = states[0]["trainer"]
    model = Epitome(EpitomeSpec(**st["model"]["spec"]))
    model.load_state_dict(st["model"]["state_dict"])
    hist = st.get("history", [])[-20:]
    meta = {"steps": int(st["step"]), "frames_seen": sum(int(s["reservoir"]["seen"]) for s in states),
            "frame_errors": sum(int(s["errors"]) for s in states), "num_shards": len(shards),
            "shards": [r.uri for r in shards[:1000]], "spec": dataclasses.asdict(model.spec),
            "train": dataclasses.asdict(cfg), "workers": workers, "max_frames": max_frames,
            "train_s": round(max(float(s["train_s"]) for s in states), 3),
            "final_nll": float((result.metrics or {}).get("nll", sum(hist) / max(1, len(hist)))), "run": name,
            "init": init, **(extra_meta or {})}
    path = publish_model(model.eval(), out, meta)
    log(f"epitome: {meta['steps']} steps on {meta['frames_seen']} frames ({meta['train_s']:.1f} s training, "
        f"final nll {meta['final_nll']:.2f} nats/patch) -> {path} (LATEST updated)")
    return {"model": path, "steps": meta["steps"], "frames_seen": meta["frames_seen"], "final_nll": meta["final_nll"],
            "train_s": meta["train_s"], "run": name, "checkpoint": result.checkpoint.path,
            "resumed_from": config["resume_from"]}
