"""Pretrain a NeoBERT encoder: resolve the config (YAML + dotted overrides), then build the Trainer and fit.

    # single process (CPU or one GPU), the embedded default corpus
    python scripts/pretraining/pretrain.py configs/pretraining/pretrain_tiny.yaml --trainer.max_steps 50

    # 2-process DDP; every key is overridable, values parse as YAML
    accelerate launch --num_processes 2 scripts/pretraining/pretrain.py \\
        configs/pretraining/pretrain_neobert100m_smollm2data_dion2.yaml \\
        --trainer.max_steps 200 --optimizer.dion2_config.enable_clipping true --seed 42

    # FSDP2 (1-D mesh)
    accelerate launch --config_file configs/accelerate/fsdp2_1d.yaml scripts/pretraining/pretrain.py \\
        configs/pretraining/pretrain_neobert100m_smollm2data.yaml

    # inspect without training
    python scripts/pretraining/pretrain.py --help
    python scripts/pretraining/pretrain.py CONFIG --trainer.resume_from_checkpoint latest --print-config
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from neobert_pt.cli import run_cli  # noqa: E402
from neobert_pt.config.cli import parse_args  # noqa: E402


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv, prog="pretrain.py")
    # Imported after parsing so --help and --print-config stay fast and work without the training stack.
    from neobert_pt.train import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.exit_code


def main(argv: list[str] | None = None) -> int:
    """User errors (config, data, checkpoint, output dir) end with one line on stderr and exit 2; ``--debug`` or
    NEOBERT_DEBUG=1 shows the traceback. A SIGTERM/SIGINT-triggered save exits 75 (neobert_pt/cli.py)."""
    return run_cli(_main, argv, prog="pretrain.py")


if __name__ == "__main__":
    sys.exit(main())
