"""The `matvlm` command line."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hybrid Mamba-2/Transformer VLMs by distillation.")
console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")  # messages hold [lists] that are not markup
    raise typer.Exit(code=2)


def user_errors(command: Callable) -> Callable:
    """Turn the errors meant for the user (matvlm.errors.UserError) and a diverged loss into one sentence and exit
    status 2, for any command; other exceptions stay tracebacks (they are bugs)."""
    from matvlm.errors import UserError

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            fail(str(err))
        except FloatingPointError as err:  # a NaN or infinite loss: the message names the step
            fail(f"training stopped: {err}")

    return run


def say_notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--layers must be comma-separated integers, got {text!r}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:.1f} GiB"


def conversion_table(summary, context: int, dtype_bytes: int) -> Table:
    table = Table(title="Conversion", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("hybrid", justify="right")
    n = summary.num_layers
    table.add_row("attention / mixer layers", f"{n} / 0", f"{n - len(summary.mixer_layers)} / {len(summary.mixer_layers)}")
    table.add_row("mixer layers", "-", ", ".join(map(str, summary.mixer_layers)))
    table.add_row("parameters removed / added", "", f"-{summary.params_removed:,} / +{summary.params_added:,}")
    table.add_row(
        f"cache per token ({8 * dtype_bytes}-bit)",
        human_bytes(summary.kv_bytes_per_token_before),
        human_bytes(summary.kv_bytes_per_token_after),
    )
    table.add_row("fixed mixer state per sequence", "-", human_bytes(summary.mixer_state_bytes))
    before, after = summary.cache_bytes(context)
    table.add_row(f"cache per sequence of {context:,} tokens", human_bytes(before), human_bytes(after))
    return table


def convert_and_save(teacher_dir: Path, out_dir: Path, overwrite: bool, context: int, **convert_kwargs) -> Path:
    import matvlm
    from matvlm.io import atomic_directory, copy_side_files, load_vlm

    started = time.perf_counter()
    teacher = load_vlm(teacher_dir)
    student = matvlm.to_hybrid(teacher, **convert_kwargs)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        copy_side_files(teacher_dir, tmp)
        record = {"teacher": str(teacher_dir), **{k: v for k, v in convert_kwargs.items()}}
        (tmp / "matvlm_convert.json").write_text(json.dumps(record, indent=2) + "\n")
    summary = matvlm.summarize_conversion(teacher, student)
    console.print(conversion_table(summary, context, dtype_bytes=2))
    console.print(f"saved hybrid to [bold]{out_dir}[/] in {time.perf_counter() - started:.1f} s")
    return out_dir


@app.command()
@user_errors
def convert(
    teacher_dir: Path = typer.Argument(..., help="HF Llava-format teacher directory."),
    out_dir: Path = typer.Argument(..., help="Where to write the hybrid."),
    ratio: float = typer.Option(None, help="Fraction of decoder layers to replace, in (0, 1)."),
    placement: str = typer.Option("even", help="even | begin | middle | end | auto (with --ranking)"),
    ranking: Path = typer.Option(None, help="A `matvlm rank-layers` file of this teacher, for --placement auto."),
    layers: str = typer.Option(None, help="Explicit mixer layers, e.g. 0,4,8 (instead of --ratio)."),
    attn_bias: bool = typer.Option(False, help="Carry the attention biases into in_proj / out_proj."),
    conv_init: str = typer.Option("random", help="random | identity"),
    chunk_size: int = typer.Option(256, help="Scan chunk length."),
    seed: int = typer.Option(0, help="Seed for the mixer parameters not taken from attention."),
    context: int = typer.Option(2048, help="Sequence length for the per-sequence cache figures."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
) -> None:
    """Turn a Llava teacher into a hybrid: swap attention for Mamba-2 mixers, initialised from Q/K/V/O."""
    from matvlm.io import read_model_type
    from matvlm.io.outputs import check_output_dir
    from matvlm.options import check_at_least

    if ratio is None and layers is None:
        ratio = 0.25
    check_at_least(1, chunk_size=chunk_size, context=context)
    try:
        read_model_type(teacher_dir)  # an input that is not a model is said first
    except (ValueError, OSError) as err:
        fail(str(err))
    say_notes(check_output_dir(out_dir, {"teacher": teacher_dir}, overwrite=overwrite, option="OUT_DIR"))
    try:
        convert_and_save(
            teacher_dir, out_dir, overwrite, context,
            ratio=ratio, placement=placement, mamba_layers=parse_layers(layers) if layers else None,
            attn_bias=attn_bias, conv_init=conv_init, chunk_size=chunk_size, seed=seed,
            **({"ranking": str(ranking)} if ranking else {}),
        )
    except (ValueError, OSError, TypeError) as err:  # OSError: what transformers raises for unreadable weights
        fail(str(err))


data_app = typer.Typer(no_args_is_help=True, help="Data sets: the synthetic visual-QA world.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
@user_errors
def data_synth(
    out_dir: Path = typer.Argument(..., help="Where to write images/, train.json, test.json, world.json."),
    train: int = typer.Option(20000, help="Training records."),
    test: int = typer.Option(2000, help="Held-out records."),
    seed: int = typer.Option(0, help="World seed (the test split uses its own stream and held-out combinations)."),
    image_size: int = typer.Option(128, help="Image side in pixels."),
    workers: int = typer.Option(1, help="Processes (the output is identical for any number)."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
) -> None:
    """Generate the synthetic visual-QA world in LLaVA JSON format."""
    from matvlm.errors import OptionError
    from matvlm.io import atomic_directory
    from matvlm.io.outputs import check_output_dir
    from matvlm.options import check_at_least
    from matvlm.synthetic.world import generate_world

    check_at_least(0, train=train, test=test)
    check_at_least(1, workers=workers)
    if train + test == 0:
        raise OptionError("--train and --test are both 0: nothing to generate")
    say_notes(check_output_dir(out_dir, {}, overwrite=overwrite, option="OUT_DIR"))
    started = time.perf_counter()
    try:
        # Written aside and renamed into place: a stopped run leaves no half world at OUT_DIR.
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            info = generate_world(tmp, train, test, seed=seed, image_size=image_size, progress=True, workers=workers)
    except ValueError as err:
        fail(str(err))
    elapsed = time.perf_counter() - started
    table = Table(title=f"synthetic world v{info['generator_version']} (seed {seed})")
    table.add_column("family")
    table.add_column("metric")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for family, metric in info["families"].items():
        table.add_row(family, metric, str(info["counts"]["train"].get(family, 0)), str(info["counts"]["test"].get(family, 0)))
    console.print(table)
    console.print(f"wrote {train + test:,} records to {out_dir} in {elapsed:.1f} s")


@app.command()
@user_errors
def teacher(
    data: Path = typer.Option(..., help="World directory (train.json, test.json, images/)."),
    out: Path = typer.Option(..., help="Output model directory (HF Llava + processor)."),
    config: Path = typer.Option(None, help="JSON file with TeacherConfig fields; options given here override it."),
    family: str = typer.Option(None, help="phi | llama"),
    steps: int = typer.Option(None, help="Optimizer steps."),
    batch_size: int = typer.Option(None, help="Records per step."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    seed: int = typer.Option(None, help="Seed for init and data order."),
    num_workers: int = typer.Option(None, help="Data loader workers."),
    init_from: Path = typer.Option(None, help="Start from this teacher's weights and tokenizer (e.g. to train the shipped one further)."),
    generated_train: int = typer.Option(None, help="Train on this many of the world's training records, made on demand "
                                        "(identical to `data synth --train N`'s) instead of DATA/train.json."),
    generated_start: int = typer.Option(None, help="With --generated-train N: records START .. START + N - 1 "
                                        "(fresh records for a continuation)."),
    resume: bool = typer.Option(True, help="Continue from the last checkpoint in OUT.run/ if there is one."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists and is not this run's own output."),
) -> None:
    """Train a small LLaVA teacher from scratch (progress bar, periodic eval, atomic checkpoints, resume)."""
    from matvlm.eval.report import results_table
    from matvlm.io.outputs import check_output_dir
    from matvlm.synthetic.teacher import TeacherConfig, train_teacher

    fields = json.loads(config.read_text()) if config else {}
    overrides = dict(family=family, steps=steps, batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers,
                     init_from=str(init_from) if init_from else None, generated_train=generated_train,
                     generated_start=generated_start)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields.update(data=str(data), out=str(out))
    try:
        cfg = TeacherConfig(**fields)
    except (TypeError, ValueError) as err:
        fail(f"bad teacher config{f' {config}' if config else ''}: {err}")
    own = resume and (out.with_name(out.name + ".run") / "config.json").exists()  # a finished run, resumed
    inputs = {"world": data, "teacher to start from": cfg.init_from or None}
    for folder in (out, out.with_name(out.name + ".run")):
        say_notes(check_output_dir(folder, inputs, overwrite=overwrite or folder != out, own_output=own))
    results = train_teacher(cfg, resume=resume)
    if results is not None:  # None in the other processes of a multi-GPU run
        console.print(results_table(results, title=f"teacher held-out scores ({out})"))


@app.command("teacher-export")
@user_errors
def teacher_export(
    run_dir: Path = typer.Argument(..., help="A teacher run folder (OUT.run/: config.json, tokenizer/, checkpoints)."),
    out: Path = typer.Argument(..., help="Output model directory (HF Llava + processor + held-out scores)."),
    weights: Path = typer.Option(None, help="A safetensors file of the run's weights to use instead of its last checkpoint."),
    data: Path = typer.Option(None, help="World directory, if not the one the run recorded."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a teacher from a run that has not finished (its last checkpoint), evaluated on the held-out set."""
    from matvlm.eval.report import results_table
    from matvlm.io.outputs import check_output_dir
    from matvlm.synthetic.teacher import export_teacher

    say_notes(check_output_dir(out, {"run folder": run_dir, "weights file": weights, "world": data},
                               overwrite=overwrite, option="OUT"))
    try:
        results = export_teacher(run_dir, out, weights=weights, data=data)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(results_table(results, title=f"teacher held-out scores ({out})"))


@app.command("import-tinyllava")
@user_errors
def import_tinyllava_command(
    src_dir: Path = typer.Argument(..., help="TinyLLaVA_Factory checkpoint directory (config.json with model_type 'tinyllava')."),
    out_dir: Path = typer.Argument(..., help="Where to write the HF Llava-format checkpoint."),
    dtype: str = typer.Option("auto", help="auto (keep the checkpoint's) | float32 | bfloat16 | float16"),
    template: str = typer.Option(None, help="Chat template (default: from the checkpoint; phi -> phi, llama -> vicuna_v1)."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
) -> None:
    """Convert a TinyLLaVA checkpoint into an HF Llava-format one (Phi's lm_head bias kept: model type 'matvlm')."""
    from matvlm.io.outputs import check_output_dir
    from matvlm.io.tinyllava import import_tinyllava

    say_notes(check_output_dir(out_dir, {"TinyLLaVA checkpoint": src_dir}, overwrite=overwrite, option="OUT_DIR"))
    try:
        summary = import_tinyllava(src_dir, out_dir, dtype=dtype, template=template, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    console.print(summary.describe(), markup=False, highlight=False)


@app.command()
@user_errors
def distill(
    teacher: Path = typer.Option(None, help="Teacher directory (HF Llava format)."),
    out: Path = typer.Option(None, help="Output hybrid directory (the run itself lives in OUT.run/)."),
    data: Path = typer.Option(None, help="Training records (LLaVA JSON)."),
    images: list[Path] = typer.Option(None, help="Image folder(s); default: images/ next to the JSON."),
    config: Path = typer.Option(None, help="JSON file of DistillConfig fields; options given here override it."),
    student: Path = typer.Option(None, help="An already converted hybrid (else the teacher is converted here)."),
    ratio: float = typer.Option(None, help="Fraction of decoder layers that become mixers (default 0.25)."),
    placement: str = typer.Option(None, help="even | begin | middle | end | auto (with --ranking)"),
    ranking: Path = typer.Option(None, help="A `matvlm rank-layers` file of this teacher, for --placement auto."),
    recipe: str = typer.Option(None, help="staged (align mixers, then end to end; default) | single (the paper's)."),
    align_steps: int = typer.Option(None, help="Alignment steps of the staged recipe (default: a tenth of --steps)."),
    align_lr: float = typer.Option(None, help="Alignment learning rate of the staged recipe (default 1e-3)."),
    layers: str = typer.Option(None, help="Explicit mixer layers, e.g. 0,4,8 (instead of ratio/placement)."),
    alpha_layer: float = typer.Option(None, help="Weight of the layer-wise loss (default 1)."),
    beta_kl: float = typer.Option(None, help="Weight of the KL loss (default 1)."),
    gamma_ce: float = typer.Option(None, help="Weight of the CE loss on answer tokens (default 1; the paper: 0)."),
    temperature: float = typer.Option(None, help="KL temperature (default 1)."),
    kl_positions: str = typer.Option(None, help="Where the KL counts: all (default, as released) | text | answer."),
    layer_loss: str = typer.Option(None, help="mse (per-token mean, default) | frobenius (as released)."),
    normalize: str = typer.Option(None, help="token (per-token means, default) | sequence (per-sequence sums, as released)."),
    train_connector: bool = typer.Option(None, help="Train the connector along with the mixers (default: yes)."),
    steps: int = typer.Option(None, help="Optimizer steps (default: one epoch)."),
    batch_size: int = typer.Option(None, help="Global batch size (records per step, all processes)."),
    lr: float = typer.Option(None, help="Peak learning rate (default 2e-4)."),
    max_batch_tokens: int = typer.Option(None, help="Padded tokens per micro-batch per process."),
    gradient_checkpointing: bool = typer.Option(None, help="Recompute activations in backward (less memory)."),
    compile_layers: bool = typer.Option(None, help="torch.compile each decoder layer and the vision tower (GPU)."),
    eval_data: Path = typer.Option(None, help="Held-out LLaVA JSON for periodic and final evaluation."),
    num_workers: int = typer.Option(None, help="Data loader workers."),
    seed: int = typer.Option(None, help="Seed (conversion and data order)."),
    logit_impl: str = typer.Option(None, help="KL/CE kernels: chunked (torch, default) | liger (fused; CUDA + liger-kernel)."),
    sharding: str = typer.Option(None, help="auto (FSDP2 under `accelerate launch --use_fsdp --fsdp_version 2`, else DDP) | ddp | fsdp2."),
    resume: bool = typer.Option(False, help="Continue the run in OUT.run/ from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists and is not this run's own output."),
    skip_bad: bool = typer.Option(None, help="Leave out bad records (listed) instead of stopping before training."),
) -> None:
    """Distil a hybrid from its teacher: by default staged (align each mixer to its attention, then end to end
    with KL + layer-wise + CE), or in one stage (--recipe single); one GPU or many via
    `accelerate launch -m matvlm.cli distill ...`."""
    from matvlm.distill import DistillConfig
    from matvlm.distill import distill as run_distill
    from matvlm.io.outputs import check_distill_outputs
    from matvlm.options import check_distill_options
    from matvlm.training import end_process_group

    overrides = dict(
        teacher=teacher and str(teacher), out=out and str(out), data=data and str(data),
        images=[str(p) for p in images] if images else None, student=student and str(student), ratio=ratio,
        placement=placement, mamba_layers=parse_layers(layers) if layers else None, alpha_layer=alpha_layer,
        beta_kl=beta_kl, gamma_ce=gamma_ce, temperature=temperature, kl_positions=kl_positions,
        layer_loss=layer_loss, normalize=normalize, train_connector=train_connector, steps=steps, batch_size=batch_size, lr=lr,
        max_batch_tokens=max_batch_tokens, gradient_checkpointing=gradient_checkpointing, compile_layers=compile_layers,
        eval_data=eval_data and str(eval_data), num_workers=num_workers, seed=seed, logit_impl=logit_impl,
        sharding=sharding, skip_bad=skip_bad, ranking=ranking and str(ranking), recipe=recipe, align_steps=align_steps,
        align_lr=align_lr,
    )
    try:
        cfg = DistillConfig.from_file(config, **overrides)
        check_distill_options(cfg, source=str(config or ""))
        if cfg.data and not cfg.images:
            cfg.images = [str(Path(cfg.data).parent / "images")]
        say_notes(check_distill_outputs(cfg, overwrite=overwrite, resume=resume))
        if cfg.eval_data:  # held-out records are scored after training: refuse unscorable ones now
            from matvlm.data.llava import load_records

            held_out = Path(cfg.eval_data)
            usable_records(load_records(held_out)[: cfg.eval_records], held_out, None, skip_bad=False)
        summary = run_distill(cfg, resume=resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        fail(str(err))
    end_process_group()
    console.print(f"distilled {summary['steps']} steps in {summary['train_seconds']:.0f} s; hybrid in {cfg.out}")
    if "heldout" in summary:
        from matvlm.eval.report import results_table

        console.print(results_table(summary["heldout"], title="hybrid held-out scores"))


@app.command("lmms-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                             "help_option_names": []})
def lmms_eval_command(ctx: typer.Context) -> None:
    """Run lmms-eval with the matvlm model registered (needs: pip install "matvlm\\[lmms]"); see docs/benchmarks.md."""
    try:
        from matvlm.eval.lmms import main as lmms_main
    except ImportError as err:
        fail(str(err))
    sys.argv = ["matvlm lmms-eval", *ctx.args]
    lmms_main()


@app.command("eval")
@user_errors
def eval_command(
    model_dir: Path = typer.Argument(..., help="Teacher or hybrid directory."),
    data: Path = typer.Option(..., help="Test records (LLaVA JSON)."),
    images: list[Path] = typer.Option(None, help="Image folder(s); default: images/ next to the JSON."),
    batch_size: int = typer.Option(32, help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(32, help="Longest answer."),
    limit: int = typer.Option(0, help="Only the first N records (0: all)."),
    per_family: int = typer.Option(0, help="Only the first N records of each family (0: all), e.g. to score a "
                                   "sample of training records against the held-out ones."),
    out: Path = typer.Option(None, help="Results JSON (default: ./eval-<model>-<data>.json). The answers are written "
                             "as they are made to OUT's .predictions.jsonl (see `matvlm rescore`)."),
    template: str = typer.Option(None, help="Chat template (default: the model's, else guessed from its tokenizer)."),
    skip_bad: bool = typer.Option(False, help="Count and report bad records instead of stopping before generating."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
) -> None:
    """Evaluate a model on held-out records: per-family scores, a table and a JSON file."""
    from transformers import AutoTokenizer

    from matvlm.data.llava import BadRecordError, DataError, load_records
    from matvlm.data.tokenizer import check_tokenizer
    from matvlm.eval.predictions import PredictionLog, predictions_path
    from matvlm.eval.runner import generate_answers
    from matvlm.io import load_image_processor, load_vlm, model_template, read_model_type
    from matvlm.io.outputs import check_output_file
    from matvlm.options import check_at_least, check_max_new_tokens, resolve_device

    check_at_least(1, batch_size=batch_size, max_new_tokens=max_new_tokens)
    check_at_least(0, limit=limit, per_family=per_family)
    device = resolve_device(device)
    folders = images or [data.parent / "images"]
    # Under the working directory by default: never into the model folder (for the shipped teacher, the package).
    out = out or Path(f"eval-{model_dir.resolve().name}-{data.stem}.json")
    inputs = {"model": model_dir, "records file": data, "image folder": folders}
    check_output_file(out, inputs)
    check_output_file(predictions_path(out), inputs, option="predictions file")
    try:
        loaded = load_records(data, skip_bad=skip_bad)
        records, problems = loaded if skip_bad else (loaded, [])
        records = select_records(records, data, per_family, limit)
        records, unusable = usable_records(records, data, folders, skip_bad)
        read_model_type(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        check_tokenizer(tokenizer)  # before the model loads: a tokenizer without <image> cannot evaluate it
        model = load_vlm(model_dir, device=device)
        check_max_new_tokens(max_new_tokens, model.config)
        image_processor = load_image_processor(model_dir)
    except (ValueError, OSError) as err:
        fail(str(err))
    template = model_template(model_dir, tokenizer, template)
    # Absolute paths: `matvlm rescore` may run from another folder.
    meta = dict(model=str(model_dir.resolve()), data=str(data.resolve()), images=[str(f.resolve()) for f in folders],
                device=device,
                template=template, max_new_tokens=max_new_tokens)
    log = PredictionLog(predictions_path(out))
    try:
        run = generate_answers(model, tokenizer, image_processor, records, folders, template, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, skip_bad=skip_bad, source=data, on_batch=log.add)
    except (BadRecordError, DataError) as err:
        log.close()
        fail(f"{err} (answers so far: {log.partial})")
    meta.update(generated_tokens=run.new_tokens, generation_seconds=run.seconds,
                bad_records=[str(p) for p in problems] + unusable + run.problems)
    log.finish(meta)
    write_scores(records, run.predictions, meta, out, log.path, title=f"{model_dir.name} on {data.name}")


def select_records(records: list[dict], data: Path, per_family: int, limit: int) -> list[dict]:
    """The first `per_family` of each family, then the first `limit` (0: all); none left is an error."""
    from matvlm.errors import InputError
    from matvlm.eval.runner import first_per_family

    if per_family:
        records = first_per_family(records, per_family)
    if limit:
        records = records[:limit]
    if not records:
        raise InputError(f"no records to evaluate in {data}")
    return records


def usable_records(records: list[dict], data: Path, folders: list[Path] | None,
                   skip_bad: bool) -> tuple[list[dict], list[str]]:
    """Refuse (or, with skip_bad, leave out and list) records that could not be scored or whose image cannot be
    read (`folders`; None: images not checked), all found before generating."""
    from matvlm.data.checks import SHOWN, image_problems
    from matvlm.errors import InputError
    from matvlm.eval.checks import scoring_problems

    problems = scoring_problems(records, data)
    if folders is not None:
        for index, problem in enumerate(image_problems(records, folders)):
            if problem is not None:
                problems.setdefault(index, str(problem))
    listed = [problems[i] for i in sorted(problems)]
    if listed and not skip_bad:
        rest = ", ".join(repr(records[i].get("id")) for i in sorted(problems)[SHOWN:])
        more = f"\n  and {len(listed) - SHOWN} more: {rest}" if rest else ""
        raise InputError(f"{len(listed)} record(s) of {data} cannot be evaluated:\n  " + "\n  ".join(listed[:SHOWN])
                         + more + "\nfix them, or pass --skip-bad to leave them out")
    kept = [r for i, r in enumerate(records) if i not in problems]
    if not kept:
        raise InputError(f"no record of {data} can be evaluated")
    return kept, listed


def write_scores(records: list[dict], predictions: dict[str, str], meta: dict, out: Path, predictions_file: Path,
                 title: str) -> None:
    """Score, write the results JSON and print the table; a failure names the kept predictions file."""
    from matvlm.eval.metrics import score_records
    from matvlm.eval.report import results_table
    from matvlm.io import write_json_atomic

    try:
        results = score_records([r for r in records if str(r["id"]) in predictions], predictions)
        seconds = meta.get("generation_seconds") or 0.0
        results.update(tokens_per_second=meta.get("generated_tokens", 0) / seconds if seconds else 0.0,
                       generated_tokens=meta.get("generated_tokens", 0), generation_seconds=seconds,
                       bad_records=meta.get("bad_records", []), model=meta.get("model"), data=meta.get("data"),
                       device=meta.get("device"), template=meta.get("template"), predictions=str(predictions_file))
        write_json_atomic(out, results)
    except (ValueError, OSError) as err:
        fail(f"{err}; the answers are kept in {predictions_file}: score them again with "
             f"`matvlm rescore {predictions_file} --out FILE`")
    console.print(results_table(results, title=title))
    if results.get("recall_by_distance"):
        console.print("recall by distance (words between fact and question): " + ", ".join(
            f"{name}: {b['score']:.1%} (n={b['n']})" for name, b in results["recall_by_distance"].items()))
    console.print(f"{results['tokens_per_second']:.0f} generated tokens/s on {results['device']}; "
                  f"{len(results['bad_records'])} bad records skipped; results in {out}")


@app.command()
@user_errors
def rescore(
    predictions: Path = typer.Argument(..., help="A .predictions.jsonl file written by `matvlm eval`."),
    data: Path = typer.Option(None, help="The records the answers are for (default: those the file names)."),
    out: Path = typer.Option(None, help="Results JSON (default: PREDICTIONS without .predictions.jsonl, .json)."),
) -> None:
    """Score answers that `matvlm eval` generated, without the model (after a scoring or writing error)."""
    from matvlm.data.llava import load_records
    from matvlm.errors import InputError
    from matvlm.eval.predictions import read_predictions
    from matvlm.io.outputs import check_output_file

    meta, answers = read_predictions(predictions)
    data = data or (Path(meta["data"]) if meta.get("data") else None)
    if data is None:
        raise InputError(f"{predictions} does not name its records file; pass --data")
    out = out or predictions.with_name(predictions.name.removesuffix(".predictions.jsonl") + ".json")
    check_output_file(out, {"records file": data, "predictions file": predictions})
    try:
        records = load_records(data)
    except ValueError as err:
        fail(str(err))
    if not any(str(r["id"]) in answers for r in records):
        raise InputError(f"none of the {len(answers)} answers in {predictions} belongs to a record of {data}")
    records, _ = usable_records([r for r in records if str(r["id"]) in answers], data, None, skip_bad=False)
    write_scores(records, answers, meta, out, predictions, title=f"{Path(meta.get('model', '?')).name} on {data.name}")


@app.command()
@user_errors
def generate(
    model_dir: Path = typer.Argument(..., help="Teacher or hybrid directory."),
    image: Path = typer.Option(None, help="Image file (omit for a text-only prompt)."),
    prompt: str = typer.Option(..., help="The user's question."),
    max_new_tokens: int = typer.Option(128, help="Longest answer."),
    temperature: float = typer.Option(0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, help="Keep only the k most likely tokens (0: all)."),
    seed: int = typer.Option(None, help="Seed for sampling."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)."),
    template: str = typer.Option(None, help="Chat template (default: the model's, else guessed from its tokenizer)."),
    stream: bool = typer.Option(True, help="Print the answer as it is generated."),
) -> None:
    """Answer one prompt about one image with the fast engine (static cache; CUDA graphs on a GPU)."""
    from matvlm.engine import generate_command

    try:
        result = generate_command(model_dir, image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, seed=seed, device=device, dtype=dtype, template=template,
                                  stream=stream)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    if stream:
        console.print()
    else:
        console.print(result["text"])
    console.print(f"[dim]{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens; prefill "
                  f"{result['prefill_seconds'] * 1e3:.0f} ms; decode {result['decode_tokens_per_s']:.1f} tokens/s on "
                  f"{result['device']} ({result['dtype']}, CUDA graphs {'on' if result['cuda_graph'] else 'off'})[/]")


@app.command()
@user_errors
def bench(
    shape: str = typer.Option("tinyllava-3b", help="tinyllava-3b (random weights, TinyLLaVA-Phi-2-SigLIP-3.1B shape) | tiny."),
    out: Path = typer.Option(Path("runs/bench"), help="Folder for bench_<device>.json, .md and plots (merged into)."),
    parts: str = typer.Option("decode,memory,batch,ttft", help="Comma-separated parts."),
    max_length: int = typer.Option(16384, help="Longest generated length in the decode part."),
    max_memory_length: int = typer.Option(32768, help="Longest length in the memory part."),
    hf_max_length: int = typer.Option(1024, help="HF generate only up to this length (slow)."),
    ratios: str = typer.Option("0.125,0.25,0.5", help="Hybrid ratios."),
    teacher: bool = typer.Option(True, help="Also measure the teacher."),
    engines: str = typer.Option("matvlm,hf", help="Engines for decode and time to first token."),
    contexts: str = typer.Option("2048,16384", help="Contexts of the headline decode speeds."),
    batch_context: int = typer.Option(4096, help="Context of the batch sweep."),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda if available)."),
    dtype: str = typer.Option(None, help="bfloat16 | float16 | float32 (default: bfloat16 on cuda, float32 on cpu)."),
    fresh: bool = typer.Option(False, help="Start a new result file instead of merging."),
) -> None:
    """Speed and memory, teacher vs hybrids in the same engine: tokens/s, memory, batch, TTFT, plots."""
    from matvlm.bench import bench_command
    from matvlm.io.outputs import check_output_dir
    from matvlm.options import check_at_least, resolve_device

    check_at_least(1, max_length=max_length, max_memory_length=max_memory_length, batch_context=batch_context)
    check_at_least(0, hf_max_length=hf_max_length)
    device = resolve_device(device)
    check_output_dir(out, {}, overwrite=True)  # merged into by design; never the package
    try:
        results = bench_command(shape, out, parts, max_length, max_memory_length, hf_max_length, ratios, teacher,
                                engines, contexts, batch_context, device, dtype, fresh)
    except ValueError as err:
        fail(str(err))
    console.print(results["headline"])


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output directory (report, models, world)."),
    teacher: Path = typer.Option(None, help="Teacher directory (default: the shipped teacher)."),
    ratio: float = typer.Option(0.25, help="Fraction of decoder layers to replace."),
    minutes: float = typer.Option(4.0, help="Distillation budget in minutes (steps calibrated on this machine)."),
    overwrite: bool = typer.Option(False, help="Start afresh in OUT even if it holds another demo or other files."),
) -> None:
    """The method end to end, offline: convert, distil, evaluate teacher vs hybrid, speed and memory, report."""
    from matvlm.options import check_range
    from matvlm.synthetic.demo import DemoConfig, run_demo

    check_range("ratio", ratio, 0, 1, low_open=True, high_open=True)
    check_range("minutes", minutes, 0, float("inf"), low_open=True, high_open=True)
    try:
        run_demo(DemoConfig(out=str(out), teacher=str(teacher) if teacher else "", ratio=ratio, minutes=minutes,
                            overwrite=overwrite))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))


@app.command()
@user_errors
def serve(
    model_dir: Path = typer.Argument(..., help="Teacher or hybrid directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch: int = typer.Option(8, help="Requests decoded at once (cache rows)."),
    max_seq_len: int = typer.Option(2048, help="Cache slots per request: prompt + answer."),
    max_queue: int = typer.Option(64, help="Requests that may wait for a row; more get 429."),
    timeout: float = typer.Option(600.0, help="Per-request limit in seconds."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)."),
    name: str = typer.Option(None, help="Model name in the API (default: the directory's name)."),
) -> None:
    """OpenAI-compatible server with continuous batching and a chat page at / (see docs/serving.md)."""
    from matvlm.options import check_at_least, resolve_device
    from matvlm.serve import serve_command

    check_at_least(1, max_batch=max_batch, port=port)
    check_at_least(2, max_seq_len=max_seq_len)
    check_at_least(0, max_queue=max_queue)
    if timeout <= 0:
        fail(f"--timeout must be > 0, got {timeout}")
    device = resolve_device(device)
    try:
        serve_command(model_dir, host=host, port=port, max_batch=max_batch, max_seq_len=max_seq_len,
                      max_queue=max_queue, request_timeout_s=timeout, device=device, dtype=dtype, name=name)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))


@app.command("rank-layers")
@user_errors
def rank_layers_command(
    teacher_dir: Path = typer.Argument(..., help="Teacher directory (HF Llava format)."),
    data: Path = typer.Option(..., help="Records to rank on (LLaVA JSON), e.g. the distillation's training file."),
    images: list[Path] = typer.Option(None, help="Image folder(s); default: images/ next to the JSON."),
    out: Path = typer.Option(Path("ranking.json"), help="Where to write the ranking."),
    measures: str = typer.Option("kl,attention", help="Comma-separated: kl (align one layer, KL) | attention (far attention)."),
    heldout_records: int = typer.Option(256, help="Records the scores are measured on."),
    train_records: int = typer.Option(1024, help="Records the per-layer alignment cycles over (kl)."),
    batch_size: int = typer.Option(32, help="Records per batch."),
    align_steps: int = typer.Option(30, help="Alignment steps per layer (kl)."),
    align_lr: float = typer.Option(3e-3, help="Alignment learning rate (kl)."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
) -> None:
    """Rank decoder layers by how much replacing each alone costs on your data, for --placement auto."""
    from matvlm.distill.placement import rank_layers_from_files

    try:
        ranking = rank_layers_from_files(
            teacher_dir, data, images or [], out, [m.strip() for m in measures.split(",") if m.strip()],
            heldout_records, train_records, batch_size, align_steps, align_lr, device=device,
        )
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    for name, m in ranking["measures"].items():
        console.print(f"{name}: safest first {m['order']} ({ranking['cost'][name]['seconds']:.0f} s, "
                      f"{ranking['cost'][name]['tokens']:,} tokens)")
    console.print(f"ranking in {out}; use it with --placement auto --ranking {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
