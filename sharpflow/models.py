"""The model zoo: the paper's networks, small models for the offline default, and user models.

Every builder takes ``input_shape`` (the shape of ONE example: ``(C, H, W)`` for images,
``(L,)`` for MNIST-1D vectors, ``(T,)`` token ids for a language model: ``lstm_lm``, ``gpt``), ``num_classes`` (the
vocabulary size for a language model) and its own keyword arguments (``ModelConfig.kwargs``).
Models return logits: ``(B, num_classes)``, or ``(B, T, V)`` for the language model.

Initialisation draws only from torch's global RNG, so a model is a deterministic function of
the seed the caller sets beforehand. Sizes that depend on the input (the flattened features
in front of a dense layer) are found with a dummy forward pass at construction (eval mode,
no gradient, no RNG draws), so every image model also works on e.g. 28×28×1 MNIST.

Your own model: ``ModelConfig(name="package.module:Class", kwargs={...})`` imports ``Class``
and calls ``Class(input_shape=..., num_classes=..., **kwargs)``. The class must accept those
two keyword arguments and return logits as above.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpflow.config import ModelConfig

Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------- helpers
def _image_shape(input_shape: Sequence[int], model: str) -> Shape:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{model} needs image examples of shape (C, H, W), got {shape}")
    return shape


@torch.no_grad()
def _feature_shape(module: nn.Module, input_shape: Shape) -> Shape:
    """Per-example output shape of ``module`` on an input of ``input_shape`` (a dummy forward).

    Run in eval mode so BatchNorm running statistics (and their counters) are left untouched
    and dropout draws nothing from the RNG: construction stays a pure function of the seed.
    """
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
    if out.numel() == 0:
        raise ValueError(f"input shape {input_shape} is too small: the features before the classifier are empty")
    return tuple(out.shape[1:])


def _glorot_(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv/linear layer (Keras' default).

    For a conv kernel fan_in = C_in·k, fan_out = C_out·k (k = kernel elements), as in Keras.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: use one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


# ----------------------------------------------------------------------------------- MNIST-1D
class MLP(nn.Module):
    """Fully connected net on the flattened example: Linear → act per hidden width, then Linear.

    Glorot-uniform weights, zero biases. With the default ``hidden=[100, 100]`` on MNIST-1D
    (40,) → 10 it has 40·100+100 + 100·100+100 + 100·10+10 = 15,210 parameters.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        width = math.prod(int(s) for s in input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, int(h)), _activation(activation)]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        _glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, *input_shape) float → logits (B, num_classes)."""
        return self.net(x)


class CNN1D(nn.Module):
    """A small 1-D CNN for MNIST-1D: three convolutions with ReLU, then one dense layer.

    conv(1→c, k, pad k//2) → ReLU → conv(c→c, k, stride 2) → ReLU → conv(c→c, 3, stride 2)
    → ReLU → flatten → dense(num_classes). No BatchNorm, no dropout, Glorot-uniform weights
    and zero biases: curvature is free to grow during training, which is what the default
    suite wants to show. Defaults (c=16, k=5) on (40,) give lengths 40 → 18 → 8 and
    96 + 1,296 + 784 + 1,290 = 3,466 parameters.

    Input (B, L) (a channel axis is added) or (B, C, L).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 16, kernel: int = 5) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (1, 2):
            raise ValueError(f"cnn1d needs examples of shape (L,) or (C, L), got {shape}")
        self.add_channel = len(shape) == 1
        chw = (1, *shape) if self.add_channel else shape
        self.features = nn.Sequential(
            nn.Conv1d(chw[0], channels, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel, stride=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        (flat,) = _feature_shape(self.features, chw)
        self.classifier = nn.Linear(flat, num_classes)
        _glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L) or (B, C, L) float → logits (B, num_classes)."""
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


# ------------------------------------------------------------------------------------- images
class SimpleCNN(nn.Module):
    """The paper's SimpleCNN (Jastrzębski et al. 2019), without BatchNorm or dropout.

    conv(f, k, same) → ReLU → conv(f, k, valid) → ReLU → maxpool2 → conv(2f, k, same) → ReLU →
    conv(2f, k, valid) → ReLU → maxpool2 → dense(``dense``) → ReLU → dense(num_classes).
    Glorot-uniform weights, zero biases (the release's Keras defaults).

    f=32, k=3 on 32×32×3: 361,898 parameters (the paper's ≈362k); the "medium" variant f=100,
    k=5: 2,399,518 (≈2.4M). The arithmetic is in tests/test_models.py.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        filters: int = 32,
        kernel: int = 3,
        dense: int = 128,
    ) -> None:
        super().__init__()
        c, _, _ = shape = _image_shape(input_shape, "simplecnn")
        f, k = filters, kernel
        self.features = nn.Sequential(
            nn.Conv2d(c, f, k, padding="same"),
            nn.ReLU(),
            nn.Conv2d(f, f, k),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(f, 2 * f, k, padding="same"),
            nn.ReLU(),
            nn.Conv2d(2 * f, 2 * f, k),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        (flat,) = _feature_shape(self.features, shape)
        self.classifier = nn.Sequential(nn.Linear(flat, dense), nn.ReLU(), nn.Linear(dense, num_classes))
        _glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) float → logits (B, num_classes)."""
        return self.classifier(self.features(x))


def simplecnn(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> SimpleCNN:
    """SimpleCNN, 32/32/64/64 filters of 3×3 (≈362k parameters on CIFAR)."""
    return SimpleCNN(input_shape, num_classes, **kwargs)


def simplecnn_medium(
    input_shape: Sequence[int], num_classes: int, filters: int = 100, kernel: int = 5, dense: int = 128
) -> SimpleCNN:
    """The paper's medium SimpleCNN for NSGD: 100/100/200/200 filters of 5×5, dense 128 (≈2.4M)."""
    return SimpleCNN(input_shape, num_classes, filters=filters, kernel=kernel, dense=dense)


class PreActBlock(nn.Module):
    """Pre-activation residual block without normalisation: x + conv(ReLU(conv(ReLU(x)))).

    With ``stride`` 2 (or a change of width) the identity is replaced by a 1×1 strided conv
    applied to the raw input, as in the paper's release.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(F.relu(x))))
        return self.shortcut(x) + y


class ResNetNoBN(nn.Module):
    """ResNet-(6n+2) for CIFAR without BatchNorm (the paper's ResNet-32 is n=5).

    conv3×3(16) → 3 stages × n pre-activation blocks (16/32/64 filters; stride 2 and a 1×1 conv
    shortcut entering stages 2 and 3) → ReLU → global average pool → dense(num_classes).

    Initialisation. Without BatchNorm the sum of 3n residual branches must start small, so
    every conv kernel — the first conv, both convs of every block and the 1×1 shortcuts, as in
    the release — is He-normal (std sqrt(2/fan_in), not truncated) times ``init_scale``
    (default 1/(3n) = 1/15, the number of blocks). NOTE: the release's Keras initialiser
    multiplied the *variance* by 1/15 (std by 1/sqrt(15) ≈ 0.26); here the *std* is
    multiplied, a smaller start (std ×1/15 ≈ 0.067). Pass ``init_scale=15**-0.5`` to match the
    release exactly. Conv biases are zero; the dense layer is Glorot-uniform with zero bias
    (Keras' default, unscaled). 465,674 parameters for n=5 (arithmetic in the tests).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks_per_stage: int = 5,
        width: int = 16,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        c, _, _ = shape = _image_shape(input_shape, "resnet32")
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, w in enumerate(widths):
            for i in range(blocks_per_stage):
                blocks.append(PreActBlock(c_in, w, stride=2 if stage > 0 and i == 0 else 1))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)
        _feature_shape(nn.Sequential(self.stem, self.blocks), shape)  # fails early on a too-small input

        scale = 1.0 / (3 * blocks_per_stage) if init_scale is None else float(init_scale)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                with torch.no_grad():
                    m.weight.mul_(scale)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) float → logits (B, num_classes)."""
        h = F.relu(self.blocks(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def resnet32(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> ResNetNoBN:
    """ResNet-32 without BatchNorm (≈466k parameters); kwargs as :class:`ResNetNoBN`."""
    return ResNetNoBN(input_shape, num_classes, **kwargs)


class VGG(nn.Module):
    """VGG with BatchNorm for CIFAR: conv3×3 → BN → ReLU per number, 'M' a 2×2 max-pool,
    then ``dense`` → ReLU → ``dense`` → ReLU → dense(num_classes).

    Choices (the paper's release differs slightly, see below):
    - Convs have no bias: the BatchNorm shift that follows makes one redundant, and a redundant
      parameter is an exactly flat direction of the loss.
    - Max-pools round up (``ceil_mode``): identical on 32×32 (→ 1×1×512 features), and 28×28
      inputs still reach 1×1 instead of an empty map.
    - Glorot-uniform conv/dense weights, zero biases, BN γ=1, β=0 (Keras' defaults).
    The release also normalised the input and the two dense layers with BN and kept conv biases;
    this is the common VGG-11-BN instead. 9,753,674 parameters on 32×32×3 (see the tests).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        layers: Sequence[int | str] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
        dense: int = 512,
    ) -> None:
        super().__init__()
        c, _, _ = shape = _image_shape(input_shape, "vgg11_bn")
        feats: list[nn.Module] = []
        for spec in layers:
            if spec == "M":
                feats.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                feats += [nn.Conv2d(c, int(spec), 3, padding=1, bias=False), nn.BatchNorm2d(int(spec)), nn.ReLU()]
                c = int(spec)
        feats.append(nn.Flatten())
        self.features = nn.Sequential(*feats)
        (flat,) = _feature_shape(self.features, shape)
        self.classifier = nn.Sequential(
            nn.Linear(flat, dense), nn.ReLU(), nn.Linear(dense, dense), nn.ReLU(), nn.Linear(dense, num_classes)
        )
        _glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) float → logits (B, num_classes)."""
        return self.classifier(self.features(x))


def vgg11_bn(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> VGG:
    """VGG-11 with BatchNorm: 64-M-128-M-256-256-M-512-512-M-512-512-M, 2×dense512, dense."""
    return VGG(input_shape, num_classes, **kwargs)


# ------------------------------------------------------------------------------------ language
class LSTMLanguageModel(nn.Module):
    """Word-level LSTM LM (Zaremba et al. 2014 "small"): embedding → L LSTM layers → dense(vocab).

    The LSTM is written out step by step instead of calling ``nn.LSTM``, for two reasons:
    - cuDNN's LSTM has no double backward and no forward-mode AD, so exact Hessian-vector
      products through ``nn.LSTM`` fail on a GPU; plain tensor ops support every transform.
    - One bias per layer (as in Keras, the paper's framework): ``nn.LSTM`` carries two,
      b_ih and b_hh, that enter only as a sum — a redundant flat direction of the loss whose
      sum also moves at twice the learning rate.
    Gates are ordered (input, forget, cell, output) like ``nn.LSTM``; layer ``l`` owns
    ``weight_ih_l{l}`` (4H, in), ``weight_hh_l{l}`` (4H, H) and ``bias_l{l}`` (4H,). The state
    starts at zero for every sequence (examples are independent windows of the corpus).

    Initialisation: every parameter uniform in ±``init_range`` (0.1, Zaremba's small model).
    Dropout (Zaremba) acts on the non-recurrent connections: after the embedding, between
    layers and before the decoder. For V=10,000 and the defaults: 4,651,600 parameters.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        embed: int = 200,
        hidden: int = 200,
        layers: int = 2,
        dropout: float = 0.0,
        init_range: float = 0.1,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise ValueError(f"lstm_lm needs examples of shape (T,) (token ids), got {shape}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden, self.layers = hidden, layers
        self.embedding = nn.Embedding(num_classes, embed)
        self.drop = nn.Dropout(dropout)
        for layer in range(layers):
            n_in = embed if layer == 0 else hidden
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden, n_in)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden, hidden)))
            self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(4 * hidden)))
        self.decoder = nn.Linear(hidden, num_classes)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)

    def _lstm_layer(self, x: Tensor, layer: int) -> Tensor:
        """x: (B, T, in) → hidden states (B, T, H)."""
        w_hh = getattr(self, f"weight_hh_l{layer}")
        # The input projection of every step at once: one big matmul instead of T small ones.
        gates_x = F.linear(x, getattr(self, f"weight_ih_l{layer}"), getattr(self, f"bias_l{layer}"))
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        outs = []
        for t in range(x.shape[1]):
            i, f, g, o = (gates_x[:, t] + h @ w_hh.T).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T) int64 → next-token logits (B, T, V)."""
        h = self.drop(self.embedding(tokens))
        for layer in range(self.layers):
            h = self.drop(self._lstm_layer(h, layer))
        return self.decoder(h)


def lstm_lm(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> LSTMLanguageModel:
    """The paper's PTB model: 2-layer LSTM, 200 units, embedding 200; num_classes = vocabulary."""
    return LSTMLanguageModel(input_shape, num_classes, **kwargs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, computed on the math path (``softmax(QKᵀ/√d_h)·V`` with
    plain matmuls): PyTorch's fused and flash kernels have no double backward and no forward-mode
    rule, so exact Hessian-vector products through them would fail."""

    def __init__(self, width: int, heads: int, context: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        mask = torch.ones(context, context, dtype=torch.bool).triu(1)  # True above the diagonal: the future
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        att = self.drop(torch.softmax(att.masked_fill(self.mask[:t, :t], float("-inf")), dim=-1))
        return self.drop(self.proj((att @ v).transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP of 4× width."""

    def __init__(self, width: int, heads: int, context: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """A decoder-only transformer language model (GPT-2's layout, small): token and learned position
    embeddings, ``layers`` pre-LN blocks of causal multi-head self-attention and a GELU MLP, a final
    LayerNorm, and the output layer tied to the token embedding (logits = h·Eᵀ, no bias).

    Examples are token windows of shape (T,), T ≤ ``context`` (default: the dataset's T); the
    output is next-token logits (B, T, V). Parameters, for vocabulary V, width d, context C and L
    layers: V·d + C·d + L·(12d² + 13d) + 2d. Initialisation as GPT-2: weights and embeddings
    normal(0, 0.02), the residual projections' weights normal(0, 0.02/√(2L)), biases zero,
    LayerNorms one and zero. Dropout (after attention weights, on both residual branches and after
    the embeddings) is active in training mode only; Hessians are taken in eval mode, as for every
    model (``spectrum.eval_mode``), so it is off there.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        layers: int = 2,
        width: int = 64,
        heads: int = 4,
        context: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise ValueError(f"gpt needs examples of shape (T,) (token ids), got {shape}")
        context = shape[0] if context is None else int(context)
        if context < shape[0]:
            raise ValueError(f"context {context} is shorter than the examples' {shape[0]} tokens")
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding = nn.Embedding(num_classes, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, context, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2 and "ln" not in name:
                residual = name.endswith(("attn.proj.weight", "out.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers) if residual else 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T) int64 → next-token logits (B, T, V)."""
        h = self.drop(self.embedding(tokens) + self.position[: tokens.shape[1]])
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.embedding.weight.T


def gpt(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> GPT:
    """A small decoder-only transformer (2 layers, width 64, 4 heads by default); num_classes = vocabulary."""
    return GPT(input_shape, num_classes, **kwargs)


# ------------------------------------------------------------------------------------ registry
REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "simplecnn": simplecnn,
    "simplecnn_medium": simplecnn_medium,
    "resnet32": resnet32,
    "vgg11_bn": vgg11_bn,
    "lstm_lm": lstm_lm,
    "gpt": gpt,
}


def _import_class(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is a config problem
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r}: {err!r}") from err
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(cls):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable")
    return cls


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build ``cfg.name`` (a REGISTRY key or ``package.module:Class``) for examples of
    ``input_shape`` and ``num_classes`` outputs, with ``cfg.kwargs``.

    A user class is called as ``Class(input_shape=tuple, num_classes=int, **kwargs)`` and must
    return an ``nn.Module`` producing logits. Seed torch before calling: initialisation uses
    the global RNG. Any problem (unknown name, failed import, bad kwargs or shapes) raises
    ``ValueError`` naming the model.
    """
    name = cfg.name
    if name in REGISTRY:
        builder = REGISTRY[name]
    elif ":" in name:
        builder = _import_class(name)
    else:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(REGISTRY)} or 'package.module:Class'")
    clash = {"input_shape", "num_classes"} & set(cfg.kwargs)
    if clash:
        raise ValueError(f"model {name!r}: kwargs must not set {sorted(clash)} (they come from the dataset)")
    shape = tuple(int(s) for s in input_shape)
    try:
        model = builder(input_shape=shape, num_classes=int(num_classes), **cfg.kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"model {name!r} with kwargs {cfg.kwargs} and input shape {shape}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the constructor returned {type(model).__name__}, not an nn.Module")
    return model


def draws_randomness(model: nn.Module) -> bool:
    """Whether a training-mode forward pass of ``model`` may draw from torch's global RNG.

    True if it holds dropout or RReLU, or any module whose class is defined outside torch and
    sharpflow (user code may draw anything). Training seeds each step only when this is True.
    """
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)):
            return True
        origin = type(m).__module__
        if not (origin.startswith("torch.") or origin.startswith("sharpflow.")):
            return True
    return False


# --------------------------------------------------------------------------------- loss, metric
def _flat(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(B, [T,] C) logits and (B, [T]) targets → (N, C) and (N,), N = B·T for a sequence model."""
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats) over examples — over all B·T tokens for (B, T, V) LM logits."""
    return F.cross_entropy(*_flat(logits, targets))


def mse_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over examples of ½‖z − onehot(y)‖² (summed over the C outputs): the square loss of
    Cohen et al. (2021), whose Hessian in the outputs is the identity (per example, over N)."""
    flat_logits, flat_targets = _flat(logits, targets)
    onehot = F.one_hot(flat_targets, flat_logits.shape[-1]).to(flat_logits.dtype)
    return 0.5 * (flat_logits - onehot).square().sum(dim=-1).mean()


#: the training losses by config name (``loss`` of a run); each returns the mean over the batch.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": loss_fn, "mse": mse_loss}


def loss_for(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss function of a run's ``loss`` setting."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}") from None


def count_correct(logits: Tensor, targets: Tensor) -> Tensor:
    """Number of argmax predictions equal to the targets (tokens for an LM), a 0-d int64 tensor."""
    flat_logits, flat_targets = _flat(logits, targets)
    return (flat_logits.argmax(dim=-1) == flat_targets).sum()


def count_correct_each(pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """:func:`count_correct` of every (logits, targets) pair, in one pass: an (n,) int64 tensor.

    Training keeps a few hundred steps' (small) logits and counts them together: one argmax
    over all of them costs about what one step's count would.
    """
    flat = [_flat(lg, t) for lg, t in pairs]
    device = flat[0][1].device
    hits = (torch.cat([lg for lg, _ in flat]).argmax(dim=-1) == torch.cat([t for _, t in flat])).long()
    sizes = torch.tensor([t.numel() for _, t in flat], device=device)
    owner = torch.repeat_interleave(torch.arange(len(flat), device=device), sizes)
    return torch.zeros(len(flat), dtype=torch.long, device=device).index_add_(0, owner, hits)
