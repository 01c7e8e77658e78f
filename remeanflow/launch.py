"""Run a library entry point in several processes under `accelerate launch` (one per GPU).

Rules call the library function directly when one process suffices; otherwise they call
`launch_module("remeanflow.<module>", spec, processes)`, which writes the spec to a JSON file and
runs `python -m remeanflow.<module> <spec.json>` in every rank. Explicit flags keep a user's
accelerate `default_config.yaml` out of the picture; on CPU a real multi-process run needs
`--multi_gpu` with ACCELERATE_USE_CPU=1 (`--cpu` alone starts one process: checked with accelerate 1.x).

Several machines (`resources.train.nodes`): `launch_nodes` starts one `accelerate launch` per node
with `srun` inside the Slurm job, each running `python -m remeanflow.launch` (`node_main`), which
takes its machine rank, the main node's address and a port from the Slurm environment
(`machines_from_slurm`) or, outside Slurm, from REMEANFLOW_* variables (`machines_from_env`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import gpus
from .workflow import history_path

log = logging.getLogger(__name__)


def job_processes(configured: int, gpu_resource: int, *, keys: str) -> int:
    """How many processes a job starts: max(configured, gpu resource, 1), capped by the CUDA
    devices this process can use when there is CUDA (one rank per device).

    Snakemake scales a `gpu` request down to what the machine has (`profiles/local`), and the
    job's GPU claim (`gpus.claim`) holds at most that many, so an 8-GPU preset on a 4-GPU machine
    runs 4 ranks instead of 8 ranks of which 4 ask for devices that do not exist. Without CUDA
    the configured count runs (CPU processes). `keys` names the config keys behind the count, for
    the log.
    """
    wanted = max(configured, gpu_resource, 1)
    visible = gpus.visible_cuda_devices()
    if visible is None or wanted <= visible:
        return wanted
    if visible < 1:
        raise RuntimeError(f"CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); {keys} ask for {wanted}")
    log.warning("%s ask for %d processes but this job has %d CUDA device(s): running %d", keys, wanted, visible,
                visible)
    return visible


def check_split(total: int, processes: int, *, total_key: str, keys: str) -> None:
    """A clear error, before anything is launched, when `total` (config key `total_key`, e.g. the
    global batch) cannot be split evenly over the `processes` a job runs (`job_processes`)."""
    if total % processes:
        raise ValueError(f"{total_key} = {total} must be divisible by the number of processes, {processes} here "
                         f"(from {keys}, capped by the GPUs this job has): change {total_key} or {keys}")


@dataclasses.dataclass(frozen=True)
class Machines:
    """Where this machine stands in a run over several: accelerate's `--num_machines`,
    `--machine_rank`, `--main_process_ip` and `--main_process_port`."""

    num_machines: int
    machine_rank: int
    main_address: str
    main_port: int

    def __post_init__(self):
        if self.num_machines < 1 or not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"machine rank {self.machine_rank} is not in 0..{self.num_machines - 1}")
        if not 0 < self.main_port < 65536:
            raise ValueError(f"main process port {self.main_port} is not a TCP port")


def accelerate_command(processes: int, machines: Machines | None = None) -> tuple[list[str], dict]:
    """The launcher of `processes` ranks in all; with `machines`, this machine's share of them
    (processes // num_machines) in a run over `machines.num_machines` machines."""
    if machines is None:
        where = ["--main_process_port", "0", "--num_machines", "1"]
    else:
        if processes % machines.num_machines:
            raise ValueError(f"{processes} processes cannot be spread evenly over {machines.num_machines} machines")
        where = ["--num_machines", str(machines.num_machines), "--machine_rank", str(machines.machine_rank),
                 "--main_process_ip", machines.main_address, "--main_process_port", str(machines.main_port)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           *where, "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


# ----------------------------------------------------------------------------------------------
# Several machines.

# Below Linux's ephemeral range (32768-60999), so that no outgoing connection holds the port.
PORT_BASE, PORT_SPAN = 15000, 15000
ENV_KEYS = ("REMEANFLOW_NUM_MACHINES", "REMEANFLOW_MACHINE_RANK", "REMEANFLOW_MAIN_ADDRESS", "REMEANFLOW_MAIN_PORT")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (`node[01-03,07],gpu7`, `rack[1-2]-n[1-2]`) as host names, in
    Slurm's order; zero padding follows the range's first number, as Slurm writes it."""
    hosts: list[str] = []
    for item in _split_outside_brackets(nodelist.strip()):
        if not item:
            raise ValueError(f"empty host name in node list {nodelist!r}")
        hosts.extend(_expand_host(item, nodelist))
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in node list {text!r}")
    return parts + [text[start:]]


def _expand_host(item: str, nodelist: str) -> list[str]:
    m = re.match(r"^([^\[\]]*)\[([^\]]*)\](.*)$", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ValueError(f"cannot read {item!r} in node list {nodelist!r}")
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand_host(rest, nodelist) if rest else [""]
    names = []
    for part in ranges.split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if r is None:
            raise ValueError(f"cannot read range {part!r} in node list {nodelist!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in node list {nodelist!r}")
        names.extend(f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return [name + tail for name in names for tail in tails]


def machines_from_slurm(env=None) -> Machines:
    """This node's place in an `srun` step with one task per node: the task rank is the machine
    rank, the step's first host the main process's; the port is derived from the job id so that
    every node computes the same one without talking to the others (REMEANFLOW_MAIN_PORT wins)."""
    env = os.environ if env is None else env
    nodelist_key = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    nodes_key = "SLURM_STEP_NUM_NODES" if env.get("SLURM_STEP_NUM_NODES") else "SLURM_NNODES"
    required = ("SLURM_PROCID", nodes_key, nodelist_key, "SLURM_JOB_ID")
    missing = [key for key in required if not env.get(key)]
    if missing:
        raise RuntimeError(f"not inside a Slurm job step: {', '.join(missing)} not set (needed: "
                           f"{', '.join(required)}); outside Slurm set {', '.join(ENV_KEYS)} instead")
    values = {key: _int_var(env, key) for key in ("SLURM_PROCID", nodes_key, "SLURM_JOB_ID")}
    num_machines = values[nodes_key]
    tasks_key = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    if env.get(tasks_key) and _int_var(env, tasks_key) != num_machines:
        raise RuntimeError(f"{tasks_key}={env[tasks_key]} tasks on {nodes_key}={num_machines} nodes: start one task "
                           "per node (srun --ntasks-per-node=1), each launches the processes of its node")
    hosts = expand_nodelist(env[nodelist_key])
    if len(hosts) != num_machines:
        raise RuntimeError(f"{nodelist_key}={env[nodelist_key]!r} names {len(hosts)} hosts but "
                           f"{nodes_key}={num_machines}")
    port = _int_var(env, "REMEANFLOW_MAIN_PORT") if env.get("REMEANFLOW_MAIN_PORT") else (
        PORT_BASE + values["SLURM_JOB_ID"] % PORT_SPAN)
    return Machines(num_machines, values["SLURM_PROCID"], hosts[0], port)


def machines_from_env(env=None) -> Machines:
    """This machine's place from explicit settings, for runs outside Slurm (every machine gets the
    same REMEANFLOW_NUM_MACHINES, MAIN_ADDRESS and MAIN_PORT, and its own MACHINE_RANK)."""
    env = os.environ if env is None else env
    missing = [key for key in ENV_KEYS if not env.get(key)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: a run over several machines outside Slurm needs all of "
                           f"{', '.join(ENV_KEYS)}")
    num, rank, address, port = ENV_KEYS
    return Machines(_int_var(env, num), _int_var(env, rank), env[address], _int_var(env, port))


def this_machine(env=None) -> Machines:
    """Inside a Slurm step (SLURM_PROCID set) from Slurm, otherwise from REMEANFLOW_* variables."""
    env = os.environ if env is None else env
    return machines_from_slurm(env) if env.get("SLURM_PROCID") else machines_from_env(env)


def _int_var(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"{key}={env[key]!r} is not an integer") from None


def gpu_resources(nodes: int, gpus_per_node: int) -> dict:
    """The GPU request of a job's Snakemake resources (rules/training.smk). With several nodes the
    GPUs of each node go in `gres`, which Slurm reads per node (sbatch --gres=gpu:N --nodes=M):
    the Slurm plugin passes `gpu` as the job's total (sbatch --gpus=N), and its job step would ask
    for all of them on the first node."""
    if nodes == 1 or gpus_per_node == 0:
        return {"gpu": gpus_per_node}
    return {"gpu": 0, "gres": f"gpu:{gpus_per_node}"}


def under_slurm(env=None) -> bool:
    return bool((os.environ if env is None else env).get("SLURM_JOB_ID"))


def srun_command(nodes: int, threads: int) -> tuple[list[str], dict]:
    """`srun` of one task per node inside the running Slurm job.

    `--overlap` because Snakemake's own job step (which runs this rule) already holds the CPUs
    and GPUs of the first node; the launched step shares them, and by default it gets all GPUs
    of the job on every node. The step-level SLURM_* variables of Snakemake's step are dropped:
    srun reads several of them (SLURM_NTASKS, SLURM_CPUS_PER_TASK, ...) as defaults for the new step.
    """
    cmd = ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
           f"--cpus-per-task={threads}", "--kill-on-bad-exit=1", "--label"]
    keep = {"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_CONF"}
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("SLURM_", "SRUN_", "SBATCH_")) and k not in keep)}
    return cmd, env


def launch_module(module: str, spec: dict, processes: int, log_file=None) -> None:
    """Run `python -m <module> <spec.json>` in `processes` ranks; raise if any rank fails.
    The ranks' output is appended to `log_file` and its `history_path` when given (the rule's log)."""
    if processes < 2:
        raise ValueError(f"launch_module is for several processes, got processes={processes}")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd, env = accelerate_command(processes)
    try:
        _run_logged([*cmd, "-m", module, f.name], env, log_file)
    finally:
        os.unlink(f.name)


def launch_nodes(module: str, spec: dict, *, nodes: int, processes_per_node: int, threads: int, spec_dir,
                 log_file=None) -> None:
    """Run `python -m <module> <spec.json>` in `processes_per_node` ranks on each of `nodes` nodes
    of the running Slurm job: one `srun` task per node, each an `accelerate launch` of its ranks
    (`node_main`). The spec is written to `spec_dir`, which every node must see (the shared
    file system the outputs go to, not /tmp)."""
    if not under_slurm():
        raise RuntimeError(f"launch_nodes needs a Slurm job (SLURM_JOB_ID unset) for {nodes} node(s); outside "
                           f"Slurm start `python -m remeanflow.launch` on every machine with {', '.join(ENV_KEYS)}")
    Path(spec_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=spec_dir, prefix=".spec-", delete=False) as f:
        json.dump(spec, f)
    srun, env = srun_command(nodes, threads)
    node = [sys.executable, "-m", "remeanflow.launch", "--processes-per-node", str(processes_per_node), "--",
            "-m", module, f.name]
    log.info("starting %d node(s) x %d process(es): %s", nodes, processes_per_node, shlex.join([*srun, *node]))
    try:
        _run_logged([*srun, *node], env, log_file)
    finally:
        os.unlink(f.name)


def _run_logged(cmd: list[str], env: dict, log_file) -> None:
    if log_file is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with open(log_file, "a") as log_out, open(history_path(log_file), "a") as history:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            for out in (log_out, history):
                out.write(line)
                out.flush()
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)


def node_main(argv: list[str] | None = None) -> int:
    """One node of a run over several machines: `accelerate launch` of this node's ranks of
    `target` (`-m module args...` or `script args...`), its place taken from `this_machine`."""
    ap = argparse.ArgumentParser(prog="python -m remeanflow.launch", description=node_main.__doc__)
    ap.add_argument("--processes-per-node", type=int, required=True)
    ap.add_argument("target", nargs=argparse.REMAINDER, help="-- -m <module> <args> | -- <script> <args>")
    args = ap.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target or args.processes_per_node < 1:
        ap.error("give --processes-per-node >= 1 and a target after --")
    try:
        machines = this_machine()
    except (RuntimeError, ValueError) as e:
        print(f"remeanflow.launch: {e}", file=sys.stderr)
        return 2
    cmd, env = accelerate_command(args.processes_per_node * machines.num_machines, machines)
    print(f"remeanflow.launch: machine {machines.machine_rank} of {machines.num_machines}, "
          f"{args.processes_per_node} process(es) here, main process at {machines.main_address}:{machines.main_port}",
          flush=True)
    return subprocess.run([*cmd, *target], env=env).returncode


def read_spec(argv: list[str]) -> dict:
    """The spec of a launched rank (`python -m <module> <spec.json>`). Every rank starts here,
    not in `workflow.step`, so the per-process CUDA setup (`gpus.configure_cuda`) is applied here."""
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m <module> <spec.json> (got {argv[1:]})")
    if torch.cuda.is_available():
        gpus.configure_cuda("cuda")
    with open(argv[1]) as f:
        return json.load(f)


def end_rank() -> None:
    """The end of a launched rank, after its entry point wrote the final outputs and met the other
    ranks in a barrier: destroy the process group, once. Not earlier (accelerate's
    `end_training()` does it when the trackers close, before the outputs, and the last barrier
    then fails), and not left to interpreter exit (NCCL warns of leaked resources there)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(node_main())
