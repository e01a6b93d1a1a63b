"""``ptqbench bench``: evaluation throughput with fake-quantized linears relative to FP."""
from __future__ import annotations

import click
import yaml

from harness.bench.throughput import throughput_ratio


@click.command("bench")
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--bits", "spec", default="W4A4", show_default=True)
@click.option("--windows", default=4, show_default=True, help="Windows per timed pass.")
@click.option("--seqlen", default=512, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--method", default="rtn", show_default=True, help="A data-free method (rtn; quarot with weight_solver: rtn).")
@click.option("--options", default="{}", show_default=True, help="The method's options as a YAML mapping.")
def command(model: str, spec: str, windows: int, seqlen: int, repeats: int, device: str, method: str, options: str) -> None:
    """Print FP and fake-quantized perplexity throughput and their ratio (target >= 0.8).

    ``--method quarot --options '{weight_solver: rtn}'`` includes the cost of its online Hadamard transforms.
    """
    parsed = yaml.safe_load(options)
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{options!r}: use a YAML mapping, e.g. '{{weight_solver: rtn}}'", param_hint="--options")
    r = throughput_ratio(model, spec, method=method, windows=windows, seqlen=seqlen, repeats=repeats, device=device,
                         options=parsed)
    click.echo(f"model {model}, method {method}, {r.tokens} tokens per pass, median of {repeats}")
    click.echo(f"fp     {r.fp_tokens_per_s:8.1f} tok/s  (ppl {r.fp_ppl:.2f})")
    click.echo(f"{r.spec:<6} {r.quant_tokens_per_s:8.1f} tok/s  (ppl {r.quant_ppl:.2f})")
    click.echo(f"throughput ratio {r.spec}/fp = {r.ratio:.3f}  (target >= 0.8)")
