"""Does the demo's story hold on other kernels and seeds? Runs `demo` once per (instruction set,
seed) and prints its conclusions against their floors.

    python -m llama_caption demo-check                         # native and AVX2 kernels, seeds 0 1 2
    python -m llama_caption demo-check --isas avx2 --seeds 3   # one case

Float results differ between kernel paths (AVX-512 and AVX2 builds of ATen, oneDNN and MKL round
differently), so one seeded demo trains to different figures on two kinds of machine. A machine
with AVX-512 runs the AVX2 paths when told before Python starts (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), which is how one machine checks both. Each case is
a whole demo in ROOT/ISA (stand-ins built under those kernels, as a fresh machine of that kind
would), its own report read back; the kernel path that really ran is the one the report records.

The floors are the demo's claims: SCST at least 10 CIDEr above the projection it started from,
all three attributes right in at least half of the final captions, and the final captions' CIDEr
at least 3x the shuffled control's. Exit status 1 when any case misses one.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from ...config import Config, command, setting
from ...errors import UserError
from ...fileio import check_output_dir, check_output_file, write_json

# The environment that selects each kernel path (set before Python starts; "native": whatever the
# machine has).
ISAS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
FLOORS = {"scst_gain": 10.0, "all_three": 0.5, "control_ratio": 3.0}


@dataclass
class DemoCheckConfig(Config):
    isas: List[str] = setting(("native", "avx2"), "kernel paths to run the demo under: native (this machine's), avx2, default (no vector extensions; slow).")
    seeds: List[int] = setting((0, 1, 2), "demo seeds (--seed of demo) to run under each kernel path.")
    root: str = setting("demo_runs/check", "where each case's demo keeps its stand-ins and runs (ROOT/ISA); a rerun reuses the stand-ins.")
    scale: str = setting("full", "the demo's --scale: full (the README's) or small (a quick try; its floors are not the demo's claims).")
    out: Optional[str] = setting(None, "also write the table as JSON here (default: ROOT/check.json).")

    def check(self) -> None:
        if not self.isas or not self.seeds:
            raise UserError("--isas and --seeds need at least one value each")
        for isa in self.isas:
            if isa not in ISAS:
                raise UserError(f"--isas: {isa!r} is not one of {', '.join(ISAS)}")
        for name in ("isas", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise UserError(f"--{name} lists a value twice: {', '.join(map(str, values))}")
        for seed in self.seeds:  # demo's --seed range (at least 0; whole numbers are below 2^63)
            if seed < 0:
                raise UserError(f"--seeds: {seed} is negative: the demo's --seed is at least 0")
        self.one_of("scale", ("full", "small"))
        check_output_dir(self.root, "--root")  # before minutes of demos, not after
        if self.out:
            check_output_file(self.out, "--out")


def conclusions(report: dict) -> Dict[str, float]:
    """The demo's three claims, measured from its report: SCST's CIDEr gain over the projection it
    started from, all-three accuracy of the final captions, and their CIDEr over the control's."""
    stages = report["stages"]
    start = stages[f"xe-{report['best_projection']}"]
    final = stages.get("scst", start)
    cider = lambda s: s["metrics"]["CIDEr"] * 100  # noqa: E731
    return {"xe": cider(start), "final": cider(final), "control": cider(stages["control"]),
            "scst_gain": cider(final) - cider(start) if "scst" in stages else float("nan"),
            "all_three": final.get("attributes", {}).get("all three", float("nan")),
            "control_ratio": cider(final) / max(cider(stages["control"]), 1e-9)}


def misses(row: dict) -> List[str]:
    """The floors a case misses (a value that is not there, NaN, misses too; a demo that failed
    misses them all)."""
    return [k for k, floor in FLOORS.items() if not row.get(k, float("nan")) >= floor]


def demo_command(cfg: DemoCheckConfig, isa: str, seed: int) -> List[str]:
    return [sys.executable, "-m", "llama_caption", "demo", "--scale", cfg.scale, "--seed", str(seed),
            "--root", os.path.join(cfg.root, isa)]


def newest_report(runs: str, since: float) -> dict:
    """The report of the demo run that just ended under `runs`."""
    found = [os.path.join(runs, d, "demo_report.json") for d in os.listdir(runs) if d.isdigit()]
    found = [p for p in found if os.path.isfile(p) and os.path.getmtime(p) >= since]
    if not found:
        raise UserError(f"the demo wrote no report under {runs}")
    with open(max(found, key=os.path.getmtime), encoding="utf-8") as f:
        return json.load(f)


def run_case(cfg: DemoCheckConfig, isa: str, seed: int, log=print) -> dict:
    """One whole demo under one kernel path and seed; its conclusions and seconds."""
    cmd = demo_command(cfg, isa, seed)
    log(f"\n### {isa}, seed {seed}: {' '.join(cmd[1:])}" + "".join(f" {k}={v}" for k, v in ISAS[isa].items()))
    t0 = time.time()
    proc = subprocess.run(cmd, env=dict(os.environ, **ISAS[isa]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    log("\n".join(proc.stdout.splitlines()[-12:]))
    if proc.returncode != 0:  # the other cases still run: a 25-minute check reports all it can
        log(f"the demo failed under {isa}, seed {seed} (exit {proc.returncode}); its messages are above")
        return dict(isa=isa, seed=seed, kernels="?", seconds=round(time.time() - t0), failed=proc.returncode)
    layout = cfg.scale + (f"-seed{seed}" if seed else "")
    report = newest_report(os.path.join(cfg.root, isa, layout, "runs"), t0)
    return dict(isa=isa, seed=seed, kernels=report.get("cpu_capability", "?"), seconds=round(time.time() - t0),
                **conclusions(report))


def table(rows: List[dict]) -> str:
    head = (f"{'kernels':16}{'seed':>5}{'XE CIDEr':>10}{'final':>8}{'SCST gain':>11}{'all three':>11}"
            f"{'control':>9}{'x control':>11}{'time':>7}  floors")
    lines = [head, f"{'floor':16}{'':5}{'':10}{'':8}{FLOORS['scst_gain']:>+11.1f}{FLOORS['all_three']:>11.0%}"
                   f"{'':9}{FLOORS['control_ratio']:>10.1f}x"]
    for r in rows:
        missed = misses(r)
        if "failed" in r:
            lines.append(f"{r['isa']:16}{r['seed']:>5}  the demo failed (exit {r['failed']})")
            continue
        lines.append(f"{r['isa'] + ' (' + r['kernels'] + ')':16}{r['seed']:>5}{r['xe']:>10.1f}{r['final']:>8.1f}"
                     f"{r['scst_gain']:>+11.1f}{r['all_three']:>11.0%}{r['control']:>9.1f}{r['control_ratio']:>10.1f}x"
                     f"{r['seconds']:>6}s  " + ("ok" if not missed else "MISSED " + ", ".join(missed)))
    return "\n".join(lines)


def run_check(cfg: DemoCheckConfig, log=print) -> List[dict]:
    rows = [run_case(cfg, isa, seed, log) for isa in cfg.isas for seed in cfg.seeds]
    out = cfg.out or os.path.join(cfg.root, "check.json")
    write_json(out, {"floors": FLOORS, "scale": cfg.scale, "cases": rows}, indent=1)
    log("\n" + table(rows))
    failed = [r for r in rows if misses(r)]
    log(f"\n{len(rows) - len(failed)} of {len(rows)} case(s) hold every floor; table in {out}")
    if failed:
        sys.exit(1)
    return rows


main = command(DemoCheckConfig, run_check, "Run the demo under several kernel paths and seeds; print its conclusions against their floors.")
