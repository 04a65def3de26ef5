"""The lmms-eval adapter on an offline local task: prompts, simple_evaluate, loglikelihood, the command line.

Needs the optional extra (``pip install -e ".[lmms]"``); marked ``lmms`` so the default run never needs it.
References are independent of the adapter: the project's own evaluator (``generate_answers``, training-time
tokenization) for one-image questions, and transformers' ``LlavaProcessor`` on a hand-written prompt for
two images and for text only.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaProcessor

from matvlm.cli import convert_and_save
from matvlm.data.llava import build_image_processor, generation_inputs, load_records
from matvlm.synthetic.world import generate_world
from matvlm.data.templates import get_template
from matvlm.data.tokenizer import train_tokenizer
from matvlm.eval.runner import generate_answers
from matvlm.io import load_vlm
from matvlm.synthetic.teacher import TeacherConfig, build_teacher, conversation_texts

pytest.importorskip("lmms_eval")
pytestmark = pytest.mark.lmms

TASK_DIR = Path(__file__).parent / "lmms_task"
MAX_NEW_TOKENS = 4  # as in lmms_task/matvlm_synth.yaml
SYSTEM = get_template("phi").system


def hand_prompt(question: str, n_images: int) -> str:
    """The phi template's generation prompt, written out: images first, one "<image>\\n" each."""
    return f"{SYSTEM} USER: " + "<image>\n" * n_images + f"{question} ASSISTANT:"


def doc_images(doc: dict) -> list:
    return [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in doc["images"]]


def save_random_teacher(world: Path, out: Path) -> None:
    """A tiny phi teacher with tokenizer, processor and matvlm.json. Its weights are random at a large
    scale: an initialised or briefly trained model answers every question alike, which would hide a wrong
    prompt or a lost image; these answers depend on both."""
    records = load_records(world / "train.json") + load_records(world / "test.json")
    tokenizer = train_tokenizer(conversation_texts(records), vocab_size=400, template="phi")
    cfg = TeacherConfig(data="", out="", vocab_size=400, image_size=64, patch_size=16, vision_hidden=32,
                        vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64)
    model = build_teacher(cfg, tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(out)
    processor = LlavaProcessor(image_processor=build_image_processor(64), tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="full", chat_template=tokenizer.chat_template)
    processor.save_pretrained(out)
    (out / "matvlm.json").write_text(json.dumps({"template": "phi"}))


def write_task(world: Path, task_dir: Path) -> list[dict]:
    """Copy the committed task next to a parquet file of 7 documents: 5 one-image questions from the
    world's test split, one question on two images, one text-only question."""
    import datasets

    records = load_records(world / "test.json")
    records = [r for r in records if len(r["conversations"]) == 2 and r["family"] != "caption"][:5]

    def png(record):
        return {"bytes": (world / "images" / record["image"]).read_bytes(), "path": None}

    docs = []
    for r in records:
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        docs.append({"id": r["id"], "question": question, "answer": r["answers"][0],
                     "choices": [r["answers"][0], "zebra", "7"], "answer_index": 0, "images": [png(r)],
                     "record": json.dumps(r)})
    docs.append({"id": "two", "question": "Are the two pictures the same?", "answer": "no", "choices": ["yes", "no"],
                 "answer_index": 1, "images": [png(records[0]), png(records[1])], "record": ""})
    docs.append({"id": "text", "question": "What is 2 + 2?", "answer": "4", "choices": ["4", "5"], "answer_index": 0,
                 "images": [], "record": ""})
    shutil.copytree(TASK_DIR, task_dir)
    (task_dir / "data").mkdir()
    features = datasets.Features(
        id=datasets.Value("string"), question=datasets.Value("string"), answer=datasets.Value("string"),
        choices=datasets.Sequence(datasets.Value("string")), answer_index=datasets.Value("int64"),
        images=datasets.Sequence(datasets.Image()), record=datasets.Value("string"),
    )
    datasets.Dataset.from_list(docs, features=features).to_parquet(str(task_dir / "data" / "test.parquet"))
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    with pytest.MonkeyPatch.context() as mp:
        # Offline, and the datasets cache inside the test folder (also for the command-line run).
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(root / "hf_datasets"))
        generate_world(root / "world", n_train=0, n_test=12, seed=1, image_size=64)
        save_random_teacher(root / "world", root / "teacher")
        convert_and_save(root / "teacher", root / "hybrid", overwrite=False, context=256, ratio=0.5)
        docs = write_task(root / "world", root / "task")
        yield root, docs


@pytest.fixture(scope="module")
def tasks(setup):
    """lmms-eval's task index of the local tasks only (with its ~3,000 built-in YAML files it takes 10 s)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(setup[0] / "task"), include_defaults=False)


@pytest.fixture(scope="module")
def teacher_lm(setup):
    from matvlm.eval.lmms import MaTVLM

    return MaTVLM(pretrained=str(setup[0] / "teacher"), device="cpu", batch_size=1)


def evaluate(lm, task_manager) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(model=lm, tasks=["matvlm_synth"], task_manager=task_manager, log_samples=True,
                           bootstrap_iters=0)


def predictions(results: dict, task: str = "matvlm_synth") -> dict[str, str]:
    return {s["doc"]["id"]: s["filtered_resps"][0] for s in results["samples"][task]}


def reference_answers(model_dir: Path, docs: list[dict], world: Path) -> dict[str, str]:
    """Answers computed without the adapter: one-image questions through the project's evaluator, the
    others through LlavaProcessor on the prompt written out by hand."""
    model = load_vlm(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = LlavaProcessor.from_pretrained(model_dir)
    records = [json.loads(d["record"]) for d in docs if d["record"]]
    run = generate_answers(model, tokenizer, processor.image_processor, records, [world / "images"], "phi",
                           batch_size=1, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    answers = dict(run.predictions)
    for doc in docs:
        if doc["record"]:
            continue
        images = doc_images(doc)
        inputs = processor(text=hand_prompt(doc["question"], len(images)), images=images or None, return_tensors="pt")
        assert (inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum() == 16 * len(images)
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers[doc["id"]] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return answers


def test_prompts_are_built_as_in_training(setup, teacher_lm):
    root, docs = setup
    tokenizer = teacher_lm.tokenizer
    for doc in docs[:5]:
        record = json.loads(doc["record"])
        expected = generation_inputs(record, tokenizer, "phi", 16, [root / "world" / "images"],
                                     teacher_lm.image_processor)["input_ids"].tolist()
        # lmms-eval tasks hand over the bare question, sometimes with a stray placeholder: same prompt.
        assert teacher_lm.prompt_ids(doc["question"], 1) == expected
        assert teacher_lm.prompt_ids(doc["question"] + " <image>", 1) == expected
    image = tokenizer.convert_tokens_to_ids("<image>")
    two = teacher_lm.prompt_ids("Compare them.", 2)
    assert two.count(image) == 32
    assert tokenizer.decode([t for t in two if t != image]) == f"{SYSTEM} USER: \n\nCompare them. ASSISTANT:"
    text_only = tokenizer(f"{SYSTEM} USER: What is 2 + 2? ASSISTANT:")["input_ids"]
    assert teacher_lm.prompt_ids("<image>What is 2 + 2?", 0) == text_only


def test_simple_evaluate_answers_match_references(setup, tasks, teacher_lm):
    root, docs = setup
    results = evaluate(teacher_lm, tasks)
    got = predictions(results)
    reference = reference_answers(root / "teacher", docs, root / "world")
    assert got == reference
    assert len(set(got.values())) >= 4, "a random model that answers everything alike cannot catch a wrong prompt"
    expected_score = sum(got[d["id"]].lower() == d["answer"] for d in docs) / len(docs)
    assert results["results"]["matvlm_synth"]["exact_match,none"] == pytest.approx(expected_score)

    teacher_lm.batch_size_per_gpu = 3  # left-padded batches, mixed image counts: the same answers
    try:
        assert predictions(evaluate(teacher_lm, tasks)) == got
    finally:
        teacher_lm.batch_size_per_gpu = 1


def test_hybrid_in_batches_matches_reference(setup, tasks):
    from matvlm.eval.lmms import MaTVLM

    root, docs = setup
    lm = MaTVLM(pretrained=str(root / "hybrid"), device="cpu", batch_size=3)
    assert type(lm.model).__name__ == "MaTVLMForConditionalGeneration" and lm.template == "phi"
    assert predictions(evaluate(lm, tasks)) == reference_answers(root / "hybrid", docs, root / "world")


def test_loglikelihood_matches_reference_and_lmms_eval_scoring(setup, tasks, teacher_lm):
    from lmms_eval.tasks import get_task_dict

    root, docs = setup
    task = get_task_dict(["matvlm_synth_mc"], tasks)["matvlm_synth_mc"]
    task.build_all_requests(rank=0, world_size=1)
    teacher_lm.task_dict = {"matvlm_synth_mc": task.dataset}
    teacher_lm.batch_size_per_gpu = 4
    try:
        scored = teacher_lm.loglikelihood(task.instances)
    finally:
        teacher_lm.batch_size_per_gpu = 1
    assert len(scored) == sum(len(d["choices"]) for d in docs)

    model, processor = teacher_lm.model, LlavaProcessor.from_pretrained(root / "teacher")
    tokenizer = teacher_lm.tokenizer
    by_doc: dict[int, list] = {}
    for request, (nll, greedy) in zip(task.instances, scored):
        doc = docs[request.doc_id]
        images = doc_images(doc)
        inputs = processor(text=hand_prompt(doc["question"], len(images)), images=images or None, return_tensors="pt")
        continuation = tokenizer(request.args[1], add_special_tokens=False)["input_ids"]
        ids = torch.cat([inputs["input_ids"], torch.tensor([continuation])], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs.get("pixel_values")).logits[0].float()
        n = len(continuation)
        logprobs = torch.log_softmax(logits[-n - 1 : -1], dim=-1)
        expected = -logprobs[torch.arange(n), torch.tensor(continuation)].sum().item()
        assert nll == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(continuation)).all())
        by_doc.setdefault(request.doc_id, []).append((nll, greedy))
    # lmms-eval's multiple-choice scoring must pick the most likely choice from what the adapter returns.
    for doc_id, outputs in by_doc.items():
        best = min(range(len(outputs)), key=lambda i: outputs[i][0])
        acc = task.process_results(task.dataset["test"][doc_id], outputs)["acc"]
        assert acc == float(best == docs[doc_id]["answer_index"])


def test_generation_settings(setup, tasks, teacher_lm):
    from lmms_eval.api.instance import Instance
    from lmms_eval.tasks import get_task_dict

    docs = setup[1]
    task = get_task_dict(["matvlm_synth"], tasks)["matvlm_synth"]
    teacher_lm.task_dict = {"matvlm_synth": task.dataset}

    def ask(gen_kwargs, doc_id=0):
        request = Instance("generate_until", (docs[doc_id]["question"], gen_kwargs, task.doc_to_visual, doc_id,
                                              "matvlm_synth", "test"), idx=0,
                           metadata={"task": "matvlm_synth", "doc_id": doc_id, "repeats": 1})
        return teacher_lm.generate_until([request])[0]

    calls = []
    original = teacher_lm.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    teacher_lm.model.generate = spy
    try:
        greedy = ask({"max_new_tokens": 4})
        # MM-Vet's settings: temperature 0.2 with do_sample false stays greedy.
        assert ask({"max_new_tokens": 4, "temperature": 0.2, "do_sample": False}) == greedy
        ask({"temperature": 0.7, "top_p": 0.9})
        stop = greedy.strip()[1:3]
        assert stop and ask({"max_new_tokens": 4, "until": [stop]}) == greedy.split(stop)[0].strip()
        with pytest.raises(ValueError, match="beam search"):
            ask({"num_beams": 2})
    finally:
        del teacher_lm.model.generate
    assert [c["max_new_tokens"] for c in calls] == [4, 4, 1024, 4]  # 1024: the adapter's default
    assert [c["do_sample"] for c in calls] == [False, False, True, False]
    assert calls[2]["temperature"] == 0.7 and calls[2]["top_p"] == 0.9 and "temperature" not in calls[1]
    assert calls[3]["stop_strings"] == [stop] and "stop_strings" not in calls[0]


def test_bad_model_args_are_named(setup):
    from matvlm.eval.lmms import MaTVLM

    with pytest.raises(ValueError, match="unknown model args.*max_lenght"):
        MaTVLM(pretrained=str(setup[0] / "teacher"), max_lenght=10)
    with pytest.raises(ValueError, match="batch_size=auto"):
        MaTVLM(pretrained=str(setup[0] / "teacher"), batch_size="auto")


def test_entry_point_registers_the_model(tmp_path, monkeypatch):
    """What the lmms_eval.models entry point in pyproject.toml does, from a stand-alone dist-info."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from matvlm.eval.lmms import MaTVLM

    info = tmp_path / "matvlm_lmms_probe-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: matvlm-lmms-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nmatvlm = matvlm.eval.lmms:manifest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("matvlm") is MaTVLM


def test_command_line(setup, teacher_lm):
    root, docs = setup
    out = root / "cli_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               LMMS_EVAL_DATASETS_CACHE=str(root / "hf_datasets"))
    cmd = [sys.executable, "-m", "matvlm.eval.lmms", "--model", "matvlm",
           "--model_args", f"pretrained={root / 'teacher'},device=cpu", "--tasks", "matvlm_synth",
           "--include_path", str(root / "task"), "--batch_size", "2", "--output_path", str(out),
           "--log_samples", "--verbosity", "DEBUG"]  # DEBUG: lmms-eval re-raises errors (exit code != 0)
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(out.rglob("*_results.json")).read_text())
    assert result["config"]["model_backend"].startswith("matvlm.eval.lmms.MaTVLM")
    samples = [json.loads(line) for line in next(out.rglob("*_samples_matvlm_synth.jsonl")).read_text().splitlines()]
    got = {docs[s["doc_id"]]["id"]: s["filtered_resps"] for s in samples}
    assert got == reference_answers(root / "teacher", docs, root / "world")
