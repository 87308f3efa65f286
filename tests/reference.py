"""Dense references: attention probabilities recorded explicitly, upsampled the naive way, then selected.

Nothing here uses daami2i's algebra: the recorder computes probabilities with diffusers' own
``Attention.get_attention_scores``, and every query is a plain selection on the dense
(grid x grid) matrix built by upsampling each recorded map with ``F.interpolate``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F


class RecordingProcessor:
    """Explicit attention that records the probabilities of every call, per layer, in call order."""

    def __init__(self, name: str, book: dict, original=None):
        self.name = name
        self.book = book
        self.original = original  # when given, it computes the layer's output (bit-identical runs)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        # a padding mask (PixArt's T5 keys) as diffusers' processors apply it: an additive bias per key
        mask = None if attention_mask is None else attn.prepare_attention_mask(attention_mask, k.shape[1], b)
        probs = attn.get_attention_scores(q, k, mask)  # (b * heads, n, t), batch-major
        full = attn.get_attention_scores(q.float(), k.float(), None if mask is None else mask.float())
        self.book[self.name].append(full.view(b, attn.heads, n, -1).detach().clone())
        if self.original is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def recorders(mods, make):
    """Install ``make(name, book, original)`` as the processor of every module of ``mods`` (name ->
    attention module) and yield the book they fill ({name: [probs per call]}); the original
    processors are back afterwards, also after an exception."""
    book: dict = defaultdict(list)
    originals = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(make(n, book, originals[n]))
    try:
        yield book
    finally:
        for n, m in mods.items():
            m.set_processor(originals[n])


def traced_and_recorded(generate, recorder, trace):
    """Three identical runs of ``generate()``: plain, under ``recorder`` (a context that yields the
    book of recorded probabilities) and under ``trace`` (a daami2i trace); both must give the plain
    output bit for bit. Returns (the trace, the book)."""
    plain = generate()
    with recorder as book:
        recorded = generate()
    with trace as trc:
        traced = generate()
    assert np.array_equal(plain, recorded), "the reference recorder changed the output"
    assert np.array_equal(plain, traced), "tracing changed the output"
    return trc, dict(book)


@contextmanager
def recording(unet, only=None, passthrough=False):
    """Install recorders on every attention layer (or the names in ``only``); yields
    {layer name: [probs per call]}. ``passthrough``: the original processors still compute the
    layers' outputs, so the recorded run is bit-identical to a plain one."""
    book: dict = defaultdict(list)
    originals = unet.attn_processors
    unet.set_attn_processor(
        {
            n: RecordingProcessor(n[: -len(".processor")], book, p if passthrough else None)
            if only is None or n[: -len(".processor")] in only
            else p
            for n, p in originals.items()
        }
    )
    try:
        yield book
    finally:
        unet.set_attn_processor(dict(originals))


def factor_of(name: str, n_down: int, n_up: int) -> int:
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
    if m is None:
        return 2 ** (n_down - 1)
    level = int(m.group(2)) if m.group(1) == "down_blocks" else n_up - 1 - int(m.group(2))
    return 2**level


def size_at(latent, factor):
    h, w = latent
    while factor > 1:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor // 2
    return h, w


def batch_rows(n_images: int, cfg: bool, halves: str, image: int) -> list[int]:
    if not cfg:
        return [image]
    return {"cond": [n_images + image], "uncond": [image], "both": [image, n_images + image]}[halves]


def up(x: torch.Tensor, size) -> torch.Tensor:
    """Naive bicubic resize of the last two dims."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=tuple(size), mode="bicubic", align_corners=False)
    return y.reshape(*lead, *size)


def dense_self(book, layers, latent, grid, rows, steps=None) -> torch.Tensor:
    """Dense (grid x grid) self-attention: per layer, every recorded map upsampled on both axes,
    mean over heads and halves, summed over steps; mean over layers."""
    total = torch.zeros(grid[0] * grid[1], grid[0] * grid[1], dtype=torch.float64)
    for name, factor in layers:
        h, w = size_at(latent, factor)
        for step, probs in enumerate(book[name]):
            if steps is not None and step not in steps:
                continue
            p = probs[rows].double().mean(dim=(0, 1))  # (N_r queries, N_r keys)
            p = up(p.view(h * w, h, w), grid).reshape(h * w, -1)  # keys upsampled
            p = up(p.T.reshape(-1, h, w), grid).reshape(grid[0] * grid[1], -1).T  # queries upsampled
            total += p
    return (total / len(layers)).float()


def dense_cross(book, layers, latent, grid, rows, steps=None) -> torch.Tensor:
    """DAAM reference: per (layer, head) sum over steps, each (token) map upsampled to the grid and
    clamped at 0, mean over all (layer, head). Returns (tokens, h, w)."""
    maps = []
    for name, factor in layers:
        h, w = size_at(latent, factor)
        acc = None
        for step, probs in enumerate(book[name]):
            if steps is not None and step not in steps:
                continue
            p = probs[rows].double().mean(0)  # (heads, N, T)
            acc = p if acc is None else acc + p
        for head in acc:
            per_token = head.T.reshape(-1, h, w).float()
            maps.append(up(per_token, grid).clamp(min=0))
    return torch.stack(maps).mean(0)


def column_query(dense: torch.Tensor, weights: torch.Tensor, grid) -> torch.Tensor:
    g = weights.flatten().double()
    return (dense.double() @ (g / g.sum())).view(grid).float()


def row_query(dense: torch.Tensor, weights: torch.Tensor, grid) -> torch.Tensor:
    g = weights.flatten().double()
    return ((g / g.sum()) @ dense.double()).view(grid).float()


def inside_polygon(points, image_size) -> np.ndarray:
    """Even-odd test of every image pixel centre, written independently of daami2i."""
    h, w = image_size
    ys, xs = np.mgrid[0:h, 0:w]
    px, py = xs + 0.5, ys + 0.5
    inside = np.zeros((h, w), dtype=bool)
    pts = np.asarray(points, dtype=float)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0), strict=False):
        if y0 == y1:
            continue
        crosses = (py >= min(y0, y1)) & (py < max(y0, y1))
        x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def block_mean(mask: np.ndarray, grid) -> torch.Tensor:
    h, w = mask.shape
    gh, gw = grid
    return torch.from_numpy(mask.astype(np.float32)).view(gh, h // gh, gw, w // gw).mean(dim=(1, 3))


# -- joint attention (SD3, Flux) -------------------------------------------------------------------
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (B, S, H, D) with (S, D) cos/sin whose pairs are interleaved
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written out here from the formula."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


class JointRecorder:
    """Records the full joint-attention probabilities of every call, computed explicitly from the
    layer's own projections and norms (and the rotary formula), then lets the original processor
    produce the layer's output, so that a recorded run is bit-identical to a plain one."""

    def __init__(self, name: str, book: dict, original, text_first: bool):
        self.name, self.book, self.original, self.text_first = name, book, original, text_first

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kw
    ):
        with torch.no_grad():

            def split(x):
                return x.view(x.shape[0], x.shape[1], attn.heads, -1).double()  # (B, S, H, D)

            q, k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
            if attn.norm_q is not None:
                q, k = attn.norm_q(q.float()).double(), attn.norm_k(k.float()).double()
            if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
                cq = split(attn.add_q_proj(encoder_hidden_states))
                ck = split(attn.add_k_proj(encoder_hidden_states))
                if attn.norm_added_q is not None:
                    cq, ck = attn.norm_added_q(cq.float()).double(), attn.norm_added_k(ck.float()).double()
                q = torch.cat([cq, q] if self.text_first else [q, cq], dim=1)
                k = torch.cat([ck, k] if self.text_first else [k, ck], dim=1)
            if image_rotary_emb is not None:
                cos, sin = (t.double() for t in image_rotary_emb)
                q, k = rotary(q, cos, sin), rotary(k, cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, D)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            if attention_mask is not None:  # as SDPA reads a mask: boolean True = attend, a float one is added
                m = attention_mask.to(scores.device)
                scores = scores.masked_fill(~m, -torch.inf) if m.dtype == torch.bool else scores + m.double()
            p = torch.softmax(scores, dim=-1)
            self.book[self.name].append(p)
        if image_rotary_emb is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kw)


@contextmanager
def joint_recording(transformer, text_first: bool):
    """Install :class:`JointRecorder` on every attention layer; yields {layer: [probs (B, H, S, S) per call]}."""
    book: dict = defaultdict(list)
    originals = transformer.attn_processors
    transformer.set_attn_processor(
        {n: JointRecorder(n[: -len(".processor")], book, p, text_first) for n, p in originals.items()}
    )
    try:
        yield book
    finally:
        transformer.set_attn_processor(dict(originals))


# -- thresholded iterations --------------------------------------------------------------------------
def diffused_reference(query, g0, iterations, threshold, check, ours_at):
    """The dense diffused map: ``m_1 = query(g0)``, ``m_{k+1} = query(T(m_k))`` with ``T`` the min-max
    normalisation that zeroes values below ``threshold``; returns ``(map, near, cut)``. ``g0`` is one
    (h, w) map or a batch (..., h, w) of them, each normalised and cut on its own.

    A threshold is where float rounding matters: a value within rounding of it falls on either side
    depending on the CPU's summation order, and the next iteration then differs by far more than
    rounding. So each iteration compares the implementation's maps after k iterations, ``ours_at(k)``,
    with the reference's (``check``), and measures each map's error ``d`` (largest absolute
    difference). That moves the numerator and the span of the normalisation by at most ``2 d`` each,
    hence each normalised value by at most ``band = 4 d / (span - 2 d)`` (plus 1e-6: a few float32
    ulps of the normalisation itself). Values farther than ``band`` from the threshold are cut by the
    reference alone (and the implementation must agree); for the ``near`` ones within ``band`` the
    reference takes the implementation's cut. ``cut`` counts the values thresholded: the caller
    bounds ``near / cut``, so that the reference decides (almost) every cut itself.
    """
    m = query(g0)
    near = cut = 0

    def normalised(x):
        lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        return (x - lo) / (hi - lo), hi - lo

    for k in range(1, iterations):
        ours = ours_at(k)
        check(ours, m)
        d = (ours.double() - m.double()).abs().amax(dim=(-2, -1), keepdim=True)
        g, span = normalised(m)
        assert bool((span > 4 * d).all()), f"iteration {k}: a map's span is within rounding: nothing to threshold"
        band = 4 * d / (span - 2 * d) + 1e-6
        keep = g >= threshold
        close = (g - threshold).abs() <= band
        og = normalised(ours)[0]
        assert torch.equal((og >= threshold)[~close], keep[~close]), f"iteration {k}: a cut beyond the band differs"
        keep = torch.where(close, og >= threshold, keep)
        near += int(close.sum())
        cut += g.numel()
        m = query(torch.where(keep, g, torch.zeros_like(g)))
    return m, near, cut


def triangle(image_size) -> list[list[float]]:
    """A polygon in image pixels whose edges cut cells at odd fractions (no edge on a cell border)."""
    H, W = image_size
    return [[0, H * 0.6 + 0.37], [W * 0.5 + 0.21, H * 0.2 + 0.13], [W, H * 0.6 + 0.37], [W, H * 0.8 + 0.11]]


def check_region_queries(ghm, self_ref, grid, image_size, close, pixels=None, box=None) -> None:
    """The self-attention region queries of ``ghm`` against the dense (N x N) ``self_ref``: a pixel
    list in both directions, a box (``(x1, y1, x2, y2)``, corners inclusive; by default a wide band
    of the upper half) and :func:`triangle`, each compared with ``close(ours, reference)``."""
    h, w = grid
    n = h * w
    pixels = [0, 5, n // 2, n - 1] if pixels is None else list(pixels)
    wp = torch.zeros(n)
    wp[pixels] = 1
    close(ghm.compute_pixel_heat_map(pixels).value, column_query(self_ref, wp, grid))
    close(ghm.compute_pixel_heat_map(pixels, direction="attends_to").value, row_query(self_ref, wp, grid))
    x1, y1, x2, y2 = (1, 2, w - 2, h // 2) if box is None else box
    wb = torch.zeros(grid)
    wb[y1 : y2 + 1, x1 : x2 + 1] = 1
    close(ghm.compute_bbox_heat_map(x1, y1, x2, y2).value, column_query(self_ref, wb, grid))
    tri = triangle(image_size)
    cover = block_mean(inside_polygon(tri, image_size), grid)
    close(ghm.compute_contour_heat_map(tri, *image_size).value, column_query(self_ref, cover, grid))
