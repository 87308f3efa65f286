"""The supported-models table: every family's real configuration at its default resolution.

    python benchmarks/families.py [--prompt-tokens 20] [--json outputs/bench-families.json]

Each denoiser is built from its published configuration on the meta device (no weights, no
download) and :meth:`daami2i.Trace.estimate_nbytes` gives the store of one image under the default
trace (the same geometry the trace uses when it allocates the stores). Beside it: what keeping q and
k of every captured layer at every step takes (fp16, the conditional pass only), the way a tool that
recomputes maps after the run must keep them.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import daami2i

UNET_SD1 = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
# (family, model, denoiser class, config, image size, steps, text columns in the model's context)
MODELS = [
    ("unet", "SD 1.5", "UNet2DConditionModel", UNET_SD1, 512, 50, 77),
    (
        "unet", "SD 2.1-base", "UNet2DConditionModel",
        {**UNET_SD1, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        512, 50, 77,
    ),
    (
        "unet", "SDXL", "UNet2DConditionModel",
        dict(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ),
        1024, 50, 77,
    ),
    (
        "sd3", "SD3-medium", "SD3Transformer2DModel",
        dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        ),
        1024, 28, 77 + 256,
    ),
    (
        "flux", "FLUX.1-dev", "FluxTransformer2DModel",
        dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        1024, 28, 512,
    ),
    (
        "chroma", "Chroma1-HD", "ChromaTransformer2DModel",
        dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
            approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5,
        ),
        1024, 35, 512,
    ),
    (
        "flux2", "FLUX.2-klein-4B", "Flux2Transformer2DModel",
        dict(
            patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
            guidance_embeds=False,
        ),
        1024, 4, 512,  # step-distilled: 4 steps, one pass; Qwen3-4B's chat-templated prompt padded to 512
    ),
    (
        "flux2", "FLUX.2-klein-base-9B", "Flux2Transformer2DModel",
        dict(
            patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
            num_attention_heads=32, joint_attention_dim=12288, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
            guidance_embeds=False,
        ),
        1024, 50, 512,  # the undistilled base: 50 steps, guidance as a second (empty-prompt) pass
    ),
    (
        "pixart", "PixArt-Σ-XL-2-1024", "PixArtTransformer2DModel",
        dict(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096, interpolation_scale=2,
        ),
        1024, 20, 300,
    ),
    (
        "qwenimage", "Qwen-Image", "QwenImageTransformer2DModel",
        dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
        ),
        1024, 50, 20 + 5,  # the prompt's tokens and the chat template's end (the system prefix is dropped)
    ),
    (
        "qwenimage", "Qwen-Image-Edit", "QwenImageTransformer2DModel",
        dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
        ),
        # beside the output's tokens: the kept text (vision start, 37x37 merged vision tokens of the
        # ~1024 px reference image, vision end, the prompt, the template's end) and 64x64 reference tokens
        1024, 50, (1 + 1369 + 1 + 20 + 5) + 4096,
    ),
    (
        "qwenimage", "Qwen-Image-Edit-2509 (Edit Plus)", "QwenImageTransformer2DModel",
        dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
        ),
        # one reference image: "Picture 1: " (about 4 tokens), its 14x14 vision tokens (384 px), the prompt,
        # the end; 64x64 reference tokens
        1024, 50, (4 + 1 + 196 + 1 + 20 + 5) + 4096,
    ),
    (
        "zimage", "Z-Image-Turbo", "ZImageTransformer2DModel",
        dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
        ),
        1024, 9, 32,  # the chat-templated prompt (3 + 20 + 5 tokens) padded to a multiple of 32
    ),
    (
        "lumina2", "Lumina-Image-2.0", "Lumina2Transformer2DModel",
        dict(
            sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26, num_refiner_layers=2,
            num_attention_heads=24, num_kv_heads=8, multiple_of=256, axes_dim_rope=(32, 32, 32),
            axes_lens=(300, 512, 512), cap_feat_dim=2304,
        ),
        1024, 30, 34 + 20,  # <bos>, the system prompt and " <Prompt Start> " (about 34 Gemma tokens), the prompt
    ),
    (
        "sana", "Sana-1600M-1024px", "SanaTransformer2DModel",
        dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
        ),
        1024, 20, 300,  # <bos> and the last 299 of instruction + prompt (the instruction's other tokens dropped)
    ),
    (
        "sana", "Sana-600M-1024px", "SanaTransformer2DModel",
        dict(
            in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
            num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
        ),
        1024, 20, 300,
    ),
    (
        "sana", "Sana-Sprint-1.6B-1024px", "SanaTransformer2DModel",
        dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1, guidance_embeds=True,
            qk_norm="rms_norm_across_heads",
        ),
        1024, 2, 300,
    ),
    (
        "hidream", "HiDream-I1-Full", "HiDreamImageTransformer2DModel",
        dict(
            patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
            attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
            num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
            llama_layers=[*range(32), *[31] * 16],
        ),
        1024, 50, 128 + 2 * 128,  # T5 128, Llama-3.1 last layer 128, the block's own Llama layer 128
    ),
    (
        "hidream", "HiDream-I1-Dev", "HiDreamImageTransformer2DModel",
        dict(
            patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
            attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
            num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
            llama_layers=[*range(32), *[31] * 16],
        ),
        1024, 28, 128 + 2 * 128,  # guidance-distilled: one pass (guidance_scale 0)
    ),
    (
        "wan", "Wan2.1-T2V-1.3B", "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        (81, 480, 832), 50, 512,  # (frames, height, width): 21 latent frames of 60 x 104, stacked
    ),
    (
        "cogvideox", "CogVideoX-2b", "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=30,
            text_embed_dim=4096, time_embed_dim=512, sample_height=60, sample_width=90, sample_frames=49,
            max_text_seq_length=226, use_rotary_positional_embeddings=False,
        ),
        (49, 480, 720), 50, 226,  # 13 latent frames of 60 x 90, stacked
    ),
    (
        "cogvideox", "CogVideoX-5b", "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
            text_embed_dim=4096, time_embed_dim=512, sample_height=60, sample_width=90, sample_frames=49,
            max_text_seq_length=226, use_rotary_positional_embeddings=True,
        ),
        (49, 480, 720), 50, 226,
    ),
    (
        "cogvideox", "CogVideoX1.5-5B", "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
            text_embed_dim=4096, time_embed_dim=512, sample_height=300, sample_width=300, sample_frames=81,
            patch_size_t=2, patch_bias=False, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        ),
        (81, 768, 1360), 50, 226,  # 21 latent frames padded to 22, in pairs: 11 token frames of 96 x 170
    ),
    (
        "ltx", "LTX-Video 0.9", "LTXVideoTransformer3DModel",
        dict(
            in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
            attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
        ),
        (161, 480, 704), 50, 128,  # LTXPipeline's example: 21 latent frames (time by 8) of 15 x 22 (by 32)
    ),
    (
        "hunyuanvideo", "HunyuanVideo", "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56),
        ),
        (129, 720, 1280), 50, 256,  # 33 latent frames of 90 x 160; the Llama text padded to 256 (masked)
    ),
    (
        # HunyuanVideo 1.5 480p t2v: the class defaults (the published layout) with target_size 640, whose
        # default size is 480 x 848; 121 frames are 31 latent frames of 30 x 53 (space by 16), patch 1
        "hunyuanvideo15", "HunyuanVideo 1.5 (480p t2v)", "HunyuanVideo15Transformer3DModel",
        dict(
            in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
            num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
            text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
            rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v",
        ),
        (121, 480, 848), 50, 256 + 1000,  # the text keys kept: ByT5 256 + Qwen 1000 (729 image tokens dropped)
    ),
    (
        # SD 1.5 with the motion adapter v1-5-2 (16 frames of 512 x 512; a UNetMotionModel's default config)
        "animatediff", "AnimateDiff (SD 1.5 + motion v1-5-2)", "UNetMotionModel",
        dict(sample_size=64, cross_attention_dim=768, motion_max_seq_length=32, use_motion_mid_block=True),
        (16, 512, 512), 25, 77,
    ),
]  # fmt: skip


#: VAEs that do not scale by 8: Sana's DC-AE and the LTX-Video VAE scale by 32, HunyuanVideo 1.5's by 16
VAE_SCALE = {"sana": 32, "ltx": 32, "hunyuanvideo15": 16}
#: video VAEs' time compression where it is not 4 (AnimateDiff's 2-D VAE: none, so frames = latent frames)
VAE_TEMPORAL: dict[str, int] = {"ltx": 8, "animatediff": 1}


def _pipe(family: str, denoiser: torch.nn.Module) -> types.SimpleNamespace:
    attr = "unet" if family in ("unet", "animatediff") else "transformer"
    return types.SimpleNamespace(
        **{attr: denoiser},
        **({} if attr == "unet" else {"unet": None}),
        check_inputs=lambda *a, **k: None,
        encode_prompt=lambda *a, **k: None,  # Z-Image's pipelines read prompts there (no check_inputs)
    )


def table(prompt_tokens: int = 20) -> list[dict]:
    import warnings

    import diffusers

    rows = []
    for family, model, cls, config, size, steps, n_text in MODELS:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            denoiser = getattr(diffusers, cls)(**config)
        trc = daami2i.trace(_pipe(family, denoiser))
        assert trc.adapter.name == family, (model, trc.adapter.name)
        scale = VAE_SCALE.get(family, 8)  # every other VAE here scales by 8
        token_frames = 1
        if isinstance(size, tuple):  # video (frames, height, width): latent frames (time by 4) stacked
            frames, height, width = size
            pt = getattr(denoiser.config, "patch_size_t", None) or 1  # CogVideoX 1.5 patches pairs of frames
            token_frames = -(-((frames - 1) // VAE_TEMPORAL.get(family, 4) + 1) // pt)
            latent = (token_frames * (height // scale), width // scale)
        else:
            latent = (size // scale, size // scale)
        # the prompt's text columns: CLIP start + tokens + end (77 kept in full for UNets); T5 tokens + end;
        # HiDream: T5 tokens + end, then the Llama tokens + end twice (its last layer, each block's own)
        kept = {"unet": 77, "sd3": (prompt_tokens + 2) + (prompt_tokens + 1), "hidream": 3 * (prompt_tokens + 1)}.get(
            family, prompt_tokens + 1
        )
        store = trc.estimate_nbytes(latent, 1, kept, steps, frames=token_frames)
        qk = 0
        for site in trc.selected:
            h, w = trc.adapter.layer_grid(denoiser, latent, site.factor)
            n_img = h * w
            heads, dim = site.module.heads, site.module.inner_dim // site.module.heads
            s_q = n_img + (n_text if site.kind == "joint" else 0)
            s_k = n_text if site.kind == "cross" else s_q
            qk += steps * heads * dim * (s_q + s_k) * 2  # fp16 q and k, conditional pass
        rows.append(
            {
                "family": family,
                "model": model,
                "size": size,
                "steps": steps,
                "layers": len(trc.selected),
                "grid": trc.adapter.layer_grid(denoiser, latent, trc.grid_factor),
                "frames": token_frames,
                "store_mib": store["total"] / 2**20,
                "self_mib": store["self"] / 2**20,
                "words_mib": store["cross"] / 2**20,
                "qk_every_step_gib": qk / 2**30,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = table(args.prompt_tokens)
    head = "| family | model | size, steps | captured layers | grid | store per image (self + words) |"
    print(head + " q and k of every layer and step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        h, w = r["grid"]
        grid = f"{r['frames']}x{h // r['frames']}x{w}" if r["frames"] > 1 else f"{h}x{w}"  # video: frames x h x w
        size = "x".join(str(v) for v in r["size"][1:] + r["size"][:1]) if isinstance(r["size"], tuple) else r["size"]
        print(
            f"| {r['family']} | {r['model']} | {size} px, {r['steps']} | {r['layers']} | {grid} | "
            f"{r['store_mib']:.0f} MiB ({r['self_mib']:.0f} + {r['words_mib']:.0f}) | "
            f"{r['qk_every_step_gib']:.1f} GiB |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
