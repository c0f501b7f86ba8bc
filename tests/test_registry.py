"""The one backend registry (mining.registry): no import cycle, lazy entry points, every name creatable."""
import subprocess
import sys

import numpy as np
import pytest

from mining import registry
from mining.registry import available_backends, backend_from_config, get_backend, register_backend

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

# tiny / random-weight construction of the backends that need weights
TINY_KWARGS = {
    "ltrp": {"random_init": True, "arch": "tiny-test", "device": "cpu"},
    "kpp": {"random_init": True, "arch": "tiny-test", "device": "cpu", "ratio": 0.02},
    "simplenet": {"allow_random": True, "encoder": "resnet", "device": "cpu"},
    # a tiny randomly initialised epitome (no file needed)
    "epitome": {"model": "tiny-epitome", "device": "cpu"},
    "sr-bms-epitome": {"model": "tiny-epitome", "device": "cpu"},
}


def _tiny_kwargs(name: str) -> dict:
    kw = dict(TINY_KWARGS.get(name, {}))
    if kw.get("model") == "tiny-epitome":
        from mining.epitome.model import Epitome, EpitomeSpec

        kw["model"] = Epitome(EpitomeSpec(size=8, patch=3, scale=4))
    return kw


def _py(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_saliency_base_does_not_import_ranking_or_torch():
    _py("import sys, mining.saliency.base as b; names = b.available_backends(); "
        "bad = [m for m in ('mining.ranking', 'torch', 'timm') if m in sys.modules]; assert not bad, bad; "
        "assert {'ltrp', 'kpp', 'sr-bms'} <= set(names), names")


def test_ranking_imports_first_in_a_fresh_interpreter():
    _py("import mining.ranking; from mining.ranking import backend_from_args, SELECTORS; "
        "assert SELECTORS == ('ltrp', 'kpp')")


def test_lookup_imports_only_that_backend():
    _py("import sys; from mining.registry import get_backend; b = get_backend('sr-bms'); "
        "bad = [m for m in ('mining.ranking', 'mining.saliency.simplenet', 'torch') if m in sys.modules]; "
        "assert not bad, bad; assert b.name == 'sr-bms'")


def test_builtin_entries_match_the_decorators():
    for name in registry.BUILTIN:
        try:
            cls = registry.backend_class(name)
        except ImportError as e:  # pragma: no cover - torch-free install
            pytest.skip(f"{name}: {e}")
        assert cls.name == name and registry._REGISTERED[name] is cls


@pytest.mark.parametrize("name", sorted(registry.BUILTIN))
def test_every_listed_name_can_be_created(name):
    assert name in available_backends()
    try:
        be = get_backend(name, **_tiny_kwargs(name))
    except ImportError as e:  # pragma: no cover - timm / torch unavailable
        pytest.skip(f"{name} unavailable: {e}")
    assert be.name == name
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    if name != "simplenet":  # SimpleNet's forward on CPU is slow; its own tests cover predict
        m = be.predict(img)
        assert m.shape == (64, 96) and m.dtype == np.float32 and 0.0 <= m.min() and m.max() <= 1.0 + 1e-6


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="sr-bms") as ei:
        get_backend("no-such-backend")
    for name in ("ltrp", "kpp", "spectral-residual"):
        assert name in str(ei.value)
    with pytest.raises(KeyError, match="ltrp"):
        backend_from_config({"selector": "saliency", "saliency": "no-such-backend"})


def test_register_backend_decorator_still_works():
    @register_backend("test-constant")
    class Constant:
        weight_free = True

        def __init__(self, value=0.0):
            self.value = value

    try:
        assert "test-constant" in available_backends()
        be = get_backend("test-constant", value=0.5)
        assert isinstance(be, Constant) and be.value == 0.5 and Constant.name == "test-constant"
        from mining.saliency.base import get_backend as old_get

        assert isinstance(old_get("test-constant"), Constant)
    finally:
        registry._REGISTERED.pop("test-constant", None)


def test_config_maps_to_kwargs_in_one_place():
    from mining.pipeline import MineConfig, make_backend

    cfg = MineConfig(selector="kpp", kpp_ratio=0.02, ranker_random_init=True, device="cpu", mae_checkpoint=None)
    assert registry.backend_kwargs("kpp", cfg) == {"ratio": 0.02, "random_init": True, "device": "cpu"}
    assert registry.backend_kwargs("sr-bms", cfg) == {}
    assert registry.backend_name("saliency", "boolean-map") == "boolean-map"
    assert registry.backend_name("ltrp", "boolean-map") == "ltrp"
    with pytest.raises(ValueError, match="unknown selector"):
        registry.backend_name("nope")
    assert make_backend(MineConfig(selector="saliency", saliency="boolean-map")).name == "boolean-map"
    with pytest.raises(ValueError, match="unknown selector"):
        make_backend(MineConfig(selector="nope"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINING_MAE_ARCH", "tiny-test")  # MineConfig has no arch field: the env fallback
        be = make_backend(cfg)
    assert be.name == "kpp" and be.keep == 4 and be.arch == "tiny-test"
