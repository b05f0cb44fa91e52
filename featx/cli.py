"""The ``featx`` command line: each command parses, calls one library function, prints the output's path.

Logs and progress go to stderr; the last line on stdout is the directory a command produced.  Every
:class:`~featx.errors.FeatxError` becomes one ``featx: error: ...`` line and a non-zero exit.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import sys

import click

from featx import interrupt
from featx.errors import DiskFullError, FeatxError

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
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else None
    h.setFormatter(logging.Formatter(f"featx[{rank}]: %(message)s" if rank else "featx: %(message)s"))  # torchrun
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
        # the signal policy (featx.interrupt): a first SIGINT/SIGTERM asks for a stop at the next unit boundary,
        # a second stops at once; either way one line and 130 (SIGINT) or 143 (SIGTERM)
        with interrupt.handling():
            try:
                return fn(*args, **kwargs)
            except interrupt.Interrupted as e:
                _interrupted(e.signame)
            except FeatxError as e:
                if interrupt.stop_requested():  # an error the stop caused (a worker gone): report the stop
                    _interrupted(interrupt.forced() or interrupt.stop_requested())
                click.echo(f"featx: error: {e}", err=True)
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                _interrupted(interrupt.forced() or interrupt.stop_requested() or "SIGINT")
            except Exception as e:  # a bug, not a user error: still one line unless asked for the traceback
                failed = _write_failure(e)
                if failed is not None:  # a full disk or a read-only cache met where no stage said it: its exit code
                    click.echo(f"featx: error: {failed}", err=True)
                    sys.exit(failed.exit_code)
                if os.environ.get("FEATX_DEBUG"):
                    raise
                if interrupt.stop_requested():
                    # e.g. a second signal that landed inside a library's own bookkeeping: the stop, not a bug
                    _interrupted(interrupt.forced() or interrupt.stop_requested())
                click.echo(f"featx: internal error: {type(e).__name__}: {e} (set FEATX_DEBUG=1 for the traceback)",
                           err=True)
                sys.exit(1)

    return wrapper


def _write_failure(e: BaseException) -> FeatxError | None:
    """The DiskFullError (exit 75) or ReadOnlyCacheError (exit 73) that ``e`` amounts to, if any."""
    from featx.cache import disk_full_error, is_disk_full, is_read_only, read_only_error

    where = getattr(e, "filename", None) or "the cache"
    if is_disk_full(e):
        return disk_full_error(where)
    if isinstance(e, OSError) and e.filename and is_read_only(e):
        return read_only_error(e.filename)
    return None


def _interrupted(signame: str) -> None:
    click.echo(f"featx: {interrupt.MESSAGE.format(signame=signame)}", err=True)
    sys.exit(interrupt.exit_code_of(signame))


def _emit_path(path) -> None:
    interrupt.check("cli.output")  # a stop requested at the very end: the output exists, the rerun prints it
    click.echo(str(path))


quiet_option = click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
cache_option = click.option("--cache", type=click.Path(file_okay=False), default=None,
                            help="Cache root (default: $FEATX_CACHE, else ./cache).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


class _OneLineErrors(click.Group):
    """click's usage errors (an unknown option, a bad choice) as featx's one line on stderr, exit 2."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rc = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # `featx` alone: the help, as click prints it
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            where = f" (see {e.ctx.command_path} --help)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"featx: error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("featx: aborted", err=True)
            sys.exit(1)
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featx")
def main() -> None:
    """featx: pretrained-CNN features off the shelf. extract -> fit -> search -> finetune -> predict."""


@main.command()
@click.argument("data", type=click.Path())
@click.option("--layer", "layers", multiple=True,
              help="Layer to extract (repeatable): pool5, fc6, fc7 (AlexNet, VGG16), pool (ResNet), penultimate, "
                   "logits, or a node of the network's graph (featx backbones NAME --nodes).")
@click.option("--backbone", default="alexnet", show_default=True,
              help="Any torchvision classification model: alexnet, vgg16, resnet50, vit_b_16, convnext_tiny, ... "
                   "(featx backbones lists them).")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, random, or a state-dict file.")
@click.option("--split", default=None, help="Stratified split when DATA has none: test=0.15[,val=0.1].")
@click.option("--layout", default=None,
              help="Force DATA's layout instead of detecting it: oxford-pets, caltech101, caltech256, tiny-imagenet, "
                   "stanford-dogs, dogs-vs-cats, flowers102, class-folders, split-folders, csv (docs/datasets.md).")
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="Compute deeper layers from a shallower layer of the same images already in the cache.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--views", default=1, show_default=True, type=click.Choice(["1", "2", "5", "10"]),
              help="Rows per image: centre; +mirror; centre+4 corners; +their mirrors.")
@click.option("--normalize", default="weights", show_default=True, type=click.Choice(["weights", "dataset"]),
              help="Published mean/std of the weights, or the train split's own.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=None, type=int,
              help="CPU: lanes, threads that each decode a batch and run the network on it (default: one per core, "
                   "at most 4). CUDA: decode processes (default: one per core).")
@click.option("--threads", default=None, type=int,
              help="Torch intra-op threads (CPU: per lane; default: the cores shared out between the lanes).")
@click.option("--decode", default="threads", show_default=True, type=click.Choice(["threads", "processes"]),
              help="CPU: decode in the lanes' threads, or in --workers processes feeding one forward pass on all "
                   "cores. CUDA always decodes in processes.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision (changes the features slightly).")
@click.option("--shard-size", default=2048, show_default=True, type=int, help="Rows per HDF5 shard.")
@cache_option
@click.option("--strict", is_flag=True, help="Exit non-zero if any file had to be skipped.")
@quiet_option
@command
def extract(data, layers, backbone, weights, split, seed, views, normalize, batch_size, workers, threads, decode,
            device, amp, shard_size, cache, strict, quiet, layout=None, reuse=True):
    """Extract backbone activations of every image in DATA into a feature set."""
    from featx.extract import extract as run

    res = run(data, layers=layers, backbone=backbone, weights=weights, split=split, seed=seed, views=int(views),
              normalize=normalize, batch_size=batch_size, workers=workers, threads=threads, decode=decode,
              device=device, amp=amp, shard_size=shard_size, cache=cache, strict=strict,
              progress=None if not quiet else False, layout=layout, reuse=reuse)
    m = res.manifest
    counts = ", ".join(f"{k} {v}" for k, v in m.get("counts", {}).items())
    logger.info("%s: %d rows (%s), %d skipped", "extracted" if res.computed else "already extracted",
                m.get("n_rows", 0), counts, len(m.get("skipped", [])))
    _emit_path(res.path)


max_memory_option = click.option(
    "--max-memory", default=None,
    help="Memory the fit may use, e.g. 24G or 512M (default: 70% of available memory); the fastest way of "
         "fitting predicted to fit is chosen (docs/scale.md).")


def _fit_options(fn):
    for opt in reversed([
        click.argument("features", type=click.Path()),
        click.option("--layer", default=None, help="Feature layer (default: the feature set's first)."),
        click.option("--scale", default="standard", show_default=True, type=click.Choice(["standard", "l2", "none"]),
                     help="Feature scaling fitted on the train rows."),
        click.option("--split", default=None, help="Split to make when FEATURES records none (test=0.15)."),
        click.option("--seed", default=0, show_default=True, type=int),
        device_option,
        click.option("--stream/--no-stream", default=None,
                     help="Fit chunk by chunk, or in memory (default: the fastest way that fits --max-memory)."),
        max_memory_option,
        cache_option,
        quiet_option,
    ]):
        fn = opt(fn)
    return fn


def _run_fit(kind: str, features, params: dict, *, layer, scale, split, seed, device, stream, cache,
             max_memory=None) -> None:
    from featx.fit import FitResult, fit_head

    res = fit_head(features, kind, layer=layer, params=params, scale=scale, split=split, seed=seed, device=device,
                   stream=stream, cache=cache, max_memory=max_memory)
    assert isinstance(res, FitResult)
    m = res.metrics
    logger.info("%s %s head: test accuracy %.4f, train accuracy %.4f%s", "fitted" if res.computed else "reused",
                kind, m["test_accuracy"], m["train_accuracy"],
                f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else "")
    _emit_path(res.path)


@main.group()
def fit() -> None:
    """Fit a classical head (svm, logreg, mlp) on cached features."""


def _auto_or_number(ctx, param, value):
    """``--C``: ``auto`` or a positive number."""
    if value is None or str(value).lower() == "auto":
        return None if value is None else "auto"
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give auto or a positive number") from None
    if not number > 0:
        raise click.BadParameter(f"{value!r}: give auto or a positive number")
    return number


@fit.command("svm")
@_fit_options
@click.option("--C", "C", default="auto", show_default=True, callback=_auto_or_number,
              help="auto: chosen on 20% of the train rows held out (docs/fit.md); or a number, as in scikit-learn's "
                   "LinearSVC / SVC.")
@click.option("--kernel", default="linear", show_default=True, type=click.Choice(["linear", "rbf"]))
@click.option("--gamma", default="scale", show_default=True, help="RBF kernel width (scale, auto or a number).")
@command
def fit_svm(features, C, kernel, gamma, **kw):
    """Linear SVM (squared hinge, one-vs-rest; --kernel rbf: scikit-learn's SVC)."""
    kw.pop("quiet")
    params = {"C": C, "kernel": kernel}
    if kernel == "rbf":
        params["gamma"] = gamma if gamma in ("scale", "auto") else float(gamma)
    _run_fit("svm", features, params, **kw)


@fit.command("logreg")
@_fit_options
@click.option("--C", "C", default=1.0, show_default=True, type=float, help="As in scikit-learn's LogisticRegression.")
@command
def fit_logreg(features, C, **kw):
    """Multinomial logistic regression."""
    kw.pop("quiet")
    _run_fit("logreg", features, {"C": C}, **kw)


@fit.command("mlp")
@_fit_options
@click.option("--hidden", default=256, show_default=True, type=int, help="Hidden units (one hidden layer).")
@click.option("--dropout", default=0.5, show_default=True, type=float)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--weight-decay", default=1e-4, show_default=True, type=float)
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["adam", "sgd"]))
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--epochs", default=50, show_default=True, type=int)
@click.option("--patience", default=5, show_default=True, type=int, help="Early stopping patience (epochs).")
@command
def fit_mlp(features, hidden, dropout, lr, weight_decay, optimizer, momentum, batch_size, epochs, patience, **kw):
    """The one-hidden-layer MLP (256 ReLU units by default), early-stopped on validation rows."""
    kw.pop("quiet")
    _run_fit("mlp", features, {"hidden": hidden, "dropout": dropout, "lr": lr, "weight_decay": weight_decay,
                               "optimizer": optimizer, "momentum": momentum, "batch_size": batch_size,
                               "epochs": epochs, "patience": patience}, **kw)


@main.command()
@click.argument("head", type=click.Path())
@click.argument("features", type=click.Path())
@click.option("--split", default="all", show_default=True, type=click.Choice(["all", "train", "val", "test"]))
@cache_option
@quiet_option
@command
def evaluate(head, features, split, cache, quiet):
    """Measure a fitted HEAD on another feature set."""
    from featx.fit import evaluate as run

    res = run(head, features, split=split, cache=cache)
    logger.info("accuracy %.4f on %d rows", res.metrics["accuracy"], res.metrics["n"])
    _emit_path(res.path)


@main.command()
@click.argument("kind", type=click.Choice(["svm", "logreg", "mlp"]))
@click.argument("features", type=click.Path())
@click.option("--layer", default=None, help="Feature layer (default: the feature set's first).")
@click.option("--trials", default=20, show_default=True, type=int, help="Trials to add to the study.")
@click.option("--timeout", default=None, type=float, help="Stop adding trials after S seconds.")
@click.option("--storage", default=None, help="Optuna storage URL or journal file (default: one under the cache).")
@click.option("--study", default=None, help="Study name (default: from the features, head and layer).")
@click.option("--jobs", default=1, show_default=True, type=int, help="Worker processes sharing the study.")
@click.option("--cv", default=3, show_default=True, type=int, help="Folds when there is no val split.")
@click.option("--sampler", default="tpe", show_default=True, type=click.Choice(["tpe", "random"]))
@click.option("--split", default=None, help="Split to make when FEATURES records none (test=0.15).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--heartbeat", default=60, show_default=True, type=click.IntRange(min=1),
              help="Database storages: seconds between a running trial's heartbeats; a trial silent for 3 "
                   "heartbeats (dead worker or machine) is failed and queued again.")
@device_option
@max_memory_option
@cache_option
@quiet_option
@command
def search(kind, features, layer, trials, timeout, storage, study, jobs, cv, sampler, split, seed, heartbeat, device,
           cache, quiet, max_memory=None):
    """Search a head's hyperparameters with Optuna, then refit and save the best."""
    from featx.search import search as run

    res = run(features, kind, layer=layer, trials=trials, timeout=timeout, storage=storage, study=study, jobs=jobs,
              cv=cv, sampler=sampler, seed=seed, split=split, device=device, cache=cache, heartbeat=heartbeat,
              max_memory=max_memory)
    s = res.search
    logger.info("study %s: %d trials (%d finished, %d pruned, %d failed, %d running, %d waiting); best validation "
                "accuracy %.4f; refit head test accuracy %.4f", s["study"], s["trials"], s["finished"], s["pruned"],
                s["failed"], s["running"], s["waiting"], s["best_value"], res.metrics["test_accuracy"])
    _emit_path(res.path)


@main.command()
@click.argument("features", type=click.Path())
@click.option("--shots", default="1,2,4,8,16", show_default=True, help="Train images per class, comma-separated.")
@click.option("--draws", default=10, show_default=True, type=int, help="Seeded draws of the train images per k.")
@click.option("--head", "kind", default="logreg", show_default=True, type=click.Choice(["logreg", "svm", "mlp"]))
@click.option("--C", "C", default=None, callback=_auto_or_number,
              help="The logreg head's C (default 1.0) or the svm head's (default auto).")
@click.option("--layer", default=None, help="Feature layer (default: the feature set's first).")
@click.option("--scale", default="standard", show_default=True, type=click.Choice(["standard", "l2", "none"]),
              help="standard: mean/std of all the train rows (labels unused), shared by every draw.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the draws.")
@click.option("--split", default=None, help="Split to make when FEATURES records none (test=0.15).")
@device_option
@cache_option
@quiet_option
@command
def fewshot(features, shots, draws, kind, C, layer, scale, seed, split, device, cache, quiet):
    """Few-shot learning curve: a head fitted on k train images per class, R seeded draws per k (docs/fewshot.md)."""
    from featx.errors import UsageError
    from featx.fewshot import fewshot as run

    if C is not None and kind == "mlp":
        raise UsageError("--C is a parameter of the logreg and svm heads, not of mlp")
    res = run(features, shots=shots, draws=draws, head=kind, params={"C": C} if C is not None else None, layer=layer,
              scale=scale, seed=seed, split=split, device=device, cache=cache)
    s = res.summary
    if not res.computed:
        for p in s["per_k"]:
            logger.info("k=%d: accuracy %.4f +- %.4f over %d draws", p["k"], p["accuracy_mean"], p["accuracy_std"],
                        p["n_draws"])
    logger.info("%s few-shot curve of %s on %s: all %d train rows give %.4f", "computed" if res.computed else "cached",
                s["head"], s["layer"], s["full"]["n_train_rows"], s["full"]["accuracy"])
    _emit_path(res.path)


@main.command()
@click.argument("head", type=click.Path())
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--unfreeze", default="all", show_default=True,
              help="none|head (head only), fc, last:N, all, gradual (one more layer every --gradual-every epochs).")
@click.option("--gradual-every", default=1, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Learning rate of the head.")
@click.option("--backbone-lr-factor", default=0.1, show_default=True, type=float,
              help="The backbone learns at lr x this (x min(1, s^2), see --scale-backbone-lr).")
@click.option("--scale-backbone-lr/--no-scale-backbone-lr", default=True, show_default=True,
              help="Multiply the backbone's lr by min(1, s^2), s the median train std of the head's features "
                   "(about 1e-6 with random weights, 1 for features that vary by 1 or more).")
@click.option("--backbone-dropout", is_flag=True,
              help="Keep the backbone's dropout on in the layers that train (default: off, as at extraction).")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]))
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--schedule", default="cosine", show_default=True,
              type=click.Choice(["cosine", "step", "plateau", "none"]))
@click.option("--step-size", default=5, show_default=True, type=int, help="Epochs between x0.1 steps (step).")
@click.option("--plateau-patience", default=2, show_default=True, type=int)
@click.option("--augment", default="flip,crop", show_default=True,
              help="Comma list of none, flip, crop, resized-crop, jitter, sixview.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--early-stop", default=None, type=int, help="Stop after K epochs without validation improvement.")
@click.option("--resume/--no-resume", default=None, help="Continue from the last checkpoint (default: if any).")
@click.option("--workers", default=None, type=int, help="Decode processes.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--clip-grad", default=None, type=float,
              help="Clip each step's gradient to this L2 norm (default: no clipping; see grad_norm_max in "
                   "history.jsonl).")
@click.option("--recover", default=3, show_default=True, type=int,
              help="Retries of a diverged epoch (non-finite or exploding loss, non-finite gradient) at half the "
                   "learning rate.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision on CUDA.")
@cache_option
@quiet_option
@command
def finetune(head, resume, workers, device, cache, quiet, **options):
    """Put a fitted HEAD back on its backbone and train end to end."""
    from featx.finetune import FinetuneOptions
    from featx.finetune import finetune as run

    res = run(head, FinetuneOptions(**options), device=device, workers=workers, resume=resume, cache=cache,
              progress=False if quiet else None)
    m = res.metrics
    logger.info("test accuracy %.4f before fine-tuning, %.4f after (best epoch %s)",
                m["initial_test_accuracy"], m["test_accuracy"], m.get("best_epoch"))
    _emit_path(res.path)


@main.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option("--format", "fmt", default="csv", show_default=True, type=click.Choice(["csv", "json"]))
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="Decode processes.")
@device_option
@cache_option
@quiet_option
@command
def predict(model, inputs, top_k, fmt, batch_size, workers, device, cache, quiet):
    """Classify images (files or folders) with a fine-tuned MODEL or a HEAD; bad images get an error row.

    Prints the rows (CSV or JSON), then, as the last line, the directory in the cache that keeps them."""
    from featx.predict import format_predictions, predict_to_cache

    res = predict_to_cache(model, list(inputs), top_k=top_k, device=device, batch_size=batch_size,
                           workers=workers, cache=cache)
    click.echo(format_predictions(res.rows, fmt).rstrip("\n"))
    bad = sum(1 for r in res.rows if r.get("error"))
    if bad and not res.computed:  # when computed now, predict() has already said so
        logger.warning("%d of %d image(s) could not be classified (see the error column)", bad, len(res.rows))
    _emit_path(res.path)


@main.command()
@click.option("--weights", default=None,
              help="imagenet, random, or a state-dict file (default: imagenet if available).")
@cache_option
@device_option
@quiet_option
@command
def demo(weights, cache, device, quiet):
    """Run the whole pipeline on scikit-learn's 1,797 handwritten digits."""
    from featx.demo import run_demo

    out = run_demo(weights=weights, cache=cache, device=device)
    _emit_path(out)


@main.command("backbones")
@click.argument("name", required=False)
@click.option("--nodes", is_flag=True, help="With NAME: every node of its graph too, with shape, reduction and width.")
@click.option("--markdown", is_flag=True, help="A Markdown table (docs/backbones.md is made with it).")
@quiet_option
@command
def backbones_(name, nodes, markdown, quiet):
    """List the backbones (default layer, width, weights and their ImageNet accuracy), or NAME's layers."""
    from featx.backbones.listing import backbone_rows, format_layers, format_rows, layer_rows

    if name is None:
        click.echo(format_rows(backbone_rows(), markdown=markdown).rstrip("\n"))
    else:
        click.echo(format_layers(layer_rows(name, nodes=nodes), markdown=markdown).rstrip("\n"))


@main.command("ls")
@cache_option
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of the table.")
@quiet_option
@command
def ls_(cache, as_json, quiet):
    """List every feature set, head, model, study, run and prediction in the cache, with size, date and headline."""
    import json

    from featx.maintain import format_table, ls

    its = ls(cache)
    if as_json:
        click.echo(json.dumps([it.to_json() for it in its], indent=2, default=str))
    else:
        click.echo(format_table(its).rstrip("\n"))


@main.command()
@click.argument("path", required=False, type=click.Path())
@cache_option
@quiet_option
@command
def verify(path, cache, quiet):
    """Check every item under the cache, a folder of it (heads/) or one item; exit non-zero if any is damaged.

    PATH: the cache root, a kind folder, an item's directory or its key (default: the whole cache)."""
    from featx.maintain import verify as run

    rep = run(path, cache=cache)
    for note in rep.unverified:
        logger.warning("%s", note)
    for p in rep.problems:
        click.echo(p.line())
    logger.info("verified %d item(s): %d damaged", len(rep.checked), len({p.path for p in rep.problems}))
    if rep.problems:
        sys.exit(1)


@main.command()
@click.argument("names", nargs=-1, type=click.Path())
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--older-than", default=24.0, show_default=True, type=float,
              help="Hours without change after which an unfinished item is removed.")
@cache_option
@quiet_option
@command
def prune(names, dry_run, older_than, cache, quiet):
    """Remove the named items, or else leftovers of killed runs and unfinished items older than --older-than.

    Never removes an item a featx process is using (it holds the item's lock)."""
    from featx.maintain import human_size
    from featx.maintain import prune as run

    done = run(names, cache=cache, dry_run=dry_run, older_than=older_than * 3600)
    for p in done:
        click.echo(f"{p.action} {p.path} ({human_size(p.size)}): {p.reason}")
    gone = [p for p in done if p.action != "kept"]
    logger.info("%s %s in %d item(s)", "would free" if dry_run else "freed", human_size(sum(p.size for p in gone)),
                len(gone))


@main.command("run")
@click.argument("pipeline", type=click.Path())
@click.option("--data", default=None, type=click.Path(), help="Replaces the file's data path.")
@click.option("--weights", default=None, help="Replaces every backbone's weights: imagenet, random, or a file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Replaces any value of the file, by dotted key (repeatable): --set features.views=10.")
@click.option("--only", default=None, metavar="GLOB", help="Run only the cases whose name matches (comma: several).")
@click.option("--dry-run", is_flag=True, help="Read the data; list every case and what is cached or to compute.")
@device_option
@cache_option
@quiet_option
@command
def run_cmd(pipeline, data, weights, sets, only, dry_run, device, cache, quiet):
    """Run a pipeline file's cases (pipelines/*.toml) and write a results table: docs/pipelines.md."""
    from featx.run import run_pipeline

    res = run_pipeline(pipeline, data=data, weights=weights, sets=list(sets), only=only, dry_run=dry_run,
                       cache=cache, device=device, progress=False if quiet else None)
    if dry_run:
        click.echo("\n".join(res.lines))
        return
    _emit_path(res.path)
    if res.failed:
        click.echo(f"featx: error: {len(res.failed)} case(s) failed: {', '.join(res.failed)} "
                   f"(reasons in {res.path / 'results.csv'})", err=True)
        if res.no_space:  # exit code 75: free space and run the same command, finished work is kept
            sys.exit(DiskFullError.exit_code)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()


def entry() -> None:
    """The console script (and ``python -m featx``): :func:`main`, then a quicker exit.

    Once torch and torchvision are imported, the interpreter's final garbage collection walks their whole object
    graph, which took 1.3 s per command on the 2-core development machine; freezing the objects that are alive
    when the command ends skips that walk (0.3 s) and changes nothing else: every file is closed and every exit
    handler still runs."""
    try:
        main()
    finally:
        gc.freeze()
