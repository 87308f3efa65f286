"""Video frames on the token grid: pure bookkeeping, no tensors of attention.

A video's token grid has ``frames`` token frames of (rows, columns) each. daami2i stores it as the
frames stacked top to bottom, one (frames * rows, columns) grid, so every image query works on it
unchanged (an image is a video of one frame). :class:`FrameLayout` says how the stacked grid splits
into token frames and which token frame each frame of the decoded video comes from: a video VAE
compresses time (Wan, CogVideoX: the first video frame is latent frame 0, each later latent frame
covers 4 video frames) and a transformer may patch latent frames in pairs (CogVideoX 1.5's
``patch_size_t = 2``).

>>> layout = FrameLayout.causal(latent_frames=3, rows=4, temporal=4)
>>> layout.video_frames, layout.token_frames
(9, 3)
>>> layout.source
(0, 1, 1, 1, 1, 2, 2, 2, 2)
>>> layout.token_frame(5)
2
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import QueryError


@dataclass(frozen=True)
class FrameLayout:
    """The token frames of a stacked video grid and the video frames they become."""

    token_frames: int  # frames of the token grid, stacked top to bottom
    rows: int  # token rows of one frame
    source: tuple[int, ...]  # per video frame, the token frame it comes from (non-decreasing)
    note: str = ""  # how latent frames became video frames, for the record

    def __post_init__(self) -> None:
        for name in ("token_frames", "rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QueryError(f"FrameLayout.{name} must be a positive integer, got {v!r}")
        src = self.source
        if not isinstance(src, tuple) or not src:
            raise QueryError(f"FrameLayout.source must be a non-empty tuple of token frames, got {src!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.token_frames for t in src):
            raise QueryError(
                f"FrameLayout.source must hold token frames in [0, {self.token_frames - 1}], got {list(src)[:20]}"
            )
        if any(b < a for a, b in zip(src, src[1:], strict=False)):
            raise QueryError(f"FrameLayout.source must not go back in time, got {list(src)[:20]}")

    @classmethod
    def causal(
        cls, latent_frames: int, rows: int, temporal: int = 4, patch_t: int = 1, dropped: int = 0
    ) -> FrameLayout:
        """A causal video VAE (Wan, CogVideoX): the first video frame decodes from latent frame 0,
        each later latent frame gives ``temporal`` video frames; token frame ``t`` holds latent frames
        ``patch_t * t ... patch_t * t + patch_t - 1``. ``dropped`` latent frames at the front are
        discarded before decoding (padding that is never decoded). CogVideoX's chunked VAE and 1.5's
        padding build their layout in their adapter."""
        for name, v in (("latent_frames", latent_frames), ("temporal", temporal), ("patch_t", patch_t)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QueryError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(dropped, bool) or not isinstance(dropped, int) or not 0 <= dropped < latent_frames:
            raise QueryError(f"dropped must be an integer in [0, {latent_frames - 1}], got {dropped!r}")
        kept = range(dropped, latent_frames)
        source = []
        for i, latent in enumerate(kept):
            source += [latent // patch_t] * (1 if i == 0 else temporal)
        token_frames = -(-latent_frames // patch_t)
        note = (
            f"causal VAE: {temporal} video frames per latent frame after the first; "
            f"{patch_t} latent frame(s) per token frame"
        )
        if dropped:
            note += f"; the first {dropped} latent frame(s) are not decoded"
        return cls(token_frames, rows, tuple(source), note)

    @classmethod
    def identity(cls, frames: int, rows: int) -> FrameLayout:
        """One token frame per video frame (AnimateDiff: no temporal compression)."""
        return cls(frames, rows, tuple(range(frames)), "one token frame per video frame")

    @property
    def video_frames(self) -> int:
        """Frames of the decoded video."""
        return len(self.source)

    def token_frame(self, frame: Any) -> int:
        """The token frame video frame ``frame`` comes from (negative counts from the end)."""
        n = self.video_frames
        try:
            if isinstance(frame, bool):
                raise TypeError
            f = operator.index(frame)
        except TypeError:
            raise QueryError(f"frame must be an integer video frame in [0, {n - 1}], got {frame!r}") from None
        if not -n <= f < n:
            raise QueryError(
                f"frame {f} is outside this video's {n} frames (expected 0..{n - 1}, or negative from the end)"
            )
        return self.source[f]

    def token_frames_of(self, frame: Any) -> list[int]:
        """The token frames a query's ``frame`` argument selects: None (every frame), a video frame,
        or a range / sequence of video frames."""
        if frame is None:
            return list(range(self.token_frames))
        if getattr(frame, "ndim", 0) >= 1 and callable(getattr(frame, "tolist", None)):  # an array / tensor of frames
            frame = list(frame.reshape(-1).tolist()) if frame.ndim > 1 else list(frame.tolist())
        if isinstance(frame, (range, Sequence)) and not isinstance(frame, str):
            if len(frame) == 0:
                raise QueryError("frame= got an empty range of frames: give at least one video frame")
            return sorted({self.token_frame(f) for f in frame})
        return [self.token_frame(frame)]

    def to_dict(self) -> dict[str, Any]:
        return {"token_frames": self.token_frames, "rows": self.rows, "source": list(self.source), "note": self.note}

    @classmethod
    def from_dict(cls, d: Any) -> FrameLayout:
        """Read a layout from JSON (untrusted: every field is checked)."""
        if not isinstance(d, dict) or not {"token_frames", "rows", "source"} <= set(d):
            raise QueryError(f"a frame layout must be a dict with token_frames, rows and source, got {d!r:.200}")
        src = d["source"]
        if not isinstance(src, list):
            raise QueryError(f"a frame layout's source must be a list, got {type(src).__name__}")
        note = d.get("note", "")
        return cls(d["token_frames"], d["rows"], tuple(src), note if isinstance(note, str) else "")
