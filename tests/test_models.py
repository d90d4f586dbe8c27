"""training.models: the paper's networks, the CPU preset, configs and the resolution check."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from training.models import (
    MODEL_PRESETS,
    ModelConfigUnavailableError,
    build_unet,
    check_resolution,
    count_parameters,
)


def build_on_meta(*args, **kwargs) -> UNet2DModel:
    """Build without allocating or initialising weights: parameter counts only need shapes."""
    with torch.device("meta"):
        return build_unet(*args, **kwargs)


def test_ddpm_cifar10_preset_has_the_papers_35_7m_parameters():
    unet = build_on_meta("ddpm-cifar10", None, resolution=32, in_channels=3)
    # Exactly the converted paper checkpoint google/ddpm-cifar10-32 (Ho et al. 2020 report 35.7M).
    assert count_parameters(unet) == 35_746_307
    assert unet.config.dropout == 0.1
    assert unet.config.block_out_channels == (128, 256, 256, 256)
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"  # attention at 16x16 only


def test_ddpm_256_preset_has_the_papers_114m_parameters():
    unet = build_on_meta("ddpm-256", None, resolution=256, in_channels=3)
    # Exactly the converted paper checkpoint google/ddpm-church-256 (Ho et al. 2020 report 114M).
    assert count_parameters(unet) == 113_673_219
    assert unet.config.dropout == 0.0
    assert unet.config.block_out_channels == (128, 128, 256, 256, 512, 512)
    # Attention at 16x16: after the fourth halving of 256.
    assert [i for i, kind in enumerate(unet.config.down_block_types) if kind.startswith("Attn")] == [4]


def test_tiny_preset_runs_on_8x8_grayscale_with_0_7m_parameters():
    torch.manual_seed(0)
    unet = build_unet("tiny", None, resolution=8, in_channels=1)
    assert count_parameters(unet) == 699_649
    x = torch.randn(4, 1, 8, 8)
    output = unet(x, torch.tensor([0, 10, 500, 999])).sample
    assert output.shape == (4, 1, 8, 8) and torch.isfinite(output).all()
    output.square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())
    # Any multiple of 4 works too.
    unet16 = build_unet("tiny", None, resolution=16, in_channels=3)
    assert unet16(torch.randn(1, 3, 16, 16), 3).sample.shape == (1, 3, 16, 16)


def test_sample_size_and_channels_come_from_the_data():
    unet = build_on_meta("tiny", None, resolution=12, in_channels=3, out_channels=6, dropout=0.2)
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (12, 3, 6)
    assert unet.config.dropout == 0.2
    assert MODEL_PRESETS["tiny"]["dropout"] == 0.0, "building must not change the preset"


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="Unknown --model_preset 'ddpm-cifar100'.*ddpm-cifar10, ddpm-256, tiny"):
        build_unet("ddpm-cifar100", None, resolution=32, in_channels=3)


def test_exactly_one_model_source_is_required(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_unet(None, None, resolution=8, in_channels=1)
    with pytest.raises(ValueError, match="exactly one"):
        build_unet("tiny", str(tmp_path), resolution=8, in_channels=1)


def test_resolution_not_divisible_by_the_downsampling_names_nearest_valid_ones():
    with pytest.raises(ValueError) as error:
        build_unet("ddpm-cifar10", None, resolution=30, in_channels=3)
    assert str(error.value) == (
        "--resolution 30 does not fit 'ddpm-cifar10': it halves the image 3 times, so the resolution must be a "
        "multiple of 8. Nearest valid resolutions: 24 and 32."
    )
    with pytest.raises(ValueError, match="multiple of 32. Nearest valid resolutions: 32.$"):
        build_unet("ddpm-256", None, resolution=20, in_channels=3)


def test_check_resolution_accepts_a_model_or_a_config():
    unet = build_unet("tiny", None, resolution=8, in_channels=1)
    check_resolution(unet, 8)
    check_resolution(unet.config, 4)
    with pytest.raises(ValueError, match="multiple of 4. Nearest valid resolutions: 4 and 8"):
        check_resolution(unet, 6)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_resolution({"down_block_types": ("DownBlock2D",) * 4}, 12)


def test_config_file_and_folders_load(tmp_path):
    reference = UNet2DModel(**MODEL_PRESETS["tiny"], sample_size=32, in_channels=3, out_channels=3)
    reference.save_config(tmp_path / "model")
    reference.save_config(tmp_path / "pipeline" / "unet")
    sources = [tmp_path / "model" / "config.json", tmp_path / "model", tmp_path / "pipeline"]
    for source in sources:
        unet = build_on_meta(None, str(source), resolution=8, in_channels=1)
        assert tuple(unet.config.block_out_channels) == (32, 48, 48)
        assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (8, 1, 1)
        assert count_parameters(unet) == 699_649


def test_config_of_another_class_or_missing_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel, not UNet2DModel"):
        build_unet(None, str(tmp_path), resolution=8, in_channels=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelConfigUnavailableError, match="neither config.json nor unet/config.json"):
        build_unet(None, str(tmp_path / "empty"), resolution=8, in_channels=1)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("list.json", "[1, 2]", "holds a JSON list, not an object of UNet2DModel settings"),
        ("broken.json", "{bad", "cannot read '.*broken.json' as a JSON config \\(Expecting property name"),
        ("latin1.json", b'{"a": "\xe9"}', "cannot read '.*latin1.json' as a JSON config"),
        ("missing.json", None, "'.*missing.json': no such file or folder"),
        ("a/b/c", None, "'.*a/b/c': no such file or folder"),
    ],
)
def test_unreadable_or_missing_config_fails_naming_it(tmp_path, monkeypatch, connections, name, content, message):
    """A config that is not a JSON object, or a local path that does not exist (absolute or relative), is one
    ModelConfigUnavailableError naming the file, without asking the Hub (train_ddpm.py ends it in one line)."""
    monkeypatch.chdir(tmp_path)
    if isinstance(content, str):
        (tmp_path / name).write_text(content)
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    for path in (name, str(tmp_path / name)):
        with pytest.raises(ModelConfigUnavailableError, match=message):
            build_unet(None, path, resolution=8, in_channels=1)
    assert connections == []


def test_uncached_hub_config_offline_fails_fast_naming_it(monkeypatch, tmp_path, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelConfigUnavailableError) as error:
        build_unet(None, "some-user/not-cached-unet", resolution=8, in_channels=1, cache_dir=str(tmp_path))
    assert connections == []  # fast: not one connection attempted, so none retried
    assert "'some-user/not-cached-unet'" in str(error.value)
    assert "--model_preset" in str(error.value)
