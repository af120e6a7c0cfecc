"""The ``hybridgl`` command. Heavy modules are imported inside each subcommand, so that
``hybridgl serve`` never loads torch."""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

from worker.hybridgl.settings import add_settings_arguments, settings_from_args


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "expression"


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from worker.hybridgl.images import load_image
    from worker.hybridgl.pipeline import HybridGL
    from worker.hybridgl.render import overlay

    from worker.hybridgl.errors import InputError

    if not args.expressions and not args.labels:
        raise InputError("nothing to segment: give at least one EXPRESSION, or --labels A,B,...")
    settings = settings_from_args(args)
    rgb = load_image(args.image)
    proposals = None
    if args.proposals:
        with np.load(args.proposals, allow_pickle=False) as z:
            if "masks" not in z:
                raise ValueError(f"{args.proposals} has no array named 'masks' (N x H x W bool)")
            proposals = z["masks"]
    pipeline = HybridGL(settings)
    index = pipeline.index(rgb, proposals)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
    if labels:  # label names: every instance of each, in one classification
        answer = pipeline.instances(index, labels)
        _write_instances(out / f"{stem}_labels", rgb, index, answer, answer.explanation)
    for n, expression in enumerate(args.expressions):
        base = out / f"{stem}_{n:02d}_{_slug(expression)}"
        parsed = pipeline.parse(expression)
        if parsed.asks_for_set:  # "all the cars", "cars": every instance
            answer = pipeline.instances(index, [expression])
            _write_instances(base, rgb, index, answer, {**parsed.to_dict(), **answer.explanation})
            continue
        result = pipeline.query(index, expression)
        Image.fromarray(result.mask.astype(np.uint8) * 255).save(f"{base}.mask.png")
        Image.fromarray(overlay(rgb, result.mask, index.boxes[result.chosen])).save(f"{base}.overlay.png")
        Path(f"{base}.json").write_text(json.dumps(result.explanation, indent=1))
        print(f"{expression!r}: mask {result.chosen} of {len(index)} (pure {result.pure}, score {result.score:.3f}) "
              f"-> {base}.mask.png")
    return 0


def _write_instances(base: Path, rgb, index, answer, explanation: dict) -> None:
    import numpy as np
    from PIL import Image

    from worker.hybridgl.render import overlay

    for k, found in enumerate(answer.instances):
        mask = index.masks[found.index].numpy()
        name = f"{base}_{_slug(answer.targets[found.target])}_{k:02d}"
        Image.fromarray(mask.astype(np.uint8) * 255).save(f"{name}.mask.png")
        Image.fromarray(overlay(rgb, mask, index.boxes[found.index])).save(f"{name}.overlay.png")
    Path(f"{base}.json").write_text(json.dumps(explanation, indent=1))
    found = ", ".join(f"{answer.targets[i.target]} {i.score:.3f}" for i in answer.instances) or "none"
    print(f"{', '.join(map(repr, answer.targets))}: {len(answer.instances)} instance(s) of {len(index)} proposals "
          f"({found}) -> {base}.json")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from backend.access import refuse_example_password, startup_warnings
    from backend.app import create_app
    from backend.config import ServeSettings

    settings = ServeSettings.from_env(host=args.host, port=args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    refuse_example_password(settings)
    for warning in startup_warnings(settings):
        logging.getLogger("hybridgl.backend").warning("%s", warning)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from backend.config import ServeSettings
    from worker.runner import run_worker

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(ServeSettings.from_env(), settings_from_args(args), name=args.name, burst=args.burst)


def cmd_batches(args: argparse.Namespace) -> int:
    from backend import batches
    from backend import queue as q
    from backend.config import ServeSettings

    conn = q.connect(ServeSettings.from_env().redis_url)
    states = batches.listing(conn, args.project)
    if args.json:
        print(json.dumps([b.as_dict() for b in states], indent=1))
    else:
        print(batches.table(states))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from worker import weights_command

    return weights_command.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridgl", description="Text-prompted segmentation (HybridGL) for Label Studio.")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment an image with one or more referring expressions")
    seg.add_argument("image", help="image file")
    seg.add_argument("expressions", nargs="*", metavar="EXPRESSION",
                     help="referring expression(s); a plural one (\"all the cars\", \"cars\") gets every instance")
    seg.add_argument("--labels", metavar="A,B,...",
                     help="label names, comma-separated: every instance of each, none of an absent one (as "
                          "pre-labeling with label names does)")
    seg.add_argument("--out", required=True, help="output folder (mask PNG, overlay PNG, JSON explanation)")
    seg.add_argument("--proposals", help=".npz with an array 'masks' (N x H x W bool) replacing SAM's proposals")
    add_settings_arguments(seg)
    seg.set_defaults(func=cmd_segment)

    weights = sub.add_parser("weights", help="list, fetch and verify model weights",
                             description="List, fetch and verify the weights the worker loads.")
    weights.add_argument("weights_action", nargs="?", default="list", choices=("list", "fetch", "verify"),
                         metavar="{list,fetch,verify}",
                         help="list (default): registry and status in the weights directory; "
                              "fetch: download with checksum; verify: check files, exit 1 on a problem")
    weights.add_argument("weight_names", nargs="*", metavar="NAME",
                         help="registry names (vit_h, vit_l, vit_b, vit_t, ViT-B-16); default: the ones the "
                              "current settings use for fetch, all for list and verify")
    weights.add_argument("--test-weights", metavar="DIR", type=Path,
                         help="prepare the test weights (real MobileSAM, random CLIPs) in DIR and "
                              "print the environment that uses them")
    weights.set_defaults(func=cmd_weights)

    serve = sub.add_parser("serve", help="run the web backend Label Studio connects to (no model loaded here)")
    serve.add_argument("--host", default=None, help="listen address [HYBRIDGL_HOST, default 0.0.0.0]")
    serve.add_argument("--port", type=int, default=None, help="port [HYBRIDGL_PORT, default 9090]")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    from backend import prelabel

    pre = sub.add_parser("prelabel", help="pre-label a whole Label Studio project through the workers",
                         description="Enqueue every task of a project that has no prediction of the current "
                                     "model version; workers write the predictions. Safe to interrupt and re-run.")
    prelabel.add_arguments(pre)
    pre.set_defaults(func=prelabel.run)

    bat = sub.add_parser("batches", help="the batches (prelabel runs, Retrieve Predictions) and their progress",
                         description="Every prelabel run and Retrieve Predictions as a batch: counts, failures with "
                                     "reasons, rate and ETA (the same as GET /batches). Cancel one with `hybridgl "
                                     "prelabel --project ID --cancel BATCH`.")
    bat.add_argument("--project", help="only this project's batches")
    bat.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bat.set_defaults(func=cmd_batches)

    from worker import evaluate

    ev = sub.add_parser("evaluate", help="benchmarks (the paper's protocol) and Label Studio export reports",
                        description="oIoU/mIoU on RefCOCO/+/g and PhraseCut, or what pre-labeling saved "
                                    "annotators in a Label Studio export.")
    evaluate.add_arguments(ev)
    add_settings_arguments(ev)
    ev.set_defaults(func=evaluate.run)

    work = sub.add_parser("worker", help="run an RQ worker that loads the models once and runs jobs")
    work.add_argument("--name", help="worker name (default: hybridgl-<host>-<pid>)")
    work.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    add_settings_arguments(work)
    work.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: an error meant for the user prints its message alone (exit 2); any other
    exception is a bug, shown with its traceback and a line asking to report it (exit 1)."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        if _is_user_error(exc):
            print(f"hybridgl {args.command}: error: {exc}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"hybridgl {args.command}: unexpected {type(exc).__name__}: this is a bug; please report it with the "
              "traceback above and the command you ran", file=sys.stderr)
        return 1


def _is_user_error(exc: Exception) -> bool:
    """Errors whose message tells the user what to do: the two packages' user errors (bad input, missing
    weights, settings, Label Studio answers), a file that does not exist, Redis unreachable."""
    import redis

    from backend.errors import UserError as ServingUserError
    from worker.hybridgl.errors import UserError as MethodUserError

    return isinstance(exc, (ServingUserError, MethodUserError, FileNotFoundError, redis.ConnectionError))


if __name__ == "__main__":
    sys.exit(main())
