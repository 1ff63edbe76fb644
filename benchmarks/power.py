"""The power of the ablation's comparison (issue 27, item 7): how many seeds a comparison of an arm with GiGPO
needs to detect a given difference in held-out success, and the power of a given design.

    python benchmarks/power.py                          # the plan from the committed results
    python benchmarks/power.py --effect 0.05 --rooms 256
    python benchmarks/ablation.py --plan                # the same plan for the ablation's own design

The design is paired: per seed s, every arm starts from the seed's warm-up and plays the same R held-out rooms, so
the comparison is the per-seed difference D_s = success(arm, s) - success(gigpo, s), tested with a two-sided
one-sample t-test over the seeds (H0: E[D] = 0). Its variance has two parts:

    Var(D_s) = tau^2 + v / R

- tau^2, the seed-to-seed spread of the difference the training itself makes (two RL runs from one warm-up);
- v, the per-room variance of the paired outcome difference x_arm,r - x_gigpo,r (0/1 outcomes on the same room;
  binomial noise, less what the room's difficulty makes common to both arms), divided by the R rooms.

Power with n seeds: P(|T| > t_{1-alpha/2, n-1}) where T is noncentral t with n - 1 degrees of freedom and
noncentrality effect * sqrt(n) / sd(D) (the textbook power of the one-sample t-test, e.g. Cohen 1988, ch. 2).
The noncentral t is computed by integrating the normal tail over the distribution of the sample standard deviation
(`t_sf`), with numpy and the standard library only.

`estimates` reads tau and v from the committed results: docs/results/learning.json (the main job, 5 seeds x 128
rooms, per-room outcomes after the warm-up and after RL) and docs/results/ablation.json (the comparison itself: per
seed and arm the final validation's per-room outcomes, so its room noise is the paired one).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_S_POINTS = 4_001  # odd, for Simpson's rule: within 1e-6 of scipy.stats.nct at every df (tests/commands/test_power.py)


def _normal_sf(x: np.ndarray | float) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(np.asarray(x, dtype=float) / math.sqrt(2.0))


def _sd_ratio_density(df: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid and density (times the Simpson weights) of S = sqrt(chi2_df / df), the sample sd over the true sd:
    f(s) = 2 (df/2)^(df/2) s^(df-1) exp(-df s^2 / 2) / Gamma(df/2). The grid spans 1 +- 12 sd of S (sd ~ 1 /
    sqrt(2 df)), within [0, 8]: outside it the density is below 1e-15 for every df."""
    half = 12 / math.sqrt(2 * df)
    s = np.linspace(max(0.0, 1 - half), min(8.0, 1 + half), _S_POINTS)
    log_f = (math.log(2.0) + df / 2 * math.log(df / 2) - math.lgamma(df / 2)
             + (df - 1) * np.log(np.maximum(s, 1e-300)) - df * s ** 2 / 2)
    return s, np.exp(log_f) * _simpson_weights(s)


def _simpson_weights(s: np.ndarray) -> np.ndarray:
    """Simpson's rule on an even number of equal steps: h/3 * [1, 4, 2, 4, ..., 2, 4, 1]."""
    w = np.full(len(s), 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return w * (s[1] - s[0]) / 3


def t_sf(x: float, df: int, noncentrality: float = 0.0) -> float:
    """P(T > x) for T noncentral t with `df` degrees of freedom: T = (Z + nc) / S, so
    P(T > x) = E_S[P(Z > x S - nc)] = integral of f(s) * Phi_bar(x s - nc) ds."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    s, weighted = _sd_ratio_density(df)
    return float(np.sum(weighted * _normal_sf(x * s - noncentrality)))


def t_quantile(p: float, df: int) -> float:
    """The central t quantile: x with P(T <= x) = p (bisection on `t_sf`)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        if 1 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_test_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample (paired) t-test at level `alpha` with `n` observations of sd `sd`
    when the true mean is `effect`."""
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 seeds, got {n}")
    if sd <= 0:
        raise ValueError(f"sd must be > 0, got {sd}")
    crit = t_quantile(1 - alpha / 2, n - 1)
    nc = effect * math.sqrt(n) / sd
    return t_sf(crit, n - 1, nc) + 1 - t_sf(-crit, n - 1, nc)


def seeds_needed(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, most: int = 10_000) -> int:
    """The smallest number of seeds whose paired t-test reaches `power` for a true difference `effect`."""
    lo, hi = 2, 2
    while t_test_power(effect, sd, hi, alpha) < power:
        lo, hi = hi + 1, hi * 2
        if hi > most:
            raise ValueError(f"more than {most} seeds needed for effect {effect} at sd {sd}")
    while lo < hi:  # power rises with n: the first n that reaches it
        mid = (lo + hi) // 2
        if t_test_power(effect, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi


def difference_sd(tau: float, room_var: float, rooms: int) -> float:
    """sd of one seed's paired difference D_s: sqrt(tau^2 + v / R)."""
    return math.sqrt(tau ** 2 + room_var / rooms)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def estimates(learning: Path = ROOT / "docs/results/learning.json",
              ablation: Path = ROOT / "docs/results/ablation.json") -> dict:
    """tau and v from the committed results (see the module docstring), each with where it comes from.

    - learning.json: v = the mean over seeds of the per-room variance of (after RL - after warm-up) on the same
      rooms; the RL change's own seed spread tau_rl^2 = Var_s(gain_s) - v / R, and tau^2 = 2 tau_rl^2 for the
      difference of two RL runs from one warm-up (independent training noise);
    - ablation.json: tau^2 = the variance over seeds of (arm - gigpo), pooled over the other arms, less the room noise
      (`_room_noise`: the paired per-room variance / R where the runs carry per-room outcomes, else binomial).
    Negative variance estimates are clipped at 0."""
    out: dict = {}
    doc = json.loads(Path(learning).read_text())
    room_vars, gains, rooms = [], [], None
    for run in doc["runs"].values():
        by_tag = {v["tag"]: np.array(v["per_task_success"], dtype=float) for v in run["validations"]}
        diff = by_tag["final"] - by_tag["after_warmup"]
        rooms = len(diff)
        room_vars.append(float(diff.var(ddof=1)))
        gains.append(float(diff.mean()))
    v = float(np.mean(room_vars))
    tau_rl2 = max(float(np.var(gains, ddof=1)) - v / rooms, 0.0)
    out["learning"] = {"source": _shown(Path(learning)), "seeds": len(gains), "rooms": rooms, "room_var": v,
                       "tau": math.sqrt(2 * tau_rl2)}
    doc = json.loads(Path(ablation).read_text())
    finished = {(r["arm"], r["seed"]): r for r in doc["runs"] if r.get("after_rl")}
    seeds = sorted({s for a, s in finished if a == "gigpo"})
    arms = sorted({a for a, _ in finished if a != "gigpo"})
    variances, noise = [], []
    configs = [r["config"] for r in doc["runs"] if "config" in r]
    # the ablation committed before runs carried their config validated on its preset's 32 rooms (issue 27)
    rooms = configs[0]["rollout"]["val_num_tasks"] if configs else 32
    for arm in arms:
        pairs = [(finished[(arm, s)], finished[("gigpo", s)]) for s in seeds if (arm, s) in finished]
        if len(pairs) >= 2:
            variances.append(float(np.var([a["after_rl"]["success_rate"] - g["after_rl"]["success_rate"]
                                           for a, g in pairs], ddof=1)))
            noise.append(float(np.mean([_room_noise(a, g, rooms) for a, g in pairs])))
    if variances:
        out["ablation"] = {"source": _shown(Path(ablation)), "seeds": len(seeds), "rooms": rooms, "arms": arms,
                           "tau": math.sqrt(max(float(np.mean(variances)) - float(np.mean(noise)), 0.0))}
    return out


def final_rooms(run: dict) -> list[int] | None:
    """The per-room outcomes of an ablation run's final validation (TTI off), None when it has none (several ranks,
    or the ablation committed before issue 27)."""
    final = next((v for v in run.get("validations", []) if v.get("tag") == "final"), {})
    return final.get("per_task_success")


def _room_noise(arm_run: dict, gigpo_run: dict, rooms: int) -> float:
    """The room noise in one seed's (arm - gigpo): the variance of the paired per-room differences over the rooms
    (both final validations' `per_task_success`), or, where a run has no per-room outcomes, the binomial
    (p_a (1 - p_a) + p_g (1 - p_g)) / R that takes the rooms as independent."""
    a, g = final_rooms(arm_run), final_rooms(gigpo_run)
    if a is not None and g is not None:
        return float(np.var(np.array(a, dtype=float) - np.array(g, dtype=float), ddof=1)) / len(a)
    pa, pg = arm_run["after_rl"]["success_rate"], gigpo_run["after_rl"]["success_rate"]
    return (pa * (1 - pa) + pg * (1 - pg)) / rooms


def plan(est: dict, effect: float = 0.10, power: float = 0.8, alpha: float = 0.05,
         rooms: tuple[int, ...] = (32, 128, 256, 512), design: tuple[int, int] | None = None) -> dict:
    """Seeds needed per number of rooms, under each tau estimate (v from learning.json, the only per-room data), and
    the power of `design` = (seeds, rooms)."""
    v = est["learning"]["room_var"]
    out = {"effect": effect, "power": power, "alpha": alpha, "room_var": v, "scenarios": {}}
    for name, e in est.items():
        tau = e["tau"]
        sds = {r: difference_sd(tau, v, r) for r in rooms}
        rows = {str(r): {"sd_difference": sd, "seeds": seeds_needed(effect, sd, power, alpha)} for r, sd in sds.items()}
        scenario = {"tau": tau, "from": e["source"], "by_rooms": rows}
        if design is not None:
            n, r = design
            scenario["design"] = {"seeds": n, "rooms": r,
                                  "power": t_test_power(effect, difference_sd(tau, v, r), n, alpha)}
        out["scenarios"][name] = scenario
    return out


def format_plan(p: dict) -> str:
    lines = [f"Power of (arm - gigpo), paired over seeds, two-sided t-test, alpha {p['alpha']}: seeds for "
             f"{p['power']:.0%} power to detect {p['effect']:.2f} in held-out success "
             f"(per-room variance of a paired difference v = {p['room_var']:.3f})"]
    for name, s in p["scenarios"].items():
        cells = ", ".join(f"{r} rooms: {row['seeds']} seeds (sd {row['sd_difference']:.3f})"
                          for r, row in s["by_rooms"].items())
        lines.append(f"  tau = {s['tau']:.3f} (seed spread of a difference, from {s['from']}): {cells}")
        if "design" in s:
            d = s["design"]
            lines.append(f"    this design, {d['seeds']} seeds x {d['rooms']} rooms: power {d['power']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--effect", type=float, default=0.10, help="the difference in held-out success to detect")
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--rooms", type=int, nargs="+", default=[32, 128, 256, 512])
    parser.add_argument("--design", type=int, nargs=2, metavar=("SEEDS", "ROOMS"), default=None,
                        help="also the power of this design")
    ns = parser.parse_args(argv)
    design = tuple(ns.design) if ns.design else None
    print(format_plan(plan(estimates(), ns.effect, ns.power, ns.alpha, tuple(ns.rooms), design)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
