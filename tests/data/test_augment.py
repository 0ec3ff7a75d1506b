"""Random crop with padding and horizontal flip (diverse.data.augment) and augmented training."""

import pytest
import torch

from diverse.app.config import load_config
from diverse.app.train import build_run, train
from diverse.data.augment import crop_and_flip
from diverse.errors import UserError


def test_crops_are_windows_of_the_padded_image_and_flips_mirror_them():
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float64).reshape(2, 2, 5, 6)
    fill = (-1.0, -2.0)
    out = crop_and_flip(x, 2, torch.Generator().manual_seed(3), fill)
    # replay the generator: offsets (y then x) per example, then the flips
    g = torch.Generator().manual_seed(3)
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flips = torch.rand(2, generator=g) < 0.5
    for b in range(2):
        p = torch.stack([torch.full((9, 10), f, dtype=torch.float64) for f in fill])
        p[:, 2:7, 2:8] = x[b]
        crop = p[:, oy[b]:oy[b] + 5, ox[b]:ox[b] + 6]
        expected = crop.flip(-1) if flips[b] else crop
        assert torch.equal(out[b], expected)
    assert torch.equal(crop_and_flip(x, 0, torch.Generator().manual_seed(0), flip=False), x)


def test_augmentation_is_seeded_and_varies_with_the_seed():
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = crop_and_flip(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, crop_and_flip(x, 2, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, crop_and_flip(x, 2, torch.Generator().manual_seed(2)))


def _run(*extra):
    return build_run(load_config(None, [
        "data.name=digits", "data.train_subset=256", "data.augment=true",
        "data.crop_padding=1", "model.name=mlp", "model.hidden=[16]", "ensemble.members=2",
        "train.epochs=3", "train.batch_size=64", "train.eval_every=0", *extra]))


def test_augmented_training_resumes_bit_for_bit(tmp_path):
    full = _run()
    train(full, tmp_path / "full", show_progress=False)

    class Stop(Exception):
        pass

    def stop(step):
        if step == 6:  # mid-epoch 2
            raise Stop

    with pytest.raises(Stop):
        train(_run(), tmp_path / "again", show_progress=False, on_step=stop)
    resumed = _run()
    train(resumed, tmp_path / "again", resume=True, show_progress=False)
    for name, p in full.ensemble.params.items():
        assert torch.equal(p, resumed.ensemble.params[name])
    plain = _run("data.augment=false")
    train(plain, tmp_path / "plain", show_progress=False)
    assert not torch.equal(plain.ensemble.params["fc1.weight"], full.ensemble.params["fc1.weight"])


def test_augment_needs_images():
    with pytest.raises(UserError, match="augment = true needs image data"):
        build_run(load_config(None, ["data.name=two-moons", "data.augment=true"]))
