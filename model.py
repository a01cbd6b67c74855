"""
The Command A transformer (report §2.3), numerically identical to Hugging Face's Cohere2ForCausalLM.

    x = x + attention(norm(x)) + mlp(norm(x))        one LayerNorm per block, parallel attention and MLP

Layers come in groups of four: three sliding-window layers with RoPE, then one full-attention layer with no
positional embedding (NoPE). GQA, SwiGLU, no biases, tied input/output embeddings times `logit_scale`.

Because the block is parallel, attention and MLP read the same normalised input: we fuse q, k, v, gate and up
into one matmul (`in_proj`) and the attention output and MLP down projections into another (`out_proj`), as in
PaLM. Two large matmuls per block instead of seven is the throughput win of the parallel block the report
cites. `convert_cohere2_state_dict` maps Cohere2's separate projections onto the fused ones.

Masked attention (packed documents, rows longer than the window) runs in flex_attention on GPU, with a block
mask that lets it skip the blocks the mask hides; SDPA with a dense mask stays the CPU path, long rows in
query blocks that each see only the keys they can attend to (`attend`). Both masks come from one rule,
`attention_rule`. Only the positions a loss scores go through the output projection (`Transformer.loss`).

Also here: FP8 block matmuls with dynamic tensorwise scaling (§2.4.1), the KV-cache generator in which
sliding-window layers keep a rolling buffer of `window` keys, and parameter and FLOP counts that need no
allocation (the 111B preset builds on the meta device). `python bench.py model` times it against
transformers' Cohere2ForCausalLM. A Hugging Face Cohere2 checkpoint becomes a stage's --out with
`python hf.py --from-hf DIR --out OUT` (hf.py sits above this file).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# Config and presets


@dataclass
class Config:
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    window: int = 128  # sliding-window layers see the last `window` keys, their own included
    full_every: int = 4  # every 4th layer is full attention with NoPE; the rest slide with RoPE (3:1)
    max_seq_len: int = 256  # the pretraining context; RoPE and NoPE themselves have no length limit
    rope_theta: float = 50000.0  # Cohere2 config.json (the report does not give it)
    logit_scale: float = 0.25  # Cohere2 config.json (the report does not give it)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # µP (report §2.4; Yang et al. 2021): the width whose hyper-parameters transfer; None = standard
    # parametrisation
    mup_base_dim: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "window",
                     "full_every", "max_seq_len", "rope_theta", "logit_scale", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Config.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"Config.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"Config.n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Config.dim / n_heads = {self.head_dim} must be even: RoPE rotates pairs")
        if self.mup_base_dim is not None and self.mup_base_dim <= 0:
            raise ValueError(f"Config.mup_base_dim must be positive, got {self.mup_base_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads  # as in Cohere2, which derives it the same way

    @property
    def width_mult(self) -> float:
        """dim / mup_base_dim under µP, else 1."""
        return self.dim / self.mup_base_dim if self.mup_base_dim else 1.0

    @property
    def output_scale(self) -> float:
        """The logit multiplier: logit_scale, divided by width_mult under µP (µP's readout multiplier 1/width,
        which keeps logits O(1) as the width grows; with tied embeddings the table itself keeps an O(1)
        init)."""
        return self.logit_scale / self.width_mult

    def is_sliding(self, layer: int) -> bool:
        return (layer + 1) % self.full_every != 0

    def num_params(self) -> int:
        """Exact parameter count from the shapes alone (tied embeddings counted once)."""
        attn = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        in_proj = self.dim * (attn + 2 * kv + 2 * self.ffn_dim)
        out_proj = (attn + self.ffn_dim) * self.dim
        per_block = self.dim + in_proj + out_proj  # LayerNorm weight + the two fused matmuls
        return self.vocab_size * self.dim + self.n_layers * per_block + self.dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM's accounting: 6 per matmul weight plus
        12 * n_heads * head_dim * context per layer for QK^T and AV, where a sliding layer's context is
        min(seq_len, window). Every matmul weight counts, the tied embedding once (as the output
        projection)."""
        matmul_params = self.num_params() - (self.n_layers + 1) * self.dim
        context = sum(min(seq_len, self.window) if self.is_sliding(i) else seq_len
                      for i in range(self.n_layers))
        return 6 * matmul_params + 12 * self.n_heads * self.head_dim * context

    @classmethod
    def from_cohere2(cls, hf_config: dict) -> "Config":
        """Our Config from a Hugging Face Cohere2 config.json (as a dict)."""
        if hf_config.get("model_type", "cohere2") != "cohere2":
            raise ValueError(f"model_type is {hf_config['model_type']!r}, expected 'cohere2'")
        n_layers = hf_config["num_hidden_layers"]
        full_every = hf_config.get("sliding_window_pattern", 4)
        layer_types = hf_config.get("layer_types")
        expected = ["sliding_attention" if (i + 1) % full_every else "full_attention"
                    for i in range(n_layers)]
        if layer_types is not None and list(layer_types) != expected:
            raise ValueError(f"layer_types must be {full_every - 1} sliding layers then 1 full, repeated; "
                             f"got {layer_types}")
        rope = hf_config.get("rope_parameters") or {}
        n_heads = hf_config["num_attention_heads"]
        return cls(
            vocab_size=hf_config["vocab_size"],
            dim=hf_config["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
            ffn_dim=hf_config["intermediate_size"],
            window=hf_config["sliding_window"],
            full_every=full_every,
            max_seq_len=hf_config.get("max_position_embeddings", 8192),
            rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 50000.0)),
            logit_scale=hf_config["logit_scale"],
            norm_eps=hf_config.get("layer_norm_eps", 1e-5),
        )


PRESETS = {
    # ~1.3M parameters: the classroom pipeline on a 2-core CPU
    "tiny": Config(),
    # ~101M parameters: one consumer GPU
    "small": Config(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                    window=1024, max_seq_len=2048),
    # The full-size presets: shapes, window 4096 and vocabulary 256,000 from the released Cohere2 config.json
    # files (the report gives no shapes, no window, and a vocabulary of 255,000)
    # Command R7B: 8.03B
    "r7b": Config(vocab_size=256000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                  window=4096, max_seq_len=8192),
    # Command A: 111.06B
    "command-a": Config(vocab_size=256000, dim=12288, n_layers=64, n_heads=96, n_kv_heads=8, ffn_dim=36864,
                        window=4096, max_seq_len=8192),
}


# -----------------------------------------------------------------------------
# FP8 matmuls (§2.4.1): e4m3 activations and weights, e5m2 gradients, one dynamic scale per tensor


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale x so its largest magnitude maps to the format's maximum, then cast. Returns the FP8 tensor and
    the inverse scale that _scaled_mm multiplies back in. Clamp first: e5m2 overflows to inf, not to max."""
    fp8_max = torch.finfo(dtype).max
    scale = fp8_max / x.abs().max().float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype), scale.reciprocal()


def scaled_mm(a, b, a_inv_scale, b_inv_scale, out_dtype):
    """(a @ b) * a_inv_scale * b_inv_scale for FP8 a and b, checking the layout rules the GPU kernel enforces
    (and the CPU one does not): `a` row-major, `b` column-major, every dimension a multiple of 16.

    On GPU this is torch._scaled_mm. torch's CPU _scaled_mm is a reference kernel some 500x slower than an
    fp32 matmul, so on CPU we do the same arithmetic as a plain fp32 matmul: FP8 values and their products are
    exact in fp32, and accumulation is in fp32 in both (tests check the two agree)."""
    if a.stride(1) != 1:
        raise RuntimeError(f"FP8 matmul: A {tuple(a.shape)} must be row-major, has strides {a.stride()}")
    if b.stride(0) != 1:
        raise RuntimeError(f"FP8 matmul: B {tuple(b.shape)} must be column-major, has strides {b.stride()}")
    if any(n % 16 for n in (*a.shape, b.shape[1])):
        raise RuntimeError(f"FP8 matmul: dimensions must be multiples of 16, "
                           f"got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.device.type == "cpu":
        return (a.float() @ b.float() * (a_inv_scale * b_inv_scale)).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the token dimension to a multiple of 16 (zero rows change no product)."""
    return F.pad(x, (0, 0, 0, -x.shape[0] % 16))


class FP8Matmul(torch.autograd.Function):
    """y = x @ W^T with both operands in e4m3; backward casts the incoming gradient to e5m2. Only the FP8
    copies are saved for backward; the fp32 master weight is never modified."""

    @staticmethod
    def forward(ctx, x, weight):
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_2d = x.reshape(-1, x.shape[-1])
        x_fp8, x_inv = to_fp8(pad_rows(x_2d), torch.float8_e4m3fn)
        w_fp8, w_inv = to_fp8(weight, torch.float8_e4m3fn)
        out = scaled_mm(x_fp8, w_fp8.t(), x_inv, w_inv, out_dtype)[: x_2d.shape[0]]
        ctx.save_for_backward(x_fp8, w_fp8, x_inv, w_inv)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, w_fp8, x_inv, w_inv = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        g_fp8, g_inv = to_fp8(pad_rows(grad_2d), torch.float8_e5m2)
        # dX = G @ W needs W [out, in] column-major; dW = G^T @ X needs G^T row-major and X column-major
        grad_x = scaled_mm(g_fp8, w_fp8.t().contiguous().t(), g_inv, w_inv, ctx.x_dtype)
        grad_w = scaled_mm(g_fp8.t().contiguous(), x_fp8.t().contiguous().t(), g_inv, x_inv, torch.float32)
        return grad_x[: grad_2d.shape[0]].reshape(ctx.x_shape), grad_w.to(ctx.w_dtype)


class Linear(nn.Linear):
    """A bias-free linear layer whose matmul runs in FP8 while `fp8` is set (see Transformer.set_fp8)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = False

    def forward(self, x):
        return FP8Matmul.apply(x, self.weight) if self.fp8 else F.linear(x, self.weight)


# -----------------------------------------------------------------------------
# The transformer


class LayerNorm(nn.Module):
    """Cohere's LayerNorm: subtracts the mean, has a weight and no bias, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, self.eps).to(x.dtype)


def rope_rotations(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """e^(i * position * inv_freq) as complex64, shaped [B, 1, T, head_dim / 2] to broadcast over heads.
    Computed on the fly, not kept as a buffer, so that casting the model to bf16 cannot round inv_freq."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float) / head_dim)
    angles = positions[..., None].float() * inv_freq
    return torch.polar(torch.ones_like(angles), angles)[:, None]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) (GPT-J style, as Cohere2; Llama rotates halves instead): each
    pair, read as the complex number x[2i] + i x[2i+1], times its rotation: one multiply, where splitting the
    pairs, rotating and interleaving them again is several (2-3x the time: `python bench.py rows`)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


# The kernel that runs masked attention: "flex" (flex_attention with a block mask: blocks of the score matrix
# that the mask hides entirely are never computed), "sdpa" (scaled_dot_product_attention with a dense [T, T]
# boolean mask, which rules out its flash kernel and holds T^2 booleans per row), or "auto": flex on CUDA,
# SDPA elsewhere (torch 2.13's flex_attention has no backward on CPU).
ATTENTION_KERNEL = "auto"


def attention_rule(doc_ids: torch.Tensor | None, window: int | None):
    """Which keys a query may attend to, as a flex_attention mask_mod (row b, head h, query q, key k) -> bool:
    causal, within the query's own document (doc_ids [B, T]; None: a row is one document) and, for a
    sliding-window layer, q - window < k. Both kernels' masks come from this one function, so they cannot
    drift apart."""
    def mask_mod(b, h, q, k):
        visible = k <= q
        if window is not None:
            visible = visible & (q - k < window)
        if doc_ids is not None:
            visible = visible & (doc_ids[b, q] == doc_ids[b, k])
        return visible
    return mask_mod


def attention_masks(doc_ids: torch.Tensor | None, seq_len: int, window: int, device, flex: bool = False):
    """The masks of the sliding-window and the full layers, from attention_rule. With `flex`, BlockMasks:
    which 128 x 128 blocks of the score matrix are hidden, partly visible or fully visible, so that
    flex_attention skips the hidden ones. Otherwise boolean masks [B or 1, 1, T, T] for SDPA (True = may
    attend): the rule evaluated at every (row, query, key) by broadcasting (flex's create_mask does the same
    through vmap, more slowly). None stands for the plain causal mask, which SDPA applies itself and uses to
    skip the masked half."""
    if doc_ids is None and seq_len <= window:
        return None, None
    batch = 1 if doc_ids is None else doc_ids.shape[0]

    def build(rule):
        if flex:
            return create_block_mask(rule, batch, None, seq_len, seq_len, device=device)
        index = torch.arange(seq_len, device=device)
        rows = torch.arange(batch, device=device)[:, None, None, None]
        return rule(rows, 0, index[:, None], index[None, :]).expand(batch, 1, seq_len, seq_len)

    full = build(attention_rule(doc_ids, None)) if doc_ids is not None else None
    return build(attention_rule(doc_ids, window)), full


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled, once per process. Eager, flex_attention is a reference that computes every
    score, hidden or not; compiled, it is one fused kernel that skips the hidden blocks. Compiling takes tens
    of seconds per attention rule and shape; a new batch's doc_ids reuse the kernel."""
    return torch.compile(flex_attention)


# Queries per block of dense-masked attention (attend): of 32, 64, 128 and 256, 128 ran fastest on a CPU at
# 512 and 2,048 tokens, forward and backward
QUERY_BLOCK = 128


def attend(q, k, v, mask, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for GQA heads, q [B, n_heads, T, head_dim] and k, v [B, n_kv_heads,
    S, head_dim], by the kernel the mask was built for: flex_attention for a BlockMask (compiled on GPU;
    eager on CPU, a check of the rule rather than a speed-up), SDPA for a dense mask or None (causal). scale
    None is 1 / sqrt(head_dim); `window` is the sliding layer's (None: a full layer).

    SDPA scores every (query, key) pair of a dense mask, hidden or not: O(T^2) where a sliding layer needs
    O(T * window). So a long sequence's queries (q and k the same tokens: training, or a prompt's prefill)
    go in blocks of QUERY_BLOCK, each with the keys it can see: those since the window's start for a sliding
    layer, the causal prefix for a full one: the same sums up to rounding, and a sliding layer's work grows
    like T * window instead of T^2 (`python bench.py rows`: a training step at 2,048 tokens ~1.9x faster)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU attention runs in fp32 under bf16 autocast: its bf16 kernels take ~2x the time of fp32's
        # (forward and backward, 256-2,048 tokens; RESULTS.md), where the matmuls around it gain
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), mask, scale, window)
    if isinstance(mask, BlockMask):
        flex = compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    T = q.shape[2]
    if mask is None or T != k.shape[2] or T <= 2 * QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(T, start + QUERY_BLOCK)
        first = 0 if window is None else max(0, start - window + 1)
        keys = slice(first, end)
        blocks.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, keys], v[:, :, keys],
                                                     attn_mask=mask[..., start:end, keys], scale=scale,
                                                     enable_gqa=True))
    return torch.cat(blocks, dim=2)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever doc_id changes along a row."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


class Block(nn.Module):
    """x + attention(norm(x)) + mlp(norm(x)), with the five input and two output projections fused."""

    def __init__(self, config: Config, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding = config.is_sliding(layer)
        self.window = config.window if self.sliding else None
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # µP scores q.k / head_dim, not / sqrt(head_dim): q and k become correlated in training, so q.k grows
        # like head_dim, not its square root. None is SDPA's default 1 / sqrt(head_dim).
        self.attn_scale = 1 / config.head_dim if config.mup_base_dim else None
        attn, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.split_sizes = [attn, kv, kv, config.ffn_dim, config.ffn_dim]  # q, k, v, gate, up
        self.norm = LayerNorm(config.dim, config.norm_eps)
        self.in_proj = Linear(config.dim, sum(self.split_sizes))
        self.out_proj = Linear(attn + config.ffn_dim, config.dim)  # [o_proj | down_proj]

    def forward(self, x, rotations, mask, cache=None):
        B, T, _ = x.shape
        q, k, v, gate, up = self.in_proj(self.norm(x)).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.sliding:  # full-attention layers use no positional embedding (NoPE)
            q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        attn = attend(q, k, v, mask, self.attn_scale, self.window).transpose(1, 2).reshape(B, T, -1)
        return x + self.out_proj(torch.cat([attn, F.silu(gate) * up], dim=-1))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = (scale * hidden) @ weight^T against targets (-100 = ignored), a chunk of
    rows at a time. The full logits would be [tokens, vocab]: 8 GB in fp32 for one 8k-token sequence at vocab
    256k. Each chunk's gradient, (softmax - onehot) / n_valid, is used at once, so backward only scales the
    two saved gradients; the matmul FLOPs are those of the unchunked forward + backward. Everything here runs
    in fp32 with autocast off, as Transformer.logits: §2.4.1 keeps the output embeddings in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_size=256):
        ctx.dtypes = hidden.dtype, weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, weight = hidden.float() * scale, weight.float()
            valid = targets != -100
            n_valid = valid.sum().clamp(min=1)
            needs_grad = any(ctx.needs_input_grad[:2])
            grad_h = torch.empty_like(hidden, dtype=torch.float) if needs_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float) if needs_grad else None
            total = torch.zeros((), device=hidden.device)
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = h[rows] @ weight.t()
                target = targets[rows].clamp(min=0)[:, None]
                target_logit = logits.gather(1, target).squeeze(1)
                max_logit = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(max_logit).exp_()  # in place: one [rows, vocab] buffer for the whole chunk
                sum_exp = exp.sum(dim=-1)
                log_z = max_logit.squeeze(1) + sum_exp.log()
                total += ((log_z - target_logit) * valid[rows]).sum()
                if needs_grad:  # d loss / d logits = (softmax - onehot(target)) * valid / n_valid
                    weight_row = valid[rows] / n_valid
                    grad_logits = exp.mul_((weight_row / sum_exp)[:, None])
                    grad_logits.scatter_add_(1, target, -weight_row[:, None].to(grad_logits.dtype))
                    grad_h[rows] = grad_logits @ weight * scale
                    grad_w += grad_logits.t() @ h[rows]
            ctx.save_for_backward(grad_h, grad_w)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]),
                None, None, None)


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)  # also the output projection (tied)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = LayerNorm(config.dim, config.norm_eps)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std) for matmul weights, scaled by 1/sqrt(2 n_layers) on the projections into the
        residual stream (GPT-2); LayerNorm weights 1. Call after materialising a model built on meta. Under µP
        the block matrices' std shrinks by sqrt(width_mult) (variance ~ 1/fan_in); the embedding's does
        not."""
        nn.init.normal_(self.embed.weight, std=self.config.init_std)
        std = self.config.init_std / math.sqrt(self.config.width_mult)
        for block in self.blocks:
            nn.init.normal_(block.in_proj.weight, std=std)
            nn.init.normal_(block.out_proj.weight, std=std / math.sqrt(2 * self.config.n_layers))
        for module in self.modules():
            if isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)

    def hidden_states(self, idx, doc_ids=None, positions=None, cache=None):
        """Final (normed) hidden states [B, T, dim]. doc_ids [B, T] marks packed documents, which attend only
        within themselves and whose positions restart at 0 unless `positions` is given."""
        B, T = idx.shape
        if positions is None:
            positions = (document_positions(doc_ids) if doc_ids is not None
                         else torch.arange(T, device=idx.device)[None])
        if cache is None or cache.seen == 0:
            # generation keeps SDPA: its prompts change length from batch to batch, and flex would recompile
            flex = cache is None and {"flex": True, "sdpa": False, "auto": idx.is_cuda}[ATTENTION_KERNEL]
            sliding_mask, full_mask = attention_masks(doc_ids, T, self.config.window, idx.device, flex)
        elif T == 1:
            sliding_mask, full_mask = cache.decode_masks()
        else:
            raise ValueError(f"after the prompt, a KV cache takes one token per step, got {T}")
        rotations = rope_rotations(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, rotations, sliding_mask if block.sliding else full_mask, cache)
        if cache is not None:
            cache.seen += T
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection times logit_scale, in fp32 with autocast off: §2.4.1 keeps the output
        embeddings in fp32 while the blocks run in bf16 or FP8. The scale multiplies the [B, T, dim] hidden
        states, not the [B, T, vocab] logits: the same product (0.25 is a power of two: even the rounding is
        identical) for vocab/dim times less work."""
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float() * self.config.output_scale, self.embed.weight.float())

    def forward(self, idx, doc_ids=None, positions=None, cache=None):
        return self.logits(self.hidden_states(idx, doc_ids, positions, cache))

    def loss(self, idx, targets, doc_ids=None, positions=None):
        """Mean next-token cross-entropy over the targets that are not -100 (masked), computed by
        ChunkedCrossEntropy without ever holding all [B, T, vocab] logits. Only the scored positions go
        through the output projection, about 30 % of a step's FLOPs at the tiny preset: an SFT batch scores
        its replies, 2-44 % of its rows' tokens (RESULTS.md)."""
        targets = targets.flatten()
        scored = targets != -100
        hidden = self.hidden_states(idx, doc_ids, positions).flatten(0, 1)[scored]
        return ChunkedCrossEntropy.apply(hidden, self.embed.weight, targets[scored], self.config.output_scale)

    def sequence_logps(self, idx, targets, doc_ids, n_sequences: int, positions=None, average=False):
        """log π(completion | prompt) of each packed sequence: the sum (or, with `average`, the per-token
        mean, §3.5) of the log-probs of its scored targets (those not -100; only they are projected to
        logits). Sequence s is where doc_ids == s, as data.pack lays them out (-1 marks padding). Returns
        [n_sequences], differentiable."""
        targets, scored = targets.flatten(), (targets != -100).flatten()
        logits = self.logits(self.hidden_states(idx, doc_ids, positions).flatten(0, 1)[scored])
        targets, doc_ids = targets[scored], doc_ids.flatten()[scored]
        token_logps = -F.cross_entropy(logits, targets, reduction="none")
        sums = token_logps.new_zeros(n_sequences).index_add(0, doc_ids, token_logps)
        if not average:
            return sums
        counts = token_logps.new_zeros(n_sequences).index_add(0, doc_ids, torch.ones_like(token_logps))
        return sums / counts.clamp(min=1)

    def set_fp8(self, enabled: bool):
        """Switch the block matmuls (not the embedding/output projection) between FP8 and the ambient
        dtype."""
        for block in self.blocks:
            for linear in (block.in_proj, block.out_proj):
                if enabled and (linear.in_features % 16 or linear.out_features % 16):
                    raise ValueError(f"FP8 needs matmul dimensions that are multiples of 16; "
                                     f"block {block.layer} has a {linear.in_features} -> "
                                     f"{linear.out_features} projection")
                linear.fp8 = enabled

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module.load_state_dict, but a shape mismatch is one ValueError naming the key and both
        shapes."""
        own = self.state_dict()
        for key, tensor in state_dict.items():
            if key in own and own[key].shape != tensor.shape:
                raise ValueError(f"state dict key {key!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(own[key].shape)}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


COHERE2_IN_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
COHERE2_OUT_PROJ = ("self_attn.o_proj", "mlp.down_proj")


def convert_cohere2_tensors(hf_tensors: dict, out: dict):
    """Move what is complete in `hf_tensors` (Cohere2ForCausalLM tensors, "model." prefix removed: a whole
    state dict, or the shards read so far) into `out`, our state dict: the embedding, the final norm, and each
    block whose eight tensors are all there, its projections fused. What is left is a block that straddles two
    shards, waiting for its other half (or keys that are no Cohere2's)."""
    for hf_name, name in (("embed_tokens.weight", "embed.weight"), ("norm.weight", "norm.weight")):
        if hf_name in hf_tensors:
            out[name] = hf_tensors.pop(hf_name)
    if "lm_head.weight" in hf_tensors and "embed.weight" in out:  # tied: no second matrix, if saved at all
        if not torch.equal(hf_tensors.pop("lm_head.weight"), out["embed.weight"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight; this model ties them")
    for i in sorted({int(key.split(".")[1]) for key in hf_tensors if key.startswith("layers.")}):
        parts = ("input_layernorm", *COHERE2_IN_PROJ, *COHERE2_OUT_PROJ)
        names = [f"layers.{i}.{part}.weight" for part in parts]
        if all(name in hf_tensors for name in names):
            norm, *projections = (hf_tensors.pop(name) for name in names)
            out[f"blocks.{i}.norm.weight"] = norm
            out[f"blocks.{i}.in_proj.weight"] = torch.cat(projections[:5], dim=0)  # [q; k; v; gate; up]
            out[f"blocks.{i}.out_proj.weight"] = torch.cat(projections[5:], dim=1)  # [o_proj | down_proj]


def convert_cohere2_state_dict(hf_state_dict: dict) -> dict:
    """Map a Hugging Face Cohere2ForCausalLM state dict onto ours (fusing the per-block projections)."""
    remaining, out = {key.removeprefix("model."): tensor for key, tensor in hf_state_dict.items()}, {}
    convert_cohere2_tensors(remaining, out)
    if remaining:
        raise ValueError(f"unexpected keys in the Cohere2 state dict: {sorted(remaining)[:5]}")
    return out


# -----------------------------------------------------------------------------
# KV-cache generation


class KVCache:
    """Keys and values of every layer for a batch of left-padded prompts. A sliding-window layer keeps a
    rolling buffer of `window` slots (token t lives in slot t % window), which is all it can ever attend to;
    a full layer keeps all `max_len` slots. Row b's first `pad_lens[b]` tokens are padding, never attended."""

    def __init__(self, config: Config, max_len: int, pad_lens: torch.Tensor):
        self.sizes = {True: min(config.window, max_len), False: max_len}  # by is_sliding
        self.sliding = [config.is_sliding(i) for i in range(config.n_layers)]
        self.keys = [None] * config.n_layers
        self.values = [None] * config.n_layers
        self.pad_lens = pad_lens
        self.seen = 0  # tokens written so far (the same for every row: padding counts)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values; return what this step attends to: during prefill the prompt's own
        keys (the masks handle window and padding), afterwards the whole buffer."""
        size = self.sizes[self.sliding[layer]]
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_zeros(B, H, size, D)
            self.values[layer] = v.new_zeros(B, H, size, D)
        slots = torch.arange(self.seen, self.seen + k.shape[2], device=k.device)[-size:] % size
        self.keys[layer].index_copy_(2, slots, k[:, :, -len(slots):])
        self.values[layer].index_copy_(2, slots, v[:, :, -len(slots):])
        return (k, v) if self.seen == 0 else (self.keys[layer], self.values[layer])

    def decode_masks(self):
        """Masks [B, 1, 1, size] for one new token at time t = seen: slot s holds the token of time
        t - ((t - s) mod size) (negative: never written); it is visible unless that token is padding."""
        masks = []
        for sliding in (True, False):
            slots = torch.arange(self.sizes[sliding], device=self.pad_lens.device)
            slot_time = self.seen - (self.seen - slots) % self.sizes[sliding]
            masks.append((slot_time[None] >= self.pad_lens[:, None])[:, None, None, :])
        return masks

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, otherwise nucleus sampling over the top_p probability
    mass."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix reaching top_p
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# no_grad, not inference_mode: under FSDP (distributed.generate_sharded) the buffers the weights are gathered
# into outlive the call, and training's gathers write into them, which an inference tensor forbids
@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, stop_tokens=(), generator: torch.Generator | None = None,
             return_cache=False, on_token=None, everyone_done=None):
    """Sample a continuation for every prompt (token lists of any lengths), batched with a KV cache.

    Prompts are left-padded; padding is a separate "document" for the masks and positions start at each
    prompt's first real token, so every row gets exactly the logits it would get alone. A row stops after
    emitting a stop token, which is kept in its output. `on_token`, if given, is called with each step's
    tokens [B] as they are sampled (a chat prints them). `everyone_done`, if given, turns "this batch is
    done" into "every process's batch is" (a sharded model decodes in step on all of them). Returns a list of
    token lists (and the cache, for inspection, if return_cache)."""
    device = model.embed.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if (lengths == 0).any():
        raise ValueError("generate: every prompt needs at least one token")
    prompt_len = int(lengths.max())
    pad_lens = prompt_len - lengths
    idx = torch.zeros(len(prompts), prompt_len, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, pad_lens[row]:] = torch.tensor(prompt, dtype=torch.long)
    index = torch.arange(prompt_len, device=device)[None]
    doc_ids = (index >= pad_lens[:, None]).long()  # padding is document 0, the prompt document 1
    positions = (index - pad_lens[:, None]).clamp(min=0)

    cache = KVCache(model.config, prompt_len + max_new_tokens, pad_lens)
    hidden = model.hidden_states(idx, doc_ids, positions, cache)[:, -1:]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    out = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    n_generated = 0
    for step in range(max_new_tokens):
        token = sample(model.logits(hidden)[:, -1], temperature, top_p, generator)
        out[:, step] = token
        n_generated += 1
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, stop)
        all_done = bool(done.all()) if everyone_done is None else everyone_done(bool(done.all()))
        if all_done or step == max_new_tokens - 1:
            break
        positions = (cache.seen - pad_lens)[:, None]
        hidden = model.hidden_states(token[:, None], positions=positions, cache=cache)

    results = []
    for row in out[:, :n_generated].tolist():
        stops = [i for i, t in enumerate(row) if t in stop_tokens]
        results.append(row[: stops[0] + 1] if stops else row)
    return (results, cache) if return_cache else results

