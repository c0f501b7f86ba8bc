"""Saliency backends: the interface contract, the weight-free models, SimpleNet's key mapping."""
import numpy as np
import pytest

from mining.saliency import available_backends, get_backend
from mining.saliency.base import normalize_map

WEIGHT_FREE = ["spectral-residual", "fine-grained", "spectral-residual-ms", "colour-contrast", "boolean-map"]


def _scene(h=120, w=200):
    """Grey textured background with one red square (the salient object) at x 130-160, y 40-70."""
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 110, np.uint8) + rng.integers(0, 12, (h, w, 3), dtype=np.uint8)
    img[40:70, 130:160] = (220, 30, 30)
    return img


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_backend_contract(name):
    be = get_backend(name)
    assert be.weight_free and be.name == name
    img = _scene()
    m = be.predict(img)
    assert m.shape == (120, 200) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    maps = be.predict_batch([img, img[:50, :70].copy()])
    assert [mm.shape for mm in maps] == [(120, 200), (50, 70)]
    tiny = be.predict(np.zeros((3, 5, 3), np.uint8))
    assert tiny.shape == (3, 5)
    with pytest.raises(ValueError):
        be.predict(np.zeros((10, 10), np.uint8))


@pytest.mark.parametrize("name", ["spectral-residual-ms", "colour-contrast", "boolean-map"])
def test_new_backends_find_the_object(name):
    m = get_backend(name).predict(_scene())
    inside = m[40:70, 130:160].mean()
    outside = np.concatenate([m[:, :100].ravel(), m[90:, :].ravel()]).mean()
    assert inside > 2 * outside


def test_boolean_map_suppresses_regions_touching_the_border():
    img = np.full((100, 100, 3), 128, np.uint8)
    img[40:60, 40:60] = 250  # surrounded
    img[0:20, 0:100] = 250  # same colour, touches the border
    m = get_backend("boolean-map", blur_frac=0.0).predict(img)
    assert m[45:55, 45:55].mean() > 0.5
    assert m[2:15, 20:80].mean() < 0.1


def test_normalize_map():
    np.testing.assert_allclose(normalize_map(np.array([[1.0, 3.0]])), [[0.0, 1.0]])
    assert normalize_map(np.ones((2, 2))).max() == 0.0


def test_unknown_backend_lists_names():
    with pytest.raises(KeyError, match="spectral-residual"):
        get_backend("nope")
    assert set(WEIGHT_FREE) <= set(available_backends())


# --------------------------------------------------------------------------- SimpleNet
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")
nn = torch.nn


def _dec(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.UpsamplingBilinear2d(scale_factor=2))


class OfficialResNetLayout(nn.Module):
    """Re-statement of the official ResNet SimpleNet module LAYOUT (names, aliases, shapes) and
    forward, built from torchvision, to produce a checkpoint in the official format."""

    def __init__(self):
        super().__init__()
        self.resnet = torchvision.models.resnet50(weights=None)
        r = self.resnet
        self.conv_layer1 = nn.Sequential(r.conv1, r.bn1, r.relu)  # aliases: duplicate keys
        self.conv_layer2 = nn.Sequential(r.maxpool, r.layer1)
        self.conv_layer3, self.conv_layer4, self.conv_layer5 = r.layer2, r.layer3, r.layer4
        self.deconv_layer0 = _dec(2048, 1024)
        self.deconv_layer1 = _dec(2048, 512)
        self.deconv_layer2 = _dec(1024, 256)
        self.deconv_layer3 = _dec(512, 64)
        self.deconv_layer4 = _dec(128, 64)
        self.deconv_layer5 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 1, 3, padding=1),
                                           nn.Sigmoid())

    def forward(self, x):
        o1 = self.conv_layer1(x)
        o2 = self.conv_layer2(o1)
        o3 = self.conv_layer3(o2)
        o4 = self.conv_layer4(o3)
        o5 = self.conv_layer5(o4)
        y = self.deconv_layer1(torch.cat([self.deconv_layer0(o5), o4], 1))
        y = self.deconv_layer2(torch.cat([y, o3], 1))
        y = self.deconv_layer3(torch.cat([y, o2], 1))
        y = self.deconv_layer4(torch.cat([y, o1], 1))
        return self.deconv_layer5(y).squeeze(1)


def _randomise_bn(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_simplenet_loads_official_resnet_layout_and_matches_its_forward(tmp_path, monkeypatch):
    from mining.saliency.simplenet import SimpleNetSaliency

    torch.manual_seed(0)
    ref = OfficialResNetLayout().eval()
    _randomise_bn(ref, 1)
    sd = {"module." + k: v for k, v in ref.state_dict().items()}  # nn.DataParallel prefix
    assert "module.conv_layer1.0.weight" in sd and "module.resnet.fc.weight" in sd
    path = tmp_path / "salicon_resnet.pt"
    torch.save(sd, path)

    be = SimpleNetSaliency(weights=str(path), encoder="resnet", device="cpu")
    mine = be.model.state_dict()
    for k in ("encoder.conv1.weight", "encoder.layer4.2.bn3.running_var", "deconv_layer5.2.bias"):
        src = "module." + k.replace("encoder.", "resnet.")
        torch.testing.assert_close(mine[k], sd[src])
    x = torch.randn(1, 3, 64, 64)  # fully convolutional: a small input keeps the test fast
    with torch.no_grad():
        torch.testing.assert_close(be.model(x), ref(x), rtol=1e-4, atol=1e-5)
    import mining.saliency.simplenet as sn

    monkeypatch.setattr(sn, "INPUT_SIZE", 64)
    img = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    m = be.predict(img)
    assert m.shape == (90, 160) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1


@pytest.mark.parametrize("encoder", ["vgg", "densenet"])
def test_simplenet_official_layout_other_encoders(encoder):
    from mining.saliency.simplenet import SimpleNet, load_official_state_dict

    with torch.device("meta"):  # official torchvision layout, shapes only (fast)
        feats = (torchvision.models.vgg16 if encoder == "vgg" else torchvision.models.densenet161)(weights=None).features
    if encoder == "vgg":
        prefix = "vgg."
        dec = {0: None, 1: (1024, 512), 2: (1024, 256), 3: (512, 128), 4: (256, 128)}
        last = 128
    else:
        prefix = "dense."
        dec = {0: (2208, 512), 1: (512 + 1056, 256), 2: (256 + 384, 192), 3: (192 + 192, 96), 4: (96 + 96, 128)}
        last = 128
    sd = {"module." + prefix + k: (torch.randn(v.shape) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
          for k, v in feats.state_dict().items()}
    sd["module.conv_layer1.0.weight"] = sd["module." + prefix + "0.weight" if encoder == "vgg" else
                                           "module." + prefix + "conv0.weight"]  # an alias
    for i, io in dec.items():
        if io:
            sd[f"module.deconv_layer{i}.0.weight"] = torch.randn(io[1], io[0], 3, 3)
            sd[f"module.deconv_layer{i}.0.bias"] = torch.randn(io[1])
    sd["module.deconv_layer5.0.weight"] = torch.randn(last, last, 3, 3)
    sd["module.deconv_layer5.0.bias"] = torch.randn(last)
    sd["module.deconv_layer5.2.weight"] = torch.randn(1, last, 3, 3)
    sd["module.deconv_layer5.2.bias"] = torch.randn(1)
    model = SimpleNet(encoder)
    res = load_official_state_dict(model, sd)  # strict: every key mapped, every shape equal
    assert not res.missing_keys and not res.unexpected_keys
    first = "encoder.0.weight" if encoder == "vgg" else "encoder.conv0.weight"
    torch.testing.assert_close(model.state_dict()[first], sd["module.conv_layer1.0.weight"])


def test_simplenet_errors(tmp_path, monkeypatch):
    from mining.saliency.simplenet import SimpleNet, SimpleNetSaliency, load_official_state_dict

    monkeypatch.delenv("MINING_SIMPLENET_WEIGHTS", raising=False)
    with pytest.raises(ValueError):
        SimpleNetSaliency()  # no weights
    with pytest.raises(NotImplementedError):
        SimpleNet("pnas")
    with pytest.raises(FileNotFoundError):
        load_official_state_dict(SimpleNet("resnet"), str(tmp_path / "missing.pt"))
    monkeypatch.setenv("MINING_SIMPLENET_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError):  # the env var is honoured
        SimpleNetSaliency(device="cpu")
    with pytest.raises(RuntimeError):  # wrong layout is refused (strict)
        load_official_state_dict(SimpleNet("resnet"), {"module.resnet.conv1.weight": torch.zeros(1)})
