"""Generate ``optim_differential.safetensors``: upstream ``microsoft/dion`` Muon/Dion2 results for the differential
cases of ``tests/unit/optim/upstream_cases.py`` (issue 14).

Run with upstream's package on the path, eagerly (its functions are ``torch.compile``-decorated; the reference is the
eager arithmetic), on one thread:

    git clone https://github.com/microsoft/dion /tmp/dion            # fixture made from 0a059a4
    PYTHONPATH=/tmp/dion:. python tests/assets/specs/make_optim_differential.py

What is stored per case (``<name>/...``): the final matrix ``w`` in its dtype (fp32 or bf16), the final scalar-group
params, the SHA-256 of the final momentum bytes (momentum is element-wise arithmetic, exact on every CPU) and, for the
small cases that fit the size budget, every orthogonaliser output in call order (``ortho/<i>``, bf16) so a machine whose
bf16 GEMM sums in another order can still check every other part of the step exactly by replaying them. Inputs are
not stored: they are regenerated from each case's seed (numpy legacy RandomState). ``probe/*`` holds upstream's PE5
and NS5 outputs on one fixed 128x256 input: a machine that reproduces them bit for bit has the same bf16 GEMM.
Large matrices (>= 128x256) are stored for a subset of their cases to keep the file small; the live comparison
(upstream importable) runs all cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "unit", "optim"))
import upstream_cases as uc  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optim_differential.safetensors")
BUDGET = 2_950_000  # bytes of tensor data in the file
BIG_KEEP = 8  # large cases stored (the rest run live only)


def probe_input() -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(7).standard_normal((128, 256)).astype(np.float32))


def momentum_digest(t: torch.Tensor) -> torch.Tensor:
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(raw).digest()), dtype=torch.uint8)


def main() -> None:
    torch.set_num_threads(1)
    import dion
    from dion.newton_schulz_triton import zeropower_via_newtonschulz5
    from dion.polar_express import polar_express

    tensors: dict[str, torch.Tensor] = {}
    with torch.compiler.set_stance("force_eager"):
        x = probe_input()
        tensors["probe/polar_express"] = polar_express(x, epsilon=1e-8)
        tensors["probe/newton_schulz"] = zeropower_via_newtonschulz5(x, epsilon=1e-8)
        big_seen = 0
        orthos: list[dict[str, torch.Tensor]] = []  # per stored small case, added while the budget allows
        for case in uc.cases():
            fn = polar_express if case.kwargs["use_polar_express"] else zeropower_via_newtonschulz5
            outs: list[torch.Tensor] = []

            def record(X: torch.Tensor, epsilon=None, fn=fn, outs=outs) -> torch.Tensor:
                out = fn(X, epsilon=epsilon)
                outs.append(out.clone())
                return out

            res = uc.run(case, dion.Dion2, dion.Muon, newton_schulz_func=record)
            big = math.prod(case.shape) >= 128 * 256
            if big:
                big_seen += 1
                if big_seen > BIG_KEEP:
                    continue
            tensors.update({f"{case.name}/{k}": v for k, v in res.items() if k not in ("momentum", "w_nograd")})
            tensors[f"{case.name}/momentum_sha256"] = momentum_digest(res["momentum"])
            if not big:
                orthos.append({f"{case.name}/ortho/{i}": o.contiguous() for i, o in enumerate(outs)})

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    for ortho in orthos:
        if nbytes(tensors.values()) + nbytes(ortho.values()) <= BUDGET:
            tensors.update(ortho)
    with_ortho = sorted({k.split("/")[0] for k in tensors if "/ortho/" in k})
    print(f"orthogonaliser outputs stored for {len(with_ortho)} cases: {', '.join(with_ortho)}")
    meta = {"upstream": "microsoft/dion 0a059a4 (eager)", "torch": torch.__version__,
            "cases": json.dumps([c.name for c in uc.cases() if f"{c.name}/w" in tensors])}
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT, metadata=meta)
    print(f"{OUT}: {os.path.getsize(OUT) / 1e6:.2f} MB, {len(json.loads(meta['cases']))} cases")


if __name__ == "__main__":
    main()
