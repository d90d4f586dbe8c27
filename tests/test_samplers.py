"""Few-step samplers: diffusers' schedulers over our exports, the respaced DDPM's bound, and evaluate_ddpm.py --scheduler."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

import evaluate_ddpm
from pipelines import DDPMPaperPipeline
from pipelines.likelihood import bits_per_dim, respaced_bits_per_dim
from pipelines.samplers import SAMPLERS, SamplerError, check_sampler, make_sampler, samplers_for
from schedulers import DDPMPaperScheduler

T = 20


def tiny_unet(out_channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    """A tiny epsilon model exported as train_ddpm.py exports it: a stock DDPMPipeline folder."""
    folder = tmp_path_factory.mktemp("tiny-eps")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mean_folder(tmp_path_factory):
    """A tiny mean-prediction model: exported as a DDPMPaperPipeline folder (DDPMScheduler cannot sample it)."""
    folder = tmp_path_factory.mktemp("tiny-mean")
    scheduler = DDPMPaperScheduler(num_train_timesteps=T, prediction_type="mean")
    DDPMPaperPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


def test_pipeline_with_ddim_draws_what_a_hand_written_ddim_loop_draws():
    pipeline = DDPMPaperPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=T))
    sampler = make_sampler("ddim", pipeline.scheduler.config)
    assert isinstance(sampler, DDIMScheduler) and sampler.config.num_train_timesteps == T
    images = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="pt",
        sampler=sampler, eta=0.5,
    ).images  # fmt: skip

    generator = torch.Generator().manual_seed(3)
    ddim = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=T).config)
    ddim.set_timesteps(5)
    x = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(pipeline.unet(x, t).sample, t, x, eta=0.5, generator=generator).prev_sample
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1))
    assert ddim.timesteps.tolist() == [16, 12, 8, 4, 0]


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++", "pndm", "euler", "unipc", "heun"])
def test_learned_variance_model_is_sampled_without_its_variance_channels(name):
    scheduler = DDPMScheduler(num_train_timesteps=T, variance_type="learned_range")
    pipeline = DDPMPaperPipeline(unet=tiny_unet(out_channels=2), scheduler=scheduler)
    images = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="pt",
        sampler=make_sampler(name, pipeline.scheduler.config),
    ).images  # fmt: skip
    assert images.shape == (2, 1, 8, 8)
    assert torch.isfinite(images).all()


def test_ddpm_respaced_keeps_both_ends_of_the_chain_and_ddpm_keeps_the_exports_spacing():
    config = DDPMScheduler(num_train_timesteps=1000).config
    respaced, leading = make_sampler("ddpm-respaced", config), make_sampler("ddpm", config)
    respaced.set_timesteps(10)
    leading.set_timesteps(10)
    assert respaced.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert leading.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]


def test_each_sampler_serves_the_prediction_types_its_step_accepts():
    """The table of prediction types is what diffusers' step methods really do (a run of 3 steps), not a guess."""
    for name, sampler in SAMPLERS.items():
        for prediction_type in ("epsilon", "sample", "v_prediction"):
            scheduler = sampler.scheduler_class.from_config(
                DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type).config, **sampler.overrides
            )
            scheduler.set_timesteps(3)
            x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
            try:
                for t in scheduler.timesteps:
                    x = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x).prev_sample
                works = bool(torch.isfinite(x).all())
            except (ValueError, NotImplementedError):
                works = False
            assert works == (prediction_type in sampler.prediction_types), (name, prediction_type)
    assert samplers_for("mean") == ["ddpm", "ddpm-respaced"]
    assert samplers_for("sample") == ["ddpm", "ddpm-respaced", "ddim", "dpmsolver++", "euler", "heun", "unipc"]


def test_mean_prediction_with_a_diffusers_sampler_names_the_sampler_the_type_and_those_that_can():
    with pytest.raises(SamplerError) as error:
        check_sampler("ddim", "mean")
    message = str(error.value)
    assert "--scheduler ddim" in message and "prediction_type='mean'" in message
    assert message.endswith("the schedulers that can: ddpm, ddpm-respaced.")


def test_respaced_bound_over_all_timesteps_is_the_exact_bound():
    unet, scheduler = tiny_unet(), DDPMPaperScheduler(num_train_timesteps=T)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)).mul(255).round() / 127.5 - 1

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(3)]

    exact = bits_per_dim(unet, scheduler, images, generator=generators()).total
    respaced = respaced_bits_per_dim(unet, scheduler, images, T, generator=generators(), batch_size=2)
    torch.testing.assert_close(respaced, exact, rtol=1e-5, atol=1e-5)
    coarse = respaced_bits_per_dim(unet, scheduler, images, 5, generator=generators())
    assert coarse.shape == (3,) and torch.isfinite(coarse).all()
    assert scheduler.timesteps.tolist() == list(range(T - 1, -1, -1))  # the scheduler given is left as it was


def test_respaced_bound_of_an_oracle_on_one_image_is_its_decoder_and_prior():
    """With one training image, the oracle x_0 = that image makes every KL of the respaced chain 0: the bound is
    L_T of the chain's first timestep plus the decoder term at t = 0, both in closed form."""
    scheduler = DDPMPaperScheduler(num_train_timesteps=T, prediction_type="sample", clip_sample=False)
    image = torch.tensor([-1.0, -1 / 255, 1.0, 127 / 127.5 - 1]).reshape(1, 1, 2, 2)

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            return type("Output", (), {"sample": image.expand_as(x)})()

    bound = respaced_bits_per_dim(Oracle(), scheduler, image, 4, generator=torch.Generator().manual_seed(0))
    abar = scheduler.alphas_cumprod.double()
    assert [19, 13, 6, 0] == [round(t) for t in torch.linspace(T - 1, 0, 4).tolist()]  # the chain
    prior = 0.5 * ((abar[T - 1] * image.double() ** 2).mean() + (1 - abar[T - 1]) - 1 - torch.log(1 - abar[T - 1]))
    # The decoder N(x_0, sigma^2) with the chain's clipped variance at its last step: beta-tilde of the step 6 -> 0.
    sigma = ((1 - abar[0]) / (1 - abar[6]) * (1 - abar[6] / abar[0])).sqrt()
    inner = torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(1 / 255, dtype=torch.float64) / sigma)
    # pixels -1 and 1 are open-ended bins (one side), the other two closed ones of width 2/255
    decoder = -(2 * torch.log(inner) + 2 * torch.log(2 * inner - 1)) / 4
    assert bound.item() == pytest.approx(((prior + decoder) / math.log(2)).item(), rel=1e-4)


@pytest.mark.slow  # about 40 s of CPU: sampling, the plots
@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_cli_evaluates_an_export_with_ddim_in_20_steps(tmp_path, stock_folder, digits_cache, monkeypatch):
    seen = []
    call = DDPMPaperPipeline.__call__

    def recording(self, *args, **kwargs):
        if kwargs.get("sampler") is not None:  # the samples; the plots' chains (progressive generation) are DDPM's
            seen.append((type(kwargs["sampler"]).__name__, kwargs["num_inference_steps"], kwargs["eta"]))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(DDPMPaperPipeline, "__call__", recording)
    output_dir = tmp_path / "evaluation"
    evaluate_ddpm.main(
        [
            *("--pipeline", str(stock_folder), "--output_dir", str(output_dir), "--device", "cpu"),
            *("--scheduler", "ddim", "--num_inference_steps", "20", "--ddim_eta", "0.3"),
            *("--num_images", "0", "--num_samples", "12", "--rate_distortion_images", "2", "--batch_size", "8"),
        ]
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert seen == [("DDIMScheduler", 20, 0.3)] * 2  # the samples, in two batches of 8 and 4
    assert (metrics["settings"]["scheduler"], metrics["settings"]["ddim_eta"]) == ("ddim", 0.3)
    assert metrics["num_samples"] == 12
    for name in ("fid", "precision", "recall", "inception_score"):
        assert math.isfinite(metrics[name]), name


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_cli_refuses_a_mean_prediction_export_with_ddim_in_one_line_before_sampling(
    tmp_path, mean_folder, monkeypatch
):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(DDPMPaperPipeline, "__call__", no_sampling)
    monkeypatch.setattr(DDPMPaperPipeline, "from_pretrained", no_sampling)
    with pytest.raises(SystemExit) as exit:
        evaluate_ddpm.main(["--pipeline", str(mean_folder), "--scheduler", "ddim", "--output_dir", str(tmp_path)])
    message = exit.value.code  # a string: Python prints it and exits with status 1
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("evaluate_ddpm.py: error: --scheduler ddim cannot sample")
    assert "prediction_type='mean'" in message and "ddpm, ddpm-respaced" in message
    assert str(mean_folder) in message
