"""launch/single_node.sh (the deepspeed launcher) and launch/mpirun_train.sh (Open MPI, mpi4py-style
discovery) each run `megaflamingo-train` with 2 ranks on CPU; both must train the same steps to
the same losses (the launcher decides who is rank 0, never the numbers). Plus the pure helpers
of megaflamingo.engine.slurm and the scripts' argument checks."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.launch.launch_util import REPO, free_port, job_env, read_steps

STEPS = 3
OVERRIDES = [f"train.max_steps={STEPS}", "train.save_steps=1000", "train.eval_steps=1000", "train.progress_bar=false",
             "train.dist_timeout_s=120"]


def _run(cmd, env, timeout=300):
    # Own session: on a timeout the launcher and every rank are killed together, never orphaned.
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{cmd[0]}: no exit within {timeout} s\n{out[-4000:]}")
    return p.returncode, out


@pytest.fixture(scope="module")
def launcher_runs(tiny_data, tmp_path_factory):
    """Each launcher's run of configs/tiny_cpu.yaml: name -> (exit code, output, steps logged)."""
    tmp = tmp_path_factory.mktemp("launchers")
    runs = {}
    if shutil.which("deepspeed", path=job_env()["PATH"]):
        env = job_env(MF_DATA_ROOT=str(tiny_data), MF_RUN_DIR=str(tmp / "deepspeed"), NUM_GPUS="2",
                      MASTER_PORT=str(free_port()))
        rc, out = _run(["bash", "launch/single_node.sh", "configs/tiny_cpu.yaml", *OVERRIDES], env)
        runs["deepspeed"] = (rc, out, read_steps(tmp / "deepspeed"))
    if shutil.which("mpirun"):
        env = job_env(MF_DATA_ROOT=str(tiny_data), MF_RUN_DIR=str(tmp / "mpirun"), NP="2",
                      MASTER_PORT=str(free_port()),
                      # root in CI containers; 2 ranks may exceed the slots Open MPI counts on 2 cores
                      MPIRUN_ARGS="--allow-run-as-root --oversubscribe")
        rc, out = _run(["bash", "launch/mpirun_train.sh", "configs/tiny_cpu.yaml", *OVERRIDES], env)
        runs["mpirun"] = (rc, out, read_steps(tmp / "mpirun"))
    return runs


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher,world_line",
                         [("deepspeed", "world size 2 (torch)"), ("mpirun", "world size 2 (mpi)")])
def test_launcher_trains_two_ranks(launcher_runs, launcher, world_line):
    if launcher not in launcher_runs:
        pytest.skip(f"{launcher} not installed")
    rc, out, steps = launcher_runs[launcher]
    assert rc == 0, out[-4000:]
    assert world_line in out, out[-4000:]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), out[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_launchers_agree_on_losses(launcher_runs):
    if len(launcher_runs) < 2:
        pytest.skip("needs both deepspeed and mpirun")
    losses = {name: [s["loss"] for s in steps] for name, (rc, _, steps) in launcher_runs.items() if rc == 0}
    assert len(losses) == 2, {k: v[1][-2000:] for k, v in launcher_runs.items()}
    # Same world size, same seed, same data shards per rank -> the same arithmetic.
    assert losses["deepspeed"] == pytest.approx(losses["mpirun"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("script", ["single_node.sh", "mpirun_train.sh", "slurm_train.sbatch"])
def test_scripts_parse_and_require_a_config(script, tmp_path):
    path = REPO / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # No config: a usage line and exit 2, before anything is launched (SLURM_JOB_ID for the sbatch one).
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1"), timeout=30)
    assert out.returncode == 2 and "usage" in out.stderr, (out.returncode, out.stderr)


def test_sbatch_script_refuses_to_run_outside_a_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(REPO / "launch/slurm_train.sbatch"), "configs/tiny_cpu.yaml"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30)
    assert out.returncode == 2 and "submit it with sbatch" in out.stderr, (out.returncode, out.stderr)


def test_sbatch_header_asks_for_signal_before_time_limit_and_requeue():
    text = (REPO / "launch/slurm_train.sbatch").read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    opts = {line.split()[1].split("=")[0]: line.split()[1] for line in header}
    assert opts["--signal"].startswith("--signal=B:USR1@")  # to the batch shell, which forwards to srun
    assert int(opts["--signal"].rsplit("@", 1)[1]) >= 120
    assert "--requeue" in opts and opts["--open-mode"] == "--open-mode=append"


def test_expand_hostlist():
    from megaflamingo.engine.slurm import expand_hostlist, master_port

    assert expand_hostlist("node[1-3]") == ["node1", "node2", "node3"]
    assert expand_hostlist("gpu[08-10,12],login1") == ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]
    assert expand_hostlist("r[1-2]-n[01-02]") == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
    assert expand_hostlist("a,b") == ["a", "b"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_hostlist("node[1-3")
    with pytest.raises(ValueError, match="bad range"):
        expand_hostlist("node[a-b]")
    assert master_port("12345") == 20000 + 12345 % 20000
    assert master_port(None) == 29500


@pytest.mark.distributed
def test_mpirun_multi_node_discovery_broadcasts_rank0_host(tmp_path):
    """Across nodes (local size < world size) rank 0's host name travels over MPI (mpi4py).
    One host here, so the ranks pretend to be on different nodes (OMPI_COMM_WORLD_LOCAL_SIZE=1)."""
    pytest.importorskip("mpi4py")
    if not shutil.which("mpirun"):
        pytest.skip("Open MPI not installed")
    # Each rank writes its own file: mpirun's merged stdout may interleave the ranks' lines.
    code = ("import os, socket, sys; os.environ['OMPI_COMM_WORLD_LOCAL_SIZE'] = '1'\n"
            "from megaflamingo.engine.distributed import discover_env\n"
            "w = discover_env()\n"
            "line = f'RESULT {w.launcher} {w.rank} {w.world_size} '"
            " + str(os.environ['MASTER_ADDR'] == socket.gethostname())\n"
            "open(os.path.join(sys.argv[1], f'rank{w.rank}.txt'), 'w').write(line)")
    rc, out = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c", code,
                    str(tmp_path)], job_env(), timeout=120)
    assert rc == 0, out[-3000:]
    results = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert results == ["RESULT mpi 0 2 True", "RESULT mpi 1 2 True"], out[-3000:]


def test_mpirun_forwards_every_variable_the_stage_configs_use(tmp_path):
    """Ranks on other hosts get no environment of their own: the script must -x every ${NAME} a config
    refers to. Checked against what the shipped configs actually use, with a stand-in mpirun."""
    import re

    fake = tmp_path / "bin" / "mpirun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    for config in sorted((REPO / "configs").glob("*.yaml")):
        used = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config.read_text())))
        env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", NP="2",
                   **{name: f"/x/{name}" for name in used}, HF_HUB_OFFLINE="1", NCCL_IB_HCA="mlx5")
        out = subprocess.run(["bash", "launch/mpirun_train.sh", str(config)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        argv = out.stdout.splitlines()
        forwarded = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
        assert set(used) | {"HF_HUB_OFFLINE", "NCCL_IB_HCA", "PATH"} <= forwarded, (config.name, used, forwarded)
        assert argv[-3:] == ["megaflamingo-train", "--config", str(config)]
