"""Submit the recipes with NeMo-Run: to Slurm (``run.SlurmExecutor``, in a container) or locally
(``run.LocalExecutor``, torchrun over the local GPUs). ``scripts/launch.py`` is the command line.

    python scripts/launch.py slurm --stage 1 --config conf/llava15_7b_stage1.yaml \\
        --nodes 2 --gpus-per-node 8 --account ACCT --partition batch --time 04:00:00 \\
        --container nvcr.io/nvidia/nemo:25.11 --mount /lustre/models:/models --mount /lustre/data:/data \\
        --results /lustre/results --dry-run \\
        model.llm_path=/models/vicuna-7b-v1.5 data.path=/data/llava_stage1_shards

The configuration (with the overrides) is validated here, before anything is queued, for the
machine it targets (``--gpus-per-node`` GPUs per node); the job gets ``trainer.devices`` and
``trainer.num_nodes`` from the executor. ``--dry-run`` prints the generated job script (the sbatch
file, materialised offline by NeMo-Run's own Slurm scheduler) and submits nothing. Each Slurm task
is one GPU (``--ntasks-per-node`` = GPUs per node); Lightning reads Slurm's environment. Jobs are
requeued on failure (``--retries``) and the recipe resumes from its newest complete checkpoint; a
preempted job (SIGTERM / SIGUSR1) saves at the next step and exits 143, which requeues it too.

Overrides after the options apply to every stage; ``--stage1 key=value ...`` / ``--stage2 key=value ...``
(or ``stage1.key=value``) to one. ``--stage both`` refuses one ``data.path`` for both stages (stage 1
trains on captions, stage 2 on instructions). The job scripts set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` and
NCCL error handling / timeouts (`JOB_ENV`); ``--env`` overrides them.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import sys
import tempfile
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_IMAGE = "nvcr.io/nvidia/nemo:25.11"
CONTAINER_REPO = "/opt/nemo_basic"      # where the Dockerfile installs the package
CONTAINER_RESULTS = "/results"          # where --results is mounted; NEMO_BASIC_RUNS points there
SCRIPTS = {1: "examples/basic_pretrain.py", 2: "examples/basic_finetune.py"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Launch BASIC stage 1 / stage 2 with NeMo-Run (Slurm or local).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("executor", choices=("slurm", "local"))
    p.add_argument("--stage", choices=("1", "2", "both"), required=True,
                   help="1: examples/basic_pretrain.py, 2: examples/basic_finetune.py, both: 1 then 2 "
                        "(stage 2 starts when stage 1 succeeded)")
    p.add_argument("--config", required=True, help="recipe YAML for stage 1 (or 2); with --stage both, the "
                   "stage-1 YAML, and --config2 the stage-2 one")
    p.add_argument("--config2", default=None, help="stage-2 YAML for --stage both (default: the stage-1 name "
                   "with stage1 -> stage2)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", default="04:00:00", help="Slurm time limit per job (requeued jobs resume)")
    p.add_argument("--container", default=DEFAULT_IMAGE, help="container image (build ours from the Dockerfile, "
                   f"or the NGC one with the package mounted; default {DEFAULT_IMAGE})")
    p.add_argument("--mount", action="append", default=[], metavar="HOST:CONTAINER",
                   help="container mount (repeatable): models, data")
    p.add_argument("--results", default=None, help=f"host folder for runs (mounted at {CONTAINER_RESULTS}; "
                   "checkpoints, TensorBoard logs, metrics)")
    p.add_argument("--repo", default=CONTAINER_REPO, help=f"nemo_basic inside the container (default {CONTAINER_REPO}: "
                   "where the Dockerfile installs it)")
    p.add_argument("--code-mount", default=None, metavar="HOST_DIR",
                   help="mount this host checkout of nemo_basic at --repo (to run the stock NGC image without "
                        "building ours; PYTHONPATH points there)")
    p.add_argument("--retries", type=int, default=3, help="requeues after a failure or preemption")
    p.add_argument("--job-dir", default=None, help="where NeMo-Run keeps the job files (default: $NEMORUN_HOME "
                   "or ~/.nemo_run); with Slurm, a folder shared with the cluster")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job")
    p.add_argument("--dry-run", action="store_true", help="print the job script(s) and submit nothing")
    for s in (1, 2):
        p.add_argument(f"--stage{s}", action="extend", nargs="+", default=[], metavar="key=value",
                       help=f"recipe overrides of stage {s} only (or stage{s}.key=value among the overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides of every stage (as for "
                   "examples/)")
    return p


# What NVIDIA documents for Megatron jobs with tensor / sequence parallelism: one hardware queue so that
# communication kernels are scheduled in issue order (TP/SP overlap), and NCCL errors and hangs that end
# the job (then requeued, and resumed from its checkpoint) instead of blocking it until its time limit.
JOB_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "1800",
    "NCCL_IB_TIMEOUT": "22",
}


def stage_overrides(a) -> dict:
    """{stage: overrides}: the shared ones, then ``--stageN`` ones and ``stageN.``-prefixed ones."""
    shared, per = [], {1: list(a.stage1), 2: list(a.stage2)}
    for o in a.overrides:
        head, dot, rest = o.partition(".")
        if dot and head in ("stage1", "stage2"):
            per[int(head[-1])].append(rest)
        else:
            shared.append(o)
    for s, items in per.items():
        for o in items:
            if "=" not in o:
                raise SystemExit(f"error: --stage{s} {o!r}: overrides are key=value")
    if a.stage == "both":
        if any(o.split("=", 1)[0].strip() == "data.path" for o in shared):
            raise SystemExit("error: data.path is given once for --stage both: stage 1 trains on captions and "
                             "stage 2 on instructions, so give each its own: --stage1 data.path=... "
                             "--stage2 data.path=...")
    elif per[3 - int(a.stage)]:
        raise SystemExit(f"error: --stage{3 - int(a.stage)} overrides given, but only stage {a.stage} is launched")
    return {s: shared + per[s] for s in (1, 2)}


def _stage2_config(path: str) -> str:
    base = os.path.basename(path)
    if "stage1" not in base:
        raise SystemExit(f"error: --stage both needs --config2 (cannot derive it from {path})")
    return os.path.join(os.path.dirname(path), base.replace("stage1", "stage2"))


def validate(stage: int, config: str, overrides: Sequence[str], nodes: int, gpus_per_node: int):
    """Load and check the recipe as it will run (devices and nodes from the executor); returns it."""
    from nemo_basic.recipes import train
    from nemo_basic.recipes.schema import load_config

    cfg = load_config(config, list(overrides), stage=stage)
    cfg.trainer.devices, cfg.trainer.num_nodes = gpus_per_node, nodes
    if cfg.trainer.accelerator == "auto":
        cfg.trainer.accelerator = "gpu"
    runtime = train.preflight(cfg, require_files=False, assume_target=True)
    if runtime.blockers:
        raise SystemExit("error: " + "; ".join(runtime.blockers))
    return cfg


def _relative_config(config: str) -> str:
    """The config path as the job sees it: conf/ is shipped into the job's working directory."""
    path = os.path.abspath(config)
    conf = os.path.join(REPO, "conf")
    if os.path.dirname(path) != conf:
        raise SystemExit(f"error: {config}: configs to launch must live in {conf} (it is shipped with the job)")
    return os.path.join("conf", os.path.basename(path))


def task_args(config: str, overrides: Sequence[str], nodes: int, gpus_per_node: int,
              results: Optional[str]) -> List[str]:
    args = ["--config", config, f"trainer.devices={gpus_per_node}", f"trainer.num_nodes={nodes}",
            "trainer.accelerator=gpu", "trainer.progress_bar=false"]
    if results:
        args.append(f"run.log_dir={CONTAINER_RESULTS}")
    return args + list(overrides)


def build(a) -> tuple:
    """(executor, [(name, task)]) for the arguments."""
    import nemo_run as run

    stages = [1, 2] if a.stage == "both" else [int(a.stage)]
    configs = {stages[0]: a.config}
    if a.stage == "both":
        configs[2] = a.config2 or _stage2_config(a.config)
    overrides = stage_overrides(a)
    cfgs = {s: validate(s, configs[s], overrides[s], a.nodes, a.gpus_per_node) for s in stages}
    if a.stage == "both":
        p1, p2 = ({os.path.abspath(p) if "://" not in p else p for p in cfgs[s].data.path} for s in (1, 2))
        if p1 & p2:
            raise SystemExit(f"error: stage 1 and stage 2 would train on the same data ({sorted(p1 & p2)}):"
                             " give each stage its own data.path (--stage1 data.path=... --stage2 data.path=...)")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NEMO_BASIC_RUNS": CONTAINER_RESULTS if a.results else "runs", "PYTHONPATH": a.repo, **JOB_ENV}
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k] = v
    tasks = []
    if a.executor == "slurm":
        if not a.account:
            raise SystemExit("error: slurm needs --account")
        mounts = list(a.mount) + ([f"{os.path.abspath(a.results)}:{CONTAINER_RESULTS}"] if a.results else [])
        if a.code_mount:
            mounts.append(f"{os.path.abspath(a.code_mount)}:{a.repo}")
        job_dir = a.job_dir or os.path.join(os.environ.get("NEMORUN_HOME", os.path.expanduser("~/.nemo_run")), "jobs")
        executor = run.SlurmExecutor(
            account=a.account, partition=a.partition, nodes=a.nodes, ntasks_per_node=a.gpus_per_node,
            gpus_per_node=a.gpus_per_node, time=a.time, container_image=a.container, container_mounts=mounts,
            job_name_prefix="basic-", exclusive=True, env_vars=env, retries=a.retries,
            tunnel=run.LocalTunnel(job_dir=job_dir),
            # ship conf/ (the YAMLs, perhaps edited locally) into the job's working directory
            packager=run.PatternPackager(include_pattern=os.path.join(REPO, "conf", "*.yaml"), relative_path=REPO))
        for s in stages:
            tasks.append((f"stage{s}", run.Script(
                path=f"{a.repo}/{SCRIPTS[s]}", entrypoint="python",
                args=task_args(_relative_config(configs[s]), overrides[s], a.nodes, a.gpus_per_node, a.results))))
    else:
        env["PYTHONPATH"] = REPO
        executor = run.LocalExecutor(ntasks_per_node=a.gpus_per_node, launcher="torchrun" if a.gpus_per_node > 1
                                     else None, env_vars=env)
        for s in stages:
            tasks.append((f"stage{s}", run.Script(
                path=os.path.join(REPO, SCRIPTS[s]), entrypoint="python",
                args=task_args(os.path.abspath(configs[s]), overrides[s], a.nodes, a.gpus_per_node, a.results))))
    return executor, tasks


def dry_run(executor, tasks, name: str, job_dir: Optional[str] = None) -> str:
    """The job script(s), materialised by NeMo-Run without submitting anything, in a folder that is
    kept (under ``job_dir``/dry-runs, or a temporary one), so that the paths the script names exist."""
    import nemo_run as run

    root = os.path.join(job_dir, "dry-runs") if job_dir else None
    if root:
        os.makedirs(root, exist_ok=True)
    home = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    stdin = sys.stdin
    sys.stdin = open(os.devnull)  # NeMo-Run's packaging shell (invoke) must not wait on the terminal
    try:
        if isinstance(executor, run.SlurmExecutor):
            executor.tunnel = run.LocalTunnel(job_dir=os.path.join(home, "jobs"))
        with run.Experiment(name, executor=executor, log_level="ERROR", base_dir=home) as exp:
            for i, (task_name, task) in enumerate(tasks):
                exp.add(task, name=task_name)
            exp.dryrun(log=False, delete_exp_dir=False)
        out = [f"# dry run: nothing submitted; the job files are in {home}"]
        if len(tasks) > 1 and isinstance(executor, run.SlurmExecutor):
            out.append("# the jobs are submitted in order, each with --dependency=afterok:<previous job id>")
        scripts = sorted(glob.glob(os.path.join(home, "**", "*_sbatch.sh"), recursive=True))
        for path in scripts:
            with open(path) as f:
                text = f.read()
            for log in re.findall(r"--output (\S+)", text):  # the log folders a submission would create
                os.makedirs(os.path.dirname(log), exist_ok=True)
            out.append(f"# ---- {os.path.basename(path)} ----\n{text}")
        if not scripts:  # local executor: the commands
            for task_name, task in tasks:
                launcher = (f"torchrun --nproc-per-node {executor.ntasks_per_node} "
                            if getattr(executor, "launcher", None) else "")
                env = " ".join(f"{k}={shlex.quote(v)}" for k, v in executor.env_vars.items())
                out.append(f"# ---- {task_name} ----\n{env} {launcher}{task.entrypoint} {task.path} "
                           + " ".join(shlex.quote(x) for x in task.args))
        return "\n".join(out)
    finally:
        sys.stdin.close()
        sys.stdin = stdin


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parser().parse_intermixed_args(argv)
    from nemo_basic.recipes.schema import RecipeConfigError

    try:
        executor, tasks = build(a)
    except RecipeConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import nemo_run as run

    name = "basic-" + os.path.splitext(os.path.basename(a.config))[0]
    if a.dry_run:
        print(dry_run(executor, tasks, name, a.job_dir))
        return 0
    with run.Experiment(name, executor=executor) as exp:
        for task_name, task in tasks:
            exp.add(task, name=task_name)
        exp.run(sequential=True, detach=a.executor == "slurm", tail_logs=a.executor == "local")
    return 0
