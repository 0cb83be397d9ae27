"""The SVI loop: exact resume, NaN guard, atomic checkpoints, Ctrl-C, resume checks.

Every comparison is exact (``torch.equal`` on parameters, equal loss lists, equal file
bytes): on one CPU with fixed seeds the computation is deterministic, so a resumed run must
reproduce an uninterrupted one bit for bit.
"""

import math
import os

import pyro
import pytest
import torch

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.data import load_default_images
from pyro_reparam_conv.models import ConvClusterVAE
from pyro_reparam_conv.train import (
    NonFiniteTrainingError,
    load_checkpoint,
    load_params,
    save_checkpoint,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(hidden_channels=8, latent_channels=2, num_classes=3)
DATA, _ = load_default_images(32, seed=0)
COMMON = dict(batch_size=16, lr=3e-3, seed=7, progress=False, device="cpu")


def fresh_model(init_seed=0, **kwargs):
    """A new model object with an empty param store (as in a new process). Its y is on the
    score function (with a decaying-average baseline: state the checkpoint must carry)."""
    pyro.clear_param_store()
    torch.manual_seed(init_seed)
    kwargs.setdefault("y_infer", {"estimator": "score"})
    return ConvClusterVAE(**SMALL, **kwargs)


def params():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def fit(vae, steps, path, data=DATA, elbo=None, **kwargs):
    options = dict(COMMON, checkpoint_path=path, **kwargs)
    return train(vae.model, vae.guide, data, steps=steps, elbo=elbo or RoutedELBO(), **options)


def test_resume_gives_bit_identical_parameters(tmp_path):
    straight = fit(fresh_model(), 20, tmp_path / "straight.pt", checkpoint_every=5)
    expected = params()
    assert len(straight.losses) == 20

    first = fit(fresh_model(), 10, tmp_path / "resumed.pt", checkpoint_every=5)
    assert first.losses == straight.losses[:10]
    state = load_checkpoint(tmp_path / "resumed.pt")
    # the score site y's decaying-average baseline is part of the checkpoint
    assert set(state["elbo"]["decaying_averages"]) == {"y"}
    # a new model object (different initial values, overwritten from the checkpoint),
    # a new ELBO object and a cleared param store: as in a new process
    resumed = fit(fresh_model(init_seed=123), 20, tmp_path / "resumed.pt", resume=True)
    assert resumed.start_step == 10 and resumed.step == 20
    assert resumed.losses == straight.losses
    got = params()
    assert set(got) == set(expected)
    different = [n for n in expected if not torch.equal(got[n], expected[n])]
    assert not different, different


def test_resume_is_bit_identical_with_y_summed_exactly(tmp_path):
    """The default route of y (enumeration): resume as exact as on the score function."""
    enumerated = dict(y_infer={})
    straight = fit(fresh_model(**enumerated), 12, tmp_path / "straight.pt", checkpoint_every=6)
    expected = params()
    assert straight.elbo.routes["y"].estimator == "enumerate"
    fit(fresh_model(**enumerated), 6, tmp_path / "resumed.pt", checkpoint_every=6)
    resumed = fit(fresh_model(init_seed=7, **enumerated), 12, tmp_path / "resumed.pt", resume=True)
    assert resumed.losses == straight.losses
    got = params()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_resume_without_the_baseline_state_differs(tmp_path):
    """Control for the test above: dropping the ELBO state from the checkpoint changes the
    trajectory, so the bit-identical result does depend on restoring it."""
    fit(fresh_model(), 12, tmp_path / "a.pt", checkpoint_every=6)
    expected = params()
    fit(fresh_model(), 6, tmp_path / "b.pt", checkpoint_every=6)
    state = load_checkpoint(tmp_path / "b.pt")
    state["elbo"] = None
    save_checkpoint(tmp_path / "b.pt", state)
    fit(fresh_model(), 12, tmp_path / "b.pt", resume=True)
    got = params()
    assert any(not torch.equal(got[n], expected[n]) for n in expected)


def test_nan_in_data_raises_and_keeps_last_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    clean = fit(fresh_model(), 5, path, checkpoint_every=1, batch_size=len(DATA))
    good_bytes = path.read_bytes()
    good_params = params()

    bad = DATA.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteTrainingError) as info:
        fit(
            fresh_model(),
            10,
            path,
            data=bad,
            resume=True,
            allow_changed={"data"},  # the NaN is a deliberate change of the data
            checkpoint_every=1,
            batch_size=len(DATA),
        )
    err = info.value
    assert err.step == 6 and "x (model)" in err.sites
    message = str(err)
    assert "step 6" in message and "x (model)" in message
    assert "the minibatch holds 1 non-finite values" in message and "left untouched" in message
    # the last good checkpoint is byte-identical, loads, and matches the parameters in memory
    assert path.read_bytes() == good_bytes
    state = load_checkpoint(path)
    assert state["step"] == 5 and state["losses"] == clean.losses
    now = params()
    assert all(torch.equal(now[n], good_params[n]) for n in good_params)


def test_nan_without_validation_is_caught_from_the_loss(tmp_path):
    """With validation off the NaN is not rejected by the likelihood's support check; it
    reaches the loss, and the error still names the step and the site."""
    bad = DATA.clone()
    bad[0, 0, 0, 0] = float("nan")
    pyro.enable_validation(False)
    with pytest.raises(NonFiniteTrainingError) as info:
        fit(fresh_model(), 3, None, data=bad, batch_size=len(DATA))
    assert info.value.step == 1 and "x (model)" in info.value.sites


def test_atomic_save_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"value": torch.arange(3)})
    before = path.read_bytes()

    def broken_fsync(fd):  # the bytes reached the temp file, then the disk "fails"
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", broken_fsync)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(path, {"value": torch.arange(5)})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(3))


class InterruptOnCall:
    """Model wrapper raising KeyboardInterrupt on its ``k``-th call (call 1 is the
    parameter-registering trace that ``train`` makes before the first step)."""

    def __init__(self, model, k):
        self.model, self.k, self.calls = model, k, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt
        return self.model(*args, **kwargs)


def test_keyboard_interrupt_inside_a_step_checkpoints_the_last_completed_step(tmp_path):
    """Semantics: a KeyboardInterrupt raised inside step s abandons that step (its gradients
    are dropped); the checkpoint holds step s - 1 -- parameters, optimizer, baseline, batch
    order and RNG as they were before step s -- so resuming reproduces the uninterrupted run."""
    fit(fresh_model(), 8, tmp_path / "straight.pt", checkpoint_every=100)
    expected = params()

    path = tmp_path / "ckpt.pt"
    vae = fresh_model()
    model = InterruptOnCall(vae.model, k=1 + 5)  # call 1 registers params; step 5 is call 6
    with pytest.raises(KeyboardInterrupt):
        train(
            model,
            vae.guide,
            DATA,
            steps=8,
            elbo=RoutedELBO(),
            checkpoint_path=path,
            checkpoint_every=100,
            **COMMON,
        )
    state = load_checkpoint(path)
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert all(
        p.grad is None or not p.grad.any() for _, p in pyro.get_param_store().named_parameters()
    )

    resumed = fit(fresh_model(init_seed=5), 8, path, resume=True, checkpoint_every=100)
    assert resumed.start_step == 4 and resumed.step == 8
    got = params()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_resume_with_different_data_size_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(fresh_model(), 2, path)
    with pytest.raises(ValueError, match=r"num_data: checkpoint 32, now 24; data: checkpoint "):
        fit(fresh_model(), 4, path, data=DATA[:24], resume=True)


def test_load_params_restores_a_trained_model(tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(fresh_model(), 3, path)
    expected = params()
    vae = fresh_model(init_seed=9)
    state = load_params(vae.model, vae.guide, path, DATA[:2])
    assert state["step"] == 3
    got = params()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_bad_arguments():
    vae = fresh_model()
    with pytest.raises(ValueError, match="steps must be >= 0"):
        train(vae.model, vae.guide, DATA, steps=-1, progress=False)
    with pytest.raises(ValueError, match="data must be a non-empty tensor"):
        train(vae.model, vae.guide, DATA[:0], steps=1, progress=False)


def test_resume_into_a_model_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(fresh_model(), 2, path)
    pyro.clear_param_store()
    other = ConvClusterVAE(hidden_channels=8, latent_channels=2, num_classes=4)
    with pytest.raises(ValueError, match=r"shapes differ: class_maps: saved \(3, 2, 4, 4\)"):
        train(
            other.model,
            other.guide,
            DATA,
            steps=4,
            checkpoint_path=path,
            resume=True,
            elbo=RoutedELBO(),
            **COMMON,
        )


@pytest.mark.cuda
def test_training_and_export_on_cuda(tmp_path):
    """The built-in model trains with RoutedELBO on CUDA, checkpoints, and exports to ArviZ."""
    from pyro_reparam_conv import RoutedELBO, to_inference_data
    from pyro_reparam_conv.models import ConvClusterVAE

    images = torch.rand(32, 1, 8, 8)
    vae = ConvClusterVAE(hidden_channels=8)
    elbo = RoutedELBO()
    result = train(
        vae.model,
        vae.guide,
        images,
        steps=3,
        batch_size=16,
        elbo=elbo,
        device="cuda",
        checkpoint_path=tmp_path / "ck.pt",
        progress=False,
    )
    assert result.device.type == "cuda" and all(map(math.isfinite, result.losses))
    assert {r.estimator for r in elbo.routes.values()} == {"pathwise", "score"}
    idata = to_inference_data(vae.model, vae.guide, images[:4].cuda(), num_samples=5)
    assert idata.posterior["z"].shape[:3] == (1, 5, 4)
