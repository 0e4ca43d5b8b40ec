"""`python -m experiments {run,report,calibrate,compare,regress}`: the experiment pipeline's commands.

run and calibrate are Hydra applications (overrides such as +workload=poisson engine.threads=4,
-m for sweeps); report and compare take plain arguments (see --help of each).
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m experiments COMMAND [ARGS]

commands:
  run        replay a workload through the engine, the simulator and the baseline
             (python -m experiments run +workload=poisson; -m for a sweep)
  report     rebuild the summary, figures and report of a run folder (report RESULTS_DIR)
  calibrate  profile the engine and fit the simulator's cost model
  compare    put several runs side by side (compare DIR... [--out DIR])
  regress    check performance ratios and prediction errors against results/baselines
             (regress [--update-baseline])
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)

    command, rest = argv[0], argv[1:]
    if command == "run":
        from experiments import pipeline

        pipeline.main(rest)
    elif command == "calibrate":
        from experiments import calibrate_command

        calibrate_command.main(rest)
    elif command == "report":
        from experiments import report_command

        report_command.main(rest)
    elif command == "compare":
        from experiments import compare

        compare.main(rest)
    elif command == "regress":
        from experiments import regress

        sys.exit(regress.main(rest))
    else:
        print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
