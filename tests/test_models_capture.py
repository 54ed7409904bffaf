"""Per-layer capture: gradients reach exactly the right layers; post-RoPE q/k reproduce the attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gasp_vlm.models import ModelLoadError, load_adapter

SMALL = {"num_hidden_layers": 3}


def frames(n=4, h=56, w=84, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_on_layer_k_reaches_layers_up_to_k_only(preset, checkpointing):
    ad = load_adapter(preset, overrides=SMALL)
    ad.model.train()
    if checkpointing:
        ad.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    size = (56, 84) if "qwen" in preset else (224, 224)
    batch = ad.prepare_frames([frames(3, *size)])
    k = 1
    cap = ad.forward_capture(batch, what=("hidden",), grad=True)
    cap.hidden[k].pow(2).mean().backward()
    layers = ad.decoder_layers()
    for i, layer in enumerate(layers):
        grads = [p.grad for p in layer.parameters()]
        if i <= k:
            assert all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0, f"layer {i} got no gradient"
        else:
            assert all(g is None or float(g.abs().sum()) == 0 for g in grads), f"layer {i} > {k} got gradient"
    # The frozen vision tower ran without a graph.
    assert all(p.grad is None for p in ad.vision_module().parameters())


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_post_rope_qk_reproduce_eager_attention(preset):
    """softmax(q_rope k_rope^T / sqrt(d) + causal) from captured q/k == the model's attention probs."""
    ad = load_adapter(preset, overrides=SMALL, attn_implementation="eager")
    size = (56, 84) if "qwen" in preset else (224, 224)
    batch = ad.prepare_frames([frames(2, *size)], prompt="hi")
    seq = batch.inputs["input_ids"].shape[1]
    rows = torch.arange(seq)[None]
    inputs = ad.encode_visual_frozen(batch)
    from gasp_vlm.models.capture import capture_visual_features

    with torch.no_grad(), capture_visual_features(ad.decoder_layers(), rows, ("q_rope", "k_rope", "q", "k"), None,
                                                  ad.num_heads, ad.head_dim) as cap:
        out = ad.model(**inputs, output_attentions=True, use_cache=False)
    H, d = ad.num_heads, ad.head_dim
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for l in range(ad.num_layers):
        q = cap.q_rope[l][0].view(seq, H, d).transpose(0, 1)
        k = cap.k_rope[l][0].view(seq, H, d).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5 + causal, dim=-1)
        torch.testing.assert_close(probs, out.attentions[l][0], atol=2e-5, rtol=1e-4)
        # and RoPE really changed them (positions matter), while pre-RoPE differs
        assert not torch.allclose(cap.q[l], cap.q_rope[l])


def test_capture_rows_are_the_visual_tokens():
    ad = load_adapter("tiny-qwen2-vl", overrides=SMALL)
    batch = ad.prepare_frames([frames(2), frames(2, seed=1)], prompt="describe")
    cap = ad.forward_capture(batch, what=("hidden", "k"), layers=[0, 2])
    lay = batch.layouts[0]
    assert set(cap.hidden) == {0, 2}
    assert cap.hidden[2].shape == (2, lay.num_visual, ad.hidden_size)
    # GQA: kv heads repeated to the query heads
    assert cap.k[0].shape == (2, lay.num_visual, ad.num_heads * ad.head_dim)
    kv = cap.k[0][0].view(lay.num_visual, ad.num_heads, ad.head_dim)
    group = ad.num_heads // ad.num_kv_heads
    torch.testing.assert_close(kv[:, 0], kv[:, group - 1])
    # Batch items differ (different frames), same layout
    assert not torch.allclose(cap.hidden[2][0], cap.hidden[2][1])


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_save_load_round_trip(preset, tmp_path):
    ad = load_adapter(preset, overrides=SMALL, seed=3)
    ad.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    back = load_adapter(tmp_path / "m")
    assert type(back) is type(ad) and back.preset == preset
    size = (56, 84) if "qwen" in preset else (224, 224)
    b1 = ad.prepare_frames([frames(2, *size)], prompt="x")
    b2 = back.prepare_frames([frames(2, *size)], prompt="x")
    assert torch.equal(b1.inputs["input_ids"], b2.inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(ad.model(**b1.inputs).logits, back.model(**b2.inputs).logits)


def test_answers_get_labels_only_on_answer_tokens():
    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    batch = ad.prepare_frames([frames(2)], prompt="What is here?", answers=["a box"])
    labels = batch.labels[0]
    ids = batch.inputs["input_ids"][0]
    lab_ids = ids[labels != -100]
    assert ad.tokenizer.decode(lab_ids) == "a box<|im_end|>"
    cap = ad.forward_capture(batch, what=())
    assert torch.isfinite(cap.loss)


def test_bad_inputs_get_clear_errors(tmp_path):
    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    with pytest.raises(ValueError, match="zero frames"):
        ad.prepare_frames([[]])
    with pytest.raises(ValueError, match="mixed sizes"):
        ad.prepare_frames([[np.zeros((56, 56, 3), np.uint8), np.zeros((56, 84, 3), np.uint8)]])
    with pytest.raises(ValueError, match="frame mode"):
        ad.prepare_frames([frames(2)], frame_mode="bogus")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_adapter(tmp_path)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="unsupported model family 'bert'") as err:
        load_adapter(tmp_path / "bert")
    for supported in ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "internvl", "llava_next_video"):
        assert repr(supported) in str(err.value)  # the message names every supported family
    with pytest.raises(ModelLoadError, match="not a preset"):
        load_adapter("no-such-model")


def test_an_incomplete_model_folder_is_refused_naming_what_is_missing(tmp_path):
    """Without its image processor a folder would load at the family's default pixel settings (a base and its
    GASP export scored differently); without a tokenizer transformers fails far from the cause."""
    load_adapter("tiny-qwen2.5-vl", overrides=SMALL).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "gasp_adapter.json").unlink()  # a plain HF folder: model + tokenizer, no processor
    with pytest.raises(ModelLoadError, match=r"m: no preprocessor_config\.json.*image processor cannot be found"):
        load_adapter(tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                         "image_std": [0.5] * 3}))
    assert load_adapter(tmp_path / "m").image_mean == (0.5, 0.5, 0.5)  # complete now: its settings are used
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"m: no tokenizer \(tokenizer\.json"):
        load_adapter(tmp_path / "m")


def test_generate_returns_text_for_images_and_video():
    from PIL import Image

    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    ims = [Image.fromarray(f) for f in frames(3)]
    out = ad.generate([{"prompt": "Which?", "images": ims[:2]}, {"prompt": "Count.", "video": ims}], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_lm_head_runs_only_at_answer_positions_with_the_same_loss_and_gradients(preset):
    """forward_capture's answer-only LM loss equals HF's full-logits loss, value and gradients, while
    its logits hold one row per answer token (none for samples without answers)."""
    from gasp_vlm.train.stream import prepare_conversations

    ad = load_adapter(preset, overrides={"num_hidden_layers": 2})
    items = [dict(frames=frames(2, seed=1), prompt="What is here?", answer="A red box on a table."),
             dict(frames=frames(2, seed=2), prompt="How many?", answer="three")]
    b = prepare_conversations(ad, items)
    ref = ad.model(**ad.encode_visual_frozen(b), labels=b.labels, use_cache=False)
    params = {n: p for n, p in ad.model.named_parameters()
              if "lm_head" in n or ("language_model.layers.1.mlp" in n)}
    ref_grads = torch.autograd.grad(ref.loss, list(params.values()))
    cap = ad.forward_capture(b, grad=True)
    grads = torch.autograd.grad(cap.loss, list(params.values()))
    n_answer = int((b.labels[:, 1:] != -100).sum())
    assert n_answer > 8 and cap.logits.shape == (n_answer, ref.logits.shape[-1])
    assert ref.logits.shape[1] > 3 * n_answer // 2  # the full logits were much larger
    torch.testing.assert_close(cap.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=n)
    geo = ad.prepare_frames([frames(2)], prompt="Describe the scene.")  # no answer: no LM loss
    cap = ad.forward_capture(geo)
    assert cap.loss is None and cap.logits.shape == (1, 1, ref.logits.shape[-1])


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_batched_generation_equals_one_by_one(preset):
    """generate_frames left-pads: a batch of prompts of different lengths gives each prompt the greedy
    answer it gets alone."""
    ad = load_adapter(preset, overrides={"num_hidden_layers": 2})
    clips = [frames(2, seed=3), frames(2, seed=4), frames(2, seed=5)]
    prompts = ["Which way?", "How many objects appear across these frames of the room?", "Same?"]
    batched = ad.generate_frames(clips, prompts, max_new_tokens=4)
    alone = [ad.generate_frames([c], [p], max_new_tokens=4)[0] for c, p in zip(clips, prompts)]
    assert batched == alone and all(isinstance(b, str) for b in batched)
    with pytest.raises(ValueError, match="2 frame lists for 3 prompts"):
        ad.generate_frames(clips[:2], prompts, max_new_tokens=1)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_choice_scores_are_answer_log_likelihoods(preset):
    """score_choices == the summed log-softmax of HF's full logits at the answer tokens (end of turn
    included), computed one pair at a time; batching pairs of different lengths changes nothing."""
    from gasp_vlm.models.base import IGNORE_INDEX

    ad = load_adapter(preset, overrides={"num_hidden_layers": 2})
    clips = [frames(2, seed=6), frames(2, seed=7)]
    prompts = ["Does the camera move left or right?", "Which is closer, the rocket box or the marble sphere?"]
    choices = [["left", "right"], ["rocket box", "marble sphere"]]
    got = ad.score_choices(clips, prompts, choices)
    for i, cs in enumerate(choices):
        for j, c in enumerate(cs):
            b = ad.prepare_frames([clips[i]], prompt=prompts[i], answers=[c])
            with torch.no_grad():
                logits = ad.model(**b.inputs, use_cache=False).logits[0, :-1].float()
            tgt = b.labels[0, 1:]
            m = tgt != IGNORE_INDEX
            assert int(m.sum()) >= 2  # the answer and the end of the turn
            ref = torch.log_softmax(logits[m], -1).gather(1, tgt[m][:, None]).sum()
            assert got[i][j] == pytest.approx(float(ref), abs=1e-3)
    assert all(x < 0 for row in got for x in row)
    with pytest.raises(ValueError, match="without candidate"):
        ad.score_choices(clips[:1], prompts[:1], [[]])


@pytest.mark.parametrize("mode,per_token", [("video_dup", 1), ("pair", 2)])
def test_benchmark_generation_uses_the_frame_mode_training_used(mode, per_token):
    """A model is evaluated with the tokenisation it was trained with: in ``video_dup`` (the training
    default) a benchmark video gets one temporal token group per frame, the same visual tokens and pixels
    prepare_frames builds; in ``pair`` (Qwen's processor) two frames per group."""
    from PIL import Image

    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 2}, frame_mode=mode)
    clip = frames(4, seed=8)
    gen = ad._encode_generation({"prompt": "Count.", "video": [Image.fromarray(f) for f in clip]})
    assert int(gen["video_grid_thw"][0, 0]) == 4 // per_token
    n_gen = int((gen["input_ids"] == ad.ids["video_pad"]).sum())
    train = ad.prepare_frames([clip], prompt="Count.", frame_mode=mode)
    assert n_gen == train.visual_rows.shape[1]
    torch.testing.assert_close(gen["pixel_values_videos"], train.inputs["pixel_values_videos"])


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_benchmark_requests_batched_give_the_one_by_one_answers(preset):
    """Every family batches benchmark requests (left padding; pixels in request order): mixed requests
    -- images of different sizes, a video, text only -- answer as they do alone."""
    from PIL import Image

    ad = load_adapter(preset, overrides={"num_hidden_layers": 2})
    big = [Image.fromarray(f) for f in frames(2, h=84, w=112, seed=9)]
    small = [Image.fromarray(f) for f in frames(3, seed=10)]
    reqs = [{"prompt": "Which view is left?", "images": big}, {"prompt": "Count the objects in the clip.", "video": small},
            {"prompt": "Say hi."}, {"prompt": "Same object?", "images": small[:1], "max_pixels": 56 * 56}]
    assert ad._collate_generation([ad._encode_generation(r) for r in reqs]) is not None
    batched = ad.generate(reqs, max_new_tokens=5)
    alone = [ad.generate([r], max_new_tokens=5)[0] for r in reqs]
    assert batched == alone
    # clips of one length (the common benchmark batch) take the stacked path
    other = [Image.fromarray(f) for f in frames(3, seed=11)]
    same = [{"prompt": "Count the objects in the clip.", "video": small}, {"prompt": "What moves?", "video": other}]
    assert ad.generate(same, max_new_tokens=5) == [ad.generate([r], max_new_tokens=5)[0] for r in same]
