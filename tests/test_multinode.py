"""Training over several machines (`resources.train.nodes`): the Slurm environment read by
`launch.machines_from_slurm`, its errors, and 2 "nodes" x 1 process on this machine started as the
training rule starts them under Slurm (`python -m remeanflow.launch` per node, the node's SLURM_*
variables set as `srun --ntasks-per-node=1` sets them), which must take the same steps as one
process with the whole batch.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remeanflow import checkpoints, launch, train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import HYPER, global_inputs  # noqa: E402
from train_worker import TRAIN_KW, hyperparameters, make_couplings, make_teacher  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("ddp_worker.py")
PER_RANK = 4


# ----------------------------------------------------------------------------------------------
# The Slurm environment.


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("node[01-03],gpu7", ["node01", "node02", "node03", "gpu7"]),
    ("gpu7,node[09-11]", ["gpu7", "node09", "node10", "node11"]),
    ("n[1,3-4,10]", ["n1", "n3", "n4", "n10"]),
    ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
    ("a[001-002]x,b.example.org", ["a001x", "a002x", "b.example.org"]),
])
def test_node_lists_expand_as_slurm_writes_them(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node01]", "node[a-b]", "node[3-1]", "n1,,n2", "n[1-2]]"])
def test_unreadable_node_lists_are_errors(nodelist):
    with pytest.raises(ValueError, match="node list"):
        launch.expand_nodelist(nodelist)


def test_node_list_parser_agrees_with_scontrol():
    if subprocess.run(["sh", "-c", "command -v scontrol"], capture_output=True).returncode:
        pytest.skip("scontrol not installed")
    nodelist = "node[01-03,7],gpu7,rack[1-2]-n[8-9]"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert launch.expand_nodelist(nodelist) == out.stdout.split()


def slurm_env(**over) -> dict[str, str]:
    env = dict(SLURM_PROCID="1", SLURM_NNODES="3", SLURM_NTASKS="3", SLURM_JOB_NODELIST="node[01-03]",
               SLURM_JOB_ID="4242")
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_machine_rank_address_and_port_come_from_slurm():
    m = launch.machines_from_slurm(slurm_env())
    assert m == launch.Machines(num_machines=3, machine_rank=1, main_address="node01",
                                main_port=launch.PORT_BASE + 4242)
    # every node of a job computes the same port; other jobs another one
    assert launch.machines_from_slurm(slurm_env(SLURM_PROCID="2")).main_port == m.main_port
    assert launch.machines_from_slurm(slurm_env(SLURM_JOB_ID="4243")).main_port == m.main_port + 1
    assert 1024 < launch.machines_from_slurm(slurm_env(SLURM_JOB_ID="99999999")).main_port < 32768
    assert launch.machines_from_slurm(slurm_env(REMEANFLOW_MAIN_PORT="29511")).main_port == 29511
    # inside an srun step the step's own node list and size win over the job's
    step = launch.machines_from_slurm(slurm_env(SLURM_STEP_NODELIST="node[02-03]", SLURM_STEP_NUM_NODES="2",
                                                SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS=None))
    assert (step.num_machines, step.main_address) == (2, "node02")
    assert launch.this_machine(slurm_env()) == m


def test_missing_slurm_variables_are_named():
    with pytest.raises(RuntimeError) as e:
        launch.machines_from_slurm(slurm_env(SLURM_NNODES=None, SLURM_JOB_NODELIST=None))
    assert "SLURM_NNODES, SLURM_JOB_NODELIST not set" in str(e.value)
    assert "REMEANFLOW_MACHINE_RANK" in str(e.value)  # what to set outside Slurm
    with pytest.raises(RuntimeError, match="SLURM_PROCID not set"):
        launch.machines_from_slurm(slurm_env(SLURM_PROCID=None))


@pytest.mark.parametrize("over, message", [
    (dict(SLURM_NTASKS="6"), r"SLURM_NTASKS=6 tasks on SLURM_NNODES=3 nodes: start one task per node"),
    (dict(SLURM_JOB_NODELIST="node[01-02]"), r"names 2 hosts but SLURM_NNODES=3"),
    (dict(SLURM_PROCID="x"), r"SLURM_PROCID='x' is not an integer"),
    (dict(SLURM_PROCID="3"), r"machine rank 3 is not in 0..2"),
])
def test_inconsistent_slurm_variables_are_errors(over, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        launch.machines_from_slurm(slurm_env(**over))


def test_explicit_settings_outside_slurm():
    env = dict(REMEANFLOW_NUM_MACHINES="2", REMEANFLOW_MACHINE_RANK="0", REMEANFLOW_MAIN_ADDRESS="10.0.0.5",
               REMEANFLOW_MAIN_PORT="29400")
    assert launch.this_machine(env) == launch.Machines(2, 0, "10.0.0.5", 29400)
    del env["REMEANFLOW_MAIN_PORT"], env["REMEANFLOW_MACHINE_RANK"]
    with pytest.raises(RuntimeError, match="REMEANFLOW_MACHINE_RANK, REMEANFLOW_MAIN_PORT not set"):
        launch.this_machine(env)


def test_accelerate_command_of_one_machine_is_unchanged_and_of_several_names_this_one():
    one, _ = launch.accelerate_command(4)
    assert one[one.index("--num_machines") + 1] == "1" and one[one.index("--main_process_port") + 1] == "0"
    assert "--machine_rank" not in one
    cmd, _ = launch.accelerate_command(16, launch.Machines(2, 1, "node01", 16000))
    flags = dict(zip(cmd[4::2], cmd[5::2]))  # after "--multi_gpu"
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "node01" and flags["--main_process_port"] == "16000"
    with pytest.raises(ValueError, match="cannot be spread evenly over 2 machines"):
        launch.accelerate_command(3, launch.Machines(2, 0, "node01", 16000))


def test_the_global_batch_is_split_over_all_processes_of_all_machines():
    launch.check_split(16, 2 * 8, total_key="train.batch_size", keys="resources.train.nodes x resources.train.gpu")
    with pytest.raises(ValueError, match=r"train.batch_size = 24 .* 16 here .*resources.train.nodes"):
        launch.check_split(24, 2 * 8, total_key="train.batch_size", keys="resources.train.nodes x resources.train.gpu")


def test_node_launcher_says_which_variables_are_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REMEANFLOW_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "remeanflow.launch", "--processes-per-node", "1", "--", "x.py"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "REMEANFLOW_NUM_MACHINES, REMEANFLOW_MACHINE_RANK, REMEANFLOW_MAIN_ADDRESS, REMEANFLOW_MAIN_PORT not set" \
        in proc.stderr


# ----------------------------------------------------------------------------------------------
# Two machines on this one.


def free_derived_port() -> tuple[int, int]:
    """A job id whose derived port is free here, and that port."""
    rng = random.Random()
    for _ in range(200):
        job = rng.randrange(1, 10**6)
        port = launch.PORT_BASE + job % launch.PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job, port
    raise RuntimeError("no free port in the derived range")


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory):
    """2 nodes x 1 process: each "node" is `python -m remeanflow.launch` with the variables srun
    gives the task of that node (the rule's `launch.launch_nodes`), so each runs its own
    `accelerate launch` with machine rank, main address and port read from them."""
    root = tmp_path_factory.mktemp("multinode")
    manifest, teacher = make_couplings(root / "couplings"), make_teacher(root / "teacher.pt")
    kw = dict(manifest=str(manifest), init=str(teacher), out_dir=str(root / "out"), work_dir=str(root / "work"),
              stage=1, iterations=2, checkpoint_every=2, **TRAIN_KW)
    (root / "record").mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"record": str(root / "record"), "train": kw,
                                "grads": {"init": str(teacher), "batch": PER_RANK, "jvp": ["tangent"]}}))
    job, port = free_derived_port()
    procs = []
    for node in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REMEANFLOW_", "ACCELERATE_"))}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLURM_JOB_ID=str(job), SLURM_PROCID=str(node),
                   SLURM_NODEID=str(node), SLURM_NNODES="2", SLURM_NTASKS="2",
                   # two names of this machine, the first the main node's as Slurm lists it
                   SLURM_JOB_NODELIST="localhost,127.0.0.1")
        cmd = [sys.executable, "-m", "remeanflow.launch", "--processes-per-node", "1", "--", str(WORKER), str(spec)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    try:
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} failed ({p.returncode}):\n{out[-6000:]}"
    records = [json.loads((root / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    grads = [torch.load(root / "record" / f"grads.rank{r}.tangent.pt", weights_only=True) for r in range(2)]
    return dict(root=root, teacher=teacher, outputs=outputs, port=port, records=records, grads=grads)


@pytest.mark.slow
def test_each_node_runs_one_machine_of_the_run(two_machines):
    for node, out in enumerate(two_machines["outputs"]):
        assert f"machine {node} of 2, 1 process(es) here, main process at localhost:{two_machines['port']}" in out
    for rank, rec in enumerate(two_machines["records"]):
        # global rank = machine rank here; each node's only process is its local process 0
        assert (rec["process_index"], rec["local_process_index"], rec["num_processes"]) == (rank, 0, 2)
        assert rec["env"] == {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    # the training run went through both machines: one writer, rank 0
    assert (two_machines["root"] / "out" / "train_state.pt").is_file()
    assert not two_machines["records"][1]["writes"]


@pytest.mark.slow
def test_two_machines_take_the_same_steps_as_one_process_with_the_whole_batch(two_machines):
    """Machine k of 2 trained on rows k*B:(k+1)*B of `global_inputs`; one process on all 2B rows."""
    acc = train.make_accelerator("no")
    net = checkpoints.load_net(two_machines["teacher"])["net"]
    ema = checkpoints.load_net(two_machines["teacher"])["net"]
    trainer = train.build_trainer(acc, net, ema, hyperparameters(**{**HYPER, "jvp": "tangent"}))
    ref_rows = [train.train_step(trainer, global_inputs(1, 2 * PER_RANK), 1)]
    ref_grads = {n: p.grad.clone() for n, p in trainer.net.named_parameters() if p.grad is not None}
    ref_rows.append(train.train_step(trainer, global_inputs(2, 2 * PER_RANK), 2))
    ref_params = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}

    g0, g1 = two_machines["grads"]
    assert (g0["world"], g1["world"]) == (2, 2)
    for name, g in ref_grads.items():
        assert torch.equal(g0["grads"][name], g1["grads"][name]), name  # all-reduced across the machines
        torch.testing.assert_close(g0["grads"][name], g, rtol=1e-5, atol=1e-8, msg=name)
    for rank in (g0, g1):
        assert max((rank["params"][k] - ref_params[k]).abs().max().item() for k in ref_params) < 1e-2 * HYPER["lr"]
        for got, want in zip(rank["rows"], ref_rows):
            assert got["w_pi"] == want["w_pi"]
            for key in ("loss", "mse", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
