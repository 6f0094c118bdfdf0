"""Emotion-Qwen for transformers: Qwen2.5-VL with its patch merger replaced by the Hybrid Compressor.

Shipped in exports of ``emoqwen_jax`` (``emoqwen-convert to-hf``) and loaded with
``AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)``. Everything except the
compressor and the M-RoPE position rule is transformers' own Qwen2.5-VL code.

Shapes: P patches, U = P / M merged units (M = spatial_merge_size**2), Dv ViT width, D LLM width, E experts,
G images/videos in one vision call, k = top_k.

Compressor (``visual.compressor.*``):
  * ``experts.{e}``: E Qwen2.5-VL patch mergers (``ln_q``, ``mlp.0``, ``mlp.2``, HF's own class).
  * paper mode (``routing='sample'``): ``gate`` turns each image/video into softmax weights over the experts
    from its mean ViT feature (or attention over all its tokens, ``gate_input='tokens'``):
    self-attention (q/k/v/out_proj with bias) -> [Linear -> ReLU -> LayerNorm] x 2 -> head -> softmax;
    tokens = sum_e w[item, e] * expert_e(units).
  * scale mode (``routing='token'``): ``router`` (float32, no bias) picks each unit's top-k experts, weights
    softmaxed over the chosen k. Units are routed in groups of ``group_size`` consecutive units; capacity per
    expert and group ceil(S * k / E * capacity_factor), at most S (``capacity_factor`` <= 0: dropless);
    priority within a group: every unit's first choice before any second choice, then unit order (window
    order, as in ``emoqwen_jax``); a fully dropped unit becomes a zero vector. Groups start at the first unit
    of each vision call (HF encodes images and videos in separate calls; ``emoqwen_jax`` in one flat
    sequence, images first), so with drops the two agree when the image units fill whole groups (or a call
    holds all units); dropless checkpoints agree always.

Audio (``config.audio['enabled']``): ``audio_tower`` is transformers' own ``Qwen2AudioEncoder`` (Whisper-style,
30 s windows of log-mel features), ``audio_projector`` a Linear (``linear``) or Linear-GELU-Linear
(``linear_1``/``linear_2``) to the LLM width. ``forward`` takes ``input_features`` float[W, M, 2 *
max_source_positions] (all audios' encoder windows, in text order) and ``feature_attention_mask`` int[W, F]; each
window gives its first ``output_lengths(mask.sum())`` rows, which fill the ``<|AUDIO|>`` tokens in order (the
keys past a window's audio are masked, as in Qwen2-Audio). Audio tokens take text-like positions. ``generate``
takes the same inputs (plus ``emoqwen_jax``'s optional ``audio_lengths``, checked against the mask) and uses
them at the prefill only.

Positions: ``get_rope_index`` follows the rule Qwen2.5-VL was released with (transformers 4.50): text after
a vision block resumes at the block's maximum position + 1 (transformers >= 5.3 resumes at
start + max(h, w) / merge instead), so ``generate`` matches ``emoqwen_jax`` on any video.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from .configuration_emotion_qwen import EmotionQwenConfig


class GateAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (bias), as ``emoqwen_jax``'s gate."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float[B, T, Dv] (attention over all T) -> float[B, T, Dv]."""
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = (q.float() @ k.float().transpose(-1, -2)) * (d // self.num_heads) ** -0.5
        out = logits.softmax(-1).to(v.dtype) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class EmotionQwenGate(nn.Module):
    """Per-item expert weights float32[G, E] from the item's ViT features."""

    def __init__(self, dim: int, cfg: dict):
        super().__init__()
        hid = cfg["gate_hidden_size"]
        self.attention = GateAttention(dim, cfg["gate_num_heads"])
        self.fc1, self.norm1 = nn.Linear(dim, hid), nn.LayerNorm(hid, eps=1e-5)
        self.fc2, self.norm2 = nn.Linear(hid, hid), nn.LayerNorm(hid, eps=1e-5)
        self.head = nn.Linear(hid, cfg["num_experts"])
        self.gate_input = cfg["gate_input"]

    def forward(self, features: torch.Tensor, patches_per_item: list[int]) -> torch.Tensor:
        """features float[P, Dv] (items contiguous, in ``patches_per_item`` order) -> float32[G, E]."""
        items = features.split(patches_per_item)
        if self.gate_input == "pooled":  # the release: attention over one mean vector per item
            pooled = torch.stack([x.float().mean(0) for x in items]).to(features.dtype)
            x = self.attention(pooled[:, None])[:, 0]
        else:  # attention over all of the item's tokens, then their mean
            x = torch.stack([self.attention(t[None])[0].float().mean(0) for t in items]).to(features.dtype)
        x = self.norm1(F.relu(self.fc1(x)))
        x = self.norm2(F.relu(self.fc2(x)))
        return self.head(x).float().softmax(-1)


def expert_capacity(num_units: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Rows per expert in a group of U units: ceil(U * k / E * factor), at most U; ``factor <= 0`` is dropless."""
    if capacity_factor <= 0:
        return num_units
    return max(1, min(num_units, math.ceil(num_units * top_k / num_experts * capacity_factor)))


class EmotionQwenCompressor(nn.Module):
    """Expert mergers plus the gate (paper mode) or the token router (scale mode)."""

    def __init__(self, vision_config, cfg: dict):
        super().__init__()
        dv, m = vision_config.hidden_size, vision_config.spatial_merge_size
        e = cfg["num_experts"]
        self.experts = nn.ModuleList(
            Qwen2_5_VLPatchMerger(dim=vision_config.out_hidden_size, context_dim=dv, spatial_merge_size=m)
            for _ in range(e))
        token = cfg["routing"] == "token"
        self.gate = EmotionQwenGate(dv, cfg) if not token and e > 1 else None
        self.router = nn.Linear(dv * m * m, e, bias=False) if token else None
        self.merge_unit, self.top_k, self.capacity_factor = m * m, min(cfg["top_k"], e), cfg["capacity_factor"]
        self.group_size = cfg["group_size"]

    def forward(self, features: torch.Tensor, patches_per_item: list[int]) -> torch.Tensor:
        """features float[P, Dv] -> tokens float[U, D] in the same (window) order."""
        if self.router is not None:
            return self._token_mode(features)
        if self.gate is None:
            return self.experts[0](features)
        weights = self.gate(features, patches_per_item)  # [G, E]
        units_per_item = torch.tensor([p // self.merge_unit for p in patches_per_item], device=features.device)
        unit_weights = weights.repeat_interleave(units_per_item, dim=0)  # [U, E]
        out = torch.stack([expert(features) for expert in self.experts])  # [E, U, D]
        return torch.einsum("eud,ue->ud", out.float(), unit_weights).to(out.dtype)

    def _token_mode(self, features: torch.Tensor) -> torch.Tensor:
        units = features.reshape(-1, self.merge_unit * features.shape[-1])  # [U, M*Dv]
        u, e, k = units.shape[0], len(self.experts), self.top_k
        logits = F.linear(units.float(), self.router.weight.float())  # the router runs in float32
        top_logits, ids = logits.topk(k, dim=-1)  # [U, k]
        weights = top_logits.softmax(-1)
        # Slot of each assignment in its expert's buffer within its group, first choices before second choices.
        slot = torch.empty_like(ids)
        for start in range(0, u, self.group_size):
            group = ids[start:start + self.group_size]
            onehot = F.one_hot(group.t().reshape(-1), e)  # [k*S, E], choice-major
            slot[start:start + self.group_size] = ((onehot.cumsum(0) - 1) * onehot).sum(-1).view(k, -1).t()
        keep = slot < expert_capacity(self.group_size, e, k, self.capacity_factor)
        out = torch.zeros(u, self.experts[0].mlp[2].out_features, dtype=features.dtype, device=features.device)
        for i, expert in enumerate(self.experts):
            rows, choice = ((ids == i) & keep).nonzero(as_tuple=True)
            if rows.numel():
                y = expert(units[rows].reshape(-1, features.shape[-1]))
                out.index_add_(0, rows, y * weights[rows, choice, None].to(y.dtype))
        return out


class EmotionQwenVisionTransformer(Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL's ViT whose merger is the Hybrid Compressor (``visual.compressor``)."""

    def __init__(self, config, compressor: dict):
        super().__init__(config)
        del self.merger
        self.compressor = EmotionQwenCompressor(config, compressor)

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """pixel rows float[P, C*T*p*p], grid_thw int[G, 3] -> last_hidden_state float[P, Dv] (window order),
        pooler_output float[U, D] (merged tokens in HF's spatial order). Same steps as Qwen2.5-VL's forward;
        only the merger call differs (the compressor needs the item boundaries)."""
        position_ids = get_vision_position_ids(grid_thw, self.spatial_merge_size, kwargs=kwargs)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config, kwargs=kwargs)
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
            patch_size=self.patch_size, kwargs=kwargs)
        max_window_seqlen = get_max_seqlen(cu_window_seqlens, self.config, kwargs=kwargs,
                                           kwarg_name="max_window_seqlen")
        hidden_states = self.patch_embed(hidden_states)
        seq_len = hidden_states.shape[0]
        hidden_states = self.permute_input_for_window_attn(hidden_states, window_index, seq_len=seq_len)
        position_embeddings = self.rotary_pos_emb(hidden_states, position_ids)
        position_embeddings = tuple(self.permute_input_for_window_attn(f, window_index, seq_len=seq_len)
                                    for f in position_embeddings)
        for layer_num, blk in enumerate(self.blocks):
            full = layer_num in self.fullatt_block_indexes
            hidden_states = blk(hidden_states, cu_seqlens=cu_seqlens if full else cu_window_seqlens,
                                max_seqlen=max_seqlen if full else max_window_seqlen,
                                position_embeddings=position_embeddings, **kwargs)
        # The window order keeps each item's patches contiguous, so items split by their patch counts.
        merged = self.compressor(hidden_states, grid_thw.prod(-1).tolist())
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states,
                                          pooler_output=merged[torch.argsort(window_index)])


def released_rope_index(input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw,
                        second_per_grid_ts, spatial_merge_size: int, tokens_per_second: float):
    """M-RoPE positions by the released rule -> (position_ids long[3, B, L], rope_deltas long[B, 1]).

    Text: one position on all three axes. Vision: t = floor(index * second_per_grid_t * tokens_per_second)
    (float32, 0 for images), h/w on the merged grid, all offset by the running position; the text after a
    block resumes at the block's maximum position + 1. Padding positions hold 1 (as in transformers 4.50).
    """
    b, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    position_ids = torch.ones(3, b, length, dtype=torch.long, device=input_ids.device)
    grids = {1: list(image_grid_thw.tolist()) if image_grid_thw is not None else [],
             2: list(video_grid_thw.tolist()) if video_grid_thw is not None else []}
    spts = (torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1).tolist()
            if second_per_grid_ts is not None else [1.0] * len(grids[2]))
    used = {1: 0, 2: 0}
    deltas = []
    for row in range(b):
        keep = mask[row].bool()
        types = mm_token_type_ids[row][keep].tolist()
        parts, pos, i = [], 0, 0
        while i < len(types):
            kind = types[i]
            if kind == 0:
                j = i
                while j < len(types) and types[j] == 0:
                    j += 1
                parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos, i = pos + j - i, j
                continue
            t, h, w = grids[kind][used[kind]]
            interval = spts[used[2]] if kind == 2 else 0.0
            used[kind] += 1
            lh, lw = h // spatial_merge_size, w // spatial_merge_size
            # float32 product, then truncation, as the released code and emoqwen_jax do.
            t_ids = (torch.arange(t, dtype=torch.float32) * torch.tensor(interval, dtype=torch.float32)
                     * torch.tensor(tokens_per_second, dtype=torch.float32)).long()
            block = torch.stack([t_ids.repeat_interleave(lh * lw), torch.arange(lh).repeat_interleave(lw).repeat(t),
                                 torch.arange(lw).repeat(t * lh)]) + pos
            parts.append(block)
            pos, i = int(block.max()) + 1, i + t * lh * lw
        positions = torch.cat(parts, 1) if parts else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, row, keep] = positions.to(position_ids.device)
        deltas.append((int(positions.max()) + 1 if positions.numel() else 0) - int(keep.sum()))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def _token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    """mm_token_type_ids (0 text, 1 image, 2 video) from the placeholder ids, for callers that omit them."""
    return ((input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long())


class EmotionQwenAudioProjector(nn.Module):
    """Audio features float[..., Da] -> float[..., D]: ``linear`` (Qwen2-Audio) or ``linear_1`` -> GELU ->
    ``linear_2``."""

    def __init__(self, audio: dict, out_features: int):
        super().__init__()
        self.kind = audio["projector"]
        if self.kind == "linear":
            self.linear = nn.Linear(audio["d_model"], out_features)
        else:
            hidden = audio["projector_hidden_size"] or out_features
            self.linear_1, self.linear_2 = nn.Linear(audio["d_model"], hidden), nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.linear(x)
        return self.linear_2(F.gelu(self.linear_1(x)))


def audio_output_lengths(feature_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask int[W, F] -> (rows after the encoder's stride-2 convolution, audio tokens after its pooling), long[W]
    each, per window."""
    conv = (feature_attention_mask.long().sum(-1) - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


def check_audio_lengths(audio_lengths, feature_attention_mask: torch.Tensor) -> None:
    """``audio_lengths`` int[n_aud, 2] = (windows, tokens) of each audio, in text order (``emoqwen_jax``'s
    input): ValueError unless the masks of each audio's windows give its tokens (windows past the audios are
    padding)."""
    lengths = torch.as_tensor(audio_lengths).reshape(-1, 2).tolist()
    tokens = audio_output_lengths(feature_attention_mask)[1].tolist()
    windows = sum(w for w, _ in lengths)
    if windows > len(tokens) or any(tokens[windows:]):
        raise ValueError(f"audio_lengths {lengths} name {windows} windows; feature_attention_mask has {len(tokens)} "
                         f"with tokens {tokens}")
    start = 0
    for w, n in lengths:
        if sum(tokens[start:start + w]) != n:
            raise ValueError(f"audio_lengths {lengths}: an audio of windows {start}..{start + w - 1} has "
                             f"{sum(tokens[start:start + w])} tokens by feature_attention_mask, not {n}")
        start += w


def audio_encoder_config(audio: dict, attn_implementation: str | None) -> Qwen2AudioEncoderConfig:
    cfg = Qwen2AudioEncoderConfig(**{k: audio[k] for k in (
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "max_source_positions", "scale_embedding")})
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


class EmotionQwenModel(Qwen2_5_VLModel):
    config_class = EmotionQwenConfig

    def __init__(self, config: EmotionQwenConfig):
        # Built here rather than by Qwen2_5_VLModel.__init__, so the stock merger is never allocated.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = EmotionQwenVisionTransformer._from_config(config.vision_config, compressor=config.compressor)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        audio = getattr(config, "audio", None) or {}
        if audio.get("enabled"):
            self.audio_tower = Qwen2AudioEncoder(audio_encoder_config(audio, config._attn_implementation))
            self.audio_projector = EmotionQwenAudioProjector(audio, config.text_config.hidden_size)
        self.rope_deltas = None
        self.post_init()

    def get_audio_features(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder windows float[W, M, F] + mask int[W, F] -> the audio tokens float[n, D], window by window
        (each window's rows that hold audio), in the order the ``<|AUDIO|>`` tokens take them."""
        conv, out_len = audio_output_lengths(feature_attention_mask)
        max_conv = (input_features.shape[-1] - 1) // 2 + 1
        keep = (torch.arange(max_conv, device=conv.device)[None, :] < conv[:, None]).long()
        tower = self.audio_tower
        mask = create_bidirectional_mask(config=tower.config, attention_mask=keep, inputs_embeds=torch.zeros(
            keep.shape[0], max_conv, 1, dtype=tower.conv1.weight.dtype, device=keep.device))
        hidden = tower(input_features.to(tower.conv1.weight.dtype), attention_mask=mask).last_hidden_state
        rows = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < out_len[:, None]
        return self.audio_projector(hidden[rows])

    def get_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, **kwargs):
        if mm_token_type_ids is None:
            mm_token_type_ids = _token_types(self.config, input_ids)
        return released_rope_index(input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                   second_per_grid_ts, self.config.vision_config.spatial_merge_size,
                                   self.config.vision_config.tokens_per_second)

    def forward(self, input_ids=None, *args, mm_token_type_ids=None, input_features=None,
                feature_attention_mask=None, **kwargs):
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = _token_types(self.config, input_ids)
        audio_id = (getattr(self.config, "audio", None) or {}).get("audio_token_id")
        if input_features is not None and input_ids is not None and bool((input_ids == audio_id).any()):
            # Audio tokens first (vision scatters into the same embeddings afterwards, by its own placeholders).
            embeds = kwargs.get("inputs_embeds")
            embeds = self.get_input_embeddings()(input_ids) if embeds is None else embeds
            audio = self.get_audio_features(input_features, feature_attention_mask).to(embeds.dtype)
            where = (input_ids == audio_id).unsqueeze(-1).expand_as(embeds)
            if int((input_ids == audio_id).sum()) != audio.shape[0]:
                raise ValueError(f"{int((input_ids == audio_id).sum())} <|AUDIO|> tokens but the features give "
                                 f"{audio.shape[0]} audio tokens")
            kwargs["inputs_embeds"] = embeds.masked_scatter(where, audio)
        return super().forward(input_ids, *args, mm_token_type_ids=mm_token_type_ids, **kwargs)


AUDIO_INPUTS = ("input_features", "feature_attention_mask", "audio_lengths")


class EmotionQwenForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = EmotionQwenConfig

    def __init__(self, config: EmotionQwenConfig):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = EmotionQwenModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None, logits_to_keep=0,
                mm_encoder_outputs=None, input_features=None, feature_attention_mask=None, audio_lengths=None,
                **kwargs):
        """Qwen2.5-VL's forward plus the audio inputs: ``input_features`` float[W, M, F] and
        ``feature_attention_mask`` int[W, F] fill the ``<|AUDIO|>`` tokens (``EmotionQwenModel.forward``);
        ``audio_lengths`` int[n_aud, 2] (windows, tokens per audio, as ``emoqwen_jax`` takes them) is optional and
        only checked against the mask. Every argument is named here: ``generate`` accepts the keyword arguments
        that this signature names."""
        if input_features is not None and audio_lengths is not None:
            check_audio_lengths(audio_lengths, feature_attention_mask)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids, second_per_grid_ts=second_per_grid_ts,
            logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs, input_features=input_features,
            feature_attention_mask=feature_attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        """transformers' preparation; the audio inputs go to the prefill only (decode steps hold no
        ``<|AUDIO|>`` token: the cache already has the audio)."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in AUDIO_INPUTS:
                inputs.pop(key, None)
        return inputs

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        ids = model_kwargs.get("input_ids", inputs_tensor)
        if model_kwargs.get("mm_token_type_ids") is None and ids.dim() == 2 and not ids.is_floating_point():
            model_kwargs["mm_token_type_ids"] = _token_types(self.config, ids)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)


# The files use Qwen2.5-VL's names (``visual.*``, ``model.layers.*``, ``lm_head``). transformers maps them onto
# the modules (``model.visual.*``, ``model.language_model.*``) by class name, and skips custom code unless its
# class is registered: register ours with Qwen2-VL's own renames (also reversed by ``save_pretrained``).
# The audio modules are saved at the top level (``audio_tower.*``, ``audio_projector.*``, as Qwen2-Audio saves its
# tower): Qwen2-VL's ``^model(?!...)`` rule would otherwise move ``model.audio_tower`` under the language model.
_AUDIO_RENAMES = [WeightRenaming(source_patterns=r"^audio_tower", target_patterns="model.audio_tower"),
                  WeightRenaming(source_patterns=r"^audio_projector", target_patterns="model.audio_projector")]
for _ours, _theirs, _extra in (("EmotionQwenForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                                _AUDIO_RENAMES), ("EmotionQwenModel", "Qwen2VLModel", [])):
    # After Qwen2-VL's renames, which are applied in order (theirs leave ``audio_*`` alone; ours then place it).
    register_checkpoint_conversion_mapping(_ours, list(get_checkpoint_conversion_mapping(_theirs)) + _extra,
                                           overwrite=True)

__all__ = ["EmotionQwenForConditionalGeneration", "EmotionQwenModel", "EmotionQwenVisionTransformer"]
