"""Text in, text out: prompts and image files through the chat template, the engine, and back.

Prompts are built by the same code as evaluation prompts (`matvlm.data.llava.generation_inputs`), so
the tokens match training exactly (segment-wise tokenization, expanded image block), and images go
through the same loader (odd modes converted to RGB, float images and huge files refused with a
clear error) and the model's own image processor (which resizes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


from matvlm.data.llava import collate, generation_inputs
from matvlm.data.templates import IMAGE_TOKEN
from matvlm.devices import parse_dtype
from matvlm.engine.engine import Engine, GenerationOutput
from matvlm.engine.sampling import SamplingParams



@dataclass
class TextGeneration:
    texts: list[str]
    output: GenerationOutput


def prompt_inputs(
    tokenizer, image_processor, prompt: str, image: str | Path | None, template: str, num_image_tokens: int,
    index: int = 0,
) -> dict:
    """Model inputs for one user turn (with one image file, or none), as a one-turn LLaVA record."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt {index} is empty or not a string: {prompt!r}")
    if image is not None and not isinstance(image, (str, Path)):
        raise TypeError(f"image {index} must be a file path, got {type(image).__name__}")
    question = prompt if image is None or IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"
    record = {"id": f"prompt {index}", "conversations": [{"from": "human", "value": question}]}
    folders = []
    if image is not None:
        path = Path(image).expanduser().resolve()
        record["image"] = path.name
        folders = [path.parent]
    return generation_inputs(record, tokenizer, template, num_image_tokens, folders, image_processor)


def stop_ids_for(engine: Engine, tokenizer) -> list[int]:
    """The model's EOS ids plus the tokenizer's end token (a chat template's turn end)."""
    ids = list(engine.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_text(
    engine: Engine,
    processor,
    images: Sequence[str | Path | None] | str | Path | None,
    prompts: Sequence[str] | str,
    template: str | None = None,
    **generate_kwargs,
) -> TextGeneration:
    """Answers for prompts (one image file each, or None) in one left-padded batch.

    processor: anything with `.tokenizer` and `.image_processor` (a LlavaProcessor). template: a chat
    template name (default: guessed from the tokenizer). Other options go to `Engine.generate`.
    """
    from matvlm.io import guess_template

    if generate_kwargs.get("stream"):
        raise ValueError("generate_text does not stream; call Engine.generate(..., stream=True)")
    if isinstance(prompts, str):
        prompts, images = [prompts], [images]
    elif images is None:
        images = [None] * len(prompts)
    if isinstance(images, (str, Path)) or len(images) != len(prompts):
        raise ValueError(f"give one image (or None) per prompt: {len(prompts)} prompts")
    tokenizer = processor.tokenizer
    template = template or guess_template(tokenizer)
    num_image_tokens = engine.model.config.image_seq_length
    items = [
        prompt_inputs(tokenizer, processor.image_processor, p, im, template, num_image_tokens, index=i)
        for i, (p, im) in enumerate(zip(prompts, images))
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else engine.pad_token_id
    batch = collate(items, pad_token_id=pad, padding_side="left")
    stops = list(generate_kwargs.pop("stop_token_ids", ())) + stop_ids_for(engine, tokenizer)
    out = engine.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], stop_token_ids=stops, **generate_kwargs
    )
    texts = [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out.sequences()]
    return TextGeneration(texts, out)


def generate_command(
    model_dir: str | Path,
    image: str | Path | None,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str | None = None,
    dtype: str | None = None,
    stream: bool = False,
    template: str | None = None,
    seed: int | None = None,
    top_k: int = 0,
    use_cuda_graph: bool | str = "auto",
    write: Callable[[str], None] | None = None,
) -> dict:
    """`matvlm generate`: load a teacher or hybrid directory, answer one prompt about one image.

    With `stream`, text pieces go to `write` (default: stdout) as tokens arrive. Returns the answer,
    the token counts and the timing. Raises ValueError / FileNotFoundError / OSError with a message
    that names the problem (bad model directory, image, dtype, sampling option, length).
    """
    from transformers import AutoTokenizer

    from matvlm.errors import OptionError
    from matvlm.io import load_image_processor, load_vlm, model_template
    from matvlm.options import check_max_new_tokens, resolve_device

    # Cheap checks first: a typo should not cost a model load.
    SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k)
    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if image is not None and not Path(image).is_file():
        raise FileNotFoundError(f"image file {image} not found")
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    model = load_vlm(model_dir, dtype=torch_dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = load_image_processor(model_dir)
    template = model_template(model_dir, tokenizer, template)
    item = prompt_inputs(tokenizer, image_processor, prompt, image, template, model.config.image_seq_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate([item], pad_token_id=pad, padding_side="left")
    prompt_len = batch["input_ids"].shape[1]
    check_max_new_tokens(max_new_tokens, model.config, prompt_len)  # the engine allocates a cache for all of them
    engine = Engine(model, max_batch_size=1, max_seq_len=prompt_len + max_new_tokens, use_cuda_graph=use_cuda_graph)
    stops = stop_ids_for(engine, tokenizer)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   stop_token_ids=stops, seed=seed)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    if stream:
        write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        steps = engine.generate(*inputs, stream=True, **options)
        ids, shown = [], ""
        for new in steps:
            ids.append(int(new[0]))
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                write(text[len(shown):])
                shown = text
        out = steps.result
        rest = tokenizer.decode(out.sequences()[0], skip_special_tokens=True)
        if rest.startswith(shown) and len(rest) > len(shown):  # an unfinished character at the very end
            write(rest[len(shown):])
    else:
        out = engine.generate(*inputs, **options)
    tokens = out.sequences()[0]
    return {
        "text": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
        "tokens": tokens,
        "prompt_tokens": prompt_len,
        "new_tokens": len(tokens),
        "prefill_seconds": out.prefill_seconds,
        "decode_seconds": out.decode_seconds,
        "decode_tokens_per_s": out.decode_tokens_per_s,
        "device": device,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "cuda_graph": engine.use_cuda_graph,
        "template": template,
    }
