"""Data-parallel SVI on torch.distributed (gloo on 127.0.0.1): exactness against one process,
checkpoints by rank 0 and resume on 2 ranks and on 1, failures and signals shared by all ranks,
and the pieces (noise shards, seeds, the 1/S scale) on their own.

Multi-process tests spawn their ranks (``dist_workers.run_ranks``: a free port on 127.0.0.1,
a 30 s process-group timeout, a 120 s deadline for the whole run); the CLI tests launch
``train --nproc 2`` in a subprocess with a time limit.
"""

import signal
import subprocess
import sys
import time

import pyro
import pyro.poutine as poutine
import pytest
import torch
from dist_workers import (
    DATA,
    PROCESS_GROUP_TIMEOUT,
    ROUTES,
    SCORE_SITES,
    checkpoint_and_resume,
    fail_at_step_3,
    fit,
    fresh_model,
    params,
    run_ranks,
    two_routes,
)

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.checkpoint import SettingsMismatchError, load_checkpoint, save_checkpoint
from pyro_reparam_conv.distributed import (
    flatten_state,
    local_shards,
    resolve_noise_shards,
    shard_rows,
    shard_seed,
    tree_sum,
    unflatten_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 120  # seconds, for every multi-process run


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def single_process(route, steps=6, noise_shards=2, **options):
    """The reference: one process computing the noise shards of every batch in turn."""
    vae = fresh_model(route)
    result = fit(
        vae.model, vae.guide, steps, process_group=None, noise_shards=noise_shards, **options
    )
    return result, params()


# ------------------------------------------------------------------ pieces
def test_noise_shards_default_to_the_world_size_and_are_checked():
    assert resolve_noise_shards(None, 4, 64) == 4
    assert resolve_noise_shards(8, 4, 64) == 8
    with pytest.raises(ValueError, match="noise_shards 6 is not a multiple of the world size 4"):
        resolve_noise_shards(6, 4, 48)
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by noise_shards 4"):
        resolve_noise_shards(None, 4, 30)
    with pytest.raises(ValueError, match="noise_shards must be a positive integer"):
        resolve_noise_shards(0, 1, 8)


def test_shards_split_every_batch_into_equal_blocks_among_ranks():
    indices = torch.randperm(24)
    blocks = [[shard_rows(indices, 6, j) for j in local_shards(6, 3, rank)] for rank in range(3)]
    assert [list(local_shards(6, 3, rank)) for rank in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([b for rank in blocks for b in rank]), indices)
    assert all(len(b) == 4 for rank in blocks for b in rank)


def test_shards_are_added_halves_first_so_two_ranks_add_as_one_process():
    def add(a, b):
        return f"({a}+{b})"

    assert tree_sum(list("abcd"), add) == "((a+b)+(c+d))"
    # rank 0 adds a, b; rank 1 adds c, d; the all-reduce adds the two: the same expression
    assert add(tree_sum(list("ab"), add), tree_sum(list("cd"), add)) == "((a+b)+(c+d))"
    assert tree_sum(list("abc"), add) == "(a+(b+c))" and tree_sum(["a"], add) == "a"


def test_shard_seeds_depend_on_seed_step_and_shard():
    seeds = {shard_seed(s, t, j) for s in (0, 1) for t in (1, 2) for j in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert shard_seed(7, 3, 1) == shard_seed(7, 3, 1)


def test_state_flattening_round_trips_and_rejects_non_tensors():
    state = {"decaying_averages": {"z": torch.ones(2), "y": torch.zeros(3)}}
    items = flatten_state(state)
    assert [path for path, _ in items] == [("decaying_averages", "y"), ("decaying_averages", "z")]
    assert unflatten_state(items) == {"decaying_averages": {"y": items[0][1], "z": items[1][1]}}
    with pytest.raises(TypeError, match="entry decaying_averages/y is a int"):
        flatten_state({"decaying_averages": {"y": 3}})


@pytest.mark.parametrize("route", ROUTES)
def test_a_shard_scale_scales_gradients_and_baseline_costs_linearly(route):
    """A shard's sites are scaled by 1/S: its surrogate gradient and its score-function costs
    (what the decaying averages record) must scale by exactly that factor, on the score route
    as on the pathwise one (Pyro leaves the score function unscaled), so that the sum over
    shards is the minibatch estimate and not a multiple of it."""
    vae = fresh_model(route)
    batch = DATA[:8]

    def gradients(scale):
        elbo = RoutedELBO()
        pyro.set_rng_seed(3)
        with poutine.trace(param_only=True) as capture, poutine.scale(scale=scale):
            loss = elbo.loss_and_grads(vae.model, vae.guide, batch, num_data=len(DATA))
        found = {}
        for name, site in capture.trace.nodes.items():
            p = site["value"].unconstrained()
            found[name], p.grad = p.grad.clone(), None
        return loss, found, elbo.state_dict()["decaying_averages"]

    loss1, grads1, costs1 = gradients(1.0)
    loss2, grads2, costs2 = gradients(0.25)
    assert loss2 == pytest.approx(0.25 * loss1, rel=1e-6)
    for name in grads1:
        torch.testing.assert_close(grads2[name], 0.25 * grads1[name], rtol=1e-5, atol=1e-6)
    assert set(costs1) == SCORE_SITES[route]
    for site in costs1:
        torch.testing.assert_close(costs2[site], 0.25 * costs1[site], rtol=1e-6, atol=0.0)


def test_single_process_shards_record_the_layout_and_draw_their_own_noise(tmp_path):
    sharded, expected = single_process("auto", steps=3, checkpoint_path=tmp_path / "a.pt")
    again, got = single_process("auto", steps=3)
    assert sharded.losses == again.losses and same(got, expected)
    assert sharded.world_size == 1 and sharded.noise_shards == 2
    # the per-element baseline has the shard's plate size
    assert sharded.elbo.state_dict()["decaying_averages"]["y"].shape == (8,)
    settings = load_checkpoint(tmp_path / "a.pt")["settings"]
    assert settings["world_size"] == 1 and settings["noise_shards"] == 2
    vae = fresh_model()
    plain = fit(vae.model, vae.guide, 3, process_group=None)
    assert plain.noise_shards == 1 and plain.losses != sharded.losses  # other noise


def test_resume_with_other_noise_shards_is_refused_by_name(tmp_path):
    path = tmp_path / "ck.pt"
    single_process("auto", steps=2, checkpoint_path=path)
    vae = fresh_model()
    with pytest.raises(SettingsMismatchError, match=r"noise_shards: checkpoint 2, now 1") as info:
        fit(vae.model, vae.guide, 4, checkpoint_path=path, resume=True)
    assert "the same noise_shards on another number of processes" in str(info.value)
    vae = fresh_model()
    result = fit(
        vae.model, vae.guide, 4, checkpoint_path=path, resume=True, allow_changed={"noise_shards"}
    )
    assert result.start_step == 2 and result.changed == {"noise_shards": (2, 1)}
    # the per-element baseline of 8 shard elements falls back to its mean for 16
    assert result.elbo.state_dict()["decaying_averages"]["y"].shape == (16,)


def test_checkpoints_from_before_the_layout_was_recorded_still_resume(tmp_path):
    path = tmp_path / "ck.pt"
    vae = fresh_model()
    fit(vae.model, vae.guide, 2, checkpoint_path=path)
    state = load_checkpoint(path)
    for name in ("world_size", "noise_shards"):
        del state["settings"][name]
    save_checkpoint(path, state)
    vae = fresh_model()
    assert fit(vae.model, vae.guide, 3, checkpoint_path=path, resume=True).start_step == 2


# ------------------------------------------------------------------ several processes
@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """``dist_workers.two_routes`` on 2 ranks (spawned once for the tests that read it)."""
    codes, ranks = run_ranks(two_routes, tmp_path_factory.mktemp("two_routes"), timeout=TIMEOUT)
    assert codes == [0, 0], ranks
    return {rank: found["result"] for rank, found in ranks.items()}


def test_two_ranks_give_the_parameters_of_one_rank_on_both_routes(two_rank_runs):
    """2 ranks with 8 images each = 1 process with batch 16 in 2 noise shards: the same noise
    per image, gradients summed in the same order, the same baseline averages. With two
    summands float addition is exact to reorder, so the parameters are bit-identical."""
    for route in ROUTES:
        reference, expected = single_process(route)
        for rank in (0, 1):
            got = two_rank_runs[rank][route]
            assert got["world_size"] == 2 and got["noise_shards"] == 2
            assert got["losses"] == reference.losses
            assert same(got["params"], expected), (route, rank)
            assert same(
                got["elbo"]["decaying_averages"],
                reference.elbo.state_dict()["decaying_averages"],
            )
    # the routes differ where they should: z's baseline exists on the score route only
    assert set(two_rank_runs[0]["score"]["elbo"]["decaying_averages"]) == {"y", "z"}


def test_two_shards_per_rank_sum_in_the_order_of_one_process(two_rank_runs):
    """4 noise shards on 2 ranks: each rank adds its two shards, the all-reduce adds the two
    halves, ``(g0 + g1) + (g2 + g3)``: the order one process uses (``tree_sum``), so the
    parameters are bit-identical again; 2 shards draw other noise."""
    reference, expected = single_process("auto", noise_shards=4)
    for rank in (0, 1):
        got = two_rank_runs[rank]["auto, 4 shards"]
        assert got["noise_shards"] == 4 and got["losses"] == reference.losses
        assert same(got["params"], expected)
    assert two_rank_runs[1]["auto"]["losses"] != reference.losses


def test_rank_0_alone_checkpoints_and_a_resume_restores_every_rank_on_2_or_1(tmp_path):
    codes, ranks = run_ranks(checkpoint_and_resume, tmp_path, timeout=TIMEOUT)
    assert codes == [0, 0], ranks
    assert ranks[0]["result"]["saves"] == [2, 4, 6] and ranks[1]["result"]["saves"] == []
    reference, expected = single_process("auto")
    for rank in (0, 1):  # each began the resume from other initial values
        got = ranks[rank]["result"]
        assert got["start"] == 4 and got["losses"] == reference.losses
        assert same(got["params"], expected)
    state = load_checkpoint(tmp_path / "ck.pt")
    assert state["step"] == 6 and [h["event"] for h in state["history"]] == ["start", "resume"]

    # one process: the layout setting must be dealt with explicitly
    path = tmp_path / "ck4.pt"
    vae = fresh_model(init_seed=5)
    with pytest.raises(SettingsMismatchError, match=r"world_size: checkpoint 2, now 1"):
        fit(vae.model, vae.guide, 6, checkpoint_path=path, resume=True, noise_shards=2)
    vae = fresh_model(init_seed=5)
    resumed = fit(
        vae.model,
        vae.guide,
        6,
        checkpoint_path=path,
        resume=True,
        noise_shards=2,  # the same shards: the same noise as on 2 ranks
        allow_changed={"world_size"},
    )
    assert resumed.start_step == 4 and resumed.changed == {"world_size": (2, 1)}
    assert resumed.losses == reference.losses and same(params(), expected)


def test_a_rank_that_raises_stops_every_rank_naming_it(tmp_path):
    codes, ranks = run_ranks(fail_at_step_3, tmp_path, "raise", timeout=TIMEOUT)
    assert codes == [0, 0], ranks
    for rank in (0, 1):
        err = ranks[rank]
        assert err.get("error") == "RankFailedError", err
        assert err["rank"] == 1 and "ValueError" in err["origin"]
        # (Pyro appends the trace shapes of the failing model to the message)
        assert err["message"].startswith("rank 1 failed at step 3: ValueError: boom on rank 1")
        assert err["seconds"] < PROCESS_GROUP_TIMEOUT  # stopped by the exchange, not a timeout
    assert ranks[1]["cause"] == "ValueError" and ranks[0]["cause"] is None
    assert load_checkpoint(tmp_path / "ck.pt")["step"] == 2  # the last good step


def test_a_rank_that_dies_stops_the_others_before_the_timeout(tmp_path):
    codes, ranks = run_ranks(fail_at_step_3, tmp_path, "die", timeout=TIMEOUT)
    assert codes == [0, 3] and 1 not in ranks
    err = ranks[0]
    assert err.get("error") == "RankFailedError" and err["rank"] is None, err
    assert err["message"].startswith("the ranks stopped at step 3: lost contact with another rank")
    assert err["seconds"] < PROCESS_GROUP_TIMEOUT


def test_ranks_whose_parameters_differ_stop_before_summing_them(tmp_path):
    codes, ranks = run_ranks(fail_at_step_3, tmp_path, "new parameter", timeout=TIMEOUT)
    assert codes == [0, 0], ranks
    for rank in (0, 1):
        err = ranks[rank]
        assert err.get("error") == "RankFailedError" and err["rank"] is None, err
        assert err["message"].startswith(
            "the ranks stopped at step 3: the ranks' parameters or ELBO state differ (rank 1 "
            "has ['only_on_rank_1:(1,):torch.float32'] where rank 0 has [])"
        )


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    codes, ranks = run_ranks(fail_at_step_3, tmp_path, "sigterm", timeout=TIMEOUT)
    assert codes == [0, 0], ranks
    for rank in (0, 1):
        assert ranks[rank].get("error") == "Interrupted", ranks[rank]
        assert ranks[rank]["signum"] == signal.SIGTERM
    state = load_checkpoint(tmp_path / "ck.pt")
    assert state["step"] == 3 and len(state["losses"]) == 3


# ------------------------------------------------------------------ command line
TRAIN = [
    "train", "--num-images", "32", "--batch-size", "16", "--hidden-channels", "8",
    "--latent-channels", "2", "--num-classes", "3", "--no-progress", "--device", "cpu",
]  # fmt: skip


def cli(*argv):
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_reparam_conv.cli", *TRAIN, *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_nproc_trains_on_2_processes_and_reports_a_failed_rank_in_one_line(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli("--nproc", "2", "--out", str(out), "--steps", "4")
    assert code == 0, stderr
    assert "4 steps" in stdout and "(2 processes, 2 noise shards)" in stdout
    assert stdout.count("z: pathwise") == 1  # rank 0 alone prints
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4 and state["settings"]["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "elbo.png", "results.json"]

    code, _, stderr = cli(
        "--nproc", "2", "--out", str(out), "--steps", "6", "--resume", "--lr", "1"
    )
    assert code == 2
    assert stderr.splitlines() == [
        f"pyro-reparam-conv train: error: rank 0 failed at resume: SettingsMismatchError: {out}"
        "/checkpoint.pt was saved with other settings (lr: checkpoint 0.003, now 1.0); resume "
        "with the checkpoint's settings, or accept the change with --allow-changed lr (Python: "
        "train(..., allow_changed=['lr']))"
    ]


def test_cli_nproc_passes_sigterm_to_every_rank_and_checkpoints_once(tmp_path):
    """What a batch scheduler does: SIGTERM to the launcher. Its agent passes it on; the ranks
    agree on the step to stop after, rank 0 checkpoints it, one line is said."""
    out = tmp_path / "run"
    argv = ["--nproc", "2", "--out", str(out), "--steps", "100000", "--checkpoint-every", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_reparam_conv.cli", *TRAIN, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines() == [
        "pyro-reparam-conv train: stopped by SIGTERM; the last completed step is checkpointed, "
        "continue with --resume"
    ]
    state = load_checkpoint(out / "checkpoint.pt")
    assert 5 <= state["step"] < 100000 and len(state["losses"]) == state["step"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_other_commands_and_usage_errors_are_said_once(rank, monkeypatch, capsys):
    from pyro_reparam_conv.cli import main

    environment = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}
    for name, value in {**environment, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["demo", "--steps", "1"]) == 2
    assert main(["train", "--batch-size", "zero"]) == 2
    lines = capsys.readouterr().err.splitlines()
    if rank == "1":
        assert lines == []
    else:
        assert lines[0] == (
            "pyro-reparam-conv demo: error: demo runs in one process; under torchrun run "
            "`train` (or `train --nproc N` without torchrun)"
        )
        assert len(lines) == 2 and "argument --batch-size: expected an integer" in lines[1]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_failed_rank_says_why_once_with_the_exit_status_of_its_error(rank, monkeypatch, capsys):
    from pyro_reparam_conv.cli import _report
    from pyro_reparam_conv.distributed import RankFailedError

    environment = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}
    for name, value in {**environment, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    user_error = RankFailedError(1, "step 3", ["ValueError", "Exception"], "ValueError: boom")
    bug = RankFailedError(1, "step 3", ["RuntimeError", "Exception"], "RuntimeError: boom")
    lost = RankFailedError(None, "step 3", ["RuntimeError"], "lost contact", agreed=False)
    assert [_report(err, "train") for err in (user_error, bug, lost)] == [2, 1, 1]
    lines = capsys.readouterr().err.splitlines()
    if rank == "1":
        assert lines == [
            "pyro-reparam-conv train: error: rank 1 failed at step 3: ValueError: boom",
            "pyro-reparam-conv train: error: rank 1 failed at step 3: RuntimeError: boom",
        ]
    else:  # a lost contact names no rank: rank 0 says it
        assert lines == [
            "pyro-reparam-conv train: error: the ranks stopped at step 3: lost contact"
        ]
