"""farms-lightning: analyse or prune saved weights without the model's code.

Inputs: a Lightning ``.ckpt`` (its ``state_dict``), a torch state dict (``.pt``/``.pth``/``.bin``,
also ``{"state_dict": ...}``), a ``.safetensors`` file or a folder of them. The format is read from
the file's first bytes (the extension is only a fallback). Torch files are loaded with
``weights_only=True`` unless ``--trust-pickle`` is given.

Exit codes: 0 success; 1 unexpected internal error (with a traceback); 2 usage error (bad option
or value, an output over an input); 3 input missing, unreadable, truncated or of an unknown format;
4 nothing to analyse (no weight matrix, or none left by ``--include``/``--exclude``/``--layer-types``);
5 the output cannot be written (nothing is left half-written: see :mod:`farms_lightning.files.safe_io`);
130 stopped by SIGINT, 143 by SIGTERM (temporary files removed).

Weights are streamed (:mod:`farms_lightning.cli.streaming`): one tensor, or one torch file, in memory at
a time; ``prune`` analyses in one pass and writes in a second. Under ``torchrun`` the ranks share
the work (:mod:`farms_lightning.cli.cli_distributed`); the same command runs unchanged without it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from farms_lightning.cli.cli_distributed import (
    Interrupted,
    group_budget,
    parse_size,
    print_error,
    process_group,
    resolve_device,
    stop_on_signals,
    together,
)
from farms_lightning.cli.cli_parsing import Parser, UsageError, name_subcommands, parse_arguments
from farms_lightning.cli.stats_cache import StatsCache
from farms_lightning.cli.stream_prune import check_prunable, prune_stream
from farms_lightning.cli.streaming import (
    Checkpoint,
    StreamOptions,
    analyze_checkpoint,
    largest_tensor,
    open_checkpoint,
    return_large_blocks_when_freed,
    tied_owners,
)
from farms_lightning.cli.streaming import select as select_layers
from farms_lightning.cli.weight_files import _first_line
from farms_lightning.engine.analysis import PRESETS, resolve_settings
from farms_lightning.engine.distributed import distributed_context
from farms_lightning.engine.report import FARMSReport
from farms_lightning.files.safe_io import (
    EXIT_INPUT,
    EXIT_OUTPUT,
    EXIT_USAGE,
    CLIError,
    atomic_write,
    check_output,
    input_errors,
    shown,
    write_stdout,
    write_text,
)
from farms_lightning.models.layers import LAYER_TYPES, LayerMatrix
from farms_lightning.policies.pruning import alpha_sparsity, is_shared, uniform_sparsity

__all__ = ["EXIT_INPUT", "EXIT_OUTPUT", "EXIT_USAGE", "main", "build_parser"]

EXIT_OK, EXIT_INTERNAL, EXIT_EMPTY = 0, 1, 4  # EXIT_USAGE 2, EXIT_INPUT 3, EXIT_OUTPUT 5: safe_io
FORMATS = ("table", "csv", "json", "markdown")
SUFFIX_FORMATS = {".json": "json", ".csv": "csv", ".md": "markdown", ".markdown": "markdown"}
DESCRIPTION = "Analyse or prune saved weights (checkpoints, state dicts, safetensors) without the model's code."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``farms-lightning`` command line; returns the exit status (see the module docstring).

    Example::

        $ farms-lightning analyze model.safetensors --fit peak --format json --output alphas.json
        $ farms-lightning prune last.ckpt --sparsity 0.5 --allocation alpha --output pruned.ckpt
        $ farms-lightning plot lightning_logs/version_0/farms_history.json --output heatmap.png
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except UsageError as error:  # one line, the (sub)command, the problem, where to read more
        print(f"{error.prog}: error: {error} (see {error.prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help
        return int(done.code or 0)
    group = process_group(args.device) if hasattr(args, "device") else contextlib.nullcontext()  # plot: no device
    try:
        with stop_on_signals(), group:  # SIGINT/SIGTERM: cleanups run, exit 130/143
            try:
                return args.command(args)
            except (CLIError, Interrupted) as error:  # printed inside the process group: the line names the rank
                print_error(args.parser.prog, error)
                return error.code
    except (CLIError, Interrupted) as error:  # joining the process group failed (e.g. --device cuda without CUDA)
        print_error(args.parser.prog, error)
        return error.code


def build_parser() -> argparse.ArgumentParser:
    epilog = ("exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 nothing to analyse, 5 output not "
              "writable, 130/143 stopped by SIGINT/SIGTERM")
    parser = Parser(prog="farms-lightning", description=DESCRIPTION, epilog=epilog)
    commands = parser.add_subparsers(required=True, dest="subcommand")
    usage = "%(prog)s PATH [options]"  # PATH first: --include/--exclude/--layer-types take several values
    analyze_cmd = commands.add_parser("analyze", help="FARMS alphas of every weight matrix", usage=usage)
    _add_input(analyze_cmd)
    _add_engine(analyze_cmd, preset="cv")
    analyze_cmd.add_argument("--no-random-baseline", dest="random_baseline", action="store_false",
                             help="skip the random-matrix baseline (columns alpha_random, alpha_delta)")
    analyze_cmd.add_argument("--format", choices=FORMATS, help="default: from --output's suffix, else table")
    analyze_cmd.add_argument("--output", "-o", type=Path, help="write the report here (default: stdout)")
    analyze_cmd.set_defaults(command=run_analyze)

    prune_cmd = commands.add_parser("prune", help="write a pruned copy of the weights, in the same format",
                                    usage=usage)
    _add_input(prune_cmd)
    prune_cmd.add_argument("--sparsity", type=float, required=True, help="target mean sparsity S of the matrices")
    prune_cmd.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude",
                           help="magnitude (wanda needs the model's forward pass: use Python)")
    prune_cmd.add_argument("--allocation", choices=("uniform", "alpha"), default="alpha",
                           help="uniform: S everywhere; alpha: AlphaPruning from FARMS alphas (default)")
    prune_cmd.add_argument("--epsilon", type=float, default=0.3, help="AlphaPruning spread (default 0.3)")
    prune_cmd.add_argument("--blocks", help="block-wise alphas: a glob of block name prefixes, e.g. 'encoder.layer.*'")
    prune_cmd.add_argument("--max-sparsity", type=float, default=0.99, help="largest sparsity of a layer (0.99)")
    prune_cmd.add_argument("--output", "-o", type=Path, required=True, help="the pruned copy (a folder for a folder)")
    prune_cmd.add_argument("--format", choices=FORMATS, default="table", help="format of the per-layer report")
    _add_engine(prune_cmd, preset="llm")
    prune_cmd.set_defaults(command=run_prune)

    plot_cmd = commands.add_parser("plot", help="heatmap of a training history (layers x analyses) as an image",
                                   usage="%(prog)s HISTORY --output IMAGE [options]")
    plot_cmd.add_argument("path", type=Path, help="a history written by save_history: <prefix>_history.json or .csv")
    plot_cmd.add_argument("--metric", default="auto",
                          help="row key to colour by (default auto: alpha_delta when the history has a random "
                               "baseline, else alpha)")
    plot_cmd.add_argument("--output", "-o", type=Path, required=True,
                          help="the image; its suffix picks the format (.png, .pdf, .svg)")
    plot_cmd.set_defaults(command=run_plot)
    name_subcommands(commands)  # after every add_parser: errors name the subcommand
    return parser


def _add_input(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("path", type=Path, metavar="PATH", help=".ckpt, .pt/.pth/.bin state dict, .safetensors, or a folder of them")
    cmd.add_argument("--trust-pickle", action="store_true",
                     help="load torch files with weights_only=False (runs pickled code: only for trusted files)")
    cmd.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    run = cmd.add_argument_group("where and how it runs")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: $FARMS_LIGHTNING_DEVICE, else cuda when "
                                      "available); under torchrun, cuda is each rank's local GPU")
    run.add_argument("--max-memory", type=_size, metavar="SIZE",
                     help="bound on the analysis working set on the device, e.g. 8GiB (default on a GPU: 90%% "
                          "of its free memory)")
    run.add_argument("--cache", type=Path, metavar="DIR", help="keep each tensor's statistics here; a rerun "
                     "(interrupted, or prune after analyze with the same settings) reuses them")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_engine(cmd: argparse.ArgumentParser, preset: str) -> None:
    engine = cmd.add_argument_group("analysis (as farms_lightning.analyze)")
    engine.add_argument("--preset", choices=tuple(PRESETS), default=preset, help=f"default {preset}")
    engine.add_argument("--window", type=int, help="window rows m")
    engine.add_argument("--aspect-ratio", type=float, help="window cols/rows Q")
    engine.add_argument("--windows-per-dim", type=int, help="window starts per dimension k")
    engine.add_argument("--fit", choices=("median", "ks", "peak"))
    engine.add_argument("--esd", choices=("farms", "full"), default="farms")
    engine.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="eigen-solver precision: float64 only (float32 is refused, exit 2)")
    engine.add_argument("--include", nargs="+", action="extend", metavar="GLOB", help="layer-name globs to keep")
    engine.add_argument("--exclude", nargs="+", action="extend", metavar="GLOB", help="layer-name globs to drop")
    engine.add_argument("--layer-types", nargs="+", action="extend", metavar="TYPE",
                        help=f"among {', '.join(LAYER_TYPES)} (commas allowed)")
    engine.add_argument("--min-eigenvalues", type=int, default=10)
    engine.add_argument("--min-window-side", type=int, default=16,
                        help="layers whose windows have fewer rows or columns are reported too_small (2: judge all)")
    engine.add_argument("--peak-bound", choices=("reference", "corrected"), default="reference")
    engine.add_argument("--no-split-qkv", dest="split_qkv", action="store_false",
                        help="analyse fused q/k/v projections (qkv, c_attn, in_proj_weight) whole, not as .q/.k/.v")


def run_analyze(args: argparse.Namespace) -> int:
    _layer_types(args)  # usage errors before any reading
    checkpoint, _, report = _analysis(args, report_output=args.output)
    if distributed_context()[0] != 0:
        return EXIT_OK
    fmt = args.format or (SUFFIX_FORMATS.get(args.output.suffix.lower(), "table") if args.output else "table")
    title, table = _settings_line(checkpoint, report), report.to_table()
    text = f"{title}\n{table}\n" if fmt == "table" else format_rows(
        report.to_rows(), fmt, table.rsplit("\n", 1)[-1], title,  # the table's last line is the summary
        {"file": shown(checkpoint.path), "settings": report.settings, "summary": report.summary})
    if args.output is None:
        write_stdout(text)
    else:
        write_text(args.output, text)
    return EXIT_OK


def _analysis(args: argparse.Namespace, report_output: Path | None = None, prune_output: Path | None = None,
              analyse: bool = True) -> tuple[Checkpoint, list[LayerMatrix], FARMSReport]:
    """Index the input, check the outputs, and (with ``analyse``) stream the analysis of the selection."""
    device = resolve_device(args.device)

    def prepare() -> tuple[Checkpoint, list[LayerMatrix], StatsCache | None]:
        checkpoint = open_checkpoint(args.path, args.trust_pickle, args.split_qkv)
        reads = checkpoint.weights.sources
        if report_output is not None:  # a report may sit in the input folder, never on a file that is read
            check_output(report_output, [args.path], reads, report=True)
        if prune_output is not None:
            check_output(prune_output, [args.path], reads, folder=checkpoint.weights.kind == "folder")
        cache = StatsCache.open(args.cache, [args.path], reads) if args.cache is not None else None
        with _usage_errors():
            layers = select_layers(checkpoint, _layer_types(args), args.include, args.exclude)
        return checkpoint, layers, cache

    checkpoint, layers, cache = together(prepare)
    with _usage_errors():
        settings = resolve_settings(args.preset, args.window, args.aspect_ratio, args.windows_per_dim, args.fit,
                                    args.esd, args.dtype, args.min_eigenvalues, args.peak_bound,
                                    getattr(args, "random_baseline", False),  # prune needs only alphas
                                    args.min_window_side)
    return_large_blocks_when_freed()  # freed windows and shards go back to the system: bounded memory
    if not analyse:
        return checkpoint, layers, FARMSReport([], settings)
    options = StreamOptions(device, group_budget(device, args.max_memory, largest_tensor(layers)), cache)
    report, analysed = analyze_checkpoint(checkpoint, layers, settings, options, args.progress)
    if cache is not None and distributed_context()[0] == 0:
        print(f"farms-lightning: cache {shown(cache.folder)}: {len(layers) - analysed} of {len(layers)} matrices "
              f"not analysed again (cached or tied), {analysed} analysed", file=sys.stderr)
    return checkpoint, layers, report


def run_prune(args: argparse.Namespace) -> int:
    if args.method == "wanda":
        raise CLIError("--method wanda weighs weights by the layers' calibration inputs, which needs the "
                       "model's forward pass; a weights file has no model code. In Python: "
                       "farms_lightning.policies.pruners.prune_model(model, sparsities, method='wanda', calibration=batch)",
                       EXIT_USAGE)
    out = args.output
    _layer_types(args)
    with _usage_errors():  # check the numbers before a long analysis
        alpha_sparsity({}, args.sparsity, args.epsilon, blocks=args.blocks, max_sparsity=args.max_sparsity)
    by_alpha = args.allocation == "alpha"
    checkpoint, layers, report = _analysis(args, prune_output=out, analyse=by_alpha)
    alphas: dict[str, float | None] = {}
    with _usage_errors():
        if by_alpha:
            sparsities = alpha_sparsity(report, args.sparsity, args.epsilon, blocks=args.blocks,
                                        max_sparsity=args.max_sparsity)
            alphas = {s.name: s.alpha for s in report.layers}
            if not report.alphas and distributed_context()[0] == 0:
                print("farms-lightning: warning: no layer could be fitted; every layer gets --sparsity",
                      file=sys.stderr)
        else:
            sparsities = uniform_sparsity([m.name for m in layers if not is_shared(m.skip_reason)], args.sparsity)
    # A layer reading the memory of an earlier selected one is pruned with it (alpha_sparsity leaves it out).
    tied = {layers[i].name for i in tied_owners(checkpoint, layers)}
    targets = {n: s for n, s in sparsities.items() if n not in tied}
    with _usage_errors():  # before any write: e.g. LoRA adapter tensors ("merge first")
        check_prunable(checkpoint, targets)
    achieved = prune_stream(checkpoint, targets, out)
    if distributed_context()[0] != 0:
        return EXIT_OK
    layers_by_name = {m.name: m for m in checkpoint.all_layers}
    rows: list[dict[str, Any]] = [{"name": name, "shape": list(layers_by_name[name].shape),
                                   "num_params": layers_by_name[name].num_params, "alpha": alphas.get(name),
                                   "target": sparsities[name], "achieved": achieved.get(name)}
                                  for name in sparsities if name in achieved]
    total = sum(r["num_params"] for r in rows)
    mean = math.fsum(r["achieved"] * r["num_params"] for r in rows) / total if total else math.nan
    summary = (f"pruned {len(rows)} matrices ({total} weights) by magnitude, {args.allocation} allocation: "
               f"sparsity {mean:.4f} (target {args.sparsity}); wrote {shown(out)}")
    meta = {"method": "magnitude", "allocation": args.allocation, "sparsity": args.sparsity, "achieved": mean,
            "output": shown(out)}
    write_stdout(format_rows(rows, args.format, summary, f"{shown(args.path)}: pruning {len(rows)} matrices", meta))
    return EXIT_OK


def run_plot(args: argparse.Namespace) -> int:
    from farms_lightning.reporting.history import heatmap_metric, load_history

    check_output(args.output, [args.path])
    with input_errors(args.path):
        try:
            history = load_history(args.path)
        except ValueError as error:  # validated: the message names the file and what is wrong in it
            raise CLIError(f"cannot read {_first_line(error)}", EXIT_INPUT) from None
    if not history:
        raise CLIError(f"{shown(args.path)} holds no analysis", EXIT_EMPTY)
    try:
        from farms_lightning.reporting.plotting import plot_history
    except ModuleNotFoundError as error:
        raise CLIError(str(error), EXIT_INTERNAL) from None
    with _usage_errors():
        fig, _ = plot_history(history, heatmap_metric(history) if args.metric == "auto" else args.metric)
    fmt = args.output.suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(args.output, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    except ValueError as error:  # a format matplotlib does not write
        raise CLIError(f"cannot write {shown(args.output)}: {_first_line(error)}", EXIT_USAGE) from None
    write_stdout(f"wrote {shown(args.output)}: {len(history)} analyses\n")
    return EXIT_OK


def _layer_types(args: argparse.Namespace) -> list[str] | None:
    """``--layer-types`` values split at commas; given but empty (``--layer-types ,``) is a usage error."""
    if args.layer_types is None:
        return None
    kinds = [t.strip() for v in args.layer_types for t in v.split(",") if t.strip()]
    if not kinds:
        raise CLIError(f"--layer-types names no type; choose among {', '.join(LAYER_TYPES)}", EXIT_USAGE)
    return kinds


def format_rows(rows: list[dict[str, Any]], fmt: str, summary: str, title: str, meta: dict[str, Any]) -> str:
    """Rows as a fixed-width table, CSV, JSON (``meta`` plus ``layers``) or a markdown table."""
    if fmt == "json":
        return json.dumps(_jsonable({**meta, "layers": rows}), indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "x".join(map(str, v)) if k == "shape" else v for k, v in r.items()} for r in rows)
        return buffer.getvalue()
    columns = list((rows or [{"name": ""}])[0])
    if "status" in columns:  # analysis rows: the main columns, the baseline's where there is one
        baseline = ["alpha_random", "alpha_delta"] if any(r.get("alpha_random") is not None for r in rows) else []
        columns = ["name", "type", "shape", "alpha", *baseline, "D", "num_evals", "status"]
    cells = [[_cell(r, c) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
        lines += [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in cells]
        return f"{title}\n\n" + "\n".join(lines) + f"\n\n{summary}\n"
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *cells)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [columns, *cells]]
    return f"{title}\n" + "\n".join(lines) + f"\n{summary}\n"


def _cell(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if column == "status" and value != "ok":
        return f"{value}: {row['reason']}"
    if column == "shape":
        return "x".join(map(str, value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _settings_line(checkpoint: Checkpoint, report: FARMSReport) -> str:
    s = report.settings
    grid = "" if s["esd"] == "full" else f" m={s['window']} Q={s['aspect_ratio']} k={s['windows_per_dim']}"
    return f"{shown(checkpoint.path)}: {len(report)} matrices; esd={s['esd']}{grid} fit={s['fit']}"


def _jsonable(value: Any) -> Any:
    """JSON-safe values: NaN/inf as null, dtypes and paths as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value).removeprefix("torch.")


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Turn the library's ``ValueError`` (naming an argument) into exit code 2, naming the option."""
    try:
        yield
    except ValueError as error:
        message = re.sub(r"`([a-z_]+)`", lambda m: "--" + m.group(1).replace("_", "-"), str(error))
        raise CLIError(message, EXIT_USAGE) from None


if __name__ == "__main__":
    sys.exit(main())
