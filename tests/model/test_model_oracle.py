"""Whole-model parity with two DIFFERENT experts and a gate that matters, against an outside torch construction.

``test_model_parity.py`` imports HF checkpoints, where every expert is a copy of HF's merger, so the gate cannot
change the logits. Here the reference is built from Hugging Face's own modules: HF's ViT (its blocks, window
attention and ordering), two HF ``Qwen2_5_VLPatchMerger`` modules with different random weights, and a torch
gate written from the published structure with torch's own ``nn.MultiheadAttention`` and ``nn.LayerNorm``
(mean ViT feature of each image/video -> self-attention -> [Linear -> ReLU -> LayerNorm] x 2 -> Linear ->
softmax); the mixed visual tokens are placed at the placeholder positions and fed to the stock
``Qwen2_5_VLForConditionalGeneration`` through ``inputs_embeds`` with explicit ``position_ids`` from HF's
``get_rope_index`` (grids chosen where transformers' rule equals the released one; checked below).
"""

import hf_oracle as O
import numpy as np
import pytest
import torch
import torch_load as TL
from tolerance import assert_close_rel
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

from emoqwen_jax import layout
from emoqwen_jax.convert import from_hf
from emoqwen_jax.model import layout_spec

TOL = 1e-4
GATE = dict(gate_num_heads=4, gate_hidden_size=24)


class TorchGate(nn.Module):
    def __init__(self, dim: int, hidden: int, experts: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1, self.norm1 = nn.Linear(dim, hidden), nn.LayerNorm(hidden)
        self.fc2, self.norm2 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, experts)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled float[G, Dv] (one mean feature per item) -> weights float[G, E]."""
        x = pooled[:, None, :]
        x = self.attention(x, x, x, need_weights=False)[0][:, 0]  # self-attention over the single pooled token
        x = self.norm1(torch.relu(self.fc1(x)))
        x = self.norm2(torch.relu(self.fc2(x)))
        return torch.softmax(self.head(x), dim=-1)


class TorchHybridCompressor(nn.Module):
    """Stands in for ``visual.merger``: HF mergers as experts, mixed per item by the torch gate."""

    def __init__(self, experts: list[nn.Module], gate: TorchGate):
        super().__init__()
        self.experts, self.gate = nn.ModuleList(experts), gate
        self.item_patches: list[int] = []  # patches of each item of the current visual call (set by the caller)
        self.weights = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The window reordering permutes patches within each item, so items stay contiguous blocks.
        pooled = torch.stack([x.mean(0) for x in torch.split(hidden, self.item_patches)])
        weights = self.gate(pooled)
        self.weights.append(weights.detach())
        unit_item = torch.repeat_interleave(torch.arange(len(self.item_patches)),
                                            torch.tensor(self.item_patches) // 4)
        out = torch.stack([e(hidden) for e in self.experts])  # [E, U, D]
        return torch.einsum("eud,ue->ud", out, weights[unit_item])


def _reference(hf, compressor, ids, mask, vision):
    """Stock HF decoder on inputs_embeds: text embeddings with the compressor's tokens at the pad positions."""
    visual = hf.model.visual
    stock_merger, visual.merger = visual.merger, compressor
    try:
        with torch.no_grad():
            emb = hf.model.get_input_embeddings()(torch.as_tensor(ids)).clone()
            for pix, grid, token in ((vision["pixel_values"], vision["image_grid_thw"], O.IMAGE),
                                     (vision["pixel_values_videos"], vision["video_grid_thw"], O.VIDEO)):
                compressor.item_patches = [int(np.prod(g)) for g in grid]
                tokens = visual(torch.as_tensor(pix), grid_thw=torch.as_tensor(grid)).pooler_output
                emb[torch.as_tensor(ids == token)] = tokens  # row-major, as HF's masked_scatter
            pos, _ = hf.model.get_rope_index(
                torch.as_tensor(ids), torch.as_tensor(O.mm_token_type_ids(ids)),
                torch.as_tensor(vision["image_grid_thw"]), torch.as_tensor(vision["video_grid_thw"]),
                torch.as_tensor(vision["second_per_grid_ts"]), attention_mask=torch.as_tensor(mask))
            hf.model.rope_deltas = None
            logits = hf(inputs_embeds=emb, attention_mask=torch.as_tensor(mask), position_ids=pos).logits
    finally:
        visual.merger = stock_merger
    return logits.float().numpy(), pos.numpy()


def _load_gate_(ours, gate: TorchGate) -> None:
    """torch gate -> our GateNetwork (nn.Linear [out, in] -> kernel [in, out]; in_proj split into q, k, v)."""
    t = lambda p: p.detach().numpy()  # noqa: E731
    att = gate.attention
    w_q, w_k, w_v = np.split(t(att.in_proj_weight), 3)
    b_q, b_k, b_v = np.split(t(att.in_proj_bias), 3)
    pairs = [(ours.attention.q_proj, w_q, b_q), (ours.attention.k_proj, w_k, b_k), (ours.attention.v_proj, w_v, b_v),
             (ours.attention.out_proj, t(att.out_proj.weight), t(att.out_proj.bias)),
             (ours.fc1, t(gate.fc1.weight), t(gate.fc1.bias)), (ours.fc2, t(gate.fc2.weight), t(gate.fc2.bias)),
             (ours.head, t(gate.head.weight), t(gate.head.bias))]
    for lin, w, b in pairs:
        TL._assign(lin.kernel, w.T)
        TL._assign(lin.bias, b)
    for norm, ref in ((ours.norm1, gate.norm1), (ours.norm2, gate.norm2)):
        TL._assign(norm.weight, t(ref.weight))
        TL._assign(norm.bias, t(ref.bias))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = O.build_hf_model("base", seed=5)
    path = tmp_path_factory.mktemp("oracle_base")
    hf.save_pretrained(path)
    ours = from_hf(str(path), dtype="float32",
                   compressor=dict(num_experts=2, expert_names=("general", "emotion"), **GATE))
    vcfg, tcfg = hf.config.vision_config, hf.config.text_config
    torch.manual_seed(11)
    experts = [O.randomize_(Qwen2_5_VLPatchMerger(tcfg.hidden_size, vcfg.hidden_size, 2), seed) for seed in (7, 8)]
    gate = O.randomize_(TorchGate(vcfg.hidden_size, GATE["gate_hidden_size"], 2, GATE["gate_num_heads"]), 9)
    with torch.no_grad():
        gate.head.weight.mul_(60.0)  # decisive, item-dependent weights
    compressor = TorchHybridCompressor(experts, gate).eval()
    for e, merger in enumerate(experts):
        TL.load_merger_(ours.compressor.experts, merger, e)
    _load_gate_(ours.compressor.gate, gate)
    return hf, compressor, ours


def test_different_experts_and_gate_match_hf_modules(models):
    hf, compressor, ours = models
    img, vid = (1, 6, 8), (2, 4, 6)  # video span (2-1)*2 <= 6/2 - 1: transformers' rule = the released one
    rows = [[5] + O.image_tokens(img) + [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
            [5, 6] + O.video_tokens(vid) + [7, 8, 9]]
    ids, mask = O.pad_batch(rows)
    # Items with different pixel statistics, so their mean features, and so their gate weights, differ.
    vision = dict(pixel_values=O.pixels(img, 1) + 1.5, image_grid_thw=np.array([img]),
                  pixel_values_videos=0.5 * O.pixels(vid, 2) - 1.0, video_grid_thw=np.array([vid]),
                  second_per_grid_ts=np.array([1.0], np.float32))
    compressor.weights.clear()
    ref, pos = _reference(hf, compressor, ids, mask, vision)
    released = layout.get_rope_index(ids, mask, vision["image_grid_thw"], vision["video_grid_thw"], [1.0],
                                     layout_spec(ours.config))[0]
    np.testing.assert_array_equal(np.asarray(released)[:, mask.astype(bool)], pos[:, mask.astype(bool)])

    got = ours(ids, attention_mask=mask, **vision)
    ref_weights = torch.cat(compressor.weights).numpy()  # images first, then videos: our item order
    assert_close_rel(got.gate_weights, ref_weights, 1e-5, what="gate weights")
    # The gate is not trivial: weights far from uniform and different per item.
    assert np.abs(ref_weights - 0.5).max() > 0.2 and np.abs(ref_weights[0] - ref_weights[1]).max() > 0.1, ref_weights
    err = O.rel_err(got.logits, ref, mask)
    print(f'gate weights {ref_weights.tolist()}, logits rel err {err:.2e}')
    assert err <= TOL

    # The experts and the gate both reach the logits: swapping the experts' roles changes them far beyond TOL.
    compressor.weights.clear()
    compressor.experts = nn.ModuleList(list(compressor.experts)[::-1])
    try:
        swapped, _ = _reference(hf, compressor, ids, mask, vision)
    finally:
        compressor.experts = nn.ModuleList(list(compressor.experts)[::-1])
    assert O.rel_err(swapped, ref, mask) > 100 * TOL
