"""``ptqbench bench``: perplexity-evaluation throughput of the models a sweep evaluates, relative to FP."""
from __future__ import annotations

import click
import torch
import yaml

from harness.bench.throughput import CLOCKS, DEFAULT_BITS, DEFAULT_METHODS, TARGET, bench_throughput


def method_entries(text: str) -> list:
    """``--methods``: comma-separated names, or a YAML list of sweep ``methods:`` entries."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, str):
        parsed = [name.strip() for name in parsed.split(",") if name.strip()]
    if not isinstance(parsed, list) or not parsed:
        raise click.BadParameter(f"{text!r}: use method names (rtn,quarot) or a YAML list of sweep entries, "
                                 "e.g. '[rtn, {name: quarot, weight_solver: rtn}]'", param_hint="--methods")
    return parsed


@click.command("bench")
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--methods", "methods_text", default=",".join(DEFAULT_METHODS), show_default=True,
              help="Comma-separated method names, or a YAML list of sweep methods: entries (options, own bits, quant).")
@click.option("--bits", "bits_text", default=",".join(DEFAULT_BITS), show_default=True, help="Comma-separated bit specs.")
@click.option("--windows", default=4, show_default=True, type=click.IntRange(min=1), help="Perplexity windows per timed pass.")
@click.option("--seqlen", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed passes of each model per row.")
@click.option("--dataset", default="brown", show_default=True, help="Perplexity and calibration text.")
@click.option("--calibration-samples", default=4, show_default=True, type=click.IntRange(min=1),
              help="Calibration windows for methods that need data (quantized once per row).")
@click.option("--calibration-seqlen", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--clock", type=click.Choice(list(CLOCKS)), default="wall", show_default=True,
              help="wall: elapsed time; cpu: the process's CPU time (leaves out waiting for a core on a shared machine).")
def command(model: str, methods_text: str, bits_text: str, windows: int, seqlen: int, repeats: int, dataset: str,
            calibration_samples: int, calibration_seqlen: int, threads: int | None, device: str, clock: str) -> None:
    """Time perplexity evaluation of each method at each bit spec (quantized as a sweep quantizes it) against FP.

    One row per method and bit spec: FP and quantized tokens per second (median of --repeats passes,
    alternating), their ratio and both perplexities.
    """
    bits = [b.strip() for b in bits_text.split(",") if b.strip()]
    rows = bench_throughput(model, method_entries(methods_text), bits, windows=windows, seqlen=seqlen, repeats=repeats,
                            dataset=dataset, calibration_samples=calibration_samples,
                            calibration_seqlen=calibration_seqlen, device=device, threads=threads, clock=clock)
    click.echo(f"model {model}, {rows[0].tokens if rows else 0} tokens per pass ({windows} x {seqlen} {dataset}), "
               f"median of {repeats}, {torch.get_num_threads() if threads is None else threads} torch threads, device {device}, "
               f"{clock} clock")
    click.echo(f"{'method':<14} {'bits':<10} {'fp tok/s':>9} {'quant tok/s':>11} {'ratio':>6}  {'fp ppl':>9} {'quant ppl':>10}")
    for r in rows:
        click.echo(f"{r.method:<14} {r.spec:<10} {r.fp_tokens_per_s:>9.1f} {r.quant_tokens_per_s:>11.1f} {r.ratio:>6.3f}  "
                   f"{r.fp_ppl:>9.4f} {r.quant_ppl:>10.4f}")
    click.echo(f"ratio = quantized / FP tokens per second (target >= {TARGET})")
