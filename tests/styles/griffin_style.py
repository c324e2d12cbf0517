"""A tiny Griffin written the way RecurrentGemma writes it (Flax Linen, 2-space indent).

Residual blocks of a temporal-mixing recurrent block (Dense projections, a causal depthwise
Conv1D, an RG-LRU whose gates are block-diagonal linears) and a gated MLP whose up-projection is
an ``Einsum`` module over a stacked ``w``. Layouts (input = axes the use contracts, stack =
batch axes of the weight in its dot_general, output = the rest; D width, W lru width, F
expanded width, Nb blocks of Bs = W / Nb, V vocab), per block ``params/blocks.{i}/...``:

===============================================  ===========  ====================  ======
path                                              shape        use                   roles
===============================================  ===========  ====================  ======
recurrent_block/linear_x/kernel                   (D, W)       nn.Dense              i o
recurrent_block/linear_y/kernel                   (D, W)       nn.Dense              i o
recurrent_block/linear_out/kernel                 (W, D)       nn.Dense              i o
recurrent_block/rg_lru/input_gate/w               (Nb, Bs, Bs) ...hi,hij->...hj      s i o
recurrent_block/rg_lru/a_gate/w                   (Nb, Bs, Bs) ...hi,hij->...hj      s i o
mlp_block/ffw_up/w                                (2, D, F)    ...td,cdD->c...tD     o i o
mlp_block/ffw_down/kernel                         (F, D)       nn.Dense              i o
===============================================  ===========  ====================  ======

Not matmul weights, whatever their rank: ``recurrent_block/conv_1d/w`` (4, W) is indexed by
tap and multiplied elementwise; ``mlp_block/ffw_up/b`` (2, 1, 1, F) and the gates' ``b``
(Nb, Bs) are added; ``rg_lru/a_param`` (W,) and the RMSNorm ``scale`` are vectors.
``params/embedder/input_embedding`` (V, D) is looked up (gather) and tied as the output head
through its transpose, ``x @ table.T``.

The RG-LRU recurrence ``h_t = a_t * h_{t-1} + x_t`` runs as ``jax.lax.associative_scan`` over
time; ``sqrt_bound_derivative`` is a ``jax.custom_jvp`` as in the original.

``make(key)`` gives ``(fn, params, (tokens, segment_pos))`` with ``fn(params, tokens,
segment_pos) -> logits``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
  vocab_size: int = 64
  width: int = 32  # D
  mlp_expanded_width: int = 64  # F
  lru_width: int = 32  # W
  num_heads: int = 4  # Nb: blocks of the block-diagonal gates
  conv1d_temporal_width: int = 4
  num_layers: int = 2
  logits_soft_cap: float = 30.0


@jax.custom_jvp
def sqrt_bound_derivative(x, max_gradient):
  """sqrt(x), with a derivative clipped at ``max_gradient`` near 0."""
  return jnp.sqrt(x)


@sqrt_bound_derivative.defjvp
def _sqrt_bound_derivative_jvp(primals, tangents):
  x, max_gradient = primals
  x_tangent, _ = tangents
  clipped_x = jnp.maximum(x, 1 / (4 * max_gradient**2))
  return jnp.sqrt(x), 0.5 * x_tangent / jnp.sqrt(clipped_x)


def rnn_scan(x, a, reset, h0):
  """``h_t = a_t * h_{t-1} + x_t`` over axis 1, restarting where ``reset``."""
  a = a * ~reset[..., None]
  if h0 is not None:
    x = x.at[:, 0].add(a[:, 0] * h0)

  def combine(left, right):
    a_l, x_l = left
    a_r, x_r = right
    return a_l * a_r, a_r * x_l + x_r

  _, y = jax.lax.associative_scan(combine, (a, x), axis=1)
  return y, y[:, -1]


def rnn_param_init(min_rad: float, max_rad: float, eps: float = 1e-8):
  """Init of ``a_param`` such that softplus-transformed radii lie in [min_rad, max_rad]."""

  def init(key, shape, dtype=jnp.float32):
    unif = jax.random.uniform(key, shape=shape, dtype=dtype)
    a_real = 0.5 * jnp.log(unif * (max_rad**2 - min_rad**2) + min_rad**2 + eps)
    return jnp.log(jnp.exp(-a_real) - 1.0)  # inverse softplus of -log(radius)

  return init


class RMSNorm(nn.Module):
  width: int
  eps: float = 1e-6

  def setup(self):
    self.scale = self.param('scale', nn.initializers.zeros_init(), [self.width])

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normed_x = x * jax.lax.rsqrt(var + self.eps)
    return normed_x * (self.scale + 1)


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int
  scale_by_sqrt_dim: bool = True

  def setup(self):
    self.input_embedding = self.param(
        'input_embedding', nn.initializers.normal(stddev=0.5),
        [self.vocab_size, self.embed_dim])

  def encode(self, x):
    x = self.input_embedding[(x,)]
    if self.scale_by_sqrt_dim:
      x = x * jnp.sqrt(self.embed_dim).astype(x.dtype)
    return x

  def decode(self, x):
    return x @ self.input_embedding.T


class Einsum(nn.Module):
  """``einsum(eqn, x, w) + b`` with the equation fixed at construction."""

  w_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  eqn: str
  w_init_variance_scale: float = 1.0

  def setup(self):
    self.w = self.param(
        'w',
        nn.initializers.variance_scaling(
            self.w_init_variance_scale, 'fan_in', 'normal', in_axis=1, out_axis=2,
            batch_axis=(0,)),
        self.w_shape)
    self.b = self.param('b', nn.initializers.zeros_init(), self.b_shape)

  def __call__(self, x):
    return jnp.einsum(self.eqn, x, self.w) + self.b


class BlockDiagonalLinear(nn.Module):
  """A linear layer whose weight is block-diagonal: one (Bs, Bs) block per head."""

  width: int
  num_blocks: int
  w_init_variance_scale: float = 1.0

  @property
  def block_width(self) -> int:
    return self.width // self.num_blocks

  def setup(self):
    self.w = self.param(
        'w',
        nn.initializers.variance_scaling(
            self.w_init_variance_scale, 'fan_in', 'normal', in_axis=-2, out_axis=-1,
            batch_axis=(0,)),
        [self.num_blocks, self.block_width, self.block_width])
    self.b = self.param('b', nn.initializers.zeros_init(), [self.num_blocks, self.block_width])

  def __call__(self, x):
    x = x.reshape(x.shape[:-1] + (self.num_blocks, self.block_width))
    y = jnp.einsum('...hi,hij->...hj', x, self.w) + self.b
    return y.reshape(y.shape[:-2] + (self.width,))


class Conv1D(nn.Module):
  """A causal depthwise convolution over time, one tap of ``w`` per shift."""

  width: int
  temporal_width: int
  w_init_variance_scale: float = 0.01

  def setup(self):
    self.w = self.param(
        'w',
        nn.initializers.variance_scaling(
            self.w_init_variance_scale, 'fan_in', 'normal', in_axis=0, out_axis=1),
        [self.temporal_width, self.width])
    self.b = self.param('b', nn.initializers.zeros_init(), [self.width])

  def __call__(self, x):
    t = x.shape[1]
    out = self.b
    for shift in range(self.temporal_width):
      x_window = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :t]
      out = out + x_window * self.w[self.temporal_width - shift - 1]
    return out


class RGLRU(nn.Module):
  """Real-Gated Linear Recurrent Unit (De et al. 2024, Griffin)."""

  width: int
  num_heads: int

  def setup(self):
    self.a_param = self.param('a_param', rnn_param_init(0.9, 0.999), [self.width])
    self.input_gate = BlockDiagonalLinear(self.width, self.num_heads)
    self.a_gate = BlockDiagonalLinear(self.width, self.num_heads)

  def __call__(self, x, segment_pos, prev_h=None):
    reset = segment_pos == 0
    gate_x = jax.nn.sigmoid(self.input_gate(x))
    gate_a = jax.nn.sigmoid(self.a_gate(x))
    log_a = -8.0 * gate_a * jax.nn.softplus(self.a_param)
    a = jnp.exp(log_a)
    a_square = jnp.exp(2 * log_a)
    gated_x = x * gate_x
    multiplier = sqrt_bound_derivative(1 - a_square, 1000)
    multiplier = reset[..., None] + ~reset[..., None] * multiplier
    normalized_x = gated_x * multiplier.astype(x.dtype)
    return rnn_scan(normalized_x, a, reset, prev_h)


class RecurrentBlock(nn.Module):
  width: int
  num_heads: int
  lru_width: int
  conv1d_temporal_width: int

  def setup(self):
    self.linear_y = nn.Dense(self.lru_width)
    self.linear_x = nn.Dense(self.lru_width)
    self.linear_out = nn.Dense(self.width)
    self.conv_1d = Conv1D(self.lru_width, self.conv1d_temporal_width)
    self.rg_lru = RGLRU(self.lru_width, self.num_heads)

  def __call__(self, x, segment_pos):
    y = jax.nn.gelu(self.linear_y(x))
    x = self.linear_x(x)
    x = self.conv_1d(x)
    x, _ = self.rg_lru(x, segment_pos)
    return self.linear_out(x * y)


class MLPBlock(nn.Module):
  width: int
  expanded_width: int

  def setup(self):
    self.ffw_up = Einsum(
        w_shape=(2, self.width, self.expanded_width),
        b_shape=(2, 1, 1, self.expanded_width),
        eqn='...td,cdD->c...tD')
    self.ffw_down = nn.Dense(self.width)

  def __call__(self, x):
    out = self.ffw_up(x)
    gate_value = jax.nn.gelu(out[0])
    return self.ffw_down(gate_value * out[1])


class ResidualBlock(nn.Module):
  config: GriffinConfig

  def setup(self):
    cfg = self.config
    self.temporal_pre_norm = RMSNorm(cfg.width)
    self.recurrent_block = RecurrentBlock(
        cfg.width, cfg.num_heads, cfg.lru_width, cfg.conv1d_temporal_width)
    self.channel_pre_norm = RMSNorm(cfg.width)
    self.mlp_block = MLPBlock(cfg.width, cfg.mlp_expanded_width)

  def __call__(self, x, segment_pos):
    raw_x = x
    x = self.recurrent_block(self.temporal_pre_norm(raw_x), segment_pos)
    residual = x + raw_x
    x = self.mlp_block(self.channel_pre_norm(residual))
    return x + residual


class Griffin(nn.Module):
  """``__call__(tokens, segment_pos) -> logits``."""

  config: GriffinConfig

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.width)
    self.blocks = [ResidualBlock(cfg, name=f'blocks.{i}') for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.width)

  def __call__(self, tokens, segment_pos):
    x = self.embedder.encode(tokens)
    for block in self.blocks:
      x = block(x, segment_pos)
    logits = self.embedder.decode(self.final_norm(x))
    c = self.config.logits_soft_cap
    return jnp.tanh(logits / c) * c


def make(key, config: GriffinConfig | None = None, batch: int = 2, seq: int = 8):
  """``(model.apply, params, (tokens, segment_pos))``."""
  config = config or GriffinConfig()
  model = Griffin(config)
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (batch, seq), 0, config.vocab_size)
  segment_pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  params = jax.jit(model.init)(key, tokens, segment_pos)
  return model.apply, params, (tokens, segment_pos)
