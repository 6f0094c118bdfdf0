"""The model-FLOPs count that MFU uses (``flops.batch_train_flops``, implementation=False, as the trainer calls
it) against an outside count: torch's ``FlopCounterMode`` over a forward and backward of Hugging Face's
Qwen2.5-VL on the same image + video sample (our model with one expert is that architecture).

torch counts every matmul, convolution and batched matmul HF runs. The one place HF computes more than the
model needs is the decoder's eager attention: it forms all L x L scores and masks the upper triangle, where
model FLOPs count the L(L+1)/2 causal pairs; the test adds that difference, derived by hand below. The ViT's
eager attention runs per window / per frame (HF splits by ``cu_seqlens``), so those pairs agree as they are.
"""

import hf_oracle as O
import numpy as np
import torch
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

from emoqwen_jax import layout
from emoqwen_jax.convert import config_from_hf
from emoqwen_jax.model import EmotionQwen, layout_spec
from emoqwen_jax.train import flops


def test_model_flops_equal_torch_flop_counter_on_hf():
    hf = O.build_hf_model("window112_tied", seed=0).train()  # a 112-px window that does not divide the grids
    mc = config_from_hf(hf.config.to_dict(), compressor={"num_experts": 1, "expert_names": ()})
    img, vid = (1, 6, 10), (3, 4, 6)
    ids, mask = O.pad_batch([[5, 6] + O.image_tokens(img) + [7, 8, 9] + O.video_tokens(vid) + [10, 11, 12]])
    vision = dict(pixel_values=O.pixels(img, 1), image_grid_thw=np.array([img]),
                  pixel_values_videos=O.pixels(vid, 2), video_grid_thw=np.array([vid]),
                  second_per_grid_ts=np.array([1.0], np.float32))
    model = nnx.eval_shape(lambda: EmotionQwen(mc, rngs=nnx.Rngs(0)))
    inputs = model.prepare_inputs(ids, mask, vision["pixel_values"], vision["image_grid_thw"],
                                  vision["pixel_values_videos"], vision["video_grid_thw"], [1.0])
    ours = flops.batch_train_flops(mc, inputs)

    pos = layout.get_rope_index(ids, mask, vision["image_grid_thw"], vision["video_grid_thw"], [1.0],
                                layout_spec(mc))[0]
    with FlopCounterMode(display=False) as counter:
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(np.asarray(pos, np.int64)),
                 mm_token_type_ids=torch.as_tensor(O.mm_token_type_ids(ids)),
                 **{k: torch.as_tensor(v) for k, v in vision.items()})
        out.logits.sum().backward()  # every parameter trains: weight and input gradients everywhere
    torch_flops = counter.get_total_flops()

    # Hand-derived: per decoder layer, QK^T and PV cost 2 * heads * head_dim FLOPs per (query, key) pair each;
    # eager HF forms L^2 pairs, the model needs L(L+1)/2; training = 3 x forward.
    t = hf.config.text_config
    length = ids.shape[1]
    extra_pairs = length * length - length * (length + 1) // 2
    head_dim = t.hidden_size // t.num_attention_heads
    masked_half = 3 * 4 * t.num_attention_heads * head_dim * t.num_hidden_layers * extra_pairs
    assert torch_flops > 0 and masked_half > 0
    assert ours + masked_half == torch_flops, (ours, masked_half, torch_flops)
