"""Hook hygiene: everything the trace installs is removed, whatever happens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import daami2i
from daami2i.tracing import CapturingProcessor


def snapshot(pipe):
    unet = pipe.unet
    return (
        dict(unet.attn_processors),
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in unet.named_modules()},
        ("check_inputs" in vars(pipe), "postprocess" in vars(pipe.image_processor)),
    )


def assert_restored(pipe, before):
    procs, hooks, patched = before
    after_procs, after_hooks, after_patched = snapshot(pipe)
    assert after_procs.keys() == procs.keys()
    for name, proc in procs.items():
        assert after_procs[name] is proc, name
    assert after_hooks == hooks
    assert after_patched == patched
    assert not any(isinstance(p, CapturingProcessor) for p in after_procs.values())


def test_restored_after_normal_run(sd2):
    before = snapshot(sd2)
    with daami2i.trace(sd2) as trc:
        assert any(isinstance(p, CapturingProcessor) for p in sd2.unet.attn_processors.values())
        assert "check_inputs" in vars(sd2) and "postprocess" in vars(sd2.image_processor)
        sd2("a cat", num_inference_steps=1, height=64, width=64)
    assert_restored(sd2, before)
    # data survives the block
    assert trc.compute_global_heat_map().compute_pixel_heat_map([0]).value.shape == (8, 8)


def test_restored_after_exception_in_with_block(sd2):
    before = snapshot(sd2)
    with pytest.raises(KeyError):
        with daami2i.trace(sd2):
            raise KeyError("user error")
    assert_restored(sd2, before)


def test_restored_after_exception_inside_pipeline(sd2):
    before = snapshot(sd2)

    def boom(pipe, step, timestep, kwargs):
        raise RuntimeError("failure inside the pipeline")

    with pytest.raises(RuntimeError, match="inside the pipeline"):
        with daami2i.trace(sd2):
            sd2("a cat", num_inference_steps=2, height=64, width=64, callback_on_step_end=boom)
    assert_restored(sd2, before)


def test_second_trace_on_same_pipeline_is_refused(sd2):
    before = snapshot(sd2)
    with daami2i.trace(sd2):
        with pytest.raises(daami2i.TraceError, match="already being traced"):
            with daami2i.trace(sd2):
                pass
        # the outer trace still works
        sd2("a cat", num_inference_steps=1, height=64, width=64)
    assert_restored(sd2, before)


def test_user_hooks_and_processors_are_left_alone(sd2):
    calls = []
    handle = sd2.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        before = snapshot(sd2)
        with daami2i.trace(sd2):
            sd2("a cat", num_inference_steps=2, height=64, width=64)
        assert_restored(sd2, before)
        assert len(calls) == 2
    finally:
        handle.remove()


def test_uncaptured_layers_keep_their_processor(sd2):
    before = dict(sd2.unet.attn_processors)
    with daami2i.trace(sd2) as trc:
        now = sd2.unet.attn_processors
        captured = {s.name + ".processor" for s in trc.selected}
        for name, proc in now.items():
            if name in captured:
                assert isinstance(proc, CapturingProcessor) and proc.original is before[name]
            else:
                assert proc is before[name]
    # default: self-attention at the highest resolution only, cross-attention in down/up blocks
    assert {s.name for s in trc.selected if s.kind == "self"} == {
        n for n, (kind, f) in trc.attention_layers.items() if kind == "self" and f == 1
    }
    assert not any(s.block == "mid" for s in trc.selected)


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_tracing_does_not_change_images(sd2, scale):
    """Tolerance: exact. The original processor runs unchanged; hooks only read q and k."""
    kw = dict(num_inference_steps=2, height=64, width=96, guidance_scale=scale, output_type="pt")
    plain = sd2("a red cat", generator=torch.Generator().manual_seed(3), **kw).images
    with daami2i.trace(sd2, self_factors="all", cross_factors="all", halves="both" if scale > 1 else "cond"):
        traced = sd2("a red cat", generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(plain, traced)


def test_previous_generation_is_freed_unless_kept(sd2):
    call = dict(num_inference_steps=1, height=64, width=64)
    with daami2i.trace(sd2) as trc:
        sd2("a red cat", **call)
        sd2("a blue dog", **call)
    assert len(trc.generations) == 1 and trc.last_generation.index == 1
    assert trc.compute_global_heat_map().prompt == "a blue dog"
    with daami2i.trace(sd2, keep="all") as trc:
        sd2("a red cat", **call)
        sd2("a blue dog", **call)
    assert [g.index for g in trc.generations] == [0, 1]
    assert trc.compute_global_heat_map(generation=0).prompt == "a red cat"
    assert trc.compute_global_heat_map().prompt == "a blue dog"


def test_unet_reads_the_attention_function_fused_or_classic():
    """UNet layers are read where their processor calls the attention function, so fused QKV
    projections trace (to_q / to_k are never called then); processors that call no attention function
    (diffusers' classic AttnProcessor) are read from their projections. All three give the same maps,
    to float rounding, and the traced images equal the untraced ones bit for bit."""
    from diffusers.models.attention_processor import AttnProcessor

    from daami2i.testing import tiny_sd_pipeline

    def run(pipe):
        kw = dict(num_inference_steps=2, height=64, width=96, output_type="np")
        plain = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
        with daami2i.trace(pipe) as trc:
            traced = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
        assert np.array_equal(plain, traced)
        ghm = trc.compute_global_heat_map()
        return ghm.compute_pixel_heat_map([3, 40]).value, ghm.compute_word_heat_map("cat").value

    pipe = tiny_sd_pipeline("sd2")
    default = run(pipe)
    pipe.unet.set_attn_processor(AttnProcessor())
    classic = run(pipe)
    pipe.unet.set_default_attn_processor()
    pipe.fuse_qkv_projections()
    assert any("Fused" in type(p).__name__ for p in pipe.unet.attn_processors.values())
    fused = run(pipe)
    for other in (classic, fused):
        for ours, ref in zip(other, default, strict=True):
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
