"""The training script checkpoints without pickle and a stopped run resumes identically."""

from __future__ import annotations

import pytest
import torch

from daami2i.shapes import train as T
from daami2i.testing import clip_tokenizer


@pytest.mark.parametrize("aux_steps", [0, 2])
def test_stopped_run_resumes_identically(tmp_path, aux_steps):
    T._TOK = clip_tokenizer()
    torch.manual_seed(0)
    vae = T.build_vae().eval()
    kw = dict(
        variant="supervised",
        steps=2,
        refine_steps=1,
        batch=4,
        seed=3,
        cross_weight=0.1,
        self_weight=0.1,
        pool_size=16,
        aux_steps=aux_steps,
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unet_a, text_a = T.train_unet(tmp_path / "a", vae, **kw)
    T.train_unet(tmp_path / "b", vae, stop_after=2, **kw)  # stopped after 2 of 3 (or 5) steps
    assert '"step": 2' in (tmp_path / "b" / "ckpt-unet.json").read_text()
    unet_b, text_b = T.train_unet(tmp_path / "b", vae, **kw)  # resumes at step 2
    assert f'"step": {3 + aux_steps}' in (tmp_path / "b" / "ckpt-unet.json").read_text()
    for x, y in ((unet_a, unet_b), (text_a, text_b)):
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    files = {p.suffix for p in (tmp_path / "b").iterdir()}
    assert files <= {".safetensors", ".json"}


def test_two_processes_train_like_one(tmp_path):
    """--procs 2 (data parallel, gloo): each process takes half of the same batch and gradients are
    averaged, so the weights match one process's to float rounding."""
    from safetensors.torch import load_file

    T._TOK = clip_tokenizer()
    torch.manual_seed(0)
    T.build_vae().save_pretrained(str(tmp_path / "vae"))
    common = ["--vae", str(tmp_path / "vae"), "--pool", "16", "--batch", "4", "--unet-steps", "2"]
    common += ["--refine-steps", "1", "--seed", "3", "--head-share", "0.5", "--lr", "1", "--refine-lr", "1"]
    T.main(["--work", str(tmp_path / "one"), *common])
    T.main(["--work", str(tmp_path / "two"), *common, "--procs", "2"])
    one = load_file(str(tmp_path / "one" / "ckpt-unet.safetensors"))
    two = load_file(str(tmp_path / "two" / "ckpt-unet.safetensors"))
    moved = 0.0
    for name, p in one.items():
        if name.startswith("opt/"):
            continue
        assert torch.allclose(p, two[name], atol=2e-4), name  # (Adam magnifies rounding where a gradient is ~0)
        moved = max(moved, (p - load_file(str(tmp_path / "one" / "ckpt-base.safetensors"))[name]).abs().max().item())
    assert moved > 1e-2  # the refine step moved the weights far more than the tolerance
    assert (tmp_path / "two" / "pipeline" / "model_index.json").is_file()
