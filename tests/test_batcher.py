"""Issue 13: batched crops, column-built rows, the writer thread, batched decode (CPU runs of the device code)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mining.batcher import PatchBatcher, PatchRows, PatchWriter, crop_boxes
from mining.decode import DecodeError, decode_image
from mining.embed import TEST_MODEL, ClipEmbedder, ClipSpec
from mining.frames import decode_batch, exif_orient, probe_jpeg
from mining.selection import Selection
from mining.stages import StageTimer
from mining.store import (ShardOutput, make_image_id, make_patch_id, patch_block_table, patch_columns)
from tests.conftest import gtsdb_images

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def embedder():
    return ClipEmbedder(ClipSpec(TEST_MODEL, None, random_init=True))


def _boxes(rng, h, w, n, sizes=(79, 158, 317, 224, 50)):
    out = []
    for _ in range(n):
        s = min(int(rng.choice(sizes)), h, w)
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append([x, y, x + s, y + s])
    return np.array(out, dtype=np.int32).reshape(-1, 4)


def _frames(rng):
    shapes = [(400, 680), (400, 680), (300, 200)]
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    boxes = [_boxes(rng, h, w, 12) for h, w in shapes]
    boxes[2] = np.vstack([boxes[2], [[0, 0, 200, 300]]])  # a whole-frame, non-square box
    return frames, boxes


@pytest.mark.parametrize("layout", ["hwc-view", "chw-contiguous"])
def test_batched_crops_equal_per_frame_crops(embedder, layout):
    rng = np.random.default_rng(0)
    frames, boxes = _frames(rng)
    ts = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]  # the CPU path's frames: HWC views
    if layout == "chw-contiguous":  # nvJPEG's output layout
        ts = [t.contiguous() for t in ts]
    got = crop_boxes(ts, boxes, embedder.image_size)
    ref = torch.cat([embedder.crops_from_image(t, b) for t, b in zip(ts, boxes)])
    assert got.shape == ref.shape == (sum(len(b) for b in boxes), 3, 224, 224)
    assert float((got - ref).abs().max()) == 0.0
    za, zb = embedder.embed_pixels(got), embedder.embed_pixels(ref)
    assert float(1 - (za * zb).sum(1).min()) < 0.01


def test_crop_boxes_refuses_boxes_outside_their_frame():
    f = torch.zeros((3, 100, 200), dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        crop_boxes([f], [np.array([[150, 0, 250, 100]])], 32)
    with pytest.raises(ValueError, match="empty"):
        crop_boxes([f], [np.array([[10, 10, 10, 20]])], 32)
    assert crop_boxes([f], [np.zeros((0, 4))], 32).shape == (0, 3, 32, 32)


def test_column_rows_equal_dict_rows():
    rng = np.random.default_rng(1)
    uris = ["s3://b/n/a.tar#f0.jpg", "s3://b/n/a.tar#f1.jpg"]
    boxes = [_boxes(rng, 400, 680, 5), _boxes(rng, 400, 680, 3)]
    levels = [rng.integers(1, 3, len(b)) for b in boxes]
    scores = [rng.random(len(b)).astype(np.float32) for b in boxes]
    emb = rng.normal(size=(8, 16)).astype(np.float16)
    legacy = ShardOutput(shard="s3://b/n/a.tar", date="2026-11-20", run_id="r", model="m", dim=16)
    for f, u in enumerate(uris):
        iid = make_image_id(u)
        for b, lv, sc in zip(boxes[f].tolist(), levels[f].tolist(), scores[f].tolist()):
            legacy.patches.append(dict(patch_id=make_patch_id(iid, b, lv), image_id=iid, image_uri=u, shard=legacy.shard,
                                       date=legacy.date, x0=b[0], y0=b[1], x1=b[2], y1=b[3], level=lv, score=sc,
                                       model="m", run_id="r"))
    legacy.embeddings.append(emb)
    rows = PatchRows.from_selections(uris, [Selection(b, lv, sc) for b, lv, sc in zip(boxes, levels, scores)])
    blocks = ShardOutput(shard=legacy.shard, date=legacy.date, run_id="r", model="m", dim=16)
    head, tail = rows.take(slice(0, 6)), rows.take(slice(6, None))  # a block boundary inside frame 1
    assert tail.image_uris == [uris[1]]
    for part, e in ((head, emb[:6]), (tail, emb[6:])):
        blocks.add_patch_block(patch_columns(part.image_uris, part.frame, part.boxes, part.levels, part.scores), e)
    assert blocks.num_patches == 8
    assert blocks.patch_table().equals(legacy.patch_table())
    with pytest.raises(ValueError, match="embeddings of shape"):
        patch_block_table(patch_columns(uris, rows.frame, rows.boxes, rows.levels, rows.scores), emb[:3],
                          shard="s", date="d", model="m", run_id="r", dim=16)


def _run_batcher(embedder, threaded, frames, boxes, batch_size):
    out = ShardOutput(shard="/s", date="2026-11-20", run_id="r", model=embedder.model_id, dim=embedder.dim)
    timer = StageTimer()
    writer = PatchWriter(out, timer, threaded=threaded)
    b = PatchBatcher(embedder, batch_size, writer, timer)
    ts = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    for i, (t, bx) in enumerate(zip(ts, boxes)):  # one frame per add: remainders carried across flushes
        b.add([t], [f"/s/{i}.jpg"], [Selection(bx, np.full(len(bx), 2, np.int8), np.linspace(0, 1, len(bx)))])
    b.flush()
    writer.close()
    return out


def test_writer_thread_equals_synchronous_flush(embedder):
    rng = np.random.default_rng(2)
    frames, boxes = _frames(rng)
    a = _run_batcher(embedder, True, frames, boxes, batch_size=7)
    s = _run_batcher(embedder, False, frames, boxes, batch_size=7)
    ta, ts = a.patch_table(), s.patch_table()
    assert ta.num_rows == sum(len(b) for b in boxes) and len(a.blocks) > 2
    assert ta.equals(ts)
    # and equal to embedding today's per-frame crops in one go
    from mining.store import embeddings_from_arrow

    ref = np.concatenate([embedder.embed_pixels(embedder.crops_from_image(torch.from_numpy(f).permute(2, 0, 1), b))
                          for f, b in zip(frames, boxes)])
    iid = [make_image_id(f"/s/{i}.jpg") for i in range(len(frames))]
    order = {make_patch_id(iid[i], bx, 2): (i, j) for i, b in enumerate(boxes) for j, bx in enumerate(b.tolist())}
    offs = np.cumsum([0] + [len(b) for b in boxes])
    want = np.stack([ref[offs[order[p][0]] + order[p][1]] for p in ta["patch_id"].to_pylist()])
    got = embeddings_from_arrow(ta["embedding"])
    assert float(1 - (got * want).sum(1).min()) < 0.01


def test_writer_errors_surface_on_close():
    out = ShardOutput(shard="/s", date="d", run_id="r", model="m", dim=4)
    w = PatchWriter(out, StageTimer(), threaded=True)
    rows = PatchRows(["/s/a.jpg"], np.zeros(2, np.int32), np.zeros((2, 4), np.int32), np.ones(2, np.int8), np.zeros(2, np.float32))
    w.put(torch.zeros((3, 4), dtype=torch.float16), None, rows)  # 3 embeddings for 2 rows
    with pytest.raises(ValueError, match="embeddings of shape"):
        w.close()


# --------------------------------------------------------------------------- decode

def _exif_jpeg(orientation: int) -> bytes:
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    ex = Image.Exif()
    ex[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=ex.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orient_on_tensors_matches_pillow(orientation):
    data = _exif_jpeg(orientation)
    stored = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = exif_orient(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)
    assert probe_jpeg(data)[2] == orientation


def test_decode_batch_matches_pillow_and_reports_errors():
    names = ["odd/exif_rot90.jpg", "odd/cmyk.jpg", "odd/gray8.png", "broken/truncated.jpg", "broken/zero_bytes.jpg",
             "broken/not_an_image.jpg", "broken/bomb.png"]
    datas = [p.read_bytes() for p in gtsdb_images(2)] + [(FIX / n).read_bytes() for n in names]
    calls = []

    def jpeg_decoder(tensors, device):  # torchvision's libjpeg path on CPU, counting the batched calls
        from torchvision.io import ImageReadMode, decode_jpeg

        calls.append(len(tensors))
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)

    got = decode_batch(datas, "cpu", jpeg_decoder=jpeg_decoder)
    assert calls == [3]  # the two GTSDB frames and exif_rot90 in ONE call; cmyk and the rest via Pillow
    for d, g in zip(datas, got):
        try:
            want = decode_image(d)
        except DecodeError as e:
            assert isinstance(g, DecodeError) and g.reason.split(":")[0] == e.reason.split(":")[0]
            continue
        assert g.shape == (3, *want.shape[:2]) and g.dtype == torch.uint8
        assert np.abs(g.permute(1, 2, 0).numpy().astype(int) - want).mean() < 1.0
    assert tuple(got[2].shape) == (3, 320, 200)  # EXIF applied: upright portrait


def test_decode_batch_survives_a_rejected_batch():
    datas = [p.read_bytes() for p in gtsdb_images(2)]

    def picky(tensors, device):  # rejects any batch holding the second frame, like nvJPEG on one odd file
        from torchvision.io import decode_jpeg

        if any(t.numel() == len(datas[1]) for t in tensors):
            raise RuntimeError("nvjpeg: unsupported")
        return decode_jpeg(tensors, device=device)

    got = decode_batch(datas, "cpu", jpeg_decoder=picky)
    for d, g in zip(datas, got):
        assert np.array_equal(g.permute(1, 2, 0).numpy(), decode_image(d))


# --------------------------------------------------------------------------- on a GPU (skipped without one)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG, streams, pinned copies)")


@cuda
def test_cuda_batched_crops_and_flush_match_cpu():
    rng = np.random.default_rng(3)
    frames, boxes = _frames(rng)
    host = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    dev = [t.cuda().contiguous() for t in host]
    ref = crop_boxes(host, boxes, 224)
    got = crop_boxes(dev, boxes, 224)
    assert got.is_cuda and float((got.cpu() - ref).abs().max()) < 0.05  # same op, other kernel
    e_cpu = ClipEmbedder(ClipSpec(TEST_MODEL, None, random_init=True), device="cpu")
    e_gpu = ClipEmbedder(ClipSpec(TEST_MODEL, None, random_init=True), device="cuda")
    a, b = _run_batcher(e_cpu, True, frames, boxes, 7), _run_batcher(e_gpu, True, frames, boxes, 7)
    ta, tb = a.patch_table(), b.patch_table()
    assert ta.drop_columns(["embedding", "model"]).equals(tb.drop_columns(["embedding", "model"]))
    from mining.store import embeddings_from_arrow

    za, zb = embeddings_from_arrow(ta["embedding"]), embeddings_from_arrow(tb["embedding"])
    assert float(1 - (za * zb).sum(1).min()) < 0.01  # bf16 autocast on the GPU


@cuda
def test_cuda_decode_batch_with_nvjpeg():
    names = ["odd/exif_rot90.jpg", "odd/cmyk.jpg", "odd/gray8.png", "broken/truncated.jpg", "broken/bomb.png"]
    datas = [p.read_bytes() for p in gtsdb_images(3)] + [(FIX / n).read_bytes() for n in names]
    got = decode_batch(datas, "cuda")
    for d, g in zip(datas, got):
        try:
            want = decode_image(d)
        except DecodeError as e:
            assert isinstance(g, DecodeError) and g.reason.split(":")[0] == e.reason.split(":")[0]
            continue
        assert g.is_cuda and g.shape == (3, *want.shape[:2]) and g.dtype == torch.uint8
        assert np.abs(g.permute(1, 2, 0).cpu().numpy().astype(int) - want).mean() < 3.0  # nvJPEG's IDCT differs a little
    assert tuple(got[3].shape) == (3, 320, 200)
