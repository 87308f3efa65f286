"""The tiny video fixtures (``daami2i.testing.wan`` / ``cogvideox`` / ``animatediff``): they build
offline, generate the frames asked for, and their attention calls have the token layout that
``docs/video.md`` states, measured here with forward pre-hooks on the attention modules and by
wrapping the attention function each processor calls.

Run with ``-s`` to see the recorded attention calls of each family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from daami2i.testing.cogvideox import tiny_cogvideox_pipeline
from daami2i.testing.cogvideox import video_token_grid as cogvideox_grid
from daami2i.testing.wan import tiny_wan_pipeline
from daami2i.testing.wan import video_token_grid as wan_grid

TEXT = 16  # max_sequence_length of every call below
SIZE = dict(height=32, width=48)  # latents 4x6, tokens 2x3 with spatial patch 2


@dataclass
class AttentionCall:
    name: str
    hidden: tuple[int, ...]
    encoder: tuple[int, ...] | None


@dataclass
class DenoiserCall:
    batch: int
    context: torch.Tensor | None = None  # the denoiser's encoder_hidden_states
    done: bool = False
    attention: list[AttentionCall] = field(default_factory=list)
    kernel: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (query, key) shapes


@contextmanager
def recording(denoiser: torch.nn.Module, sample_key: str = "hidden_states") -> Iterator[list[DenoiserCall]]:
    """Record every denoiser call and, inside it, every attention module call (pre-hooks)."""
    calls: list[DenoiserCall] = []

    def on_denoiser(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = kwargs[sample_key] if sample_key in kwargs else args[0]
        context = kwargs.get("encoder_hidden_states")
        calls.append(DenoiserCall(sample.shape[0], None if context is None else context.detach().clone()))

    def on_attention(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            calls[-1].attention.append(
                AttentionCall(name, tuple(hidden.shape), None if encoder is None else tuple(encoder.shape))
            )

        return hook

    def on_denoiser_end(_module: torch.nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        calls[-1].done = True

    handles = [
        denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True),
        denoiser.register_forward_hook(on_denoiser_end),
    ]
    for name, module in denoiser.named_modules():
        if name.endswith(("attn1", "attn2")):
            handles.append(module.register_forward_pre_hook(on_attention(name), with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def kernel_recorder(calls: list[DenoiserCall]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap an attention function so that each call's query / key shapes inside a denoiser call are
    recorded (the text encoders call ``F.scaled_dot_product_attention`` too)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if calls and not calls[-1].done:
                calls[-1].kernel.append((tuple(query.shape), tuple(key.shape)))
            return fn(query, key, *args, **kwargs)

        return recorded

    return wrap


def report(family: str, calls: list[DenoiserCall], steps: int) -> None:
    print(f"\n[{family}] {len(calls)} denoiser calls for {steps} steps; batch per call {[c.batch for c in calls]}")
    for a in calls[0].attention:
        print(f"  {a.name}: hidden_states {a.hidden}, encoder_hidden_states {a.encoder}")
    print(f"  attention function (query, key) shapes of the first call: {calls[0].kernel}")


def changed_tokens(
    first_attention_input: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, at: tuple[int, ...]
) -> list[int]:
    """Indices of the first self-attention's input tokens that change when one latent value changes."""
    base = first_attention_input(latents)
    bumped = latents.clone()
    bumped[at] += 1.0
    delta = (first_attention_input(bumped) - base).abs().amax(dim=-1)[0]
    return torch.nonzero(delta > 0).flatten().tolist()


def first_input(
    denoiser: torch.nn.Module, run: Callable[[torch.Tensor], Any], name: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of the latents giving the hidden_states the attention module ``name`` first receives."""
    module = denoiser.get_submodule(name)

    def inputs(latents: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                run(latents)
        finally:
            handle.remove()
        return seen[0]

    return inputs


# ----------------------------------------------------------------------------------------- Wan 2.1


@pytest.fixture(scope="module")
def wan() -> Any:
    return tiny_wan_pipeline()


@pytest.mark.parametrize("num_frames", [1, 5, 9])
def test_wan_generates_the_frames_asked_for(wan: Any, num_frames: int) -> None:
    out = wan(
        prompt="a red fox",
        num_frames=num_frames,
        num_inference_steps=2,
        max_sequence_length=TEXT,
        output_type="np",
        **SIZE,
    )
    frames = out.frames[0]
    assert frames.shape == (num_frames, 32, 48, 3)
    assert np.isfinite(frames).all() and frames.std() > 0
    assert wan.text_encoder.config.vocab_size == len(wan.tokenizer)
    # Wan's VAE: time by 4 (causal: the first frame alone), space by 8
    assert (wan.vae.config.scale_factor_temporal, wan.vae.config.scale_factor_spatial) == (4, 8)
    latents = wan(
        prompt="a red fox",
        num_frames=num_frames,
        num_inference_steps=1,
        max_sequence_length=TEXT,
        output_type="latent",
        **SIZE,
    ).frames
    assert latents.shape == (1, 16, (num_frames - 1) // 4 + 1, 4, 6)  # (B, C, F, H, W)


def test_wan_attention_calls(wan: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.models.transformers.transformer_wan as wan_module

    steps, num_frames = 2, 9
    grid = wan_grid(wan, num_frames, **SIZE)
    assert grid == (3, 2, 3)
    n_video = grid[0] * grid[1] * grid[2]
    width = 2 * 8  # heads x head dim
    with recording(wan.transformer) as calls:
        monkeypatch.setattr(
            wan_module, "dispatch_attention_fn", kernel_recorder(calls)(wan_module.dispatch_attention_fn)
        )
        wan(
            prompt="a red fox",
            negative_prompt="",
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=5.0,
            max_sequence_length=TEXT,
            output_type="latent",
            **SIZE,
        )
    report("wan", calls, steps)
    # guidance: two transformer calls per step, each of batch 1: first cond, then uncond
    assert len(calls) == 2 * steps and all(c.batch == 1 for c in calls)
    with torch.no_grad():
        cond, uncond = wan.encode_prompt("a red fox", "", max_sequence_length=TEXT, device="cpu")
    assert not torch.allclose(cond, uncond, atol=1e-2)
    for i, call in enumerate(calls):
        assert call.context is not None and torch.allclose(call.context, cond if i % 2 == 0 else uncond, atol=1e-5)
    # per block: attn1 self-attention over the video tokens, attn2 cross-attention to the padded text
    names = [f"blocks.{b}.attn{k}" for b in range(2) for k in (1, 2)]
    for call in calls:
        assert [a.name for a in call.attention] == names
        for a in call.attention:
            assert a.hidden == (1, n_video, width)
            assert a.encoder == (None if a.name.endswith("attn1") else (1, TEXT, width))
        # dispatch_attention_fn gets (B, N, heads, head dim): one call per attention module
        assert call.kernel == [
            ((1, n_video, 2, 8), (1, n_video if k == 1 else TEXT, 2, 8)) for b in range(2) for k in (1, 2)
        ]
    # the text is zero-padded to max_sequence_length, not masked: "a red fox" is 6 ids (with </s>)
    assert len(wan.tokenizer("a red fox").input_ids) == 6
    assert torch.count_nonzero(cond[0, 6:]) == 0 and torch.count_nonzero(cond[0, :6].abs().sum(-1)) == 6
    # without guidance: one call per step
    with recording(wan.transformer) as calls:
        wan(
            prompt="a red fox",
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=1.0,
            max_sequence_length=TEXT,
            output_type="latent",
            **SIZE,
        )
    assert len(calls) == steps


def test_wan_tokens_are_frame_major(wan: Any) -> None:
    """A change of one latent value (frame f, row y, column x) changes only token (f, y // 2, x // 2),
    index f * rows * columns + row * columns + column, of the first self-attention's input."""
    transformer = wan.transformer
    frames, rows, cols = 3, 2, 3
    torch.manual_seed(0)
    latents = torch.randn(1, 16, frames, 4, 6)
    text = torch.randn(1, TEXT, 16)
    run = lambda x: transformer(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text)  # noqa: E731
    inputs = first_input(transformer, run, "blocks.0.attn1")
    assert inputs(latents).shape == (1, frames * rows * cols, 16)
    for f, y, x in [(0, 0, 0), (1, 3, 0), (2, 1, 5), (2, 3, 4)]:
        token = f * rows * cols + (y // 2) * cols + x // 2
        assert changed_tokens(inputs, latents, (0, 3, f, y, x)) == [token]


# --------------------------------------------------------------------------------------- CogVideoX


@pytest.fixture(scope="module")
def cogvideox() -> Any:
    return tiny_cogvideox_pipeline()


@pytest.fixture(scope="module")
def cogvideox15() -> Any:
    return tiny_cogvideox_pipeline(patch_size_t=2)


@pytest.mark.parametrize("num_frames, decoded", [(9, 9), (17, 17), (5, 8), (13, 16)])
def test_cogvideox_frames(cogvideox: Any, num_frames: int, decoded: int) -> None:
    """``L = (n - 1) / 4 + 1`` latent frames decode to ``4 (L - 1) + 1`` frames when L is odd, ``4 L`` when even."""
    out = cogvideox(
        prompt="a red fox",
        num_frames=num_frames,
        num_inference_steps=2,
        max_sequence_length=TEXT,
        output_type="np",
        **SIZE,
    )
    frames = out.frames[0]
    assert frames.shape == (decoded, 32, 48, 3)
    assert np.isfinite(frames).all() and frames.std() > 0
    assert cogvideox.text_encoder.config.vocab_size == len(cogvideox.tokenizer)
    latents = cogvideox(
        prompt="a red fox",
        num_frames=num_frames,
        num_inference_steps=1,
        max_sequence_length=TEXT,
        output_type="latent",
        **SIZE,
    ).frames
    assert latents.shape == (1, (num_frames - 1) // 4 + 1, 4, 4, 6)  # (B, F, C, H, W)


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_cogvideox_attention_calls(
    cogvideox: Any, cogvideox15: Any, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = cogvideox if version == "1.0" else cogvideox15
    steps, num_frames = 2, 9
    grid = cogvideox_grid(pipe, num_frames, **SIZE)
    # 3 latent frames; 1.5 pads them to 4 and patches pairs of frames
    assert grid == ((3, 2, 3) if version == "1.0" else (2, 2, 3))
    n_video = grid[0] * grid[1] * grid[2]
    width = 2 * 16
    with recording(pipe.transformer) as calls:
        monkeypatch.setattr(
            torch.nn.functional,
            "scaled_dot_product_attention",
            kernel_recorder(calls)(torch.nn.functional.scaled_dot_product_attention),
        )
        pipe(
            prompt="a red fox",
            negative_prompt="",
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=6.0,
            max_sequence_length=TEXT,
            output_type="latent",
            **SIZE,
        )
    report(f"cogvideox {version}", calls, steps)
    # guidance: one transformer call per step with the batch [uncond, cond]
    assert len(calls) == steps and all(c.batch == 2 for c in calls)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red fox", "", max_sequence_length=TEXT, device="cpu")
    assert not torch.allclose(cond, uncond, atol=1e-2)
    names = [f"transformer_blocks.{b}.attn1" for b in range(2)]
    for call in calls:
        assert [a.name for a in call.attention] == names
        for a in call.attention:  # video and text enter separately; the processor joins them [text, video]
            assert a.hidden == (2, n_video, width) and a.encoder == (2, TEXT, width)
        # F.scaled_dot_product_attention gets (B, heads, text + video, head dim), once per block
        assert call.kernel == [((2, 2, TEXT + n_video, 16), (2, 2, TEXT + n_video, 16))] * 2
    # the batch is [uncond, cond]
    for call in calls:
        assert call.context is not None and torch.allclose(call.context, torch.cat([uncond, cond]), atol=1e-5)


def test_cogvideox_tokens_are_frame_major(cogvideox: Any, cogvideox15: Any) -> None:
    """A change of one latent value changes only its token in the first attention's video input:
    1.0 (frame f, row y, column x) -> token f * rows * cols + (y // 2) * cols + x // 2;
    1.5 the same with frame f // 2 (pairs of latent frames)."""
    torch.manual_seed(0)
    text = torch.randn(1, TEXT, 32)
    for pipe, pt in [(cogvideox, 1), (cogvideox15, 2)]:
        transformer = pipe.transformer
        latents = torch.randn(1, 4, 4, 4, 6)  # (B, F, C, H, W), 4 latent frames
        frames, rows, cols = 4 // pt, 2, 3
        run = lambda x, t=transformer: t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]))  # noqa: E731
        inputs = first_input(transformer, run, "transformer_blocks.0.attn1")
        assert inputs(latents).shape == (1, frames * rows * cols, 32)
        for f, y, x in [(0, 0, 0), (1, 3, 0), (2, 1, 5), (3, 3, 4)]:
            token = (f // pt) * rows * cols + (y // 2) * cols + x // 2
            assert changed_tokens(inputs, latents, (0, f, 1, y, x)) == [token]


# -------------------------------------------------------------------------------------- AnimateDiff


@pytest.fixture(scope="module")
def animatediff() -> Any:
    from daami2i.testing.animatediff import tiny_animatediff_pipeline

    return tiny_animatediff_pipeline()


def test_animatediff_frames_and_attention_calls(animatediff: Any) -> None:
    pipe, steps, frames = animatediff, 2, 4
    out = pipe(prompt="a red fox", num_frames=frames, height=64, width=96, num_inference_steps=steps, output_type="np")
    assert out.frames[0].shape == (frames, 64, 96, 3)  # no temporal compression: a latent frame per frame
    assert np.isfinite(out.frames).all() and out.frames.std() > 0
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    with recording(pipe.unet, sample_key="sample") as calls:
        pipe(
            prompt="a red fox",
            negative_prompt="",
            num_frames=frames,
            height=64,
            width=96,
            num_inference_steps=steps,
            output_type="latent",
        )
    report("animatediff", calls, steps)
    # guidance: one UNet call per step with the batch [uncond, cond] of (B, C, F, H, W) latents
    assert len(calls) == steps and all(c.batch == 2 for c in calls)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red fox", "cpu", 1, True, "")
    for call in calls:
        # the pipeline repeats each prompt per frame before the UNet: [uncond x F, cond x F]
        expected = torch.cat([uncond, cond]).repeat_interleave(frames, dim=0)
        assert call.context is not None and torch.allclose(call.context, expected, atol=1e-5)
        spatial = [a for a in call.attention if ".attentions." in a.name]
        motion = [a for a in call.attention if ".motion_modules." in a.name]
        assert len(spatial) + len(motion) == len(call.attention)
        # spatial layers (3 resolutions: latent 8x12, 4x6, 2x3): batch (B * F), frames of an item together
        for a in spatial:
            assert a.hidden[0] == 2 * frames and a.hidden[1] in (8 * 12, 4 * 6, 2 * 3)
            assert a.encoder == (None if a.name.endswith("attn1") else (2 * frames, 77, 32))
        # motion modules: attn1 and attn2 are both temporal self-attention, batch (B * H * W), sequence F
        for a in motion:
            assert a.encoder is None and a.hidden[1] == frames
            assert a.hidden[0] in (2 * 8 * 12, 2 * 4 * 6, 2 * 2 * 3)
        assert len(spatial) == 14 and len(motion) == 20  # 7 spatial layers, 10 motion modules, 2 calls each
