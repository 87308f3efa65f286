"""Configured like the predecessors, our numbers are theirs (after min-max normalisation, to 1e-3).

Each reference below re-implements the predecessor's documented method literally, on the
probabilities recorded by :mod:`reference` (not on daami2i's stores):

* daam-i2i 0.2: attn1 layers at the highest self-attention resolution; per layer, one map per
  (batch x head) entry of *both* guidance halves, summed over steps; at query time the mean over all
  of them; pixel and box maps are plain means of columns; guided maps weight columns by
  guide / sum(guide); ``expand_as`` is bicubic to the image's (H, W), then min-max.
* DAAM 0.2.0: attn2 of down and up blocks except factor 8; conditional half; per (factor, layer,
  head) the probabilities summed over steps; each map upsampled bicubically to the grid and clamped
  at 0, then the mean over all of them; a word is the mean of its token rows (+1 for the start
  token); ``expand_as`` bicubic to the image then min-max with a 1e-8 guard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import daami2i
from reference import recording


def minmax(x, eps=0.0):
    return (x - x.min()) / (x.max() - x.min() + eps)


def expand(x, size, eps=0.0):
    return minmax(F.interpolate(x[None, None].float(), size=size, mode="bicubic", align_corners=False)[0, 0], eps)


def test_daam_i2i_self_attention_parity(sd2):
    h_img, w_img = 96, 128
    with recording(sd2.unet) as book:
        with daami2i.trace(sd2, halves="both") as trc:
            image = sd2("a red cat", num_inference_steps=3, height=h_img, width=w_img).images[0]
    gen = trc.last_generation
    gh, gw = gen.grid_size
    layers = [s.name for s in trc.selected if s.kind == "self"]
    # daam-i2i: per layer, time-summed maps for every (batch x head) entry, kept apart
    per_layer = []
    for name in layers:
        acc = sum(p.reshape(-1, gh * gw, gh * gw) for p in book[name])  # (2 * heads, N, N)
        per_layer.append(acc)
    every = torch.cat(per_layer)  # (layers * 2 * heads, N, N)

    def pixel_ref(ids):
        return every[:, :, ids].mean(dim=(0, 2)).view(gh, gw)

    ghm = trc.compute_global_heat_map()
    ids = list(range(20, 40))
    ours = ghm.compute_pixel_heat_map(ids).expand_as(image)
    assert (ours - expand(pixel_ref(ids), (h_img, w_img))).abs().max() < 1e-3

    box_ids = [y * gw + x for y in range(2, 7) for x in range(3, 10)]  # daam-i2i: both corners included
    ours = ghm.compute_bbox_heat_map(3, 2, 9, 6).expand_as(image)
    assert (ours - expand(pixel_ref(box_ids), (h_img, w_img))).abs().max() < 1e-3

    guide = torch.rand(gh, gw)
    ref = (every.mean(0) @ (guide.flatten() / guide.sum())).view(gh, gw)
    assert (ghm.compute_guided_heat_map(guide).expand_as(image) - expand(ref, (h_img, w_img))).abs().max() < 1e-3


def test_daam_word_map_parity(sd1):
    h_img, w_img = 64, 96
    prompt = "a cat with a flowerpot"
    with recording(sd1.unet) as book:
        with daami2i.trace(sd1) as trc:
            image = sd1(prompt, num_inference_steps=3, height=h_img, width=w_img).images[0]
    gen = trc.last_generation
    grid = gen.grid_size
    unet = sd1.unet
    # DAAM's locator: attn2 of every transformer block of the down and up blocks
    names = [
        f"{kind}_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"
        for kind, blocks in (("up", unet.up_blocks), ("down", unet.down_blocks))
        for i, block in enumerate(blocks)
        for j, st in enumerate(getattr(block, "attentions", []))
        for k, _ in enumerate(st.transformer_blocks)
    ]
    latent_hw = gen.latent_size[0] * gen.latent_size[1]
    merges = []
    for name in names:
        n = book[name][0].shape[2]
        factor = int((latent_hw // n) ** 0.5)
        if factor == 8:
            continue
        heads_sum = sum(p[gen.n_images :] for p in book[name])[0]  # conditional half: (heads, N, 77)
        h, w = gen.latent_size[0] // factor, gen.latent_size[1] // factor
        for head in heads_sum:
            m = head.T.reshape(77, 1, h, w)
            merges.append(F.interpolate(m, size=grid, mode="bicubic", align_corners=False).clamp_(min=0))
    maps = torch.stack(merges).mean(0)[:, 0]  # (77, h, w)
    ghm = trc.compute_global_heat_map()
    for word, rows in (("cat", [2]), ("flowerpot", [5, 6])):
        ref = expand(maps[rows].mean(0), (h_img, w_img), eps=1e-8)
        ours = ghm.compute_word_heat_map(word).expand_as(image)
        assert (ours - ref).abs().max() < 1e-3, word
