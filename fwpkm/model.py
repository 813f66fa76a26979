"""The Qwen3-Next-style hybrid decoder (spec section 5) with PKM and fast-weight blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import FastWeightBlock
from .config import ModelConfig
from .fastweights import FastWeightOutput, FastWeightStream
from .layers import Attention, GatedDeltaNet, ProductKeyMemory, RMSNorm, SwiGLU


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, vocab]
    loss: Optional[Tensor] = None
    memory: dict = field(default_factory=dict)  # layer index -> FastWeightOutput


@dataclass
class ModelCache:
    """Streaming state of every layer: attention K/V, Gated DeltaNet state, fast-weight tail."""

    mixers: list
    memories: dict  # layer index -> FastWeightStream
    position: int = 0


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        d, kind = config.d_model, config.mixers[index]
        self.kind = kind
        self.mixer_norm = RMSNorm(d, config.norm_eps)
        if kind == "gdn":
            self.mixer = GatedDeltaNet(d, config.gdn)
        else:
            self.mixer = Attention(d, config.attention, window=config.attention.window if kind == "swa" else None)
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn = ProductKeyMemory(d, config.pkm) if index in config.pkm_layers else SwiGLU(d, config.ffn_hidden)
        self.memory = FastWeightBlock(d, config.block, config.norm_eps) if index in config.memory_layers else None
        self.memory_first = config.block.placement == "before_mixer"

    def forward(self, h: Tensor, mask: Optional[Tensor], mixer_cache, stream: Optional[FastWeightStream],
                swa_window: Optional[int], chunk_size: Optional[int]) -> tuple[Tensor, Optional[FastWeightOutput]]:
        mem_out = None
        if self.memory is not None and self.memory_first:
            h, mem_out = self.memory(h, mask, stream=stream, chunk_size=chunk_size)
        x = self.mixer_norm(h)
        if self.kind == "fa" and swa_window is not None:
            h = h + self.mixer(x, cache=mixer_cache, window=swa_window)
        else:
            h = h + self.mixer(x, cache=mixer_cache)
        if self.memory is not None and not self.memory_first:
            h, mem_out = self.memory(h, mask, stream=stream, chunk_size=chunk_size)
        return h + self.ffn(self.ffn_norm(h)), mem_out


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                cache: Optional[ModelCache] = None, fa_to_swa: bool = False,
                chunk_size: Optional[int] = None) -> LMOutput:
        """Next-token logits. ``mask`` [B, T] marks real tokens (padding 0) for the memory loss;
        ``fa_to_swa`` turns full attention into sliding windows of the memory chunk size;
        ``cache`` streams the input (see :meth:`new_cache`)."""
        if fa_to_swa and cache is not None:
            raise ValueError("fa_to_swa is a training trick and cannot be combined with a streaming cache")
        swa_window = self.config.block.chunk_size if fa_to_swa else None
        h = self.embed(input_ids)
        memory = {}
        for i, layer in enumerate(self.layers):
            mixer_cache = None if cache is None else cache.mixers[i]
            stream = None if cache is None else cache.memories.get(i)
            h, mem_out = layer(h, mask, mixer_cache, stream, swa_window, chunk_size)
            if mem_out is not None:
                memory[i] = mem_out
        if cache is not None:
            cache.position += input_ids.shape[1]
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return LMOutput(logits, loss, memory)

    # -- streaming ------------------------------------------------------------------
    def new_cache(self, chunk_size: Optional[int] = None) -> ModelCache:
        """A streaming cache; ``chunk_size`` overrides the fast-weight chunk size for evaluation."""
        return ModelCache(
            mixers=[layer.mixer.new_cache() for layer in self.layers],
            memories={i: layer.memory.new_stream(chunk_size) for i, layer in enumerate(self.layers)
                      if layer.memory is not None},
        )

    def flush(self, cache: ModelCache) -> None:
        """Write every layer's pending partial chunk into its fast weights."""
        for i, stream in cache.memories.items():
            self.layers[i].memory.memory.flush(stream)

    # -- fast weights ---------------------------------------------------------------
    def fast_weight_memories(self) -> dict:
        """Layer index -> the memory core holding that layer's fast weights."""
        return {i: layer.memory.memory for i, layer in enumerate(self.layers) if layer.memory is not None}

    def fast_weight_state(self) -> dict:
        return {f"{i}.{k}": t.detach().clone() for i, m in self.fast_weight_memories().items()
                for k, t in m.state_dict().items()}

    def reset_fast_weights(self, seed: Optional[int] = None) -> None:
        """Every memory back to freshly initialised fast weights (spec section 1); from ``seed`` when
        given, without touching the global random state."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for memory in self.fast_weight_memories().values():
                memory.reset_state()

    def load_fast_weight_state(self, state: dict) -> None:
        for i, m in self.fast_weight_memories().items():
            m.load_state_dict({k.split(".", 1)[1]: t for k, t in state.items() if k.split(".", 1)[0] == str(i)})


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
