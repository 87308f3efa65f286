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


# float32 (u = 2**-24): two processes reorder every batch reduction of the backward pass (each takes
# half of the batch, then gloo adds the halves). A reordered sum of K terms moves by about sqrt(K) u of
# their scale, and the errors add up along the backward path: with K <= 1024 (4 x 16 x 16 positions)
# and about 15 reductions in a row, 15 sqrt(1024) u ~ 3e-5 of a tensor's largest gradient. Measured:
# at most 1.2e-6 (native, AVX2 and default kernels). A gradient that is mathematically zero (the text
# encoder's key biases: softmax ignores them) is rounding alone: at most u of the largest gradient G
# (measured 0.01 u G).
U = 2.0**-24
GRAD_RTOL = 3e-5


def test_two_processes_train_like_one(tmp_path):
    """--procs 2 (data parallel, gloo): each process takes half of the same batch and the gradients
    are averaged, so every step sees the one-process batch and its gradient.

    Compared at every step: the data (exactly), the loss and the gradient before the optimiser (to
    float32 rounding, bounds above), and the two processes' gradients (exactly: both apply the same
    update). Weights after Adam are not compared elementwise: Adam divides by the root of the second
    moment, so a gradient at rounding level (see above) takes a full learning-rate step either way.
    So that the gradients of every step are taken at the same weights, the first stage runs with
    learning rate 0 (its weights stay the seeded ones, checked exactly); the refine step, with the
    auxiliary losses and a batch whose halves hold different numbers of object words, then moves them.
    """
    from safetensors.torch import load_file

    T._TOK = clip_tokenizer()
    torch.manual_seed(0)
    T.build_vae().save_pretrained(str(tmp_path / "vae"))
    common = ["--vae", str(tmp_path / "vae"), "--pool", "16", "--batch", "4", "--unet-steps", "2"]
    common += ["--refine-steps", "1", "--seed", "5", "--head-share", "0.5", "--lr", "0", "--refine-lr", "1"]
    T.main(["--work", str(tmp_path / "one"), *common, "--dump", str(tmp_path / "one" / "dump")])
    T.main(["--work", str(tmp_path / "two"), *common, "--procs", "2", "--dump", str(tmp_path / "two" / "dump")])

    def weights(run, ckpt):
        tensors = load_file(str(tmp_path / run / f"{ckpt}.safetensors"))
        return {k: v for k, v in tensors.items() if not k.startswith("opt/")}

    base = weights("one", "ckpt-base")
    assert base.keys() == weights("two", "ckpt-base").keys()
    for name, p in weights("two", "ckpt-base").items():
        assert torch.equal(base[name], p), name  # learning rate 0: the same weights at every step
    for step in range(3):  # 2 steps of stage 2, 1 refine step with the auxiliary losses
        one = load_file(str(tmp_path / "one" / "dump" / f"step-{step}-rank-0.safetensors"))
        halves = [load_file(str(tmp_path / "two" / "dump" / f"step-{step}-rank-{r}.safetensors")) for r in (0, 1)]
        for k in (k for k in one if k.startswith("input/")):  # the halves are the one-process batch
            assert torch.equal(torch.cat([h[k] for h in halves]), one[k]), (step, k)
        grads = [k for k in one if k.startswith("grad/")]
        assert grads and all(h.keys() == one.keys() for h in halves)
        for k in grads:
            assert torch.equal(halves[0][k], halves[1][k]), (step, k)  # both processes hold the mean
        loss = sum(h["loss"].item() for h in halves) / 2  # each half's loss is its share of the batch's
        assert abs(loss - one["loss"].item()) <= GRAD_RTOL * abs(one["loss"].item()), (step, loss, one["loss"])
        top = max(one[k].abs().max().item() for k in grads)
        for k in grads:
            err = (halves[0][k].double() - one[k].double()).abs().max().item()
            bound = GRAD_RTOL * one[k].abs().max().item() + U * top
            assert err <= bound, f"step {step} {k}: gradient differs by {err:.3g} > {bound:.3g}"
    # the refine step's halves hold different numbers of object words: the cross loss counts the batch's
    words = [int(((h["input/token_obj"] > 0) & h["input/keep"][:, None]).sum()) for h in halves]
    assert words[0] != words[1], words
    for run in ("one", "two"):  # the refine step moved the weights (learning rate 1, warm-up 50: 0.02)
        final = weights(run, "ckpt-unet")
        assert max((final[k] - base[k]).abs().max().item() for k in base) > 1e-2
    assert (tmp_path / "two" / "pipeline" / "model_index.json").is_file()
