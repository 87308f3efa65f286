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
