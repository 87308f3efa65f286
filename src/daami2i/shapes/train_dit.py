"""Train a small SD3-style (MMDiT, joint attention) model on the shapes world, resumably, on CPU.

    python -m daami2i.shapes.train_dit --work runs/shapes-dit --vae runs/shapes/vae --pool runs/shapes2

It exists to measure SD3-style heat maps against exact masks (``benchmarks/dit_layers.py``: which
joint-attention layers carry the grounding), not to be shipped. The recipe (seeded; every random
draw is a function of the seed and the step, so a stopped run resumes identically):

* the shapes VAE (``--vae``, trained by :mod:`daami2i.shapes.train`), with ``shift_factor`` 0;
* two 64-wide CLIP text encoders with projections (the real CLIP BPE tokenizer, prompts of at most
  16 tokens) and no T5, as SD3 allows: SD3's pipeline then appends ``max_sequence_length`` zero text
  tokens, so sample with ``max_sequence_length=16`` as it was trained (:func:`load_pipeline` and
  :data:`CALL` say so);
* an ``SD3Transformer2DModel``: patch size 1 on the 16x16 latent (a 16x16 grid of image tokens, like
  the UNet's highest attention resolution), ``--layers`` joint blocks of 4 heads x 16, QK RMS-norm;
* rectified-flow training (``x_t = (1 - s) x_0 + s e``, target ``e - x_0``, ``s`` logit-normal as in
  SD3), 10 % caption dropout, AdamW with warm-up and cosine decay; diffusion loss only.

Use one torch thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import train as base

MAX_TOKENS = 16  # captions have at most 13 CLIP tokens with the start and end tokens
CALL: dict[str, Any] = {"num_inference_steps": 25, "guidance_scale": 4.0, "max_sequence_length": MAX_TOKENS}


def load_pipeline(path: str | Path) -> Any:
    """Load a pipeline written by this script (no T5, no image encoder)."""
    from diffusers import StableDiffusion3Pipeline

    none = dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), local_files_only=True, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_text_encoder(seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer(layers: int, seed: int) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=128,  # the two CLIP encoders' widths side by side
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )


def encode(texts: list[Any], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD3's pipeline feeds the transformer for CLIP-only prompts: the penultimate hidden states
    of both encoders side by side, then as many zero (absent T5) tokens; pooled projections joined."""
    hidden, pooled = [], []
    for te in texts:
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    return torch.cat([clip, torch.zeros_like(clip)], dim=1), torch.cat(pooled, dim=-1)


def train(args: argparse.Namespace) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ..testing import clip_tokenizer

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer()
    base._TOK = tok
    vae = AutoencoderKL.from_pretrained(str(args.vae))
    vae.register_to_config(shift_factor=0.0)
    vae.eval().requires_grad_(False)
    pool = base.make_pool(args.pool, vae, args.pool_size)
    texts = [build_text_encoder(args.seed + 1).train(), build_text_encoder(args.seed + 2).train()]
    transformer = build_transformer(args.layers, args.seed + 3).train()
    params = [p for m in (*texts, transformer) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    modules = {"transformer": transformer, "text": texts[0], "text_2": texts[1]}
    ckpt = work / "ckpt-dit"
    start = base.load_ckpt(ckpt, modules, opt)
    empty = torch.tensor(tok("", padding="max_length", max_length=MAX_TOKENS).input_ids)
    t0 = time.time()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = base._lr(step, args.steps, args.lr)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, pool["mean"].shape[0], (args.batch,), generator=gen)
        eps = torch.randn(pool["mean"][idx].shape, generator=gen)
        x0 = (pool["mean"][idx] + pool["std"][idx] * eps) * vae.config.scaling_factor
        keep = torch.rand(args.batch, generator=gen) >= 0.1
        ids = torch.where(keep[:, None], pool["ids"][idx][:, :MAX_TOKENS], empty[None])
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal noise levels
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        ctx, pooled = encode(texts, ids)
        pred = transformer(
            hidden_states=xt, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=s * 1000
        ).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"dit step {step + 1}/{args.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            base.save_ckpt(ckpt, modules, opt, step + 1, {"stage": "dit"})
        if args.stop_after is not None and step + 1 >= args.stop_after:
            print(f"stopped after step {step + 1}; run the same command without --stop-after to resume", flush=True)
            return ckpt
    tok.model_max_length = MAX_TOKENS
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=texts[0].eval(),
        tokenizer=tok,
        text_encoder_2=texts[1].eval(),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    out = work / "pipeline"
    pipe.save_pretrained(str(out), safe_serialization=True)
    (work / "train.json").write_text(
        json.dumps({**{k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - t0})
    )
    print(f"pipeline saved to {out}; {(time.time() - t0) / 60:.1f} min", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train an SD3-style shapes-world model (for benchmarks).")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--vae", type=Path, required=True, help="the shapes VAE folder (from daami2i.shapes.train)")
    p.add_argument("--pool", type=Path, required=True, help="folder holding (or to hold) the encoded scenes")
    p.add_argument("--pool-size", type=int, default=24576)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
