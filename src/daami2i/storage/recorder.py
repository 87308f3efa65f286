"""The recorder: one canonical attention call in, chunked float32 softmax, online sums out.

Every captured layer call, whatever the model family and wherever its query and key were read,
arrives as an :class:`AttentionCall`: ``q`` (B, heads, S_q, d) and ``k`` (B, heads, S_k, d) of the
whole denoiser batch, an additive float ``bias`` broadcasting to (B, heads, S_q, S_k) (or None) and
the softmax ``scale``. The :class:`Recorder` of a generation keeps the batch rows of the images and
guidance halves asked for, recomputes their probabilities in float32 in chunks of query rows (no
(B x heads x S_q x S_k) tensor of a whole call is alive at once), and adds them to the stores:

* a self-attention layer (``kind="self"``: every key is an image token) to the head-mean (N x N)
  sum of its resolution (and, with ``keep_heads``, to a per-head sum of its own);
* a cross-attention layer (``kind="cross"``: every key is a text token) to its per-head
  (N x text columns) sum, keeping the prompt's columns only when text streams say which;
* a joint layer (``kind="joint"``: image and text tokens in one sequence) to both: the image-query
  rows restricted to the image keys (self) and to the prompt's text columns (words, head mean).
  Reference-image tokens (Flux Kontext) are keys of the softmax but neither queried nor stored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import TraceError
from ..heatmaps.resample import cells_of
from .store import CrossAttentionStore, Generation, SelfAttentionStore, TemporalStore

Size = tuple[int, int]


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of a traced layer, in canonical form."""

    layer: str  # module name
    kind: str  # "self", "cross" or "joint"
    factor: int  # resolution factor of the layer (1 for transformers)
    q: torch.Tensor  # shape: (B, heads, S_q, d), the whole denoiser batch
    k: torch.Tensor  # shape: (B, heads, S_k, d)
    bias: torch.Tensor | None  # float, broadcasts to (B, heads, S_q, S_k); -inf where masked
    scale: float
    #: "softmax", or "relu_linear": linear attention's weights relu(q) relu(k)^T / (row sum + 1e-15)
    #: (Sana's self-attention; no scale, no mask)
    kernel: str = "softmax"


def mask_bias(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """An attention mask as SDPA reads it (boolean: True = attend; float: added), as a float32 bias
    of 4 dimensions that broadcasts to ``shape`` (B, heads, S_q, S_k). It is not expanded: a (1, 1, S,
    S) mask of a joint model stays one S x S matrix, not one per batch entry and head."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        if mask.dim() >= 2 and mask.shape[-2] > 1 and bool((mask == mask[..., :1, :]).all()):
            # a key-padding mask spread over every query row (HunyuanVideo 1.5's (1, 1, S, S)): one row
            # of it, as a float bias, instead of S x S floats (10 GB at S = 51,275)
            mask = mask[..., :1, :]
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, -math.inf)
    else:
        bias = mask.float()
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    try:
        torch.broadcast_shapes(bias.shape, shape)
    except RuntimeError as exc:
        raise TraceError(
            f"an attention mask of shape {tuple(mask.shape)} does not broadcast to the attention's "
            f"(batch, heads, queries, keys) = {shape}: this layout is not one daami2i understands"
        ) from exc
    return bias


def probs_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    chunk_bytes: int,
    scratch: Callable[[int, torch.device], torch.Tensor] | None = None,
    kernel: str = "softmax",
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, probs)``: float32 softmax(q k^T * scale + bias) for query rows [start, stop).

    ``kernel="relu_linear"``: the weights of linear attention instead, relu(q) relu(k)^T divided by
    its row sum plus 1e-15 (as Sana's ``SanaLinearAttnProcessor2_0`` weighs its values, in float32;
    ``scale`` is not used and there is no mask; a row whose relu(q) is zero is all zeros).

    ``q`` (b, heads, n_q, d), ``k`` (b, heads, n_k, d); ``bias`` broadcasts to (b, heads, n_q, n_k).
    Query rows are processed in chunks of at most ``chunk_bytes``. Scores and probabilities share
    one buffer, reused from chunk to chunk (``scratch(n, device)`` returns a flat float32 tensor of at
    least ``n`` elements, kept between calls): a fresh 64 MiB tensor per chunk costs more in page
    faults than the product and the softmax themselves. Each yielded tensor is therefore only valid
    until the next one is requested.
    """
    b, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    linear = kernel == "relu_linear"
    if linear and bias is not None:
        raise TraceError("linear (relu) attention has no mask, but one was given")
    if kernel not in ("softmax", "relu_linear"):
        raise TraceError(f"unknown attention kernel {kernel!r}: expected 'softmax' or 'relu_linear'")
    q = torch.relu(q.float()) if linear else q.float() * float(scale)
    kt = (torch.relu(k.float()) if linear else k.float()).transpose(-1, -2)
    step = max(1, chunk_bytes // (b * heads * n_k * 4))
    need = b * heads * min(step, n_q) * n_k
    buf = scratch(need, q.device) if scratch is not None else torch.empty(need, device=q.device)
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        scores = buf[: b * heads * (stop - start) * n_k].view(b, heads, stop - start, n_k)
        torch.matmul(q[:, :, start:stop], kt, out=scores)
        if linear:
            scores.div_(scores.sum(dim=-1, keepdim=True).add_(1e-15))  # per query row, in place
            yield start, stop, scores
            continue
        if bias is not None:
            scores.add_(bias if bias.shape[-2] == 1 else bias[..., start:stop, :])
        torch.softmax(scores, dim=-1, out=scores)  # in place
        yield start, stop, scores


class Recorder:
    """Turns the attention calls of one generation into its stores (see the module docstring).

    ``rows`` (n_images, halves) are the batch rows kept per image; ``layer_grid(factor)`` is the
    token grid of a layer at ``factor``; ``text_columns`` are the prompt's columns among a call's
    text tokens (None: every text key is kept, as for UNets' 77 CLIP columns); ``n_text`` is the
    length of the text part of joint sequences, placed first when ``text_first``.
    """

    def __init__(
        self,
        gen: Generation,
        rows: torch.Tensor,
        device: torch.device,
        layer_grid: Callable[[int], Size],
        *,
        chunk_bytes: int,
        scratch: Callable[[int, torch.device], torch.Tensor] | None = None,
        keep_heads: bool = False,
        cross_steps: bool = False,
        step_tokens: int = 77,
        text_columns: torch.Tensor | None = None,
        n_text: int = 0,
        n_reference: int = 0,
        text_first: bool = False,
        text_varies: bool = False,
        self_layers: set[str] | None = None,
        cross_layers: set[str] | None = None,
        text_relations: frozenset[str] = frozenset(),
        pass_weight: float = 1.0,
        word_heads: bool = True,
        self_pool: int = 1,
        frames: int = 1,
        frame_batch: bool = False,
    ) -> None:
        self.gen, self.rows, self.device, self.layer_grid = gen, rows, device, layer_grid
        self.chunk_bytes, self.scratch = chunk_bytes, scratch
        self.keep_heads, self.cross_steps, self.step_tokens = keep_heads, cross_steps, step_tokens
        self.text_columns, self.n_text, self.text_first = text_columns, n_text, text_first
        self.n_reference = n_reference  # reference-image tokens after the output image's (Flux Kontext)
        self.text_varies = text_varies  # each call's text length is its own (n_text: the first call's)
        # the last kept text column, read once here: per call it would be a host synchronisation
        self._last_text_col = int(text_columns.max()) if text_columns is not None and text_columns.numel() else -1
        self.self_layers, self.cross_layers = self_layers or set(), cross_layers or set()
        self.text_relations = text_relations  # joint layers: "text->image" / "text->text" kept
        # each call's weight: 1/2 when guidance passes are separate calls and both are kept, so that
        # they average as the halves of a batch do
        self.pass_weight = float(pass_weight)
        self.word_heads = word_heads  # separate cross-attention keeps each head (DAAM), else their mean
        self.self_pool, self.frames = self_pool, frames  # self-attention kept per p x p cell of each frame
        # AnimateDiff: spatial layers see batch B * F (video b's frame f is item b * F + f), temporal
        # layers batch B * h * w (pixel p of video b is item b * h * w + p), sequence F
        self.frame_batch = frame_batch

    def _self_store(self, factor: int, size: Size, n_img: int) -> SelfAttentionStore:
        """A new self-attention store of a ``size`` token grid: full, or pooled into cells."""
        if self.self_pool == 1:
            n = size[0] * size[1]
            return SelfAttentionStore(factor, size, torch.zeros(n_img, n, n, device=self.device))
        cells = cells_of(size, self.frames, self.self_pool)
        c = cells[0] * cells[1]
        sums = torch.zeros(n_img, c, c, device=self.device)
        return SelfAttentionStore(factor, cells, sums, pool=self.self_pool, frames=self.frames, tokens=size)

    @torch.no_grad()
    def record(self, call: AttentionCall, step: int) -> None:
        """Add one call's probabilities (of denoising step ``step``) to the stores."""
        if call.kind == "temporal":
            self._temporal(call, step)
        elif call.kind == "joint":
            self._joint(call, step)
        elif self.frame_batch and call.kind == "self":
            self._frame_blocks(call, step)
        elif self.frame_batch:  # cross-attention of every frame: one call over the frames' stacked rows
            self._separate(self._stacked_frames(call), step)
        else:
            self._separate(call, step)

    def _frame_items(self, call: AttentionCall, per_video: int) -> int:
        """The denoiser batch of a call whose batch is that many items per video (frames or pixels)."""
        b = call.q.shape[0]
        if b % per_video:
            raise TraceError(
                f"layer {call.layer} saw a batch of {b}, not a multiple of {per_video} items per video: this "
                "model's layout is not one daami2i understands"
            )
        return b // per_video

    def _stacked_frames(self, call: AttentionCall) -> AttentionCall:
        """A frame-batch cross-attention call (B * F, heads, N, d) as one call per video, (B, heads, F * N,
        d), its rows frame-major as the stacked grid; every frame attends to the same text (checked)."""
        f = self.frames
        b = self._frame_items(call, f)
        _, heads, n, d = call.q.shape
        q = call.q.view(b, f, heads, n, d).transpose(1, 2).reshape(b, heads, f * n, d)
        k_all = call.k.view(b, f, heads, call.k.shape[2], d)
        k = k_all[:, 0]
        if not torch.equal(k, k_all[:, -1]):
            raise TraceError(
                f"layer {call.layer}: the frames of one video attend to different text, which daami2i's stacked "
                "word maps do not expect"
            )
        if call.bias is not None:
            raise TraceError(f"layer {call.layer}: a masked frame-batch cross-attention is not one daami2i expects")
        return dataclasses.replace(call, q=q, k=k)

    def _frame_blocks(self, call: AttentionCall, step: int) -> None:
        """A frame-batch self-attention layer: each frame's (N x N) block, head and half means."""
        gen, f = self.gen, self.frames
        self._frame_items(call, f)
        n_q, n_k, heads = call.q.shape[2], call.k.shape[2], call.q.shape[1]
        size = self.layer_grid(call.factor)  # the frames stacked
        if size[0] * size[1] != f * n_q or n_q != n_k:
            raise TraceError(
                f"layer {call.layer} saw {n_q} query and {n_k} key tokens per frame, but {f} frames of a "
                f"{gen.latent_size} latent at factor {call.factor} have {size[0] * size[1] // f}: this model's "
                "layout is not one daami2i understands"
            )
        n_img, n_halves = self.rows.shape
        items = (self.rows[..., None] * f + torch.arange(f, device=self.rows.device)).flatten()  # (img, half, frame)
        bias = call.bias[items] if call.bias is not None and call.bias.shape[0] > 1 else call.bias
        store = gen.self_attention.get(call.factor)
        if store is None:
            sums = torch.zeros(n_img, f, n_q, n_k, device=self.device)
            store = SelfAttentionStore(call.factor, size, sums, frames=f, blocks=True)
            gen.self_attention[call.factor] = store
        chunks = probs_chunks(call.q[items], call.k[items], call.scale, bias, self.chunk_bytes, self.scratch)
        for start, stop, p in chunks:
            p = p.view(n_img, n_halves, f, heads, stop - start, n_k).mean(dim=(1, 3))  # (n_img, F, rows, keys)
            if self.pass_weight != 1.0:
                p = p * self.pass_weight
            if call.layer not in store.layers:
                store.layers.append(call.layer)
            store.sums[:, :, start:stop] += p.to(self.device)

    def _temporal(self, call: AttentionCall, step: int) -> None:
        """A motion module: every pixel's (F x F) attention across frames, head and half means."""
        gen, f = self.gen, self.frames
        h, w = self.layer_grid(call.factor)
        h //= f  # one frame's rows at this resolution
        pixels = h * w
        self._frame_items(call, pixels)
        if call.q.shape[2] != f or call.k.shape[2] != f:
            raise TraceError(
                f"temporal layer {call.layer} attended over {call.q.shape[2]} positions, not the {f} frames: this "
                "model's layout is not one daami2i understands"
            )
        n_img, n_halves = self.rows.shape
        heads = call.q.shape[1]
        items = (self.rows[..., None] * pixels + torch.arange(pixels, device=self.rows.device)).flatten()
        bias = call.bias[items] if call.bias is not None and call.bias.shape[0] > 1 else call.bias
        store = gen.temporal.get(call.factor)
        if store is None:
            store = TemporalStore(call.factor, (h, w), torch.zeros(n_img, pixels, f, f, device=self.device))
            gen.temporal[call.factor] = store
        chunks = probs_chunks(call.q[items], call.k[items], call.scale, bias, self.chunk_bytes, self.scratch)
        for start, stop, p in chunks:  # query frames [start, stop)
            p = p.view(n_img, n_halves, pixels, heads, stop - start, f).mean(dim=(1, 3))  # (n_img, pixels, rows, F)
            if self.pass_weight != 1.0:
                p = p * self.pass_weight
            if call.layer not in store.layers:
                store.layers.append(call.layer)
            store.sums[:, :, start:stop] += p.to(self.device)

    def _kept(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k and bias of the kept batch rows only."""
        flat = self.rows.flatten()
        bias = call.bias
        if bias is not None and bias.shape[0] > 1:  # one mask per batch entry; else it broadcasts
            bias = bias[flat]
        return call.q[flat], call.k[flat], bias

    def _separate(self, call: AttentionCall, step: int) -> None:
        """A self- or cross-attention layer of its own (UNets, PixArt)."""
        gen = self.gen
        n_q, n_k, heads = call.q.shape[2], call.k.shape[2], call.q.shape[1]
        size = self.layer_grid(call.factor)
        if size[0] * size[1] != n_q:
            raise TraceError(
                f"layer {call.layer} saw {n_q} query tokens, but a {gen.latent_size} latent at factor {call.factor} "
                f"has {size[0] * size[1]}: this model's layout is not one daami2i understands"
            )
        n_img, n_halves = self.rows.shape
        q, k, bias = self._kept(call)
        chunks = probs_chunks(q, k, call.scale, bias, self.chunk_bytes, self.scratch, call.kernel)
        if call.kind == "self":
            store = gen.self_attention.get(call.factor)
            if store is None:
                store = self._self_store(call.factor, size, n_img)
                gen.self_attention[call.factor] = store
            if self.keep_heads and store.per_head is None:
                store.per_head = {}
            for start, stop, p in chunks:
                p = p.view(n_img, n_halves * heads, stop - start, n_k)
                if self.pass_weight != 1.0:
                    p.mul_(self.pass_weight)
                if self.keep_heads:
                    store.add_heads(call.layer, start, stop, p)
                if p.device == store.sums.device:
                    store.add_mean(call.layer, start, stop, p)
                else:  # reduce on the compute device before moving
                    store.add(call.layer, start, stop, p.mean(1).to(self.device))
            return
        cols = self.text_columns  # text streams (T5 of PixArt): the prompt's columns only
        n_kept = int(cols.numel()) if cols is not None else n_k
        cstore = gen.cross_attention.get(call.layer)
        if cstore is None:
            cstore = CrossAttentionStore(
                call.layer,
                call.factor,
                size,
                torch.zeros(n_img, heads if self.word_heads else 1, n_q, n_kept, device=self.device),
                per_step=[] if self.cross_steps else None,
                step_tokens=min(self.step_tokens, n_kept),
            )
            gen.cross_attention[call.layer] = cstore
        for start, stop, p in chunks:
            p = p.view(n_img, n_halves, heads, stop - start, n_k).mean(1)
            if not self.word_heads:
                p = p.mean(1, keepdim=True)
            if self.pass_weight != 1.0:
                p = p * self.pass_weight
            if cols is not None:
                p = p.index_select(-1, cols.to(p.device))
            cstore.add(start, stop, p.to(self.device), step=step)

    def _joint(self, call: AttentionCall, step: int) -> None:
        """A joint layer (SD3, Flux, Chroma): image-query rows; their image keys and text columns."""
        gen = self.gen
        text_cols = self.text_columns
        assert text_cols is not None
        h, w = gen.grid_size
        n, t, s_q, s_k = h * w, self.n_text, call.q.shape[2], call.k.shape[2]
        # reference tokens are keys, never stored: [text, image, reference] (Kontext's reference image),
        # [image, reference, text] (Z-Image's image padding)
        r = self.n_reference
        if self.text_varies and s_q == s_k > n + r:  # this call's own text length (a negative prompt's)
            t = s_k - n - r
        if s_q == s_k == n + t + r:  # [image, text] (SD3), [text, image] (Flux)
            img = slice(t, t + n) if self.text_first else slice(0, n)
            cols: torch.Tensor | None = text_cols if self.text_first else text_cols + n + r
        elif s_q == s_k == n:  # image-only self-attention (SD3.5's second attention)
            img, cols = slice(0, n), None
        else:
            raise TraceError(
                f"layer {call.layer} attended over {s_q} queries and {s_k} keys, but a {h}x{w} token grid with "
                f"{t} text tokens (and {r} reference tokens) has {n} or {n + t + r}: this transformer's layout is "
                "not one daami2i understands"
            )
        missing = None  # kept text columns past this call's text (text_varies): read as zero
        if cols is not None and self.text_varies and self._last_text_col >= t:
            missing = text_cols >= t
            cols = cols.masked_fill(missing, 0)
        n_img, n_halves = self.rows.shape
        q, k, full_bias = self._kept(call)
        q_img, bias = q[:, :, img], full_bias
        if bias is not None and bias.shape[-2] == s_q:
            bias = bias[:, :, img]
        heads = call.q.shape[1]
        want_self = call.layer in self.self_layers
        want_cross = call.layer in self.cross_layers and cols is not None
        store = gen.self_attention.get(1) if want_self else None
        if want_self and store is None:
            store = self._self_store(1, (h, w), n_img)
            gen.self_attention[1] = store
        cstore = gen.cross_attention.get(call.layer) if want_cross else None
        if want_cross and cstore is None:
            assert cols is not None
            t_kept = int(cols.numel())
            cstore = CrossAttentionStore(
                call.layer,
                1,
                (h, w),
                torch.zeros(n_img, 1, n, t_kept, device=self.device),
                per_step=[] if self.cross_steps else None,
                step_tokens=t_kept,
            )
            if "text->image" in self.text_relations:
                cstore.text_image = torch.zeros(n_img, t_kept, n, device=self.device)
            if "text->text" in self.text_relations:
                cstore.text_text = torch.zeros(n_img, t_kept, t_kept, device=self.device)
            gen.cross_attention[call.layer] = cstore
        for start, stop, p in probs_chunks(q_img, k, call.scale, bias, self.chunk_bytes, self.scratch, call.kernel):
            p = p.view(n_img, n_halves * heads, stop - start, s_k)
            if self.pass_weight != 1.0:
                p.mul_(self.pass_weight)  # the chunk's own buffer
            if store is not None:
                part = p[..., img]
                if part.device == store.sums.device:
                    store.add_mean(call.layer, start, stop, part)
                else:
                    store.add(call.layer, start, stop, part.mean(1).to(self.device))
            if cstore is not None:
                assert cols is not None
                part = p.index_select(-1, cols)
                if missing is not None:
                    part = part.masked_fill(missing.to(part.device), 0.0)
                cstore.add(start, stop, part.mean(1, keepdim=True).to(self.device), step=step)
        if cstore is not None and (cstore.text_image is not None or cstore.text_text is not None):
            assert cols is not None
            self._text_queries(call, cstore, q, k, full_bias, cols, img, missing)

    def _text_queries(
        self,
        call: AttentionCall,
        cstore: CrossAttentionStore,
        q: torch.Tensor,
        k: torch.Tensor,
        bias: torch.Tensor | None,
        cols: torch.Tensor,
        img: slice,
        missing: torch.Tensor | None,
    ) -> None:
        """A joint layer's kept text tokens as queries: their probabilities over the image keys
        (text -> image) and over the kept text keys (text -> text), head means, added to the store.
        ``q``, ``k``, ``bias`` are the kept batch rows'; ``cols`` the kept text positions in the sequence."""
        n_img, n_halves = self.rows.shape
        heads, s_q = call.q.shape[1], call.q.shape[2]
        q_txt = q.index_select(2, cols.to(q.device))
        if bias is not None and bias.shape[-2] == s_q:
            bias = bias.index_select(2, cols.to(bias.device))
        for start, stop, p in probs_chunks(q_txt, k, call.scale, bias, self.chunk_bytes, self.scratch, call.kernel):
            p = p.view(n_img, n_halves * heads, stop - start, p.shape[-1])
            if self.pass_weight != 1.0:
                p.mul_(self.pass_weight)
            if missing is not None:  # kept columns past this call's text: neither queries nor keys here
                p = p.masked_fill(missing[start:stop].to(p.device)[:, None], 0.0)
            if cstore.text_image is not None:
                cstore.text_image[:, start:stop] += p[..., img].mean(1).to(self.device)
            if cstore.text_text is not None:
                part = p.index_select(-1, cols.to(p.device))
                if missing is not None:
                    part = part.masked_fill(missing.to(part.device), 0.0)
                cstore.text_text[:, start:stop] += part.mean(1).to(self.device)
