"""A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention through ``F.scaled_dot_product_attention``.

Parameter names are Hugging Face ``LlamaForCausalLM``'s, so a state dict saves, loads and streams into vLLM as is.
RoPE uses the rotate-half layout of Hugging Face Llama/Qwen2 (``apply_rope``), which is the layout their checkpoints'
``q_proj``/``k_proj`` rows are in: imported weights need no Q/K permutation. Two switches cover the pretrained
families genloop imports (``models/checkpoint.py`` maps their ``config.json``): ``qkv_bias`` (Qwen2: q/k/v carry a
bias, o does not) and ``rope_scaling`` (Llama 3.1's ``llama3`` inverse frequencies).
Parallelism (DDP/FSDP2) lives in ``models/parallel.py``, not here. ``generate`` decodes with a KV cache through the
model's own ``forward`` (``cache=KVCache(...)``): small evals and tests; serving and rollouts go through vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Architecture only. ``vocab_size: 0`` means "from the tokenizer, rounded up to a multiple of 64"."""

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 384
    vocab_size: int = 0
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    qkv_bias: bool = False  # Qwen2: q_proj, k_proj, v_proj have a bias (o_proj has none)
    # Llama 3.1's "llama3" rope: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_scaling: dict[str, float] | None = None
    family: str = "llama"  # the Hugging Face architecture a checkpoint is exported as: "llama" or "qwen2"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.vocab_size <= 0:
            raise ValueError("model.vocab_size is unset; build the config with for_tokenizer(n_vocab)")

    def for_tokenizer(self, n_vocab: int) -> "ModelConfig":
        """This config with ``vocab_size`` fitted to a tokenizer (kept if already big enough)."""
        if self.vocab_size and self.vocab_size >= n_vocab:
            return self
        return replace(self, vocab_size=64 * math.ceil(n_vocab / 64))

    def num_params(self, embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_hidden + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + self.dim + (emb if embeddings else 0)

    def matmul_params(self, head_out: int | None = None) -> int:
        """Weights that multiply activations: every block's q/k/v/o and gate/up/down projections, plus the output
        projection (``dim x head_out``; ``head_out`` defaults to ``vocab_size``, the LM head; a scalar head is 1),
        counted even when tied to the embedding table: its matmul runs either way. The input embedding (a lookup,
        not a matmul) and the norm weights are left out."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_hidden
        return self.n_layers * block + self.dim * (self.vocab_size if head_out is None else head_out)

    def flops_per_token(self, seq_len: int, head_out: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the one count ``genloop plan`` and the training loop's MFU
        use: ``6 x matmul_params(head_out)`` (2 per weight forward, 4 backward) plus the attention scores and their
        weighted sum, ``12 x n_layers x n_heads x head_dim x seq_len`` (QK^T and AV over the whole window, no causal
        discount; PaLM appendix B, torchtitan's ``get_num_flop_per_token``)."""
        return 6 * self.matmul_params(head_out) + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=192, max_seq_len=128),
    # demo: sized for a 2-core CPU and ~7 minutes (more steps of a smaller model beat fewer of a bigger one there);
    # head_dim 32 is one vLLM's CPU attention supports
    "demo": ModelConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_hidden=512, max_seq_len=256),
    "gpt2-124m": ModelConfig(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048, vocab_size=50304, max_seq_len=1024
    ),
    "llama-1b": ModelConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=8192,
        vocab_size=128256,
        max_seq_len=8192,
        rope_theta=500000.0,
    ),
    "llama-8b": ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        vocab_size=128256,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, float] | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies; with ``scaling`` those of Llama 3.1's ``llama3`` rope (transformers'
    ``_compute_llama3_parameters``): wavelengths shorter than ``original / high_freq_factor`` stay, those longer than
    ``original / low_freq_factor`` are divided by ``factor``, the ones between blend the two."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict[str, float] | None = None
) -> tuple[torch.Tensor, ...]:
    """cos, sin of shape (B, 1, T, head_dim) in the rotate-half layout Hugging Face Llama uses."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: "KVCache | None" = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, KV, past + T, hd)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: "KVCache | None" = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of the tokens a decoder has seen, per layer, each (B, KV, T_seen, hd): ``forward(...,
    cache=c)`` appends the new tokens' and attends over all of them."""

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        """Tokens seen so far."""
        return 0 if self.k[0] is None else int(self.k[0].shape[2])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Decoder(nn.Module):
    """The trunk (``model.*`` in Hugging Face names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))  # residual branches (GPT-2)
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); restarts per packed sample
        doc_ids: torch.Tensor | None = None,  # (B, T); attention stays within equal ids
        hidden_only: bool = False,
        cache: KVCache | None = None,  # keys/values of the tokens seen before these (appended to here)
        logits_at: torch.Tensor | None = None,  # (B, K) positions: logits only there (TRL's logits_to_keep)
    ) -> torch.Tensor:
        """Logits (B, T, vocab), (B, K, vocab) at ``logits_at``, or the final hidden states (B, T, dim) with
        ``hidden_only``. ``logits_at`` skips the vocabulary projection everywhere else: an RL answer of a few
        tokens after a long prompt needs the head (a quarter of a 135M model's work per token) only at the answer."""
        x = self.hidden_states(input_ids, position_ids, doc_ids, cache)
        if hidden_only:
            return x
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, dim)
        return self.lm_head(x)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The trunk: final normed hidden states (B, T, dim), what a head (lm_head, a scalar score) reads. With
        ``cache``, the ``T`` tokens follow the ``len(cache)`` already seen (positions continue from there)."""
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, dim)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, self.cfg.rope_scaling)
        mask = None
        if doc_ids is not None:
            if past:
                raise ValueError("doc_ids (packed samples) cannot be combined with a KV cache")
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)
            mask = mask[:, None]  # (B, 1, T, T)
        elif past:  # the new tokens see every cached one, and each other causally: (T, past + T)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.model.norm(x)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> list[int]:
    """Autoregressive sampling (greedy at temperature 0) with a KV cache through the model's own ``forward``: the
    prompt once, then one token per step. Stops at a stop id (kept in the output), after ``max_new_tokens``, or when
    the context (``max_seq_len``) is full. ``model``: the plain module (``models.parallel.unwrap`` a wrapped one; FSDP2
    shards still gather in its forward). For tests and small evals; serving and RLHF rollouts go through vLLM
    (``models/engine.py``).
    """
    cfg = model.cfg
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    if len(prompt) >= cfg.max_seq_len:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room in the context of {cfg.max_seq_len}; shorten it"
        )
    model.eval()
    device = next(model.parameters()).device
    cache = KVCache(cfg.n_layers)
    ids = torch.tensor([prompt], device=device)  # (1, T): the prompt, then one new token per step
    out: list[int] = []
    for _ in range(min(max_new_tokens, cfg.max_seq_len - len(prompt))):
        logits = model(ids, cache=cache)[0, -1].float()  # (vocab,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        out.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.tensor([[nxt]], device=device)
    return out
