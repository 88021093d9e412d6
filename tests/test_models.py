"""The model zoo: parameter counts by hand, shapes, initialisation, loading user models, loss/metric."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpflow.config import MODEL_NAMES, ModelConfig
from sharpflow.models import REGISTRY, build_model, count_correct, loss_fn
from sharpflow.params import num_params as num_parameters


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    """Parameters of a k×k conv: weights c_in·k²·c_out, plus c_out biases."""
    return c_in * k * k * c_out + (c_out if bias else 0)


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def build(name: str, shape: tuple[int, ...], classes: int = 10, seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, kwargs=kwargs), shape, classes)


def test_registry_matches_config_names() -> None:
    assert set(REGISTRY) == set(MODEL_NAMES)
    assert len(REGISTRY) == len(MODEL_NAMES)


# ------------------------------------------------------------------------------ parameter counts
def test_simplecnn_count() -> None:
    # 32×32 → conv same → 32×32 → conv valid → 30×30 → pool → 15×15 → conv same → 15×15
    # → conv valid → 13×13 → pool → 6×6; flattened 64·6·6 = 2304.
    expected = (
        conv(3, 32, 3)  # 864 + 32 = 896
        + conv(32, 32, 3)  # 9,216 + 32 = 9,248
        + conv(32, 64, 3)  # 18,432 + 64 = 18,496
        + conv(64, 64, 3)  # 36,864 + 64 = 36,928
        + dense(2304, 128)  # 294,912 + 128 = 295,040
        + dense(128, 10)  # 1,290
    )
    assert expected == 361_898  # the paper's "≈362k"
    assert num_parameters(build("simplecnn", (3, 32, 32))) == expected


def test_simplecnn_medium_count() -> None:
    # 5×5 kernels: 32 → 32 (same) → 28 (valid) → pool 14 → 14 (same) → 10 (valid) → pool 5;
    # flattened 200·5·5 = 5000. Dense width 128 as in SimpleCNN.
    expected = (
        conv(3, 100, 5)  # 7,500 + 100 = 7,600
        + conv(100, 100, 5)  # 250,000 + 100 = 250,100
        + conv(100, 200, 5)  # 500,000 + 200 = 500,200
        + conv(200, 200, 5)  # 1,000,000 + 200 = 1,000,200
        + dense(5000, 128)  # 640,000 + 128 = 640,128
        + dense(128, 10)  # 1,290
    )
    assert expected == 2_399_518  # the paper's "≈2.4M"
    assert num_parameters(build("simplecnn_medium", (3, 32, 32))) == expected


def test_resnet32_count() -> None:
    stem = conv(3, 16, 3)  # 448
    stage1 = 5 * 2 * conv(16, 16, 3)  # 5 blocks × 2 × 2,320 = 23,200
    stage2 = conv(16, 32, 3) + conv(32, 32, 3) + conv(16, 32, 1) + 4 * 2 * conv(32, 32, 3)
    #        4,640          + 9,248           + 544 (1×1 shortcut) + 73,984            = 88,416
    stage3 = conv(32, 64, 3) + conv(64, 64, 3) + conv(32, 64, 1) + 4 * 2 * conv(64, 64, 3)
    #        18,496         + 36,928          + 2,112              + 295,424           = 352,960
    head = dense(64, 10)  # 650
    expected = stem + stage1 + stage2 + stage3 + head
    assert (stage2, stage3, expected) == (88_416, 352_960, 465_674)  # the paper's "≈466k"
    assert num_parameters(build("resnet32", (3, 32, 32))) == expected


def test_vgg11_bn_count() -> None:
    # Bias-free convs, each followed by BatchNorm (γ, β trainable: 2 per channel; running
    # statistics are buffers, not parameters). Five pools take 32×32 to 1×1: 512 features.
    widths = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    convs = sum(conv(a, b, 3, bias=False) for a, b in widths)  # 9,217,728
    bns = sum(2 * b for _, b in widths)  # 5,504
    head = dense(512, 512) + dense(512, 512) + dense(512, 10)  # 262,656 + 262,656 + 5,130
    expected = convs + bns + head
    assert (convs, bns, expected) == (9_217_728, 5_504, 9_753_674)
    assert num_parameters(build("vgg11_bn", (3, 32, 32))) == expected


def test_lstm_lm_count() -> None:
    v, e, h = 10_000, 200, 200
    embedding = v * e  # 2,000,000
    layer = lambda n_in: 4 * h * n_in + 4 * h * h + 4 * h  # noqa: E731  one bias per layer (Keras)
    decoder = dense(h, v)  # 2,010,000
    expected = embedding + layer(e) + layer(h) + decoder  # 320,800 per layer
    assert expected == 4_651_600
    assert num_parameters(build("lstm_lm", (20,), classes=v)) == expected


def test_small_model_counts() -> None:
    assert num_parameters(build("mlp", (40,))) == dense(40, 100) + dense(100, 100) + dense(100, 10)  # 15,210
    # cnn1d on (40,): lengths 40 →(k5, pad 2) 40 →(k5, s2) 18 →(k3, s2) 8; flattened 16·8 = 128.
    expected = (1 * 5 * 16 + 16) + (16 * 5 * 16 + 16) + (16 * 3 * 16 + 16) + dense(128, 10)
    assert expected == 3_466
    assert num_parameters(build("cnn1d", (40,))) == expected


# ------------------------------------------------------------------------------------- shapes
# Small kwargs where they exist, to keep the suite fast.
SMALL: dict[str, tuple[tuple[int, ...], dict[str, object]]] = {
    "mlp": ((40,), {"hidden": [8, 8]}),
    "cnn1d": ((40,), {"channels": 4}),
    "simplecnn": ((3, 16, 16), {"filters": 4, "dense": 8}),
    "simplecnn_medium": ((3, 16, 16), {"filters": 4, "dense": 8}),
    "resnet32": ((3, 8, 8), {"blocks_per_stage": 1, "width": 4}),
    "vgg11_bn": ((3, 32, 32), {"layers": [4, "M", 8, "M", 8, "M", 8, "M", 8, "M"], "dense": 8}),
    "lstm_lm": ((5,), {"embed": 6, "hidden": 7}),
    "gpt": ((5,), {"layers": 1, "width": 8, "heads": 2}),
}
TOKEN_MODELS = ("lstm_lm", "gpt")


def example_batch(name: str, shape: tuple[int, ...], batch: int = 3, classes: int = 10) -> torch.Tensor:
    if name in TOKEN_MODELS:
        return torch.randint(0, classes, (batch, *shape))
    return torch.randn(batch, *shape)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name: str) -> None:
    shape, kwargs = SMALL[name]
    model = build(name, shape, classes=11, **kwargs)
    out = model(example_batch(name, shape, classes=11))
    assert out.shape == ((3, shape[0], 11) if name in TOKEN_MODELS else (3, 11))


@pytest.mark.parametrize("name", ["simplecnn", "simplecnn_medium", "resnet32", "vgg11_bn"])
def test_image_models_take_mnist_shape(name: str) -> None:
    model = build(name, (1, 28, 28), **SMALL[name][1])
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_paper_models_forward_on_cifar_shape() -> None:
    for name in ["simplecnn", "resnet32", "vgg11_bn"]:
        assert build(name, (3, 32, 32))(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn1d_takes_channel_axis() -> None:
    model = build("cnn1d", (2, 40), channels=4)
    assert model(torch.randn(3, 2, 40)).shape == (3, 10)


def test_construction_leaves_batchnorm_statistics_alone() -> None:
    model = build("vgg11_bn", *SMALL["vgg11_bn"][:1], **SMALL["vgg11_bn"][1])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == 0
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))


def test_too_small_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="simplecnn"):
        build("simplecnn", (3, 4, 4))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build("resnet32", (40,))


# --------------------------------------------------------------------------------- loss, metric
def test_loss_fn_is_cross_entropy_on_classification() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    # Independent truth: -mean log softmax at the target, written out.
    by_hand = -torch.stack([logits[i, y[i]] - torch.logsumexp(logits[i], 0) for i in range(5)]).mean()
    torch.testing.assert_close(loss_fn(logits, y), by_hand)
    torch.testing.assert_close(loss_fn(logits, y), F.cross_entropy(logits, y))


def test_loss_fn_on_lm_is_the_token_mean() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3))
    terms = [F.cross_entropy(logits[b, t][None], y[b, t][None]) for b in range(2) for t in range(3)]
    torch.testing.assert_close(loss_fn(logits, y), torch.stack(terms).mean())


def test_count_correct_hand_case() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 2, 1, 0])  # argmax 0, 2, 0, 2 → the first two are right
    n = count_correct(logits, y)
    assert n.dim() == 0 and n.item() == 2


def test_count_correct_on_lm_counts_tokens() -> None:
    logits = torch.zeros(2, 3, 4)
    argmax = torch.tensor([[1, 2, 3], [0, 0, 1]])
    logits.scatter_(2, argmax[..., None], 1.0)
    y = torch.tensor([[1, 2, 0], [0, 3, 1]])  # right at (0,0), (0,1), (1,0), (1,2)
    n = count_correct(logits, y)
    assert n.dim() == 0 and n.item() == 4


# ------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_is_deterministic_in_the_seed(name: str) -> None:
    shape, kwargs = SMALL[name]
    a = build(name, shape, seed=3, **kwargs).state_dict()
    b = build(name, shape, seed=3, **kwargs).state_dict()
    c = build(name, shape, seed=4, **kwargs).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resnet_init_scale() -> None:
    model = build("resnet32", (3, 32, 32))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            target = math.sqrt(2 / fan_in) / 15
            n = m.weight.numel()
            # The sample std of n normals has relative sd ≈ 1/sqrt(2n): allow 5 of those + 1 %.
            tol = 5 / math.sqrt(2 * n) + 0.01
            assert abs(m.weight.std().item() / target - 1) < tol, name
            assert torch.count_nonzero(m.bias) == 0, name
            checked += 1
    assert checked == 1 + 30 + 2  # stem, 15 blocks × 2, two shortcuts
    bound = math.sqrt(6 / (64 + 10))  # the dense head is Glorot-uniform, unscaled
    assert 0.8 * bound < model.head.weight.abs().max().item() <= bound
    # init_scale overrides the 1/15: plain He-normal.
    big = build("resnet32", (3, 32, 32), init_scale=1.0).blocks[-1].conv2.weight
    assert abs(big.std().item() / math.sqrt(2 / 576) - 1) < 0.03


def test_simplecnn_glorot_uniform() -> None:
    model = build("simplecnn", (3, 32, 32))
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 6
    for m in layers:
        receptive = m.weight[0, 0].numel()  # k·k for a conv, 1 for a dense layer
        fan_in, fan_out = m.weight.shape[1] * receptive, m.weight.shape[0] * receptive
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.abs()
        assert w.max().item() <= bound
        # Uniform on ±bound: with ≥ 864 draws the largest |w| is above 0.98·bound unless the
        # distribution is wrong (P(all below) = 0.98^864 ≈ 3e-8); the std is bound/sqrt(3).
        assert w.max().item() > 0.98 * bound
        assert abs(m.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
        assert torch.count_nonzero(m.bias) == 0


def test_lstm_init_uniform() -> None:
    model = build("lstm_lm", (20,), classes=50)
    for name, p in model.named_parameters():
        assert p.abs().max().item() <= 0.1, name
        assert p.abs().max().item() > 0.09, name  # not a narrower distribution


# --------------------------------------------------------------------------------------- LSTM
def test_lstm_matches_torch_lstm() -> None:
    """The hand-written recurrence equals nn.LSTM with b_ih = our bias and b_hh = 0."""
    torch.manual_seed(0)
    model = build("lstm_lm", (6,), classes=13, embed=5, hidden=7).double()
    ref = nn.LSTM(5, 7, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for layer in range(2):
            getattr(ref, f"weight_ih_l{layer}").copy_(getattr(model, f"weight_ih_l{layer}"))
            getattr(ref, f"weight_hh_l{layer}").copy_(getattr(model, f"weight_hh_l{layer}"))
            getattr(ref, f"bias_ih_l{layer}").copy_(getattr(model, f"bias_l{layer}"))
            getattr(ref, f"bias_hh_l{layer}").zero_()
    tokens = torch.randint(0, 13, (4, 6))
    expected = model.decoder(ref(model.embedding(tokens))[0])
    torch.testing.assert_close(model(tokens), expected)


def test_lstm_hessian_vector_product() -> None:
    """Double backward works through the LM; the HVP matches central differences of the gradient."""
    torch.manual_seed(0)
    model = build("lstm_lm", (4,), classes=9, embed=3, hidden=3).double()
    tokens, targets = torch.randint(0, 9, (2, 4)), torch.randint(0, 9, (2, 4))
    params = list(model.parameters())

    def grad() -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss_fn(model(tokens), targets), params))

    v = [torch.randn_like(p) for p in params]
    g = torch.autograd.grad(loss_fn(model(tokens), targets), params, create_graph=True)
    hv = torch.autograd.grad(g, params, v)
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.add_(eps * d)
    g_plus = grad()
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.sub_(2 * eps * d)
    g_minus = grad()
    for h, gp, gm in zip(hv, g_plus, g_minus, strict=True):
        torch.testing.assert_close(h, (gp - gm) / (2 * eps), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------- transformer
def gpt_count(v: int, d: int, context: int, layers: int) -> int:
    """By hand: tied token embedding V·d, positions C·d; per block two LayerNorms (2·2d), the fused
    QKV projection d·3d + 3d, the attention output d·d + d, the MLP d·4d + 4d and 4d·d + d; the
    final LayerNorm 2d. No output layer of its own (tied)."""
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return v * d + context * d + layers * block + 2 * d


@pytest.mark.parametrize(("v", "d", "heads", "context", "layers"), [(50, 64, 4, 32, 2), (13, 12, 3, 9, 3)])
def test_gpt_count(v: int, d: int, heads: int, context: int, layers: int) -> None:
    model = build("gpt", (context,), classes=v, width=d, heads=heads, layers=layers)
    assert num_parameters(model) == gpt_count(v, d, context, layers)


def test_gpt_is_causal_and_tied() -> None:
    model = build("gpt", (6,), classes=9, width=8, heads=2, layers=2).eval()
    tokens = torch.randint(0, 9, (2, 6))
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 9
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # no position sees a later token
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert not any("lm_head" in n or n.endswith("decoder.weight") for n, _ in model.named_parameters())
    with torch.no_grad():
        model.embedding.weight.mul_(2.0)  # the output layer is the embedding: logits change with it
        assert not torch.allclose(model(tokens), a)


def test_gpt_attention_matches_torch_sdpa() -> None:
    """The math-path attention equals PyTorch's own causal scaled-dot-product attention."""
    from sharpflow.models import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(width=12, heads=3, context=7, dropout=0.0).eval()
    x = torch.randn(2, 7, 12)
    b, t, d = x.shape
    q, k, v = attn.qkv(x).view(b, t, 3, 3, 4).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(ref))


def test_gpt_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of heads"):
        build("gpt", (5,), width=10, heads=3)
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        build("gpt", (3, 8, 8))
    with pytest.raises(ValueError, match="context 4 is shorter"):
        build("gpt", (5,), context=4)


@pytest.mark.parametrize("method", ["double_backward", "fwd_rev"])
def test_gpt_hessian_equals_dense(method: str) -> None:
    """Both product paths through the attention against the dense Hessian of a tiny GPT (eval mode,
    dropout configured but off), in float64."""
    from torch.func import functional_call

    from sharpflow.hessian import HessianOperator
    from sharpflow.params import flat_params, unflatten

    model = build("gpt", (4,), classes=5, width=4, heads=2, layers=1, dropout=0.1).double().eval()
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 5, (3, 4), generator=gen), torch.randint(0, 5, (3, 4), generator=gen))
               for _ in range(2)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    like = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, unflatten(theta, like), (x,)), y)

    h = torch.autograd.functional.hessian(loss, flat_params(model))
    op = HessianOperator(model, loss_fn, batches, method=method, cache_graph=True)
    block = torch.randn(op.dim, 3, generator=gen, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(op.matvec(block), h @ block, rtol=1e-5, atol=1e-8)
    assert op.method == method


# ------------------------------------------------------------------------------- user models
USER_MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, input_shape, num_classes, width=3):
        super().__init__()
        self.input_shape = input_shape
        self.fc = nn.Linear(input_shape[0], num_classes * width)
        self.width = width

    def forward(self, x):
        return self.fc(x)


class NoContract(nn.Module):
    def __init__(self, width):
        super().__init__()


def not_a_module(input_shape, num_classes):
    return 42
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    (tmp_path / "sf_user_models.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "sf_broken_models.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sf_user_models"


def test_build_user_model(user_module: str) -> None:
    model = build(f"{user_module}:Net", (7,), classes=4, width=2)
    assert model.input_shape == (7,)
    assert model(torch.randn(5, 7)).shape == (5, 8)
    assert num_parameters(model) == dense(7, 8)


def test_unknown_name_is_a_value_error() -> None:
    cfg = ModelConfig.model_construct(name="resnet99", kwargs={})  # bypass the config's own check
    with pytest.raises(ValueError, match=r"unknown model 'resnet99'.*simplecnn"):
        build_model(cfg, (3, 32, 32), 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("sf_no_such_module:Net", {}, r"'sf_no_such_module:Net'.*cannot import module 'sf_no_such_module'"),
        ("sf_broken_models:Net", {}, r"'sf_broken_models:Net'.*cannot import.*boom at import"),
        ("sf_user_models:Missing", {}, r"'sf_user_models:Missing'.*no attribute 'Missing'"),
        ("sf_user_models:Net", {"depth": 3}, r"'sf_user_models:Net'.*unexpected keyword argument 'depth'"),
        ("sf_user_models:NoContract", {"width": 1}, r"'sf_user_models:NoContract'.*input_shape"),
        ("sf_user_models:not_a_module", {}, r"'sf_user_models:not_a_module'.*int, not an nn.Module"),
        ("sf_user_models:Net", {"num_classes": 3}, r"'sf_user_models:Net'.*must not set \['num_classes'\]"),
        ("simplecnn", {"widht": 3}, r"'simplecnn'.*unexpected keyword argument 'widht'"),
        ("mlp", {"activation": "gelu"}, r"'mlp'.*unknown activation 'gelu'"),
    ],
)
def test_bad_models_are_value_errors(user_module: str, name: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(ModelConfig(name=name, kwargs=kwargs), (7,) if ":" in name else (3, 32, 32), 4)
