"""python -m caldpo.train key=value ...: train with Hydra-style overrides.

Exit status: 0 finished (or already finished); 2 bad options, data or run directory; 3 a run that
cannot continue safely (non-finite weights, a full disk); 75 stopped on request (STOP file, SIGTERM,
SIGUSR1) and 130 after Ctrl-C, a resume checkpoint kept: rerun the same command to resume.

python -m caldpo.train --preflight[=submit] [--world-size N] key=value ...: check the options and this
machine as a job of N processes would (exit 0 with one line, or 2 with the error), train nothing;
--preflight=submit leaves this machine's devices out (a login host submitting the run elsewhere)."""
import os
import sys


def _preflight_flags(argv: list[str]) -> tuple[str | None, int, list[str]]:
    """(``--preflight`` mode or None, ``--world-size``, the overrides); a bad flag is a ConfigError."""
    from .config import ConfigError

    mode, world, rest, it = None, 1, [], iter(argv)
    for a in it:
        if a == "--preflight" or a.startswith("--preflight="):
            mode = a.partition("=")[2] or "node"
            if mode not in ("node", "submit"):
                raise ConfigError(f"{a}: use --preflight (this machine runs the job) or --preflight=submit")
        elif a == "--world-size" or a.startswith("--world-size="):
            value = a.partition("=")[2] if "=" in a else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size {value!r}: a positive number of processes")
            world = int(value)
        else:
            rest.append(a)
    if mode is None and world != 1:
        raise ConfigError("--world-size goes with --preflight (torchrun sets the world size of a training run)")
    return mode, world, rest


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from .config import describe_options
        print(__doc__.strip() + "\n\nExample: python -m caldpo.train model=pythia28 datasets=[hh] loss=caldpo "
              "loss.beta=0.1 model.archive=<the SFT run's printed LATEST/policy.pt>\n"
              "A run's directory is run_dir, or <local_run_root>/<exp_name>_<hash of the training options>: "
              "the same command resumes, a changed option starts a run of its own.\n")
        print(describe_options())
        return 0
    from caldpo.cli import run, stopped_status

    from .config import load_config, preflight, preflight_summary, validate

    if any(a.startswith(("--preflight", "--world-size")) for a in argv):
        def check() -> None:
            mode, world, overrides = _preflight_flags(argv)
            cfg = preflight(overrides, world_size=world, on_node=mode == "node")
            print(f"caldpo: preflight passed: {preflight_summary(cfg, world)}", flush=True)
        return run(check)

    status = run(lambda: validate(load_config(argv), argv=argv))  # the preflight, before the trainer, data and models are imported
    if status:
        return status

    def train() -> int:
        from .trainer import main

        result = main(argv)
        if isinstance(result, dict) and result.get("stopped"):
            line, status = stopped_status(result)
            if os.environ.get("RANK", "0") == "0":  # one line per run, not per torchrun worker
                print(line, file=sys.stderr)
            return status
        return 0 if result else 1

    # Once training runs, Ctrl-C is a stop request handled by the trainer; before that it ends the setup.
    return run(train, interrupted="interrupted during setup, before the first training step; nothing was trained "
                                  "(rerun the same command to start again)")


if __name__ == "__main__":
    from caldpo.cli import main as _main

    _main(cli)
