"""The model library: parameter counts, the skip rules, gradients, dtypes and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

import adaresnet_jax as ar

# (num_classes, trainable parameters with skip="identity", blocks): torchvision's, He et al.'s,
# the seed's Keras model (11,190,730 + 8 skip weights = 11,190,738) and its Keras ResNet50 baseline
# (Keras counts 23,608,202 = 23,555,082 trainable + 53,120 BatchNorm moving statistics).
COUNTS = {
    "paper": (10, 11_190_730, 8),
    "resnet50_keras": (10, 23_555_082, 16),
    "resnet18": (1000, 11_689_512, 8),
    "resnet34": (1000, 21_797_672, 16),
    "resnet50": (1000, 25_557_032, 16),
    "resnet101": (1000, 44_549_160, 33),
    "resnet152": (1000, 60_192_808, 50),
    "resnet18_cifar": (10, 11_173_962, 8),
    "resnet20": (10, 269_722, 9),
    "resnet32": (10, 464_154, 15),
    "resnet44": (10, 658_586, 21),
    "resnet56": (10, 853_018, 27),
    "resnet110": (10, 1_727_962, 54),
}


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(model, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize("skip", ["identity", "learned", "rezero"])
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name, skip):
    num_classes, count, blocks = COUNTS[name]
    model = ar.create_model(name, num_classes=num_classes, skip=skip)
    v = abstract_variables(model, 224 if num_classes == 1000 else 32)
    assert n_params(v["params"]) == count + (0 if skip == "identity" else blocks)
    assert len(ar.skip_weights(v["params"])) == (0 if skip == "identity" else blocks)


def test_paper_matches_the_seed_keras_model():
    model = ar.create_model("paper", num_classes=10)
    v = abstract_variables(model, 32)
    assert n_params(v["batch_stats"]) == 9_728
    flat = traverse_util.flatten_dict(v["params"], sep="/")
    # Keras defaults: every convolution has a bias, one scalar skip weight per block.
    assert all(k.replace("kernel", "bias") in flat for k in flat if k.endswith("kernel"))
    assert all(flat[k].shape == (1,) for k in flat if k.endswith("skip_weight"))


def test_paper_initialises_and_normalises_as_keras():
    """Keras' formulas, written out: glorot_uniform kernels (conv and Dense head) are U(-l, l) with
    l = sqrt(6 / (fan_in + fan_out)); BatchNormalization's moving statistics move by momentum 0.99 from
    (0, 1) towards the batch's mean and (biased) variance, and evaluation divides by sqrt(var + 1e-3)."""
    model = ar.create_model("paper", num_classes=10, num_filters=16)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    v = model.init(jax.random.key(0), x, train=False)
    for kernel in (v["params"]["stage2_block2"]["Conv_1"]["kernel"], v["params"]["head"]["kernel"]):
        k = np.asarray(kernel, np.float64)
        limit = np.sqrt(6 / (np.prod(k.shape[:-2]) * (k.shape[-2] + k.shape[-1])))
        assert 0.95 * limit < np.abs(k).max() <= limit
        assert abs(k.std() / (limit / np.sqrt(3)) - 1) < 0.1, k.std()
    _, new = model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True)
    z = np.asarray(new["intermediates"]["stem_conv"]["__call__"][0], np.float64)  # the stem BN's input
    stats = new["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stats["mean"], 0.01 * z.mean((0, 1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * z.var((0, 1, 2)), rtol=1e-5)
    v2 = {**v, "batch_stats": new["batch_stats"]}
    _, inter = model.apply(v2, x, train=False, mutable=["intermediates"], capture_intermediates=True)
    bn = inter["intermediates"]["stem_bn"]["__call__"][0]
    want = (z - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-3)
    np.testing.assert_allclose(bn, want, rtol=1e-4, atol=1e-5)


def test_per_channel_skip_weights():
    model = ar.create_model("resnet18", num_classes=1000, skip_per_channel=True)
    v = abstract_variables(model, 64)
    ws = ar.skip_weights(v)
    assert [w.shape for w in ws.values()] == [(64,)] * 2 + [(128,)] * 2 + [(256,)] * 2 + [(512,)] * 2
    assert n_params(v["params"]) == 11_689_512 + 2 * (64 + 128 + 256 + 512)


def test_skip_weights_are_named_in_network_order():
    model = ar.create_model("resnet20", num_classes=10)
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    names = list(ar.skip_weights(v["params"]))
    assert names == [f"stage{i}/block{j}" for i in (1, 2, 3) for j in (1, 2, 3)]
    assert all(float(w[0]) == 0.0 for w in ar.skip_weights(v).values())


def test_weighted_skip_computes_d_plus_w_x():
    d, x = jax.random.normal(jax.random.key(1), (2, 2, 3, 4, 5))
    skip = ar.WeightedSkip(weight_init=0.5)
    v = skip.init(jax.random.key(0), d, x)
    assert v["params"]["skip_weight"].shape == (1,)
    np.testing.assert_allclose(skip.apply(v, d, x), d + 0.5 * x, rtol=1e-6)
    w = jnp.arange(5.0)
    per_channel = ar.WeightedSkip(per_channel=True)
    np.testing.assert_allclose(per_channel.apply({"params": {"skip_weight": w}}, d, x), d + w * x, rtol=1e-6)
    normal = ar.WeightedSkip(weight_init="normal").init(jax.random.key(3), d, x)["params"]["skip_weight"]
    assert normal.shape == (1,) and 0.0 < abs(float(normal[0])) < 0.5


def test_resnet50_keras_matches_keras_applications_resnet50():
    model = ar.create_model("resnet50_keras", num_classes=10, skip="identity")
    v = abstract_variables(model, 32)
    assert n_params(v["params"]) == 23_555_082
    assert n_params(v["batch_stats"]) == 53_120
    assert n_params(v["params"]) + n_params(v["batch_stats"]) == 23_608_202  # model.count_params()
    flat = traverse_util.flatten_dict(v["params"], sep="/")
    assert all(k.replace("kernel", "bias") in flat for k in flat if k.endswith("kernel"))
    # ResNet v1: the stride is on the first 1x1 convolution, and every stage opens with a projection.
    assert flat["stage2_block1/Conv_0/kernel"].shape == (1, 1, 256, 128)
    assert all(f"stage{i}_block1/proj_conv/kernel" in flat for i in range(1, 5))
    assert not any("block2/proj" in k for k in flat)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x).shape == (2, 10)


def _init_skip_weights(name: str, **overrides) -> dict[str, float]:
    """Initial skip weights of a narrow copy of a named network (the skip rule does not depend on width)."""
    model = ar.create_model(name, num_classes=10, num_filters=2, **overrides)
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    return {k: float(w[0]) for k, w in ar.skip_weights(v).items()}


def test_paper_skip_weights_all_start_at_exactly_zero():
    """The seed document's AddWithWeight(initializer='zeros'), in both block kinds."""
    ws = _init_skip_weights("paper")
    assert len(ws) == 8 and all(w == 0.0 for w in ws.values()), ws
    assert ar.create_model("paper", num_classes=10).downsample_skip_init is None


def test_paper_random_normal_variant_in_the_downsampling_blocks():
    """The seed's script: AddWithWeight2 (RandomNormal(0.05)) in the downsampling blocks only."""
    ws = _init_skip_weights("paper", downsample_skip_init="normal")
    assert all(ws[f"stage{i}/block2"] == 0.0 for i in range(1, 5))
    assert all(0.0 < abs(ws[f"stage{i}/block1"]) < 0.25 for i in range(1, 5)), ws


@pytest.mark.parametrize("name", ["paper", "resnet18_cifar", "resnet20"])
def test_rezero_starts_at_its_own_init_in_every_block(name):
    for downsample in (None, 0.75, "normal"):
        ws = _init_skip_weights(name, skip="rezero", skip_init=0.25, downsample_skip_init=downsample)
        assert ws and all(w == 0.25 for w in ws.values()), (downsample, ws)


@pytest.mark.parametrize("name,with_shortcut,without", [
    ("paper", [f"stage{i}/block1" for i in range(1, 5)], [f"stage{i}/block2" for i in range(1, 5)]),
    # stage1/block1 of these keeps its shape (stride 1, same width): it has no shortcut.
    ("resnet18_cifar", ["stage2/block1", "stage3/block1", "stage4/block1"], ["stage1/block1", "stage4/block2"]),
    ("resnet20", ["stage2/block1", "stage3/block1"], ["stage1/block1", "stage1/block2", "stage3/block3"]),
])
def test_downsample_skip_init_only_touches_learned_blocks_with_a_shortcut(name, with_shortcut, without):
    ws = _init_skip_weights(name, skip_init=0.25, downsample_skip_init=0.75)
    assert {k for k, w in ws.items() if w == 0.75} == set(with_shortcut)
    assert all(ws[k] == 0.25 for k in without)


def test_skip_module_picks_one_module_per_block():
    def pick(rule, has_shortcut):
        return ar.skip_module(rule, 0.25, downsample_init=0.7, has_shortcut=has_shortcut)
    assert type(pick("identity", True)) is ar.IdentitySkip
    assert type(pick("learned", False)) is ar.LearnedSkip and pick("learned", False).weight_init == 0.25
    assert pick("learned", True).weight_init == 0.7
    assert type(pick("rezero", True)) is ar.ReZeroSkip and pick("rezero", True).weight_init == 0.25


def test_rezero_skip_computes_x_plus_w_branch():
    d, x = jax.random.normal(jax.random.key(1), (2, 2, 3, 4, 5))
    v = ar.ReZeroSkip(weight_init=0.5).init(jax.random.key(0), d, x)
    assert jax.tree.map(jnp.shape, v) == {"params": {"skip_weight": (1,)}}
    np.testing.assert_allclose(ar.ReZeroSkip().apply(v, d, x), x + 0.5 * d, rtol=1e-6)
    assert ar.IdentitySkip().init(jax.random.key(0), d, x) == {}
    np.testing.assert_array_equal(ar.IdentitySkip().apply({}, d, x), d + x)


def _set_skip(params, value: float):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.full_like(p, value) if path[-1].key == "skip_weight" else p, params)


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("paper", {"num_filters": 4}),
                                            ("resnet20", {"stage_sizes": (1, 1, 1)})])
def test_zero_skip_weight_gives_act_of_branch_and_one_gives_identity(name, overrides, image_batch):
    x = jnp.asarray(image_batch[0][:4])
    learned = ar.create_model(name, num_classes=10, **overrides)
    v = learned.init(jax.random.key(0), x, train=False)
    # w = 0: every block outputs relu(F(x)), F the output of the block's last BatchNorm.
    v0 = {**v, "params": _set_skip(v["params"], 0.0)}
    _, inter = learned.apply(v0, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    inter = inter["intermediates"]
    for block in [k for k in inter if k.startswith("stage")]:
        bns = sorted(k for k in inter[block] if k.startswith("BatchNorm"))
        branch = inter[block][bns[-1]]["__call__"][0]
        out = inter[block]["__call__"][0]
        np.testing.assert_array_equal(out, jax.nn.relu(branch))
    # w = 1: the plain ResNet, to the bit, with the same parameters.
    identity = ar.create_model(name, num_classes=10, skip="identity", **overrides)
    v1 = {**v, "params": _set_skip(v["params"], 1.0)}
    no_skip = {k: {m: p for m, p in b.items() if m != "skip"} if k.startswith("stage") else b
               for k, b in v["params"].items()}
    v_id = {**v, "params": no_skip}
    np.testing.assert_array_equal(learned.apply(v1, x, train=False), identity.apply(v_id, x, train=False))


def _loss_fn(model, batch_stats, x, y):
    def loss(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]
    return loss


def _nonzero(tree) -> dict[str, bool]:
    return {k: bool(jnp.any(v != 0)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# Small networks on the real code paths: the seed's stem and Keras settings, a projection CIFAR
# net, and He's zero-padding shortcuts.
SMALL = [("paper", {"num_filters": 8}), ("tiny", {}), ("resnet20", {"stage_sizes": (1, 1, 1)})]


@pytest.mark.parametrize("skip", ["identity", "learned", "rezero"])
@pytest.mark.parametrize("name,overrides", SMALL)
def test_default_configurations_train(name, overrides, skip, image_batch):
    """No dead start: at init every parameter that no zero weight stands in front of gets a
    gradient; after a few steps every parameter has had one; and the loss goes down."""
    x, y = map(jnp.asarray, image_batch)
    model = ar.create_model(name, num_classes=10, skip=skip, **overrides)
    v = model.init(jax.random.key(0), x, train=False)
    params, stats = v["params"], v["batch_stats"]
    grads, _ = jax.grad(_loss_fn(model, stats, x, y), has_aux=True)(params)
    nonzero = _nonzero(grads)
    init_skip = {k: float(w[0]) for k, w in ar.skip_weights(params).items()}
    for path, ok in nonzero.items():
        block = path.split("/")[0]
        zero_here = block.startswith("stage") and init_skip.get(block.replace("_", "/")) == 0.0
        in_branch = "/skip/" not in path and "/proj_" not in path
        # A zero weight stands in front of the branch under ReZero, of the shortcut under AdaResNet.
        behind_zero = zero_here and (in_branch if skip == "rezero" else "/proj_" in path)
        assert ok != behind_zero, f"{path}: non-zero gradient {ok} at init ({skip})"

    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    seen = jax.tree.map(lambda g: g != 0, grads)
    losses = []

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), grads = jax.value_and_grad(_loss_fn(model, stats, x, y), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss, grads

    for _ in range(16):
        params, stats, opt_state, loss, grads = step(params, stats, opt_state)
        seen = jax.tree.map(lambda s, g: s | (g != 0), seen, grads)
        losses.append(float(loss))
    assert all(_nonzero(seen).values()), [k for k, ok in _nonzero(seen).items() if not ok]
    # The loss falls (no margin: any would be one CPU's number; a wrong gradient makes Adam climb).
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name,overrides", SMALL)
def test_bfloat16_compute_with_float32_params(name, overrides, image_batch):
    x = jnp.asarray(image_batch[0][:8])
    f32 = ar.create_model(name, num_classes=10, **overrides)
    bf16 = ar.create_model(name, num_classes=10, dtype=jnp.bfloat16, **overrides)
    v = f32.init(jax.random.key(0), x, train=False)
    v = {**v, "params": _set_skip(v["params"], 0.7)}
    assert jax.tree.leaves(bf16.init(jax.random.key(0), x, train=False)["params"])[0].dtype == jnp.float32
    ref = f32.apply(v, x, train=False)
    out = bf16.apply(v, x, train=False)
    assert out.dtype == jnp.float32 and jnp.isfinite(out).all()
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 5e-2
    logits, _ = bf16.apply(v, x, train=True, mutable=["batch_stats"])
    assert jnp.isfinite(logits).all()


@pytest.mark.parametrize("impl", ["slice_dot", "hybrid"])
@pytest.mark.parametrize("name,overrides", SMALL)
def test_conv_implementations_agree(name, overrides, impl, image_batch):
    x = jnp.asarray(image_batch[0][:4])
    xla = ar.create_model(name, num_classes=10, conv_impl="xla", **overrides)
    sd = ar.create_model(name, num_classes=10, conv_impl=impl, **overrides)
    v = xla.init(jax.random.key(0), x, train=False)
    v = {**v, "params": _set_skip(v["params"], 0.7)}
    np.testing.assert_allclose(sd.apply(v, x, train=False), xla.apply(v, x, train=False), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: ar.create_model("resnet9000", num_classes=10), "unknown model name 'resnet9000'.*paper"),
    (lambda: ar.create_model("paper", num_classes=10, skip="gated"), "unknown skip rule 'gated'.*learned"),
    (lambda: ar.create_model("paper", num_classes=0), "num_classes must be a positive integer, got 0"),
    (lambda: ar.create_model("paper", num_classes=-3), "got -3"),
    (lambda: ar.create_model("paper", num_classes=10, widht=3), r"unknown ResNet field\(s\) \['widht'\]"),
    (lambda: ar.create_model("paper", num_classes=10, conv_impl="fft").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False), "unknown conv_impl 'fft'.*xla, slice_dot"),
    (lambda: ar.create_model("tiny", num_classes=10, conv_impl="auto").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False), "depends on the devices: pass .*conv_impl_for"),
    (lambda: ar.create_model("tiny", num_classes=10).init(jax.random.key(0), jnp.zeros((8, 8, 3)), train=False),
     r"rank 4, got shape \(8, 8, 3\)"),
    (lambda: ar.ResNet(stage_sizes=(1,), skip="gate").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False),
     "unknown skip rule 'gate'"),
    (lambda: ar.WeightedSkip(weight_init="uniform").init(jax.random.key(0), jnp.zeros(3), jnp.zeros(3)),
     "unknown skip_init 'uniform'"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("train", [None, 1, "no"])
def test_train_must_be_passed_as_a_bool(train):
    """Forgetting ``train`` (or passing a non-bool) is one line saying what to pass, not Flax's
    ModifyScopeVariableError from deep inside BatchNorm."""
    model = ar.create_model("tiny", num_classes=10)
    x = jnp.zeros((1, 8, 8, 3))
    kw = {} if train is None else {"train": train}
    with pytest.raises(TypeError, match=r"pass train=True \(training, with mutable=\['batch_stats'\]\) or train=False"):
        model.init(jax.random.key(0), x, **kw)
    v = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(TypeError, match="pass train=True"):
        model.apply(v, x, **kw)
    with pytest.raises(TypeError):  # keyword-only
        model.apply(v, x, False)


class _TwoBackbones(nn.Module):
    """ResNets nested inside a larger module (skip_weights keys them by their path)."""

    def setup(self):
        self.backbone = ar.create_model("tiny", num_classes=10, skip_init=0.5)
        self.aux = ar.create_model("tiny", num_classes=10, skip="rezero", skip_init=0.25)
        self.probe = nn.Dense(3)

    def __call__(self, x, *, train: bool):
        a = self.backbone(x, train=train, features=True)["pooled"]
        return self.probe(jnp.concatenate([a, self.aux(x, train=train)], -1))


def test_skip_weights_of_nested_resnets_are_keyed_by_their_path():
    v = _TwoBackbones().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    ws = {k: float(w[0]) for k, w in ar.skip_weights(v).items()}
    assert ws == {"aux/stage1/block1": 0.25, "aux/stage2/block1": 0.25,
                  "backbone/stage1/block1": 0.5, "backbone/stage2/block1": 0.5}
    assert ar.skip_weights(v["params"]).keys() == ws.keys()
    assert all(isinstance(w, jax.Array) for w in ar.skip_weights(v).values())


@pytest.mark.parametrize("name,size,shapes", [
    ("resnet20", 16, {"stem": (16, 16, 4), "stage1": (16, 16, 4), "stage2": (8, 8, 8), "stage3": (4, 4, 16)}),
    ("resnet50", 64, {"stem": (16, 16, 4), "stage1": (16, 16, 16), "stage2": (8, 8, 32), "stage3": (4, 4, 64),
                      "stage4": (2, 2, 128)}),
])
def test_features_shapes(name, size, shapes):
    model = ar.create_model(name, num_classes=10, num_filters=4)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    f = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, features=True), v, x)
    assert {k: a.shape[1:] for k, a in f.items()} == {**shapes, "pooled": (list(shapes.values())[-1][-1],)}


def test_pooled_features_feed_the_head(image_batch):
    """Backbone use: the pooled features are the mean of the last stage's output, the head (a Dense layer
    with the model's head parameters) maps them to the logits, and a backbone initialised with
    features=True has no head."""
    x = jnp.asarray(image_batch[0][:4])
    model = ar.create_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1), num_filters=4)
    v = model.init(jax.random.key(0), x, train=False)
    f = model.apply(v, x, train=False, features=True)
    np.testing.assert_allclose(f["pooled"], f["stage3"].mean(axis=(1, 2)), rtol=1e-6)
    head = nn.Dense(10).apply({"params": v["params"]["head"]}, f["pooled"])
    np.testing.assert_allclose(head, model.apply(v, x, train=False), rtol=1e-6, atol=1e-6)
    (f_train, upd) = model.apply(v, x, train=True, features=True, mutable=["batch_stats"])
    assert set(upd["batch_stats"]) == set(v["batch_stats"]) and f_train["pooled"].shape == (4, 16)
    backbone = model.init(jax.random.key(0), x, train=False, features=True)
    assert "head" not in backbone["params"] and set(backbone["params"]) == set(v["params"]) - {"head"}
