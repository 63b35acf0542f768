"""jobs/slurm_pretrain.sbatch passes every argument through unchanged (quoted), run with stub srun/scontrol/python."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_arguments_with_spaces_and_quotes_reach_pretrain_unchanged(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    stubs = {
        "srun": '#!/usr/bin/env bash\nshift\nexec "$@"\n',  # drop --kill-on-bad-exit, run the task command
        "scontrol": "#!/usr/bin/env bash\necho node-a\n",
        "python": f'#!/usr/bin/env bash\nif [ "$2" = accelerate.commands.launch ]; then '
                  f'printf "%s\\n" "$@" > {record}; fi\n',
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-a",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "1", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(REPO),
           "PYTHON": str(bin_dir / "python"), "SHARED_RUN_DIR": str(tmp_path / "shared dir"),
           "LOCAL_RUN_DIR": str(tmp_path / "local dir"), "SYNC_INTERVAL": "1"}
    (tmp_path / "local dir").mkdir()  # the real restore/trainer create it
    tricky = ["--wandb.name", "it's a \"test\" $HOME; rm -rf /", "--optimizer.betas", "[0.9, 0.95]"]
    proc = subprocess.run(["bash", str(REPO / "jobs" / "slurm_pretrain.sbatch"), "configs/my config.yaml", *tricky],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    i = argv.index("scripts/pretraining/pretrain.py")
    assert argv[i + 1:] == ["configs/my config.yaml", "--trainer.output_dir", str(tmp_path / "local dir"),
                            "--trainer.resume_from_checkpoint", "latest", *tricky]
