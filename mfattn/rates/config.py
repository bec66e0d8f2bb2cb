"""The settings of ``mfattn rates``: one dataclass, every field documented, validated before any work.

A TOML file (``mfattn rates --config FILE``) overrides any top-level setting; ``mfattn rates --print-config``
prints them all with their defaults and meaning. Values are checked for type as well as range (``depths = 4``,
``beta = "1.0"``, ``mc_check = "false"`` are refused with the setting's name), before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..attention import Attention, as_attention
from ..metrics import ASCENT_RULES

__all__ = ["RatesConfig", "QUICK", "TASKS", "OPTIMIZERS", "load_config", "print_config", "EXECUTION_ONLY"]

#: The tasks ``RatesConfig.task`` accepts: each defines its target for *any* input sequence, which the
#: adjoint's terminal condition at an adversarial input needs.
TASKS = ("teacher_student", "target_measure")
OPTIMIZERS = ("adamw", "blockwise_adamw")

#: Settings that change how a run executes, not what it computes (a run folder may resume with other values),
#: and ``seeds``, ``control_seeds``: adding seeds to a run extends it (each seed's draws do not depend on the seed
#: count).
EXECUTION_ONLY = ("shard_seeds", "shard_particles", "seeds", "control_seeds")
#: What a run folder whose config.json predates a setting ran with, where that differs from today's default.
LEGACY_DEFAULTS = {"ascent_rule": "fixed", "search_pilots": 0}


def _f(default, doc: str, kind: str | None = None):
    """A dataclass field carrying its documentation (``--print-config``) and value kind for validation."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return dataclasses.field(metadata={"doc": doc, "kind": kind}, **factory)


@dataclasses.dataclass
class RatesConfig:
    """Every setting of the rates experiment (docs/spec.md section 7; the paper's Lemma 6 and Theorem 7).

    The default finishes in about 3.5 minutes on the project's 2-core CPU (205 s measured on 2026-12-07; the target
    is 5); ``studies/rates.toml`` is the study.
    """

    # ---- model and data
    task: str = _f(
        "teacher_student",
        "teacher_student (token regression to a random teacher transformer) or "
        "target_measure (MMD^2/2 to a fixed target cloud)",
        "choice:task",
    )
    attention: Any = _f(
        "softmax",
        "the student's and the limit's attention: a kind string or a table of "
        "mfattn.Attention fields, e.g. {kind = 'sigmoid', causal = true}",
        "attention",
    )
    dim: int = _f(2, "token dimension d", "posint")
    head_dim: int = _f(2, "head dimension k", "posint")
    num_tokens: int = _f(4, "tokens N per sequence", "posint")
    beta: float = _f(1.0, "inverse temperature", "nonneg")
    radius: float = _f(1.0, "R: inputs (and the supremum) range over token sequences in the ball of radius R", "pos")
    teacher_depth: int = _f(2, "teacher_student: the teacher's depth", "posint")
    teacher_heads: int = _f(2, "teacher_student: the teacher's heads", "posint")
    target_points: int = _f(8, "target_measure: atoms of the target measure", "posint")
    mmd_bandwidth: float = _f(0.5, "target_measure: Gaussian kernel width", "pos")
    seed: int = _f(0, "base seed of every draw (task, data stream, limit, discrete models, test inputs)", "nonnegint")
    # ---- sweeps
    depths: list = _f([8, 16, 32], "depths L of the trained (L, H) grid", "posints")
    heads: list = _f([1, 4, 8], "heads H of the trained (L, H) grid", "posints")
    seeds: int = _f(
        8,
        "independent draws of the discrete models (the limit is shared: Theorem 7's expectation is "
        "over the parameters given the data stream); >= 16 for seed-bootstrap intervals",
        "posint",
    )
    tokens_sweep: list = _f([], "N sweep: token counts, run at each of sweep_points", "posints")
    dims_sweep: list = _f(
        [],
        "d sweep: widths, run at each of sweep_points under AdamW and blockwise AdamW (paired: same draws and data)",
        "posints",
    )
    sweep_points: list = _f([[8, 4], [16, 16]], "(L, H) points of the N and d sweeps", "pairs")
    # ---- training (the same optimizer and data stream for the discrete models and the limit)
    steps: int = _f(20, "training steps", "nonnegint")
    batch_size: int = _f(4, "sequences per training batch", "posint")
    optimizer: str = _f("adamw", "adamw or blockwise_adamw (the (L, H) grid and the N sweep)", "choice:optimizer")
    learning_rate: float = _f(5e-3, "learning rate eta", "pos")
    weight_decay: float = _f(1e-2, "weight decay lambda (need eta * lambda <= 1, paper Lemma 26)", "nonneg")
    b1: float = _f(0.9, "Adam's b1", "unit")
    b2: float = _f(0.99, "Adam's b2", "unit")
    eps: float = _f(
        1e-1,
        "Adam's eps; much larger than 1e-8 so that the first steps are not sign descent "
        "(update = lr * sign(g)); report: training.sign_fraction",
        "pos",
    )
    init: str = _f(
        "mean_noise", "initialisation law nu_0: xavier_uniform, truncated_normal or mean_noise", "choice:init"
    )
    init_scale: float = _f(0.5, "scale of nu_0", "pos")
    # ---- the limit
    particles: int = _f(8192, "M: the trained limit's ensemble (all replicas together)", "posint")
    replicas: int = _f(
        4,
        "independent sub-ensembles of M / replicas particles (>= 4): the limit is their pooled "
        "mean, its Monte-Carlo error their batch-means spread",
        "posint",
    )
    grid_size: int = _f(9, "K + 1 depth grid times of the limit's parameters", "posint")
    solver_steps: int = _f(1, "Tsit5 steps per grid interval (fixed step); 0: adaptive PID with rtol/atol", "nonnegint")
    rtol: float = _f(1e-5, "adaptive solves: relative tolerance", "pos")
    atol: float = _f(1e-7, "adaptive solves: absolute tolerance", "pos")
    mc_ratio: float = _f(
        0.3, "a point whose Monte-Carlo error exceeds mc_ratio x its error is flagged and left out of the fits", "pos"
    )
    # ---- positive control: untrained models against a reference limit (Euler + CLT law)
    control: bool = _f(True, "run the step-0 positive control first", "bool")
    control_depths: list = _f([8, 16, 32, 64], "depths of the control grid", "posints")
    control_heads: list = _f([1, 4, 16], "heads of the control grid", "posints")
    control_particles: int = _f(32768, "M of the control's reference limit (untrained, so computed once)", "posint")
    control_inputs: int = _f(8, "training-like inputs of the control's pointwise error", "posint")
    control_seeds: int = _f(
        32,
        "untrained discrete draws of the control (its own seeds: cheap per seed, and its gamma interval and model "
        "preference need >= 16-32 of them)",
        "posint",
    )
    # ---- errors: pointwise over test inputs, uniform by a search
    test_inputs: int = _f(8, "training-like inputs of the pointwise error", "posint")
    candidates: int = _f(6, "candidate inputs per family (5 families) for the supremum", "posint")
    search_particles: int = _f(
        128,
        "particles of the cheap limit (Euler on the layer grid) the ascent runs on; "
        "maximisers are re-evaluated against the full limit",
        "posint",
    )
    ascent_starts: int = _f(1, "ascent starts per point and seed in the first round (doubled each round)", "posint")
    ascent_steps: int = _f(8, "ascent steps in the first round (doubled each round)", "posint")
    ascent_step_size: float = _f(0.25, "ascent step (the first, under the monotone rule), as a fraction of R", "pos")
    ascent_rule: str = _f(
        "monotone",
        "monotone: each step tried from the path's best point, halved after a step that does not climb; "
        "fixed: a constant step from wherever the path is (run folders older than this setting used fixed)",
        "choice:ascent_rule",
    )
    search_rounds: int = _f(4, "most budget doublings of the search", "posint")
    search_tol: float = _f(0.05, "the search has converged when the last doubling gained less than this", "pos")
    search_pilots: int = _f(
        4,
        "pilot draws: discrete models drawn from their own seed stream (never reported), trained with the seeds and "
        "searched first; their maximisers (one per pilot and point) join every seed's candidates, so each seed's "
        "search starts at the peaks other draws found while its rows still depend only on its own draws and the "
        "pilots' (0: none)",
        "nonnegint",
    )
    search_pool: bool = _f(
        False,
        "pool each round's maximisers over their seed's points: each is evaluated at every (L, H) of its seed "
        "(up to 13% higher estimates at large L H in the default run, 2.2x the search's time; false: own point only)",
        "bool",
    )
    precision: str = _f("float32", "float32 or float64", "choice:precision")
    # ---- execution only (a resumed run may change these)
    shard_seeds: bool = _f(True, "several devices: split the seeds over them", "bool")
    shard_particles: bool = _f(True, "several devices: split the limit's particles over those the seeds leave", "bool")

    def spec(self) -> Attention:
        """The :class:`~mfattn.Attention` of the student and the limit."""
        if isinstance(self.attention, dict):
            return Attention(**self.attention)
        return as_attention(self.attention)

    @property
    def points(self) -> list[tuple[int, int]]:
        return [(L, H) for L in self.depths for H in self.heads]

    def validate(self) -> RatesConfig:
        """``self`` if every setting is valid, else ``ValueError``/``TypeError`` naming the setting."""
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), f.metadata["kind"])
        try:
            spec = self.spec()
        except (TypeError, ValueError) as e:
            raise ValueError(f"rates config: attention {self.attention!r} is not valid: {e}") from None
        if spec.depth_exponent != 1:
            raise ValueError("rates config: attention: the limit needs the residual step 1/L (depth_exponent = 1).")
        lmax = math.lcm(*self.depths, *(p[0] for p in self.sweep_points))
        if lmax > 1024:
            raise ValueError(
                f"rates config: depths: the limit is read at t = l / lcm(depths) and lcm = {lmax} > 1024; "
                "use depths that divide each other (powers of 2)."
            )
        if math.lcm(*self.control_depths) > 1024:
            raise ValueError("rates config: control_depths: lcm must be <= 1024 (use powers of 2).")
        for name, pts in (
            ("heads", self.points),
            ("sweep_points", self.sweep_points),
            ("control_heads", [(L, H) for L in self.control_depths for H in self.control_heads]),
        ):
            by_depth: dict = {}
            for L, H in pts:
                by_depth.setdefault(L, []).append(H)
            for L, hs in by_depth.items():
                if any(max(hs) % h for h in hs):
                    raise ValueError(
                        f"rates config: {name}: at depth {L} every head count must divide the largest "
                        f"({sorted(hs)}): the points of one depth share one program (powers of 2)."
                    )
        if self.replicas < 4:
            raise ValueError(
                f"rates config: replicas must be >= 4 (Monte-Carlo error from >= 4 sub-ensembles), got {self.replicas}."
            )
        for name in ("particles", "control_particles"):
            if getattr(self, name) % self.replicas:
                raise ValueError(
                    f"rates config: {name} ({getattr(self, name)}) must be a multiple of replicas ({self.replicas})."
                )
        if self.search_particles > self.particles // self.replicas:
            raise ValueError(
                f"rates config: search_particles ({self.search_particles}) must be <= particles / "
                f"replicas ({self.particles // self.replicas}): the cheap limit is a subsample."
            )
        if self.grid_size < 2:
            raise ValueError(f"rates config: grid_size must be >= 2, got {self.grid_size}.")
        if self.learning_rate * self.weight_decay > 1:
            raise ValueError(
                "rates config: learning_rate * weight_decay must be <= 1 (paper Lemma 26), got "
                f"{self.learning_rate * self.weight_decay:g}."
            )
        if not self.b1 < math.sqrt(self.b2):
            raise ValueError(f"rates config: need b1 < sqrt(b2) (paper Lemma 43), got b1 = {self.b1}, b2 = {self.b2}.")
        return self


def _check(name: str, v, kind: str | None) -> None:
    def bad(what):
        raise ValueError(f"rates config: {name} must be {what}, got {v!r} ({type(v).__name__}).")

    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_num = (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)
    if kind == "posint" and not (is_int and v >= 1):
        bad("a positive integer")
    elif kind == "nonnegint" and not (is_int and v >= 0):
        bad("a non-negative integer")
    elif kind == "pos" and not (is_num and v > 0):
        bad("a finite number > 0")
    elif kind == "nonneg" and not (is_num and v >= 0):
        bad("a finite number >= 0")
    elif kind == "unit" and not (is_num and 0 <= v < 1):
        bad("a number in [0, 1)")
    elif kind == "bool" and not isinstance(v, bool):
        bad("true or false (a TOML boolean, not a string)")
    elif kind == "posints":
        if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
            bad("a list of positive integers")
        if name in ("depths", "heads", "control_depths", "control_heads") and not v:
            bad("a non-empty list of positive integers")
        if len(set(v)) != len(v):
            bad("a list without repeats")
    elif kind == "pairs":
        ok = isinstance(v, (list, tuple)) and all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in p)
            for p in v
        )
        if not ok:
            bad("a list of [L, H] pairs of positive integers")
    elif kind is not None and kind.startswith("choice:"):
        choices = {
            "task": TASKS,
            "optimizer": OPTIMIZERS,
            "precision": ("float32", "float64"),
            "init": ("xavier_uniform", "truncated_normal", "mean_noise"),
            "ascent_rule": ASCENT_RULES,
        }[kind[7:]]
        if v not in choices:
            bad(f"one of {choices}")
    elif kind == "attention" and not isinstance(v, (str, dict)):
        bad("a kind string or a table of mfattn.Attention fields")


#: ``--quick``: a smoke test of every stage in well under a minute (not a measurement: its control is not
#: expected to pass).
QUICK = {
    "depths": [2, 4],
    "heads": [1, 4],
    "seeds": 4,
    "steps": 2,
    "batch_size": 2,
    "particles": 256,
    "grid_size": 3,
    "solver_steps": 1,
    "control_depths": [4, 8],
    "control_heads": [1, 4],
    "control_particles": 512,
    "control_inputs": 2,
    "control_seeds": 4,
    "test_inputs": 2,
    "candidates": 1,
    "search_particles": 32,
    "ascent_steps": 1,
    "search_rounds": 1,
    "search_pilots": 1,
}


def load_config(path: str | None = None, *, quick: bool = False, overrides: dict | None = None) -> RatesConfig:
    """The default configuration, with ``--quick``'s overrides, then the TOML file's (top-level keys), then
    ``overrides``; validated (``ValueError``/``TypeError`` naming the setting or the file)."""
    values: dict = dict(QUICK) if quick else {}
    if path is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"rates config {path}: not valid TOML: {e}") from None
        except OSError as e:
            raise ValueError(f"rates config {path}: cannot read it: {e.strerror}") from None
        fields = {f.name for f in dataclasses.fields(RatesConfig)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"rates config {path}: unknown keys {unknown}; `mfattn rates --print-config` lists them.")
        values.update(data)
    values.update(overrides or {})
    cfg = RatesConfig(**values)
    for f in dataclasses.fields(cfg):  # lists, not tuples: one JSON form for config.json and comparisons
        v = getattr(cfg, f.name)
        if isinstance(v, tuple):
            setattr(cfg, f.name, [list(x) if isinstance(x, tuple) else x for x in v])
    return cfg.validate()


def print_config(cfg: RatesConfig | None = None) -> str:
    """Every setting as TOML, with its meaning as a comment: ``mfattn rates --print-config``."""
    import json

    cfg = RatesConfig() if cfg is None else cfg
    lines = ["# mfattn rates settings (defaults); any of them may be given in a TOML file (--config)."]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, dict):
            text = "{" + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + "}"
        elif isinstance(v, bool):
            text = "true" if v else "false"
        else:
            text = json.dumps(v)
        lines.append(f"{f.name} = {text}  # {f.metadata['doc']}")
    return "\n".join(lines)
