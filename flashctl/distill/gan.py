"""DMD2's GAN classifier: a small head on the critic's own intermediate features.

After Yin et al. 2024 ("Improved Distribution Matching Distillation", DMD2): the fake-score
network doubles as the discriminator's trunk. Its middle transformer block's image-token
features are mean-pooled over the noisy target's tokens (an edit's appended source tokens are
left out: real and fake share them) and a two-layer MLP maps them to one logit.

The head is registered as a submodule of the critic transformer *before* the critic's DeepSpeed
engine is built, so ZeRO-3 partitions it with the rest of the critic (DeepSpeed converts the
plain parameters at `deepspeed.initialize`), the critic's optimizer trains it, and the critic's
checkpoints carry it; the student never sees it. It runs at the end of every critic forward
(a forward hook on the transformer, outside any activation-checkpointed block), so ZeRO-3 sees
the same module order in every forward; `take_logits` reads the logits of the last forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HEAD = "gan_head"
"""Name of the head's submodule in the critic transformer (its parameters: `gan_head.*`)."""


class CriticHead(nn.Module):
    """Mean-pooled image-token features (B, seq, D) -> one logit per sample (B,)."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)
        g = torch.Generator().manual_seed(seed)  # same values on every rank, whatever the global RNG
        with torch.no_grad():
            for layer in (self.hidden, self.out):
                bound = layer.in_features ** -0.5
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.zero_()
        self.tokens: int | None = None  # the noisy target's token count in the current forward
        self.features: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features[:, : self.tokens].float().mean(dim=1)
        h = nn.functional.silu(self.hidden(self.norm(pooled).to(self.hidden.weight.dtype)))
        return self.out(h).squeeze(-1).float()


def attach_head(transformer: nn.Module, seed: int) -> CriticHead:
    """Give a Qwen-Image transformer a GAN head on its middle block; returns the head.

    Call before building the critic's engine (its parameters must be in the engine's module).
    The head is built in the transformer's dtype on its device; under ZeRO-3 the transformer's
    own parameters are partitioned already and the head's are converted by `deepspeed.initialize`.
    """
    blocks = transformer.transformer_blocks
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    first = next(transformer.parameters())
    head = CriticHead(dim, seed).to(device=first.device, dtype=first.dtype)
    transformer.add_module(HEAD, head)

    def count_tokens(_module, _args, kwargs):
        # img_shapes[0][0] = (frames, h, w) of the noisy target (an edit's source comes after it)
        f, h, w = kwargs["img_shapes"][0][0]
        head.tokens = int(f * h * w)

    def keep_features(_module, _args, output):
        head.features = output[1]  # the block returns (text stream, image stream)

    def classify(_module, _args, _kwargs, _output):
        features, head.features = head.features, None
        head.logits = head(features)

    transformer.register_forward_pre_hook(count_tokens, with_kwargs=True)
    blocks[len(blocks) // 2].register_forward_hook(keep_features)
    transformer.register_forward_hook(classify, with_kwargs=True)
    return head


def take_logits(critic: Any) -> torch.Tensor:
    """The GAN logits (B,) of the critic's last forward (a DeepSpeed engine or its module)."""
    head = getattr(getattr(critic, "module", critic), HEAD)
    logits, head.logits = head.logits, None
    if logits is None:
        raise RuntimeError("the critic ran no forward since its GAN logits were last read")
    return logits
