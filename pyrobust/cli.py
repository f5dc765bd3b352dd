"""The ``pyrobust`` command line: thin commands over the library.

Results go to files and a short table to stdout; logs, warnings and progress go to stderr (progress only when
stderr is a terminal). Exit codes: 0 success, 1 a check failed, 2 usage error, 3 bad model or data, 4 internal error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import traceback
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import click

from pyrobust import __version__
from pyrobust.errors import DataError, Interrupted, InvalidInput, ModelError, OutputError, PyRobustError
from pyrobust.escape import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 4  # 3 (bad input) and 130 come from the errors
# An output that cannot be written once the work is under way (a full disk, a quota, a file system remounted
# read-only): an output error (exit 2), not an internal one.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
DEMO_MODEL = "mnist-cnn.onnx"


def _err(message: str) -> None:
    """One line on stderr. Messages quote names chosen by whoever made the model, data or results folder: escaped,
    so that none can forge a line, a CI workflow command or a terminal escape (pyrobust.escape)."""
    click.echo(f"pyrobust: {printable(message)}", err=True)


def _echo(text: str, *, lines: bool = False) -> None:
    """Results on stdout, escaped as :func:`_err` does; ``lines``: ``text`` is pyrobust's own multi-line output
    (JSON, whose strings are escaped already), each line escaped on its own."""
    if lines:
        for line in text.split("\n"):
            click.echo(printable(line))
    else:
        click.echo(printable(text))


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidInput(
            f"--{name} takes comma-separated numbers, one per channel (e.g. 0.1307); got {text!r}"
        ) from None


class _IntOrAuto(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"expected a whole number or 'auto'; got {value!r}", param, ctx)


INT_OR_AUTO = _IntOrAuto()


def _fraction(ctx, param, value):
    """Thresholds as fractions (0.85) or percentages (85%)."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"expected a fraction like 0.85 or a percentage like 85%; got {text!r}") from None
    if not 0 <= v <= 1:
        raise click.BadParameter(f"must be between 0 and 1 (0% and 100%); got {text!r}")
    return v


def _pixels(ctx, param, value):
    text = str(value).strip()
    if text.endswith("%"):
        return text  # resolved against the images' size once they are loaded
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"expected a whole number or a share such as 3.5%; got {text!r}") from None


def _corruption(ctx, param, value):
    if value is None:
        return None
    from perturbcore.families import parse

    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def noise_options(func):
    """The noise options (one per :class:`~pyrobust.types.NoiseSpec` field), shared by every command that runs the
    protocol; :func:`_settings` turns them into one ``noise`` value."""
    options = [
        click.option("--pixels", default="28", show_default=True, callback=_pixels,
                     help="Pixels drawn per step (with replacement): a count, or a share of the image such as 3.5% "
                          "(rounded up; recorded as the count)."),
        click.option("--max-steps", type=int, default=250, show_default=True, help="Noise steps per image."),
        click.option("--low", type=float, default=0.0, show_default=True, help="Lowest noise value."),
        click.option("--high", type=float, default=1.0, show_default=True, help="Noise values are < high (uniform)."),
        click.option("--scheme", type=click.Choice(["uniform", "salt-pepper"]), default="uniform", show_default=True),
        click.option("--mode", type=click.Choice(["restart", "cumulative"]), default="restart", show_default=True,
                     help="restart: each step perturbs the original; cumulative: a random walk."),
        click.option("--seed", type=int, default=0, show_default=True, help="Keys all the noise."),
        click.option("--mean", default=None, help="Normalise after the noise: per-channel means, e.g. 0.1307."),
        click.option("--std", default=None, help="Per-channel standard deviations, e.g. 0.3081."),
        click.option("--pixel-count", type=click.Choice(["fixed", "random"]), default="fixed", show_default=True,
                     help="fixed: every step draws --pixels pixels; random: a count uniform in 1..--pixels per step "
                          "(the paper's 'at most')."),
        click.option("--count-failures", is_flag=True,
                     help="Keep probing each image through all --max-steps steps and count its failing steps: an "
                          "exact interval on each image's failure probability (costs the steps after a failure)."),
        click.option("--noise", "corruption", default=None, callback=_corruption, metavar="FAMILY[:K=V,...]",
                     help="A noise family instead of the paper's L0 noise, e.g. gaussian:sigma=0.1 or patch:size=6 "
                          "(pyrobust families lists them); --pixels, --scheme, --low, --high and --pixel-count then "
                          "stay unset."),
        click.option("--step-offset", type=int, default=0, show_default=True,
                     help="Probe the draws of steps N+1..N+max-steps: a later block of the same (seed, image, step) "
                          "draws, fresh and none repeated (to extend a --count-failures run)."),
        click.option("--pixel-range", type=click.Choice(["0,1", "0,255"]), default=None,
                     callback=lambda ctx, param, v: None if v is None else (1 if v == "0,1" else 255),
                     help="Pixel values the model takes; images and noise are scaled to it (default: the model's "
                          "pyrobust metadata, 0,255 for an integer input, else 0,1)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def data_dir_option(help: str = "Where named datasets live (DIR/mnist/, DIR/fashion-mnist/); also $PYROBUST_DATA."):
    """``--data-dir``, the same option on every command that reads a named dataset."""
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=help)


def data_options(sample: bool = True):
    """The data selection (one option per :class:`~pyrobust.data.dataset.DataSelection` field, ``--range`` for
    start and stop): :func:`_settings` turns them into one ``data`` value."""
    def decorate(func):
        options = [
            click.option("--resize", default=None, help="Resample folder:PATH images to HEIGHTxWIDTH, e.g. 224x224."),
            data_dir_option(),
            click.option("--limit", type=int, default=None, help="Only the first N images (of the range)."),
            click.option("--range", "index_range", default=None,
                         help="Positions START:STOP of the dataset, e.g. 100:200."),
        ]
        if sample:
            options += [
                click.option("--sample", type=int, default=None,
                             help="A random N of the selected images (see --sample-seed)."),
                click.option("--sample-seed", type=int, default=0, show_default=True,
                             help="Seeds --sample's choice of images, apart from the noise --seed."),
            ]
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def run_options(checkpoints: bool = True):
    """The run options (one per :class:`~pyrobust.engine.plan.RunOptions` field): how a run uses the machine.
    ``checkpoints``: the command writes a run folder (``--checkpoint-every``)."""
    def decorate(func):
        options = [
            click.option("--batch-size", type=INT_OR_AUTO, default="auto", show_default=True,
                         help="Images per inference; auto measures the fastest for this model and machine (cached)."),
            click.option("--threads", type=int, default=None, help="CPU threads (default: all available)."),
            click.option("--chunk-size", type=int, default=4096, show_default=True,
                         help="Images converted to float at a time (bounds memory)."),
            click.option("--max-memory", "max_memory_mb", type=float, default=None,
                         help="MiB pyrobust may use for data and buffers (default: 80% of available memory)."),
            click.option("--custom-ops", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="A custom-op library for onnxruntime to load (never loaded unless named)."),
            click.option("--output", default=None,
                         help="The model output holding the class scores (needed when several could be)."),
            click.option("--sessions", type=INT_OR_AUTO, default="auto", show_default=True,
                         help="Parallel onnxruntime sessions sharing --threads; auto measures the fastest split "
                              "(cached)."),
            click.option("--scheduler", default=None,
                         help="Run on Dask: local:N (N worker processes here) or tcp://HOST:PORT (needs "
                              "pyrobust[dask])."),
            click.option("--shard-size", type=int, default=None,
                         help="Images per shard with --sessions > 1 or --scheduler."),
            click.option("--retune", is_flag=True,
                         help="Measure the batch size and session layout again (ignore the cache)."),
        ]
        if checkpoints:
            options.append(click.option("--checkpoint-every", type=float, default=30.0, show_default=True,
                                        help="Seconds between checkpoints of the per-image state."))
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def _settings(func):
    """Innermost decorator of a command with :func:`noise_options`, :func:`run_options` and (optionally)
    :func:`data_options`: their values arrive as ``noise`` (a NoiseSpec), ``options`` (a RunOptions) and ``data``
    (a DataSelection), each built once here."""
    import functools

    @functools.wraps(func)
    def wrapper(**kwargs):
        from dataclasses import fields

        from pyrobust.data.dataset import DataSelection, parse_range
        from pyrobust.engine.plan import RunOptions
        from pyrobust.types import NoiseSpec

        noise = {f.name: kwargs.pop(f.name) for f in fields(NoiseSpec) if not f.metadata.get("derived")}
        for name in ("mean", "std"):
            noise[name] = _floats(noise[name], name)
        options = {f.name: kwargs.pop(f.name) for f in fields(RunOptions) if f.name in kwargs}
        records = {"noise": NoiseSpec(**noise), "options": RunOptions(**options)}
        if "index_range" in kwargs:
            index_range = kwargs.pop("index_range")
            start, stop = parse_range(index_range) if index_range else (None, None)
            picked = {f.name: kwargs.pop(f.name) for f in fields(DataSelection) if f.name in kwargs}
            records["data"] = DataSelection(start=start, stop=stop, **picked)
        return func(**records, **kwargs)

    return wrapper


_QUIET = {"on": False}  # set by --quiet on the command being run; main() resets it


def _quiet_option(func):
    def remember(ctx, param, value):
        _QUIET["on"] = bool(value)
        return value

    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=remember, is_eager=True,
                        help="No progress output (results and errors are still printed).")(func)


_WATCHDOG: dict = {"dog": None}


def _timeout_option(func):
    def arm(ctx, param, value):
        if value is not None:
            if not 0 < value < 10**7:
                raise click.BadParameter(f"must be a number of seconds > 0; got {value}")
            if _WATCHDOG["dog"] is not None:
                _WATCHDOG["dog"].set_timeout(value)
        return value

    return click.option("--timeout", type=float, default=None, expose_value=False, callback=arm,
                        help="Stop after this many seconds (exit 130, checkpoint saved), even inside a model that "
                             "never returns.")(func)


def _interruption(message: str) -> str:
    dog = _WATCHDOG["dog"]
    if dog is not None and dog.reason == "timeout":
        return f"timed out after {dog.timeout:g} s (--timeout); {message}"
    return message


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _Lines:
    """Progress when stderr is not a terminal (a CI log): a plain line every ``every`` seconds with images done,
    rate and ETA, so a runner's no-output timeout never fires and the log says where the run is."""

    def __init__(self, label: str, every: float) -> None:
        import time

        self.label, self.every, self.clock = label, every, time.monotonic
        self.start = self.last = self.clock()

    def status(self, text: str) -> None:
        """Nothing in a log: the first progress line follows within seconds, and an error stays one line."""

    def __call__(self, done: int, total: int, inferences: int) -> None:
        now = self.clock()
        if now - self.last < self.every and done < total:
            return
        if done >= total and now - self.last < self.every and now - self.start < self.every:
            return  # a short run: the summary says it all
        self.last = now
        took = now - self.start
        rate = inferences / took if took > 0 else 0.0
        eta = (total - done) * took / done if done else None
        click.echo(printable(f"{self.label}: {done:,}/{total:,} images ({done / max(total, 1):.0%}), {rate:,.0f} "
                             f"inferences/s, elapsed {_fmt_seconds(took)}"
                             + (f", ETA {_fmt_seconds(eta)}" if eta is not None else "")), err=True)


@contextmanager
def _progress(label: str):
    """A progress reporter for the engine (call it with (done, total, inferences); ``.status(text)`` says what is
    happening before the first image): a bar on stderr when it is a terminal, plain lines every
    $PYROBUST_PROGRESS_SECONDS (default 10) seconds otherwise, nothing with --quiet."""
    if _QUIET["on"]:
        yield None
        return
    if not sys.stderr.isatty():
        yield _Lines(label, float(os.environ.get("PYROBUST_PROGRESS_SECONDS", "10")))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        label = escape(printable(label))  # a bar's text is rich markup: "[...]" in a name must not become style
        task = bar.add_task(f"{label}: starting", total=None, rate="")

        class _Bar:
            t: float | None = None

            def status(self, text: str) -> None:
                bar.update(task, description=f"{label}: {escape(printable(text))}")

            def __call__(self, done: int, total: int, inferences: int) -> None:
                import time

                now = time.perf_counter()
                if self.t is None:
                    self.t = now
                    bar.update(task, description=label)
                rate = inferences / (now - self.t) if now > self.t else 0.0
                bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} inf/s")

        yield _Bar()


def _rich(text: object) -> str:
    """A foreign string in a rich table: printable, and its "[...]" kept as text rather than read as style markup."""
    from rich.markup import escape

    return escape(printable(text))


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _print_summary(summary: dict, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    m = summary["metrics"]
    p = summary["performance"]

    def rate(r: dict) -> str:
        lo, hi = r["ci95"]
        if r["fraction"] is None:
            return "n/a"
        return f"{r['fraction']:.2%}  [{lo:.2%}, {hi:.2%}]  ({r['count']}/{r['of']})"

    t = Table(title=f"{_rich(summary['model']['name'])} on {_rich(summary['dataset']['spec'])} "
                    f"({_count(m['images'], 'image')})",
              show_header=False, title_justify="left")
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("accuracy (clean)", rate(m["accuracy"]))
    sev = summary.get("severity")
    t.add_row("robust, of all images", rate(m["robust"]) + (" (survive all 5 severities)" if sev else ""))
    t.add_row("robust, of correct ones", rate(m["robust_of_correct"]))
    step = m["first_failure_step"]
    if sev:
        first = ", ".join(f"{lv['first_failing']} at {lv['severity']}" + (f" ({lv['setting']})" if lv.get("setting")
                                                                            else "") for lv in sev["levels"])
        t.add_row("first failing severity", first)
    elif step["median"] is not None:
        t.add_row("first-failure step", f"median {step['median']:.0f}, mean {step['mean']:.1f}")
    fp = summary.get("failure_probability")
    if fp and fp["images"]:
        worst = fp["most_fragile"][0] if fp["most_fragile"] else None
        text = (f"mean p̂ {fp['mean']:.3%} per step ({fp['method']}); never fooled: p <= "
                f"{fp['never_failed_upper_bound']:.2%} at {fp['confidence']:.0%}")
        if worst is not None:
            lo, hi = worst["interval"]
            text += f"; most fragile #{worst['index']}: p̂ {worst['p_hat']:.1%} [{lo:.1%}, {hi:.1%}]"
        t.add_row("failure probability", text)
    budget = summary.get("budget")
    if budget:
        t.add_row("step budget", f"{budget['max_steps']} steps: {budget['claim']}")
    margin = summary.get("clean_margin")
    if margin and margin.get("auc") is not None:
        lo, hi = margin["interval"]
        t.add_row("clean margin", f"AUC {margin['auc']:.3f} [{lo:.3f}, {hi:.3f}] for telling robust from fooled "
                                  "images (1.0: one clean pass would tell)")
    if m["nonfinite_outputs"]:
        t.add_row("non-finite outputs", str(m["nonfinite_outputs"]))
    prec = summary.get("precision")
    if prec:
        t.add_row("precision", f"{prec['reason']}; sequential 95% intervals: robust "
                               f"[{prec['robust']['interval'][0]:.2%}, {prec['robust']['interval'][1]:.2%}], accuracy "
                               f"[{prec['accuracy']['interval'][0]:.2%}, {prec['accuracy']['interval'][1]:.2%}]")
    from pyrobust.store.results import noise_of

    n, s = noise_of(summary), summary["settings"]
    values = f"{{{n.low}, {n.high}}}" if n.scheme == "salt-pepper" else f"[{n.low}, {n.high})"
    what = (n.corruption.text() if n.corruption is not None
            else f"{_count(int(n.pixels), 'pixel')}, {n.scheme} {values}")
    t.add_row("noise", f"{what}, " + (f"severities 1-{n.max_steps}" if n.is_sweep else
                                        f"{_count(n.max_steps, 'step')}, {n.mode}, seed {n.seed}")
                       + (", every step counted" if n.count_failures else ""))
    par = s.get("parallel") or {}
    if "workers" in par:
        t.add_row("ran on", f"Dask {par['scheduler']}: {_count(par['workers'], 'worker')}, "
                            f"{_count(par['shards'], 'shard')}")
    elif par.get("sessions", 1) > 1:
        t.add_row("ran on", f"{par['sessions']} sessions × {_count(par['threads_per_session'], 'thread')}, "
                            f"{_count(par.get('shards', 0), 'shard')} (layout {par['choice']})")
    t.add_row("batch size", f"{s['batch_size']} ({s.get('batch_size_choice', 'given')})")
    ips = p["inferences_per_second"]
    t.add_row("work", f"{p['inferences']:,} inferences in {p['seconds']:.1f} s ({ips:,.0f}/s)" if ips else "-")
    Console().print(t)
    if out is not None:
        _echo(f"results written to {out}")


def _run_evaluation(model, dataset, *, out, overwrite, report, json_out, **kwargs) -> int:
    from pyrobust.evaluation import evaluate

    with warnings.catch_warnings(record=True) as caught, _progress("evaluating") as progress:
        warnings.simplefilter("always")
        result = evaluate(model, dataset, out=out, overwrite=overwrite, report=report, progress=progress,
                          status=getattr(progress, "status", None), **kwargs)
    for w in caught:
        _err(f"warning: {w.message}")
    if result.already_complete:
        _err(f"{result.out} already holds the finished run; nothing to resume")
    elif result.resumed:
        _err(f"resumed the run in {result.out}")
    if json_out:
        _echo(json.dumps(result.summary, indent=2), lines=True)
    else:
        _print_summary(result.summary, result.out)
    return EXIT_OK


_OUTPUTS = ("out", "junit", "summary", "dest")
_DATASET_PARAMS = ("dataset", "test_dataset")


def _written(command: str, name: str, path: Path) -> list[Path]:
    """The files ``command`` writes for its output parameter ``name`` = ``path`` (a folder's files by name)."""
    if command in ("evaluate", "demo") and name == "out":
        from pyrobust.store.results import RUN_FILES

        return [path / f for f in (*RUN_FILES, "checkpoint.npz")]
    if command == "gate" and name == "out":
        return [path / "gate.json"]
    if command == "compare":
        return [path / f for f in ("compare.json", "compare.md", "survival_compare.png")]
    if command == "agreement":
        return [path / f for f in ("agreement.json", "agreement.md", "agreement.png")]
    if command == "select":
        return [path, path.with_suffix(".json")] if path.suffix == ".npz" else \
            [path / "subset.npz", path / "selection.json"]
    if command in ("reproduce", "data") or path.is_dir():
        return []  # a folder of its own layout (or a fetch destination): it holds no inputs of the command
    return [path]


def _dataset_path(spec) -> Path | None:
    if not isinstance(spec, str):
        return None
    target = spec.removeprefix("folder:")
    for split in (":train", ":test"):
        target = target.removesuffix(split)
    return Path(target) if target and os.path.lexists(target) else None


def _refuse_inputs_as_outputs(ctx: click.Context) -> None:
    """Every command: before any work, no output may be one of the command's inputs (models, data, results
    folders, configs), by path, symbolic link or hard link."""
    from pyrobust.files import refuse_inputs_as_outputs

    name = ctx.command.name or ""
    inputs, outputs = [], []
    config = ctx.meta.get("pyrobust.config")
    if config is not None:
        inputs.append(("--config", Path(config)))
    for key, value in ctx.params.items():
        flag = "--" + key.replace("_", "-")
        if key in _OUTPUTS:
            if isinstance(value, Path):
                outputs += [(flag, p) for p in _written(name, key, value)]
            continue
        if key in _DATASET_PARAMS:
            value = _dataset_path(value)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, Path):
                what = flag if key not in ("model", "candidate", "results", "a", "b", "subset", "runs") else key.upper()
                inputs.append((what, v))
                if v.is_dir():  # a results folder: its files are the inputs
                    from pyrobust.store.results import RUN_FILES

                    inputs += [(what, v / f) for f in RUN_FILES if (v / f).is_file()]
    if name == "gate" and os.environ.get("GITHUB_STEP_SUMMARY"):
        outputs.append(("$GITHUB_STEP_SUMMARY", Path(os.environ["GITHUB_STEP_SUMMARY"])))
    refuse_inputs_as_outputs(outputs, inputs)


class _Command(click.Command):
    def invoke(self, ctx: click.Context):
        _refuse_inputs_as_outputs(ctx)
        return super().invoke(ctx)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups (pyrobust data) are _Groups too, and their commands _Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="pyrobust")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def cli(debug: bool) -> None:
    """Measure how robust image classifiers (ONNX) are to random sparse (L0) noise."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", "dataset", required=True,
              help="mnist:test, fashion-mnist:train, cifar10:test, sample, a .npz file (x, y), FOLDER:SPLIT of IDX "
                   "files, or folder:PATH (a sub-folder of images per class).")
@data_options(sample=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for results and figures.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in --out.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same model, data, settings).")
@click.option("--precision", callback=_fraction, default=None,
              help="Stop once the 95% intervals of robust fraction and accuracy are within ± this (0.01 or 1%), "
                   "taking images in a seeded random order.")
@click.option("--max-failure-prob", callback=_fraction, default=None,
              help="Set --max-steps from a target: the budget at which an image never fooled has a per-step failure "
                   "probability at most this (1% or 0.01) at --confidence (299 steps for 1% at 95%).")
@click.option("--confidence", callback=_fraction, default="95%", show_default=True,
              help="Confidence of --max-failure-prob's claim.")
@click.option("--familywise", is_flag=True,
              help="--max-failure-prob's claim holds for every image of the set at once (Bonferroni over them).")
@click.option("--no-report", is_flag=True, help="Skip the PNG figures.")
@click.option("--json", "json_out", is_flag=True, help="Print summary.json to stdout instead of the table.")
@noise_options
@run_options()
@_quiet_option
@_timeout_option
@_settings
def evaluate(model, dataset, out, overwrite, resume, precision, max_failure_prob, confidence, familywise, no_report,
             json_out, output, noise, options, data) -> int:
    """Evaluate MODEL (an ONNX file) under random L0 noise and write results to --out.

    Example: pyrobust evaluate model.onnx --dataset mnist:test --data-dir ../shared/data --out runs/mnist
    """
    target = _target(max_failure_prob, confidence, familywise)
    return _run_evaluation(model, dataset, data=data, out=out, overwrite=overwrite, resume=resume,
                           precision=precision, target=target, report=not no_report, json_out=json_out,
                           output=output, noise=noise, options=options)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", "dataset", default="sample", show_default=True,
              help="As evaluate's --dataset (the bundled sample by default).")
@data_options(sample=True)
@click.option("--family", "families", multiple=True, metavar="FAMILY[:K=V,...]",
              help="A family to run, at its five severities (repeat the option; default: every family that applies "
                   "to the images; pyrobust families lists them).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for profile.json, profile.md, profile.png and profile.html.")
@click.option("--overwrite", is_flag=True, help="Replace a profile already in --out.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Another model's profile (its folder or profile.json, same images): adds the relative mCE.")
@click.option("--max-steps", type=int, default=250, show_default=True,
              help="Draws per image at each level of a random family (a sweep's steps are its 5 severities).")
@click.option("--seed", type=int, default=0, show_default=True, help="Keys all the noise.")
@click.option("--mean", default=None, help="Normalise after the noise: per-channel means, e.g. 0.1307.")
@click.option("--std", default=None, help="Per-channel standard deviations, e.g. 0.3081.")
@click.option("--pixel-range", type=click.Choice(["0,1", "0,255"]), default=None,
              callback=lambda ctx, param, v: None if v is None else (1 if v == "0,1" else 255),
              help="Pixel values the model takes (default: as evaluate decides).")
@click.option("--json", "json_out", is_flag=True, help="Print profile.json to stdout instead of the table.")
@run_options(checkpoints=False)
@_quiet_option
@_timeout_option
def profile(model, dataset, families, out, overwrite, baseline, max_steps, seed, mean, std, pixel_range, json_out,
            index_range, **kwargs) -> int:
    """Profile MODEL under every noise family and severity sweep at five severities each: one table, one figure
    and a mean error, in --out.

    Example: pyrobust profile model.onnx --dataset sample --limit 200 --max-steps 100 --out runs/profile
    """
    from pyrobust.data.dataset import parse_range
    from pyrobust.profiles import profile as run_profile

    settings = {k: v for k, v in kwargs.items() if v is not None}
    if index_range:
        settings["start"], settings["stop"] = parse_range(index_range)
    for name, text in (("mean", mean), ("std", std)):
        if text is not None:
            settings[name] = _floats(text, name)
    if pixel_range is not None:
        settings["pixel_range"] = pixel_range
    def progress(done, total, text):  # one line per run: each is short, and a run's own bar would mislead
        if not _QUIET["on"]:
            _err(f"profile: {done}/{total} runs done ({text})")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_profile(model, dataset, families=list(families) or None, out=out, overwrite=overwrite,
                             baseline=baseline, max_steps=max_steps, seed=seed, progress=progress, **settings)
    for message in dict.fromkeys(str(w.message) for w in caught):
        _err(f"warning: {message}")
    if json_out:
        click.echo(json.dumps(result.to_dict(), indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{_rich(str(result.model.get('name')))} on {_rich(str(result.dataset.get('spec')))}: robust "
                    f"fraction by severity (clean accuracy {result.accuracy['fraction']:.1%})", title_justify="left")
    t.add_column("family")
    for lv in range(1, 6):
        t.add_column(str(lv), justify="right")
    t.add_column("mean error", justify="right")
    for fam in result.families:
        cells = [f"{v:.1%}" for v in result.robust(fam)]
        t.add_row(fam, *cells, *[""] * (5 - len(cells)), f"{result.summary['per_family'][fam]['mean_error']:.1%}")
    Console().print(t)
    click.echo(f"mean error {result.summary['mean_error']:.2%}"
               + (f"; relative mCE {result.summary['relative_mce']['value']:.3f}" if "relative_mce" in result.summary
                  else ""))
    for sk in result.summary["skipped"]:
        click.echo(f"not run: {sk['family']} ({sk['why']})")
    click.echo(f"profile written to {out}")
    return 0


@cli.command()
@click.option("--json", "json_out", is_flag=True, help="Print the families and their parameters as JSON.")
@click.option("--markdown", is_flag=True, help="Print them as the README's Markdown table.")
def families(json_out, markdown) -> int:
    """List the noise families (--noise, --family) with their parameters, defaults and ranges."""
    from perturbcore.families import describe, markdown_table

    if markdown:
        click.echo(markdown_table(), nl=False)
        return 0
    rows = describe()
    if json_out:
        click.echo(json.dumps(rows, indent=1, default=str))
        return 0
    for r in rows:
        params = ", ".join(f"{p['name']}={p['default']} ({p['range']}{' ' + p['unit'] if p['unit'] else ''})"
                           for p in r["parameters"]) or "no parameters"
        click.echo(f"{r['name']:14s} {r['kind']:6s} {r['summary']}; {params}")
    return 0


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", default="sample", show_default=True,
              help="As evaluate's --dataset (the bundled sample by default).")
@data_options(sample=True)
@click.option("--family", default="gaussian", show_default=True, metavar="FAMILY[:K=V,...]",
              help="A random family with a severity (gaussian, uniform, l2, shot, speckle, impulse, dropout, patch, "
                   "translate, rotate); its other parameters stay as given.")
@click.option("--q", "q", callback=_fraction, default="10%", show_default=True,
              help="The failure probability that counts as failing (0.1 or 10%).")
@click.option("--levels", default=None,
              help="The ladder, least severe first, comma-separated (default: 12 geometric levels around the "
                   "family's profile ladder).")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Draws per image at each level, at most.")
@click.option("--looks", type=int, default=4, show_default=True,
              help="Blocks of draws at each level; an image stops once its exact interval excludes q (1: fixed).")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="Confidence of each level's decision, spent equally over the looks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Keys all the noise.")
@click.option("--mean", default=None, help="Normalise after the noise: per-channel means, e.g. 0.1307.")
@click.option("--std", default=None, help="Per-channel standard deviations, e.g. 0.3081.")
@click.option("--pixel-range", type=click.Choice(["0,1", "0,255"]), default=None,
              callback=lambda ctx, param, v: None if v is None else (1 if v == "0,1" else 255),
              help="Pixel values the model takes (default: as evaluate decides).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for severity.json and severity.md.")
@click.option("--overwrite", is_flag=True, help="Replace a severity.json already in --out.")
@click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON.")
@run_options(checkpoints=False)
@_quiet_option
@_timeout_option
def severity(model, dataset, family, q, levels, max_steps, looks, confidence, seed, mean, std, pixel_range, out,
             overwrite, json_out, index_range, **kwargs) -> int:
    """Each image's severity at failure: the smallest level of FAMILY's parameter (sigma, size, shift, ...) at
    which its per-step failure probability exceeds --q, by bisection with a sequential test at each level.

    Example: pyrobust severity model.onnx --family patch --q 10% --limit 200 --out runs/severity-patch
    """
    from pyrobust.data.dataset import parse_range
    from pyrobust.severity import check_out, failure_severity

    settings = {k: v for k, v in kwargs.items() if v is not None}
    if index_range:
        settings["start"], settings["stop"] = parse_range(index_range)
    for name, text in (("mean", mean), ("std", std)):
        if text is not None:
            settings[name] = _floats(text, name)
    if pixel_range is not None:
        settings["pixel_range"] = pixel_range
    if out is not None:
        check_out(out, overwrite=overwrite)  # before any work
    ladder = _floats(levels, "levels") if levels is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = failure_severity(model, dataset, family=family, q=q, levels=ladder, max_steps=max_steps, looks=looks,
                             confidence=confidence, seed=seed, **settings)
    for message in dict.fromkeys(str(w.message) for w in caught):
        _err(f"warning: {message}")
    if out is not None:
        r.save(out, overwrite=overwrite)
    d = r.to_dict()
    if json_out:
        click.echo(json.dumps(d, indent=1))
        return EXIT_OK
    median = "beyond the ladder" if d["median"] is None else f"{d['median']:g}"
    _echo(f"{r.family}: median {r.parameter} at which p > {r.q:g}: {median} ({d['images']} images; "
          f"{d['beyond_ladder']} beyond the ladder, {d['wrong_before_noise']} wrong before any noise, "
          f"{d['undecided']} undecided)")
    _echo(f"{d['inferences']:,} inferences (every level at {r.max_steps} draws: about {d['inferences_fixed']:,})")
    from pyrobust.severity import steps_to_decide

    need = steps_to_decide(r.q, r.confidence, r.looks)
    if need > r.max_steps:
        _err(f"warning: an image never fooled is shown below q={r.q:g} only after {need} draws, more than "
             f"--max-steps {r.max_steps}, so no level can be decided on that side; raise --max-steps")
    elif d["undecided"]:
        _echo(f"{d['undecided']} image(s) had a level whose failure probability lay too near q to decide in "
              f"{r.max_steps} draws: each was placed by its estimate, and its severity is right to within a rung")
    if out is not None:
        _echo(f"wrote {out / 'severity.json'}, {out / 'severity.md'}")
    return EXIT_OK


def _target(max_failure_prob, confidence, familywise):
    """The failure-probability target of --max-failure-prob, refused beside an explicit --max-steps."""
    from pyrobust.types import FailureTarget

    ctx = click.get_current_context()
    if max_failure_prob is None:
        if familywise or ctx.get_parameter_source("confidence") == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("--confidence and --familywise qualify --max-failure-prob; give it too")
        return None
    if ctx.get_parameter_source("max_steps") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --max-steps or --max-failure-prob (which sets the step budget), not both")
    return FailureTarget(max_failure_prob, confidence, familywise)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("pyrobust-demo"), show_default=True,
              help="Folder for the demo's results and figures.")
@click.option("--limit", type=int, default=None, help="Only the first N sample images.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all available).")
@click.option("--overwrite", is_flag=True, help="Replace whatever run --out holds, not only an earlier demo.")
@_quiet_option
def demo(out, limit, threads, overwrite) -> int:
    """Run the bundled MNIST model on the bundled MNIST sample with the paper's settings (offline).

    Replaces an earlier demo's results in --out (only a demo's: another run there is refused without --overwrite).

    Example: pyrobust demo --out pyrobust-demo
    """
    from pyrobust.data.dataset import DataSelection
    from pyrobust.engine.plan import RunOptions
    from pyrobust.store.rundir import holds_only_runs_of

    data, options = DataSelection(limit=limit), RunOptions(threads=threads)  # refused here before anything else
    ref = resources.files("pyrobust") / "assets" / DEMO_MODEL
    with resources.as_file(ref) as model:
        if not overwrite and not holds_only_runs_of(out, model, dataset="sample"):
            raise OutputError(f"{out}: holds a run that is not a pyrobust demo; pyrobust demo replaces only an "
                              "earlier demo. Choose another --out, or pass --overwrite to replace it")
        return _run_evaluation(model, "sample", data=data, options=options, out=out, overwrite=True, report=True,
                               json_out=False)


@cli.command()
@click.option("--dataset", required=True, help="Training data, e.g. mnist:train or fashion-mnist:train.")
@data_dir_option()
@click.option("--limit", type=int, default=None, help="Only the first N training images.")
@click.option("--arch", type=click.Choice(["cnn", "mlp"]), default="cnn", show_default=True,
              help="Network: a two-convolution CNN or a one-hidden-layer MLP.")
@click.option("--epochs", type=int, default=5, show_default=True, help="Passes over the training images.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Training images per Adam step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation, shuffling and sampling.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all available).")
@click.option("--test-dataset", default=None, help="Report clean accuracy on this dataset too, e.g. mnist:test.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file to write.")
def train(dataset, data_dir, limit, arch, epochs, batch_size, lr, seed, threads, test_dataset, out) -> int:
    """Train a small classifier with torch and export it to ONNX (needs pyrobust[train]).

    Example: pyrobust train --dataset mnist:train --data-dir ../shared/data --epochs 5 --out mnist-cnn.onnx
    """
    from pyrobust.data.load import load_dataset
    from pyrobust.training import train as train_model

    ds = load_dataset(dataset, data_dir=data_dir, limit=limit)
    test = load_dataset(test_dataset, data_dir=data_dir) if test_dataset else None
    report = train_model(ds, out=out, architecture=arch, epochs=epochs, batch_size=batch_size, learning_rate=lr,
                         seed=seed, threads=threads, n_classes=max(ds.n_classes, test.n_classes if test else 0),
                         test=test, log=lambda line: _err(line))
    _echo(f"wrote {report.out} ({report.architecture}, {report.epochs} epochs, seed {report.seed}, "
               f"{report.train_images} images, {report.seconds:.1f} s)")
    _echo(f"train accuracy {report.train_accuracy:.2%}; torch vs onnxruntime max |diff| "
               f"{report.parity_max_abs_diff:.2g}; sha256 {report.sha256}")
    if report.test_accuracy is not None:
        where = test.spec if test else test_dataset
        _echo(f"test accuracy on {where}: {report.test_accuracy:.2%} ({report.test_images} images)")
    return EXIT_OK


@cli.command()
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=int, required=True, help="Images to take per class (paper: 1500).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation, shuffling and sampling.")
@click.option("--shortfall", type=click.Choice(["all", "replace", "fill"]), default="all", show_default=True,
              help="A class with too few robust images: take them all, sample with replacement, or fill up with the "
                   "most robust non-robust ones.")
@data_dir_option("Where the data is now, if it moved since the run.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="subset.npz, or a folder.")
@click.option("--allow-test-split", is_flag=True, help="Select from an evaluation of a test split anyway.")
def select(results, per_class, seed, shortfall, data_dir, out, allow_test_split) -> int:
    """Keep the robust images (never fooled) of an evaluated training set, PER_CLASS per class.

    Writes x, y and source_index (original indices) to an .npz, and the per-class table to a .json beside it.

    Example: pyrobust select runs/train --per-class 1500 --seed 0 --out subset.npz
    """
    from rich.console import Console
    from rich.table import Table

    from pyrobust.study.selection import select_from_results

    sel, npz = select_from_results(results, per_class=per_class, seed=seed, shortfall=shortfall, out=out,
                                   data_dir=data_dir, allow_test_split=allow_test_split)
    from pyrobust.store.results import load_results

    names = {r["class"]: r["name"] for r in load_results(results)[1]["per_class"]}
    t = Table("class", "asked", "available", "taken", "filled", title=f"selection ({_count(sel.n, 'image')})",
              title_justify="left")
    for r in sel.table:
        name = names.get(r["class"], str(r["class"]))
        shown = _rich(name if name == str(r["class"]) else f"{r['class']} {name}")
        t.add_row(shown, str(r["asked"]), str(r["available"]),
                  f"{r['taken']}{' (with replacement)' if r['replaced'] else ''}", str(r["filled"]))
    Console().print(t)
    if sel.short_classes and shortfall == "all":
        short = ", ".join(names.get(k, str(k)) for k in sel.short_classes)
        _err(f"warning: classes {short} have fewer robust images than asked; "
             "took all of them (see --shortfall)")
    _echo(f"wrote {npz}")
    return EXIT_OK


@cli.command()
@click.argument("subset", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--like", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A model made by pyrobust train: its architecture and settings are reused.")
@click.option("--epochs", type=int, default=None, help="Override the recorded number of epochs.")
@click.option("--seed", type=int, default=None, help="Override the recorded seed.")
@click.option("--from", "init_from", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from this model's weights (fine-tune; usually the --like model) instead of a fresh start.")
@click.option("--same-updates", is_flag=True,
              help="As many training steps as the --like model took, not as many epochs.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all available).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file to write.")
def retrain(subset, like, epochs, seed, init_from, same_updates, threads, out) -> int:
    """Train the architecture of --like, with its recorded settings, on SUBSET (from pyrobust select).

    Example: pyrobust retrain subset.npz --like mnist-cnn.onnx --out mnist-cnn-robust.onnx
    """
    from pyrobust.data.load import load_dataset
    from pyrobust.training import retrain as do_retrain

    ds = load_dataset(str(subset))
    report = do_retrain(ds, like=like, out=out, threads=threads, epochs=epochs, seed=seed, init_from=init_from,
                        same_updates=same_updates, log=lambda line: _err(line))
    how = f", fine-tuned from {init_from}" if init_from else ""
    _echo(f"wrote {report.out} ({report.architecture}, {report.epochs} epochs{how}, seed {report.seed}, "
               f"{report.train_images} images, {report.seconds:.1f} s); train accuracy {report.train_accuracy:.2%}")
    return EXIT_OK


@cli.command()
@click.option("--dataset", required=True, help="mnist, fashion-mnist, or a folder of MNIST-named IDX files.")
@data_dir_option()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Study folder (resumable).")
@click.option("--per-class", type=int, default=1500, show_default=True,
              help="Robust training images to keep per class (paper: 1500).")
@click.option("--shortfall", type=click.Choice(["all", "replace", "fill"]), default="all", show_default=True,
              help="A class with too few robust images: take all, sample with replacement, or fill with the most "
                   "robust others.")
@click.option("--arch", type=click.Choice(["cnn", "mlp"]), default="cnn", show_default=True,
              help="Network: a two-convolution CNN or a one-hidden-layer MLP.")
@click.option("--epochs", type=int, default=10, show_default=True,
              help="Passes over the training images, for M, M_R and M_rand.")
@click.option("--train-sample", type=int, default=None, help="A random N of the training images (seeded).")
@click.option("--test-sample", type=int, default=None, help="A random N of the test images (seeded).")
@click.option("--schemes", is_flag=True, help="Also evaluate M with salt-and-pepper values and the random walk.")
@click.option("--quick", is_flag=True,
              help="A few hundred images, few steps, 2 epochs: the whole pipeline in about 15 s (a smoke test, not "
                   "results).")
@click.option("--scheduler", default=None, help="Run the evaluations on Dask: local:N or tcp://HOST:PORT.")
@click.option("--retrain-from", type=click.Choice(["scratch", "finetune"]), default="scratch", show_default=True,
              help="M_R and M_rand start from a fresh initialisation, or fine-tune M's weights.")
@click.option("--retrain-budget", type=click.Choice(["epochs", "updates"]), default="epochs", show_default=True,
              help="M_R and M_rand train as many epochs as M, or as many Adam steps as M took.")
@click.option("--target-robust", callback=_fraction, default=None,
              help="First find the --pixels at which M is about this robust (e.g. 30%, the paper's operating point) "
                   "on 1,000 test images, then run the study there.")
@click.option("--train-seeds", default=None,
              help="Run the study once per training seed (e.g. 0-9 or 0,3,7) in OUT/seed-S/, with the same images "
                   "and noise, and report seed-level paired statistics (OUT/seeds.md).")
@click.option("--batch-size", type=INT_OR_AUTO, default="auto", show_default=True,
              help="Images per inference in the evaluations; auto measures the fastest (cached).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all available).")
@noise_options
@_quiet_option
@_timeout_option
@_settings
def reproduce(dataset, data_dir, out, per_class, shortfall, arch, epochs, train_sample, test_sample, schemes, quick,
              retrain_from, retrain_budget, target_robust, train_seeds, noise, options) -> int:
    """The paper end to end: train, evaluate, select robust images, retrain, compare with a random control, report.

    Rerunning continues where it stopped: stages whose outputs match their inputs are not redone.

    Example: pyrobust reproduce --dataset fashion-mnist --data-dir ../shared/data --out runs/fashion
    """
    from pyrobust.study.reproduce import StudyConfig
    from pyrobust.study.reproduce import reproduce as run_study

    common = dict(data_dir=str(data_dir) if data_dir else None, shortfall=shortfall, architecture=arch,
                  seed=noise.seed, noise=noise, eval_batch_size=options.batch_size, threads=options.threads,
                  schemes=schemes, scheduler=options.scheduler, retrain_from=retrain_from,
                  retrain_budget=retrain_budget, target_robust=target_robust)
    if quick:
        config = StudyConfig.quick_config(dataset, **common)
    else:
        config = StudyConfig(dataset=dataset, per_class=per_class, epochs=epochs, train_sample=train_sample,
                             test_sample=test_sample, **common)
    if train_seeds is not None:
        from pyrobust.study.seeds import parse_seeds, reproduce_seeds

        seeds = parse_seeds(train_seeds)
        with _stage_progress() as factory:
            srep = reproduce_seeds(config, seeds, out, log=lambda line: _err(line), progress_factory=factory)
        def sd(x: dict) -> str:
            return "" if x["sd"] is None else f" ± {x['sd']:.2%}"

        for m in ("M", "M_R", "M_rand"):
            a, r = srep["models"][m]["accuracy"], srep["models"][m]["robust"]
            _echo(f"{m:7s} over {len(seeds)} seeds: test accuracy {a['mean']:.2%}{sd(a)}   robust "
                       f"{r['mean']:.2%}{sd(r)}")
        _echo(srep["conclusion"])
        _echo(f"report: {Path(out) / 'seeds.md'} (each seed's study in {Path(out) / 'seed-S'})")
        return EXIT_OK
    with _stage_progress() as factory:
        rep = run_study(config, out, log=lambda line: _err(line), progress_factory=factory)
    m = rep["models"]
    for name in ("M", "M_R", "M_rand"):
        _echo(f"{name:7s} {m[name]['train_images']:>6} training images   test accuracy "
                   f"{m[name]['accuracy']['fraction']:.2%}   robust {m[name]['robust']['fraction']:.2%}")
    if quick:
        _echo("quick run: a smoke test of the pipeline on a few hundred images with 2 epochs; these numbers are "
                   "not results (models this small sit near chance level)")
    _echo(f"report: {Path(out) / 'report.md'}")
    return EXIT_OK


@contextmanager
def _stage_progress():
    """A factory of per-stage progress callbacks (bars on a terminal, nothing otherwise)."""
    stack = []

    def factory(label):
        cm = _progress(label)
        stack.append(cm)
        return cm.__enter__()

    try:
        yield factory
    finally:
        for cm in stack:
            cm.__exit__(None, None, None)


_NOT_IN_CONFIG = ("config", "quiet", "timeout", "help")


def config_keys(command: click.Command) -> dict[str, tuple[str, bool, bool]]:
    """The keys a config file may set, derived from ``command``'s own options (never a hand-kept list): the option's
    long name in snake case -> (parameter name, is a flag, inverted). A flag ``--no-X`` is also ``X = true|false``."""
    keys = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in _NOT_IN_CONFIG or p.name is None:
            continue
        long = max(p.opts, key=len).lstrip("-").replace("-", "_")
        keys[long] = (p.name, bool(p.is_flag), False)
        if p.is_flag and long.startswith("no_"):
            keys[long[3:]] = (p.name, True, True)
    return keys


def _load_gate_config(ctx, param, value):
    """Read a TOML gate policy (top level or a [gate] table) into the command's defaults; flags override it."""
    if value is None:
        return None
    ctx.meta["pyrobust.config"] = value  # an input: no output of the command may overwrite it
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, from PyPI (a dependency there)
        import tomli as tomllib

    from pyrobust.files import read_bounded

    try:
        # a FIFO or /dev/zero is refused, never waited on; a policy file is small
        text = read_bounded(value, what="gate config", max_bytes=1 << 20).decode()
        data = tomllib.loads(text)
    except DataError as exc:
        raise click.BadParameter(str(exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{value}: not valid TOML ({exc})") from None
    if "gate" in data:
        outside = sorted(k for k in data if k != "gate")
        if outside:
            raise click.BadParameter(f"{value}: key(s) {', '.join(map(repr, outside))} stand outside the [gate] table "
                                     "and would be ignored; move them into [gate] (or drop the [gate] header)")
        table = data["gate"]
    else:
        table = data
    if not isinstance(table, dict):
        raise click.BadParameter(f"{value}: [gate] must be a table of options; got {type(table).__name__}")
    keys = config_keys(ctx.command)
    values: dict = {}
    spelled: dict[str, str] = {}
    for key, v in table.items():
        name = key.replace("-", "_")
        if name not in keys:
            raise click.BadParameter(f"{value}: unknown key {key!r}; allowed: {', '.join(sorted(keys))}")
        if name in spelled:
            raise click.BadParameter(f"{value}: {spelled[name]!r} and {key!r} set the same option; keep one")
        spelled[name] = key
        param_name, flag, inverted = keys[name]
        if name == "noise_check":  # [[gate.noise_check]] tables (or their text), each read as --noise-check reads it
            values[param_name] = _config_noise_checks(value, key, v)
            continue
        if isinstance(v, bool) != flag or not isinstance(v, (str, int, float, bool)):
            raise click.BadParameter(f"{value}: {key} = {v!r} is not a valid value for it"
                                     + (" (true or false)" if flag else ""))
        if not isinstance(v, bool):
            v = str(v)  # parsed by the option's own type, as if typed on the command line
        values[param_name] = (not v) if inverted else v
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _config_noise_checks(path, key: str, value) -> tuple[str, ...]:
    from pyrobust.gate.policy import parse_noise_check

    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items, 1):
        try:
            out.append(parse_noise_check(item).text())
        except InvalidInput as exc:
            raise click.BadParameter(f"{path}: {key} #{i}: {exc}") from None
    return tuple(out)


def _noise_checks(ctx, param, value):
    from pyrobust.gate.policy import parse_noise_check

    try:
        return tuple(parse_noise_check(v) for v in value or ())
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_gate_config, is_eager=True,
              expose_value=False, help="A TOML file holding any of these options (e.g. gate.toml); flags override it.")
@click.option("--dataset", required=True, help="Test data, e.g. mnist:test or folder:PATH.")
@data_options(sample=False)
@click.option("--min-accuracy", callback=_fraction, help="Clean accuracy must be at least this (0.98 or 98%).")
@click.option("--min-robust", callback=_fraction, help="Fraction of all test images never fooled, at least.")
@click.option("--min-class-robust", callback=_fraction, help="The robust rate of every class, at least.")
@click.option("--min-robust-at", default=None,
              help="Robust fractions at several budgets from one run, STEPS:FRACTION pairs: 10:95%,50:90%,250:80% "
                   "(not fooled within STEPS steps).")
@click.option("--robust-of", type=click.Choice(["all", "correct"]), default="all", show_default=True,
              help="What --min-robust, --min-class-robust and --min-robust-at are a share of: all images, or the "
                   "correctly classified ones.")
@click.option("--max-failure-prob", callback=_fraction, default=None,
              help="A golden set: no image (or at most --max-fragile) may have a per-step failure probability above "
                   "this (1%), decided on exact per-image bounds; sets the step budget and counts every step.")
@click.option("--max-fragile", type=int, default=0, show_default=True,
              help="Images of the golden set allowed above --max-failure-prob.")
@click.option("--noise-check", "noise_checks", multiple=True, callback=_noise_checks,
              metavar="'FAMILY[:K=V,...] KEY=VALUE ...'",
              help="Checks under one more noise family, beside the gate's own noise (repeatable): e.g. "
                   "'gaussian:sigma=0.1 min_robust=80%'; keys min_robust, min_class_robust, min_robust_at, "
                   "max_robust_drop, max_failure_prob, max_fragile, max_steps. In TOML: [[gate.noise_check]] tables "
                   "(family = \"gaussian\", sigma = 0.1, min_robust = \"80%\"). The error is split over the noises.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="The production model (.onnx) or a results folder of it on the same data and settings (then "
                   "with --baseline-model or --baseline-sha256).")
@click.option("--baseline-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model a --baseline results folder came from: its SHA-256 must match, every clean "
                   "prediction and 64 random images' whole protocol are replayed before the results are used.")
@click.option("--baseline-sha256", default=None,
              help="Instead of --baseline-model: the pinned SHA-256 of that model (the file the results name must "
                   "have it).")
@click.option("--max-robust-drop", callback=_fraction, help="Robust fraction may drop at most this vs the baseline.")
@click.option("--max-accuracy-drop", callback=_fraction, help="Accuracy may drop at most this vs the baseline.")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="Overall confidence of the decisions: each check errs on either side at most (1 - confidence)/2.")
@click.option("--inconclusive", type=click.Choice(["fail", "pass"]), default="fail", show_default=True,
              help="Exit code of an undecided gate.")
@click.option("--no-early-stop", is_flag=True,
              help="Evaluate every image in one look instead of stopping once the verdict cannot change.")
@click.option("--family", type=click.Choice(["holm", "bonferroni", "none"]), default="holm", show_default=True,
              help="Control wrong fail verdicts across all checks (Holm or Bonferroni), or per check (none).")
@click.option("--spending", type=click.Choice(["equal", "obrien-fleming"]), default="equal", show_default=True,
              help="How the error is spent over the looks: equally, or little at the first looks.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for gate.json.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JUnit XML report.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Markdown summary file (also appended to $GITHUB_STEP_SUMMARY when set).")
@click.option("--mlflow", "mlflow_log", is_flag=True,
              help="Log the verdict, checks, work and reports to MLflow ($MLFLOW_TRACKING_URI; pyrobust[mlflow]).")
@click.option("--mlflow-experiment", default="pyrobust-gate", show_default=True,
              help="The MLflow experiment of the new run (with --mlflow).")
@click.option("--mlflow-run-id", default=None, help="Log into this existing MLflow run instead (e.g. the model's).")
@noise_options
@run_options(checkpoints=False)
@_quiet_option
@_timeout_option
@_settings
def gate(candidate, dataset, min_accuracy, min_robust, min_class_robust, min_robust_at, robust_of, max_failure_prob,
         max_fragile, noise_checks, baseline, baseline_model, baseline_sha256, max_robust_drop, max_accuracy_drop,
         confidence, inconclusive, no_early_stop, family, spending, out, junit, summary, mlflow_log,
         mlflow_experiment, mlflow_run_id, output, noise, options, data) -> int:
    """Pass or fail CANDIDATE (an ONNX model) on robustness thresholds, with statistical decisions.

    Exit 0 pass, 1 fail (or inconclusive, unless --inconclusive pass), 2 usage error, 3 bad model or data,
    4 internal error.

    Example: pyrobust gate model.onnx --dataset mnist:test --min-accuracy 97% --min-robust 80% --junit gate.xml
    """
    from pyrobust.gate.policy import GatePolicy
    from pyrobust.gate.reports import append_github_summary, markdown_summary, write_outputs
    from pyrobust.gate.run import run_gates

    if (max_robust_drop is not None or max_accuracy_drop is not None) and baseline is None:
        raise InvalidInput("--max-robust-drop and --max-accuracy-drop compare with a baseline: give --baseline "
                           "MODEL.onnx or a results folder")
    thresholds = dict(min_accuracy=min_accuracy, min_robust=min_robust, min_class_robust=min_class_robust,
                      max_robust_drop=max_robust_drop, max_accuracy_drop=max_accuracy_drop,
                      min_robust_at=min_robust_at, max_failure_prob=max_failure_prob)
    rules = dict(confidence=confidence, inconclusive=inconclusive, early_stop=not no_early_stop, family=family,
                 spending=spending, robust_of=robust_of)
    own = any(v is not None for v in thresholds.values()) or not noise_checks
    policy = GatePolicy(**thresholds, **rules, max_fragile=max_fragile) if own else None
    if max_failure_prob is not None and \
            click.get_current_context().get_parameter_source("max_steps") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--max-failure-prob sets the step budget; leave out --max-steps")
    from pyrobust.files import check_output_file, make_out_dir

    tracking = None
    if mlflow_run_id and not mlflow_log:
        raise InvalidInput("--mlflow-run-id names the MLflow run to log into: give --mlflow too")
    if mlflow_log:  # the store must answer before any work
        from pyrobust.gate.tracking import open_tracking

        tracking = open_tracking(mlflow_experiment, mlflow_run_id)
    # Every output is checked before any work: a decision must never be lost to a path that cannot be written.
    if out is not None:
        make_out_dir(out)
    for path, what in ((junit, "--junit"), (summary, "--summary")):
        if path is not None:
            check_output_file(path, what)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY") or None
    if step_summary:
        check_output_file(Path(step_summary), "$GITHUB_STEP_SUMMARY", create_parent=False)
    with warnings.catch_warnings(record=True) as caught, _progress("gate") as progress:
        warnings.simplefilter("always")
        if max_failure_prob is not None:  # the budget is the golden set's, not the --max-steps default
            from dataclasses import replace as _replace

            from pyrobust.types import PAPER_MAX_STEPS

            noise = _replace(noise, max_steps=PAPER_MAX_STEPS)
        result = run_gates(candidate, dataset, policy=policy, noise_checks=noise_checks,
                           rules=GatePolicy(min_robust=0.5, **rules), baseline=baseline, baseline_model=baseline_model,
                           baseline_sha256=baseline_sha256, noise=noise, data=data, options=options, output=output,
                           progress=progress, log=lambda line: _err(line), status=getattr(progress, "status", None))
    for w in [*(str(c.message) for c in caught), *result.warnings]:
        _err(f"warning: {w}")
    for c in result.checks:
        _echo(c.message)
    how = f"; stopped early: {result.stop_reason}" if result.stopped_early else ""
    for r in result.conditions:
        done = (f"{r['images_evaluated']} of {result.images} images through the noise protocol, "
                if r["images_evaluated"] else "the clean pass only, ") + f"{r['inferences']:,} inferences" \
            if r["evaluated"] else ""
        _echo(f"under {r['noise']}: " + (f"{r['decision']}, {done}" if r["evaluated"]
                                         else "not run (the gate had already failed under another noise)"))
    from pyrobust.gate.reports import throughput_line

    speed = throughput_line(result)
    if speed:
        _echo(speed)
    k = len(result.conditions)
    what = f"{k} noise condition{'s' if k > 1 else ''}" if result.conditions else \
        f"{result.images_evaluated} of {result.images} images through the noise protocol"
    _echo(f"gate {result.decision.upper()}: {what}, {result.inferences:,} inferences{how}")
    # The verdict is out; writing the reports can still fail (a full disk): say so, with the verdict above.
    try:
        write_outputs(result, out=out, junit=junit, summary=summary)
        if step_summary:
            if not append_github_summary(markdown_summary(result), step_summary):
                _err("warning: $GITHUB_STEP_SUMMARY is full (1 MiB); the summary was not added")
    except OSError as exc:
        raise OutputError(f"the gate decided {result.decision.upper()} (above), but its reports could not be "
                          f"written: {exc.strerror or exc} ({exc.filename or 'output'})") from None
    if tracking is not None:
        from pyrobust.gate.tracking import log_gate

        files = [f for f in (out, junit, summary) if f is not None]
        run_id = log_gate(result, tracking, files=files, run_name=f"gate {Path(candidate).name}")
        _echo(f"logged to MLflow run {run_id} ({tracking.uri})")
    return result.exit_code


@cli.command()
@click.argument("a", type=click.Path(file_okay=False, path_type=Path))
@click.argument("b", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for compare.json, compare.md and survival_compare.png.")
def compare(a, b, out) -> int:
    """Per-image differences between results A and B (same data, seed and settings).

    Example: pyrobust compare runs/production runs/candidate --out runs/diff
    """
    if (a / "severity.json").exists() or (b / "severity.json").exists():
        return _compare_severities(a, b, out)
    from pyrobust.compare import compare_runs

    rep = compare_runs(a, b, out=out)
    r, c, rc = rep["robust"], rep["accuracy"], rep["robust_of_correct"]
    _echo(f"robust of all images {r['a']:.2%} → {r['b']:.2%} ({r['change']:+.2%}, 95% [{r['ci95'][0]:+.2%}, "
               f"{r['ci95'][1]:+.2%}]); accuracy {c['a']:.2%} → {c['b']:.2%} ({c['change']:+.2%})")
    if rc["change"] is not None:
        _echo(f"robust of correct images {rc['a']:.2%} → {rc['b']:.2%} ({rc['change']:+.2%}, 95% "
              f"[{rc['ci95'][0]:+.2%}, {rc['ci95'][1]:+.2%}])")
    mv = rep["intervals_moved"]
    _echo(f"failure-probability interval moved clear of the old one for {mv['count']} images "
          f"({mv['more_fragile']} more fragile, {mv['more_robust']} more robust)")
    _echo(f"newly fragile {rep['newly_fragile']['count']}, newly robust {rep['newly_robust']['count']}, "
               f"first-failure step moved for {rep['steps_moved']['count']} images")
    if out is not None:
        _echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'survival_compare.png'}")
    return EXIT_OK


@cli.command()
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option("--index", type=int, required=True, help="Original dataset index of the image.")
@click.option("--step", type=int, default=None, help="Step to rebuild (default: the image's first failure).")
@click.option("--failure", type=int, default=None,
              help="Rebuild the image's K-th failing step instead (a run with --count-failures; asks the model).")
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model file, if it moved since the run.")
@data_dir_option("Where the data is now, if it moved since the run.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the input: .npy (float32 H×W×C) or .png (original | perturbed).")
@click.option("--no-check", is_flag=True,
              help="Only rebuild the input when the run's model file is gone (else: exit 3).")
def replay(results, index, step, failure, model, data_dir, out, no_check) -> int:
    """Rebuild image INDEX's input at its first failure (or --step) from RESULTS and ask the model again.

    Exit 0 when the model's prediction matches the run's record, 1 when it does not.

    Example: pyrobust replay runs/mnist --index 7 --out failing.png
    """
    from pyrobust.files import check_output_file
    from pyrobust.replay import replay as do_replay

    if out is not None:
        check_output_file(out, "--out")  # before any work

    if out is not None and out.suffix not in (".npy", ".png"):
        raise InvalidInput(f"--out must end in .npy or .png; got {out}")
    r = do_replay(results, index=index, step=step, model=model, data_dir=data_dir, failure=failure)
    changed = int((r.perturbed != r.original).any(axis=2).sum())
    recorded = f"prediction {r.recorded_label}" if r.recorded_label >= -2 else "a failure (any class but the label)"
    which = f"failure {r.failure}, " if r.failure is not None else ""
    _echo(f"image {r.index}: label {r.label}, {which}step {r.step} ({changed} pixels changed); "
               f"run recorded {recorded}")
    if out is not None:
        _write_replay(out, r)
        _echo(f"wrote {out}")
    if r.prediction is None:
        if no_check:
            return EXIT_OK

        raise ModelError("the run's model file was not found, so the prediction could not be checked; pass --model "
                         "FILE, or --no-check to only rebuild the input")
    _echo(f"model now predicts {r.prediction}: {'matches' if r.matches else 'DOES NOT MATCH'} the record")
    return EXIT_OK if r.matches else EXIT_FAILED


def _write_replay(out: Path, r) -> None:
    import io

    import numpy as np

    from pyrobust.files import write_bytes_atomic

    if out.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, r.perturbed)
        write_bytes_atomic(out, buf.getvalue())
        return
    from pyrobust.report import plot_replay

    plot_replay(r, out)


def _compare_severities(a: Path, b: Path, out: Path | None) -> int:
    from pyrobust.severity import compare_severities, load_severity, write_severity_compare

    if out is not None:
        from pyrobust.files import make_out_dir

        make_out_dir(out)
    rep = compare_severities(load_severity(a), load_severity(b))
    med = {k: "beyond" if rep[k]["median"] is None else f"{rep[k]['median']:g}" for k in ("a", "b")}
    _echo(f"{rep['family']}: median {rep['parameter']} at which p > {rep['q']:g}: {med['a']} → {med['b']}; "
          f"{rep['more_robust']} images more robust, {rep['less_robust']} less, {rep['same']} the same (sign test "
          f"p = {rep['sign_test_p']:.3g})")
    if out is not None:
        write_severity_compare(rep, out)
        _echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'}")
    return EXIT_OK


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--names", default=None, help="Comma-separated names for the runs (default: their folder names).")
@click.option("--ceiling", nargs=2, type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Two results folders of one model under two noise seeds: the agreement noise alone allows.")
@click.option("--retest", "retests", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A run's retest (the same model under another --seed), once per run in order, or '-' for a run "
                   "without one: each run's reliability, and agreement corrected for it.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for agreement.json, agreement.md and agreement.png (a heat-map of kappa).")
def agreement(runs, names, ceiling, retests, out) -> int:
    """How much the robust flags of RUNS (evaluations of the same images with the same noise) agree beyond chance.

    Example: pyrobust agreement runs/M runs/M_R runs/M_rand --ceiling runs/M runs/M-seed1 --out runs/agreement
    """
    if any((Path(r) / "severity.json").exists() for r in runs):
        return _severity_agreement(runs, names, ceiling, retests, out)
    from pyrobust.agreement import agreement as measure

    retest = [None if str(r) == "-" else r for r in retests] if retests else None
    rep = measure(runs, names=names.split(",") if names else None, ceiling=ceiling, retests=retest, out=out)

    def f(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for p in rep["pairs"]:
        if p["kappa"] is None:
            _echo(f"{p['a']} – {p['b']}: {p.get('note') or 'kappa undefined (one flag only)'}")
            continue
        lo, hi = p["kappa_ci95"]
        cor = p.get("corrected") or {}
        _echo(f"{p['a']} – {p['b']}: kappa {p['kappa']:.3f} [{lo:.3f}, {hi:.3f}] (kappa/kappa_max "
              f"{f(p.get('kappa_over_max'))}, within classes {f(p['kappa_by_class']['pooled'])}), Jaccard "
              f"{f(p['jaccard'])}, Spearman steps {f(p['spearman'])}, p-hat {f(p.get('spearman_p_hat'))}"
              + (f", corrected kappa {f(cor.get('kappa'))}, p-hat {f(cor.get('spearman_p_hat'))}" if cor else "")
              + f" ({p['images_correct_under_both']} images)")
    c = rep["ceiling"]
    if c and c["kappa"] is not None:
        _echo(f"noise-only ceiling (seeds {c['seeds'][0]}, {c['seeds'][1]}): kappa {c['kappa']:.3f}")
    _echo(rep["answer"])
    if out is not None:
        _echo(f"wrote {out / 'agreement.json'}, {out / 'agreement.md'}, {out / 'agreement.png'}")
    return EXIT_OK


def _severity_agreement(runs, names, ceiling, retests, out) -> int:
    from pyrobust.severity import load_severity, severity_agreement, write_severity_agreement

    if ceiling or retests:
        raise InvalidInput("--ceiling and --retests are for runs' robust flags; severity results are ranked as they "
                           "are")
    if out is not None:
        from pyrobust.files import make_out_dir

        make_out_dir(out)
    rep = severity_agreement([load_severity(r) for r in runs],
                             names=names.split(",") if names else [Path(r).name for r in runs])
    for p in rep["pairs"]:
        rho = "undefined" if p["spearman"] is None else f"{p['spearman']:.3f}"
        ci = "" if p["interval"][0] is None else f" [{p['interval'][0]:.3f}, {p['interval'][1]:.3f}]"
        _echo(f"{p['a']} – {p['b']}: Spearman {rho}{ci} over {rep['images']} images")
    if out is not None:
        write_severity_agreement(rep, out)
        _echo(f"wrote {out / 'agreement.json'}, {out / 'agreement.md'}")
    return EXIT_OK


@cli.group()
def data() -> None:
    """Get the named datasets (verified downloads) and see what is where."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["mnist", "fashion-mnist", "cifar10"]))
@click.option("--dir", "dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Put the files in DIR/NAME/ (default: the per-user data folder, searched by --dataset NAME:SPLIT).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds one connect or read may wait for the server.")
@click.option("--deadline", type=float, default=900.0, show_default=True,
              help="Seconds the whole fetch may take, retries included (a server that drips bytes is stopped).")
def data_fetch(name, dest, timeout, deadline) -> int:
    """Download dataset NAME from its canonical location (then mirrors), verify every file's SHA-256, and store it.

    Example: pyrobust data fetch mnist
    """
    from pyrobust.data.fetch import fetch_dataset

    files = fetch_dataset(name, dest=dest, log=_err, timeout=timeout, deadline=deadline)
    for f in files:
        _echo(f"{f.status:10} {f.sha256}  {f.path}")
    hint = f" --data-dir {dest}" if dest is not None else ""
    _echo(f"{name}: ready; use --dataset {name}:test or {name}:train{hint}")
    return EXIT_OK


@data.command("find")
@click.argument("dataset")
@data_dir_option()
def data_find(dataset, data_dir) -> int:
    """Say whether DATASET (as --dataset takes it) can be read here, and from where: exit 0 with its size, or 3 with
    what is missing (a CI step fetches the data only then).

    Example: pyrobust data find mnist:test
    """
    from pyrobust.data.load import load_dataset

    ds = load_dataset(dataset, data_dir=data_dir)
    h, w, c = ds.image_shape
    _echo(f"{dataset}: {ds.n:,} images {h}x{w}x{c}, {len(set(ds.labels.tolist()))} classes, from {ds.source}")
    return EXIT_OK


@data.command("list")
@data_dir_option("Also look here first, as --data-dir does for the other commands.")
def data_list(data_dir) -> int:
    """Show where named datasets are looked for, and every file found, with its SHA-256 and whether it is verified.

    Example: pyrobust data list
    """
    from pyrobust.data.fetch import list_data

    roots, found = list_data(data_dir)
    _echo("searched, in order: " + ", ".join(str(r) for r in roots))
    if not found:
        _echo("no dataset files found; get them with: pyrobust data fetch mnist (or fashion-mnist)")
    for f in found:
        mark = "verified" if f.verified else "NOT the published file"
        _echo(f"{f.dataset:13} {f.name:28} {f.size:>10,} B  {f.sha256[:16]}…  {mark}  {f.path}")
    return EXIT_OK


def _sigterm_as_interrupt(signum, frame):
    # CI systems cancel jobs with SIGTERM: stop the way Ctrl-C does, checkpoint saved.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; errors become one line on stderr (``--debug`` adds the traceback)."""
    _QUIET["on"] = False
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    import signal
    import threading

    from pyrobust.engine.watchdog import Watchdog

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    else:  # pragma: no cover - signals can only be set from the main thread
        previous = None
    try:
        with Watchdog() as dog:  # Ctrl-C, SIGTERM and --timeout reach even a run stuck inside onnxruntime
            _WATCHDOG["dog"] = dog
            return _main(args, debug)
    finally:
        _WATCHDOG["stopped"] = _WATCHDOG["dog"] is not None and _WATCHDOG["dog"].reason is not None
        _WATCHDOG["dog"] = None
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _warnings_as_lines():
    """Warnings a command did not report itself become one ``pyrobust: warning:`` line each on stderr (never
    Python's file:line form), printed when the command ends, however it ends."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                text = str(w.message)
                if text not in seen:
                    seen.add(text)
                    _err(f"warning: {text}")


def _main(args: list[str], debug: bool) -> int:
    try:
        # make_context + invoke rather than cli.main: click's main prints a bare newline on KeyboardInterrupt, and
        # an interrupted run's stderr is one line like every other error.
        with cli.make_context("pyrobust", list(args)) as ctx, _warnings_as_lines():
            rv = cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        _err(_interruption("stopped before any result was saved"))
        return 130
    except Interrupted as exc:
        _err(f"error: {_interruption(cli_words(str(exc)))}")
        return exc.exit_code
    except click.ClickException as exc:
        _err(f"error: {exc.format_message()} (see pyrobust --help)")
        return EXIT_USAGE
    except PyRobustError as exc:
        if debug:
            traceback.print_exc()
        _err(f"error: {cli_words(str(exc))}")
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            return _internal(exc, debug)
        if debug:
            traceback.print_exc()
        # Files are written to a temporary name and renamed when whole: what is there is complete, the rest absent.
        _err(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}; every file already in the "
             "output is complete (files are renamed into place only when whole). Free space, or choose another "
             "--out, and run again")
        return EXIT_USAGE
    except Exception as exc:  # the promise is: never a bare traceback
        return _internal(exc, debug)
    return rv if isinstance(rv, int) else EXIT_OK


def _internal(exc: Exception, debug: bool) -> int:
    """An error pyrobust did not foresee: one line (the traceback with --debug), exit 4."""
    if debug:
        traceback.print_exc()
    _err(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and report it)")
    return EXIT_INTERNAL


# Library messages name Python arguments ("pass overwrite=True"); on the command line the same advice is a flag.
_FLAG_WORDS = re.compile(r"\b(overwrite|resume|step|precision|allow_test_split|baseline_model|baseline_sha256)="
                         r"(True\b|[A-Z]+\b)|\bdata_dir\b()()")


def cli_words(message: str) -> str:
    """A library message in command-line words: ``overwrite=True`` -> ``--overwrite``, ``step=S`` -> ``--step S``."""
    def flag(m):
        if m.group(1) is None:
            return "--data-dir"
        return "--" + m.group(1).replace("_", "-") + ("" if m.group(2) == "True" else " " + m.group(2))

    return _FLAG_WORDS.sub(flag, message)


def run() -> None:
    code = main()
    if _WATCHDOG.get("stopped"):
        # Stopped by --timeout or a signal: a session thread may still be inside one long model operation, and the
        # interpreter's exit would wait for it. Everything is written and flushed: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
