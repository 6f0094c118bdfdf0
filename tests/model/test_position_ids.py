"""M-RoPE position ids: ours (``layout.get_rope_index``) against the rule Qwen2.5-VL was released and trained
with, transcribed literally below from transformers 4.50.0
(``Qwen2_5_VLForConditionalGeneration.get_rope_index``), and against transformers 5.24's own
``model.model.get_rope_index`` where the two rules agree; for a long video they do not (docs/design.md, The
M-RoPE position rule).
"""

import hf_oracle as O
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLModel

from emoqwen_jax import layout

TOKENS_PER_SECOND = 2
SPEC = layout.LayoutSpec(image_token_id=O.IMAGE, video_token_id=O.VIDEO, vision_start_token_id=O.VSTART,
                         tokens_per_second=TOKENS_PER_SECOND)


def rope_index_450(input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, attention_mask=None,
                   *, spatial_merge_size=2, image_token_id=O.IMAGE, video_token_id=O.VIDEO,
                   vision_start_token_id=O.VSTART, tokens_per_second=TOKENS_PER_SECOND):
    """transformers 4.50.0 ``Qwen2_5_VLForConditionalGeneration.get_rope_index``, line for line (``self.config``
    lookups turned into arguments). Tensors in, ``(position_ids [3, B, L], mrope_position_deltas [B, 1])`` out."""
    mrope_position_deltas = []
    if input_ids is not None and (image_grid_thw is not None or video_grid_thw is not None):
        total_input_ids = input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(total_input_ids)
        position_ids = torch.ones(
            3,
            input_ids.shape[0],
            input_ids.shape[1],
            dtype=input_ids.dtype,
            device=input_ids.device,
        )
        image_index, video_index = 0, 0
        attention_mask = attention_mask.to(total_input_ids.device)
        for i, input_ids in enumerate(total_input_ids):
            input_ids = input_ids[attention_mask[i] == 1]
            image_nums, video_nums = 0, 0
            vision_start_indices = torch.argwhere(input_ids == vision_start_token_id).squeeze(1)
            vision_tokens = input_ids[vision_start_indices + 1]
            image_nums = (vision_tokens == image_token_id).sum()
            video_nums = (vision_tokens == video_token_id).sum()
            input_tokens = input_ids.tolist()
            llm_pos_ids_list: list = []
            st = 0
            remain_images, remain_videos = image_nums, video_nums
            for _ in range(image_nums + video_nums):
                if image_token_id in input_tokens and remain_images > 0:
                    ed_image = input_tokens.index(image_token_id, st)
                else:
                    ed_image = len(input_tokens) + 1
                if video_token_id in input_tokens and remain_videos > 0:
                    ed_video = input_tokens.index(video_token_id, st)
                else:
                    ed_video = len(input_tokens) + 1
                if ed_image < ed_video:
                    t, h, w = (
                        image_grid_thw[image_index][0],
                        image_grid_thw[image_index][1],
                        image_grid_thw[image_index][2],
                    )
                    second_per_grid_t = 0
                    image_index += 1
                    remain_images -= 1
                    ed = ed_image

                else:
                    t, h, w = (
                        video_grid_thw[video_index][0],
                        video_grid_thw[video_index][1],
                        video_grid_thw[video_index][2],
                    )
                    if second_per_grid_ts is not None:
                        second_per_grid_t = second_per_grid_ts[video_index]
                    else:
                        second_per_grid_t = 1.0
                    video_index += 1
                    remain_videos -= 1
                    ed = ed_video
                llm_grid_t, llm_grid_h, llm_grid_w = (
                    t.item(),
                    h.item() // spatial_merge_size,
                    w.item() // spatial_merge_size,
                )
                text_len = ed - st

                st_idx = llm_pos_ids_list[-1].max() + 1 if len(llm_pos_ids_list) > 0 else 0
                llm_pos_ids_list.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)

                range_tensor = torch.arange(llm_grid_t).view(-1, 1)
                expanded_range = range_tensor.expand(-1, llm_grid_h * llm_grid_w)

                time_tensor = expanded_range * second_per_grid_t * tokens_per_second

                time_tensor_long = time_tensor.long()
                t_index = time_tensor_long.flatten()

                h_index = torch.arange(llm_grid_h).view(1, -1, 1).expand(llm_grid_t, -1, llm_grid_w).flatten()
                w_index = torch.arange(llm_grid_w).view(1, 1, -1).expand(llm_grid_t, llm_grid_h, -1).flatten()
                llm_pos_ids_list.append(torch.stack([t_index, h_index, w_index]) + text_len + st_idx)
                st = ed + llm_grid_t * llm_grid_h * llm_grid_w

            if st < len(input_tokens):
                st_idx = llm_pos_ids_list[-1].max() + 1 if len(llm_pos_ids_list) > 0 else 0
                text_len = len(input_tokens) - st
                llm_pos_ids_list.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)

            llm_positions = torch.cat(llm_pos_ids_list, dim=1).reshape(3, -1)
            position_ids[..., i, attention_mask[i] == 1] = llm_positions.to(position_ids.device)
            mrope_position_deltas.append(llm_positions.max() + 1 - len(total_input_ids[i]))
        mrope_position_deltas = torch.tensor(mrope_position_deltas, device=input_ids.device).unsqueeze(1)
        return position_ids, mrope_position_deltas
    else:
        if attention_mask is not None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1).to(attention_mask.device)
            max_position_ids = position_ids.max(0, keepdim=False)[0].max(-1, keepdim=True)[0]
            mrope_position_deltas = max_position_ids + 1 - attention_mask.shape[-1]
        else:
            position_ids = (
                torch.arange(input_ids.shape[1], device=input_ids.device)
                .view(1, 1, -1)
                .expand(3, input_ids.shape[0], -1)
            )
            mrope_position_deltas = torch.zeros(
                [input_ids.shape[0], 1],
                device=input_ids.device,
                dtype=input_ids.dtype,
            )

        return position_ids, mrope_position_deltas


# ---- cases --------------------------------------------------------------------------------------------------
def _left_pad(rows):
    ids, mask = O.pad_batch(rows)
    for i, r in enumerate(rows):
        ids[i] = np.roll(ids[i], ids.shape[1] - len(r))
        mask[i] = np.roll(mask[i], ids.shape[1] - len(r))
    return ids, mask


def _case(rows, images=(), videos=(), spt=None, pad="right"):
    ids, mask = _left_pad(rows) if pad == "left" else O.pad_batch(rows)
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=np.array(images).reshape(-1, 3) if images else None,
                video_grid_thw=np.array(videos).reshape(-1, 3) if videos else None,
                second_per_grid_ts=None if spt is None else np.asarray(spt, np.float32))


I, V = O.image_tokens, O.video_tokens
CASES = {
    "text_only_no_padding": _case([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]]),
    "text_only_right_padding": _case([[7, 8, 9, 10, 11, 12], [13, 14, 15]]),
    "text_only_left_padding": _case([[7, 8, 9, 10, 11, 12], [13, 14, 15]], pad="left"),
    "one_image": _case([[7, 8] + I((1, 4, 6)) + [9, 10]], images=[(1, 4, 6)]),
    "image_first_token": _case([I((1, 6, 4)) + [9]], images=[(1, 6, 4)]),
    "two_images_in_a_row": _case([[7] + I((1, 4, 6)) + I((1, 8, 2)) + [9, 10, 11]], images=[(1, 4, 6), (1, 8, 2)]),
    "video_spt_1.5_four_patches": _case([[7] + V((4, 4, 6)) + [9, 10, 11]], videos=[(4, 4, 6)], spt=[1.5]),
    "video_without_spt": _case([[7] + V((3, 4, 4)) + [9]], videos=[(3, 4, 4)]),
    # float32 rounding decides the truncation: 15 * 2.1f * 2 -> 62 (63 in float64).
    "video_spt_2.1_float32_truncation": _case([[7] + V((16, 2, 2)) + [9]], videos=[(16, 2, 2)], spt=[2.1]),
    "videos_and_images_across_rows_right_padding": _case(
        [[7] + V((3, 4, 4)) + [8] + I((1, 4, 2)) + V((2, 2, 6)) + [9],
         [10] + I((1, 2, 2)) + [11, 12],
         [13, 14, 15, 16],
         V((4, 2, 4)) + [17] + I((1, 6, 6))],
        images=[(1, 4, 2), (1, 2, 2), (1, 6, 6)], videos=[(3, 4, 4), (2, 2, 6), (4, 2, 4)], spt=[1.5, 0.5, 2.0]),
    "video_and_image_left_padding": _case(
        [[7, 8] + V((3, 4, 6)) + [9], [10] + I((1, 4, 4)) + [11, 12, 13] + V((2, 2, 2))],
        images=[(1, 4, 4)], videos=[(3, 4, 6), (2, 2, 2)], spt=[1.5, 1.0], pad="left"),
}


def _torch(x):
    return None if x is None else torch.as_tensor(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers_4_50_rule(name):
    case = CASES[name]
    ref_pos, ref_delta = rope_index_450(*(_torch(case[k]) for k in (
        "input_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")))
    pos, delta = layout.get_rope_index(case["input_ids"], case["attention_mask"], case["image_grid_thw"],
                                       case["video_grid_thw"], case["second_per_grid_ts"], SPEC)
    assert pos.shape == (3, *case["input_ids"].shape) and delta.shape == (len(case["input_ids"]),)
    np.testing.assert_array_equal(pos, ref_pos.numpy())  # padding slots included (1 in both)
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


def test_rounding_case_is_not_trivial():
    """The 2.1 s case really exercises float32 truncation (a float64 rule would give 63 at index 15)."""
    pos, _ = layout.get_rope_index(**CASES["video_spt_2.1_float32_truncation"], spec=SPEC)
    t_ids = pos[0, 0, 2:18]  # tokens: 7, VSTART, then 16 temporal patches of one merged unit each
    assert t_ids[15] - t_ids[0] == 62 and int(15 * 2.1 * 2) == 63


# ---- transformers 5.24 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
    return Qwen2_5_VLModel(O.hf_config("base")).eval()


def _hf_524(model, case):
    model.rope_deltas = None
    kw = {k: _torch(case[k]) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")}
    with torch.no_grad():
        pos, delta = model.get_rope_index(torch.as_tensor(case["input_ids"]),
                                          mm_token_type_ids=torch.as_tensor(O.mm_token_type_ids(case["input_ids"])),
                                          **kw)
    return pos.numpy(), delta.numpy()[:, 0]


AGREE = {  # video spans with (t - 1) * spt * tokens_per_second <= max(h, w) / 2 - 1, and images
    "images_right_padding": _case([[7] + I((1, 4, 6)) + [8, 9] + I((1, 8, 2)) + [10], [11] + I((1, 6, 6)) + [12]],
                                  images=[(1, 4, 6), (1, 8, 2), (1, 6, 6)]),
    "short_videos_and_image_left_padding": _case(
        [[7] + V((2, 8, 12)) + [8] + I((1, 4, 4)) + [9, 10], [11, 12] + V((3, 8, 8)) + [13]],
        images=[(1, 4, 4)], videos=[(2, 8, 12), (3, 8, 8)], spt=[1.0, 0.5], pad="left"),
}


@pytest.mark.parametrize("name", sorted(AGREE))
def test_matches_transformers_5_24_where_rules_agree(hf_model, name):
    case = AGREE[name]
    for grid, spt in zip(case["video_grid_thw"] if case["video_grid_thw"] is not None else [],
                         case["second_per_grid_ts"] if case["second_per_grid_ts"] is not None else [], strict=True):
        assert (grid[0] - 1) * spt * TOKENS_PER_SECOND <= max(grid[1:]) // 2 - 1
    ref_pos, ref_delta = _hf_524(hf_model, case)
    pos, delta = layout.get_rope_index(case["input_ids"], case["attention_mask"], case["image_grid_thw"],
                                       case["video_grid_thw"], case["second_per_grid_ts"], SPEC)
    mask = case["attention_mask"].astype(bool)
    # 5.24 leaves padding slots at 0 (4.50 and we: 1), so compare real tokens only.
    np.testing.assert_array_equal(pos[:, mask], ref_pos[:, mask])
    # 5.24's delta counts only real tokens (max + 1 - real length); 4.50 and we use the padded length.
    np.testing.assert_array_equal(delta, ref_delta - (mask.shape[1] - mask.sum(1)))


def test_long_video_differs_from_transformers_5_24(hf_model):
    """A 4-patch video at 1.5 s per patch spans t = 0..9 but only 2x2 merged units: 4.50 (and we) resume the
    text after it at the block's max + 1; 5.24 resumes at start + max(h, w) / 2, i.e. 8 positions earlier,
    inside the video's own temporal range. We keep the released rule (docs/design.md, The M-RoPE position rule;
    transformers #45381)."""
    grid, spt = (4, 4, 4), 1.5
    case = _case([[7] + V(grid) + [9, 10, 11]], videos=[grid], spt=[spt])
    ref_pos, _ = _hf_524(hf_model, case)
    pos, _ = layout.get_rope_index(case["input_ids"], case["attention_mask"], case["image_grid_thw"],
                                   case["video_grid_thw"], case["second_per_grid_ts"], SPEC)
    vend = 2 + grid[0] * grid[1] * grid[2] // 4  # index of VEND: text, VSTART, then the video tokens
    np.testing.assert_array_equal(pos[:, :, :vend], ref_pos[:, :, :vend])  # identical through the video
    assert pos[0, 0, vend] == pos[:, 0, :vend].max() + 1  # released rule: the block's max + 1
    shift = int((grid[0] - 1) * spt * TOKENS_PER_SECOND) + 1 - max(grid[1], grid[2]) // 2
    assert shift == 8
    np.testing.assert_array_equal(pos[:, :, vend:], ref_pos[:, :, vend:] + shift)  # every later token moved


def test_single_token_text_row_delta_departs_from_4_50_padding_quirk():
    """4.50's text-only branch fills padding with 1 *before* taking the row max, so a row with one real token
    gets delta 2 - L and its next decoded token (slot L) lands at position 2, skipping 1. We take the max over
    real tokens (delta 1 - L, next position 1). Positions themselves agree; rows with >= 2 tokens agree."""
    case = _case([[7, 8, 9, 10], [11]])
    ref_pos, ref_delta = rope_index_450(_torch(case["input_ids"]), attention_mask=_torch(case["attention_mask"]))
    pos, delta = layout.get_rope_index(case["input_ids"], case["attention_mask"], None, None, None, SPEC)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    length = case["input_ids"].shape[1]
    np.testing.assert_array_equal(delta, [0, 1 - length])
    np.testing.assert_array_equal(ref_delta.numpy()[:, 0], [0, 2 - length])
