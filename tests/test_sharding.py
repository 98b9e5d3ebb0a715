"""On 8 fake CPU devices, sharded forward passes equal the single-device one, and each
parameter is sharded exactly as the rules table says."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding
from rlhf_jax.models import ModelConfig, Transformer

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, tie_embeddings=False)


def _make():
    return Transformer(CFG, rngs=nnx.Rngs(0), heads=("lm", "value"))


def _forward(model, ids, mask, mesh):
    graphdef, state = nnx.split(model)
    batch = sharding.batch_sharding(mesh)

    @jax.jit
    def fwd(state, ids, mask):
        m = nnx.merge(graphdef, state)
        h, _ = m.hidden(ids, mask)
        return m.logits(h), m.values(h)

    ids, mask = jax.device_put(ids, batch), jax.device_put(mask, batch)
    return [np.asarray(x) for x in fwd(state, ids, mask)]


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, :5] = 0  # left padding on every other row
    return ids, mask


@pytest.fixture(scope="module")
def reference(batch):
    assert len(jax.devices()) == 8, "tests/conftest.py should have set 8 fake CPU devices"
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    return _forward(sharding.create_sharded(_make, mesh), *batch, mesh)


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=4, tensor=2), dict(data=8, fsdp=1, tensor=1),
                                   dict(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_single_device(shape, batch, reference):
    mesh = sharding.make_mesh(**shape)
    model = sharding.create_sharded(_make, mesh)
    for got, want in zip(_forward(model, *batch, mesh), reference):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_parameters_sharded_as_rules_say():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model = sharding.create_sharded(_make, mesh)
    expected = {
        ("embed",): P("tensor", "fsdp"),
        ("layers", 0, "attn", "q", "kernel"): P("fsdp", "tensor"),
        ("layers", 0, "attn", "k", "kernel"): P("fsdp", "tensor"),
        ("layers", 0, "attn", "o", "kernel"): P("tensor", "fsdp"),
        ("layers", 1, "mlp", "gate", "kernel"): P("fsdp", "tensor"),
        ("layers", 1, "mlp", "down", "kernel"): P("tensor", "fsdp"),
        ("layers", 1, "attn_norm", "scale"): P(None),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
        ("value_head", "kernel"): P("fsdp", None),
    }
    _, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        axes = var.get_metadata()["logical_axes"]
        rules = dict(sharding.DEFAULT_RULES)
        want = P(*[rules[a] for a in axes])
        assert var.get_value().sharding.spec == want, path
    for path, spec in expected.items():
        assert flat[path].get_value().sharding.spec == spec, path
    # Each device holds 1/8 of a parameter sharded over both axes: never a full copy.
    q = flat[("layers", 0, "attn", "q", "kernel")].get_value()
    assert q.addressable_shards[0].data.shape == (32 // 4, 32 // 2)


def test_given_values_are_placed_and_only_the_rest_initialised():
    """A checkpoint's values go straight onto the mesh; the variables it lacks (here the value
    head) get exactly the fresh initialisation, from an initializer that returns only them."""
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    fresh = dict(nnx.to_flat_state(nnx.split(sharding.create_sharded(_make, mesh))[1]))
    rng = np.random.default_rng(0)
    given = {p: rng.normal(size=v.get_value().shape).astype(np.float32) for p, v in fresh.items()
             if p[0] != "value_head"}
    model = sharding.create_sharded(_make, mesh, values=given)
    for p, var in nnx.to_flat_state(nnx.split(model)[1]):
        want = given[p] if p in given else fresh[p].get_value()
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want), err_msg=str(p))
        assert var.get_value().sharding == fresh[p].get_value().sharding, p
    traced = []
    real_jit = jax.jit
    try:
        jax.jit = lambda *a, **k: traced.append(1) or real_jit(*a, **k)
        sharding.create_sharded(_make, mesh, values={p: np.asarray(v.get_value()) for p, v in fresh.items()})
    finally:
        jax.jit = real_jit
    assert traced == []  # every value given: no initializer at all


def test_parameter_without_rule_is_an_error():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    rules = [r for r in sharding.DEFAULT_RULES if r[0] != "mlp"]
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'mlp'.*layers.0.mlp"):
        sharding.create_sharded(_make, mesh, rules)


def test_indivisible_dimension_is_an_error():
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=8)  # 2 kv heads * 8 dims = 16 ok; vocab 64 ok; mlp 64 ok
    bad = CFG.replace(num_kv_heads=1, num_heads=2, head_dim=4)  # kv dim 4 is not divisible by 8
    with pytest.raises(ValueError, match="not divisible by mesh axes tensor"):
        sharding.create_sharded(lambda: Transformer(bad, rngs=nnx.Rngs(0)), mesh)


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)
    assert dict(sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
