"""`python -m core <command>`: the same code the app's worker runs, from a terminal."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.metric import registry
from core.training.config import DEVICES, ENCODERS, FIELD_SETTINGS, PRECISIONS, SAMPLERS, SUPERVISION, RunConfig
from models.widths import AUGMENTS, DEFAULT_AUGMENT, DEFAULT_WIDTHS, LEGACY_AUGMENT, ORIENTED_DATASETS
from storage.db import make_engine


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from core.data.images import ImageRejected
    from core.data.ingest import IngestError
    from models.checkpoint import CheckpointError

    from storage.settings import StorageError

    try:
        return args.handler(args)
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, LookupError, CheckpointError, IngestError, ImageRejected, StorageError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # a path the user gave: missing, a folder, unreadable, a full disk
        from storage.artifacts import disk_full_reason
        from storage.settings import data_home

        where = f"{exc.filename}: " if exc.filename else ""
        full = disk_full_reason(exc, Path(str(exc.filename)).parent if exc.filename else data_home())
        return _fail(full or f"{where}{exc.strerror or exc}")


def _fail(message: str) -> int:
    """A user's mistake: one line on stderr and exit status 2, never a traceback."""
    try:
        print(f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", file=sys.stderr)
    except OSError:
        pass  # stderr is a log on a full disk: the status says it failed
    return 2


def _print_json(value) -> None:
    """Strict JSON (no NaN or Infinity, which JSON does not have), flushed at once."""
    print(json.dumps(value, allow_nan=False), flush=True)


# the RunConfig fields `train` sets, each from the option of the same name (--embedding-dim …),
# besides the objectives' settings (core.metric.registry); an option left out is None, so RunConfig's
# own default (or the objective's) applies
MAX_CHECKPOINT_BYTES = 2 * 2**30  # an encoder file named on the command line (a ResNet-18's is 45 MB)
TRAIN_FIELDS = ("encoder", "embedding_dim", "width", "loss", "miner", "supervision", "sampler", "samples_per_class",
                "augment", "precision", "compile", "epochs", "batch_size", "lr", "device", "seed")


class OneLineParser(argparse.ArgumentParser):
    """A mistyped option is one line on stderr and exit status 2, like every other refusal of the
    command line (argparse's own prints its whole usage first; --help still shows it)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the options)\n")


def _choices_help(helps: dict[str, str]) -> str:
    return "; ".join(f"{name}: {text.rstrip('.')}" for name, text in helps.items()).replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m core", description="Embedding Lab from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("datasets", help="list stored and built-in datasets").set_defaults(handler=cmd_datasets)

    p = sub.add_parser("import", help="import images: a folder, a zip, or image files")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--name", help="dataset name (default: the first path's name)")
    p.add_argument("--size", type=int, default=64, help="side of the stored square images, in pixels")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("train", help="train an encoder (or resume a run); ends with one JSON line",
                       description="Train an encoder on a stored or built-in dataset. Options left out take "
                       "RunConfig's defaults; --resume RUN_ID continues a run with its stored settings.")
    p.add_argument("--dataset", help="NAME, ID or NAME@VERSION (a bare name: its newest version; "
                   "required unless --resume)")
    p.add_argument("--resume", type=int, metavar="RUN_ID",
                   help="continue an interrupted, cancelled or failed run from its last checkpoint")
    p.add_argument("--encoder", choices=ENCODERS)
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--width", type=int, help="channels of the encoder's first stage (default: the encoder's own, "
                   + ", ".join(f"{name} {width}" for name, width in DEFAULT_WIDTHS.items()) + ")")
    objectives = registry.objectives()
    p.add_argument("--loss", choices=list(objectives),
                   help=f"default {RunConfig.loss}. "
                   + _choices_help({name: spec.explanation for name, spec in objectives.items()}))
    p.add_argument("--miner", choices=list(registry.miners()),
                   help="default: the loss's own (" + ", ".join(f"{k} {v.default_miner}" for k, v in objectives.items())
                   + "). " + _choices_help({name: spec.explanation for name, spec in registry.miners().items()}))
    for name, setting in registry.all_settings().items():
        having = [o for o, spec in objectives.items() if spec.setting(name) is not None]
        defaults = ", ".join([f"{o} {objectives[o].setting(name).default}" for o in having]
                             + [f"{m} miner {s.default}" for m, spec in registry.miners().items()
                                for s in spec.settings if s.name == name])
        detail = f"{setting.help}; " if setting.help else ""
        if setting.choices:
            detail += _choices_help(setting.choice_help) + "; " if setting.choice_help else ""
            p.add_argument("--" + name.replace("_", "-"), choices=setting.choices, dest=name,
                           help=f"{detail}default: {defaults}")
        else:
            p.add_argument("--" + name.replace("_", "-"), type=float, dest=name,
                           help=f"{detail}{setting.low} to {setting.high}; default: {defaults}")
    p.add_argument("--supervision", choices=SUPERVISION,
                   help="auto: labels when the dataset has them and the loss is not infonce; "
                   "self: two augmented views of an image are the positive pair")
    p.add_argument("--sampler", choices=SAMPLERS, help="pk: P classes × K images per batch (labels only)")
    p.add_argument("--samples-per-class", type=int, help="K of the pk sampler")
    p.add_argument("--augment", choices=AUGMENTS,
                   help="what a label-supervised batch goes through: flip mirrors half the images, erase blanks a "
                   "square in half of them (two-view runs draw their own views); a run that flips embeds each image "
                   f"as the mean of it and its mirror image; default {DEFAULT_AUGMENT}, or {LEGACY_AUGMENT} on "
                   f"{', '.join(ORIENTED_DATASETS)} (a mirrored digit is another glyph)")
    p.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on CUDA and on CPUs with bf16 instructions, else fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the encoder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", metavar="N",
                   help="train the run data-parallel on N Ray Train workers, each encoding its share of every batch "
                   "(the miner and the loss see the whole batch); needs a Ray cluster at EMBEDDING_LAB_RAY_ADDRESS "
                   "with a CPU (a GPU for a cuda run) per worker; default 1")
    _projection_flags(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("embed", help="embed a dataset with a stored run's encoder or a checkpoint file")
    p.add_argument("--dataset", required=True, help="NAME, ID or NAME@VERSION (a bare name: its newest version)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=int)
    source.add_argument("--checkpoint", type=Path)
    p.add_argument("--device", choices=DEVICES, default="auto")
    _projection_flags(p)
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("search", help="nearest images of a run to an image file")
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("-k", type=int, default=5, help="how many neighbours: 1 to the number of images")
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("project", help="compute a run's statistics, UMAP map and map across epochs in this "
                       "process; ends with one JSON line")
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--n-neighbors", type=int, default=15, help="2 to 200")
    p.add_argument("--min-dist", type=float, default=0.1, help="0 to 1")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--queued-only", action="store_true", help=argparse.SUPPRESS)  # the app's job process
    p.set_defaults(handler=cmd_project)

    p = sub.add_parser("export", help="export a run: embeddings as parquet, a TensorBoard projector folder or zip, "
                       "or its encoder as safetensors; ends with one JSON line")
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="parquet (one row per image: embedding, labels, split, map coordinates, the statistics "
                   "once computed, a training run's mining counts), projector (a folder TensorBoard's projector "
                   "opens, or a .zip), or safetensors (the encoder)")
    p.add_argument("--out", type=Path, required=True, help="the file or folder to write; its folder must exist")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file (or projector folder)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("triplets", help="what a run's miner picked and its loss used in an epoch's last batch, "
                       "one JSON line each", description="The triplets (or pairs) the Triplets page shows: a sample "
                       "stratified by category of what the run's miner returned and its loss used in the last batch "
                       "of the epoch, as JSON lines: epoch, anchor, positive, negative (dataset positions; null "
                       "for the missing member of a pair), d_ap, d_an, margin, category, loss, and weight (the "
                       "softmax weight of the negative for infonce and supcon).")
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--epoch", type=int, help="default: the run's last stored epoch")
    p.set_defaults(handler=cmd_triplets)

    p = sub.add_parser("compare", help="compare two runs over the images they share",
                       description="Run B against run A over the images both embedded: neighbourhood agreement "
                       "(Jaccard of each image's k nearest), Precision@1 and MAP@R of A and B with B − A and its "
                       "bootstrap 95%% interval, overall and per class, queries that got better or worse, and the "
                       "settings that differ. Both runs need their statistics (python -m core project).")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_ID", help="run A, then run B")
    p.add_argument("--k", default="10", help="neighbours per image behind the agreement (default 10)")
    p.add_argument("--agreement-only", action="store_true",
                   help="neighbourhood agreement alone (runs of unlabelled data have no metrics)")
    p.add_argument("--json", action="store_true", help="one JSON object: the figures and the tables")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("duplicates", help="exact and near-duplicate images, and test images with a copy in the "
                       "training split", description="Groups of identical images (by their pixels) and of near "
                       "copies (pixel descriptors that ignore a one-pixel shift and JPEG re-encoding, or a run's "
                       "embeddings), each member with its position, label, split and distance to the group's first; "
                       "then the summary. The finding is stored for the next time.")
    p.add_argument("--dataset", help="name or id (default with --run: the run's dataset)")
    p.add_argument("--run", help="find near copies by this run's embeddings instead of the pixels")
    p.add_argument("--threshold", help="the largest distance between near copies: above 0, at most 2 "
                   "(default 0.05 for pixels, 0.01 for embeddings)")
    p.add_argument("--json", action="store_true", help="one JSON object: the summary, the groups, the leaked test images")
    p.add_argument("--exclude", choices=("copies", "leaks"),
                   help="then make a version of the dataset without them: copies keeps one image of each group, "
                        "leaks removes the test images with a training copy")
    p.set_defaults(handler=cmd_duplicates)

    p = sub.add_parser("delete-run", help="delete a run and its files")
    p.add_argument("run", type=int)
    p.set_defaults(handler=cmd_delete_run)

    # dataset versions (core.data.versions): edits over a version, listed, deleted, trained again on
    p = sub.add_parser("edit", help="make a new version of a dataset by relabelling, excluding or tagging images; "
                       "ends with one JSON line", description="Store a new version of the dataset: its parent "
                       "(NAME@VERSION, or the newest) plus these edits; the pixels are not copied. Image ids are "
                       "positions, as the pages, search results and exports show them. Nothing is stored when "
                       "any edit is wrong.")
    p.add_argument("--dataset", required=True, help="NAME, ID or NAME@VERSION: the version to edit (default: the newest)")
    p.add_argument("--relabel", nargs="+", action="extend", default=[], metavar="ID=LABEL",
                   help="give image ID the label LABEL (one of the dataset's classes)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="ID",
                   help="leave image ID out of training and of the metrics")
    p.add_argument("--tag", nargs="+", action="extend", default=[], metavar="ID=TAG", help="tag image ID")
    p.add_argument("--note", help="what this version fixes")
    p.set_defaults(handler=cmd_edit)

    p = sub.add_parser("versions", help="list a dataset's versions and what each changed")
    p.add_argument("--dataset", required=True, help="NAME or ID")
    p.add_argument("--json", action="store_true", help="one JSON line per version, with its edits")
    p.set_defaults(handler=cmd_versions)

    p = sub.add_parser("delete-version", help="delete a version that no run uses and no version edits")
    p.add_argument("--dataset", required=True, metavar="NAME@VERSION")
    p.set_defaults(handler=cmd_delete_version)

    p = sub.add_parser("retrain", help="train again with a run's settings on a version of its dataset; "
                       "ends with one JSON line")
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--version", type=int, help="default: the dataset's newest version")
    _projection_flags(p)
    p.set_defaults(handler=cmd_retrain)

    p = sub.add_parser("worker", help=argparse.SUPPRESS)  # started by the app
    p.add_argument("run", type=int)
    p.add_argument("--no-projection", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(handler=cmd_worker)
    return parser


def _projection_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-projection", action="store_true", help="do not start the UMAP map afterwards")
    group.add_argument("--wait-projection", action="store_true",
                       help="wait for the UMAP map (a job of its own) before printing the JSON line")


def cmd_datasets(args) -> int:
    from core.data.datasets import FASHION_MNIST_HINT, builtin_names
    from storage import queries
    from storage.db import transaction

    engine = make_engine()
    with transaction(engine) as session:
        stored = {d.name: d for d in queries.list_datasets(session)}
        for d in stored.values():
            classes = f"{len(d.classes)} classes" if d.classes else "unlabeled"
            print(f"{d.id:>4}  {d.name:<24} {d.n_images:>7} images  {d.image_size}×{d.image_size}×{d.channels}  {classes}  ({d.source})")
    for name, available in builtin_names().items():
        if name not in stored:
            state = "built-in, imported on first use" if available else f"built-in, not installed: {FASHION_MNIST_HINT}"
            print(f"   -  {name:<24} {state}")
    return 0


def cmd_import(args) -> int:
    from core.data.importing import import_paths

    engine = make_engine()
    report = import_paths(engine, args.paths, name=args.name, image_size=args.size)
    for rejection in report.rejected:
        print(f"rejected {rejection.name}: {rejection.reason}", file=sys.stderr)
    _print_json(report.summary())
    return 0


def cmd_train(args) -> int:
    from core.runs.jobs import create_training_run, prepare_resume

    given = {field: getattr(args, field) for field in TRAIN_FIELDS if getattr(args, field) is not None}
    settings = {name: getattr(args, name) for name in registry.all_settings() if getattr(args, name) is not None}
    given.update({name: value for name, value in settings.items() if name in FIELD_SETTINGS})
    options = {name: value for name, value in settings.items() if name not in FIELD_SETTINGS}
    if args.workers is not None:
        given["workers"] = _workers(args.workers)
    if args.resume is not None:
        if args.dataset is not None or given or options:
            flags = ["--" + name.replace("_", "-")
                     for name in (["dataset"] if args.dataset else []) + list(given) + list(options)]
            raise ValueError(f"--resume continues run {args.resume} with its stored settings; leave out {', '.join(flags)}")
        engine = make_engine(role="worker")  # it runs the run (or map) itself
        epoch = prepare_resume(engine, args.resume)
        print(f"resuming run {args.resume} after epoch {epoch}", file=sys.stderr)
        return _execute(engine, args.resume, args, resume=True)
    if args.dataset is None:
        raise ValueError("--dataset is required (or --resume RUN_ID to continue a run)")
    cfg = RunConfig(dataset=args.dataset, **given, options=options)
    engine = make_engine(role="worker")  # it runs the run (or map) itself
    return _execute(engine, create_training_run(engine, cfg), args)


def _workers(text: str) -> int:
    """--workers as a whole number from 1 to MAX_WORKERS; ValueError with a sentence otherwise
    (whether the cluster has that many CPUs is core.runs.launch.check_workers's to say)."""
    from core.training.config import MAX_WORKERS

    value = text.strip()
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_WORKERS:
        raise ValueError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, got {text!r}")
    return int(value)


def cmd_triplets(args) -> int:
    from core.explore.triplets import inspected_rows

    for row in inspected_rows(make_engine(), args.run, args.epoch):
        _print_json(row)
    return 0


def cmd_embed(args) -> int:
    from core.runs.jobs import create_embedding_run
    from storage import artifacts
    from storage.db import transaction
    from storage.schema import Run

    engine = make_engine(role="worker")  # it runs the run (or map) itself
    if args.run is not None:
        with transaction(engine) as session:
            source = session.get(Run, args.run)
            if source is None or not source.checkpoint:
                raise LookupError(f"run {args.run} has no stored encoder")
            path, name = artifacts.absolute(source.checkpoint), f"run {args.run} encoder"
    else:
        path, name = args.checkpoint, args.checkpoint.name
    from core.data.images import read_named_file

    data = read_named_file(path, MAX_CHECKPOINT_BYTES, "encoder checkpoint")
    run_id = create_embedding_run(engine, args.dataset, data, name, args.run, args.device)
    return _execute(engine, run_id, args)


def _execute(engine, run_id: int, args, resume: bool = False) -> int:
    """Run in this process (the Runs page can cancel it like a worker), print the JSON line as
    soon as the run is completed, and leave its map to a job of its own (or wait for it). When
    runs go to a Ray cluster (core.runs.launch), submit it there and follow its stored progress."""
    from tqdm import tqdm

    from core.runs import launch
    from core.runs.jobs import start_projection
    from core.runs.worker import execute_run

    if launch.ray_address():
        return _follow_job(engine, run_id, args, resume)
    bar = tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step(progress) -> None:
        bar.total = progress.total_steps
        bar.set_description(f"epoch {progress.epoch}")
        bar.set_postfix({"loss": f"{progress.loss:.4f}", "hard": progress.counts["hard"],
                         "semi-hard": progress.counts["semi-hard"]})
        bar.update(progress.step - bar.n)

    summary = execute_run(engine, run_id, on_step=on_step, project=False, resume=resume)
    bar.close()
    if summary["status"] == "completed" and not args.no_projection:
        start_projection(engine, run_id)
        summary["projection"] = _wait_for_projection(engine, run_id) if args.wait_projection else "started"
    _print_json(summary)
    return 0 if summary["status"] == "completed" else 1


def _follow_job(engine, run_id: int, args, resume: bool) -> int:
    """The run as a Ray job: submit it, echo its epochs on stderr as the database records them,
    print the same JSON line as a run in this process (and wait for its map when asked; the job
    starts the map itself). Ctrl-C cancels the run and stops its job."""
    import time

    from core.runs.jobs import cancel_run, run_summary, start_worker
    from storage.db import transaction
    from storage.queries import ACTIVE
    from storage.schema import Run

    start_worker(engine, run_id, resume=resume, project=not args.no_projection)
    with transaction(engine) as session:
        job_id = session.get(Run, run_id).job_id
    print(f"run {run_id} submitted as Ray job {job_id}", file=sys.stderr, flush=True)
    said = None
    try:
        while True:
            with transaction(engine) as session:  # a dead worker's run reads interrupted (core.runs.lifecycle)
                run = session.get(Run, run_id)
                state = (run.status, run.phase, run.epoch, run.step, run.total_steps, run.last_loss)
            status, phase, epoch, step, total, loss = state
            if status not in ACTIVE:
                break
            if (phase, epoch) != said and phase:
                done = f": {epoch} epochs done, loss {loss:.4f}" if phase == "training" and epoch and loss is not None else ""
                print(f"{phase}{done}", file=sys.stderr, flush=True)
                said = (phase, epoch)
            time.sleep(0.5)
    except KeyboardInterrupt:
        cancel_run(engine, run_id)
        print(f"run {run_id} cancelled; its Ray job {job_id} stopped", file=sys.stderr)
        return 130
    summary = run_summary(engine, run_id)
    if summary["status"] == "completed" and not args.no_projection:
        summary["projection"] = _wait_for_projection(engine, run_id) if args.wait_projection else "started"
    _print_json(summary)
    return 0 if summary["status"] == "completed" else 1


def _map_queued(engine, run_id: int, timeout: float = 120) -> bool:
    """Whether the run's default map has been queued (its worker, elsewhere, queues it just after
    the run completes), waiting up to `timeout` seconds for it."""
    import time

    from core.explore.projection import UMAP_DEFAULTS, params_key
    from storage import queries
    from storage.db import transaction

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with transaction(engine) as session:
            if queries.projection(session, run_id, "umap", params_key(UMAP_DEFAULTS)) is not None:
                return True
        time.sleep(0.5)
    return False


def _wait_for_projection(engine, run_id: int) -> dict:
    """Poll the run's default map until its job ends, echoing its phase on stderr."""
    import time

    from core.explore.projection import UMAP_DEFAULTS, params_key
    from storage import artifacts, queries
    from storage.db import transaction

    said = None
    if not _map_queued(engine, run_id):
        return {"status": "missing", "reason": "the run's map was never queued"}
    while True:
        with transaction(engine) as session:
            row = queries.projection(session, run_id, "umap", params_key(UMAP_DEFAULTS))
            state = (row.status, row.phase, row.message, row.reason, row.path)
        status, phase, message, reason, path = state
        if status not in ("queued", "running"):
            result = {"status": status}
            result.update({"path": str(artifacts.absolute(path))} if status == "done"
                          else {"reason": (reason or "").splitlines()[0]})
            return result
        if (phase, message) != said and message:
            print(f"map: {message}", file=sys.stderr, flush=True)
            said = (phase, message)
        time.sleep(0.5)


def cmd_runs(args) -> int:
    from core.runs.jobs import run_summary
    from storage import queries
    from storage.db import transaction

    engine = make_engine()
    with transaction(engine) as session:  # reads only: a dead worker's run reads interrupted
        ids = [run.id for run in queries.list_runs(session)]
    for run_id in ids:
        s = run_summary(engine, run_id)
        if args.json:
            _print_json(s)
        else:
            p1 = s.get("precision_at_1")
            metric = f"P@1 {p1:.3f}  MAP@R {s['map_at_r']:.3f}" if p1 is not None else ""
            print(f"{run_id:>4}  {s['kind']:<6} {s['status']:<11} {s['device'] or '-':<6} {s['seconds']:>8.1f} s  {metric}")
    return 0


def cmd_search(args) -> int:
    from core.data.images import MAX_FILE_BYTES, read_named_file
    from core.explore.service import search_by_image

    data = read_named_file(args.image, MAX_FILE_BYTES, "image")  # not /dev/zero, not a 5 GB file
    hits = search_by_image(make_engine(), args.run, data, args.image.name, args.k)
    _print_json(hits)
    return 0


def cmd_project(args) -> int:
    from core.explore.projection import UMAP_DEFAULTS
    from core.explore.evolution import probe_epochs
    from storage import artifacts

    if not 2 <= args.n_neighbors <= 200:
        raise ValueError(f"--n-neighbors must be from 2 to 200, got {args.n_neighbors}")
    if not 0.0 <= args.min_dist <= 1.0:
        raise ValueError(f"--min-dist must be from 0 to 1, got {args.min_dist}")

    def report(phase, fraction, message) -> None:
        if not args.quiet:
            print(f"{phase}: {message}" + (f" ({fraction:.0%})" if fraction is not None else ""), file=sys.stderr)

    params = dict(UMAP_DEFAULTS, n_neighbors=args.n_neighbors, min_dist=args.min_dist)
    engine = make_engine(role="worker")  # it runs the run (or map) itself
    from sqlalchemy import select

    from core.runs.jobs import ensure_projectable
    from core.runs.queue import wait_for_turn
    from storage.db import transaction
    from storage.schema import ProjectionRow
    from storage.status import RunStatus

    with transaction(engine) as session:
        ensure_projectable(session, args.run)  # one line for a run with nothing to project
        mine = session.scalar(select(ProjectionRow.id).where(  # the jobs the app queued for this process
            ProjectionRow.run_id == args.run, ProjectionRow.status == RunStatus.QUEUED,
            ProjectionRow.pid == os.getpid()).order_by(ProjectionRow.id))
    if mine is not None:
        wait_for_turn(engine, ProjectionRow, mine)  # light: umap and torch are imported once there is a slot
    from core.runs.worker import compute_evolution, compute_projection, compute_statistics
    try:  # done already: returned at once
        statistics = compute_statistics(engine, args.run, report=report, queued_only=args.queued_only).status
    except ValueError as exc:  # another process computes them, or (the app's job) they were cancelled
        statistics = str(exc)
        print(f"statistics: {exc}", file=sys.stderr)
    if statistics == "cancelled":  # the app cancelled this process's jobs: the map goes too
        _print_json({"run_id": args.run, "status": "cancelled", "statistics": statistics})
        return 1
    row = compute_projection(engine, args.run, params=params, report=report, queued_only=args.queued_only)
    result = {"run_id": args.run, "status": row.status, "statistics": statistics}
    if row.status == "done":
        result["projection"] = str(artifacts.absolute(row.path))
    elif row.reason:
        result["reason"] = row.reason.splitlines()[0]
    if row.status != "cancelled" and probe_epochs(args.run):  # a run that kept its probe every epoch
        try:
            result["evolution"] = compute_evolution(engine, args.run, report=report,
                                                    queued_only=args.queued_only).status
        except ValueError as exc:  # as for the statistics: another process has it, or it was cancelled
            result["evolution"] = str(exc)
            print(f"evolution: {exc}", file=sys.stderr)
    _print_json(result)
    return 0 if row.status == "done" else 1


def cmd_export(args) -> int:
    from core.explore.export import export_run, exported_rows

    engine = make_engine()
    path = export_run(engine, args.run, args.format, args.out, overwrite=args.overwrite)
    _print_json({"run": args.run, "format": args.format, "path": str(path),
                 "rows": exported_rows(engine, args.run, args.format)})
    return 0


def cmd_compare(args) -> int:
    from core.explore.compare import compare_runs, comparison_text, parse_k, parse_run_pair

    run_a, run_b = parse_run_pair(args.runs)
    comparison = compare_runs(make_engine(), run_a, run_b, k=parse_k(args.k), metrics=not args.agreement_only)
    if args.json:
        _print_json(comparison.to_dict())
    else:
        print(comparison_text(comparison))
    return 0


def cmd_duplicates(args) -> int:
    from core.explore.duplicates import find_duplicates, report_lines

    engine = make_engine()
    found = find_duplicates(engine, args.dataset, args.run, args.threshold)
    if args.json:
        _print_json(found.to_dict())
    else:
        print("\n".join(report_lines(found)), flush=True)
    if args.exclude:
        from core.explore.duplicates import exclude_duplicates

        number, count = exclude_duplicates(engine, found, args.exclude)
        print(f"made version {number} of {found.dataset!r} ({found.dataset}@{number}): {count} images excluded", file=sys.stderr)
    return 0


def cmd_delete_run(args) -> int:
    from core.runs.jobs import delete_run

    delete_run(make_engine(), args.run)
    print(f"deleted run {args.run}", file=sys.stderr)
    return 0


def cmd_edit(args) -> int:
    from core.data.versions import describe_version, make_version, parse_dataset_ref, parse_edits

    relabel, exclude, tag = parse_edits(args.relabel, args.exclude, args.tag)
    engine = make_engine()
    number = make_version(engine, args.dataset, relabel, exclude, tag, args.note)
    info = describe_version(engine, parse_dataset_ref(args.dataset)[0], number)
    for warning in info.warnings:
        print(f"warning: {info.ref}: {warning}", file=sys.stderr)
    _print_json(info.as_dict(with_edits=False))
    return 0


def cmd_versions(args) -> int:
    from core.data.versions import list_versions, version_line

    for info in list_versions(make_engine(), args.dataset):
        if args.json:
            _print_json(info.as_dict())
        else:
            print(version_line(info))
    return 0


def cmd_delete_version(args) -> int:
    from core.data.versions import delete_version

    delete_version(make_engine(), args.dataset)
    print(f"deleted {args.dataset.strip()}", file=sys.stderr)
    return 0


def cmd_retrain(args) -> int:
    from core.runs.retrain import create_retraining_run

    engine = make_engine(role="worker")  # it runs the run (or map) itself
    return _execute(engine, create_retraining_run(engine, args.run, args.version), args)


def cmd_worker(args) -> int:
    from core.runs.queue import wait_for_turn
    from storage.schema import Run

    engine = make_engine(role="worker")
    wait_for_turn(engine, Run, args.run)  # light: torch is imported once the machine has a slot for it
    from core.runs.worker import execute_run

    summary = execute_run(engine, args.run, project=not args.no_projection, resume=args.resume)
    try:
        _print_json(summary)
    except OSError:
        pass  # its log is on a full disk: the run's row holds the summary and the reason
    return 0 if summary["status"] == "completed" else 1
