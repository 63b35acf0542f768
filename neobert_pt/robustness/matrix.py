"""The Dion2 robustness matrix: stages A–E, variants, profiles, and the plan of runs they expand to.

The matrix is data: :func:`plan_runs` turns a :class:`Profile` plus the user's selection (stages, variants, seeds)
into a list of :class:`RunSpec`, each one a concrete command with its own output directory. The runner executes the
plan; the gate evaluator reads the recorded metrics of the same plan. Nothing here launches anything.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("A", "B", "C", "D", "E")
VARIANTS = ("adamw", "muonclip", "dion2", "dion2_qk")

STAGE_PURPOSE = {
    "A": "smoke correctness (1 device)",
    "B": "distributed startup/step (2-process DDP)",
    "C": "FSDP2 1-D mesh compatibility",
    "D": "convergence + stability (1 device, 3 seeds)",
    "E": "resume integrity (1 device and FSDP2)",
}
STAGE_VARIANTS = {
    "A": VARIANTS,
    "B": VARIANTS,
    "C": ("adamw", "dion2", "dion2_qk"),
    "D": VARIANTS,
    "E": ("dion2", "dion2_qk"),
}


@dataclass(frozen=True)
class Profile:
    """Step budgets, configs and launch settings of one way to run the matrix."""

    name: str
    steps: dict[str, int]  # stage -> optimizer steps (E: the uninterrupted length; it resumes from resume_step)
    resume_step: int  # E: checkpoint step the resumed run starts from
    seeds_d: tuple[int, ...]  # stage D seeds
    seed_single: int  # seed of stages A, B, C, E
    configs: dict[str, str]  # variant -> YAML config (dion2_qk reuses dion2's with clipping overrides)
    ddp_accelerate_config: str
    fsdp2_accelerate_config: str
    logging_steps: int
    eval_steps: int
    extra_overrides: tuple[str, ...] = ()
    warmup_fraction_for_throughput: float = 0.2  # skip this share of logged steps before averaging tokens/s


_PAPER_CONFIGS = {
    "adamw": "configs/pretraining/pretrain_neobert100m_smollm2data.yaml",
    "muonclip": "configs/pretraining/pretrain_neobert100m_smollm2data_muonclip.yaml",
    "dion2": "configs/pretraining/pretrain_neobert100m_smollm2data_dion2.yaml",
}
_CPU_CONFIGS = {
    "adamw": "configs/pretraining/robustness_cpu/adamw.yaml",
    "muonclip": "configs/pretraining/robustness_cpu/muonclip.yaml",
    "dion2": "configs/pretraining/robustness_cpu/dion2.yaml",
}

PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        steps={"A": 200, "B": 200, "C": 200, "D": 10_000, "E": 4_000},
        resume_step=2_000,
        seeds_d=(42, 1337, 3407),
        seed_single=42,
        configs=_PAPER_CONFIGS,
        ddp_accelerate_config="configs/accelerate/ddp_2gpu.yaml",
        fsdp2_accelerate_config="configs/accelerate/fsdp2_1d_2gpu.yaml",
        logging_steps=25,
        eval_steps=1_000,
    ),
    "cpu": Profile(
        name="cpu",
        steps={"A": 20, "B": 20, "C": 20, "D": 150, "E": 40},
        resume_step=20,
        seeds_d=(42, 1337, 3407),
        seed_single=42,
        configs=_CPU_CONFIGS,
        ddp_accelerate_config="configs/accelerate/ddp_cpu_2proc.yaml",
        fsdp2_accelerate_config="configs/accelerate/fsdp2_cpu_2proc.yaml",
        logging_steps=1,
        eval_steps=50,
    ),
}

# The variant's optimizer block comes from its config file; dion2_qk only switches clipping on.
_VARIANT_OVERRIDES = {
    "adamw": (),
    "muonclip": (),
    "dion2": ("--optimizer.dion2_config.enable_clipping", "false"),
    "dion2_qk": ("--optimizer.dion2_config.enable_clipping", "true"),
}


@dataclass
class Selection:
    """What the user asked for (env knobs of the shell runner end up here)."""

    stages: tuple[str, ...] = STAGES
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] | None = None  # overrides the profile's stage-D seeds
    steps: dict[str, int] = field(default_factory=dict)  # per-stage step overrides
    run_fsdp2: bool = True  # stages C and the FSDP2 half of E
    fsdp2_config: str | None = None  # overrides the profile's FSDP2 accelerate config
    num_processes: int = 2
    python_bin: str = "python"
    accelerate_bin: str = "accelerate"
    extra_overrides: tuple[str, ...] = ()  # appended to every run (e.g. W&B settings)


@dataclass
class RunSpec:
    """One training run of the matrix."""

    stage: str
    variant: str
    seed: int
    mode: str  # "single" | "ddp" | "fsdp2"
    steps: int
    output_dir: Path
    config: str
    overrides: list[str]
    command: list[str]
    role: str = "train"  # "train" | "reference" (E, uninterrupted) | "resumed" (E, restarted from a checkpoint)
    resume_from: Path | None = None  # E resumed runs: the reference run's checkpoint directory
    reference: str | None = None  # E resumed runs: name of the reference run

    @property
    def name(self) -> str:
        return self.output_dir.name

    @property
    def shell_command(self) -> str:
        return shlex.join(self.command)


def _launcher(mode: str, profile: Profile, sel: Selection) -> list[str]:
    if mode == "single":
        return [sel.python_bin]
    config = profile.ddp_accelerate_config if mode == "ddp" else (sel.fsdp2_config or profile.fsdp2_accelerate_config)
    return [sel.accelerate_bin, "launch", "--config_file", config, "--num_processes", str(sel.num_processes)]


def plan_runs(profile: Profile, sel: Selection, output_root: Path) -> list[RunSpec]:
    """Expand the selection into concrete runs, in execution order (E's reference before its resumed run)."""
    unknown = [s for s in sel.stages if s not in STAGES] + [v for v in sel.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown stage/variant {unknown}; stages {STAGES}, variants {VARIANTS}")
    runs: list[RunSpec] = []

    def add(stage: str, variant: str, seed: int, mode: str, steps: int, role: str = "train", **kw) -> RunSpec:
        suffix = {"train": "", "reference": "-reference", "resumed": "-resumed"}[role]
        out = output_root / f"stage{stage}" / f"{mode}-{variant}-seed{seed}-steps{steps}{suffix}"
        config = profile.configs["dion2" if variant == "dion2_qk" else variant]
        overrides = [
            *_VARIANT_OVERRIDES[variant],
            "--seed", str(seed),
            "--trainer.max_steps", str(steps),
            "--trainer.output_dir", str(out),
            "--trainer.logging_steps", str(profile.logging_steps),
            "--trainer.eval_steps", str(profile.eval_steps),
            "--trainer.save_steps", str(profile.resume_step if stage == "E" else steps),
            "--trainer.save_total_limit", "null",
            "--wandb.name", out.name,
            *profile.extra_overrides,
            *sel.extra_overrides,
        ]
        if role == "resumed":
            overrides += ["--trainer.resume_from_checkpoint", str(kw["resume_from"])]
        command = [*_launcher(mode, profile, sel), "scripts/pretraining/pretrain.py", config, *overrides]
        spec = RunSpec(stage, variant, seed, mode, steps, out, config, overrides, command, role, **kw)
        runs.append(spec)
        return spec

    steps = {**profile.steps, **sel.steps}
    for stage in sel.stages:
        variants = [v for v in STAGE_VARIANTS[stage] if v in sel.variants]
        if stage in ("C",) and not sel.run_fsdp2:
            continue
        for variant in variants:
            if stage == "A":
                add("A", variant, profile.seed_single, "single", steps["A"])
            elif stage == "B":
                add("B", variant, profile.seed_single, "ddp", steps["B"])
            elif stage == "C":
                add("C", variant, profile.seed_single, "fsdp2", steps["C"])
            elif stage == "D":
                for seed in sel.seeds or profile.seeds_d:
                    add("D", variant, seed, "single", steps["D"])
            elif stage == "E":
                for mode in ("single", "fsdp2") if sel.run_fsdp2 else ("single",):
                    ref = add("E", variant, profile.seed_single, mode, steps["E"], role="reference")
                    ckpt = ref.output_dir / "checkpoints" / f"step_{profile.resume_step}"
                    add("E", variant, profile.seed_single, mode, steps["E"], role="resumed",
                        resume_from=ckpt, reference=ref.name)
    return runs
