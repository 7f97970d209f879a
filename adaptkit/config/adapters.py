"""The recipe's ``adapter`` section: which fusion adapter, where the image enters the LM, and one
sub-section of settings per adapter kind (``adapter.qformer.*``, ``adapter.projector.*``,
``adapter.resampler.*``, ``adapter.xattn.*``); only the chosen kind's is read. The checks that depend on
a kind live beside its class (``FusionAdapter.config_problem`` in ``adaptkit/adapters``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adaptkit.config.fields import knob, section


@dataclass
class QFormerConfig:
    """BLIP-2's Q-Former (``adapter.kind: qformer``)."""

    num_queries: int = knob(
        8, "learned queries = soft tokens given to the LM (LM cost grows with each)", low=1
    )
    num_layers: int = knob(2, "Q-Former layers (self-attention, cross-attention to the image, FFN)", low=1)
    hidden_size: int = knob(384, "Q-Former width", low=1)
    num_heads: int = knob(6, "attention heads (must divide hidden_size)", low=1)
    mlp_ratio: float = knob(4.0, "FFN width / hidden_size", low=0.25)
    dropout: float = knob(0.0, "dropout inside the Q-Former", low=0.0, below=1.0)
    text_conditioned: bool = knob(
        False,
        """true: the queries also attend to the prompt (InstructBLIP), so what they extract can depend on the
        question; false: soft tokens depend on the image alone, which pack_questions > 1 needs""",
    )


@dataclass
class ProjectorConfig:
    """LLaVA-1.5's 2-layer GELU MLP on every image token (``adapter.kind: projector``)."""

    hidden_size: int = knob(0, "the MLP's hidden width (0: the LM's hidden size, LLaVA's choice)", low=0)
    pool_tokens: int = knob(
        0,
        """average neighbouring image tokens down to this many before the MLP (2-D pooling for square grids);
        0: one soft token per image token""",
        low=0,
    )
    dropout: float = knob(0.0, "dropout between the MLP's layers", low=0.0, below=1.0)


@dataclass
class ResamplerConfig:
    """Flamingo's perceiver resampler (``adapter.kind: resampler``, and the front of ``xattn`` with
    ``adapter.xattn.resampler: true``)."""

    num_queries: int = knob(8, "learned latents = soft tokens given to the LM", low=1)
    num_layers: int = knob(2, "resampler layers (latents attend to [image tokens; latents], FFN)", low=1)
    hidden_size: int = knob(384, "resampler width", low=1)
    num_heads: int = knob(6, "attention heads (must divide hidden_size)", low=1)
    mlp_ratio: float = knob(4.0, "FFN width / hidden_size", low=0.25)
    dropout: float = knob(0.0, "dropout inside the resampler", low=0.0, below=1.0)


@dataclass
class XAttnConfig:
    """Flamingo's gated cross-attention blocks inside the LM (``adapter.kind: xattn``)."""

    layers: list[int] = knob(
        [],
        """LM decoder layers that get a gated cross-attention block before them, ascending (e.g. [20, 22, 24,
        26, 28]); the first is where the image enters the LM""",
    )
    num_heads: int = knob(8, "attention heads of each block (must divide the LM's hidden size)", low=1)
    mlp_ratio: float = knob(4.0, "the blocks' FFN width / the LM's hidden size", low=0.25)
    dropout: float = knob(0.0, "dropout inside the blocks", low=0.0, below=1.0)
    resampler: bool = knob(
        False,
        """true: the blocks read a perceiver resampler's latents (sized by adapter.resampler.*) instead of
        every image token projected to the LM's width""",
    )


@dataclass
class AdapterConfig:
    """The trainable fusion between the frozen vision backbone and the frozen LM."""

    kind: str = knob(
        "qformer",
        """the fusion adapter (adaptkit/adapters): qformer | projector | resampler | xattn, or a kind
        registered in adaptkit.adapters.ADAPTERS""",
    )
    inject_layer: int = knob(
        0,
        """LM decoder layer whose input receives the soft tokens (qformer, projector, resampler). 0: the LM's
        input (LLaVA, BLIP-2). k > 0: the layers below k see only the text (behind a fixed sink token and
        placeholders), carry no LoRA, and training computes their states once per distinct text
        (lower_state_cache_mb) and runs only layers k.. per step. xattn enters at adapter.xattn.layers
        instead""",
        low=0,
    )
    qformer: QFormerConfig = section(QFormerConfig, "settings of adapter.kind: qformer")
    projector: ProjectorConfig = section(ProjectorConfig, "settings of adapter.kind: projector")
    resampler: ResamplerConfig = section(ResamplerConfig, "settings of adapter.kind: resampler")
    xattn: XAttnConfig = section(XAttnConfig, "settings of adapter.kind: xattn")
    options: dict[str, Any] = knob(
        {},
        "settings of an adapter kind registered outside adaptkit (its class reads and checks them)",
    )
