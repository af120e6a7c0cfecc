"""Tests for worker.hybridgl.models and the `hybridgl weights` command.

MobileSAM runs with its real weights. The CLIP files hold seeded random weights in the formats
real weights come in: they show the loader reads every format into exactly the saved model,
not that CLIP is accurate.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker import weights_command
from worker.hybridgl.models import (
    CLIP_WEIGHTS,
    WEIGHTS,
    ChecksumError,
    WeightFile,
    WeightsError,
    WeightsNotFoundError,
    cpu_has_native_bf16,
    download_weight,
    file_sha256,
    is_torchscript_archive,
    load_clip,
    load_models,
    load_sam,
    pick_device,
    pick_dtype,
    read_clip_state_dict,
    resolve_weight,
    verify_weight,
)
from worker.hybridgl.settings import SAM_MODELS, Settings
from worker.weights_command import (
    OPENAI_CLIP,
    TINY_CLIP,
    TINY_CLIP_CONFIG,
    build_random_clip,
    prepare_test_weights,
    save_openai_archive,
)

TEXTS = ["the man in the white shirt on the left", "a dog", ""]


def flip_byte(source: Path, dest: Path, offset: int | None = None) -> Path:
    data = bytearray(source.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    dest.write_bytes(bytes(data))
    return dest


def assert_same_clip(loaded: Any, reference: Any, tokenizer: Any) -> None:
    loaded_state, reference_state = loaded.state_dict(), reference.state_dict()
    assert loaded_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert loaded_state[key].dtype == torch.float32 or not value.is_floating_point(), key
        assert torch.equal(loaded_state[key], value), key
    size = reference.visual.image_size
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(tokens), reference.encode_text(tokens), rtol=0, atol=1e-6)


# --- registry --------------------------------------------------------------------------------
def test_registry_is_complete_and_well_formed() -> None:
    assert set(SAM_MODELS) <= set(WEIGHTS)
    assert all(key in WEIGHTS for key in CLIP_WEIGHTS.values())
    assert len({wf.filename for wf in WEIGHTS.values()}) == len(WEIGHTS)
    for wf in WEIGHTS.values():
        assert len(wf.sha256) == 64 and int(wf.sha256, 16) >= 0, wf.name
        assert wf.url.endswith("/" + wf.filename), wf.name
    # OpenAI names each CLIP file by its sha256.
    assert WEIGHTS["ViT-B-16"].url.split("/")[-2] == WEIGHTS["ViT-B-16"].sha256


# --- test weights ----------------------------------------------------------------------------
def test_test_weights_are_prepared_once(test_weights: dict[str, Path]) -> None:
    verify_weight(test_weights["vit_t"], WEIGHTS["vit_t"])  # the official MobileSAM file
    manifest = json.loads(test_weights["manifest"].read_text())
    for name, entry in manifest["files"].items():
        assert file_sha256(test_weights["dir"] / name) == entry["sha256"], name
    files = [test_weights[key] for key in ("vit_t", OPENAI_CLIP, TINY_CLIP, f"{TINY_CLIP}-config", "manifest")]
    stamps = [path.stat().st_mtime_ns for path in files]
    assert prepare_test_weights(test_weights["dir"]) == test_weights
    assert [path.stat().st_mtime_ns for path in files] == stamps  # nothing rewritten


# --- SAM --------------------------------------------------------------------------------------
def test_mobile_sam_loads_and_segments_a_square(tiny_settings: Settings) -> None:
    from mobile_sam import SamPredictor

    sam, identity = load_sam(tiny_settings, download=False)
    assert identity == "vit_t:" + WEIGHTS["vit_t"].sha256[:12]
    assert not sam.training
    assert {p.dtype for p in sam.parameters()} == {torch.float32}

    image = np.full((96, 128, 3), 40, np.uint8)
    image[30:70, 40:90] = (230, 60, 50)
    truth = np.zeros(image.shape[:2], bool)
    truth[30:70, 40:90] = True
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    assert predictor.features.shape == (1, 256, 64, 64)  # the image encoder's embedding
    masks, scores, _ = predictor.predict(point_coords=np.array([[65, 50]]), point_labels=np.array([1]))
    best = masks[scores.argmax()]
    # Real weights: a click inside a plain square selects the square.
    assert (best & truth).sum() / (best | truth).sum() > 0.9


def test_sam_checkpoint_of_another_variant_is_refused(tiny_settings: Settings) -> None:
    with pytest.raises(WeightsError, match=f"{tiny_settings.sam_checkpoint} does not fit SAM vit_b"):
        load_sam(tiny_settings.replace(sam_model="vit_b"), download=False)


# --- CLIP -------------------------------------------------------------------------------------
def test_tiny_clip_loads_exactly_as_saved(tiny_settings: Settings) -> None:
    clip, tokenizer, identity = load_clip(tiny_settings, download=False)
    assert identity == f"{TINY_CLIP}:{file_sha256(tiny_settings.clip_checkpoint)[:12]}"
    assert not clip.training
    assert tokenizer(TEXTS).shape == (3, 77)
    assert_same_clip(clip, build_random_clip(TINY_CLIP), tokenizer)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_vitb_openai_archive_loads_exactly_as_saved(vitb_settings: Settings) -> None:
    path = Path(vitb_settings.clip_checkpoint)
    assert is_torchscript_archive(path)
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert state["visual.conv1.weight"].dtype == torch.float16  # as OpenAI stores them
    assert "input_resolution" in state and "attn_mask" not in state

    clip: Any
    clip, tokenizer, _ = load_clip(vitb_settings, download=False)
    assert len(clip.visual.transformer.resblocks) == 12
    assert_same_clip(clip, build_random_clip(OPENAI_CLIP, openai_format=True), tokenizer)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_vitb_openai_archive_is_what_open_clip_reads_as_openai(vitb_settings: Settings) -> None:
    """open_clip's own OpenAI loader infers the architecture from the file: it must agree."""
    import open_clip

    theirs = open_clip.load_openai_model(vitb_settings.clip_checkpoint, precision="fp32", device="cpu")
    assert_same_clip(theirs, build_random_clip(OPENAI_CLIP, openai_format=True),
                     open_clip.get_tokenizer(OPENAI_CLIP))


def _write_format(fmt: str, directory: Path) -> tuple[Path, bool]:
    """The tiny CLIP saved as ``fmt``; returns (path, whether weights went through fp16)."""
    state = build_random_clip(TINY_CLIP).state_dict()
    path = directory / f"tiny-{fmt}.pt"
    if fmt == "training-checkpoint":  # open_clip's training output: wrapped, DDP prefixes
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif fmt == "openai-state-dict":  # what torch.save(jit_model.state_dict()) of OpenAI's file gives
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
        torch.save(state, path)
    elif fmt == "openai-torchscript":
        save_openai_archive(build_random_clip(TINY_CLIP, openai_format=True), path)
    return path, fmt.startswith("openai")


@pytest.mark.parametrize("fmt", ["training-checkpoint", "safetensors", "openai-state-dict", "openai-torchscript"])
def test_clip_formats_load_exactly(fmt: str, tiny_settings: Settings, tmp_path: Path) -> None:
    path, rounded = _write_format(fmt, tmp_path)
    _, openai = read_clip_state_dict(path)
    assert openai == rounded
    clip, tokenizer, _ = load_clip(tiny_settings.replace(clip_checkpoint=str(path)), download=False)
    assert_same_clip(clip, build_random_clip(TINY_CLIP, openai_format=rounded), tokenizer)


def test_clip_config_next_to_checkpoint_is_registered(test_weights: dict[str, Path], tmp_path: Path) -> None:
    name = "ViT-T-16-elsewhere"
    checkpoint = shutil.copy(test_weights[TINY_CLIP], tmp_path / "weights.pt")
    settings = Settings(clip_model=name, clip_checkpoint=str(checkpoint), weights_dir=str(tmp_path / "none"),
                        device="cpu")
    with pytest.raises(ValueError, match=f"unknown open_clip model '{name}'.*{name}.json"):
        load_clip(settings, download=False)
    (tmp_path / f"{name}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    clip, tokenizer, _ = load_clip(settings, download=False)
    assert_same_clip(clip, build_random_clip(TINY_CLIP), tokenizer)


def test_openai_weights_in_a_gelu_model_warn(tiny_settings: Settings, tmp_path: Path) -> None:
    name = "ViT-T-16-gelu-test"
    (tmp_path / f"{name}.json").write_text(json.dumps({**TINY_CLIP_CONFIG, "quick_gelu": False}))
    path, _ = _write_format("openai-state-dict", tmp_path)
    with pytest.warns(UserWarning, match="QuickGELU"):
        load_clip(tiny_settings.replace(clip_model=name, clip_checkpoint=str(path)), download=False)


def test_load_models(tiny_settings: Settings) -> None:
    models = load_models(tiny_settings, download=False)
    assert models.device == torch.device("cpu") and models.dtype == torch.float32
    assert models.identity == {"sam": "vit_t:6dbb90523a35",
                               "clip": f"{TINY_CLIP}:{file_sha256(tiny_settings.clip_checkpoint)[:12]}"}


# --- missing and damaged files ------------------------------------------------------------------
def test_missing_weights_say_what_to_put_where(tmp_path: Path) -> None:
    settings = Settings(weights_dir=str(tmp_path), device="cpu")  # the paper's vit_h + ViT-B-16
    for load, wf, variable in ((load_sam, WEIGHTS["vit_h"], "HYBRIDGL_SAM_CHECKPOINT"),
                               (load_clip, WEIGHTS["ViT-B-16"], "HYBRIDGL_CLIP_CHECKPOINT")):
        with pytest.raises(WeightsNotFoundError) as caught:
            load(settings, download=False)
        message = str(caught.value)
        for needed in (wf.filename, wf.sha256, wf.url, str(tmp_path / wf.filename),
                       "HYBRIDGL_WEIGHTS_DIR", variable):
            assert needed in message
    with pytest.raises(WeightsNotFoundError, match="no official weights .* HYBRIDGL_CLIP_CHECKPOINT"):
        load_clip(settings.replace(clip_model=TINY_CLIP), download=False)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weight(tmp_path / "nowhere.pt", tmp_path, download=False)


def test_damaged_files_fail_verification(test_weights: dict[str, Path], tmp_path: Path) -> None:
    wf = WEIGHTS["vit_t"]
    flipped = flip_byte(test_weights["vit_t"], tmp_path / wf.filename)
    with pytest.raises(ChecksumError) as caught:
        resolve_weight("vit_t", tmp_path, download=False)
    message = str(caught.value)
    assert str(flipped) in message and wf.sha256 in message
    assert hashlib.sha256(flipped.read_bytes()).hexdigest() in message
    # Explicit paths with an official name are checked too.
    with pytest.raises(ChecksumError):
        load_sam(Settings(sam_model="vit_t", sam_checkpoint=str(flipped), device="cpu"), download=False)

    truncated = tmp_path / "short" / wf.filename
    truncated.parent.mkdir()
    truncated.write_bytes(test_weights["vit_t"].read_bytes()[:1000])
    with pytest.raises(ChecksumError, match="has 1,000 bytes, the official file 40,728,226"):
        verify_weight(truncated, wf)


def test_unreadable_checkpoint_names_the_file(test_weights: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "my-sam.pt"  # not an official name: nothing to check it against
    broken.write_bytes(test_weights["vit_t"].read_bytes()[:100_000])
    with pytest.raises(WeightsError, match=f"cannot read weights file {broken}"):
        load_sam(Settings(sam_model="vit_t", sam_checkpoint=str(broken), device="cpu"), download=False)


def test_digests_are_cached_by_path_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 100)
    first = file_sha256(path)
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stamp, stamp))
    assert file_sha256(path) == first  # same (path, size, mtime): not read again
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert file_sha256(path) == hashlib.sha256(b"b" * 100).hexdigest()


# --- downloading (from a local HTTP server: no internet here) ------------------------------------
@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_checks_and_renames_atomically(http_dir: tuple[Path, str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    served, base = http_dir
    blob = np.random.default_rng(0).bytes(3 * 2**20 + 17)  # several chunks
    (served / "blob.bin").write_bytes(blob)
    wf = WeightFile("blob", "blob.bin", f"{base}/blob.bin", hashlib.sha256(blob).hexdigest(), len(blob), "test blob")
    dest_dir = tmp_path / "weights"

    path = resolve_weight(wf, dest_dir, download=True)
    assert path == dest_dir / "blob.bin" and path.read_bytes() == blob
    assert "blob.bin" in capsys.readouterr().err  # the progress bar
    assert sorted(p.name for p in dest_dir.iterdir()) == ["blob.bin"]  # no temporary left
    assert resolve_weight(wf, dest_dir, download=False) == path

    wrong = WeightFile("blob", "other.bin", wf.url, "0" * 64, None, "test blob, wrong digest")
    with pytest.raises(ChecksumError, match="expected 0000"):
        download_weight(wrong, dest_dir / "other.bin", progress=False)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["blob.bin"]

    missing = WeightFile("gone", "gone.bin", f"{base}/gone.bin", "0" * 64, None, "not served")
    with pytest.raises(WeightsNotFoundError, match=r"the download failed: HTTP Error 404(.|\n)*gone\.bin"):
        resolve_weight(missing, dest_dir, download=True)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["blob.bin"]


# --- device and precision ---------------------------------------------------------------------
def test_pick_dtype_rules() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_dtype("fp32", cpu) == torch.float32
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    assert pick_dtype("fp16", cuda) == torch.float16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        pick_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="not one of"):
        pick_dtype("fp64", cpu)
    assert pick_dtype("auto", cuda) == torch.float16
    assert pick_dtype("auto", cpu, cpu_bf16=True) == torch.bfloat16
    assert pick_dtype("auto", cpu, cpu_bf16=False) == torch.float32
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


# --- the command --------------------------------------------------------------------------------
def run_command(argv: list[str], settings: Settings) -> int:
    """`hybridgl weights ARGS`, parsed by the real command line, run with explicit settings."""
    from worker.cli import build_parser

    return weights_command.run(build_parser().parse_args(["weights", *argv]), settings)


def test_command_lists_and_verifies(test_weights: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(sam_model="vit_t", weights_dir=str(test_weights["dir"]))
    assert run_command([], settings) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["vit_t"].split()[-2:] == ["yes", "present"]
    assert rows["vit_h"].endswith("missing")
    assert run_command(["verify", "vit_t"], settings) == 0
    assert run_command(["fetch", "vit_t"], settings) == 0  # present: nothing to download
    assert "sha256 checked" in capsys.readouterr().out

    flip_byte(test_weights["vit_t"], tmp_path / "mobile_sam.pt")
    damaged = settings.replace(weights_dir=str(tmp_path))
    assert run_command(["verify", "vit_t"], damaged) == 1
    assert "bad checksum" in capsys.readouterr().out
    assert run_command(["verify", "nonsense"], damaged) == 2


def test_command_prepares_test_weights(test_weights: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(["--test-weights", str(test_weights["dir"])], Settings()) == 0
    out = capsys.readouterr().out
    assert f"HYBRIDGL_CLIP_MODEL={TINY_CLIP}" in out and f"HYBRIDGL_CLIP_MODEL={OPENAI_CLIP}" in out
    assert f"HYBRIDGL_CLIP_CHECKPOINT={test_weights[TINY_CLIP]}" in out
