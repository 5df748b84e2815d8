"""The danet command: train, evaluate, predict, show attention, plot LR policies, export, plan memory.

Every option of every subcommand is defined here with the standard library alone, so that
``danet --help`` and ``danet <command> --help`` answer at once: torch, the model and the
datasets are imported only for the subcommand that runs, from its module in danet/commands/
(:data:`COMMANDS`, named after the command; each provides ``run(args) -> int``). A
subcommand's help text is its module's docstring, read from the source file without
importing it. ``python -m danet`` runs this too.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from danet import __version__
from danet.config import (
    AMP_MODES,
    ATTENTIONS,
    DEFAULT_PRESET,
    DEVICES,
    EXPORT_FORMATS,
    HEAD_OUTPUTS,
    INFERENCE_AMP,
    INFERENCE_MODES,
    INFERENCE_PROTOCOLS,
    LR_POLICIES,
    OUTPUT_STRIDES,
    PREDICT_FORMATS,
    RANGES,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    available_presets,
)

__all__ = ["COMMANDS", "build_parser", "main", "parse_point", "plain_text", "ranged", "write_traceback"]

# name -> module providing run(args)
COMMANDS: dict[str, str] = {name: "danet.commands." + name.replace("-", "_") for name in
                            ("train", "eval", "predict", "attention", "lr-plot", "export", "plan")}


def plain_text(docstring: str) -> str:
    """A reStructuredText docstring as terminal text: ``x`` and :func:`x` become x, "::" ":"."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", docstring)
    text = text.replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.MULTILINE).strip()


def _module_docstring(module_name: str) -> str:
    """The docstring of ``module_name``, parsed from its source (importing it would import torch)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return module_name
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or module_name


def parse_point(text: str) -> tuple[int, int]:
    """``"x,y"`` -> (x, y) integers (pixel column, row), both >= 0."""
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is x,y in pixels (e.g. 120,45), got {text!r}") from None
    problem = RANGES["attention.points"].problem(min(x, y))
    if problem is not None:
        raise argparse.ArgumentTypeError(f"a point's x and y {problem} in {text!r}")
    return x, y


def ranged(key: str, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: the text as ``kind``, checked against danet.config.RANGES[``key``]
    (the range of the config setting the flag stands for: one rule for both)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = RANGES[key].problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


# ------------------------------------------------------------------------------ shared options
# eval/predict/attention/export: every option defaults to None so that "not given" can be told
# apart; the value then comes from the checkpoint's stored config, else from danet/config.py.


def _model_options(parser: argparse.ArgumentParser, root_help: str = "") -> None:
    """--checkpoint, --dataset, --root, the model overrides, --device and --threads."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH|RUN_DIR|latest",
                        help="model weights: a checkpoint file (a danet training checkpoint, the original "
                             "DANet release's checkpoint, or a plain state_dict), a run directory (its "
                             "checkpoint_best.pt, else last.pt), or 'latest' (runs/latest, the last run "
                             "started)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="dataset the model was trained on (classes, palette); default: the "
                             f"checkpoint's, else {DataConfig.dataset!r}")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help=root_help or "dataset root, for a checkpoint that does not carry its class "
                                          "names (those of danet train do): the folder dataset reads "
                                          "them from DIR/classes.txt (default: the checkpoint's)")
    group = parser.add_argument_group("model (default: the checkpoint's stored config, else "
                                      "danet/config.py's ModelConfig)")
    group.add_argument("--backbone", default=None,
                       help=f"a name of danet.models.BACKBONES (default {ModelConfig.backbone!r})")
    group.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES, default=None)
    group.add_argument("--attention", choices=ATTENTIONS, default=None)
    group.add_argument("--aux", action=argparse.BooleanOptionalAction, default=None,
                       help="the checkpoint has the auxiliary FCN head")
    group.add_argument("--multi-grid", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA when available (default)")
    parser.add_argument("--threads", type=ranged("train.threads"), default=TrainConfig.threads, metavar="N",
                        help="CPU threads of this process (default %(default)s, as train.threads; "
                             "0: torch's default, one per core; see the README)")


def _inference_options(parser: argparse.ArgumentParser) -> None:
    """--protocol, --mode, --crop-size, --stride(-ratio), --scales, --base-size, --flip and the
    speed options (defaults: EvalConfig)."""
    group = parser.add_argument_group("inference (default: the checkpoint's eval config, else "
                                      "danet/config.py's EvalConfig; docs/evaluation.md)")
    group.add_argument("--protocol", choices=INFERENCE_PROTOCOLS, default=None,
                       help=f"danet: ours; release: the DANet release's evaluator (base_size-relative "
                            f"scales, padded windows, exp-summed scores, its metrics first); mmseg: "
                            f"mmsegmentation's whole/slide and test-time augmentation "
                            f"(default {EvalConfig.protocol!r})")
    group.add_argument("--mode", choices=INFERENCE_MODES, default=None, help=f"default {EvalConfig.mode!r}")
    group.add_argument("--crop-size", type=ranged("eval.crop_size"), default=None,
                       help="sliding-window crop (default: the training crop size)")
    group.add_argument("--stride-ratio", type=ranged("eval.stride_ratio", float), default=None,
                       help=f"window stride / crop (default {EvalConfig.stride_ratio:.3g})")
    group.add_argument("--stride", type=ranged("eval.stride"), default=None,
                       help="window stride in pixels, instead of --stride-ratio "
                            "(mmsegmentation's 513 for 769 crops)")
    group.add_argument("--scales", type=ranged("eval.scales", float), nargs="+", default=None, metavar="S",
                       help=f"multi-scale factors (default {' '.join(map(str, EvalConfig.scales))})")
    group.add_argument("--base-size", type=ranged("eval.base_size"), default=None,
                       help="protocol release: the long side at scale 1 (default: the data config's "
                            "base_size; the release tested Cityscapes with 2048)")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help=f"also predict the horizontally flipped image (default {EvalConfig.flip})")
    group.add_argument("--window-memory-mb", type=ranged("eval.window_memory_mb"), default=None, metavar="MB",
                       help=f"batch windows and flips up to this estimated tensor memory; 0: one window "
                            f"at a time (default {EvalConfig.window_memory_mb})")
    group.add_argument("--amp", choices=INFERENCE_AMP, default=None,
                       help=f"autocast: auto is bf16 on CUDA, none on the CPU (default {EvalConfig.amp!r})")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help=f"channels_last memory format (default {EvalConfig.channels_last})")


def _config_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--preset, --config, --set: the layers of danet.config.load_config."""
    parser.add_argument("--preset", default=None,
                        help=f"{what}: {', '.join(available_presets())} (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML file overriding the preset")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="override any field, e.g. optim.lr=0.01 train.epochs=2 train.threads=2 "
                             "data.root=/data/cityscapes (sections: model, data, eval, optim, schedule, "
                             "loss, train, dist; see danet/config.py)")


# ------------------------------------------------------------------------------ per command


def _train_options(parser: argparse.ArgumentParser) -> None:
    _config_options(parser, "recipe to start from")
    parser.add_argument("--output", "-o", default=None, metavar="DIR",
                        help="run directory (default: runs/<preset>-<UTC time>; on --resume the "
                             "checkpoint's directory; same as --set train.output=DIR)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR|CHECKPOINT",
                        help="continue a run from its last.pt (its stored config, plus any --set)")
    parser.add_argument("--rebase-schedule", action="store_true",
                        help="with --resume and changed optim.*/schedule.*/train.epochs|iters: recompute "
                             "the LR schedule from the new settings as if the run had used them from the "
                             "start, continuing at the checkpoint's iteration")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a run directory that holds another run's checkpoints")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")


def _eval_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser, root_help="dataset root (default: the checkpoint's, where it was trained; "
                                     "not needed for 'synthetic')")
    parser.add_argument("--split", default="val", help="dataset split (default: val)")
    parser.add_argument("--limit", type=ranged("data.val_samples"), default=None, metavar="N",
                        help="evaluate the first N images only")
    _inference_options(parser)
    parser.add_argument("--heads", nargs="+", choices=HEAD_OUTPUTS, default=["sum"], metavar="HEAD",
                        help="head outputs to score: sum (the prediction), pam, cam (the PAM-only and "
                             "CAM-only classifiers: the paper's ablation); default sum")
    parser.add_argument("--batch-size", type=ranged("eval.batch_size"), default=None,
                        help=f"images per batch (default: the checkpoint's, else {EvalConfig.batch_size}; "
                             ">1 needs images of one size)")
    parser.add_argument("--workers", type=ranged("data.workers"), default=None,
                        help=f"data loader processes (default: the checkpoint's, else {DataConfig.workers})")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the metrics, class names, checkpoint and settings as JSON")
    parser.add_argument("--confusion-matrix", default=None, metavar="PNG",
                        help="also draw the row-normalised confusion matrix")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --json / --confusion-matrix files")


def _predict_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="images to segment (any PIL format), directories of images, or glob "
                             "patterns such as 'photos/*.jpg' (quoted: expanded by danet)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the PNGs")
    _model_options(parser)
    _inference_options(parser)
    parser.add_argument("--alpha", type=ranged("predict.alpha", float), default=0.5,
                        help="mask opacity in the overlay (default 0.5)")
    parser.add_argument("--no-legend", dest="legend", action="store_false",
                        help="no class legend on the overlays (by default the classes present are named)")
    parser.add_argument("--format", choices=PREDICT_FORMATS, default="palette",
                        help="palette: NAME_mask.png + NAME_overlay.png; cityscapes: label-id PNGs named "
                             "as the Cityscapes benchmark server expects (default palette)")
    parser.add_argument("--max-whole-pixels", type=ranged("predict.max_whole_pixels"), default=None,
                        metavar="N",
                        help="predict larger images with sliding windows even in whole mode; 0: never "
                             "(default 2048 x 2048 = 4194304)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on long inference")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _attention_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image to look at")
    parser.add_argument("--points", type=parse_point, nargs="+", required=True, metavar="X,Y",
                        help="query pixels (column,row) whose position-attention maps are shown")
    parser.add_argument("--output", required=True, metavar="PNG", help="the figure file to write")
    _model_options(parser)
    parser.add_argument("--channels", type=ranged("attention.channels"), nargs="+", default=None, metavar="C",
                        help="CAM channels to show (default: the --num-channels most contrasted)")
    parser.add_argument("--num-channels", type=ranged("attention.num_channels"), default=4,
                        help="channel maps to show (default 4)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on a large image")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _lr_plot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", nargs="+", choices=LR_POLICIES, default=None, metavar="POLICY",
                        help=f"policies to draw: {' '.join(LR_POLICIES)} (default: all)")
    parser.add_argument("--iters", type=ranged("train.iters"), default=None,
                        help="iterations of the run (default: the preset's run length, as "
                             "`danet train` would plan it)")
    _config_options(parser, "take the schedule, base LR and run length from this preset")
    parser.add_argument("--log", action="store_true", help="logarithmic LR axis")
    parser.add_argument("--output", "-o", default=None, metavar="PNG",
                        help="PNG to write (default: runs/lr_policies-<preset>.png; runs/ is git-ignored)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _export_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser)
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                        help="onnx (an .onnx file for onnxruntime and others) or torch-export "
                             "(a torch.export .pt2 program); default %(default)s")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--size", type=ranged("export.size"), nargs=2, default=None,
                        metavar=("HEIGHT", "WIDTH"),
                        help="input size of the example image (default: the training crop size)")
    parser.add_argument("--fixed-size", action="store_true",
                        help="export for the --size input only (default: any height and width)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _plan_options(parser: argparse.ArgumentParser) -> None:
    _config_options(parser, "recipe to plan for")
    parser.add_argument("--size", type=ranged("plan.size"), nargs=2, default=None,
                        metavar=("HEIGHT", "WIDTH"),
                        help="input size of a training image (default: the crop, data.crop_size)")
    parser.add_argument("--batch", type=ranged("plan.batch"), default=None,
                        help="images per GPU per step (default: the recipe's, train.batch_size over "
                             "--gpus and train.accum_steps)")
    parser.add_argument("--gpus", type=ranged("plan.gpus"), default=1,
                        help="processes of the run (DDP: each holds gradient buckets); default 1")
    parser.add_argument("--memory", type=ranged("plan.memory", float), nargs="+", default=None, metavar="GB",
                        help="also answer for cards of these sizes (beside 16 24 40 80 141)")
    parser.add_argument("--attention", choices=ATTENTIONS, nargs="+", default=None,
                        help="attentions to compare (default: reference and fused)")
    parser.add_argument("--amp", choices=AMP_MODES, nargs="+", default=None,
                        help="precisions to compare (default: none, and the recipe's train.amp or bf16)")
    parser.add_argument("--classes", type=ranged("plan.classes"), default=None,
                        help="number of classes (default: the dataset's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


_OPTIONS = {
    "train": _train_options,
    "eval": _eval_options,
    "predict": _predict_options,
    "attention": _attention_options,
    "lr-plot": _lr_plot_options,
    "export": _export_options,
    "plan": _plan_options,
}


def build_parser() -> argparse.ArgumentParser:
    """Return the ``danet`` argument parser with every subcommand registered (imports no torch)."""
    parser = argparse.ArgumentParser(prog="danet", description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("--version", action="version", version=f"danet-fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        doc = plain_text(_module_docstring(module_name))
        cmd = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        _OPTIONS[name](cmd)
    return parser


# what to try when a command runs out of memory
_OOM_ADVICE = {
    "train": "a smaller train.batch_size (or more train.accum_steps), data.crop_size, train.amp=bf16 or "
             "train.activation_checkpointing",
    "eval": "a smaller --window-memory-mb, --batch-size 1, --crop-size, fewer or smaller --scales",
    "predict": "a smaller --window-memory-mb, --max-whole-pixels, --crop-size, fewer or smaller --scales",
    "attention": "a smaller image",
    "export": "a smaller --size",
    "lr-plot": "fewer --iters",
}


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CPU or GPU), whatever layer raised it."""
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("can't allocate memory", "std::bad_alloc", "out of memory"))


def _first_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def write_traceback(err: BaseException, command: str, directory: str | Path | None = None) -> Path:
    """Write ``err``'s full traceback (and what ran) to a new file in ``directory`` (when it is an
    existing directory: a run's) or the temporary directory; returns its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = Path(directory) if directory is not None and Path(directory).is_dir() else None
    torch = sys.modules.get("torch")
    header = (f"danet {__version__} {command}, python {sys.version.split()[0]}"
              f"{', torch ' + torch.__version__ if torch is not None else ''}\n"
              f"command line: {' '.join(sys.argv)}\n\n")
    for where in (folder, Path(tempfile.gettempdir())):
        if where is None:
            continue
        try:
            fd, name = tempfile.mkstemp(prefix=f"danet-{command}-{stamp}-", suffix=".traceback.txt",
                                        dir=where)
        except OSError:
            continue
        with os.fdopen(fd, "w") as out:
            out.write(header + "".join(traceback.format_exception(err)))
        return Path(name)
    raise OSError("no writable directory for the traceback")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand.

    Exit statuses: 0 done; 2 a user error (one line naming the problem); 1 a failure (out of
    memory: one line; anything unexpected: one line and the file holding the full traceback);
    130 Ctrl-C (one line: every output is whole or absent). No bare stack reaches the terminal.
    """
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"danet {args.command}: interrupted (Ctrl-C); no output was left half-written", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError) as err:  # OSError: a missing file, a full or read-only disk
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
        if "Traceback (most recent call last)" in message:  # a DataLoader worker's error carries its stack
            message = f"{_first_line(err)} ({_traceback_saved(err, args)})"
        print(f"danet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:
        if _out_of_memory(err):
            advice = _OOM_ADVICE.get(args.command, "smaller inputs")
            print(f"danet {args.command}: out of memory: {_first_line(err, 200)}; try {advice}",
                  file=sys.stderr)
            return 1
        print(f"danet {args.command}: unexpected error: {type(err).__name__}: {_first_line(err)} "
              f"({_traceback_saved(err, args)})", file=sys.stderr)
        return 1


def _traceback_saved(err: BaseException, args: argparse.Namespace) -> str:
    """Where :func:`write_traceback` put ``err``'s traceback, in words."""
    try:
        path = write_traceback(err, args.command, getattr(args, "run_dir", None))
    except OSError:
        return "no directory could hold the full traceback"
    return f"the full traceback is in {path}"


def _run(args: argparse.Namespace) -> int:
    """Import and run the chosen command (its torch-side setup first: threads, the checkpoint)."""
    module = importlib.import_module(COMMANDS[args.command])
    if hasattr(args, "threads"):
        from danet.runtime import set_threads  # lazy: start-up time (imports torch)

        set_threads(args.threads)
    if hasattr(args, "checkpoint"):
        from danet.training.run_dir import resolve_checkpoint  # lazy: start-up time (imports torch)

        args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
