"""Text -> image and text -> text relations of joint attention (trace(relations=...)): the prompt's
tokens as queries, against the probabilities recorded by explicit softmax in a separate identical
run; chosen before the run (nothing unrequested is stored); saved and reopened with experiments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_sd_pipeline
from reference import batch_rows, joint_recording
from test_dit import MAKERS, call, layout, t5_of, text_first, token_positions

ALL = ["image->text", "image->image", "text->image", "text->text"]


@pytest.fixture(scope="module", params=["sd3", "flux", "chroma"])
def model(request):
    return request.param, MAKERS[request.param]()


def recorded(pipe, prompt, **trace_kwargs):
    with joint_recording(pipe.transformer, text_first(pipe)) as book:
        reference = call(pipe, prompt)
    with daami2i.trace(pipe, **trace_kwargs) as trc:
        traced = call(pipe, prompt)
    assert np.array_equal(reference, traced)
    return trc, dict(book)


def stream_positions(pipe, prompt, word, n_text):
    """Per stream the word's positions in the joint text part (first text token = 0), and that
    stream's prompt-token positions."""
    if text_first(pipe):
        toks = t5_of(pipe).tokenize(prompt)
        return [(token_positions(toks, t5_of(pipe).tokenize(word)), list(range(len(toks))))]
    out = []
    clip = [t.replace("</w>", "") for t in pipe.tokenizer.tokenize(prompt.lower())]
    rows = token_positions(clip, [t.replace("</w>", "") for t in pipe.tokenizer.tokenize(word)])
    if rows:
        out.append(([1 + r for r in rows], [1 + i for i in range(len(clip))]))
    if pipe.text_encoder_3 is not None:
        t5 = pipe.tokenizer_3.tokenize(prompt)
        rows = token_positions(t5, pipe.tokenizer_3.tokenize(word))
        if rows:
            out.append(([77 + r for r in rows], [77 + i for i in range(len(t5))]))
    return out


def dense_text(pipe, trc, book, image_idx):
    """Per captured joint layer the conditional rows' head-mean probabilities, summed over steps (S, S)."""
    gen = trc.last_generation
    rows = batch_rows(gen.n_images, gen.cfg, "cond", image_idx)
    names = [s.name for s in trc.sites if s.name in trc._cross_names]
    return {name: sum(p[rows].mean(dim=(0, 1)) for p in book[name]) for name in names}


def test_text_queries_match_the_joint_softmax(model):
    name, pipe = model
    prompts = ["a red cat", "a blue dog sitting on a green mat"]
    trc, book = recorded(pipe, prompts, relations=ALL)
    gen = trc.last_generation
    h, w = gen.grid_size
    n = h * w
    for i, (prompt, word) in enumerate(zip(prompts, ["red", "dog"], strict=True)):
        per_layer = dense_text(pipe, trc, book, i)
        s = next(iter(per_layer.values())).shape[-1]
        img, txt = layout(pipe, n, s - n)
        ghm = trc.compute_global_heat_map(image_idx=i)
        expect_maps, expect_tt = [], None
        for pos, prompt_pos in stream_positions(pipe, prompt, word, s - n):
            q = [txt.start + p for p in pos]
            expect_maps.append(torch.stack([p[q][:, img].mean(0).reshape(h, w) for p in per_layer.values()]).mean(0))
            if expect_tt is None:  # the first stream's prompt tokens among each other
                pp = [txt.start + p for p in prompt_pos]
                expect_tt = torch.stack([p[pp][:, pp] for p in per_layer.values()]).mean(0)
        got = ghm.compute_text_query_heat_map(word).value
        ref = torch.stack(expect_maps).mean(0).float()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
        tokens, tt = ghm.text_to_text()
        st = ghm.streams[0]
        plain = [t.replace("</w>", "").replace("\u0120", " ").replace("\u2581", " ").strip() for t in st.seen_tokens]
        assert tokens == [p or t for p, t in zip(plain, st.seen_tokens, strict=True)]  # ASCII prompts here
        torch.testing.assert_close(tt, expect_tt.float(), atol=1e-6, rtol=1e-4)
        # a word's query map is not its key map (the word maps): the two relations are kept apart
        assert not torch.allclose(got, ghm.compute_word_heat_map(word).value, atol=1e-4)
    assert gen.config["relations"] == sorted(ALL)


def test_only_what_is_asked_is_stored(model):
    name, pipe = model
    trc, _ = recorded(pipe, "a red cat", relations=["image->text", "text->image"])
    gen = trc.last_generation
    assert not gen.self_attention  # image->image was not asked for
    stores = list(gen.cross_attention.values())
    assert stores and all(s.text_image is not None and s.text_text is None for s in stores)
    ghm = trc.compute_global_heat_map()
    ghm.compute_text_query_heat_map("cat")
    with pytest.raises(daami2i.QueryError, match="text->text relation was not captured"):
        ghm.text_to_text()
    n_tokens = stores[0].sums.shape[-1]
    need = trc.estimate_nbytes(gen.latent_size, gen.n_images, n_tokens=n_tokens)
    assert need["text"] == gen.nbytes("text") > 0 and need["cross"] == gen.nbytes("cross")
    assert need["self"] == gen.nbytes("self") == 0
    plain = daami2i.trace(pipe)
    assert plain.estimate_nbytes(gen.latent_size, 1, n_tokens=n_tokens)["text"] == 0


def test_without_text_relations_nothing_more_is_kept(model):
    name, pipe = model
    trc, _ = recorded(pipe, "a red cat")
    assert all(s.text_image is None and s.text_text is None for s in trc.last_generation.cross_attention.values())
    assert trc.last_generation.nbytes("text") == 0
    with pytest.raises(daami2i.QueryError, match=r"relations=\["):
        trc.compute_global_heat_map().compute_text_query_heat_map("cat")


def test_text_relations_survive_an_experiment(model, tmp_path):
    name, pipe = model
    trc, _ = recorded(pipe, "a red cat", relations=ALL)
    ghm = trc.compute_global_heat_map()
    trc.to_experiment(tmp_path / "exp")
    exp = daami2i.load_experiment(tmp_path / "exp")
    again = exp.compute_global_heat_map()
    torch.testing.assert_close(
        again.compute_text_query_heat_map("cat").value, ghm.compute_text_query_heat_map("cat").value
    )
    torch.testing.assert_close(again.text_to_text()[1], ghm.text_to_text()[1])
    assert exp.manifest["nbytes"]["text"] == trc.last_generation.nbytes("text")


def test_a_text_store_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = MAKERS["flux"]()
    trc, _ = recorded(pipe, "a red cat", relations=ALL)
    folder = trc.to_experiment(tmp_path / "exp")
    tensors = load_file(str(folder / "attention.safetensors"))
    key = next(k for k in tensors if k.startswith("text_image/"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(folder / "attention.safetensors"), metadata={"format": "daami2i-experiment", "version": "1"})
    with pytest.raises(daami2i.ExperimentError, match=key.replace("/", ".")):
        daami2i.load_experiment(folder)


def test_relations_are_checked():
    pipe = tiny_sd_pipeline()
    with pytest.raises(daami2i.ConfigError, match="joint"):
        daami2i.trace(pipe, relations=["image->text", "text->image"])
    with pytest.raises(daami2i.ConfigError, match="relations must be"):
        daami2i.trace(pipe, relations=["image->txt"])
    with pytest.raises(daami2i.ConfigError, match="relations must be"):
        daami2i.trace(pipe, relations=[])
    trc = daami2i.trace(pipe, relations=["image->image"])
    assert trc.config["relations"] == ["image->image"] and not trc._cross_sites


def test_info_lists_the_relations_and_their_store(tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    pipe = MAKERS["flux"]()
    trc, _ = recorded(pipe, "a red cat", relations=ALL)
    trc.to_experiment(tmp_path / "exp")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert "relations   image->image, image->text, text->image, text->text" in res.output
    mib = trc.last_generation.nbytes("text") / 2**20
    assert f"text queries {mib:.1f} MiB" in res.output
