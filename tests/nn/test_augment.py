"""The batched SSL views and DiffAugment: determinism, shapes, and each transform against an explicit one."""

import pytest
import torch

from mkdt.nn.augment import DiffAugment, SSLAugment, ViewParams

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
OFF = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)


def images(b: int = 16, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=g, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def plain(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def test_shape_dtype_device_and_finite():
    x = images()
    for blur in (0.0, 1.0):
        aug = SSLAugment(32, MEAN, STD, blur_p=blur)
        v1, v2 = aug.two_views(x, gen(0))
        for v in (v1, v2):
            assert v.shape == x.shape and v.dtype == torch.float32 and v.device == x.device
            assert torch.isfinite(v).all()
        assert not torch.equal(v1, v2)


def test_output_resized_to_image_size():
    out = SSLAugment(16, MEAN, STD)(images(size=32), gen(0))
    assert out.shape == (16, 3, 16, 16)


def test_deterministic_for_a_seed_and_different_for_another():
    aug, x = SSLAugment(32, MEAN, STD, blur_p=(1.0, 0.1)), images()
    a1, a2 = aug.two_views(x, gen(7))
    b1, b2 = aug.two_views(x, gen(7))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, aug.two_views(x, gen(8))[0])


def test_per_sample_crops_differ():
    # the same image repeated: every copy must get its own crop
    x = images(b=1).expand(8, -1, -1, -1).contiguous()
    out = SSLAugment(32, MEAN, STD, **{**OFF, "crop_scale": (0.2, 1.0), "crop_ratio": (0.75, 4 / 3)})(
        x, gen(0)
    )
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


def test_everything_off_equals_plain_normalisation():
    x = images()
    out = SSLAugment(32, MEAN, STD, **OFF)(x, gen(0))
    assert torch.allclose(out, plain(x), atol=1e-5)


def test_flip_only_equals_torch_flip():
    x = images()
    out = SSLAugment(32, MEAN, STD, **{**OFF, "flip_p": 1.0})(x, gen(0))
    assert torch.allclose(out, plain(torch.flip(x, dims=[-1])), atol=1e-5)


def test_grayscale_gives_equal_channels():
    x = images()
    aug = SSLAugment(32, (0.0,) * 3, (1.0,) * 3, **{**OFF, "grayscale_p": 1.0})
    out = aug(x, gen(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    v = x.float() / 255
    assert torch.allclose(out[:, 0], 0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2], atol=1e-5)


def test_solarize_inverts_bright_pixels():
    x = images()
    aug = SSLAugment(32, (0.0,) * 3, (1.0,) * 3, **{**OFF, "solarize_p": 1.0})
    v = x.float() / 255
    assert torch.allclose(aug(x, gen(0)), torch.where(v >= 0.5, 1 - v, v))


def test_asymmetric_blur_and_small_image_default():
    x = images(size=64)
    aug = SSLAugment(64, MEAN, STD, **{**OFF, "blur_p": (1.0, 0.0)})
    v1, v2 = aug.two_views(x, gen(0))
    assert torch.allclose(v2, plain(x), atol=1e-5)
    # blur smooths: total variation drops for every image
    tv = lambda v: (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert torch.all(tv(v1) <= tv(v2) + 1e-6) and tv(v1).mean() < 0.8 * tv(v2).mean()
    assert SSLAugment(32, MEAN, STD).blur_p == (0.0, 0.0)
    assert SSLAugment(64, MEAN, STD).blur_p == (1.0, 0.1)
    assert SSLAugment(64, MEAN, STD).solarize_p == (0.0, 0.2)


def test_color_jitter_is_per_sample_and_keeps_range():
    x = images(b=1).expand(8, -1, -1, -1).contiguous()
    aug = SSLAugment(32, (0.0,) * 3, (1.0,) * 3, **{**OFF, "jitter_p": 1.0})
    out = aug(x, gen(0))
    assert out.min() >= 0 and out.max() <= 1
    assert len({round(v, 6) for v in out.mean(dim=(1, 2, 3)).tolist()}) == 8


def test_hue_rotation_leaves_gray_pixels_unchanged():
    gray = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    aug = SSLAugment(8, (0.0,) * 3, (1.0,) * 3, **{**OFF, "jitter_p": 1.0, "jitter": (0, 0, 0, 0.5)})
    assert torch.allclose(aug(gray, gen(0)), gray.float() / 255, atol=1e-5)


def test_single_channel_images():
    x = images(c=1)
    aug = SSLAugment(32, (0.5,), (0.25,), grayscale_p=1.0, blur_p=0.5, solarize_p=0.5)
    out = aug(x, gen(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_input_validation():
    with pytest.raises(ValueError, match="uint8"):
        SSLAugment(32, MEAN, STD)(images().float(), gen(0))
    with pytest.raises(ValueError, match="crop_scale"):
        SSLAugment(32, MEAN, STD, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="probability"):
        SSLAugment(32, MEAN, STD, flip_p=1.5)
    with pytest.raises(ValueError, match="mean and std"):
        SSLAugment(32, MEAN, STD[:2])


# ---------------------------------------------------------------- DiffAugment (float, differentiable)

DIFF_OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def identity_params(b: int) -> ViewParams:
    return ViewParams(
        torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(b, 2, 3),
        torch.ones(b, 3),
        torch.zeros(b, dtype=torch.bool),
    )


def test_diff_augment_draws_from_its_generator_and_keeps_identity_params_exact():
    augment = DiffAugment((0.5,), (0.25,))
    x = torch.randn(5, 1, 8, 8)
    one = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(one, augment(x, torch.Generator().manual_seed(3)))
    assert not torch.allclose(one, augment(x, torch.Generator().manual_seed(4)))
    assert torch.allclose(augment.apply(x, identity_params(5)), x, atol=1e-5)


def test_diff_augment_keeps_shape_dtype_and_passes_gradients_to_the_pixels():
    augment = DiffAugment(MEAN, STD)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(6, 3, 16, 16, dtype=dtype, requires_grad=True)
        view = augment(x, gen(0))
        assert view.shape == x.shape and view.dtype == dtype and torch.isfinite(view).all()
        (grad,) = torch.autograd.grad(view.square().sum(), x)
        assert grad.shape == x.shape and bool((grad.flatten(1).abs().sum(1) > 0).all())


def test_diff_augment_flip_equals_torch_flip():
    x = torch.randn(4, 3, 8, 8)
    out = DiffAugment(MEAN, STD, **{**DIFF_OFF, "flip_p": 1.0})(x, gen(0))
    assert torch.allclose(out, torch.flip(x, dims=[-1]), atol=1e-5)


def test_diff_augment_crop_samples_the_centre_of_a_ramp_exactly():
    # a central crop of half the width and height, zoomed back to 8x8, of an image whose value is
    # its column index: output column j samples input column 1.75 + j / 2 (align_corners=False),
    # 5.25 - j / 2 when flipped; bilinear interpolation of a linear ramp is exact
    ramp = torch.arange(8.0).expand(2, 1, 8, 8)
    params = identity_params(2)
    affine = torch.tensor([[[0.5, 0, 0], [0, 0.5, 0]], [[-0.5, 0, 0], [0, 0.5, 0]]])
    out = DiffAugment((0.0,), (1.0,)).apply(ramp, ViewParams(affine, params.colour, params.gray))
    j = torch.arange(8.0)
    assert torch.allclose(out[0, 0], (1.75 + j / 2).expand(8, 8), atol=1e-5)
    assert torch.allclose(out[1, 0], (5.25 - j / 2).expand(8, 8), atol=1e-5)


def test_diff_augment_colour_factors_and_grayscale_in_pixel_units():
    x = torch.randn(3, 3, 8, 8)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    u = x * s + m
    params = identity_params(3)
    bright = ViewParams(params.affine, torch.tensor([[1.5, 1, 1]]).expand(3, 3), params.gray)
    out = DiffAugment(MEAN, STD).apply(x, bright)
    assert torch.allclose(out * s + m, 1.5 * u, atol=1e-5)
    gray = ViewParams(params.affine, params.colour, torch.ones(3, dtype=torch.bool))
    pixels = DiffAugment(MEAN, STD).apply(x, gray) * s + m
    luma = 0.299 * u[:, 0] + 0.587 * u[:, 1] + 0.114 * u[:, 2]
    assert all(torch.allclose(pixels[:, c], luma, atol=1e-5) for c in range(3))


def test_diff_augment_input_validation():
    with pytest.raises(ValueError, match="mean and std"):
        DiffAugment(MEAN, STD[:2])
    with pytest.raises(ValueError, match="crop_scale"):
        DiffAugment(MEAN, STD, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="probability"):
        DiffAugment(MEAN, STD, grayscale_p=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_with_cpu_generator_match_cpu():
    x, aug = images(), SSLAugment(32, MEAN, STD, blur_p=0.5)
    out = aug(x.cuda(), gen(0), view=1)
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), aug(x, gen(0), view=1), atol=1e-4)
