"""DDPMPaperPipeline: sampling, the portable export stock diffusers loads, the model card, and Hub publishing."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel
from hub_server import local_hub  # noqa: F401  (pytest fixture)
from PIL import Image

from pipelines import DDPMPaperPipeline, ModelCardInfo, PublishError
from schedulers import DDPMPaperScheduler

T = 50


def tiny_unet(seed: int = 0, channels: int = 3) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=None,
    ).eval()


def tiny_pipeline(variance_type: str = "fixed_small", beta_schedule: str = "linear") -> DDPMPaperPipeline:
    scheduler = DDPMPaperScheduler(num_train_timesteps=T, variance_type=variance_type, beta_schedule=beta_schedule)
    pipe = DDPMPaperPipeline(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sample_shapes_and_output_types():
    pipe = tiny_pipeline()
    pt = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="pt")
    assert pt.images.shape == (3, 3, 8, 8) and pt.images.dtype == torch.float32
    assert 0 <= float(pt.images.min()) and float(pt.images.max()) <= 1
    np_out = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np")
    assert np_out.images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(np_out.images, pt.images.permute(0, 2, 3, 1).numpy())
    pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    (image,) = pipe(batch_size=1, num_inference_steps=2, output_type="np", return_dict=False)
    assert image.shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=2, output_type="latent")


def test_sampling_is_deterministic_under_a_seed():
    pipe = tiny_pipeline()
    first = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=T, output_type="pt")
    again = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=T, output_type="pt")
    other = pipe(batch_size=2, generator=torch.Generator().manual_seed(8), num_inference_steps=T, output_type="pt")
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_x0_trajectory_is_the_progressive_generation():
    pipe = tiny_pipeline()
    out = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=20,
        output_type="pt",
        return_x0_trajectory=True,
        trajectory_every=5,
    )
    # "leading" spacing of 20 steps over T = 50 walks 38, 36, ..., 0; every 5th step, and the last one.
    assert out.trajectory_timesteps == [38, 28, 18, 8, 0]
    assert out.x0_trajectory.shape == (5, 2, 3, 8, 8)
    # The last snapshot is the prediction of x_0 at t = 0, which the final step returns as the sample.
    torch.testing.assert_close(out.x0_trajectory[-1], out.images)


STOCK_SCRIPT = textwrap.dedent(
    """
    import os, sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):  # this project must not be importable
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"schedulers", "pipelines", "training"}:
                raise ImportError("project module " + name)
    sys.meta_path.insert(0, Block())
    # Drop the checkout itself (whole paths compared: a .venv inside the checkout keeps its site-packages).
    root = os.path.realpath(sys.argv[4])
    sys.path = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != root]
    try:
        import schedulers
        raise SystemExit("the project is importable")
    except ImportError:
        pass
    import numpy as np, torch
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler", type(pipe.scheduler)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=int(sys.argv[3]),
                  output_type="np").images
    np.save(sys.argv[2], images)
    """
)


def sample_with_stock_diffusers(folder, tmp_path, num_inference_steps: int) -> np.ndarray:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT)
    out = tmp_path / "stock.npy"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, str(script), str(folder), str(out), str(num_inference_steps), root],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=120,
    )
    return np.load(out)


@pytest.mark.slow  # stock diffusers samples in a new process
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_export_loads_in_stock_diffusers_and_samples_the_same_images(tmp_path, variance_type):
    pipe = tiny_pipeline(variance_type)
    folder = tmp_path / "export"
    pipe.save_pretrained(folder, card=ModelCardInfo(num_inference_steps=5, num_samples=4))

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin"))
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"

    theirs = sample_with_stock_diffusers(folder, tmp_path, num_inference_steps=T)
    ours_loaded = DDPMPaperPipeline.from_pretrained(folder)
    assert isinstance(ours_loaded.scheduler, DDPMPaperScheduler)
    ours_loaded.set_progress_bar_config(disable=True)
    ours = ours_loaded(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=T, output_type="np"
    )
    difference = float(np.abs(ours.images - theirs).max())
    print(f"max |ours - stock DDPMPipeline| ({variance_type}): {difference:.3g}")
    assert difference < 1e-4


def test_quad_schedule_exports_as_trained_betas(tmp_path):
    pipe = tiny_pipeline(beta_schedule="quad")
    pipe.save_pretrained(tmp_path / "export", card=ModelCardInfo(num_inference_steps=2, num_samples=1))
    config = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "linear" and len(config["trained_betas"]) == T
    stock = DDPMScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
    torch.testing.assert_close(stock.betas, pipe.scheduler.betas)
    reloaded = DDPMPaperPipeline.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(reloaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)


def read_card(folder):
    text = (folder / "README.md").read_text()
    _, front_matter, body = text.split("---\n", 2)
    return yaml.safe_load(front_matter), body


def test_model_card_has_hub_metadata_samples_and_training_settings(tmp_path):
    pipe = tiny_pipeline()
    samples = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    card = ModelCardInfo(
        dataset_name="uoft-cs/cifar10",
        training_args={"learning_rate": 2e-4, "train_batch_size": 128},
        metrics={"bits_per_dim": 3.75},
        sample_images=samples,
        command="accelerate launch train_ddpm.py --dataset_name uoft-cs/cifar10",
    )
    pipe.save_pretrained(tmp_path / "export", card=card, repo_id="me/ddpm-cifar10")
    metadata, body = read_card(tmp_path / "export")
    assert metadata["library_name"] == "diffusers"
    assert metadata["license"] == "apache-2.0"
    assert {"pytorch", "diffusers", "unconditional-image-generation", "ddpm"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["uoft-cs/cifar10"]
    result = metadata["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "bits_per_dim", "value": 3.75}
    assert 'DDPMPipeline.from_pretrained("me/ddpm-cifar10")' in body
    assert "![Samples](samples.png)" in body
    assert "| `learning_rate` | `0.0002` |" in body and "| bits_per_dim | 3.75 |" in body
    assert "accelerate launch train_ddpm.py --dataset_name uoft-cs/cifar10" in body
    grid = Image.open(tmp_path / "export" / "samples.png")
    assert grid.size == (3 * 8 * 11, 2 * 8 * 11)  # 5 samples on 3 columns, 2 rows, upscaled 11x to >= 256 px
    # A local dataset folder is named but not claimed as a Hub dataset.
    pipe.save_pretrained(tmp_path / "local", card=ModelCardInfo(dataset_name=str(tmp_path), sample_images=samples))
    assert "datasets" not in read_card(tmp_path / "local")[0]


def test_push_to_hub_uploads_the_export_byte_for_byte(tmp_path, local_hub):  # noqa: F811
    pipe = tiny_pipeline()
    card = ModelCardInfo(num_inference_steps=3, num_samples=4, training_args={"seed": 0})
    url = pipe.push_to_hub("me/tiny-ddpm", card=card, private=True, commit_message="First model")
    assert "me/tiny-ddpm" in url
    pipe.save_pretrained(tmp_path / "local", card=card, repo_id="me/tiny-ddpm")
    local = {
        p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
        for p in (tmp_path / "local").rglob("*")
        if p.is_file()
    }
    repo = local_hub.repos["me/tiny-ddpm"]
    assert repo["files"] == local
    assert repo["private"] is True
    assert repo["commits"][-1]["summary"] == "First model"
    assert all(
        h.get("authorization") == f"Bearer {local_hub.token}"
        for _, path, h in local_hub.requests
        if "/commit/" in path
    )
    # What was published loads back through the Hub client.
    loaded = DDPMPaperPipeline.from_pretrained("me/tiny-ddpm")
    assert torch.equal(next(loaded.unet.parameters()), next(pipe.unet.parameters()))


def test_failed_publish_says_why_and_leaves_the_local_export(tmp_path, local_hub):  # noqa: F811
    pipe = tiny_pipeline()
    card = ModelCardInfo(num_inference_steps=2, num_samples=1)
    pipe.save_pretrained(tmp_path / "export", card=card)
    before = {p: p.read_bytes() for p in (tmp_path / "export").rglob("*") if p.is_file()}
    local_hub.fail_commits = 500
    with pytest.raises(PublishError, match=r"me/broken.*HTTP 500") as error:
        pipe.push_to_hub("me/broken", card=card, token=local_hub.token)
    assert local_hub.token not in str(error.value)
    assert {p: p.read_bytes() for p in (tmp_path / "export").rglob("*") if p.is_file()} == before
    local_hub.fail_commits = None
    with pytest.raises(PublishError, match="HTTP 401.*token"):
        pipe.push_to_hub("me/broken", card=card, token="hf_wrong_token")


def test_push_with_a_bare_name_writes_the_full_repo_id_into_the_card(local_hub):  # noqa: F811
    pipe = tiny_pipeline()
    pipe.push_to_hub("bare-ddpm", card=ModelCardInfo(num_inference_steps=2, num_samples=1))
    card = local_hub.repos["me/bare-ddpm"]["files"]["README.md"].decode()
    assert 'DDPMPipeline.from_pretrained("me/bare-ddpm")' in card


def test_image_grid_is_near_square_and_upscaled():
    from pipelines import image_grid

    images = [Image.new("L", (8, 8), 10 * i) for i in range(10)]
    grid = image_grid(images)
    assert grid.size == (4 * 8 * 8, 3 * 8 * 8)  # 4 columns, 3 rows, 8x upscale to reach 256 px
    assert grid.getpixel((8 * 8 * 1 + 3, 3)) == (10, 10, 10)  # image 1 in column 1
    assert grid.getpixel((4 * 8 * 8 - 1, 3 * 8 * 8 - 1)) == (0, 0, 0)  # blank cells after the last image
    assert image_grid([Image.new("RGB", (300, 300))]).size == (300, 300)
