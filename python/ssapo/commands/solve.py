"""`ssapo solve`: the follower on a file of ξ values.

    ssapo solve xi.npy --eps 0.01 --group-size 100 --output atoms.npz
    ssapo solve pairs.jsonl --column xi --space margin --global --output atoms.parquet

Spaces, as the follower's (`follower_space`; ssapo.follower, docs/METHOD.md §2):
`prob` (default): ξ are preference probabilities in [0, 1], loss −log ξ by K
tangents; `margin`: ξ are margins β·h, loss softplus(−ξ) by K tangents over
[−max|ξ|, max|ξ|] (flat log 2 when every ξ is 0). The loss is the follower's
own (`ssapo.follower.loss_of`); --eps, --group-size and --k default to
RunConfig's eps, group_size and k. ξ are real numbers: complex input (a
complex .npy, or '1+2j' in a column) is refused, naming the argument, never
cut to its real part.

Writes, atomically:
- .npz: per sample `xi`, `loc`, `mass`, `shift` (N, 2), `weight`, `group` (N,) (the follower's atom
  names, ssapo.atoms, as in follower.npz);
  per group `group_values`, `lam`, `budget_used`, `group_sizes`, `group_labels`;
  scalars `value`, `empirical_value`, `dual_value`, `dual_gap`, `eps`, `support`, and `loss` (its repr).
- .parquet: one row per sample (xi, loc0, loc1, mass0, mass1, shift0, shift1, weight,
  group); the per-group arrays and the scalars as JSON in the schema metadata key
  `ssapo.follower`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DOC = __doc__


def add_parser(sub) -> None:
    p = sub.add_parser(
        "solve",
        help="solve the follower on a file of xi values",
        description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help=".npy (1-D), .csv (header) or .jsonl file of xi values")
    p.add_argument("--column", default=None, help="column of .csv/.jsonl input (default: xi)")
    from ssapo.config import FIELDS, default_of

    eps, group_size, k, space = (default_of(n) for n in ("eps", "group_size", "k", "follower_space"))
    p.add_argument("--eps", type=float, default=eps, help=f"radius of each group's ball (default {eps})")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--group-size", type=int, default=group_size, help=f"consecutive groups of this size (default {group_size})"
    )
    g.add_argument("--global", dest="global_ball", action="store_true", help="one ball around all samples")
    g.add_argument("--labels-column", default=None, help="column (csv/jsonl) of integer group labels")
    p.add_argument(
        "--space",
        choices=list(FIELDS["follower_space"].metadata["choices"]),
        default=space,
        help=f"the follower's space: prob = xi are probabilities in [0, 1], loss -log xi; margin = xi are "
        f"margins, loss softplus(-xi) (default {space})",
    )
    p.add_argument("--k", type=int, default=k, help=f"number of tangents (default {k})")
    p.add_argument(
        "--support",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="the adversary's support [LO, HI] (default: [0, 1] for prob, [-max|xi|, max|xi|] for margin)",
    )
    p.add_argument("--threads", type=int, default=None, help="rayon threads (default: all cores)")
    p.add_argument("--output", "-o", default=None, help="output .npz or .parquet (default: print only)")
    p.set_defaults(func=run)


def _summary(res, n: int, seconds: float) -> str:
    import numpy as np

    lam = np.asarray(res.lam)
    used = np.asarray(res.budget_used)
    return "\n".join(
        [
            f"samples            {n}",
            f"groups             {len(lam)}",
            f"value              {res.value:.10g}",
            f"empirical value    {res.empirical_value:.10g}",
            f"dual value         {res.dual_value:.10g}  (gap {res.dual_gap:.2e})",
            f"lambda*            min {lam.min():.6g}  median {np.median(lam):.6g}  max {lam.max():.6g}",
            f"budget used        mean {used.mean():.6g}  max {used.max():.6g}  (eps {res.eps:g})",
            f"split samples      {int(np.sum(np.asarray(res.mass)[:, 1] > 0))}",
            f"time               {seconds * 1e3:.2f} ms",
        ]
    )


def _write(path: str, xi, res, loss_repr: str) -> None:
    import numpy as np

    from ssapo.io import atomic_write

    per_group = {
        "group_values": np.asarray(res.group_values),
        "lam": np.asarray(res.lam),
        "budget_used": np.asarray(res.budget_used),
        "group_sizes": np.asarray(res.group_sizes),
        "group_labels": np.asarray(res.group_labels),
    }
    scalars = {
        "value": res.value,
        "empirical_value": res.empirical_value,
        "dual_value": res.dual_value,
        "dual_gap": res.dual_gap,
        "eps": res.eps,
        "support": list(res.support),
        "loss": loss_repr,
    }
    if path.endswith(".npz"):

        def w(tmp):
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    xi=xi,
                    loc=res.loc,
                    mass=res.mass,
                    shift=res.shift,
                    weight=res.weights,
                    group=res.group_index,
                    **per_group,
                    **{k: np.asarray(v) for k, v in scalars.items()},
                )
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        loc, mass, shift = np.asarray(res.loc), np.asarray(res.mass), np.asarray(res.shift)
        table = pa.table(
            {
                "xi": xi,
                "loc0": loc[:, 0],
                "loc1": loc[:, 1],
                "mass0": mass[:, 0],
                "mass1": mass[:, 1],
                "shift0": shift[:, 0],
                "shift1": shift[:, 1],
                "weight": np.asarray(res.weights),
                "group": np.asarray(res.group_index),
            }
        )
        meta = json.dumps({**scalars, **{k: v.tolist() for k, v in per_group.items()}})
        table = table.replace_schema_metadata({"ssapo.follower": meta})

        def w(tmp):
            pq.write_table(table, tmp)
    else:
        raise ValueError(f"--output: unknown file type of {path!r} (use .npz or .parquet)")
    atomic_write(path, w)


def run(args) -> int:
    import numpy as np

    import dro_core
    from ssapo.follower import loss_of
    from ssapo.io import read_column

    try:
        if args.output is not None and not args.output.endswith((".npz", ".parquet")):
            raise ValueError(f"--output: unknown file type of {args.output!r} (use .npz or .parquet)")
        xi = read_column(args.input, args.column)
        if args.global_ball:
            groups = None
        elif args.labels_column:
            if args.input.lower().endswith(".npy"):
                raise ValueError("--labels-column: needs a .csv or .jsonl input (a .npy file has no named columns)")
            groups = read_column(args.input, args.labels_column, column_arg="--labels-column")
            if not np.all(groups == np.round(groups)):
                raise ValueError("--labels-column: labels must be integers")
            groups = groups.astype(np.int64)
        else:
            groups = args.group_size
        loss = loss_of(xi, args.k, args.space)  # the follower's loss of this space, nothing of our own
        t = time.perf_counter()
        res = dro_core.solve(
            xi, args.eps, groups, loss=loss, support=tuple(args.support) if args.support else None, threads=args.threads
        )
        seconds = time.perf_counter() - t
        if args.output:
            try:
                _write(args.output, xi, res, repr(loss))
            except OSError as e:
                raise ValueError(f"--output: cannot write {args.output} ({e.strerror or e})") from None
            except ImportError as e:
                raise ValueError(f"--output: .parquet needs pyarrow ({e})") from None
    except ValueError as e:  # includes ssapo.io.InputError and dro_core's errors
        print(f"ssapo solve: error: {e}", file=sys.stderr)
        return 2
    print(_summary(res, len(xi), seconds))
    if args.output:
        print(f"wrote              {args.output}")
    return 0
