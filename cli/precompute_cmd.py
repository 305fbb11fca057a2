"""``ddx precompute-teacher``: parse options, run :func:`precompute.precompute`, print the summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from cli.options import config_option, echo_json, library_errors

if TYPE_CHECKING:  # the pipeline imports numpy and the store; load it only when the command runs
    from precompute.pipeline import PrecomputeSummary

DTYPES = click.Choice(["float32", "bfloat16", "float16"])


@click.command("precompute-teacher")
@config_option
@click.option("--teacher", "model", required=True, help="Teacher: hub id or local sentence-transformers folder.")
@click.option("--store", required=True, help="Store path or fsspec URL (created on first use).")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="Source, repeatable: beir:PATH, msmarco:PATH, hotpotqa:PATH, nq:PATH, hf:NAME[:CONFIG][:SPLIT], "
    "jsonl:/parquet:/csv:/tsv:PATH[?column=name...].",
)
@click.option(
    "--preset",
    type=click.Choice(["gte-qwen2", "e5", "bge", "none"]),
    help="Named prompts/pooling for a known teacher (gte-Qwen2 models get 'gte-qwen2' automatically).",
)
@click.option("--query-prompt", help="Prompt prepended to queries (default: the model's 'query' prompt).")
@click.option("--passage-prompt", help="Prompt prepended to passages (default: the model's 'document' prompt).")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "cls", "lasttoken", "max", "weightedmean"]),
    help="Override the model's pooling.",
)
@click.option("--normalize/--no-normalize", default=None, help="Force L2 normalization on or off.")
@click.option("--max-seq-length", type=int, help="Tokens kept per text (prompt included).")
@click.option("--padding-side", type=click.Choice(["left", "right"]), help="Override the tokenizer's padding side.")
@click.option("--dtype", type=DTYPES, help="Compute dtype (default bfloat16 on GPU, float32 on CPU).")
@click.option("--device", help="Torch device (default cuda:LOCAL_RANK when available, else cpu).")
@click.option("--revision", help="Hub revision of the teacher.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=None, help="Allow the model's own code.")
@click.option(
    "--storage-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Dtype of stored vectors (new stores only).",
)
@click.option(
    "--roles",
    type=click.Choice(["both", "query", "passage"]),
    default="both",
    show_default=True,
    help="Which texts to encode.",
)
@click.option("--token-budget", type=int, help="Padded tokens per batch (default 65,536 on GPU, 8,192 on CPU).")
@click.option("--max-batch-size", type=int, default=512, show_default=True, help="Texts per batch at most.")
@click.option("--window", type=int, default=65_536, show_default=True, help="Texts sorted together by length.")
@click.option("--flush-rows", type=int, help="Rows per stored chunk (default: 32 MiB chunks).")
@click.option(
    "--flush-seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Flush at least this often; a crash loses at most this much work.",
)
@click.option("--limit", type=int, help="Encode at most this many texts (dry run).")
@click.option("--rank", type=int, help="This process's slice (default from torchrun/SLURM env).")
@click.option("--world-size", type=int, help="Number of slices (default from torchrun/SLURM env).")
@click.option("--skip-bad", is_flag=True, help="Skip and count malformed records instead of stopping.")
@click.option(
    "--title-join",
    default="{title} {text}",
    show_default=True,
    help="How passage titles join their text (part of the key).",
)
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@library_errors
def precompute_teacher(
    model: str, store: str, data: tuple[str, ...], as_json: bool, roles: str, **options: Any
) -> None:
    """Run the teacher once over every text of --data that the store lacks.

    Texts already stored (from any earlier run or data set) are skipped, so rerunning with one more
    data set encodes only the new texts, and rerunning after a crash resumes. With torchrun, every
    rank encodes its own deterministic slice into its own segment.

    \b
    Example:
        ddx precompute-teacher --teacher Alibaba-NLP/gte-Qwen2-7B-instruct --store stores/gte7b \\
            --data beir:data/scifact --data msmarco:data/msmarco --max-seq-length 512
        torchrun --nproc-per-node 8 -m cli.main precompute-teacher --teacher ... --store ... --data ...
    """
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    teacher_keys = (
        "preset",
        "query_prompt",
        "passage_prompt",
        "pooling",
        "normalize",
        "max_seq_length",
        "padding_side",
        "dtype",
        "device",
        "revision",
        "trust_remote_code",
    )
    teacher = TeacherConfig(model=model, **{k: options.pop(k) for k in teacher_keys})
    role_set = ("query", "passage") if roles == "both" else (roles,)
    config = PrecomputeConfig(store=store, data=tuple(data), teacher=teacher, roles=role_set, **options)
    summary = precompute(config)
    if summary.rank != 0:
        return
    if as_json:
        echo_json(summary.to_dict())
        return
    _print_summary(summary)


def _print_summary(summary: PrecomputeSummary) -> None:
    d = summary.to_dict()
    click.echo(f"store {d['store']}  (teacher fingerprint {d['fingerprint']})")
    for s in d["sources"]:
        click.echo(
            f"  {s['spec']}: {s['passages']:,} passages, {s['queries']:,} queries"
            + (f", {s['skipped_bad']} bad records skipped" if s["skipped_bad"] else "")
        )
    click.echo(
        f"read {d['texts_read']:,} texts, {d['unique_texts']:,} distinct; {d['already_stored']:,} already "
        f"stored; encoded {d['encoded']:,} in {d['seconds']:.1f}s ({d['texts_per_s']:,.1f} texts/s, "
        f"{d['tokens_per_s']:,.0f} tokens/s, padding {100 * d['padding_waste']:.1f}%)"
    )
    if d["encoded"] == 0:
        click.echo("nothing to encode: every text is already in the store (the teacher did not run)")
    for s in d["salvaged"]:
        click.echo(f"resumed: kept {s['rows']:,} rows of interrupted segment {s['segment']}")
