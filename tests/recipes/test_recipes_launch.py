"""NeMo-Run launcher: the Slurm dry run materialises the sbatch script offline, with the container,
the node and GPU counts and the training command; bad settings stop before anything is queued."""
from __future__ import annotations

import re

import pytest

from nemo_basic.recipes import launch

SLURM_2_NODES = ["slurm", "--stage", "1", "--config", "conf/llava15_7b_stage1.yaml", "--nodes", "2",
                 "--gpus-per-node", "8", "--account", "proj42", "--partition", "batch", "--time", "03:30:00",
                 "--container", "registry.example.com/nemo_basic:25.11", "--mount", "/lustre/models:/models",
                 "--mount", "/lustre/data:/data", "--results", "/lustre/results", "--dry-run",
                 "model.llm_path=/models/vicuna-7b-v1.5", "data.path=/data/llava_stage1_shards"]


def dry_run(argv, capsys, monkeypatch):
    monkeypatch.chdir(launch.REPO)
    assert launch.main(argv) == 0
    return capsys.readouterr().out


def test_slurm_dry_run_two_nodes(capsys, monkeypatch):
    out = dry_run(SLURM_2_NODES, capsys, monkeypatch)
    assert "#SBATCH --nodes=2" in out
    assert "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-node=8" in out
    assert "#SBATCH --account=proj42" in out and "#SBATCH --partition=batch" in out
    assert "#SBATCH --time=03:30:00" in out
    assert "--container-image registry.example.com/nemo_basic:25.11" in out
    mounts = re.search(r"--container-mounts (\S+)", out).group(1).split(",")
    assert {"/lustre/models:/models", "/lustre/data:/data", "/lustre/results:/results"} <= set(mounts)
    (command,) = [line for line in out.splitlines() if line.startswith("srun ") and "--container-image" in line]
    assert "--container-image registry.example.com/nemo_basic:25.11" in command
    assert " python /opt/nemo_basic/examples/basic_pretrain.py --config conf/llava15_7b_stage1.yaml " in command
    for arg in ("trainer.devices=8", "trainer.num_nodes=2", "run.log_dir=/results",
                "model.llm_path=/models/vicuna-7b-v1.5", "data.path=/data/llava_stage1_shards"):
        assert arg in command, arg
    assert "export NEMO_BASIC_RUNS=/results" in out and "export HF_HUB_OFFLINE=1" in out
    assert "TORCHX_MAX_RETRIES=3" in out  # requeued on failure; the recipe resumes from its checkpoint


def test_slurm_dry_run_both_stages(capsys, monkeypatch):
    argv = [a for a in SLURM_2_NODES if a != "data.path=/data/llava_stage1_shards"]
    argv[argv.index("--stage") + 1] = "both"
    argv += ["--stage1", "data.path=/data/llava_stage1_shards", "--stage2", "data.path=/data/llava_stage2_shards"]
    out = dry_run(argv, capsys, monkeypatch)
    assert out.count("#!/bin/bash") == 2 and "--dependency=afterok" in out
    assert "examples/basic_pretrain.py --config conf/llava15_7b_stage1.yaml" in out
    assert "examples/basic_finetune.py --config conf/llava15_7b_stage2.yaml" in out


def test_local_dry_run(capsys, monkeypatch):
    out = dry_run(["local", "--stage", "2", "--config", "conf/llava15_7b_stage2.yaml", "--gpus-per-node", "8",
                   "--dry-run"], capsys, monkeypatch)
    assert "torchrun --nproc-per-node 8" in out and "examples/basic_finetune.py" in out
    assert "trainer.devices=8" in out


@pytest.mark.parametrize("extra,message", [
    (["trainer.max_stepz=3"], "unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)"),
    (["parallel.tensor=3"], "parallel.tensor = 3 is invalid"),
    (["data.micro_batch_size=24"], "data.global_batch_size = 256 is invalid"),
])
def test_launcher_validates_before_submitting(extra, message, capsys, monkeypatch):
    monkeypatch.chdir(launch.REPO)
    assert launch.main(SLURM_2_NODES + extra) == 2
    assert message in capsys.readouterr().err


def _srun_lines(out):
    return [line for line in out.splitlines() if line.startswith("srun ") and "--container-image" in line]


def test_slurm_dry_run_both_stages_with_their_own_overrides(capsys, monkeypatch):
    argv = [a for a in SLURM_2_NODES if a != "data.path=/data/llava_stage1_shards"]
    argv[argv.index("--stage") + 1] = "both"
    argv += ["--stage1", "data.path=/data/llava_stage1_shards", "trainer.max_steps=7",
             "--stage2", "data.path=/data/llava_stage2_shards"]
    out = dry_run(argv, capsys, monkeypatch)
    stage1, stage2 = _srun_lines(out)
    assert "basic_pretrain.py" in stage1 and "basic_finetune.py" in stage2
    assert "data.path=/data/llava_stage1_shards" in stage1 and "llava_stage2_shards" not in stage1
    assert "data.path=/data/llava_stage2_shards" in stage2 and "llava_stage1_shards" not in stage2
    assert "trainer.max_steps=7" in stage1 and "trainer.max_steps=7" not in stage2
    for line in (stage1, stage2):  # the shared override reaches both
        assert "model.llm_path=/models/vicuna-7b-v1.5" in line
    # the environment NVIDIA documents for Megatron TP/SP jobs, in each job script
    assert out.count("export CUDA_DEVICE_MAX_CONNECTIONS=1") == 2
    assert out.count("export TORCH_NCCL_ASYNC_ERROR_HANDLING=1") == 2
    # the --output paths of the dry run lie in a folder that exists afterwards
    folder = re.search(r"# dry run: nothing submitted; the job files are in (\S+)", out).group(1)
    outputs = re.findall(r"--output (\S+)", out)
    assert len(outputs) == 2 and all(o.startswith(folder) for o in outputs)
    import os

    assert all(os.path.isdir(os.path.dirname(o)) for o in outputs), outputs


@pytest.mark.parametrize("extra,message", [
    ([], "data.path is given once for --stage both"),
    (["--stage2", "data.path=/data/llava_stage1_shards"], "stage 1 and stage 2 would train on the same data"),
])
def test_both_stages_refuse_a_shared_data_path(extra, message, capsys, monkeypatch):
    monkeypatch.chdir(launch.REPO)
    argv = [a for a in SLURM_2_NODES]
    argv[argv.index("--stage") + 1] = "both"
    if extra:
        argv = [a for a in argv if a != "data.path=/data/llava_stage1_shards"]
        argv += ["--stage1", "data.path=/data/llava_stage1_shards"] + extra
    with pytest.raises(SystemExit) as e:
        launch.main(argv)
    assert message in str(e.value)
