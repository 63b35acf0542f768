"""The Dion2 robustness matrix (stages A–E): plan, run, evaluate gates, report. Entry: ``python -m neobert_pt.robustness``."""
