"""torchvision ResNet weights -> our variables (adaresnet_jax.torch_weights), without torch.

The state dicts are made here from a written-out copy of torchvision's naming
(torchvision/models/resnet.py: ``conv1``, ``bn1``, ``layer{i}.{j}.conv{k}``/``bn{k}``,
``layer{i}.{j}.downsample.0``/``.1`` where a block changes shape, ``fc``), with random values, and the
converted model is checked against a float64 numpy forward pass in torch's layout (NCHW, OIHW). The
opt-in test at the end compares with torchvision itself through ``TORCH_PYTHON``.
"""

import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import adaresnet_jax as ar
from adaresnet_jax import torch_weights
from adaresnet_jax.torch_weights import from_torchvision

# torchvision's ResNets: blocks per stage, bottleneck blocks (expansion 4) or basic ones (expansion 1).
TORCHVISION = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False),
               "resnet50": ((3, 4, 6, 3), True), "resnet101": ((3, 4, 23, 3), True), "resnet152": ((3, 8, 36, 3), True)}
WIDTH = 8  # torchvision's is 64; the names are the same and every shape scales with it


def torchvision_state_dict(name: str, *, width: int = WIDTH, num_classes: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Names and shapes of ``torchvision.models.<name>(num_classes=...).state_dict()`` at first-stage width
    ``width``, written out from torchvision's ResNet code, with random float32 values."""
    layers, bottleneck = TORCHVISION[name]
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(key, out, inp, k):
        sd[f"{key}.weight"] = rng.normal(0, np.sqrt(2 / (inp * k * k)), (out, inp, k, k)).astype(np.float32)

    def bn(key, c):
        sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{key}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{key}.num_batches_tracked"] = np.array(17, np.int64)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    expansion = 4 if bottleneck else 1
    inplanes = width
    for i, blocks in enumerate(layers):
        planes, stride = width * 2**i, 1 if i == 0 else 2
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1); bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3); bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1); bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3); bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3); bn(f"{p}.bn2", planes)
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1); bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = rng.normal(0, 1 / np.sqrt(inplanes), (num_classes, inplanes)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return sd


# ------------------------------------------------- a float64 numpy ResNet in torch's layout (NCHW, OIHW)

def _conv(x, w, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    patches = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # N C Ho Wo k k
    return np.einsum("nchwij,ocij->nohw", patches, w.astype(np.float64))


def _bn(x, sd, key):
    c = lambda v: sd[f"{key}.{v}"].astype(np.float64)[None, :, None, None]
    return (x - c("running_mean")) / np.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")


def reference_logits(sd: dict[str, np.ndarray], name: str, x_nchw: np.ndarray) -> np.ndarray:
    """torchvision's eval-mode forward pass, in float64 numpy."""
    layers, bottleneck = TORCHVISION[name]
    relu = lambda v: np.maximum(v, 0)
    x = relu(_bn(_conv(x_nchw.astype(np.float64), sd["conv1.weight"], 2, 3), sd, "bn1"))
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)  # MaxPool2d(3, 2, padding=1)
    x = sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-2, -1))
    for i, blocks in enumerate(layers):
        for j in range(blocks):
            p, s = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
            if bottleneck:
                y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"))
                y = relu(_bn(_conv(y, sd[f"{p}.conv2.weight"], s, 1), sd, f"{p}.bn2"))
                y = _bn(_conv(y, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
            else:
                y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], s, 1), sd, f"{p}.bn1"))
                y = _bn(_conv(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(_conv(x, sd[f"{p}.downsample.0.weight"], s, 0), sd, f"{p}.downsample.1")
            x = relu(y + x)
    return x.mean(axis=(2, 3)) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]


def _input(seed: int = 1, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)  # NCHW, as torch's


def _logits(model, variables, x_nchw):
    return np.asarray(model.apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), train=False))


def _max_rel(a, b):
    """Largest difference relative to the largest reference logit (the logits' scale)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_converted_resnet_computes_torchvisions_forward_pass(name):
    sd = torchvision_state_dict(name)
    model = ar.create_model(name, num_classes=5, num_filters=WIDTH, skip="identity")
    variables = from_torchvision(sd, model=model)
    assert set(variables) == {"params", "batch_stats"}
    x = _input()
    want = reference_logits(sd, name, x)
    assert np.max(np.abs(want)) > 0.1  # a non-trivial output
    assert _max_rel(_logits(model, variables, x), want) < 1e-4


def test_every_torchvision_name_is_used_once():
    """Every array of the state dict lands in exactly one variable, transposed: the count of values matches and
    the stem kernel is conv1's OIHW -> HWIO, the head fc's (out, in) -> (in, out)."""
    sd = torchvision_state_dict("resnet50")
    v = from_torchvision(sd, model=ar.create_model("resnet50", num_classes=5, num_filters=WIDTH, skip="identity"))
    n_ours = sum(a.size for a in jax.tree.leaves(v))
    assert n_ours == sum(a.size for k, a in sd.items() if not k.endswith("num_batches_tracked"))
    np.testing.assert_array_equal(v["params"]["stem_conv"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["head"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(v["batch_stats"]["stage4_block1"]["proj_bn"]["var"], sd["layer4.0.downsample.1.running_var"])
    np.testing.assert_array_equal(v["params"]["stage3_block2"]["BatchNorm_2"]["scale"], sd["layer3.1.bn3.weight"])


@pytest.mark.parametrize("skip", ["learned", "rezero"])
def test_adaresnet_from_a_resnet_with_skip_init_one_is_that_resnet(skip):
    """skip_init=1.0: act(F(x) + 1 * x) (ReZero: x + 1 * F(x)) is the pretrained ResNet; skip_init=0 is not."""
    sd, x = torchvision_state_dict("resnet18"), _input()
    resnet = ar.create_model("resnet18", num_classes=5, num_filters=WIDTH, skip="identity")
    want = _logits(resnet, from_torchvision(sd, model=resnet), x)
    ada = ar.create_model("resnet18", num_classes=5, num_filters=WIDTH, skip=skip, skip_init=1.0)
    v = from_torchvision(sd, model=ada)
    assert {float(w[0]) for w in ar.skip_weights(v).values()} == {1.0} and len(ar.skip_weights(v)) == 8
    np.testing.assert_allclose(_logits(ada, v, x), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    zero = ar.create_model("resnet18", num_classes=5, num_filters=WIDTH, skip=skip, skip_init=0.0)
    assert _max_rel(_logits(zero, from_torchvision(sd, model=zero), x), want) > 1e-2


def test_a_new_head_is_the_models_own_initialisation():
    """head='new': fc is ignored (any class count), the head is what model.init gives with the same rng."""
    sd = torchvision_state_dict("resnet18", num_classes=1000)
    model = ar.create_model("resnet18", num_classes=3, num_filters=WIDTH)
    rng = jax.random.key(7)
    v = from_torchvision(sd, model=model, head="new", rng=rng)
    head = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)["params"]["head"])
    for leaf in ("kernel", "bias"):  # the same random bits (jitted in both; eager would only add rounding)
        np.testing.assert_allclose(v["params"]["head"][leaf], head(rng)[leaf], rtol=1e-6, atol=1e-7)
    assert v["params"]["head"]["kernel"].shape == (8 * WIDTH, 3)
    assert not np.allclose(head(jax.random.key(8))["kernel"], v["params"]["head"]["kernel"])
    np.testing.assert_array_equal(v["params"]["stage1_block2"]["Conv_1"]["kernel"],
                                  sd["layer1.1.conv2.weight"].transpose(2, 3, 1, 0))
    shapes = jax.eval_shape(lambda: model.init(rng, jnp.zeros((1, 32, 32, 3)), train=False))
    assert jax.tree.structure(v) == jax.tree.structure(shapes)


class _FakeTensor:
    """What the converter may rely on in a torch tensor: ``.detach().cpu().numpy()``."""

    def __init__(self, a):
        self.a = a

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def test_torch_like_tensors_and_numpy_convert_without_torch(monkeypatch):
    """Tensors are recognised by duck typing; the module imports and converts with `import torch` failing."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.delitem(sys.modules, "adaresnet_jax.torch_weights")
    fresh = importlib.import_module("adaresnet_jax.torch_weights")
    sd = torchvision_state_dict("resnet18")
    model = ar.create_model("resnet18", num_classes=5, num_filters=WIDTH, skip="identity")
    from_numpy = fresh.from_torchvision(sd, model=model)
    from_tensors = fresh.from_torchvision({k: _FakeTensor(a) for k, a in sd.items()}, model=model)
    jax.tree.map(np.testing.assert_array_equal, from_numpy, from_tensors)


def _error(sd, model, **kw) -> str:
    with pytest.raises(ValueError) as e:
        from_torchvision(sd, model=model, **kw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize("change,expected", [
    (lambda sd: _without(sd, "layer2.0.downsample.1.running_var"), "missing layer2.0.downsample.1.running_var"),
    (lambda sd: {**sd, "layer1.0.extra.weight": np.zeros(3)}, "unexpected layer1.0.extra.weight"),
    (lambda sd: {**sd, "layer1.1.conv2.weight": sd["layer1.1.conv2.weight"][:, :4]},
     "layer1.1.conv2.weight: state_dict (8, 4, 3, 3), model expects (8, 8, 3, 3)"),
    (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "strip the 'module.' prefix"),
])
def test_mismatches_are_refused_in_one_line(change, expected):
    model = ar.create_model("resnet18", num_classes=5, num_filters=WIDTH)
    assert expected in _error(change(torchvision_state_dict("resnet18")), model)


@pytest.mark.parametrize("theirs,ours,expected", [
    ("resnet34", "resnet18", "the state_dict has layer1.2.* but the model expects 2 blocks in stage 1"),
    ("resnet18", "resnet34", "the state_dict has no layer1.2.* but the model expects 3 blocks in stage 1"),
    ("resnet101", "resnet50", "the state_dict has layer3.6.* but the model expects 6 blocks in stage 3"),
    ("resnet50", "resnet34", "the state_dict has Bottlenecks, the model BasicBlocks"),
])
def test_another_depth_is_refused_naming_the_checkpoints_network(theirs, ours, expected):
    msg = _error(torchvision_state_dict(theirs, width=4), ar.create_model(ours, num_classes=5, num_filters=4))
    assert expected in msg and f"pass create_model({theirs!r}, ...)" in msg


def test_other_widths_and_class_counts_are_refused():
    sd = torchvision_state_dict("resnet18")
    msg = _error(sd, ar.create_model("resnet18", num_classes=5, num_filters=4))
    assert "conv1.weight: state_dict (8, 3, 7, 7), model expects (4, 3, 7, 7)" in msg and "num_filters" in msg
    msg = _error(sd, ar.create_model("resnet18", num_classes=7, num_filters=WIDTH))
    assert "fc.weight: state_dict (5, 64)" in msg and "head='new'" in msg
    msg = _error(sd, ar.create_model("resnet18", num_classes=5, num_filters=WIDTH), input_channels=1)
    assert "conv1.weight: state_dict (8, 3, 7, 7), model expects (8, 1, 7, 7)" in msg and "conv1 takes 3 input channels, the images have 1" in msg
    assert "rng" in _error(sd, ar.create_model("resnet18", num_classes=7, num_filters=WIDTH), head="new")
    assert "'keep'" in _error(sd, ar.create_model("resnet18", num_classes=5, num_filters=WIDTH), head="fresh")


@pytest.mark.parametrize("name,overrides,expected", [
    ("resnet50_keras", {}, "stride_in_1x1=True"),
    ("resnet18_cifar", {}, "stem='cifar'"),
    ("resnet18", {"padding": "same"}, "padding='same'"),
    ("resnet18", {"bn_epsilon": 1e-3}, "bn_epsilon=0.001"),
])
def test_layouts_that_compute_differently_are_refused(name, overrides, expected):
    sd = torchvision_state_dict("resnet18")
    assert expected in _error(sd, ar.create_model(name, num_classes=5, num_filters=WIDTH, **overrides))


def test_the_layouts_are_torchvisions():
    """Every torchvision name is convertible: the written-out state dicts of all five networks are exactly
    what their models need (names and shapes both ways), at a reduced width."""
    for name in TORCHVISION:
        sd = torchvision_state_dict(name, width=2)
        v = from_torchvision(sd, model=ar.create_model(name, num_classes=5, num_filters=2, skip="identity"))
        assert sum(a.size for a in jax.tree.leaves(v)) == sum(a.size for k, a in sd.items() if "num_batches" not in k)
    assert torch_weights.TORCHVISION_NAMES == tuple(TORCHVISION)


# --------------------------------------------------------------------- opt-in: against torchvision itself

TORCH_PYTHON = os.environ.get("TORCH_PYTHON")  # an interpreter with torch and torchvision; else skipped

_TORCH_SCRIPT = """
import sys, numpy as np, torch, torchvision
name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = getattr(torchvision.models, name)(weights=None).eval()
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for m in model.modules():  # BatchNorm starts at 1, 0, 0, 1: random values so that every field is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g); m.bias.normal_(0, 0.1, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g); m.running_var.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    logits = model(x)
sd = {f"sd/{k}": v.numpy() for k, v in model.state_dict().items()}
np.savez(out, x=x.numpy(), logits=logits.numpy(), **sd)
print(torch.__version__, torchvision.__version__)
"""


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_PYTHON, reason="set TORCH_PYTHON to an interpreter with torch and torchvision")
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_against_torchvision(tmp_path, name):
    """torchvision's eval-mode logits (random weights, random BatchNorm statistics, 2x3x64x64 input) equal ours
    after conversion to 1e-4 of the largest logit, as a ResNet and as an AdaResNet with skip_init=1.0."""
    out = tmp_path / "tv.npz"
    proc = subprocess.run([TORCH_PYTHON, "-c", _TORCH_SCRIPT, name, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = np.load(out)
    sd = {k.removeprefix("sd/"): data[k] for k in data.files if k.startswith("sd/")}
    for skip, init in (("identity", 0.0), ("learned", 1.0)):
        model = ar.create_model(name, num_classes=1000, skip=skip, skip_init=init)
        err = _max_rel(_logits(model, from_torchvision(sd, model=model), data["x"]), data["logits"])
        print(f"{name} torch/torchvision {proc.stdout.strip()} skip={skip} skip_init={init}: max |diff| / max |logit| = {err:.2e}")
        assert err < 1e-4


# ------------------------------------------------------------------------------ train.py --init-from

def test_train_py_starts_from_a_torchvision_state_dict_with_a_new_head(tmp_path, capsys):
    """--init-from: the run starts from the converted weights (lr 1e-9 leaves them in place), with its own head
    for the data's 3 classes and skip weights from --skip-init; a wrong file or network is one line, exit 2."""
    from helpers import final_params

    from adaresnet_jax import train as T

    sd = torchvision_state_dict("resnet18", width=4, num_classes=1000)
    np.savez(tmp_path / "r18.npz", **sd)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.integers(0, 256, (32, 16, 16, 3), np.uint8), y_train=np.arange(32) % 3,
             x_test=rng.integers(0, 256, (16, 16, 16, 3), np.uint8), y_test=np.arange(16) % 3)
    flags = ["--model", "resnet18", "--width", "4", "--skip", "learned", "--skip-init", "1", "--dataset", "npz",
             "--data-dir", str(tmp_path / "data.npz"), "--epochs", "1", "--batch-size", "16", "--val-split", "0",
             "--lr", "1e-9", "--momentum", "0", "--quiet"]
    assert T.main([*flags, "--init-from", str(tmp_path / "r18.npz"), "--workdir", str(tmp_path / "run")]) == 0
    _, params = final_params(tmp_path / "run")
    np.testing.assert_allclose(params["stem_conv"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0), atol=1e-6)
    np.testing.assert_allclose(params["stage4_block2"]["Conv_1"]["kernel"],
                               sd["layer4.1.conv2.weight"].transpose(2, 3, 1, 0), atol=1e-6)
    assert params["head"]["kernel"].shape == (32, 3)
    assert set(json.loads((tmp_path / "run" / "skip_weights_init.json").read_text()).values()) == {1.0}

    capsys.readouterr()
    for i, (bad, expected) in enumerate(((["--init-from", str(tmp_path / "r18.pth")], "expected an .npz"),
                          (["--init-from", str(tmp_path / "none.npz")], "No such file"),
                          (["--init-from", str(tmp_path / "r18.npz"), "--model", "resnet34"], "create_model('resnet18'"))):
        assert T.main([*flags, *bad, "--workdir", str(tmp_path / f"bad{i}")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
