"""The package's commands, one module each, absl flags in snake_case.

| command (pyproject.toml's [project.scripts]) | module | from a checkout |
|---|---|---|
| `fda-biper-jax-train` | `train` | `python -m experiments.cifar`, `python -m experiments.imagenet` |
| `fda-biper-jax-export` | `export` | `python -m experiments.export` |
| `fda-biper-jax-summary` | `summary` | `python -m fda_biper_jax.cli.summary` |
| `fda-biper-jax-analysis` | `analysis` | `python -m experiments.analysis` |

Each module has `define_flags()`, `main(argv)` and `run()`, the console script:
`command.run(main, define_flags)` defines the flags when the command starts (never
at import, so that any of them can be imported together) and parses them. A bad
flag, an unknown one, a missing config file or a bad `--config.field` override
stops with one line, `PROG: error: --flag=value is not allowed; allowed: ...`, exit
status 2, before anything is written; a setting the work rejects (a ValueError) also
exits 2; work that fails (a non-finite loss, a file that cannot be written, a missing
optional package) exits 1, with one line too.
"""
