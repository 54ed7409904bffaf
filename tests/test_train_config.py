"""Training config: YAML + dotted overrides, typed, and errors that name the key and the file."""

from pathlib import Path

import pytest

from gasp_vlm.train.config import ConfigError, config_from_dict, load_config, parse_override, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "gasp_vlm" / "configs"


def test_shipped_configs_load_with_paper_settings():
    # the miniature: stage 0 pretrains the base (full fine-tuning, LM only), stage 1 is GASP with LoRA on it
    base = load_config(CONFIGS / "demo_base.yaml")
    assert base.model.name == "tiny-qwen2.5-vl" and base.data.geometry == []
    assert base.lora.enabled is False and base.finetune == "full"
    assert base.gasp.lambda_corr == base.gasp.lambda_depth == 0.0
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.model.name == "tiny-qwen2.5-vl" and demo.data.geometry == ["toy"]
    assert demo.lora.enabled is True and demo.optim.head_lr_mult == 4.0
    assert demo.gasp.lambda_corr > 0 and demo.gasp.lambda_depth > 0
    for name, layers_note in (("qwen2_5_vl_7b.yaml", "Qwen/Qwen2.5-VL-7B-Instruct"),
                              ("qwen2_vl_7b.yaml", "Qwen/Qwen2-VL-7B-Instruct"),
                              ("qwen3_vl_8b.yaml", "Qwen/Qwen3-VL-8B-Instruct"),
                              ("internvl3_8b.yaml", "OpenGVLab/InternVL3-8B-hf"),
                              ("llava_onevision_7b.yaml", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
                              ("llava_next_video_7b.yaml", "llava-hf/LLaVA-NeXT-Video-7B-hf")):
        cfg = load_config(CONFIGS / name, ["data.geometry=[/data/scenes]", "data.instructions=/data/llava.json"])
        assert cfg.model.name == layers_note
        assert (cfg.lora.enabled, cfg.lora.r) == (True, 512)
        assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.head_lr_mult == 4.0
        assert cfg.optim.grad_clip == 1.0 and cfg.optim.schedule == "cosine"
        assert cfg.activation_checkpointing and cfg.model.dtype == "bfloat16"
        assert cfg.gasp.layers is None  # all decoder layers
        # the whole objective in every step, one epoch over the geometry sequences
        assert cfg.data.instruction_ratio == 1.0 and cfg.optim.epochs == 1.0


def test_overrides_are_typed_and_dotted():
    cfg = config_from_dict({"data": {"geometry": ["toy"]}},
                           ["optim.lr=3e-4", "gasp.layers=[0, -1]", "gasp.max_anchors=null", "lora.enabled=false",
                            "model.overrides={num_hidden_layers: 2}", "optim.max_steps=7"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.gasp.layers == [0, -1] and cfg.gasp.max_anchors is None
    assert cfg.lora.enabled is False and cfg.model.overrides == {"num_hidden_layers": 2}
    assert cfg.optim.max_steps == 7
    assert parse_override("data.geometry=[toy, /x]") == ("data.geometry", ["toy", "/x"])
    # YAML 1.1 reads "1e-3" as a string: every override gets the config files' float fix, not just *lr keys
    cfg = config_from_dict({"data": {"geometry": ["toy"]}},
                           ["optim.min_lr_ratio=1e-3", "gasp.tau=5e-2", "model.overrides={rms_norm_eps: 1e-5}"])
    assert cfg.optim.min_lr_ratio == pytest.approx(1e-3) and cfg.gasp.tau == pytest.approx(5e-2)
    assert cfg.model.overrides == {"rms_norm_eps": 1e-5}
    assert parse_override("model.name=Qwen/Qwen2.5-VL-7B-Instruct") == ("model.name", "Qwen/Qwen2.5-VL-7B-Instruct")


def test_variants_are_pure_config():
    base = {"data": {"geometry": ["toy"], "instructions": "generated", "instruction_ratio": 0.5}}
    lm_only = config_from_dict(base, ["gasp.lambda_corr=0", "gasp.lambda_depth=0"])
    corr_only = config_from_dict(base, ["gasp.lambda_depth=0"])
    full = config_from_dict(base)
    assert lm_only.gasp.lm_only and not corr_only.gasp.lm_only and not full.gasp.lm_only
    assert corr_only.gasp.lambda_depth == 0 and full.gasp.lambda_depth > 0 and corr_only.gasp.lambda_corr > 0
    # identical data for all three: only the loss weights differ
    assert lm_only.data == corr_only.data == full.data


@pytest.mark.parametrize("data, overrides, key", [
    ({"optim": {"lrr": 1.0}}, [], "optim.lrr"),
    ({}, ["optim.lr=fast"], "optim.lr"),
    ({}, ["data.instruction_ratio=1.5"], "data.instruction_ratio"),
    ({}, ["data.instruction_ratio=0.5"], "data.instructions"),
    ({"data": {"geometry": []}}, [], "data.geometry"),
    ({}, ["lora.enabled=maybe"], "lora.enabled"),
    ({}, ["optim.warmup_steps=-1"], "optim.warmup_steps"),
    ({}, ["gasp.tau=0"], "gasp.tau"),
    ({}, ["gasp.head_init=orthogonal"], "gasp.head_init"),
    ({}, ["data.video_seek=nearest"], "data.video_seek"),
    ({}, ["data.video_seek_tolerance_s=-1"], "data.video_seek_tolerance_s"),
    ({"model": 3}, [], "model"),
])
def test_errors_name_the_key(data, overrides, key):
    data = {"data": {"geometry": ["toy"]}, **data} if "data" not in data else data
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_from_dict(data, overrides)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-4\n  nope: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.nope'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_config(broken)


def test_save_load_roundtrip(tmp_path):
    cfg = config_from_dict({"data": {"geometry": ["toy"]}}, ["optim.lr=2e-4", "gasp.layers=[1, 2]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_video_seek_modes_reach_the_decoder():
    from gasp_vlm.train.stream import video_options

    cfg = config_from_dict({"data": {"geometry": ["toy"]}},
                           ["data.video_seek=nearest_key", "data.video_seek_tolerance_s=0.5"])
    opts = video_options(cfg.data)
    assert (opts.seek, opts.seek_tolerance_s) == ("nearest_key", 0.5)
    assert video_options(config_from_dict({"data": {"geometry": ["toy"]}}).data).seek == "exact"
