"""What a model costs per token and how much state it carries, from its config alone.

``flops_per_token(config, context)``: forward FLOPs (a multiply-add is 2) of one token at a
context of ``context`` tokens: every projection, the attention scores and mixing over the
positions a token attends to (full attention: the mean over a sequence of ``context``, about
``context / 2``; sliding window: ``window``), the Gated DeltaNet recurrence, the slow PKM's
sub-key scoring and reads, and each fast-weight memory's read plus its write (the chunk's
gradient step), counted as twice its read for FwPKM's touched rows and twice the MLP's forward
for FwMLP. Norms, activations, top-k selection and softmaxes are left out.

``state_size(config, context)``: the numbers a model carries from one token to the next when it
streams ``context`` tokens: attention KV caches (full: every token; sliding: ``window``), Gated
DeltaNet's matrix state and convolution tail, and the fast weights (FwPKM: keys and value table;
FwMLP: its weights). Slow weights are not state.
"""

from __future__ import annotations

from .config import ModelConfig


def _attention_flops(config: ModelConfig, mixer: str, context: int) -> float:
    a, d = config.attention, config.d_model
    projections = 2 * d * (2 * a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim)
    attended = min(a.window, context) if mixer == "swa" else context / 2
    return projections + 4 * a.n_heads * a.head_dim * attended


def _gdn_flops(config: ModelConfig) -> float:
    g, d = config.gdn, config.d_model
    inner = g.n_heads * g.head_dim
    projections = 2 * d * (3 * inner + 2 * g.n_heads + inner) + 2 * inner * d
    return projections + 2 * 3 * inner * g.conv_size + 6 * g.n_heads * g.head_dim ** 2  # conv, delta rule


def _fast_weight_flops(config: ModelConfig) -> float:
    block, d = config.block, config.d_model
    projections = 2 * d * (block.k_dim + block.v_dim + block.gate_outputs) + 2 * block.v_dim * d
    if block.kind == "fwmlp":
        m = block.fwmlp
        return projections + 3 * 2 * m.hidden * (2 * m.k_dim + m.v_dim)  # read, then write = 2 x read
    m = block.memory
    scoring = 2 * m.heads * m.n_subkeys * m.k_dim  # both halves against their n sub-keys
    return projections + scoring + 3 * 2 * m.heads * m.topk * m.v_dim


def _pkm_flops(config: ModelConfig) -> float:
    p, d = config.pkm, config.d_model
    return 2 * d * p.heads * p.k_dim + 2 * p.heads * p.n_subkeys * p.k_dim + 2 * p.heads * p.topk * p.v_dim + 2 * p.v_dim * d


def flops_per_token(config: ModelConfig, context: int) -> float:
    """Forward FLOPs of one token at ``context`` tokens (see the module docstring)."""
    total = 2 * config.d_model * config.vocab_size  # the output head
    for i, mixer in enumerate(config.mixers):
        total += _gdn_flops(config) if mixer == "gdn" else _attention_flops(config, mixer, context)
        total += _pkm_flops(config) if i in config.pkm_layers else 6 * config.d_model * config.ffn_hidden
        if i in config.memory_layers:
            total += _fast_weight_flops(config)
    return float(total)


def state_size(config: ModelConfig, context: int) -> int:
    """Numbers carried from token to token when streaming ``context`` tokens (see the module docstring)."""
    a, g, block = config.attention, config.gdn, config.block
    total = 0
    for i, mixer in enumerate(config.mixers):
        if mixer == "gdn":
            total += g.n_heads * g.head_dim ** 2 + 3 * g.n_heads * g.head_dim * (g.conv_size - 1)
        else:
            total += 2 * a.n_kv_heads * a.head_dim * (min(a.window, context) if mixer == "swa" else context)
        if i in config.memory_layers:
            if block.kind == "fwmlp":
                m = block.fwmlp
                total += m.hidden * (2 * m.k_dim + m.v_dim)
            else:
                m = block.memory
                total += m.n_slots * m.v_dim + m.heads * m.n_subkeys * m.k_dim
    return int(total)
