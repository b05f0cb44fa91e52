"""The ``featx`` command line: each command parses, calls one library function, prints the output's path.

Logs and progress go to stderr; the last line on stdout is the directory a command produced.  Every
:class:`~featx.errors.FeatxError` becomes one ``featx: error: ...`` line and a non-zero exit.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

import click

from featx.errors import FeatxError

logger = logging.getLogger("featx")


class _TqdmHandler(logging.StreamHandler):
    """Log lines through ``tqdm.write`` so that they don't tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the command down
            self.handleError(record)


def _setup_logging(quiet: bool) -> None:
    root = logging.getLogger("featx")
    for h in list(root.handlers):
        root.removeHandler(h)
    h = _TqdmHandler()
    h.setFormatter(logging.Formatter("featx: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    for noisy in ("optuna",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def command(fn):
    """Wrap a command: logging set-up, and user errors as one line with a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging(kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except FeatxError as e:
            click.echo(f"featx: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("featx: interrupted; finished work is kept and the same command resumes it", err=True)
            sys.exit(130)
        except Exception as e:  # a bug, not a user error: still one line unless asked for the traceback
            if os.environ.get("FEATX_DEBUG"):
                raise
            click.echo(f"featx: internal error: {type(e).__name__}: {e} (set FEATX_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _emit_path(path) -> None:
    click.echo(str(path))


quiet_option = click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
cache_option = click.option("--cache", type=click.Path(file_okay=False), default=None,
                            help="Cache root (default: $FEATX_CACHE, else ./cache).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featx")
def main() -> None:
    """featx: pretrained-CNN features off the shelf. extract -> fit -> search -> finetune -> predict."""


@main.command()
@click.argument("data", type=click.Path())
@click.option("--layer", "layers", multiple=True, help="Layer to extract (repeatable), e.g. pool5, fc6, fc7.")
@click.option("--backbone", default="alexnet", show_default=True, help="alexnet, vgg16, resnet18, resnet50.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, random, or a state-dict file.")
@click.option("--split", default=None, help="Stratified split when DATA has none: test=0.15[,val=0.1].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--views", default=1, show_default=True, type=click.Choice(["1", "2", "5", "10"]),
              help="Rows per image: centre; +mirror; centre+4 corners; +their mirrors.")
@click.option("--normalize", default="weights", show_default=True, type=click.Choice(["weights", "dataset"]),
              help="Published mean/std of the weights, or the train split's own.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="Decode processes (default: cores - 1).")
@click.option("--threads", default=None, type=int, help="Torch threads for the forward pass.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision (changes the features slightly).")
@click.option("--shard-size", default=2048, show_default=True, type=int, help="Rows per HDF5 shard.")
@cache_option
@click.option("--strict", is_flag=True, help="Exit non-zero if any file had to be skipped.")
@quiet_option
@command
def extract(data, layers, backbone, weights, split, seed, views, normalize, batch_size, workers, threads, device,
            amp, shard_size, cache, strict, quiet):
    """Extract backbone activations of every image in DATA into a feature set."""
    from featx.extract import extract as run

    res = run(data, layers=layers, backbone=backbone, weights=weights, split=split, seed=seed, views=int(views),
              normalize=normalize, batch_size=batch_size, workers=workers, threads=threads, device=device, amp=amp,
              shard_size=shard_size, cache=cache, strict=strict, progress=None if not quiet else False)
    m = res.manifest
    logger.info("%s: %d rows (%s), %d skipped", "extracted" if res.computed else "already extracted",
                m.get("n_rows", 0), ", ".join(f"{k} {v}" for k, v in m.get("counts", {}).items()), len(m.get("skipped", [])))
    _emit_path(res.path)


@main.command()
@click.option("--weights", default=None, help="imagenet, random, or a state-dict file (default: imagenet if available).")
@cache_option
@device_option
@quiet_option
@command
def demo(weights, cache, device, quiet):
    """Run the whole pipeline on scikit-learn's 1,797 handwritten digits."""
    from featx.demo import run_demo

    out = run_demo(weights=weights, cache=cache, device=device)
    _emit_path(out)


if __name__ == "__main__":  # pragma: no cover
    main()
