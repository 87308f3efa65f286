"""Train the embedded shapes-world model (VAE, then UNet + text encoder), resumably, on CPU.

    python -m daami2i.shapes.train --work runs/shapes            # the shipped recipe, all stages
    python -m daami2i.shapes.train --work runs/shapes-unsup --variant unsupervised --vae runs/shapes/vae

The recipe (seeded; every random draw is a function of the seed and the step, so a stopped run
resumes where its last checkpoint was and continues identically):

1. ``vae``: an AutoencoderKL (64x64 RGB -> 4x16x16) trained on reconstruction (+ a tiny KL term).
2. ``unet``: UNet2DConditionModel (attention at 16x16 and 8x8) and a 64-wide CLIPTextModel (real
   CLIP BPE tokenizer), trained jointly on the epsilon-prediction loss, weighted by min-SNR-gamma
   (``--snr-gamma``), with 10 % caption dropout (so classifier-free guidance works); learning rate
   1e-3 with warm-up and cosine decay. At the end of this stage a copy of the checkpoint is kept
   (``ckpt-base``): both variants continue from it.
3. ``refine``: a shorter stage with its own warm-up and cosine decay (peak ``--refine-lr``). The
   ``supervised`` variant adds two auxiliary losses here: one (weight ``--cross-weight``) pulls each
   colour / shape word's cross-attention toward its object's mask, the other (weight
   ``--self-weight``) each pixel's self-attention toward its own object (or the background). Both
   supervise only the first head of each layer (``--head-share 0.25``: 1 of 2 heads at 16x16, 1 of 4
   at 8x8) and leave the others free to draw: the maps stay good and far more prompts are drawn
   right than with every head supervised (docs/shapes.md).

The ``unsupervised`` variant trains stage 3 with the diffusion loss alone, for an honest comparison;
``--init-from runs/shapes/ckpt-base`` starts it from the supervised run's stage-2 checkpoint, so the
two differ only in the auxiliary losses.
Use one torch thread: on 2 shared cores, two threads in one process are much slower; ``--procs 2``
runs the UNet stages as two data-parallel processes of one thread each instead.
Checkpoints (safetensors + JSON, no pickle) go to ``--work``; the final pipeline folder to
``--work/pipeline`` (copy it into ``src/daami2i/assets/shapes-model`` to ship it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import SIZE, make_scene

TRAIN_SEEDS = 0  # scenes 0 .. pool-1 are training data; held-out scenes start at HELD_OUT
HELD_OUT = 10_000_000
WORDS = ("red", "green", "blue", "yellow", "circle", "square", "triangle")


# -- models -----------------------------------------------------------------------------------------
def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=64,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(40, 80),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        norm_num_groups=8,
    )


def train_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def sample_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )


# -- data -------------------------------------------------------------------------------------------
def scene_tensors(seeds: list[int], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Images in [-1, 1], token ids, and per-token / per-pixel targets at 16x16 and 8x8."""
    images, ids, labels = [], [], []
    token_obj = torch.zeros(len(seeds), 77, dtype=torch.long)  # object index + 1 named by each token, 0 = none
    for b, seed in enumerate(seeds):
        sc = make_scene(seed)
        images.append(torch.from_numpy(np.array(sc.image)).permute(2, 0, 1).float() / 127.5 - 1)
        tok = tokenizer(sc.caption, padding="max_length", max_length=77, truncation=True).input_ids
        ids.append(torch.tensor(tok))
        toks = [t.replace("</w>", "") for t in tokenizer.tokenize(sc.caption)]
        for j, obj in enumerate(sc.objects):
            for pos, t in enumerate(toks):
                if t in (obj.color, obj.shape):
                    token_obj[b, pos + 1] = j + 1
        lab = np.zeros((SIZE, SIZE), dtype=np.int64)
        for j, m in enumerate(sc.masks):
            lab[m] = j + 1
        labels.append(torch.from_numpy(lab))
    return {
        "images": torch.stack(images),
        "ids": torch.stack(ids),
        "token_obj": token_obj,
        "labels": torch.stack(labels),  # (B, 64, 64) 0 = background, j + 1 = object j
    }


def downsample_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Majority label of each cell: (B, 64, 64) -> (B, size * size)."""
    onehot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()  # up to 3 objects + background
    pooled = F.adaptive_avg_pool2d(onehot, size)
    return pooled.argmax(1).flatten(1)


# -- attention capture for the auxiliary losses ------------------------------------------------------
class ExplicitAttention:
    """Training-time processor: explicit softmax attention that hands its probabilities to a sink."""

    def __init__(self, name: str, sink: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.sink = sink

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, **_: Any) -> Any:
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n = hidden_states.shape[:2]
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
        k = attn.to_k(ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)
        v = attn.to_v(ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        self.sink[self.name] = probs
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def _supervised_heads(p: torch.Tensor, share: float) -> torch.Tensor:
    """The first ``share`` of the heads of probabilities ``p`` (B, heads, N, M), at least one."""
    return p[:, : max(1, round(p.shape[1] * share))]


def cross_loss(
    sink: dict[str, torch.Tensor],
    token_obj: torch.Tensor,
    labels: dict[int, torch.Tensor],
    keep: torch.Tensor,
    head_share: float = 1.0,
    sizes: tuple[int, ...] | None = None,
    words: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - fraction of each object word's (pixel-normalised) attention that falls on its object.

    The mean is over the object words kept in the batch; ``words`` overrides their count (data
    parallel: each process's share of the whole batch's count, so that the processes' mean gradient
    is the whole batch's).
    """
    total: Any = 0.0
    count = 0
    for name, p in sink.items():
        if not name.endswith("attn2") or (sizes is not None and p.shape[2] not in sizes):
            continue
        p = _supervised_heads(p, head_share)
        lab = labels[p.shape[2]]  # (B, N)
        target = (lab[:, None, :] == token_obj[:, :, None]).float() * (token_obj[:, :, None] > 0)  # (B, 77, N)
        a = p.transpose(2, 3)  # (B, h, 77, N)
        a = a / (a.sum(-1, keepdim=True) + 1e-8)
        inside = (a * target[:, None]).sum(-1)  # (B, h, 77)
        w = ((token_obj > 0) & keep[:, None]).float()[:, None]  # (B, 1, 77)
        n = w.sum() if words is None else words
        total = total + ((1 - inside) * w).sum() / (n * p.shape[1] + 1e-8)
        count += 1
    return total / max(count, 1)


def self_loss(
    sink: dict[str, torch.Tensor],
    labels: dict[int, torch.Tensor],
    head_share: float = 1.0,
    sizes: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """1 - fraction of each pixel's self-attention that stays within its own segment."""
    total: Any = 0.0
    count = 0
    for name, p in sink.items():
        if not name.endswith("attn1") or (sizes is not None and p.shape[2] not in sizes):
            continue
        p = _supervised_heads(p, head_share)
        lab = labels[p.shape[2]]
        same = (lab[:, :, None] == lab[:, None, :]).float()  # (B, N, N)
        total = total + (1 - (p * same[:, None]).sum(-1)).mean()
        count += 1
    return total / max(count, 1)


# -- checkpoints (safetensors + JSON) ----------------------------------------------------------------
def save_ckpt(path: Path, modules: dict[str, Any], opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"{k}/{n}": t.detach().contiguous() for k, m in modules.items() for n, t in m.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt/{i}/{key}"] = val.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(json.dumps({"step": step, **extra}))


def load_ckpt(path: Path, modules: dict[str, Any], opt: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    meta = path.with_suffix(".json")
    if not meta.is_file() or not path.with_suffix(".safetensors").is_file():
        return 0
    tensors = load_file(str(path.with_suffix(".safetensors")))
    for k, m in modules.items():
        m.load_state_dict({n[len(k) + 1 :]: t for n, t in tensors.items() if n.startswith(k + "/")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {key.split("/")[-1]: t for key, t in tensors.items() if key.startswith(f"opt/{i}/")}
        if st:
            opt.state[p] = st
    return int(json.loads(meta.read_text())["step"])


def _lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights min(SNR, gamma) / SNR of the epsilon loss (Hang et al. 2023); ones if gamma <= 0.

    >>> a = torch.tensor([0.99, 0.5, 0.01])
    >>> min_snr_weights(a, torch.tensor([0, 1, 2]), 5.0)
    tensor([0.0505, 1.0000, 1.0000])
    """
    if gamma <= 0:
        return torch.ones(t.shape)
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


# -- stages -----------------------------------------------------------------------------------------
def train_vae(work: Path, steps: int, batch: int, seed: int, log_every: int = 50) -> Any:
    out = work / "vae"
    if (out / "config.json").is_file():
        from diffusers import AutoencoderKL

        print(f"vae: found {out}, skipping", flush=True)
        return AutoencoderKL.from_pretrained(str(out))
    torch.manual_seed(seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt = work / "ckpt-vae"
    start = load_ckpt(ckpt, {"vae": vae}, opt)
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3)
        seeds = [TRAIN_SEEDS + (step * batch + i) % 1_000_000 for i in range(batch)]
        x = scene_tensors(seeds, _TOK)["images"]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=torch.Generator().manual_seed(seed * 7919 + step))
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            print(f"vae step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_ckpt(ckpt, {"vae": vae}, opt, step + 1, {"stage": "vae"})
    vae.eval()
    with torch.no_grad():  # scale latents to unit variance, as SD's scaling_factor does
        x = scene_tensors(list(range(HELD_OUT - 512, HELD_OUT)), _TOK)["images"]
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(str(out))
    print(f"vae: saved to {out} (latent std {std:.3f})", flush=True)
    return vae


def make_pool(work: Path, vae: Any, n: int, batch: int = 64) -> dict[str, torch.Tensor]:
    """Encode ``n`` training scenes once: latent mean / std, token ids, word targets, labels at 16 and 8."""
    from safetensors.torch import load_file, save_file

    path = work / f"pool-{n}.safetensors"
    if path.is_file():
        return load_file(str(path))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean", "std", "ids", "token_obj", "lab16", "lab8")}
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, n, batch):
            d = scene_tensors(list(range(TRAIN_SEEDS + start, TRAIN_SEEDS + min(n, start + batch))), _TOK)
            post = vae.encode(d["images"]).latent_dist
            out["mean"].append(post.mean)
            out["std"].append(post.std)
            out["ids"].append(d["ids"])
            out["token_obj"].append(d["token_obj"].to(torch.uint8))
            out["lab16"].append(downsample_labels(d["labels"], 16).to(torch.uint8))
            out["lab8"].append(downsample_labels(d["labels"], 8).to(torch.uint8))
    pool = {k: torch.cat(v).contiguous() for k, v in out.items()}
    save_file(pool, str(path))
    print(f"pool: {n} scenes encoded in {time.time() - t0:.0f}s", flush=True)
    return pool


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_unet(
    work: Path,
    vae: Any,
    variant: str,
    steps: int,
    refine_steps: int,
    batch: int,
    seed: int,
    cross_weight: float,
    self_weight: float,
    pool_size: int = 24576,
    drop: float = 0.1,
    log_every: int = 100,
    ckpt_every: int = 250,
    stop_after: int | None = None,
    snr_gamma: float = 5.0,
    lr: float = 1e-3,
    refine_lr: float = 3e-4,
    init_from: Path | None = None,
    aux_steps: int = 0,
    aux_lr: float = 1e-4,
    head_share: float = 1.0,
    aux_sizes: tuple[int, ...] | None = None,
    dump: Path | None = None,
) -> tuple[Any, Any]:
    """Stages 2 to 4. ``dump`` (a folder; for tests) receives, for every step and process, the
    inputs of the process's share of the batch, its loss and the gradients averaged over the
    processes, before clipping: ``step-<step>-rank-<rank>.safetensors``."""
    rank, world = _dist_rank_world()
    torch.manual_seed(seed + 1)
    unet = build_unet().train()
    text = build_text_encoder().train()
    sched = train_scheduler()
    vae.eval().requires_grad_(False)
    pool = make_pool(work, vae, pool_size)
    sink: dict[str, torch.Tensor] = {}
    supervised = variant == "supervised"
    explicit = False
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ckpt = work / "ckpt-unet"
    modules = {"unet": unet, "text": text}
    start = load_ckpt(ckpt, modules, opt)
    # with aux_steps, stage 3 is diffusion-only for both variants and a stage 4 carries the
    # auxiliary losses (supervised only); without, stage 3 carries them
    base = steps + refine_steps if aux_steps > 0 else steps  # where the variants part ways
    if start == 0 and init_from is not None:
        start = load_ckpt(Path(init_from), modules, opt)
        if start not in (steps, base):
            raise SystemExit(f"--init-from {init_from} holds step {start}, expected step {steps} or {base}")
        print(f"unet: starting from {init_from} (step {start})", flush=True)
    total = steps + refine_steps + (aux_steps if supervised else 0)
    empty = torch.tensor(_TOK("", padding="max_length", max_length=77).input_ids)
    alphas = sched.alphas_cumprod
    t0 = time.time()
    for step in range(start, total):
        refining = step >= steps
        if step >= steps + refine_steps:  # stage 4
            rate = _lr(step - steps - refine_steps, aux_steps, aux_lr, warmup=50)
        elif refining:
            rate = _lr(step - steps, refine_steps, refine_lr, warmup=50)
        else:
            rate = _lr(step, steps, lr)
        for g in opt.param_groups:
            g["lr"] = rate
        aux = supervised and step >= base
        if aux and not explicit:  # the auxiliary losses need the attention probabilities
            unet.set_attn_processor({n: ExplicitAttention(n[: -len(".processor")], sink) for n in unet.attn_processors})
            explicit = True
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, pool["mean"].shape[0], (batch,), generator=gen)
        eps = torch.randn(pool["mean"][idx].shape, generator=gen)
        lat = (pool["mean"][idx] + pool["std"][idx] * eps) * vae.config.scaling_factor
        token_obj = pool["token_obj"][idx].long()
        labels = {256: pool["lab16"][idx].long(), 64: pool["lab8"][idx].long()}
        keep = torch.rand(batch, generator=gen) >= drop
        ids = torch.where(keep[:, None], pool["ids"][idx], empty[None])
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        words = None  # the cross loss's count of object words: the whole batch's, shared by the processes
        if world > 1:  # every process draws the whole batch (same data as one process) and takes its share
            words = ((token_obj > 0) & keep[:, None]).sum() / world
            share = slice(rank * batch // world, (rank + 1) * batch // world)
            lat, token_obj, ids, noise, t, keep = (
                lat[share],
                token_obj[share],
                ids[share],
                noise[share],
                t[share],
                keep[share],
            )
            labels = {k: v[share] for k, v in labels.items()}
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        ctx = text(ids)[0]
        sink.clear()
        pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas, t, snr_gamma)).mean()
        parts = {"diff": loss.item()}
        if aux and cross_weight > 0:
            lc = cross_loss(sink, token_obj, labels, keep, head_share, aux_sizes, words)
            loss = loss + cross_weight * lc
            parts["cross"] = lc.item()
        if aux and self_weight > 0:
            ls = self_loss(sink, labels, head_share, aux_sizes)
            loss = loss + self_weight * ls
            parts["self"] = ls.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # the mean gradient of the whole batch, on every process
            import torch.distributed as dist

            for q in params:
                if q.grad is not None:
                    dist.all_reduce(q.grad)
                    q.grad.div_(world)
        if dump is not None:
            inputs = {"lat": lat, "noise": noise, "t": t, "ids": ids, "keep": keep, "token_obj": token_obj}
            inputs.update({f"labels{k}": v for k, v in labels.items()})
            _dump_step(Path(dump) / f"step-{step}-rank-{rank}", modules, inputs, loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if rank == 0 and (step + 1) % log_every == 0:
            msg = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
            print(f"unet step {step + 1}/{total} {msg} {time.time() - t0:.0f}s", flush=True)
        if rank == 0 and ((step + 1) % ckpt_every == 0 or step + 1 == total or step + 1 == stop_after):
            stage = "aux" if step >= steps + refine_steps else "refine" if refining else "unet"
            save_ckpt(ckpt, modules, opt, step + 1, {"stage": stage, "variant": variant})
        if rank == 0 and step + 1 == base:  # the common point of both variants: the unsupervised one goes on
            save_ckpt(work / "ckpt-base", modules, opt, step + 1, {"stage": "base", "variant": variant})
        if stop_after is not None and step + 1 >= stop_after:  # a time slice: resume later from here
            break
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return unet.eval(), text.eval()


def _dump_step(path: Path, modules: dict[str, Any], inputs: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {f"input/{k}": v.contiguous() for k, v in inputs.items()}
    tensors["loss"] = loss.detach().reshape(1)
    for k, m in modules.items():
        for n, q in m.named_parameters():
            if q.grad is not None:
                tensors[f"grad/{k}/{n}"] = q.grad.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".safetensors")))


def assemble(work: Path, vae: Any, unet: Any, text: Any) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=_TOK,
        unet=unet,
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    out = work / "pipeline"
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    print(f"pipeline saved to {out}", flush=True)
    return out


_TOK: Any = None


def main(argv: list[str] | None = None) -> None:
    global _TOK
    p = argparse.ArgumentParser(description="Train the daami2i shapes-world model.")
    p.add_argument("--work", type=Path, required=True, help="folder for checkpoints and outputs")
    p.add_argument("--variant", choices=["supervised", "unsupervised"], default="supervised")
    p.add_argument("--vae", type=Path, default=None, help="reuse a trained VAE folder instead of stage 1")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--refine-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pool", type=int, default=24576, help="training scenes encoded once")
    p.add_argument("--cross-weight", type=float, default=0.1)
    p.add_argument("--self-weight", type=float, default=0.1)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: plain MSE)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of stage 2")
    p.add_argument("--refine-lr", type=float, default=3e-4, help="peak learning rate of stage 3")
    p.add_argument("--init-from", type=Path, default=None, help="start from the other variant's ckpt-base")
    p.add_argument(
        "--aux-steps", type=int, default=0, help="a stage 4 for the attention losses (0: they are in stage 3)"
    )
    p.add_argument("--aux-lr", type=float, default=1e-4, help="peak learning rate of stage 4")
    p.add_argument(
        "--head-share",
        type=float,
        default=0.25,
        help="share of each layer's heads the attention losses supervise (at least one; rounded half to even)",
    )
    p.add_argument(
        "--aux-grids",
        default="16,8",
        help="attention grids (sides) the auxiliary losses supervise, e.g. '16' for the 16x16 layers only",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only-vae", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help="stop the UNet stage after this step (resume later)")
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="UNet stages in this many processes of one thread each (data parallel, gloo): 2 on a 2-core machine",
    )
    p.add_argument(
        "--dump", type=Path, default=None, help="debug: write every step's inputs, loss and gradients to this folder"
    )
    args = p.parse_args(argv)
    if args.procs < 1 or args.batch % args.procs:
        raise SystemExit(f"--procs must be >= 1 and divide --batch ({args.batch}), got {args.procs}")
    torch.set_num_threads(args.threads)
    from ..testing import clip_tokenizer

    _TOK = clip_tokenizer()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(args.vae))
    else:
        vae = train_vae(args.work, args.vae_steps, args.vae_batch, args.seed)
    if args.only_vae:
        return
    if args.procs > 1:
        import socket

        import torch.multiprocessing as mp

        make_pool(args.work, vae, args.pool)  # encode once, before the processes load it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_unet_worker, args=(args, port, t0), nprocs=args.procs)
        return
    _unet_stages(args, vae, t0)


def _unet_worker(rank: int, args: argparse.Namespace, port: int, t0: float) -> None:
    """One process of the data-parallel UNet stages (``--procs``)."""
    global _TOK
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    from ..testing import clip_tokenizer

    torch.set_num_threads(args.threads)
    _TOK = clip_tokenizer()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.procs)
    try:
        vae = AutoencoderKL.from_pretrained(str(args.vae if args.vae is not None else args.work / "vae"))
        _unet_stages(args, vae, t0, save=rank == 0)
    finally:
        dist.destroy_process_group()


def _unet_stages(args: argparse.Namespace, vae: Any, t0: float, save: bool = True) -> None:
    unet, text = train_unet(
        args.work,
        vae,
        args.variant,
        args.unet_steps,
        args.refine_steps,
        args.batch,
        args.seed,
        args.cross_weight,
        args.self_weight,
        args.pool,
        stop_after=args.stop_after,
        snr_gamma=args.snr_gamma,
        lr=args.lr,
        refine_lr=args.refine_lr,
        init_from=args.init_from,
        aux_steps=args.aux_steps,
        aux_lr=args.aux_lr,
        head_share=args.head_share,
        aux_sizes=tuple(int(g) ** 2 for g in str(args.aux_grids).split(",") if g),
        dump=args.dump,
    )
    planned = args.unet_steps + args.refine_steps + (args.aux_steps if args.variant == "supervised" else 0)
    if not save:
        return
    if args.stop_after is not None and args.stop_after < planned:
        print(f"stopped after step {args.stop_after}; run the same command without --stop-after to resume", flush=True)
        return
    assemble(args.work, vae, unet, text)
    (args.work / "train.json").write_text(
        json.dumps({**{k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - t0})
    )
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
